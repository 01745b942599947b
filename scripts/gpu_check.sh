#!/usr/bin/env bash
# The one prepared GPU run (issue 4). Uses the machine's own python3, torch and triton (PYTHONPATH,
# no pip; PYTHON=... picks another interpreter).
#
#   bash scripts/gpu_check.sh [check|perf|tests|variants|all|cache]
#
#   check (default): compile every kernel config in parallel, then the test suite on CUDA in ten
#         shards, then the benchmark sweep, a LoRA-dropout run of peft and fused, and the issue-4
#         targets table. Its steps' limits add up to 565 s (precompiles 60 + 55 + 20, tests 130,
#         bench 190, bench-dropout 110; the last gets what is left of 530), so at most about 9
#         minutes; less when the steps end early.
#         (Set from the H200 run of 2026-11-28: the sweep took 150 s, the dropout run needs its
#         kernels precompiled in full, and the test shards, which compile kernels one at a time,
#         did not finish in 160 s either; their -v logs still say how far they got.)
#   variants (at most about 4 minutes: precompile 60 s, variants 180 s): benchmarks/variants.py,
#         the piece-by-piece timing for tuning.
#   perf: what issue 4's figures need, no test suite: a smoke test of the direct launch path (if it
#         fails, the rest runs with LORA_KERNELS_FAST_LAUNCH=0, and steps.md says so), the
#         precompiles, a cProfile of one layer step's host time (host-profile.md), the sweep, the
#         dropout run, variants, the base and the layer with its shrink ahead (version 25, off by
#         default: LORA_KERNELS_FUSE_SHRINK=ahead) at 8192 tokens, then two of the sweep's 8192-token
#         rows with fp32 adapters beside the bf16 base (peft's default), a Llama layer's seven
#         projections in one step (model-step.md), the shrink ahead again with LoRA dropout 0.1
#         beside peft, and what a launch's first call spends compiling on the host's CPUs
#         (first-step.md) in what is left (limits 60 + 60 + 55 + 70 + 190 + 110, 180 for variants,
#         45 for the shrink ahead's run, 30 + 45 for the fp32-adapter run and its precompile, 75,
#         30 + 40 for the shrink ahead's dropout run and its precompile, 2 × 40); the fp32-adapter
#         run starts only with 45 s left (65 where its precompile runs), the shrink ahead's dropout
#         run with 40 and the first-step pair with 70: on the sixth run's step times and the steps
#         added since, variants ends about 50 s before the deadline, so the shrink ahead's run is
#         the last to run whole and the later ones are cut or skipped; the dropout, fp32-adapter
#         and shrink-ahead dropout precompiles are skipped where the first precompile found all its
#         kernels in a carried pack (`covered`: about 75 s of start-ups saved);
#         GPU_CHECK_SMOKE=0 leaves out the smoke test.
#   tests: the suite's precompile (a quarter of what is left, at most 60 s; its dropout kernels
#         too, an eighth, at most 30 s, only with 240 s left) beside the ten shards, of which
#         only test_autotune_configs' two wait for it; the shards get what is left of
#         GPU_CHECK_SECONDS less 40 (TESTS_SECONDS, default 400, caps it); for a second call after perf.
#         Each shard writes tests-I/compiles.md: the kernels it compiled, by test (those a carried
#         pack lacked), and how many it found in Triton's cache; the summary has each one's totals.
#         Then, on the idle GPU, in what is left: perf's later steps (`later`: the fp32-adapter
#         run, the model step, the shrink ahead with dropout), which perf's own call cuts for time.
#   all: check (its precompile with variants' host pieces too), then variants in whatever is left
#         of the run's 530 s (GPU_CHECK_SECONDS less 40; none when check used its limits in full);
#         give the device call timeout_s=600.
#   cache: no GPU, before the device call: the precompiles of perf and tests (those steps alone,
#         each in full), and the test shards' kernels (their files run under the interpreter,
#         recording each launch as the GPU would make it), on this machine's CPUs into an empty
#         Triton cache, packed into build/triton-cache.tar.xz (about 30 minutes, 2,735 kernels
#         and 52 MiB on this project's 2-core machine, 2026-11-30, version 25: see benchmarks/NOTES.md).
#         Carry it in the device call (`carry: ["build/triton-cache.tar.xz"]`) and every mode
#         unpacks it first, so its precompiles find their kernels compiled. Run it with the GPU
#         machine's Python (minor version), torch and Triton (PYTHON=...): a cache key holds
#         Triton's build, which differs between Python versions, and a pack whose fingerprint is
#         not the machine's is not used.
#
# Each step has its own time limit and the steps after it run whatever happens to it; the
# benchmark writes what it measured even when its limit stops it. The whole run ends within
# GPU_CHECK_SECONDS (default 570, under the device call's 600; set it below the call's timeout_s
# when less device time is left): a step gets what is left of that at most, and one that would
# get under 20 s is skipped, so the packing below always happens. The device tool returns at most
# 8 files, so everything is packed into $OUT/gpu-check.tar.gz, with $OUT/summary.md beside it (the
# machine, the step times, each shard's closing line, compiles line and accuracy table,
# host-profile's rows, model-step, the fp32-adapter rows, the shrink-ahead rows, first-step,
# variants, and the targets last), and the summary
# is printed last; both are also written
# after every step, so a call stopped from outside keeps what its finished steps wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"  # the device machine's python3 is the one with torch; plain `python` may not be
what="${1:-check}"
case "$what" in check|perf|tests|variants|all|cache) ;; *) echo "usage: $0 [check|perf|tests|variants|all|cache]" >&2; exit 2 ;; esac
OUT="${OUT:-$PWD/gpu-out}"
DEST="$OUT"  # (steps below set OUT for their own reports; the pack goes here)
W="$(mktemp -d)/gpu-check"
mkdir -p "$DEST" "$W"
status=0
started=$(date +%s)
# Kept for the end: a stopped step's 20 s of grace (timeout -k), the targets table and the packing.
# (cache mode, with no device call around it, has no limit)
deadline=$(( started + ${GPU_CHECK_SECONDS:-570} - 40 )); [ "$what" = cache ] && deadline=$(( started + 86400 ))
# Triton's cache: compiled beforehand on a CPU (cache mode) and carried here. cache mode starts one
# of its own, empty, so that the pack holds what its precompiles compiled and nothing older.
CARRIED="${GPU_CHECK_CACHE:-build/triton-cache.tar.xz}"  # (another path: the tests')
[ "$what" = cache ] && export TRITON_CACHE_DIR="$(mktemp -d)"

