#!/usr/bin/env bash
# The one prepared GPU run: the test suite on CUDA (bf16, TF32, offsets past 2^31 included), then
# the benchmark sweep. Everything goes under $OUT (default ./gpu-out). Uses the machine's own
# torch and triton (PYTHONPATH, no pip install). Budget: under 8 minutes (tests 200 s, benchmark 270 s at most).
#   usage: bash scripts/gpu_check.sh [tests|bench|all|variants]   (default all = tests + bench)
#   variants: benchmarks/variants.py, the piece-by-piece timing for tuning (about 2 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-$PWD/gpu-out}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
what="${1:-all}"
status=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

if [ "$what" = all ] || [ "$what" = tests ]; then
  # One fixed tile config for the suite: autotuning its dozens of shapes would only cost compile
  # time; the benchmark below checks the autotuned kernels against the reference before timing.
  LORA_KERNELS_AUTOTUNE=0 timeout 200 python -m pytest tests -q -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log"
  status=$(( status | PIPESTATUS[0] ))
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  # Results land in $OUT/<card>-<date>/: the device tool returns files at most two folders down
  # and eight in all (here: machine.txt, tests.log, accuracy.md, bench.log and the run's three).
  timeout 270 python -m benchmarks.run --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  status=$(( status | PIPESTATUS[0] ))
fi
if [ "$what" = variants ]; then
  timeout 300 python -m benchmarks.variants --out "$OUT" 2>&1 | tee "$OUT/variants.log"
  status=$(( status | PIPESTATUS[0] ))
fi
echo "gpu_check exit status: $status" | tee -a "$OUT/machine.txt"
exit "$status"