# What is under $DEST comes back even when the device tool stops the whole call at its limit
# (less device time left than asked for), which no trap sees: so everything written so far is
# packed there after every step, each pack replacing the last whole (written aside, then moved:
# the test shards end in parallel).
snapshot() {
  local tmp rc
  tmp=$(mktemp "$DEST/.pack.XXXXXX") || return
  # (GNU tar's exit 1 is "a file changed as we read it": the other shards' logs, still growing)
  tar -czf "$tmp" -C "$(dirname "$W")" gpu-check 2>/dev/null; rc=$?
  if (( rc <= 1 )); then mv -f "$tmp" "$DEST/gpu-check.tar.gz"; else rm -f "$tmp"; fi
  [ -e "$W/summary.md" ] || cat "$W/machine.md" "$W/steps.md" > "$DEST/summary.md" 2>/dev/null  # (until the end's)
}
pack() {
  [ -e "$W/summary.md" ] || cat "$W/machine.md" "$W/steps.md" > "$W/summary.md" 2>/dev/null  # stopped before the summary
  snapshot
  [ -e "$W/summary.md" ] && cp "$W/summary.md" "$DEST/summary.md" && { echo; cat "$W/summary.md"; }
}
trap pack EXIT

# covered NAME: the precompile step NAME compiled all its kernels and found every one in Triton's
# cache, which a pack carried here filled: the pack was built from this kernel source, and holds
# the other precompiles' kernels too (cache mode runs them all, each in full, into one cache). Each
# of those would spend about 25 s of the device's time (its processes' start-up) finding them.
covered() { grep -Eq "^compiled ([0-9]+) of \1 in .* \1 found in Triton's cache$" "$W/$1.log" 2>/dev/null; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to NAME.log, note the outcome.
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  if [ "$what" = cache ]; then  # only the precompiles, not the first-step timing (its cache is its own)
    [[ " $* " == *" benchmarks.precompile "* && " $* " != *" --first-step "* ]] || return 0
    limit=$(( deadline - t0 ))
  fi
  if (( deadline - t0 < limit )); then limit=$(( deadline - t0 )); fi
  if (( limit < 20 )); then
    echo "- $name: SKIPPED, out of time" | tee -a "$W/steps.md"
    status=1
    return 125  # (not a failure of the step's own: no pytest or timeout exit status is 125)
  fi
  echo "== $name (limit ${limit} s)"
  timeout -k 20 "$limit" "$@" > "$W/$name.log" 2>&1
  rc=$?
  status=$(( status | (rc != 0) ))  # (a background step's status comes back through wait)
  echo "- $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)$( (( rc == 124 || rc == 137 )) && echo ', STOPPED by its limit')" \
    | tee -a "$W/steps.md"
  tail -n 3 "$W/$name.log"
  snapshot
  return "$rc"
}

{
  echo "# gpu_check $what, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.draw \
    --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  echo '```'
} > "$W/machine.md"
if [ "$what" != cache ] && [ -e "$CARRIED" ]; then  # (its line says whether it was used, and why not)
  "$PY" -m benchmarks.precompile --load-cache "$CARRIED" >> "$W/machine.md" 2>&1
fi
cat "$W/machine.md"

host=""; [ "$what" = check ] || host="--host"
# has MODE...: this run's mode is one of them (cache mode: as perf and tests, whose precompiles it runs)
has() { [[ " $* " == *" $what "* ]] || { [ "$what" = cache ] && [[ " $* " == *" perf "* || " $* " == *" tests "* ]]; }; }
# The smoke step's tests of the direct launch path are test_gpu.py's direct-launch test and
# test_launch.py but for those that start a new Python process (the switches read at import, the
# bad settings named, the autotune cache kept on disk: CPU work that CI does, each importing torch
# anew), these:
smoke_out="environment_at_import|_named|kept_on_disk"
# later: perf's steps after the shrink ahead's run, each guarded by the time left, which on the
# sixth run's step times (and the steps added since) perf cuts or skips. A tests call runs them
# too, after its shards (which ended in 13-224 s of their 252 in the sixth run), in what is left
# of its own time: the GPU is idle then. Their precompiles are left out where perf's first found
# every kernel in the carried pack (`covered`), and in a tests call, where the run's first call,
# never timed, compiles whatever the pack lacks.
later() {
  local pre=1 why="the carried pack holds it"
  if [ "$what" = tests ]; then pre=0 why="a tests call (its run's untimed first call compiles what the pack lacks)"
  elif covered precompile; then pre=0
  fi
  # The users' own default: fp32 adapters beside the bf16 base (peft's autocast_adapter_dtype, and
  # LinearWithLoRA's), where peft casts x up and runs its LoRA path in fp32 and the fused layer
  # keeps x as it is. base, peft and fused only (reference, compiled and addmm need one dtype).
  # Two shapes, one mode, autotuned as users run it: the fifth run used the fixed test tile here
  # (LORA_KERNELS_AUTOTUNE=0) and timed that tile, not the layer. Its ten launches' candidates are
  # precompiled first (a carried pack holds them: cache mode runs this precompile too), so the
  # run only times them. Before the model step (the fifth run measured it) and the first-step
  # pair, which is cut first. It starts with 45 s left for its run, 20 more where its precompile
  # runs too (the smallest limit a step gets).
  need=$(( pre ? 65 : 45 ))
  if (( deadline - $(date +%s) >= need )); then
    if (( ! pre )); then
      echo "- precompile-fp32-adapters: skipped, $why" | tee -a "$W/steps.md"
    else
      step precompile-fp32-adapters 30 "$PY" -m benchmarks.precompile --shapes 4096x4096,4096x14336 --tokens 8192 \
        --ranks 16 --adapter-dtype fp32
    fi
    step bench-fp32-adapters 45 "$PY" -m benchmarks.run --out "$W" --name fp32-adapters \
      --providers base,peft,fused --shapes 4096x4096,4096x14336 --tokens 8192 --ranks 16 --adapter-dtype fp32 \
      --modes forward+backward
  else
    echo "- bench-fp32-adapters: skipped, under $need s left" >> "$W/steps.md"
  fi
  # A decoder layer's seven projections in one training step: how much of the small shapes' host
  # time a model's step pays (the host runs ahead behind the large projections' GPU time).
  if (( deadline - $(date +%s) >= 30 )); then
    step model-step 75 "$PY" -m benchmarks.model_step --out "$W"
  else
    echo "- model-step: skipped, under 30 s left" >> "$W/steps.md"
  fi
  # The shrink ahead with LoRA dropout 0.1, base, peft and fused (issue 4's speedup over peft): at
  # 4096→4096 the default makes five launches a step there and the shrink ahead three, with the
  # mask drawn once per row block. After the model step, since the fifth run measured that; before
  # the first-step pair. Its candidates are precompiled first (52 of its 67 are not variants'; a
  # carried pack holds them, as cache mode runs this precompile too).
  if (( deadline - $(date +%s) >= 40 )); then
    if (( ! pre )); then
      echo "- precompile-shrink-ahead-dropout: skipped, $why" | tee -a "$W/steps.md"
    else
      step precompile-shrink-ahead-dropout 30 env LORA_KERNELS_FUSE_SHRINK=ahead "$PY" -m benchmarks.precompile \
        --dropout 0.1 --tokens 8192 --ranks 16
    fi
    step bench-shrink-ahead-dropout 40 env LORA_KERNELS_FUSE_SHRINK=ahead "$PY" -m benchmarks.run --out "$W" \
      --name shrink-ahead-dropout --providers base,peft,fused --dropout 0.1 --tokens 8192 --ranks 16 \
      --modes forward+backward
  else
    echo "- bench-shrink-ahead-dropout: skipped, under 40 s left" >> "$W/steps.md"
  fi
}
if has perf && [ "${GPU_CHECK_SMOKE:-1}" != 0 ]; then  # (GPU_CHECK_SMOKE=0 skips it when time is short)
  # The direct launch path (kernels._launch) is new on the GPU: if its own tests fail, keep the
  # figures coming through Triton's dispatch and say so.
  mkdir -p "$W/smoke"  # (its accuracy table goes into the pack, not beside it into $OUT)
  # (Only a failure turns them off: in the fourth run the step was stopped by its 40 s limit while
  # compiling, and that alone sent every later figure through Triton's dispatch.)
  # (The GPU test first, so that a stop at the limit comes after it. Not test_launch's tests that
  # start a new Python process ($smoke_out, above): most likely what the fourth run's 40 s went on.)
  OUT="$W/smoke" LORA_KERNELS_AUTOTUNE=0 step smoke 60 "$PY" -m pytest \
    tests/test_gpu.py::test_direct_launches_match_tritons_path tests/test_launch.py -q -p no:cacheprovider \
    -k "not ${smoke_out//|/ and not }"
  smoke=$?
  if (( smoke != 0 && smoke != 124 && smoke != 137 && smoke != 125 )); then  # (not stopped or skipped)
    export LORA_KERNELS_FAST_LAUNCH=0; echo "- the rest ran with LORA_KERNELS_FAST_LAUNCH=0" >> "$W/steps.md"
  fi
fi
if has check all perf; then
  # Fill Triton's cache for the sweep on all cores, every launch at once: the autotuner compiles a
  # launch's candidates only when the sweep first meets it (on threads since version 11), inside
  # the bench step's limit.
  # (--host: also the variants step's host-time pieces at 64x64, when it runs.)
  # (60 and 55 s: each took 37 s of 45 in the third run, and version 8's deep tiles for the thin
  # products add about 15% more compiles; the first also has variants' unpaired dA and dB since
  # version 9, 676 compiles against 546, recorded last with the other launches only variants
  # makes, so a precompile cut by its limit misses those, not the sweep's.)
  step precompile 60 "$PY" -m benchmarks.precompile --variants $host --report "$W/precompile.md"
  if covered precompile; then
    echo "- precompile-dropout: skipped, the carried pack holds it (precompile found all its kernels there)" \
      | tee -a "$W/steps.md"
  else
    step precompile-dropout 55 "$PY" -m benchmarks.precompile --dropout 0.1 --tokens 8192 --ranks 16
  fi
fi
if has perf; then
  # Where a layer step's host time goes (cProfile at 64x64, real launches, one fixed config), and
  # peft's own layer beside ours. (70 s: it imports peft and transformers and compiles about six
  # kernels, fp32 adapters beside bf16 for the peft rows; each row is logged as it is measured. 36
  # s in the fifth run, 49 in the sixth through Triton's dispatch; since the fifth the empty
  # Functions' rows, the flag memsets' two, and last LoRA dropout's four, whose kernels compile
  # here, the shrink ahead's two among them.)
  LORA_KERNELS_AUTOTUNE=0 step host-profile 70 "$PY" -m benchmarks.host_overhead --device cuda \
    --profile "$W/host-profile.md"
fi
if has check all tests; then
  # ... and for tests/test_autotune_configs.py, which runs every config on its own shapes.
  # (20 s beside the benchmark; 60 s in tests mode, where it never finished in 20)
  # (its shapes: 600 tokens, 64 -> 48 features; the pruner fits tiles to them, so another size
  # compiles other tiles)
  # In tests mode, after perf, little time may be left: the first precompile gets a quarter of it
  # (at most 60 s), the dropout one an eighth (at most 30 s) and only from 240 s. They run beside
  # the other shards, which use one fixed config (and find the kernels recorded from the suite in a
  # carried pack, cache mode below): only test_autotune_configs' shards wait for them (before, every shard did,
  # losing up to a quarter of the window).
  left=$(( deadline - $(date +%s) ))
  pre=20; has tests && pre=$(( left / 4 < 60 ? left / 4 : 60 ))
  precompile_tests() {
    step precompile-tests "$pre" "$PY" -m benchmarks.precompile \
      --shapes 64x48 --tokens 600 --ranks 16 --dtypes fp16,fp32 --trainable-base --variants
    # ... and its dropout test's masked kernels (tests mode only)
    has tests && (( left >= 240 )) && step precompile-tests-dropout $(( left / 8 < 30 ? left / 8 : 30 )) "$PY" \
      -m benchmarks.precompile --shapes 64x48 --tokens 600 --ranks 16 --dtypes fp32 --dropout 0.3 --variants
    return 0
  }
  # The suite with one fixed tile config (autotuning its dozens of shapes would only cost compile
  # time; the benchmark checks the autotuned kernels against float64 before timing), in parallel
  # shards: correctness only, no timing, so they may share the GPU. Not tests/test_hopper_build.py:
  # it compiles for sm_90 on the CPU, which CI does already. -v, so that a shard stopped by its
  # limit shows which test it was in.
  all_files=$(ls tests/test_*.py)
  skipped_files=" tests/test_hopper_build.py "
  # (The two longest files in slices, tests/conftest.py's --shard: in the fourth run
  # test_lora_linear.py, whole, was stopped at its limit of 239 s at 84%, and
  # test_autotune_configs.py took 204 s, where the other shards were done in 85-132 s. A shard
  # compiles the kernels a carried pack lacks one at a time, on one core: ten shards use ten
  # of the host's 16. test_benchmark_tools.py alone: in the fifth run the rest of the files, it
  # among them, were stopped by their limit of 240 s at 67%.
  # test_gpu.py before test_compile.py: the GPU-only tests first, should the limit stop the shard.
  # test_shrink_ahead.py, new since the sixth run, where it would have joined the rest, which took
  # 224 s of 252 there: with the training, inputs and modules tests, which took 35.
  # test_example.py and test_distributed.py on their own, out of the rest: 52 s and about 55 s of
  # its 212 there (the CPU quick run and the process groups' start-up), where the next run's
  # shards get about 200 s.)
  shards=("tests/test_lora_linear.py --shard 0/3" "tests/test_lora_linear.py --shard 1/3"
          "tests/test_lora_linear.py --shard 2/3"
          "tests/test_autotune_configs.py --shard 0/2" "tests/test_autotune_configs.py --shard 1/2"
          "tests/test_gpu.py tests/test_compile.py"
          "tests/test_training.py tests/test_inputs.py tests/test_modules.py tests/test_shrink_ahead.py"
          "tests/test_benchmark_tools.py" "tests/test_example.py tests/test_distributed.py")
  named=" ${shards[*]} $skipped_files"
  rest=""; for f in $all_files; do [[ "$named" == *" $f "* ]] || rest="$rest $f"; done
  # (an empty shard would run pytest on no file, i.e. on the whole suite)
  [ -n "${rest// /}" ] && shards+=("$rest")
  tests_limit=130
  has tests && tests_limit=$(( deadline - $(date +%s) )) && tests_limit=$(( tests_limit < ${TESTS_SECONDS:-400} ? tests_limit : ${TESTS_SECONDS:-400} ))
  shard() {  # shard I: its own -v log; `step` cuts its limit to what is left when it starts
    mkdir -p "$W/tests-$1"
    # (--report-compiles: the kernels it compiled, by test, where the carried pack lacked them, and
    # how many it found there; --durations: which tests took the shard's time)
    OUT="$W/tests-$1" LORA_KERNELS_AUTOTUNE=0 step "tests-$1" "$tests_limit" "$PY" -m pytest ${shards[$1]} -v -rs \
      --durations=15 -p no:cacheprovider --report-compiles "$W/tests-$1/compiles.md" > "$W/tests-$1.step" 2>&1
  }
  pids=()
  for i in "${!shards[@]}"; do
    [[ "${shards[$i]}" == *test_autotune_configs* ]] || { shard "$i" & pids+=($!); }
  done
  # (test_autotune_configs' shards after the precompiles, in a job of their own: its exit status
  # says whether they passed)
  ( precompile_tests > "$W/precompile-tests.step" 2>&1
    own=(); for i in "${!shards[@]}"; do [[ "${shards[$i]}" == *test_autotune_configs* ]] && { shard "$i" & own+=($!); }; done
    rc=0; for pid in "${own[@]}"; do wait "$pid" || rc=1; done; exit "$rc" ) &
  pids+=($!)
  # (and the shards' -v logs packed every 20 s while they run: a call stopped from outside keeps
  # how far each got)
  ( while sleep 20; do snapshot; done ) > /dev/null 2>&1 & packer=$!  # (no hold on the call's output)
  for pid in "${pids[@]}"; do wait "$pid"; status=$(( status | ($? != 0) )); done
  kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
  cat "$W/precompile-tests.step" "$W"/tests-*.step
  if [ "$what" = tests ]; then
    # perf's smoke verdict, read from the same tests in the shards' -v logs (this call runs no smoke
    # step): later's figures come through the direct launch path only where those all passed.
    if ! grep -q "^tests/test_gpu.py::test_direct_launches_match_tritons_path PASSED" "$W"/tests-*.log ||
        grep -hE "^tests/test_launch.py::\S+ (FAILED|ERROR)" "$W"/tests-*.log |
          grep -Evq "$smoke_out"; then
      export LORA_KERNELS_FAST_LAUNCH=0
      echo "- later: ran with LORA_KERNELS_FAST_LAUNCH=0 (the smoke step's tests did not all pass in the shards)" \
        >> "$W/steps.md"
    fi
    tested=$status; later; status=$tested  # (the call's status is its tests'; steps.md has later's)
  fi
fi
if has check all perf; then
  # The sweep (bf16, Llama-3-8B shapes; 2048 and 8192 tokens at rank 16, rank 64 at 8192 tokens).
  # (165 s in the fifth run, 152 in the sixth; since the forty-second session every provider is
  # timed in turn in forward+backward, 96 measurements more, about 7 s: its limit 180 -> 190 s.)
  step bench 190 "$PY" -m benchmarks.run --out "$W"
  # peft with its common lora_dropout = 0.1 against fused with the same: the target vs peft.
  step bench-dropout 110 "$PY" -m benchmarks.run --out "$W" --name dropout --providers base,peft,fused \
    --dropout 0.1 --tokens 8192 --ranks 16 --modes forward+backward
fi

if has variants all perf; then
  [ "$what" = variants ] && step precompile 60 "$PY" -m benchmarks.precompile --variants $host --report "$W/precompile.md"
  # (105 s in the sixth run, with the host's rows through Triton's dispatch: its key rows also
  # timed in turn with their floors, dropout's two launches with the same unmasked, and last the
  # forward's GEMM at 4096→4096 forced to each config the autotuner timed near its pick and to each
  # persistent one, and dX at 4096→1024 forced to its pick and each persistent one; since then the
  # twelve flattened or stored twins those had, compiled there, are gone, and added: PyTorch sums of
  # the thin products' operands, dX's sweep at 4096→4096 too and dS's at 4096→1024 over every
  # candidate, all from the pack or cuBLAS: about 30 s more, estimated; and since the thirty-eighth
  # session the CLEAN rows at two shapes (the same launches after a flush that reads) and the
  # layer's launches with dA and dB on a second stream at each shape: about 13 s.
  # Estimated 150 s in all: the fp32-adapter pair and the model step still run after it, the
  # first-step pair is likely cut. Since the thirty-ninth session the shrink ahead's seven rows at
  # each shape, about 20 s more: its limit 165 -> 180 s, and the model step may be cut short.)
  step variants 180 "$PY" -m benchmarks.variants --out "$W"
fi
if has perf; then
  # Version 25's shrink ahead (off by default) in users' eager steps: base and fused with
  # LORA_KERNELS_FUSE_SHRINK=ahead, in turn, at the four shapes, 8192 tokens, rank 16: issue 4's
  # forward and forward+backward ratios to the base with it, each measured in one run (its kernels
  # are in the pack). Before the fp32-adapter pair and the model step, which the sixth run measured.
  step bench-shrink-ahead 45 env LORA_KERNELS_FUSE_SHRINK=ahead "$PY" -m benchmarks.run --out "$W" \
    --name shrink-ahead --providers base,fused --tokens 8192 --ranks 16 --modes forward,forward+backward
  later
  # What a new launch's first call spends compiling on this host's CPUs, in empty caches (nothing
  # runs on the GPU): one launch's candidates one at a time, as Triton's autotuner compiles them,
  # then on the default threads (kernels.compile_configs). Last, the first to be cut (about 25 s
  # each, so the pair runs only with 70 s left):
  # it tests version 11's claim about a cold first step, not the targets.
  # (Both or neither: one alone is half a comparison. About 27 s each in the worst case.)
  if (( deadline - $(date +%s) >= 70 )); then
    for threads in 1 ""; do
      step "first-step${threads:+-one-thread}" 40 env ${threads:+LORA_KERNELS_COMPILE_THREADS=$threads} \
        TRITON_CACHE_DIR="$(mktemp -d)" "$PY" -m benchmarks.precompile --first-step --launches 1 --shapes 4096x1024 \
        --tokens 8192 --ranks 16 --report "$W/first-step.md"
    done
  else
    echo "- first-step: skipped, under 70 s left for the pair" >> "$W/steps.md"
  fi
fi

if [ "$what" = cache ]; then
  # The test shards' own kernels: tests mode runs them with one fixed config
  # (LORA_KERNELS_AUTOTUNE=0), compiled one at a time as each shard meets them, most of a shard's
  # time on the GPU. So the shards' files (not test_autotune_configs.py, precompiled above) run
  # here under the interpreter, recording each launch as the GPU would make it, and those compile.
  recorded=""; for f in $all_files; do [[ "$skipped_files tests/test_autotune_configs.py " == *" $f "* ]] || recorded+=" $f"; done
  t0=$(date +%s)
  TRITON_INTERPRET=1 "$PY" -m pytest $recorded -q -p no:cacheprovider --record-launches "$W/test-launches.pkl" \
    > "$W/record-tests.log" 2>&1
  rc=$?
  echo "- record-tests: exit $rc in $(( $(date +%s) - t0 )) s; $(tail -n 1 "$W/record-tests.log")" | tee -a "$W/steps.md"
  (( rc <= 1 )) || status=1  # (a failed test still recorded its launches up to the failure)
  LORA_KERNELS_AUTOTUNE=0 step precompile-test-shards 0 "$PY" -m benchmarks.precompile \
    --launches-from "$W/test-launches.pkl"
  mkdir -p "$(dirname "$CARRIED")"
  "$PY" -m benchmarks.precompile --save-cache "$CARRIED" 2>&1 | tee -a "$W/steps.md" || status=1
fi
# The targets table from whatever the benchmark wrote (a second of CPU, so even when time ran out).
results=$(ls "$W"/*/results.json 2>/dev/null | grep -v -e -dropout/ -e -fp32-adapters/ -e -shrink-ahead/ | head -n 1)
dropout=$(ls "$W"/*-dropout/results.json 2>/dev/null | head -n 1)
if [ -n "$results" ]; then
  timeout 20 "$PY" -m benchmarks.targets "$results" ${dropout:+--dropout "$dropout"} --out "$W/targets.md" \
    > "$W/targets.log" 2>&1 || status=1
fi

{
  cat "$W/machine.md"
  echo; echo "## Steps ($(( $(date +%s) - started )) s in all)"; cat "$W/steps.md"
  for log in "$W"/tests-*.log; do  # pytest's closing line ("== 3 failed, 97 passed, 2 skipped in 61.2s ==")
    [ -e "$log" ] || continue
    closing=$(grep -E '[0-9]+ (passed|failed|skipped|errors?)\b.* in [0-9.]+s' "$log" | tail -n 1)
    echo "- $(basename "$log" .log): ${closing:-no closing line (stopped?), last test started: $(grep -E '^tests/\S+::' "$log" | tail -n 1)}"
    compiles="$(dirname "$log")/$(basename "$log" .log)/compiles.md"
    [ -e "$compiles" ] && echo "  $(head -n 1 "$compiles")"  # (written as kernels are heard: a stopped shard's too)
  done
  for f in "$W"/tests-*/accuracy.md; do [ -e "$f" ] && { echo; echo "### accuracy ($(basename "$(dirname "$f")"))"; cat "$f"; }; done
  [ -e "$W/host-profile.md" ] && { echo; awk '{ print } /^```/ && ++fences == 2 { exit }' "$W/host-profile.md"; }  # its rows
  [ -e "$W/model-step.md" ] && { echo; cat "$W/model-step.md"; }
  for f in "$W"/*-fp32-adapters/report.md; do [ -e "$f" ] && { echo; echo "### fp32 adapters"; grep '^|' "$f"; }; done
  for f in "$W"/*-shrink-ahead/report.md "$W"/*-shrink-ahead-dropout/report.md; do
    [ -e "$f" ] || continue
    case "$f" in *-dropout/*) with=", LoRA dropout 0.1" ;; *) with="" ;; esac
    echo; echo "### shrink ahead (LORA_KERNELS_FUSE_SHRINK=ahead)$with"; grep '^|' "$f"
  done
  [ -e "$W/first-step.md" ] && { echo; cat "$W/first-step.md"; }
  [ -e "$W/variants.md" ] && { echo; cat "$W/variants.md"; }
  # (last: the device tool's output tail shows the end of this, should the files not come back)
  [ -e "$W/targets.md" ] && { echo; echo "## Targets"; cat "$W/targets.md"; }
  echo; echo "gpu_check exit status: $status"
} > "$W/summary.md"
exit "$status"
