"""The benchmark's own bookkeeping: the issue-4 targets table, and a sweep stopped by its time
limit or by an error still writing what it measured (the GPU run is too short to lose a sweep)."""

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks import measure, providers, report, run, targets, variants  # noqa: E402
from conftest import TOL, make_inputs, not_when_recording, reference, rel_err, use_triton  # noqa: E402
from lora_kernels import functional, kernels  # noqa: E402


def _rows(times, K=4096, N=1024, M=8192, r=16):
    return [{"K": K, "N": N, "tokens": M, "rank": r, "mode": mode, "provider": p, "ms": ms}
            for (mode, p), ms in times.items()]


def test_targets_table_ratios_and_verdicts():
    main = {"card": "GPU", "date": "2026-11-28", "dtype": "bfloat16", "rows": _rows({
        ("forward", "base"): 1.00, ("forward", "fused"): 1.04,                       # 1.04 <= 1.05: met
        ("forward+backward", "base"): 2.00, ("forward+backward", "fused"): 2.30,     # 1.15 > 1.10: missed
        ("forward+backward", "peft"): 9.99, ("forward+backward", "addmm"): 2.80,     # 1.22 >= 1.2: met
        ("forward+backward", "compiled"): 2.50})}                                    # 1.09 < 1.15: missed
    dropout = {"card": "GPU", "dtype": "bfloat16", "dropout": 0.1,
               "rows": _rows({("forward+backward", "peft"): 3.0, ("forward+backward", "fused"): 2.5})}
    line = [ln for ln in targets.table(main, dropout).splitlines() if ln.startswith("| 4096→1024")]
    # (‡: no time in turn here, so every ratio is from the times measured apart, and says so)
    assert line == ["| 4096→1024 | 8192 | 16 | 1.04 ✓ ‡ | 1.15 ✗ ‡ | 1.20 ✗ ‡ | 1.22 ✓ ‡ | 1.09 ✗ ‡ |"]
    # A dropout run made otherwise (another dtype, a trainable base, ...) is refused by name.
    for setting, value in (("dtype", "float16"), ("trainable_base", True), ("card", "other GPU"),
                           ("adapter_dtype", "float32")):
        with pytest.raises(ValueError, match=f"{setting}: .* in the main run, .* in the dropout run"):
            targets.table(main, {**dropout, setting: value})
    # (a run from before the adapters' dtype was recorded held them in its own dtype)
    assert targets.table(main, {**dropout, "adapter_dtype": "bfloat16"}) == targets.table(main, dropout)
    # Without a dropout run, peft's ratio comes from the main run; so it does, marked, for a
    # configuration the dropout run did not cover.
    assert "| 4.34 ✓ ‡ |" in targets.table(main)
    other = {**dropout, "rows": [dict(row, tokens=2048) for row in dropout["rows"]]}
    assert "| 4.34 ✓ † ‡ |" in targets.table(main, other)
    # Where base and fused were timed again in turn, × base is theirs (the sequential times drift).
    for row in main["rows"]:
        if row["provider"] == "fused":
            row["x_base_in_turn"] = {"forward": 1.07, "forward+backward": 1.09}[row["mode"]]
    line = [ln for ln in targets.table(main, dropout).splitlines() if ln.startswith("| 4096→1024")]
    assert line == ["| 4096→1024 | 8192 | 16 | 1.07 ✗ | 1.09 ✓ | 1.20 ✗ ‡ | 1.22 ✓ ‡ | 1.09 ✗ ‡ |"]
    # A baseline only 1.10× the base's own time: no layer that runs the base's products (at
    # cuBLAS's speed) is 1.2× faster than it, which the cell says; a reachable bound (compiled:
    # 1.25 × base) gets no such note, nor does a ratio whose run has no base time (dropout's here).
    for row in main["rows"]:
        if row["provider"] == "addmm":
            row["ms"] = 2.20
    line = [ln for ln in targets.table(main, dropout).splitlines() if ln.startswith("| 4096→1024")]
    assert line == ["| 4096→1024 | 8192 | 16 | 1.07 ✗ | 1.09 ✓ | 1.20 ✗ ‡ | 0.96 ✗ ‡ (base's: 1.10) | 1.09 ✗ ‡ |"]
    dropout["rows"] += _rows({("forward+backward", "base"): 2.4})
    assert "| 1.20 ✗ ‡ (base's: 1.25) |" in targets.table(main, dropout)


def test_targets_take_the_speedups_from_the_times_in_turn():
    """Where the run timed a baseline in turn with fused (forward+backward), its speedup is the
    ratio of the two's times in turn, not of the times measured apart, and so is the base's own
    speedup over it (the note below the bound); the dropout run's peft likewise."""
    main = _target_rows({"forward": 1.05, "forward+backward": 1.10})  # (apart: peft 1.5, addmm 1.2, compiled 1.15)
    in_turn = {"peft": 1.80, "addmm": 1.30, "compiled": 1.122}
    for row in main["rows"]:
        row["x_base_in_turn"] = in_turn.get(row["provider"], row.get("x_base_in_turn"))
    line = "| 4096→1024 | 8192 | 16 | 1.05 ✓ | 1.10 ✓ | 1.64 ✓ | 1.18 ✗ | 1.02 ✗ (base's: 1.12) |"
    assert line in targets.table(main).splitlines()
    dropout = {**{k: v for k, v in main.items() if k != "rows"}, "dropout": 0.1, "rows": _rows(
        {("forward+backward", "base"): 1.0, ("forward+backward", "peft"): 1.0, ("forward+backward", "fused"): 2.0})}
    for row, x in zip(dropout["rows"], (None, 1.76, 1.1)):
        row["x_base_in_turn"] = x
    assert "| 1.10 ✓ | 1.60 ✓ | 1.18 ✗ |" in targets.table(main, dropout)


def test_targets_table_says_why_a_ratio_is_missing_and_that_a_run_is_incomplete():
    times = {("forward", "base"): 1.0, ("forward", "fused"): 1.04, ("forward+backward", "base"): 2.0,
             ("forward+backward", "fused"): None, ("forward+backward", "addmm"): 2.8}
    rows = [dict(row, status="ERROR: RuntimeError: boom" if row["ms"] is None else "ok") for row in _rows(times)]
    main = {"card": "GPU", "date": "2026-11-28", "dtype": "bfloat16", "rows": rows,
            "notes": ["INCOMPLETE: OutOfMemoryError: CUDA out of memory after 1 of 12 configurations"]}
    text = targets.table(main)
    assert text.startswith("**INCOMPLETE** (the main run): OutOfMemoryError: CUDA out of memory after 1 of 12 "
                           "configurations.\n")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("| 4096→1024")]
    # (peft and compiled did not run at all: fused's error is the reason given)
    assert line == "| 4096→1024 | 8192 | 16 | 1.04 ✓ ‡ | fused ERROR | fused ERROR | fused ERROR | fused ERROR |"
    # The dropout run covered the configuration, but its fused was WRONG: said, not replaced by the main run.
    dropout = {"card": "GPU", "dtype": "bfloat16", "dropout": 0.1, "notes": [], "rows": [
        dict(row, status="WRONG (dA off by 3.0e-01, with its dropout mask)" if row["provider"] == "fused" else
             "timed, not checked") for row in _rows({("forward+backward", "peft"): 3.0, ("forward+backward", "fused"): None})]}
    main_ok = {**main, "notes": [], "rows": [dict(row, status="ok") for row in _rows(
        {("forward+backward", "base"): 2.0, ("forward+backward", "fused"): 2.2, ("forward+backward", "peft"): 4.4})]}
    text = targets.table(main_ok, dropout)
    assert "INCOMPLETE" not in text
    assert "| fused WRONG (dropout run) |" in text


def test_stopped_sweep_still_writes_its_results(tmp_path, monkeypatch):
    """A SIGTERM (what `timeout` sends) in the second configuration: the first is written."""
    calls = []
    real = run.bench_provider

    def stop_in_second_config(name, weights, *args):
        calls.append(weights.shape)
        if len(set(calls)) > 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name, weights, *args)

    monkeypatch.setattr(run, "bench_provider", stop_in_second_config)
    run.main(["--device", "cpu", "--shapes", "32x48,64x32", "--tokens", "16", "--ranks", "4",
              "--providers", "base,fused", "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert {(r["K"], r["N"]) for r in saved["rows"]} == {(32, 48)}  # the first configuration, whole
    assert all(r["ms"] > 0 for r in saved["rows"])
    assert any("INCOMPLETE: stopped by signal 15 after 1 of 2" in n for n in saved["notes"])
    assert "INCOMPLETE" in (folder / "report.md").read_text()


SMALL_RUN = ["--device", "cpu", "--shapes", "32x48,64x32", "--tokens", "16", "--ranks", "4",
             "--providers", "base,fused", "--warmup-ms", "1", "--rep-ms", "2"]


def test_failed_sweep_still_writes_its_results(tmp_path, monkeypatch, capsys):
    """Any exception escaping the sweep (a CUDA out-of-memory, or a sticky illegal memory access
    raised by the next configuration's inputs) ends it like a timeout: the configurations measured
    are written, marked INCOMPLETE, and the exit status is 1."""
    real = run.make_inputs
    calls = []

    def fail_in_second_config(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                               "might be asynchronously reported")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "make_inputs", fail_in_second_config)
    with pytest.raises(SystemExit) as stopped:
        run.main([*SMALL_RUN, "--out", str(tmp_path)])
    assert stopped.value.code == 1
    (folder,) = tmp_path.iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert {(r["K"], r["N"]) for r in saved["rows"]} == {(32, 48)}  # the first configuration, whole
    assert all(r["ms"] > 0 for r in saved["rows"])
    assert any(n.startswith("INCOMPLETE: RuntimeError: CUDA error: an illegal memory access was encountered "
                            "CUDA kernel errors") and n.endswith("after 1 of 2 configurations")
               for n in saved["notes"])
    assert "Traceback" in capsys.readouterr().err
    assert "INCOMPLETE: RuntimeError" in (folder / "report.md").read_text()


def test_a_provider_failing_in_memory_is_an_error_row(tmp_path, monkeypatch):
    """memory() raising (an out-of-memory) for one provider: its rows say ERROR, the others are timed."""
    real = run.memory

    def fail_for_fused(layer, x, dy):
        if layer.dropout == 0 and layer.lora:  # base is the only non-LoRA provider here
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(layer, x, dy)

    monkeypatch.setattr(run, "memory", fail_for_fused)
    rows = run.main([*SMALL_RUN, "--out", str(tmp_path)])
    statuses = {r["provider"]: r["status"] for r in rows}
    assert statuses["fused"].startswith("ERROR: in memory(): OutOfMemoryError: CUDA out of memory"), statuses
    assert statuses["base"] == "ok"
    assert all(r["ms"] > 0 for r in rows if r["provider"] == "base")
    assert all(r["ms"] is None for r in rows if r["provider"] == "fused")


def test_a_nan_in_any_gradient_fails_the_check(tmp_path, monkeypatch):
    """A NaN error anywhere makes a provider WRONG (max() over the errors kept the output's when a
    later gradient's was NaN, and such a provider was timed as correct)."""
    assert math.isnan(measure.worst({"out": 1e-7, "dX": math.nan})) and math.isnan(measure.worst({"out": math.nan}))
    assert measure.worst({"out": 1e-7, "dX": 3e-7}) == 3e-7
    real = run.check

    def nan_dx_for_fused(layer, x, dy, ref):
        errors = real(layer, x, dy, ref)
        return dict(errors, dX=math.nan) if layer.lora else errors

    monkeypatch.setattr(run, "check", nan_dx_for_fused)
    rows = run.main([*SMALL_RUN, "--out", str(tmp_path)])
    statuses = {r["provider"]: r["status"] for r in rows}
    assert statuses["fused"] == "WRONG (dX off by nan)" and statuses["base"] == "ok", statuses
    assert all(r["ms"] is None for r in rows if r["provider"] == "fused")


# Scripts run in a subprocess: the kernels must not be imported for the interpreter, which these
# tests run under without a GPU; autotuned, as the variants step is. JOBS keys compile jobs as precompile.jobs_for
# tells them apart, each with its (use, sizes).
JOBS = r"""
import torch
from unittest import mock
from benchmarks import precompile, variants
from lora_kernels import functional, kernels

def jobs(launches):
    with mock.patch.object(kernels, "_smem_bytes", lambda tensor: 227 * 1024):
        return {(tuple(map(precompile._spec, args)), tuple(sorted((k, str(v)) for k, v in kwargs.items())),
                 tuple(sorted(config.items()))): precompile.describe(args, kwargs, config)[:2]
                for args, kwargs, config in precompile.jobs_for(launches)}
"""


def run_jobs_script(script):
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, LORA_KERNELS_AUTOTUNE="1")
    done = subprocess.run([sys.executable, "-c", JOBS + script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_precompile_host_records_the_variants_host_pieces():
    """`precompile --host` (the variants step's host-time pieces, 64x64) compiles what the layer's
    forward+backward at that shape needs, as `--shapes 64x64 --tokens 64 --ranks 16` would, and what
    the latter misses: the plain GEMM without bias, the separate shrink's launches (S, y with S
    given, dS, dX with dS given) and the shrink ahead's (y, dX) beside the default fused ones."""
    out = run_jobs_script("""
host = jobs(precompile.record_host([torch.bfloat16], 132, 90))
layer = jobs(precompile.record([(64, 64, 64, 16)], [torch.bfloat16], 132, 90))
print(sorted({host[k] for k in host.keys() - layer.keys()}), sorted({layer[k] for k in layer.keys() - host.keys()}))
""")
    assert out == (
        "[('GEMM + low rank', 'M=64 N=64 K=64 r=16'), ('GEMM + low rank (Wᵀ view)', 'M=64 N=64 K=64 r=16'), "
        "('GEMM + shrink ahead', 'M=64 N=64 K=64 r=16'), ('GEMM + shrink ahead (Wᵀ view)', 'M=64 N=64 K=64 r=16'), "
        "('product', 'M=64 N=16 K=64'), ('product (Wᵀ view)', 'M=64 N=16 K=64'), "
        "('product (Wᵀ view)', 'M=64 N=64 K=64')] []"), out


def test_precompile_variants_records_every_launch_of_the_variants_step():
    """`precompile --variants` compiles every (launch, config) that `benchmarks.variants` times
    (here at 128 tokens, 64 -> 48 features, rank 16, on CPU placeholders): a launch it misses
    compiles its candidates one at a time inside the variants step's time limit (dA and dB in
    launches of their own, which the layer pairs, once did)."""
    out = run_jobs_script("""
class Recorder(precompile._Recorder):  # with the candidates, which variants.without_deep_tiles reads
    configs, cache = kernels._lora_matmul_kernel.configs, {}

recorder = Recorder()
with precompile.launched_on(recorder, 132, 90), mock.patch.object(functional, "select_backend", lambda *args: "triton"):
    for _, run in variants.pieces(64, 48, 128, 16, torch.bfloat16, torch.device("cpu")).values():
        run()
launched = jobs(recorder.launches)
recorded = jobs(precompile.record([(64, 48, 128, 16)], [torch.bfloat16], 132, 90, variants=True, ahead_at=(128, 16)))
print(len(launched), sorted({launched[k] for k in launched.keys() - recorded.keys()}))
""")
    count, missing = out.split(" ", 1)
    assert int(count) > 100 and missing == "[]", out


def test_precompile_records_the_adapters_dtype_it_is_given():
    """`precompile --adapter-dtype fp32` compiles the launches of fp32 adapters beside a bf16 base:
    A and B (the fused shrink's operands here, at 128 tokens) and dA, dB as fp32 pointers, every
    other operand bf16; without it, none is fp32."""
    out = run_jobs_script("""
def pointer_dtypes(launches):  # (the recorder keeps each tensor's dtype in its place)
    return sorted(str(a) for a in {a for args, _ in launches for a in args if isinstance(a, torch.dtype)})
print(pointer_dtypes(precompile.record([(64, 48, 128, 16)], [torch.bfloat16], 132, 90, adapter_dtype=torch.float32)),
      pointer_dtypes(precompile.record([(64, 48, 128, 16)], [torch.bfloat16], 132, 90)))
""")
    assert out == "['torch.bfloat16', 'torch.float32'] ['torch.bfloat16']", out


# (the recording runs under the interpreter, as gpu_check.sh's cache mode does on a CPU; on a GPU
# its stand-in kernel would take the place of compiled kernels launched directly)
_RECORDS_ON_THE_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="records a GPU's launches on the CPU")


@_RECORDS_ON_THE_CPU
def test_the_suites_launches_are_recorded_as_a_gpu_makes_them(monkeypatch):
    """`pytest --record-launches` (scripts/gpu_check.sh cache) records, under the interpreter, the
    launches the GPU run's tests will make, for their kernels to be compiled beforehand: a layer
    call on the kernels, and those that take the PyTorch path here and the kernels on a GPU (bf16,
    backend auto), recorded as `precompile.record` records them without the interpreter, argument
    for argument; each call computed as it would be here all the same."""
    pytest.importorskip("triton")
    from benchmarks import precompile

    calls = ((torch.float32, "triton"), (torch.bfloat16, "triton"), (torch.float32, "auto"))
    gpu = run_jobs_script(f"""
import json
launches = precompile.record([(64, 48, 600, 16)], [{", ".join(str(dtype) for dtype, _ in calls)}], 132, 90,
                            trainable_base=True)
print(json.dumps(sorted(map(precompile.kind, launches))))
""")
    use_triton(monkeypatch)  # (the buffers the kernels write poisoned)
    with precompile.recording_launches() as launches:
        for dtype, backend in calls:
            monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
            inputs = [t.requires_grad_() for t in make_inputs((600,), 64, 48, 16, dtype, seed=3)]
            y = functional.lora_linear(*inputs, 2.0)
            dy = torch.randn_like(y)
            y.backward(dy)
            y_ref, grads_ref = reference(*inputs, 2.0, dy)
            for got, want in zip((y, *(t.grad for t in inputs)), (y_ref, *grads_ref)):
                assert rel_err(got, want) < TOL[dtype]
    assert sorted(map(precompile.kind, launches)) == json.loads(gpu)
    assert len(launches) == 3 * 4  # (each call: y with S, dX with dS (the shrink fused at this size), dA with dB, dW)


def test_precompile_counts_a_tma_store_as_a_kernels_write():
    """precompile rejects a kernel that writes nothing (the compiler left a trap). A kernel with a
    TMA store writes its output with a bulk tensor copy from shared into global memory, no st.global
    (the persistent configs' PTX for sm_90, 2026-11-30, in the thirty-third session): a write; the
    same copy the other way (a TMA load) is not."""
    from benchmarks import precompile
    store = "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd5, {%r7, %r8}], [%r9];"
    load = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3, %r4}], [%r5];"
    assert precompile._TMA_STORE.search(store) and not precompile._TMA_STORE.search(load)


def test_a_pack_is_unpacked_again_only_where_its_kernels_are_not_all_there(tmp_path, monkeypatch, capsys):
    """A second device call on a warm machine carries the same pack into the same cache: it is not
    unpacked again while every file it wrote is there; a pack with other bytes, an entry gone or a
    file of one gone (Triton would find the group file and fail on the missing binary) unpacks it
    anew; a machine of another fingerprint is told so, not "already unpacked". A cache holding the
    marker packs its entries only."""
    import tarfile

    import triton

    from benchmarks import precompile
    made, home = tmp_path / "made", tmp_path / "home"
    for entry in ("abc", "def"):
        (made / entry).mkdir(parents=True)
        (made / entry / "k.cubin").write_bytes(os.urandom(64))
        (made / entry / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.cubin": str(made / entry / "k.cubin")}}))
    pack, other = tmp_path / "pack.tar.xz", tmp_path / "other.tar.xz"
    monkeypatch.setattr(precompile, "fingerprint", lambda arch: "triton=t backend=b environment=e")
    monkeypatch.setattr(triton.knobs.cache, "dir", str(made))
    precompile.save_cache(str(pack), 90)
    (made / "abc" / "k.cubin").write_bytes(os.urandom(64))
    precompile.save_cache(str(other), 90)
    monkeypatch.setattr(triton.knobs.cache, "dir", str(home))
    capsys.readouterr()

    def rm_entry():
        for f in (home / "def").iterdir():
            f.unlink()
        (home / "def").rmdir()

    def other_machine():
        monkeypatch.setattr(precompile, "fingerprint", lambda arch: "triton=t backend=X environment=e")

    said = []
    for path, before in ((pack, None), (pack, None), (other, None), (pack, None), (pack, rm_entry), (pack, None),
                         (pack, lambda: (home / "abc" / "k.cubin").unlink()), (pack, None), (pack, other_machine)):
        if before:
            before()
        precompile.load_cache(str(path))
        out = capsys.readouterr().out
        said.append(next(word for word in ("already unpacked", "NOT used", "unpacked") if word in out))
    assert said == ["unpacked", "already unpacked", "unpacked", "unpacked", "unpacked", "already unpacked",
                    "unpacked", "already unpacked", "NOT used"], said
    assert sorted(os.listdir(home)) == ["abc", "def", "lora_kernels-unpacked.json"]
    assert (home / "def" / "k.cubin").read_bytes() == (made / "def" / "k.cubin").read_bytes()
    precompile.save_cache(str(tmp_path / "again.tar.xz"), 90)  # (from the cache with the marker)
    with tarfile.open(tmp_path / "again.tar.xz") as tar:
        assert {n.split("/")[0] for n in tar.getnames()} == {"FINGERPRINT", "abc", "def"}


@_RECORDS_ON_THE_CPU
def test_pytest_records_the_launches_of_the_tests_it_ran(tmp_path):
    """`pytest --record-launches FILE` (scripts/gpu_check.sh cache) records each kind of launch of
    the tests it ran, every test's (each shape's rows), and nothing where a test runs the PyTorch
    path on the GPU too (LORA_KERNELS_BACKEND=torch, the `torch` parametrization). And
    `benchmarks.precompile` itself refuses to compile under the interpreter."""
    pytest.importorskip("triton")
    import pickle

    from benchmarks import precompile
    from test_lora_linear import SHAPES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recorded = {}
    for backend in ("torch", "triton"):
        path = tmp_path / f"{backend}.pkl"
        done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_lora_linear.py", "-q", "-p", "no:cacheprovider",
                               "-k", f"test_matches_reference_fp32 and {backend}", "--record-launches", str(path)],
                              cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
        with open(path, "rb") as f:
            recorded[backend] = pickle.load(f)
    assert recorded["torch"] == []
    kinds = {precompile.kind(launch) for launch in recorded["triton"]}
    assert len(kinds) == len(recorded["triton"]), len(recorded["triton"])
    rows = {args[kernels._lora_matmul_kernel.arg_names.index("M")] for args, _ in recorded["triton"]}
    assert {math.prod(lead) for lead, *_ in SHAPES} <= rows, rows  # (the forward's M: the tokens)
    done = subprocess.run([sys.executable, "-m", "benchmarks.precompile", "--limit", "1"], cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr, done.stderr[-2000:]


@_RECORDS_ON_THE_CPU
def test_bf16_tests_record_the_gpus_launches(tmp_path):
    """The tests of bf16 through the kernels skip under the interpreter, which computes bf16 wrong,
    but not in a `--record-launches` run: there each records the bf16 launches it makes on a GPU
    (33 kinds of the suite's, which no other test makes), computing on the PyTorch path."""
    pytest.importorskip("triton")
    import pickle

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    selection = ["tests/test_lora_linear.py", "tests/test_training.py", "-q", "-rs", "-p", "no:cacheprovider", "-k",
                 "triton and bfloat16 and (test_dtypes and 300 or test_fp32_adapters_beside_half_base or test_autocast)"]
    runs = {}
    for recording in (False, True):
        path = tmp_path / "launches.pkl"
        done = subprocess.run([sys.executable, "-m", "pytest", *selection,
                               *(["--record-launches", str(path)] if recording else [])],
                              cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[recording] = re.findall(r"^\d+ (?:passed|skipped).* in [\d.]+s$", done.stdout, re.M)  # (the closing line)
    assert runs[False] and runs[False][-1].startswith("4 skipped, "), runs[False]
    assert runs[True] and runs[True][-1].startswith("4 passed, "), runs[True]
    with open(path, "rb") as f:
        launches = pickle.load(f)
    dtypes = {a for args, _ in launches for a in args if isinstance(a, torch.dtype)}
    assert len(launches) >= 8 and torch.bfloat16 in dtypes, (len(launches), dtypes)


def test_fused_with_dropout_is_checked_with_its_mask(tmp_path, monkeypatch):
    """With --dropout, fused and peft are checked against float64 with the mask their call draws
    (drawn again from torch's seed), so a kernel that masks wrong is WRONG, not timed."""
    pytest.importorskip("peft")
    argv = ["--device", "cpu", "--shapes", "48x40", "--tokens", "24", "--ranks", "4", "--dropout", "0.3",
            "--providers", "base,peft,fused", "--modes", "forward+backward", "--warmup-ms", "1", "--rep-ms", "2"]
    rows = {r["provider"]: r for r in run.main([*argv, "--out", str(tmp_path / "right")])}
    assert rows["fused"]["status"] == "ok (PyTorch path, dropout 0.3 checked with its mask)"
    assert rows["fused"]["max_err"] < 1e-5 and rows["fused"]["ms"] > 0
    assert set(rows["fused"]["errors"]) == {"out", "dX", "dA", "dB"}
    assert rows["peft"]["status"] == "ok (dropout 0.3 checked with its mask)", rows["peft"]
    assert rows["peft"]["max_err"] < 1e-5 and rows["peft"]["ms"] > 0

    # p = 1 drops the LoRA term, which the check's float64 formula must do too (not divide by 0).
    argv1 = [a if a != "0.3" else "1.0" for a in argv]
    rows = {r["provider"]: r for r in run.main([*argv1, "--out", str(tmp_path / "all-dropped")])}
    assert rows["fused"]["status"] == "ok (PyTorch path, dropout 1.0 checked with its mask)", rows["fused"]

    # A layer whose mask is not the one the seed names (here: drawn with another p) is caught.
    real = providers.lora_linear
    monkeypatch.setattr(providers, "lora_linear", lambda *a, dropout_p=0.0: real(*a, dropout_p=dropout_p / 2))
    rows = {r["provider"]: r for r in run.main([*argv, "--out", str(tmp_path / "wrong")])}
    assert rows["fused"]["status"].startswith("WRONG (") and rows["fused"]["status"].endswith("with its dropout mask)")
    assert rows["fused"]["ms"] is None

    # peft's mask is drawn again from outside the layer: where that draw is not its own (here,
    # a draw made first), the row says the check failed and is still timed.
    real_peft = providers.PROVIDERS["peft"]

    def peft_drawing_first(*a, **k):
        layer = real_peft(*a, **k)
        return layer._replace(fn=lambda x: (torch.rand(1), layer.fn(x))[1])
    monkeypatch.setitem(providers.PROVIDERS, "peft", peft_drawing_first)
    monkeypatch.setitem(run.PROVIDERS, "peft", peft_drawing_first)
    rows = {r["provider"]: r for r in run.main([*argv, "--out", str(tmp_path / "peft-mask")])}
    assert rows["peft"]["status"].startswith("timed, check FAILED with the dropout mask drawn again"), rows["peft"]
    assert rows["peft"]["ms"] > 0 and rows["peft"]["max_err"] > 0.01


def test_fused_dropout_check_on_the_triton_backend(monkeypatch):
    """The same check on the kernels' own mask (kernels.keep_mask), as on a GPU: here through
    Triton's interpreter, on CPU tensors."""
    from benchmarks import measure

    if not kernels.INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter (the GPU run checks it in benchmarks.run)")
    from conftest import use_triton
    use_triton(monkeypatch)  # the kernels, their outputs poisoned first
    g = torch.Generator().manual_seed(0)
    w = providers.make_weights(48, 40, 4, dtype=torch.float32, device="cpu", generator=g)
    xs, dys = measure.make_inputs(24, 48, 40, dtype=torch.float32, device="cpu", generator=g)
    assert functional.select_backend(xs[0], w.A.dtype) == "triton"
    refs = {lora: measure.expected(w, xs[0], dys[0], lora=lora) for lora in (True, False)}
    timer = measure.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=2)
    (row,) = run.bench_provider("fused", w, xs, dys, refs, run.parse_args(["--dropout", "0.3"]), timer,
                                (48, 40, 24, 4), ["forward+backward"])
    # (the kernels ran, through the interpreter: not labelled the PyTorch path)
    assert row["status"] == "ok (dropout 0.3 checked with its mask)" and row["max_err"] < 1e-5, row


def test_fused_torch_runs_the_pytorch_path_where_fused_runs_the_kernels(monkeypatch):
    """`fused-torch` is the layer on its PyTorch path even where `fused` would launch the kernels
    (here the interpreter's, set up as a GPU's would be), forward and backward, checked with its own
    dropout mask; the backend setting is put back after each call; and without a GPU it is not
    in the default sweep, whose fused already runs that path."""

    if not kernels.INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    from conftest import use_triton
    use_triton(monkeypatch)
    launched = []
    real = kernels.lora_matmul
    monkeypatch.setattr(kernels, "lora_matmul", lambda *a, **k: (launched.append(1), real(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    w = providers.make_weights(48, 40, 4, dtype=torch.float32, device="cpu", generator=g)
    xs, dys = measure.make_inputs(24, 48, 40, dtype=torch.float32, device="cpu", generator=g)
    refs = {lora: measure.expected(w, xs[0], dys[0], lora=lora) for lora in (True, False)}
    timer = measure.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=2)
    args = run.parse_args(["--dropout", "0.3"])
    (row,) = run.bench_provider("fused-torch", w, xs, dys, refs, args, timer, (48, 40, 24, 4), ["forward+backward"])
    assert row["status"] == "ok (PyTorch path, dropout 0.3 checked with its mask)" and row["max_err"] < 1e-5, row
    assert not launched and os.environ["LORA_KERNELS_BACKEND"] == "triton"
    with pytest.raises(ValueError, match="x must have shape"):  # (put back after a call that raises too)
        providers.PROVIDERS["fused-torch"](w).fn(torch.randn(3, 7))
    assert os.environ["LORA_KERNELS_BACKEND"] == "triton"
    (row,) = run.bench_provider("fused", w, xs, dys, refs, args, timer, (48, 40, 24, 4), ["forward+backward"])
    assert row["status"] == "ok (dropout 0.3 checked with its mask)" and launched  # (the twin: the kernels)

    monkeypatch.delenv("LORA_KERNELS_BACKEND")  # and an unset variable is left unset
    layer = providers.PROVIDERS["fused-torch"](w)
    torch.autograd.grad(layer.fn(xs[0]), [w.A], dys[0])
    assert "LORA_KERNELS_BACKEND" not in os.environ

    args = run.parse_args(["--device", "cpu"])
    run.settings(args)
    assert args.providers == [p for p in providers.PROVIDERS if p not in ("fused-torch", "fused-routed")]
    args = run.parse_args(["--device", "cpu", "--providers", "base,fused-torch"])
    run.settings(args)
    assert args.providers == ["base", "fused-torch"]


def test_peft_adapters_are_in_the_base_dtype():
    """What the run notes say: peft's adapters are cast to the base's dtype (peft's own default
    would leave them fp32 beside a bf16 base, and its LoRA path in fp32)."""
    pytest.importorskip("peft")
    w = providers.make_weights(64, 48, 8, dtype=torch.bfloat16, device="cpu")
    layer = providers.PROVIDERS["peft"](w)
    assert {name: t.dtype for name, t in layer.params.items()} == dict.fromkeys("WbAB", torch.bfloat16)
    assert layer.fn(torch.randn(4, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_sweep_with_fp32_adapters_beside_a_bf16_base(tmp_path):
    """--adapter-dtype fp32 (peft's default beside a 16-bit base, and LinearWithLoRA's): peft and
    fused hold fp32 adapters and are checked against float64 within bf16's tolerance; the seed's
    formula and addmm, which cannot multiply bf16 by fp32, are SKIPPED saying so; the report names
    the adapters' dtype."""
    pytest.importorskip("peft")
    w = providers.make_weights(64, 48, 8, dtype=torch.bfloat16, device="cpu", adapter_dtype=torch.float32)
    for name in ("peft", "fused"):
        layer = providers.PROVIDERS[name](w)
        assert {k: t.dtype for k, t in layer.params.items()} == {**dict.fromkeys("Wb", torch.bfloat16),
                                                                 **dict.fromkeys("AB", torch.float32)}, name
    rows = run.main(["--device", "cpu", "--dtype", "bf16", "--adapter-dtype", "fp32", "--shapes", "48x40",
                     "--tokens", "24", "--ranks", "4", "--providers", "base,reference,addmm,peft,fused",
                     "--modes", "forward+backward", "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    for name in ("reference", "addmm"):
        assert by[name]["status"] == "SKIPPED: x (bfloat16) times A (float32): torch's products need one dtype"
    for name in ("peft", "fused"):
        assert by[name]["status"].startswith("ok") and 0 < by[name]["max_err"] < 1.2e-2 and by[name]["ms"] > 0
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "results.json").read_text())
    assert (meta["dtype"], meta["adapter_dtype"]) == ("bfloat16", "float32")
    assert "dtype bfloat16, adapters float32;" in (folder / "report.md").read_text()


def test_check_runs_the_calls_after_the_first(tmp_path, monkeypatch):
    """The check is not the provider's first call (which compiles and tunes, through Triton's
    dispatch on a GPU) but a later one, as the timed calls are: a provider right only on its first
    call is WRONG, one wrong only on its first call is checked ok."""
    def first_call(wrong_first):
        def factory(w, **kwargs):
            layer, calls = providers.PROVIDERS["addmm"](w, **kwargs), []

            def fn(x):
                calls.append(1)
                return layer.fn(x) * (1.5 if (len(calls) == 1) == wrong_first else 1.0)
            return layer._replace(fn=fn)
        return factory

    monkeypatch.setitem(run.PROVIDERS, "right-later", first_call(wrong_first=True))
    monkeypatch.setitem(run.PROVIDERS, "right-first", first_call(wrong_first=False))
    rows = run.main(["--device", "cpu", "--shapes", "32x48", "--tokens", "16", "--ranks", "4",
                     "--providers", "base,right-later,right-first", "--modes", "forward", "--warmup-ms", "1",
                     "--rep-ms", "2", "--out", str(tmp_path)])
    status = {r["provider"]: r["status"] for r in rows}
    assert status["right-later"] == "ok" and status["right-first"].startswith("WRONG"), status


def test_rows_carry_a_spread_and_base_timed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_FUSE_SHRINK", "0")  # (read at import: here only named in the report)
    rows = run.main([*SMALL_RUN[:3], "32x48", *SMALL_RUN[4:], "--out", str(tmp_path)])
    assert rows and all(r["ms_p20"] <= r["ms"] <= r["ms_p80"] for r in rows)
    assert all(r["base_again_ms"] > 0 for r in rows if r["provider"] == "base")
    assert all(r["base_again_ms"] is None for r in rows if r["provider"] != "base")
    # fused and base timed again in turn: the ratio of those medians on fused's rows, and in the report
    assert all(r["x_base_in_turn"] > 0 for r in rows if r["provider"] == "fused")
    assert all(r["x_base_in_turn"] is None for r in rows if r["provider"] != "fused")
    (folder,) = tmp_path.iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert any(n.startswith("base timed again at the end of each configuration") for n in saved["notes"])
    report_text = (folder / "report.md").read_text()
    assert "| p20–p80 |" in report_text
    (settings,) = [line for line in report_text.splitlines() if line.startswith("- settings: ")]
    assert "LORA_KERNELS_FUSE_SHRINK=0" in settings and saved["settings"]["LORA_KERNELS_FUSE_SHRINK"] == "0"
    fused = next(r for r in rows if r["provider"] == "fused")
    assert f"| {fused['x_base']:.2f} ({fused['x_base_in_turn']:.2f}) |" in report_text


def test_fused_torch_is_timed_in_turn_between_the_two_fused(tmp_path, monkeypatch):
    """Where fused-torch runs, the times in turn are base, fused, fused-torch, fused-torch, fused,
    base in each mode, and fused-torch's rows get their own ratio from them."""
    made, order = {}, []
    for name in ("base", "fused", "fused-torch"):
        def factory(*args, name=name, real=run.PROVIDERS[name], **kwargs):
            layer = real(*args, **kwargs)
            made[layer.fn] = name
            return layer
        monkeypatch.setitem(run.PROVIDERS, name, factory)
    real_step = run.mode_step
    monkeypatch.setattr(run, "mode_step", lambda layer, *a: (order.append(made[layer.fn]), real_step(layer, *a))[1])
    rows = run.main([*SMALL_RUN[:3], "32x48", *SMALL_RUN[4:], "--providers", "base,fused,fused-torch",
                     "--modes", "forward", "--out", str(tmp_path)])
    assert order[-6:] == ["base", "fused", "fused-torch", "fused-torch", "fused", "base"]
    assert {r["provider"]: r["x_base_in_turn"] is not None for r in rows} == {
        "base": False, "fused": True, "fused-torch": True}


def test_fused_routed_runs_with_the_threshold_set_for_its_calls_alone(monkeypatch):
    """`fused-routed` is `fused` with functional.TORCH_BELOW at ROUTED_BELOW during its calls (the
    backend's choice reads it, with the layer's out features), and as before after them."""
    seen = []
    real = functional.select_backend

    def spy(x, adapter_dtype, out_features=None):
        seen.append((functional.TORCH_BELOW, out_features))
        return real(x, adapter_dtype, out_features)
    monkeypatch.setattr(functional, "select_backend", spy)
    monkeypatch.setattr(functional, "TORCH_BELOW", 5)
    w = providers.make_weights(48, 40, 4, dtype=torch.float32, device="cpu")
    layer = providers.PROVIDERS["fused-routed"](w, dropout=0.2)
    torch.autograd.grad(layer.fn(torch.randn(6, 48)), [w.A], torch.randn(6, 40))
    layer.next_mask(torch.randn(6, 48), 0)
    assert layer.backend(torch.randn(6, 48)) == "torch"  # (CPU tensors)
    assert seen == [(providers.ROUTED_BELOW, 40)] * 3 and functional.TORCH_BELOW == 5
    seen.clear()
    providers.PROVIDERS["fused"](w).fn(torch.randn(6, 48))
    assert seen == [(5, 40)]


def test_host_overhead_profile_names_the_layers_functions(tmp_path, monkeypatch, capsys):
    """`benchmarks.host_overhead --profile` (CPU: launches stubbed out) writes the step times and
    cProfile tables of the eager step, of the backward's body and of F.linear's step, each table
    listing the functions that took the time (lora_matmul among the layer's)."""
    from benchmarks import host_overhead
    monkeypatch.setattr(host_overhead, "_median_us", lambda fn, n=0, rounds=0, sync=None: (fn(), 1.0)[1])
    out = tmp_path / "host.md"
    host_overhead.main(["--profile", str(out)])
    text = out.read_text()
    tables = text.split("## cProfile of 300 calls: ")[1:]
    assert [t.splitlines()[0] for t in tables] == [
        "lora_linear forward+backward, eager",
        "the backward's body (functional._backward_impl), called directly", "F.linear forward+backward"]
    assert "lora_matmul" in tables[0] and "lora_matmul" in tables[1] and "lora_matmul" not in tables[2]
    printed = capsys.readouterr().out
    assert "1.0 µs  lora_linear forward+backward, eager" in printed
    assert "1.0 µs  the backward's body called directly (functional._backward_impl, no autograd engine)" in printed
    assert "1.0 µs  lora_linear forward, grad enabled (the autograd.Function, no backward)" in printed
    assert "1.0 µs  peft LoRA Linear, fp32 adapters (peft's default), after fuse_lora (forward+backward)" in printed  # peft is a test dependency
    # (and, computed, the same step on the PyTorch path beside the addmm baseline's over the same calls)
    assert "1.0 µs  lora_linear forward+backward, eager, PyTorch path (LORA_KERNELS_BACKEND=torch)" in printed
    assert "1.0 µs  addmm baseline forward+backward (benchmarks.providers.AddmmLoRA)" in printed
    # (and the engine's own cost around a Python Function that computes nothing, alone and with
    # the layer's inputs, saved tensors and gradients)
    assert "1.0 µs  a Python autograd.Function that computes nothing, forward+backward" in printed
    assert "1.0 µs  the same with the layer's inputs, saved tensors and gradients" in printed
    # (and LoRA dropout's host cost: the layer's step with dropout 0.1, and peft's layer with it)
    assert "1.0 µs  lora_linear forward+backward with LoRA dropout 0.1, eager" in printed
    assert "1.0 µs  peft LoRA Linear, fp32 adapters (peft's default), lora_dropout 0.1, after fuse_lora" in printed
    # (and a generation step's forward under no_grad: the layer's, on both paths, F.linear's and peft's)
    for name in ("lora_linear forward under no_grad (evaluation)", "lora_linear forward under no_grad, PyTorch path",
                 "F.linear forward under no_grad", "peft LoRA Linear, fp32 adapters, its own forward under no_grad"):
        assert f"1.0 µs  {name}" in printed


def test_host_overhead_times_the_pytorch_path_with_its_setting(monkeypatch, capsys):
    """The PyTorch path's rows run with LORA_KERNELS_BACKEND=torch set for their whole timing (not
    around each call, which would add the setting's cost to theirs), and only they."""
    import os

    from benchmarks import host_overhead
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    settings = []

    def timer(fn, n=0, rounds=0, sync=None):
        settings.append(os.environ.get("LORA_KERNELS_BACKEND"))
        fn()
        return 1.0

    monkeypatch.setattr(host_overhead, "_median_us", timer)
    host_overhead.main([])
    rows = [line.split("µs  ", 1)[1] for line in capsys.readouterr().out.splitlines() if "µs  " in line]
    assert len(rows) == len(settings)
    torch_rows = [row for row, setting in zip(rows, settings) if setting == "torch"]
    assert [row.split(" (")[0] for row in torch_rows] == [
        "lora_linear forward+backward, eager, PyTorch path", "lora_linear forward under no_grad, PyTorch path"]
    assert os.environ.get("LORA_KERNELS_BACKEND") is None  # (and put back)


def test_host_overhead_row_that_fails_leaves_the_others(tmp_path, monkeypatch):
    """One row that raises (peft's, say) is written as FAILED, and the rows and profiles after it
    are still measured and written."""
    from benchmarks import host_overhead
    calls = []

    def timer(fn, n=0, rounds=0, sync=None):
        calls.append(fn)
        if len(calls) == 6:  # (the sixth row: the custom ops')
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(host_overhead, "_median_us", timer)
    out = tmp_path / "host.md"
    host_overhead.main(["--profile", str(out)])
    text = out.read_text()
    assert "  FAILED  the same through the custom ops: RuntimeError: boom" in text
    assert "1.0 µs  F.linear forward+backward" in text and "## cProfile of 300 calls: F.linear" in text


def test_host_overhead_takes_a_direct_launch_apart(monkeypatch):
    """On CUDA, `_launch_parts` times one direct launch with the compiled kernels stubbed out, that
    launch's kernel.run alone with the arguments it was given and with its tensors as addresses,
    and the eager step with every launch stubbed out. Stand-in compiled kernels record their calls:
    only the two kernel.run rows may reach a real one, and only the launch's own."""
    from benchmarks import host_overhead

    class Kernel:  # a compiled kernel as the direct path calls it
        function, packed_metadata = "function", "metadata"

        def __init__(self):
            self.calls = []

        def run(self, *args):
            self.calls.append(args)

    other, mine = Kernel(), Kernel()
    monkeypatch.setattr(kernels, "_COMPILED", {"other": (other, {}), "mine": (mine, {})})
    x = torch.randn(4, 4)

    def launch():  # the direct path, for a key it knows
        kernel, _ = kernels._COMPILED["mine"]
        kernel.run(1, 1, 1, 0, kernel.function, kernel.packed_metadata, None, None, None, x, 64, 0.5)

    def eager_step():
        for key in ("other", "mine"):
            kernels._COMPILED[key][0].run("step")

    parts = host_overhead._launch_parts(launch, eager_step, torch.device("cpu"), torch.float32)
    assert other.calls == mine.calls == []
    for name, step, context in parts:
        with context:
            step()
    assert other.calls == []
    assert mine.calls == [(1, 1, 1, 0, "function", "metadata", None, None, None, x, 64, 0.5),
                          (1, 1, 1, 0, "function", "metadata", None, None, None, x.data_ptr(), 64, 0.5)]
    assert [n.split(" (")[0].strip() for n, _, _ in parts] == [
        "of which lora_matmul's Python and allocations", "of which kernel.run alone: Triton's launcher, scratch "
        "allocation, driver", "the same with the pointers passed as addresses", "one torch.empty",
        "lora_linear forward+backward, eager, every launch stubbed out"]
    assert kernels._COMPILED["mine"][0] is mine  # the stubs are gone after each row
    # A launch that misses its key while stubbed runs for real, and is cached among the stubs: named.
    *_, (name, step, context) = host_overhead._launch_parts(
        launch, lambda: kernels._COMPILED.setdefault("new", (Kernel(), {})), torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="ran for real"):
        with context:
            step()
    # A launch that never reaches a compiled kernel directly (the direct path off) is named.
    with pytest.raises(RuntimeError, match="called 0 compiled kernels directly"):
        host_overhead._launch_parts(lambda: None, eager_step, torch.device("cpu"), torch.float32)


def test_model_step_checks_then_times_every_provider(tmp_path, monkeypatch):
    """`benchmarks.model_step` (CPU stand-in: the layer's widths / 16): each provider's seven
    projections are checked against float64 before one step of all seven is timed, with ratios to
    the base's step of the same run; a provider that computes a wrong projection is reported
    WRONG and not timed."""
    pytest.importorskip("peft")
    from benchmarks import model_step

    def wrong_addmm(w, **kwargs):  # addmm with the LoRA term scaled 10% off in every projection
        return providers.PROVIDERS["addmm"](dataclasses.replace(w, alpha=w.alpha * 1.1), **kwargs)

    def nan_addmm(w, **kwargs):  # addmm whose outputs are all NaN
        layer = providers.PROVIDERS["addmm"](w, **kwargs)
        return layer._replace(fn=lambda x: layer.fn(x) + math.nan)

    down_width = model_step.WIDTHS["m"] // (1 if torch.cuda.is_available() else 16)  # (model_step's widths)

    def down_on_torch(w, **kwargs):  # fused, saying that the MLP's down projection alone takes the PyTorch path
        layer = providers.PROVIDERS["fused"](w, **kwargs)
        return layer._replace(backend=lambda x: "torch" if x.shape[-1] == down_width else "triton")

    monkeypatch.setitem(model_step.PROVIDERS, "wrong", wrong_addmm)
    monkeypatch.setitem(model_step.PROVIDERS, "nan", nan_addmm)
    monkeypatch.setitem(model_step.PROVIDERS, "down", down_on_torch)
    model_step.main(["--tokens", "48", "--providers", "base,fused,peft,wrong,nan,down", "--rep-ms", "5",
                     "--warmup-ms", "1", "--dtype", "fp32", "--out", str(tmp_path)])  # (fp32 on a GPU too)
    rows = {r["provider"]: r for r in json.loads((tmp_path / "model-step.json").read_text())["rows"]}
    # (this package's layer names the projections that took the PyTorch path: all of them on a CPU)
    assert rows["fused"]["status"] == ("ok" if torch.cuda.is_available() else "ok (PyTorch path)")
    assert rows["down"]["status"] == "ok (down on the PyTorch path)", rows["down"]
    for name in ("base", "fused", "peft"):
        assert rows[name]["status"].startswith("ok") and rows[name]["ms"] > 0 and rows[name]["max_err"] < 1e-5, rows[name]
        assert rows[name]["x_base"] == pytest.approx(rows[name]["ms"] / rows["base"]["ms"])
        assert rows[name]["fused_speedup"] == pytest.approx(rows[name]["ms"] / rows["fused"]["ms"])
    assert rows["wrong"]["status"].startswith("WRONG") and rows["wrong"]["ms"] is None
    assert rows["nan"]["status"] == "WRONG (off by nan)" and rows["nan"]["ms"] is None
    assert "| 48 | fused |" in (tmp_path / "model-step.md").read_text()


def test_stopped_model_step_still_writes_what_it_measured(tmp_path, monkeypatch):
    """A time limit's SIGTERM during `benchmarks.model_step` keeps the rows measured before it."""
    from benchmarks import model_step
    measure = model_step.measure

    def stop_at_fused(row, provider, *args):
        if provider == "fused":
            raise run.Stopped("stopped by signal 15")
        measure(row, provider, *args)

    monkeypatch.setattr(model_step, "measure", stop_at_fused)
    model_step.main(["--tokens", "32", "--providers", "base,fused", "--rep-ms", "5", "--warmup-ms", "1",
                     "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "model-step.json").read_text())
    assert saved["meta"]["stopped"] == "stopped by signal 15"
    assert saved["rows"][0]["provider"] == "base" and saved["rows"][0]["ms"] > 0
    assert "INCOMPLETE: stopped by signal 15" in (tmp_path / "model-step.md").read_text()


def test_variants_time_no_new_variant_row_that_disagrees_with_its_twin(tmp_path, monkeypatch):
    """`benchmarks.variants` compares each new variant's row (paired, deep tiles) with its twin's before timing it: one that disagrees is reported WRONG, untimed; one that agrees
    carries the difference."""
    from benchmarks import variants
    t = torch.randn(8, 8)
    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {})
    monkeypatch.setattr(variants, "pieces", lambda *args: {
        "floor": ("fwd", lambda: t), "default": ("fwd", lambda: t),
        "new, wrong": ("fwd", lambda: t * 1.1), "new, right": ("fwd", lambda: t.clone())})
    monkeypatch.setattr(variants, "TWINS", {"new, wrong": "default", "new, right": "default"})
    monkeypatch.setattr(variants.kernels, "INTERPRET", True)  # (the CPU check mode: no timing)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")  # (main sets it; restored after the test)
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)  # (nor its SIGTERM handler)
    variants.main(["--shapes", "8x8", "--tokens", "8", "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    rows = {r["piece"]: r for r in json.loads((tmp_path / "variants.json").read_text())["rows"]}
    assert rows["new, wrong"]["ms"] is None and "WRONG: differs from 'default' by 1.0e-01" in rows["new, wrong"]["error"]
    assert rows["new, right"]["differs"] == 0.0 and rows["new, right"]["ms"] is not None


@pytest.mark.parametrize("floor_fails", [False, True])
def test_variants_host_rows_are_ratios_to_the_first_piece_or_none(floor_fails):
    """The host pieces' ratios are to the first (F.linear's); where it failed, the next piece must
    not stand in for it (its "× floor" read 1.000): no ratios, and the rest still timed."""
    from benchmarks import variants

    def floor():
        if floor_fails:
            raise RuntimeError("the floor failed")

    def layer():
        pass

    def other():
        pass

    times = {floor: 2.0, layer: 5.0, other: 3.0}
    rows = list(variants.host_rows({"floor": floor, "layer": layer, "other": other}, times.get))
    assert [r["piece"] for r in rows] == ["floor", "layer", "other"]
    if floor_fails:
        assert rows[0]["ms"] is None and "the floor failed" in rows[0]["error"]
        assert [(r["ms"], r["ratio"]) for r in rows[1:]] == [(5.0, None), (3.0, None)]
    else:
        assert [(r["ms"], r["ratio"]) for r in rows] == [(2.0, 1.0), (5.0, 2.5), (3.0, 1.5)]


def test_variants_md_names_a_failed_rows_config_on_one_line(tmp_path, monkeypatch):
    """A row that fails keeps, in variants.md, the config the autotuner chose for it (the fourth
    run's NaN row had it only in the JSON) and its error on one table line."""
    from benchmarks import variants
    config = variants.kernels.hopper_configs()[0]

    def fails_with_its_config():
        variants.kernels._lora_matmul_kernel.best_config = config
        raise RuntimeError("first line\nsecond | line")

    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {})
    monkeypatch.setattr(variants, "pieces", lambda *args: {"floor": ("fwd", fails_with_its_config)})
    monkeypatch.setattr(variants.kernels, "INTERPRET", True)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)
    variants.main(["--shapes", "8x8", "--tokens", "8", "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    (line,) = [ln for ln in (tmp_path / "variants.md").read_text().splitlines() if "| floor |" in ln]
    name = variants.kernels.tile_name(config.all_kwargs())
    assert line == f"| 8→8 | floor | FAILED: RuntimeError: first line second / line | | {name} |"


def test_variants_check_the_timed_path_and_survive_a_failing_piece(tmp_path, monkeypatch):
    """The result checked is a later call's, which on a GPU launches the compiled kernels directly
    as the timed calls do (the first goes through Triton's dispatch, to compile and tune); a host
    piece or a shape's setup that raises is reported and the rest still runs and is written."""
    from benchmarks import variants
    t = torch.randn(8, 8)
    calls = {"n": 0}

    def right_only_first():  # right through the first call's path, wrong after it
        calls["n"] += 1
        return t.clone() if calls["n"] == 1 else t * 1.1

    def broken():
        raise RuntimeError("boom")

    def pieces(K, N, *args):
        if K == 9:
            raise RuntimeError("setup boom")
        return {"floor": ("fwd", lambda: t), "default": ("fwd", lambda: t), "new": ("fwd", right_only_first)}

    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {"broken": broken, "fine": lambda: None})
    monkeypatch.setattr(variants, "pieces", pieces)
    monkeypatch.setattr(variants, "TWINS", {"new": "default"})
    monkeypatch.setattr(variants.kernels, "INTERPRET", True)  # (the CPU check mode: no timing)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")  # (main sets it; restored after the test)
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)  # (nor its SIGTERM handler)
    variants.main(["--shapes", "9x8,8x8", "--tokens", "8", "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    rows = [(r["shape"], r["piece"], r.get("error")) for r in json.loads((tmp_path / "variants.json").read_text())["rows"]]
    assert ("64→64", "broken", "RuntimeError: boom") in rows and ("64→64", "fine", None) in rows
    assert ("9→8", "setup", "RuntimeError: setup boom") in rows and ("8→8", "floor", None) in rows
    assert any(shape == "8→8" and piece == "new" and "WRONG" in (error or "") for shape, piece, error in rows)


def test_variants_rows_without_the_deep_tiles_tune_apart(monkeypatch):
    """`benchmarks.variants`' rows "without the deep tiles" run with the autotuner's candidates less
    the thin outputs' deep tiles, with choices and compiled kernels of their own, kept from call to
    call, and leave the layer's candidates, choices and kernels as they were."""
    from benchmarks import variants
    all_configs = kernels.hopper_configs()
    deep = [c for c in all_configs if c.kwargs["BLOCK_K"] >= kernels.DEEP_K]
    assert deep and all(c.kwargs["BLOCK_N"] <= kernels.THIN_N for c in deep)

    class Tuner:  # what the rows read and write of Triton's autotuner
        configs, cache = all_configs, {"layer's key": "layer's choice"}

    tuner, compiled = Tuner(), {"layer's launch": "layer's kernel"}
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", tuner)
    monkeypatch.setattr(kernels, "_COMPILED", compiled)
    seen = []

    def piece():
        seen.append((list(tuner.configs), dict(tuner.cache), dict(kernels._COMPILED)))
        tuner.cache["row's key"] = "row's choice"
        kernels._COMPILED["row's launch"] = "row's kernel"
        return "result"

    row = variants.without_deep_tiles(piece)
    assert row() == "result" and row() == "result"
    assert seen[0][0] == [c for c in all_configs if c not in deep] and seen[0][1:] == ({}, {})
    assert seen[1][1:] == ({"row's key": "row's choice"}, {"row's launch": "row's kernel"})
    assert tuner.configs is all_configs and tuner.cache == {"layer's key": "layer's choice"}
    assert kernels._COMPILED is compiled and compiled == {"layer's launch": "layer's kernel"}


def test_variants_time_each_new_variant_in_turn_with_its_twin(monkeypatch):
    """`benchmarks.variants.alternate` times a new variant's row and its twin in turn (row, twin,
    twin, row, ...), so a steady drift of the GPU's clocks leaves two equal pieces at a ratio of 1,
    and skips twins of another kind (a CUDA graph against an eager step) or without a timing."""
    from benchmarks import variants
    clock = {"now": 0.0}

    def drifting_timer(setup, step):  # each call 10% slower than the one before, plus the piece's cost
        clock["now"] += 0.1
        return (step(setup()) + clock["now"],)

    shape_pieces = {"default": ("fwd", lambda: 1.0), "new, same": ("fwd", lambda: 1.0),
                    "new, slower": ("fwd", lambda: 2.0), "new, graph": ("graph fwd", lambda: 1.0),
                    "new, failed": ("fwd", lambda: 1.0)}
    timed = {name: {} for name in shape_pieces if name != "new, failed"}
    monkeypatch.setattr(variants, "TWINS", {"new, same": "default", "new, slower": "default",
                                            "new, graph": "default", "new, failed": "default"})
    variants.alternate(shape_pieces, timed, drifting_timer)
    assert timed["new, same"]["vs_twin"] == pytest.approx(1.0)
    assert timed["new, slower"]["vs_twin"] > 1.3
    assert "vs_twin" not in timed["new, graph"] and "vs_twin" not in timed["default"]


_ON_THE_INTERPRETER = pytest.mark.skipif(not kernels.INTERPRET, reason="the kernels on CPU tensors: Triton's interpreter only "
                                         "(the GPU run's variants step makes the same rows on the GPU)")


@_ON_THE_INTERPRETER
def test_variants_time_the_dropout_launches_in_turn_with_the_same_without(monkeypatch):
    """`alternate` times each row of IN_TURN (a launch with LoRA dropout) in turn with its row there
    (the same launch without), for ``vs_other``: no ``vs_twin``, and no result check in the main
    loop (they compute other numbers); the real IN_TURN names rows that pieces() makes."""
    from benchmarks import variants
    clock = {"now": 0.0}

    def drifting_timer(setup, step):
        clock["now"] += 0.1
        return (step(setup()) + clock["now"],)

    assert all(variants.twin(name) is None for name in variants.IN_TURN)
    made = variants.pieces(64, 48, 128, 16, torch.float16, torch.device("cpu"))
    # (the whole steps replayed from CUDA graphs are made on a GPU only)
    named = {name for pair in variants.IN_TURN.items() for name in pair if not name.endswith("CUDA graph")}
    assert named <= set(made) and len(named) >= 8
    shape_pieces = {"floor": ("dx", lambda: 1.0), "plain": ("dx", lambda: 1.0), "masked": ("dx", lambda: 2.0),
                    "masked, as cheap": ("dx", lambda: 1.0)}
    monkeypatch.setattr(variants, "IN_TURN", {"masked": "plain", "masked, as cheap": "plain"})
    monkeypatch.setattr(variants, "TWINS", {})
    timed = {name: {} for name in shape_pieces}
    assert variants.alternate(shape_pieces, timed, drifting_timer) == []
    assert timed["masked"]["vs_other"] > 1.3 and timed["masked, as cheap"]["vs_other"] == pytest.approx(1.0)
    assert all("vs_twin" not in timed[name] for name in shape_pieces)


@_ON_THE_INTERPRETER
def test_variants_time_the_clean_l2_rows_after_a_flush_that_reads():
    """A row made with ``clean_l2`` (as graphed() wraps it too) is timed with the timer's clean_l2,
    any other row as before; each such row pieces(clean=True) makes (none without) is one, has a
    twin among them of its kind, and computes what its twin does. (The two graph steps' rows, made
    on a GPU only, are a kind of their own: the next test.)"""
    seen = []

    def timer(setup, step, **flush):  # (not calling step: the graphed row would need a GPU)
        seen.append(flush)
        return (len(seen) / 10,)

    plain, clean = (lambda: 1.0), variants.clean_l2(lambda: 2.0)
    graphed = variants.graphed(clean, torch.device("cpu"))  # (a wrapper only: no graph until it runs)
    assert [variants.time_row(timer, fn) for fn in (plain, clean, graphed)] == [0.1, 0.2, 0.3]
    assert seen == [{}, {"clean_l2": True}, {"clean_l2": True}] and clean() == 2.0
    made = variants.pieces(64, 48, 128, 16, torch.float16, torch.device("cpu"), clean=True)
    cleaned = [name for name in made if name.endswith(variants.CLEAN)]
    assert len(cleaned) == 5  # (F.linear, the three thin launches, the forward; the two graph steps on a GPU only)
    assert not any(name.endswith(variants.CLEAN) for name in variants.pieces(64, 48, 128, 16, torch.float16,
                                                                             torch.device("cpu")))
    for name in cleaned:
        kind, fn = made[name]
        assert fn.clean_l2 and made[variants.twin(name)][0] == kind
        assert variants.disagreement(fn(), made[variants.twin(name)][1]()) == 0.0


def test_variants_time_the_rows_conclusions_rest_on_in_turn_with_their_floor(monkeypatch):
    """`alternate` also times each row of AGAINST_FLOOR, and each row of the config sweeps (the
    forward's, dX's), in turn with the first row of its kind (its floor), for ``vs_floor``; not the
    floor itself, nor any other row, nor a row whose floor was not timed; and a pair that fails
    costs no other."""
    from benchmarks import variants
    clock = {"now": 0.0}

    def drifting_timer(setup, step):
        clock["now"] += 0.1
        return (step(setup()) + clock["now"],)

    def broken():
        raise RuntimeError("a fault")

    swept = variants.SWEEP_PREFIX + "128x256x64 w8 s3"
    swept_dx = variants.SWEEP_DX_PREFIX + "128x256x64 w8 s3 tma persistent"
    shape_pieces = {"cuBLAS": ("fwd", lambda: 1.0), "broken row": ("fwd", broken), "key row": ("fwd", lambda: 1.5),
                    swept: ("fwd", lambda: 1.0), "other row": ("fwd", lambda: 1.0), "dx floor": ("dx", lambda: 1.0),
                    "dx row": ("dx", lambda: 2.0), swept_dx: ("dx", lambda: 1.0), "dx, unfloored": ("dx", lambda: 1.0)}
    monkeypatch.setattr(variants, "AGAINST_FLOOR", ("broken row", "key row", "cuBLAS", "dx row", swept_dx))
    monkeypatch.setattr(variants, "TWINS", {})
    timed = {name: {} for name in shape_pieces if name != "dx floor"}
    errors = variants.alternate(shape_pieces, timed, drifting_timer)
    # (a pair that fails is reported, and the pairs after it are still timed)
    assert errors == ["'broken row' in turn with 'cuBLAS': RuntimeError: a fault"] and "vs_floor" not in timed["broken row"]
    assert timed["key row"]["vs_floor"] > 1.3 and timed[swept]["vs_floor"] == pytest.approx(1.0)
    assert all("vs_floor" not in timed[name] for name in ("cuBLAS", "other row", "dx row", swept_dx, "dx, unfloored"))
    timed = {name: {} for name in shape_pieces}  # (now with dX's floor timed)
    variants.alternate(shape_pieces, timed, drifting_timer)
    assert timed[swept_dx]["vs_floor"] == pytest.approx(1.0) and timed["dx row"]["vs_floor"] > 1.3
    assert "vs_floor" not in timed["dx, unfloored"]


def test_variants_sweep_forces_each_config_the_autotuner_timed_near_its_pick(monkeypatch):
    """`variants.forced` runs one launch with each config that the autotuner's own timings put
    within the given factor of its pick and then with each persistent candidate (however far from
    the pick), in order, one config at a time (a lone config runs as it is), each beside that
    timing and whether it was the pick; it reads no timings another launch left behind, and
    leaves the autotuner's candidates and choices as they were."""
    from benchmarks import variants
    configs = kernels.hopper_configs()[:4]
    persistent = [c for c in configs if c.kwargs["PERSISTENT"]]
    assert len(persistent) == 1 and persistent[0] == configs[2]
    timings = {configs[0]: [2.0, 1.9, 2.1], configs[1]: [1.0, 0.9, 1.1], configs[2]: [1.3, 1.2, 1.4],
               configs[3]: [1.2, 1.1, 1.3]}

    class Tuner:  # what forced reads and writes of Triton's autotuner
        cache = {"another key": configs[3]}
        configs_timings = {configs[3]: [0.1, 0.1, 0.1]}  # another launch's, stale

    tuner = Tuner()
    tuner.configs = configs
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", tuner)
    monkeypatch.setattr(kernels, "_COMPILED", {})

    def launch():  # as Triton's autotuner: several candidates are tuned (timed), a lone one just runs
        if len(tuner.configs) > 1:
            assert tuner.cache == {} and tuner.configs_timings == {}
            tuner.configs_timings, tuner.best_config = timings, configs[1]
            return "tuned"
        return tuner.configs[0]

    for within, expected in [(1.25, [(configs[1], 1.0, True), (configs[3], 1.2, False), (configs[2], 1.3, False)]),
                             (1.0, [(configs[1], 1.0, True), (configs[2], 1.3, False)]),
                             (1.35, [(configs[1], 1.0, True), (configs[2], 1.3, False), (configs[3], 1.2, False)])]:
        rows = variants.forced(launch, within)
        assert [(c, ms, picked) for c, _, ms, picked in rows] == expected
        assert [run() for _, run, _, _ in rows] == [c for c, _, _ in expected]
        assert tuner.configs is configs and tuner.cache == {"another key": configs[3]}
        tuner.configs_timings = {}


def test_variants_check_each_forced_config_against_the_launch_autotuned():
    """A sweep row's twin (its result checked against, and timed in turn with): its launch
    autotuned (the forward's GEMM, or dX), whatever the config; TWINS' for the rest."""
    from benchmarks import variants
    for config in kernels.hopper_configs():
        name = kernels.tile_name(config.all_kwargs())
        assert variants.twin(variants.SWEEP_PREFIX + name) == variants.SWEPT
        assert variants.twin(variants.SWEEP_DX_PREFIX + name) == variants.SWEPT_DX
    assert variants.twin("dA and dB, one paired launch (the layer's)") == "dA and dB, two launches"
    assert variants.twin(variants.SWEPT) is None


def tuned_between(monkeypatch, configs, seconds):
    """The kernel's autotuner with ``configs`` for candidates, an empty cache kept off disk, and
    ``seconds(config)`` for each candidate's timing: Triton's own Autotuner.run then tunes each new
    launch between them (under the interpreter too). All put back after the test."""
    tuner = kernels._lora_matmul_kernel
    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "cache_results", False)
    for left_by_a_tuning in ("best_config", "configs_timings", "nargs", "bench_time"):  # (Autotuner.run sets them)
        monkeypatch.setattr(tuner, left_by_a_tuning, getattr(tuner, left_by_a_tuning, None), raising=False)
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **flags: [seconds(config)] * 3)
    return tuner


@_ON_THE_INTERPRETER
def test_variants_sweeps_force_the_forward_dx_and_ds_launches(tmp_path, monkeypatch):
    """The three sweeps end to end through the kernels (the interpreter, the autotuner's timings
    stood in for: a one-tile config picked, a persistent one with a TMA store 1.3 × slower): the
    forward's GEMM forced to each config within 1.25 × the pick and to the persistent one, which
    stores by pointers (y's rows, 36 fp16 elements, are no whole 16 bytes); dX forced to its pick
    and to the persistent one, which stores by TMA (dX's rows, 64 elements, are: a store without
    TMA loads, dY's rows being no whole 16 bytes either); the thin dS forced to every candidate;
    each row checked against its twin before it is timed, each run the kernel the autotuner's
    pruner fitted to the launch."""
    one_tile, persistent = (kernels._config(32, 32, 32, 4, 2, tma=True, persistent=p, store=p) for p in (False, True))
    tuned_between(monkeypatch, [one_tile, persistent], lambda config: 1.3 if config.kwargs["PERSISTENT"] else 1.0)
    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {})
    pieces = variants.pieces
    monkeypatch.setattr(variants, "pieces", lambda *args: pieces(*args) if args[6] else {})  # (the sweeps only)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)
    variants.main(["--shapes", "64x36", "--sweep", "64x36", "--sweep-dx", "64x36", "--sweep-thin", "64x36", "--tokens", "64", "--dtype", "fp16",
                   "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "variants.json").read_text())["rows"]
    assert not [row for row in rows if row.get("error")], rows
    forced = [row["piece"] for row in rows if " forced to " in row["piece"]]
    # (dX reads dY, rows of 36 elements, through pointers: its configs are pruned to pointer loads)
    fwd, dx = variants.SWEEP_PREFIX + "32x32x32 w4 s2 tma", variants.SWEEP_DX_PREFIX + "32x32x32 w4 s2"
    thin = variants.SWEEP_THIN_PREFIX + "32x16x32 w4 s2"  # (dS: every candidate, fitted to its 16 columns)
    assert forced == [fwd, fwd + " persistent", dx, dx + " persistent tma-store", thin, thin + " persistent tma-store"]
    assert all(row["differs"] <= 1e-3 for row in rows if " forced to " in row["piece"])
    # (the swept dS checked against its own twin first, which its sweep pass times too)
    swept_thin = [row for row in rows if row["piece"] == variants.SWEPT_THIN]
    assert len(swept_thin) == 1 and swept_thin[0]["differs"] <= 1e-3


def test_variants_time_the_clean_steps_in_turn_with_each_other_after_the_clean_flush():
    """The layer's step after a clean flush (CLEAN_STEP) is timed in turn with the base's step after
    one (its kind's floor, "× floor"), both with clean_l2, and not with its twin, the layer's step
    after the usual flush (another kind), which is timed in turn with its own floor without it."""
    from benchmarks import variants
    flushes = []

    def timer(setup, step, **flush):
        flushes.append(flush)
        return (step(setup()),)

    base, layer = "base F.linear fwd+bwd, CUDA graph (floor)", "layer fwd+bwd, separate shrink, CUDA graph"
    shape_pieces = {base: ("graph step", lambda: 1.0), layer: ("graph step", lambda: 1.3),
                    variants.CLEAN_BASE: ("graph step" + variants.CLEAN, variants.clean_l2(lambda: 1.0)),
                    variants.CLEAN_STEP: ("graph step" + variants.CLEAN, variants.clean_l2(lambda: 1.2))}
    timed = {name: {} for name in shape_pieces}
    assert variants.alternate(shape_pieces, timed, timer) == []
    assert timed[variants.CLEAN_STEP] == {"vs_floor": pytest.approx(1.2)} and timed[layer] == {"vs_floor": pytest.approx(1.3)}
    assert flushes.count({"clean_l2": True}) == flushes.count({}) == 4  # (two rounds of two, each pair)


def test_variants_make_the_clean_l2_rows_at_the_shapes_named(tmp_path, monkeypatch):
    """pieces() gets clean=True in the plain pass of each --clean-l2 shape (by default those of
    DEFAULT_CLEAN among --shapes), never in a sweep's pass."""
    from benchmarks import variants
    passes = []
    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {})
    monkeypatch.setattr(variants, "pieces", lambda K, N, M, r, dtype, device, sweep, clean: passes.append(
        (K, N, sweep, clean)) or {})
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)
    monkeypatch.setattr(variants.kernels, "INTERPRET", True)  # (the CPU check mode, on a GPU machine too)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")  # (main sets it; restored after the test)
    common = ["--tokens", "64", "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path), "--sweep-thin", "",
              "--sweep-dx", ""]
    variants.main(["--shapes", "64x36,64x48", "--clean-l2", "64x48", "--sweep", "64x48"] + common)
    assert passes == [(64, 36, None, False), (64, 48, None, True), (64, 48, "forward", False)]
    passes.clear()
    variants.main(["--shapes", "4096x1024,64x48", "--sweep", ""] + common)
    assert passes == [(4096, 1024, None, True), (64, 48, None, False)]


def test_variants_md_gives_each_forced_config_its_autotuner_timing_and_check(tmp_path, monkeypatch):
    """A sweep row's line in variants.md names its config, whether the autotuner picked it and its
    own timing of it, and the row it was checked against (the forward's GEMM launch, autotuned)."""
    from benchmarks import variants
    t = torch.randn(8, 8)

    def forced_config():
        return t.clone()
    forced_config.tuned = {"tuner_ms": 0.5, "picked": True}
    swept = variants.SWEEP_PREFIX + "128x256x64 w8 s3"
    monkeypatch.setattr(variants, "host_pieces", lambda dtype, device: {})
    monkeypatch.setattr(variants, "pieces", lambda *args: {
        "floor": ("fwd", lambda: t), variants.SWEPT: ("fwd", lambda: t), swept: ("fwd", forced_config)})
    monkeypatch.setattr(variants.kernels, "INTERPRET", True)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(variants.signal, "signal", lambda *args: None)
    variants.main(["--shapes", "8x8", "--tokens", "8", "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    (line,) = [ln for ln in (tmp_path / "variants.md").read_text().splitlines() if swept in ln]
    assert line.endswith(" (the autotuner's pick); the autotuner's timing: 0.5000 ms; differs from "
                         f"'{variants.SWEPT}' by 0.0e+00 |"), line


def _collected(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_lora_linear.py", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_shards_split_a_file_into_consecutive_slices():
    """`pytest --shard I/N` (tests/conftest.py), as scripts/gpu_check.sh splits the longest file
    over parallel processes: the slices cover every test once, in order."""
    everything = _collected()
    slices = [_collected("--shard", f"{i}/3") for i in range(3)]
    assert len(everything) > 30 and all(len(s) >= len(everything) // 3 for s in slices)
    assert slices[0] + slices[1] + slices[2] == everything


@pytest.mark.parametrize("bad", [["--tokens", "0"], ["--ranks", "0"], ["--shapes", "64x0"], ["--dropout", "2"]])
def test_sweep_options_out_of_range_are_refused_up_front(bad, capsys):
    """Before any configuration runs (a zero-token or rank-0 sweep divided by zero mid-run; a
    dropout of 2 ran the whole sweep to report ERROR rows)."""
    with pytest.raises(SystemExit):
        run.parse_args(bad)
    err = capsys.readouterr().err
    assert "at least 1" in err or "[0, 1]" in err, err


def test_model_step_refuses_a_dropout_out_of_range_up_front(tmp_path, capsys):
    from benchmarks import model_step
    with pytest.raises(SystemExit):  # (--out: a regression that runs anyway writes nothing into the checkout)
        model_step.main(["--dropout", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert "a dropout probability is in [0, 1], got 2" in capsys.readouterr().err


def test_a_run_leaves_no_stale_plot_beside_its_report(tmp_path, monkeypatch):
    """Runs on one day share a card-and-date folder: a run that plots nothing must not leave an
    earlier run's plots.png beside its own report."""
    from benchmarks import report
    folder = tmp_path / "card-date"
    folder.mkdir()
    (folder / "plots.png").write_bytes(b"an earlier run's")
    monkeypatch.setattr(report, "plot", lambda *a, **k: False)  # (a run that plots nothing)
    monkeypatch.setattr(report, "report_markdown", lambda meta, rows, plots: f"plots: {plots}")
    paths = report.write(folder, {"card": "CPU", "dtype": "float32", "modes": ["forward"]}, [])
    assert not (folder / "plots.png").exists() and (folder / "report.md").read_text() == "plots: []", paths


@pytest.mark.parametrize("thin", ["triton", "cublas"])
def test_variants_composed_step_computes_the_layers_gradients(thin, monkeypatch):
    """`benchmarks.variants.composed` (the layer's launches called directly, its thin products on
    Triton or through the PyTorch path's cuBLAS calls) returns the layer's dX, dA and dB, checked
    against float64, every buffer its kernels write poisoned first."""
    from benchmarks import variants
    from conftest import TOL, make_inputs, reference, rel_err, use_triton  # (inputs on the suite's DEVICE)
    use_triton(monkeypatch)
    x, W, b, A, B = make_inputs((24,), 40, 32, 4, torch.float32, seed=3)
    dy = torch.randn(24, 32, generator=torch.Generator().manual_seed(4)).to(x.device)
    matmul = kernels.lora_matmul if thin == "triton" else functional.torch_matmul
    got = variants.composed(matmul, x, W, b, A, B, dy, torch.float32)()
    _, (dx, _, _, dA, dB) = reference(x, W, b, A, B, 2.0, dy)
    for name, g, want in zip(("dX", "dA", "dB"), got, (dx, dA, dB)):
        assert rel_err(g, want) < TOL[torch.float32], name


def test_variants_composed_step_beside_issues_da_and_db_on_a_joined_second_stream(monkeypatch):
    """With ``beside``, `benchmarks.variants.composed` issues the paired dA and dB after dX, on a
    second stream that waits for the current one after dS and before dX (so for dS alone), and
    which the current one waits for before the step returns (stand-in streams record the order);
    it returns what the one-stream step does."""
    from benchmarks import variants
    from conftest import make_inputs, use_triton
    use_triton(monkeypatch)
    x, W, b, A, B = make_inputs((24,), 40, 32, 4, torch.float32, seed=3)
    dy = torch.randn(24, 32, generator=torch.Generator().manual_seed(4)).to(x.device)
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def on(stream):
        events.append(f"on {stream.name}")
        yield
        events.append(f"back from {stream.name}")

    real = kernels.lora_matmul

    def launch(*args, **kwargs):
        events.append("dA and dB" if "pair" in kwargs else "dX" if "lowrank" in kwargs and args[0] is dy else "other")
        return real(*args, **kwargs)

    want = variants.composed(kernels.lora_matmul, x, W, b, A, B, dy, torch.float32)()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("second"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream("current"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(kernels, "lora_matmul", launch)  # (dX's launch is the module's own)
    got = variants.composed(launch, x, W, b, A, B, dy, torch.float32, beside=True)()
    # (S, the forward's GEMM, dS; then the fork, so that the pair waits for dS and not for dX)
    assert events == ["other"] * 3 + ["second waits for current", "dX", "on second", "dA and dB",
                                      "back from second", "current waits for second"]
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and len(got) == 3


def test_sweep_without_tqdm_or_matplotlib_writes_its_results(tmp_path, monkeypatch, capsys):
    """The sweep needs only torch: without tqdm a line per provider reports progress, and without
    matplotlib the report and the JSON are written with no plot (a GPU host with no package
    registry must not lose its figures to an import)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # (`import tqdm` now raises ImportError)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = run.main([*SMALL_RUN, "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["report.md", "results.json"]
    assert len(json.loads((folder / "results.json").read_text())["rows"]) == len(rows) > 0
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok") and any(r["status"] == "ok" for r in rows)
    err = capsys.readouterr().err
    assert "benchmark 4/4: 64→32 M=16 r=4 fused" in err and "matplotlib is not installed" in err, err


# --- the figures' arithmetic, without a GPU -----------------------------------------------------
# (what a published ratio, time or rate is computed from: each checked with made-up times or a
# stand-in clock, never against the wall clock)


def test_timer_gives_the_median_ms_of_the_timed_steps_after_a_warm_up(monkeypatch):
    """On a stand-in clock where setup takes 1 s and the n-th step n² ms: 3 steps estimate the
    cost, at least one more warms up, then at least 5 are timed, setup left out of their times;
    the figure is their median in ms, with the 20th and 80th percentiles beside it."""
    clock = {"s": 0.0}
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["s"]))
    steps = []

    def setup():
        clock["s"] += 1.0
        return len(steps)

    def step(state):
        steps.append(state)
        clock["s"] += len(steps) ** 2 / 1e3

    timer = measure.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=1)
    ms, reps = timer(setup, step)
    assert steps == list(range(9))  # (each step gets its own setup's state)
    assert reps == 5 and ms == pytest.approx(49.0)  # steps 5 to 9: 25, 36, 49, 64, 81 ms
    assert timer.spread == pytest.approx((33.8, 67.4))


def test_timer_flushes_l2_by_writing_or_with_clean_l2_by_reading_alone():
    """The timer's L2 flush writes its buffer, as do_bench does, or with clean_l2 only reads it,
    leaving no dirty line for the timed call to write back; the buffer is the same afterwards."""
    class Calls(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    timer = measure.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=1)
    timer._flush = torch.arange(1, 121, dtype=torch.int8)  # (a CUDA timer's buffer, here on the CPU)
    before = timer._flush.clone()
    seen = []
    with Calls():
        timer._flush_l2(True)
    assert seen == ["view", "sum"] and torch.equal(timer._flush, before)
    seen = []
    with Calls():
        timer._flush_l2(False)
    assert seen == ["zero_"] and not timer._flush.any()


@pytest.mark.parametrize("clean", [False, True])
def test_timer_flushes_before_every_call_as_asked(clean, monkeypatch):
    """On CUDA (stand-in events here) every call the timer makes, estimating, warming up and timed,
    comes after a flush of the kind asked for (clean_l2), and each timed one between its events."""
    order = []

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            order.append("event")

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(measure.torch.cuda, "Event", Event)
    monkeypatch.setattr(measure.torch.cuda, "synchronize", lambda: None)
    timer = measure.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=1)
    timer.cuda = True
    monkeypatch.setattr(timer, "_flush_l2", lambda kind: order.append(("flush", kind)))
    ms, reps = timer(lambda: None, lambda state: order.append("call"), **({"clean_l2": True} if clean else {}))
    timed, untimed = order[-4 * reps:], order[:-4 * reps]
    assert ms == 1.0 and timed == [("flush", clean), "event", "call", "event"] * reps
    assert untimed == [("flush", clean), "call"] * (len(untimed) // 2) and len(untimed) >= 2 * (3 + 1)


def test_mode_step_rotates_the_input_copies_and_times_the_backward_alone():
    """Each step takes the next input copy, in turn through all of them; the backward's setup runs
    the forward, so its timed step is the backward alone, and computes the layer's gradients."""
    forwards = []
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    layer = providers.Layer(lambda x: (forwards.append(x), x @ W.t())[1], {"W": W})
    xs = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    dys = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    for mode in measure.MODES:
        setup, _ = measure.mode_step(layer, mode, xs, dys)
        picked = [setup()[1][0] if mode == "backward" else setup()[0] for _ in range(6)]  # (x)
        order = [next(i for i, x in enumerate(xs) if x is p) for p in picked]
        assert sorted(order[:3]) == [0, 1, 2] and order[3:] == order[:3], (mode, order)
    setup, step = measure.mode_step(layer, "backward", xs, dys)
    forwards.clear()
    state = setup()
    assert len(forwards) == 1
    dx, dW = step(state)
    assert len(forwards) == 1  # (no forward inside the timed step)
    x, dy = next((x, dy) for x, dy in zip(xs, dys) if x is forwards[0])
    torch.testing.assert_close(dx, dy @ W.detach())
    torch.testing.assert_close(dW, dy.t() @ x.detach())


def test_make_inputs_rotates_at_least_two_copies_and_at_most_eight(monkeypatch):
    """As many (x, dY) copies as fill ROTATE_BYTES, never fewer than 2 (one copy would be timed
    from the cache) nor more than MAX_COPIES."""
    per_copy = 4 * 4 * (8 + 6)  # fp32 x (4, 8) and dY (4, 6)
    for rotate, copies in ((1, 2), (3 * per_copy, 3), (100 * per_copy, measure.MAX_COPIES)):
        monkeypatch.setattr(measure, "ROTATE_BYTES", rotate)
        xs, dys = measure.make_inputs(4, 8, 6, dtype=torch.float32, device="cpu")
        assert len(xs) == len(dys) == copies, rotate
        assert all(x.requires_grad and x.shape == (4, 8) for x in xs) and all(d.shape == (4, 6) for d in dys)


def test_rel_err_of_a_zero_reference_is_zero_only_for_zeros():
    """dA and dB are zeros when dropout drops everything: a provider that gives anything else
    there must not pass the check."""
    zeros = torch.zeros(3, 2)
    assert measure.rel_err(zeros, zeros) == 0.0
    assert measure.rel_err(torch.full((3, 2), 1e-3), zeros) == math.inf
    assert math.isnan(measure.rel_err(torch.full((3, 2), math.nan), zeros))
    assert measure.rel_err(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.75)


def test_ceilings_count_bytes_read_and_written_and_the_gemms_flops(monkeypatch):
    """The card's ceilings from their times: 1 GiB copied (read and written) and 2·8192³ FLOPs
    (the operands stood in for by small ones, the times made up)."""
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: real_randn(4, device=device,
                                                                                          dtype=dtype))
    times = [0.5, 2.0]

    def timer(setup, step):
        step(setup())
        return times.pop(0), 5

    c = measure.ceilings(torch.device("cpu"), timer)
    assert (c["copy_ms"], c["gemm_ms"]) == (0.5, 2.0)
    assert c["copy_tb_s"] == pytest.approx(2 * 2**30 / 0.5e-3 / 1e12)
    assert c["bf16_tflops"] == pytest.approx(2 * 8192**3 / 2.0e-3 / 1e12)


def test_memory_counts_what_autograd_saves_each_storage_once():
    """addmm saves x, W, A, B and S: the activations are x and S (x's reshape shares its storage),
    the total adds the parameters; no peak on CPU."""
    M, K, N, r = 24, 48, 40, 4
    w = providers.make_weights(K, N, r, dtype=torch.float32, device="cpu")
    x, dy = torch.randn(M, K, requires_grad=True), torch.randn(M, N)
    peak, saved, activations = measure.memory(providers.PROVIDERS["addmm"](w), x, dy)
    assert peak is None
    assert activations == 4 * (M * K + M * r)
    assert saved == activations + 4 * (N * K + K * r + r * N)


def test_flop_count_credits_each_provider_with_its_layers_products():
    """forward 2MKN + 2Mr(K+N); backward 2MKN (dX) [+ 2MKN for dW] + 4Mr(K+N); `base` only its
    GEMMs; forward+backward the sum."""
    M, K, N, r = 8, 48, 40, 4
    gemm, lora = 2 * M * K * N, 2 * M * r * (K + N)
    for trainable, backward_gemms in ((False, 1), (True, 2)):
        want = {(True, "forward"): gemm + lora, (True, "backward"): backward_gemms * gemm + 2 * lora,
                (False, "forward"): gemm, (False, "backward"): backward_gemms * gemm}
        for is_lora in (True, False):
            want[(is_lora, "forward+backward")] = want[(is_lora, "forward")] + want[(is_lora, "backward")]
            for mode in measure.MODES:
                got = measure.flop_count(M, K, N, r, mode, lora=is_lora, trainable_base=trainable)
                assert got == want[(is_lora, mode)], (is_lora, mode, trainable)


def test_sweep_with_a_trainable_base_checks_and_credits_dW_and_db(tmp_path):
    """--trainable-base: every provider trains W and b, is checked on dW and db too, and is
    credited with the dW GEMM; the report says the base trains, with the run's alpha."""
    pytest.importorskip("peft")
    M, K, N, r = 24, 48, 40, 4
    rows = run.main(["--device", "cpu", "--shapes", f"{K}x{N}", "--tokens", str(M), "--ranks", str(r),
                     "--trainable-base", "--alpha", "1.5", "--providers", "base,reference,addmm,peft,fused",
                     "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    for row in rows:
        assert row["status"].startswith("ok") and row["max_err"] < 1e-5, row
        want = {"out", "dX", "dW", "db"} | ({"dA", "dB"} if row["provider"] != "base" else set())
        assert set(row["errors"]) == want, row
        flops = measure.flop_count(M, K, N, r, row["mode"], lora=row["provider"] != "base", trainable_base=True)
        assert row["tflops"] == pytest.approx(flops / (row["ms"] * 1e-3) / 1e12), row
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "results.json").read_text())
    assert (meta["alpha"], meta["trainable_base"], meta["dropout"]) == (1.5, True, 0.0)
    assert "; alpha 1.5; base trainable" in (folder / "report.md").read_text()


def test_make_weights_gives_a_lora_term_of_the_base_terms_order():
    """B is not the seed's zeros: with B = 0 the LoRA term adds nothing to y, dX or dA, and a
    provider that drops or misscales it there would pass the check."""
    g = torch.Generator().manual_seed(0)
    w = providers.make_weights(256, 192, 8, dtype=torch.float32, device="cpu", generator=g)
    x = torch.randn(64, 256, generator=g)
    base, lora = torch.nn.functional.linear(x, w.W, w.b), w.alpha * (x @ w.A @ w.B)
    assert 0.25 < (lora.norm() / base.norm()).item() < 4


def test_fused_routed_threshold_routes_what_its_comment_says(monkeypatch):
    """ROUTED_BELOW sends to the PyTorch path every Llama-3-8B projection at 2048 tokens, and k and
    v at 8192, and nothing else (the third H200 run's crossover), by the layer's own rule."""
    from benchmarks import model_step
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA)
    routed = set()
    with providers._patched(vars(functional), "TORCH_BELOW", providers.ROUTED_BELOW):
        for name, source, n in model_step.PROJECTIONS:
            for M in (2048, 8192):
                if functional._host_bound(torch.empty(1).expand(M, model_step.WIDTHS[source]), n):
                    routed.add((name, M))
    assert routed == {(name, 2048) for name, _, _ in model_step.PROJECTIONS} | {("k", 8192), ("v", 8192)}


def _under_header(head, line):
    """{column: cell} of a markdown table's header and one of its lines."""
    return dict(zip(*([c.strip() for c in text.strip("|").split("|")] for text in (head, line))))


def test_report_table_puts_each_figure_under_its_column():
    """A row's cells line up with the header: ms and its percentiles in order, ×base (with fused's
    ratio from the times in turn), fused speedup, memory, error."""
    def cells(row):
        head, _, line = report.markdown_table([row]).splitlines()
        return _under_header(head, line)

    row = {**run._row(torch.device("cpu"), 48, 40, 24, 4, "peft", "forward", "ok"), "ms": 2.0, "ms_p20": 1.5,
           "ms_p80": 2.5, "tflops": 0.123, "x_base": 1.25, "fused_speedup": 1.6, "saved_mib": 0.5, "max_err": 1e-7}
    assert cells(row) == {"shape": "48→40", "tokens": "24", "rank": "4", "mode": "forward", "provider": "peft",
                          "ms": "2", "p20–p80": "1.5–2.5", "TFLOP/s": "0.123", "×base": "1.25",
                          "fused speedup": "1.60", "peak MiB": "n/a", "saved MiB": "0.50", "max err": "1.0e-07",
                          "status": "ok"}
    fused = cells({**row, "provider": "fused", "fused_speedup": None, "x_base_in_turn": 1.1, "device": "cuda",
                   "peak_mib": 3.0})
    assert (fused["×base"], fused["fused speedup"], fused["peak MiB"]) == ("1.25 (1.10)", "—", "3.0")


def test_report_says_whether_the_base_trains():
    meta = {"versions": dict.fromkeys(("python", "torch", "triton", "peft", "cuda"), "x"), "card": "CPU",
            "date": "today", "device": "cpu", "dtype": "float32", "alpha": 2.0, "timing": "t", "command": "c",
            "elapsed_note": "e"}
    for trainable, said in ((False, "; alpha 2.0; base frozen"), (True, "; alpha 2.0; base trainable")):
        assert said in report.report_markdown({**meta, "trainable_base": trainable}, [], [])


def test_plot_draws_each_providers_time_and_its_ratio_to_base(tmp_path, monkeypatch):
    """plots.png: per mode, a panel of each provider's ms and one of its ×base, per configuration
    (a configuration a provider did not run is a gap; the ratio timed in turn where a row has one,
    as targets.md reads it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made, real = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    rows = [{"K": 48, "N": 40, "tokens": M, "rank": 4, "mode": "forward", "provider": p, "ms": ms, "x_base": xb,
             "fused_speedup": fs}
            for M, p, ms, xb, fs in ((16, "base", 1.0, 1.0, 0.5), (16, "fused", 2.0, 2.0, None),
                                     (32, "base", 3.0, 1.0, 0.25), (32, "peft", 9.0, 3.0, 2.25),
                                     (32, "fused", 4.0, 4.0 / 3, None))]
    rows[-1]["x_base_in_turn"] = 1.25
    assert report.plot(rows, ["forward"], tmp_path / "plots.png", title="t")
    ((_, axes),) = made

    def lines(ax):
        return {ln.get_label(): [round(float(v), 6) for v in ln.get_ydata()] for ln in ax.get_lines()
                if not ln.get_label().startswith("_")}
    nan = float("nan")
    ms, ratio = lines(axes[0][0]), lines(axes[1][0])
    assert ms == {"base": [1.0, 3.0], "fused": [2.0, 4.0], "peft": [pytest.approx(nan, nan_ok=True), 9.0]}
    assert ratio == {"base": [1.0, 1.0], "fused": [2.0, 1.25], "peft": [pytest.approx(nan, nan_ok=True), 3.0]}


def _target_rows(x_base_in_turn):
    main = {"card": "GPU", "date": "2026-11-28", "dtype": "bfloat16", "rows": _rows({
        ("forward", "base"): 1.0, ("forward", "fused"): 1.2, ("forward+backward", "base"): 1.0,
        ("forward+backward", "fused"): 2.0, ("forward+backward", "peft"): 3.0, ("forward+backward", "addmm"): 2.4,
        ("forward+backward", "compiled"): 2.3})}
    for row in main["rows"]:
        if row["provider"] == "fused":
            row["x_base_in_turn"] = x_base_in_turn[row["mode"]]
    return main


def test_targets_bounds_are_met_at_equality_and_stated_in_the_header():
    """Each ratio exactly at its bound meets it (≤ for times over base, ≥ for speedups: 1.05,
    1.10, 1.5, 1.2, 1.15); the header states each bound and its direction."""
    main = _target_rows({"forward": 1.05, "forward+backward": 1.10})
    text = targets.table(main)
    assert "| 4096→1024 | 8192 | 16 | 1.05 ✓ | 1.10 ✓ | 1.50 ✓ ‡ | 1.20 ✓ ‡ | 1.15 ✓ ‡ |" in text.splitlines()
    assert ("forward × base ≤ 1.05, fwd+bwd × base ≤ 1.1, speedup vs peft ≥ 1.5, speedup vs addmm ≥ 1.2, "
            "speedup vs compiled ≥ 1.15.") in text
    main = _target_rows({"forward": 1.06, "forward+backward": 1.11})
    assert "| 4096→1024 | 8192 | 16 | 1.06 ✗ | 1.11 ✗ |" in targets.table(main)


def test_targets_take_fused_s_ratio_in_turn_not_fused_torch_s():
    """A run with fused-torch has its own ratio from the times in turn, in its rows after fused's:
    the targets are the fused layer's, and read fused's."""
    main = _target_rows({"forward": 1.05, "forward+backward": 1.10})
    main["rows"] += [dict(row, provider="fused-torch", ms=row["ms"] / 2, x_base_in_turn=0.5)
                     for row in main["rows"] if row["provider"] == "fused"]
    line = "| 4096→1024 | 8192 | 16 | 1.05 ✓ | 1.10 ✓ | 1.50 ✓ ‡ | 1.20 ✓ ‡ | 1.15 ✓ ‡ |"
    assert line in targets.table(main).splitlines()


@pytest.mark.parametrize("setting, value", [("alpha", 1.0), ("settings", {"LORA_KERNELS_FUSE_SHRINK": "0"}),
                                            ("versions", {"torch": "other"}), ("device", "cpu")])
def test_targets_refuse_a_dropout_run_made_otherwise(setting, value):
    """peft's speedup from a dropout run stands beside the main run's only if made alike: another
    alpha, other LORA_KERNELS_* settings, versions or device are refused by name."""
    main = {**_target_rows({"forward": 1.05, "forward+backward": 1.10}), "alpha": 2.0, "settings": {},
            "versions": {"torch": "2.13"}, "device": "cuda"}
    dropout = {**{k: v for k, v in main.items() if k != "rows"}, "dropout": 0.1,
               "rows": _rows({("forward+backward", "peft"): 3.0, ("forward+backward", "fused"): 2.5})}
    assert "| 1.20 ✗ ‡ |" in targets.table(main, dropout)  # (peft 3.0 / fused 2.5, from the dropout run)
    with pytest.raises(ValueError, match=f"{setting}: .* in the main run, .* in the dropout run"):
        targets.table(main, {**dropout, setting: value})


def test_ratios_to_base_and_fused_are_within_one_mode():
    """×base: the provider's time over base's in the same mode; fused speedup: its time over
    fused's in that mode (none on fused's own rows, nor on an untimed row)."""
    times = {("forward", "base"): 1.0, ("forward", "fused"): 1.5, ("forward", "peft"): 3.0,
             ("backward", "base"): 2.0, ("backward", "fused"): 5.0, ("backward", "peft"): 4.0,
             ("backward", "addmm"): None}
    rows = [dict(row, x_base=None, fused_speedup=None) for row in _rows(times)]
    run.add_ratios(rows)
    got = {(r["mode"], r["provider"]): (r["x_base"], r["fused_speedup"]) for r in rows}
    assert got == {("forward", "base"): (1.0, pytest.approx(1 / 1.5)), ("forward", "fused"): (1.5, None),
                   ("forward", "peft"): (3.0, 2.0), ("backward", "base"): (1.0, 0.4),
                   ("backward", "fused"): (2.5, None), ("backward", "peft"): (2.0, 0.8),
                   ("backward", "addmm"): (None, None)}


def test_times_in_turn_give_the_ratio_of_medians_and_the_drift():
    """base, fused, fused, base: fused's ×base in turn is the median of its two times over the
    median of base's two, and base's rows keep that median (base_again_ms), from which the drift
    note gives the change from base's first time."""
    w = providers.make_weights(48, 40, 4, dtype=torch.float32, device="cpu")
    xs, dys = measure.make_inputs(8, 48, 40, dtype=torch.float32, device="cpu")
    times = [1.0, 3.0, 5.0, 2.0]
    rows = [dict(row, base_again_ms=None, x_base_in_turn=None)
            for row in _rows({("forward", "base"): 1.2, ("forward", "fused"): 3.6})]
    run.time_in_turn(rows, w, xs, dys, lambda setup, step: (times.pop(0), 5), run.parse_args(["--modes", "forward"]))
    by = {r["provider"]: r for r in rows}
    assert by["base"]["base_again_ms"] == 1.5 and by["fused"]["x_base_in_turn"] == pytest.approx(4.0 / 1.5)
    note = run.drift_note(rows + [dict(by["base"], ms=2.0)])
    assert note.startswith("base timed again at the end of each configuration, in turn with fused: -25.0% to +25.0% ")


def test_every_provider_is_timed_in_turn_in_forward_backward_alone(monkeypatch):
    """In forward+backward, whose speedups the targets read, each other provider that timed is
    timed in turn too, after fused and fused-torch, in --providers order (base, fused, fused-torch,
    peft, addmm, reference, then back), and its rows get its ×base and fused's speedup over it from
    those medians; in forward, base, fused and fused-torch alone. A provider with no time (skipped)
    is left out, and one that fails in turn is dropped without costing the others theirs."""
    w = providers.make_weights(48, 40, 4, dtype=torch.float32, device="cpu")
    xs, dys = measure.make_inputs(8, 48, 40, dtype=torch.float32, device="cpu")
    names = ("base", "fused", "fused-torch", "peft", "addmm", "reference", "compiled")
    made, order = {}, []
    for name in names:
        def factory(*args, name=name, real=run.PROVIDERS["base"], **kwargs):
            layer = real(*args, **kwargs)  # (any layer: the timer below is a stand-in)
            layer = layer._replace(fn=lambda *a, fn=layer.fn: fn(*a))
            made[layer.fn] = name
            return layer
        monkeypatch.setitem(run.PROVIDERS, name, factory)
    real_step = run.mode_step
    monkeypatch.setattr(run, "mode_step", lambda layer, mode, *a: (order.append((mode, made[layer.fn])),
                                                                     real_step(layer, mode, *a))[1])
    times = {"base": [1.0, 3.0], "fused": [3.0, 5.0], "fused-torch": [4.0, 4.0], "peft": [6.0, 10.0],
             "addmm": [5.0, 5.0]}
    timed = []

    def timer(setup, step):
        mode, name = order[-1]
        timed.append((mode, name))
        if name == "reference":
            raise RuntimeError("out of memory")
        return times[name][sum(1 for t in timed if t == (mode, name)) - 1], 5
    rows = [dict(row, base_again_ms=None, x_base_in_turn=None, fused_speedup_in_turn=None) for row in _rows(
        {(mode, p): None if (mode, p) == ("forward+backward", "compiled") else 1.0
         for mode in ("forward", "forward+backward") for p in names})]
    run.time_in_turn(rows, w, xs, dys, timer, run.parse_args(
        ["--modes", "forward,forward+backward", "--providers", "base,compiled,peft,addmm,reference,fused,fused-torch"]))
    assert [name for mode, name in timed if mode == "forward"] == [
        "base", "fused", "fused-torch", "fused-torch", "fused", "base"]
    assert [name for mode, name in timed if mode == "forward+backward"] == [
        "base", "fused", "fused-torch", "peft", "addmm", "reference", "addmm", "peft", "fused-torch", "fused", "base"]
    got = {(r["mode"], r["provider"]): (r["x_base_in_turn"], r["fused_speedup_in_turn"]) for r in rows}
    assert got == {("forward", "base"): (None, None), ("forward", "fused"): (2.0, None),
                   ("forward", "fused-torch"): (2.0, 1.0), **{("forward", p): (None, None) for p in names[3:]},
                   ("forward+backward", "base"): (None, None), ("forward+backward", "fused"): (2.0, None),
                   ("forward+backward", "fused-torch"): (2.0, 1.0), ("forward+backward", "peft"): (4.0, 2.0),
                   ("forward+backward", "addmm"): (2.5, 1.25), ("forward+backward", "reference"): (None, None),
                   ("forward+backward", "compiled"): (None, None)}
    cells = report.table_cells({**next(r for r in rows if (r["mode"], r["provider"]) == ("forward+backward", "peft")),
                                "ms": 1.0, "ms_p20": None, "tflops": None, "x_base": 1.5, "fused_speedup": 1.75,
                                "peak_mib": None, "saved_mib": None, "max_err": None, "device": "cuda",
                                "status": "ok"})
    assert cells[report.COLUMNS.index("×base")] == "1.50 (4.00)"
    assert cells[report.COLUMNS.index("fused speedup")] == "1.75 (2.00)"


def test_default_gpu_sweep_is_the_llama_projections_at_the_targets_anchor():
    """The default GPU sweep: Llama-3-8B's four projection shapes (as model_step's seven layers,
    read off transformers' own Llama layer), 2048 and 8192 tokens at rank 16 and rank 64 at 8192
    tokens, 12 configurations."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from benchmarks import model_step
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    modules = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
               "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj,
               "down": layer.mlp.down_proj}
    shapes = {name: (model_step.WIDTHS[source], n) for name, source, n in model_step.PROJECTIONS}
    assert shapes == {name: (m.in_features, m.out_features) for name, m in modules.items()}
    assert sorted(run.GPU_SHAPES) == sorted(set(shapes.values()))
    configs, _ = run.plan(run.GPU_SHAPES, run.GPU_TOKENS, run.GPU_RANKS, False)
    assert len(configs) == 12
    assert {(M, r) for _, _, M, r in configs} == {(2048, 16), (8192, 16), (8192, 64)}


def test_time_spent_counts_each_providers_check_once_per_configuration():
    rows = [{"mode": mode, "provider": p, "check_s": s} for p, s in (("base", 0.5), ("fused", 2.0))
            for mode in measure.MODES]
    first_calls, note = run.time_spent(rows, 10.0, types.SimpleNamespace(spent_s=4.0))
    assert first_calls == {"base": 0.5, "fused": 2.0}
    assert note.startswith("elapsed 10.0 s: 4.0 s timing; checks (the first calls, so compilation and "
                           "autotuning) base 0.5 s, fused 2.0 s;")


def test_model_step_report_puts_each_figure_under_its_column(tmp_path):
    """model-step.md: ms, ×base and fused speedup each under its own column."""
    from benchmarks import model_step
    rows = [{"tokens": 48, "provider": "peft", "ms": 2.0, "x_base": 1.25, "fused_speedup": 1.6, "max_err": 1e-7,
             "status": "ok"}]
    args = types.SimpleNamespace(device="cpu", dtype="fp32", rank=16, dropout=0.0)
    path = model_step.write(rows, args, str(tmp_path), time.perf_counter())
    lines = open(path).read().splitlines()
    (head,) = [ln for ln in lines if ln.startswith("| tokens |")]
    assert _under_header(head, lines[lines.index(head) + 2]) == {
        "tokens": "48", "provider": "peft", "ms": "2.000", "×base": "1.250", "fused speedup": "1.60",
        "max err": "1.0e-07", "status": "ok"}


# Stands in for python3 in scripts/gpu_check.sh: logs each call (with the switches the script sets
# for some steps) and succeeds at once, having written a compiles report where one is asked for,
# printed $PRECOMPILE_SAYS where it stands for perf's first precompile (the one with --variants),
# and $PYTEST_SAYS (by default the direct launch test passed, as pytest -v says it) for a pytest
# call; a call that contains $FAILS fails.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "AUTOTUNE=${LORA_KERNELS_AUTOTUNE:-} INTERPRET=${TRITON_INTERPRET:-} $*${LORA_KERNELS_FUSE_SHRINK:+ [FUSE_SHRINK=$LORA_KERNELS_FUSE_SHRINK]}${LORA_KERNELS_FAST_LAUNCH:+ [FAST_LAUNCH=$LORA_KERNELS_FAST_LAUNCH]}" >> "$CALLS"
[[ " $* " =~ " --report-compiles "([^ ]+) ]] && echo "$* found, 1 compiled" > "${BASH_REMATCH[1]}"
[[ " $* " == *" -m benchmarks.precompile --variants "* ]] && echo "${PRECOMPILE_SAYS:-}"
[[ " $* " == *" -m pytest "* ]] && echo -e "${PYTEST_SAYS-tests/test_gpu.py::test_direct_launches_match_tritons_path PASSED [ 3%]}"
[[ -n "${FAILS:-}" && " $* " == *"$FAILS"* ]] && exit 1
exit 0
"""


def _gpu_check_calls(tmp_path, mode, **settings):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake, calls = tmp_path / "python3", tmp_path / f"calls-{mode}"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    pack = tmp_path / "pack.tar.xz"
    pack.write_bytes(b"")  # (only its presence counts: the stand-in python reads nothing)
    # As on the GPU machine, where the script starts: no interpreter, and not the tests' own
    # LORA_KERNELS_AUTOTUNE=0 (its tests shards set it, and these tests run in one there), nor the
    # outer run's time settings (a tests call's GPU_CHECK_SECONDS under about 280 s would make the
    # inner run skip steps by time, which these tests do not expect).
    outer = ("TRITON_INTERPRET", "LORA_KERNELS_AUTOTUNE", "GPU_CHECK_SECONDS", "TESTS_SECONDS", "GPU_CHECK_SMOKE")
    env = {**{k: v for k, v in os.environ.items() if k not in outer},
           "PYTHON": str(fake), "CALLS": str(calls), "OUT": str(tmp_path / f"out-{mode}"), "GPU_CHECK_CACHE": str(pack),
           "TMPDIR": str(tmp_path), **settings}  # (the script's work folders: pytest's to remove, not /tmp's)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", mode], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # (each run's reports go to a folder of its own)
    return [re.sub(r"--report \S+", "--report R", line) for line in calls.read_text().splitlines()
            if " -m " in line], str(pack)


def test_gpu_check_cache_mode_compiles_what_the_gpu_run_precompiles(tmp_path):
    """`gpu_check.sh cache` (no GPU) compiles every kernel that the perf and tests modes precompile,
    with the same switches, and the test shards' kernels: it records the launches of the shards'
    files (but test_autotune_configs', which its own precompile covers) under the interpreter and
    compiles them with the fixed config the shards run with. Then it packs them;
    those modes unpack the pack first. Not the first-step timing, whose point is an empty cache."""
    cache, pack = _gpu_check_calls(tmp_path, "cache")
    gpu = {mode: _gpu_check_calls(tmp_path, mode)[0] for mode in ("perf", "tests")}
    for calls in gpu.values():
        assert calls[0] == f"AUTOTUNE= INTERPRET= -m benchmarks.precompile --load-cache {pack}", calls[:3]
    wanted = {c for calls in gpu.values() for c in calls if " -m benchmarks.precompile " in c
              and "--first-step" not in c and "--load-cache" not in c}
    *precompiles, record, shards_kernels, save = cache
    assert len(wanted) >= 4 and set(precompiles) == wanted and len(precompiles) == len(wanted), (cache, wanted)
    assert save == f"AUTOTUNE= INTERPRET= -m benchmarks.precompile --save-cache {pack}"
    launches = re.fullmatch(r"AUTOTUNE= INTERPRET=1 -m pytest (.*) -q -p no:cacheprovider "
                            r"--record-launches (\S+)", record)
    assert launches and shards_kernels == ("AUTOTUNE=0 INTERPRET= -m benchmarks.precompile "
                                           f"--launches-from {launches[2]}"), (record, shards_kernels)
    shards = [c for c in gpu["tests"] if " -m pytest " in c and "test_autotune_configs" not in c]
    assert all(c.startswith("AUTOTUNE=0 INTERPRET= ") for c in shards), shards
    files = {f for c in shards for f in c.split() if f.startswith("tests/")}
    assert set(launches[1].split()) == files and len(files) > 8, (launches[1], files)


def test_gpu_check_perf_times_fp32_adapters_with_the_autotuner(tmp_path):
    """perf mode's fp32-adapter run autotunes, as users run the layer (the fifth H200 run timed the
    fixed test tile there instead), after a precompile of the same launches."""
    calls, _ = _gpu_check_calls(tmp_path, "perf")
    runs = [i for i, c in enumerate(calls) if " -m benchmarks.run " in c and "--adapter-dtype fp32" in c]
    assert len(runs) == 1 and calls[runs[0]].startswith("AUTOTUNE= INTERPRET= "), calls
    before = calls[runs[0] - 1]
    assert before.startswith("AUTOTUNE= INTERPRET= -m benchmarks.precompile ") and before.endswith(
        "--shapes 4096x4096,4096x14336 --tokens 8192 --ranks 16 --adapter-dtype fp32"), before
    assert "--shapes 4096x4096,4096x14336 --tokens 8192 --ranks 16 --adapter-dtype fp32" in calls[runs[0]]


def test_gpu_check_perf_times_the_shrink_ahead_beside_the_base(tmp_path):
    """perf mode times version 25's shrink ahead (LORA_KERNELS_FUSE_SHRINK=ahead, off by default)
    against the base in a run of its own, right after variants, at the default shapes, 8192 tokens,
    rank 16, forward and forward+backward; and with LoRA dropout 0.1 beside peft, after the model
    step, its kernels precompiled first with the switch (where the pack does not hold them); no
    other call sees the switch."""
    calls, _ = _gpu_check_calls(tmp_path, "perf")
    runs = [i for i, c in enumerate(calls) if " -m benchmarks.run " in c and "--name shrink-ahead" in c]
    assert len(runs) == 2 and " -m benchmarks.variants " in calls[runs[0] - 1], calls
    assert calls[runs[0]].endswith("--name shrink-ahead --providers base,fused --tokens 8192 --ranks 16 "
                                   "--modes forward,forward+backward [FUSE_SHRINK=ahead]"), calls[runs[0]]
    assert " -m benchmarks.model_step " in calls[runs[1] - 2], calls
    assert calls[runs[1] - 1].endswith(" -m benchmarks.precompile --dropout 0.1 --tokens 8192 --ranks 16 "
                                       "[FUSE_SHRINK=ahead]"), calls[runs[1] - 1]
    assert calls[runs[1]].endswith("--name shrink-ahead-dropout --providers base,peft,fused --dropout 0.1 "
                                   "--tokens 8192 --ranks 16 --modes forward+backward [FUSE_SHRINK=ahead]"), calls[runs[1]]
    assert sum("[FUSE_SHRINK=" in c for c in calls) == 3, calls


def test_gpu_check_summary_names_each_shrink_ahead_run(tmp_path):
    """The summary's shrink-ahead sections: one per run that wrote a report, the dropout run's
    named so, each with that report's table rows."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(root, "scripts", "gpu_check.sh")).read()
    loop = script[script.index('  for f in "$W"/*-shrink-ahead/report.md'):]
    loop = loop[:loop.index("  done\n") + len("  done\n")]
    for name, row in (("gpu-2026-11-30-shrink-ahead", "| a |"), ("gpu-2026-11-30-shrink-ahead-dropout", "| b |")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.md").write_text(f"# title\n{row}\nnot a row\n")
    out = subprocess.run(["bash", "-c", loop], env={**os.environ, "W": str(tmp_path)}, capture_output=True,
                         text=True, timeout=30).stdout
    assert out == ("\n### shrink ahead (LORA_KERNELS_FUSE_SHRINK=ahead)\n| a |\n"
                   "\n### shrink ahead (LORA_KERNELS_FUSE_SHRINK=ahead), LoRA dropout 0.1\n| b |\n"), out


def _precompile_says(found):
    # perf's first precompile's closing line, all 676 kernels compiled, `found` of them in the cache
    return (f"compiled 676 of 676 in 14.4 s (5.8 s of compiler time, 0.01 s each); 0 failed; 0 spill registers; "
            f"{found} found in Triton's cache")


@pytest.mark.parametrize("found", [676, 675])
def test_gpu_check_perf_skips_the_precompiles_a_carried_pack_holds(tmp_path, found):
    """Where perf's first precompile compiled all its kernels and found every one in Triton's
    cache (the carried pack's), the pack holds the other precompiles' kernels too (dropout's, the
    fp32 adapters' and the shrink ahead's with dropout: cache mode compiles them all into one
    cache): those steps, each about 25 s of start-up on the GPU's host, are skipped, and steps.md
    says so. Where it found fewer, they run."""
    calls, _ = _gpu_check_calls(tmp_path, "perf", PRECOMPILE_SAYS=_precompile_says(found))
    precompiles = [c for c in calls if " -m benchmarks.precompile " in c and "--load-cache" not in c
                   and "--first-step" not in c]
    steps = (tmp_path / "out-perf" / "summary.md").read_text()
    if found == 676:
        assert len(precompiles) == 1 and " --variants " in precompiles[0], precompiles
        assert "- precompile-dropout: skipped" in steps and "- precompile-fp32-adapters: skipped" in steps, steps
        assert "- precompile-shrink-ahead-dropout: skipped" in steps, steps
    else:
        assert len(precompiles) == 4 and "skipped, the carried pack" not in steps, (precompiles, steps)
    assert sum(" -m benchmarks.run " in c for c in calls) == 5, calls  # (the runs themselves, either way)


@pytest.mark.parametrize("found", [676, 675])
def test_gpu_check_perf_starts_the_fp32_adapter_run_with_what_it_needs(tmp_path, found):
    """With about 55 s left after the steps before it: the fp32-adapter run (45 s) starts where the
    carried pack holds its kernels, and is skipped, with the reason, where its precompile (20 s
    more) would have to run first."""
    calls, _ = _gpu_check_calls(tmp_path, "perf", PRECOMPILE_SAYS=_precompile_says(found), GPU_CHECK_SECONDS="95")  # (deadline: 55 s)
    ran = [c for c in calls if " -m benchmarks.run " in c and "--adapter-dtype fp32" in c]
    steps = (tmp_path / "out-perf" / "summary.md").read_text()
    assert "- first-step: skipped, under 70 s left" in steps, steps  # (the time left as intended)
    if found == 676:
        assert len(ran) == 1 and "bench-fp32-adapters: skipped" not in steps, (calls, steps)
    else:
        assert not ran and "- bench-fp32-adapters: skipped, under 65 s left" in steps, (calls, steps)


def test_gpu_check_tests_mode_runs_perfs_later_steps_after_its_shards(tmp_path):
    """A tests call, after every shard, runs in what is left the perf steps that perf's own call cuts
    or skips for time (the fp32-adapter run, the model step, the shrink ahead with dropout), as perf
    runs them but for their precompiles (the runs' untimed first calls compile what a pack lacks)."""
    calls, _ = _gpu_check_calls(tmp_path, "tests")
    perf, _ = _gpu_check_calls(tmp_path, "perf")
    last_shard = max(i for i, c in enumerate(calls) if " -m pytest " in c)
    later = [c for c in calls[last_shard + 1:] if " -m benchmarks." in c]
    wanted = [c for c in perf if " -m benchmarks.model_step " in c or " -m benchmarks.run " in c
              and ("--name fp32-adapters " in c or "--name shrink-ahead-dropout " in c)]
    unfold = lambda cs: [re.sub(r"--out \S+", "--out W", c) for c in cs]  # (each call's work folder its own)
    assert len(wanted) == 3 and unfold(later) == unfold(wanted), (later, wanted)
    assert not any(" -m benchmarks.run " in c or " -m benchmarks.model_step " in c for c in calls[:last_shard]), calls
    steps = (tmp_path / "out-tests" / "summary.md").read_text()
    for name in ("fp32-adapters", "shrink-ahead-dropout"):
        assert f"- precompile-{name}: skipped, a tests call" in steps, steps
    assert "FAST_LAUNCH" not in steps, steps


def test_gpu_check_skips_the_model_step_by_its_guard_not_as_a_failure(tmp_path):
    """With about 28 s left for later, the model step is skipped by its own guard (30 s), said in
    steps.md, and perf's call still exits 0 (a step that `step` skips for time sets its status)."""
    calls, _ = _gpu_check_calls(tmp_path, "perf", PRECOMPILE_SAYS=_precompile_says(676), GPU_CHECK_SECONDS="68")  # (deadline: 28 s)
    steps = (tmp_path / "out-perf" / "summary.md").read_text()
    assert "- model-step: skipped, under 30 s left" in steps and "gpu_check exit status: 0" in steps, steps
    assert not any(" -m benchmarks.model_step " in c for c in calls), calls


_DIRECT = "tests/test_gpu.py::test_direct_launches_match_tritons_path"


@pytest.mark.parametrize("shards_say, direct", [
    (f"{_DIRECT} PASSED [ 3%]\\ntests/test_launch.py::test_x[1] PASSED [ 4%]", True),
    (f"{_DIRECT} FAILED [ 3%]", False),
    ("tests/test_training.py::test_y PASSED [ 3%]", False),  # (not run: stopped before it, say)
    (f"{_DIRECT} PASSED [ 3%]\\ntests/test_launch.py::test_x[1] FAILED [ 4%]", False),
    (f"{_DIRECT} PASSED [ 3%]\\ntests/test_launch.py::test_x[1] ERROR [ 4%]", False),
    (f"{_DIRECT} PASSED [ 3%]\\ntests/test_launch.py::test_switches_are_read_from_the_environment_at_import[a] "
     "FAILED [ 4%]", True),  # (one the smoke step leaves out)
], ids=["passed", "direct-failed", "direct-not-run", "launch-failed", "launch-error", "left-out-failed"])
def test_gpu_check_tests_mode_runs_later_as_perfs_smoke_step_would_have(tmp_path, shards_say, direct):
    """A tests call runs no smoke step: later's figures take the direct launch path only where the
    smoke step's own tests passed in the shards (test_gpu.py's direct launch test and test_launch.py
    but the ones the smoke step leaves out); else LORA_KERNELS_FAST_LAUNCH=0, said in steps.md. And
    later's own failures leave the call's status to its tests (a model step that fails: exit 0)."""
    calls, _ = _gpu_check_calls(tmp_path, "tests", PYTEST_SAYS=shards_say, FAILS=" -m benchmarks.model_step ")
    last_shard = max(i for i, c in enumerate(calls) if " -m pytest " in c)
    later = [c for c in calls[last_shard + 1:] if " -m benchmarks." in c]
    steps = (tmp_path / "out-tests" / "summary.md").read_text()
    assert len(later) == 3 and all(c.endswith("[FAST_LAUNCH=0]") != direct for c in later), later
    assert ("- later: ran with LORA_KERNELS_FAST_LAUNCH=0" in steps) != direct, steps
    assert "- model-step: exit 1" in steps and "gpu_check exit status: 0" in steps, steps


def test_gpu_check_tests_mode_reports_what_each_shard_compiled(tmp_path):
    """Each of the ten shards of `gpu_check.sh tests` (test_benchmark_tools.py in one of its own, as
    test_example.py with test_distributed.py) reports its slowest tests and the kernels it
    compiled, where a carried pack lacked them (pytest --report-compiles, into its own folder), and
    the summary gives each shard's totals under its closing line."""
    calls, _ = _gpu_check_calls(tmp_path, "tests")
    shards = [c for c in calls if " -m pytest " in c]
    reports = [re.search(r" --report-compiles (\S+/tests-(\d+)/compiles\.md)( |$)", c) for c in shards]
    assert len(shards) == 10 and all(reports) and len({r[2] for r in reports}) == 10, shards
    assert all(" --durations=15 " in c for c in shards), shards
    assert any(c.split(" -v ")[0].endswith(" -m pytest tests/test_benchmark_tools.py") for c in shards), shards
    assert any(c.split(" -v ")[0].endswith(" -m pytest tests/test_example.py tests/test_distributed.py")
               for c in shards), shards
    summary = (tmp_path / "out-tests" / "summary.md").read_text()
    for call, report in zip(shards, reports):
        shard_line = f"- tests-{report[2]}: "
        following = summary.rsplit(shard_line, 1)[1].split("\n")[1]  # (its closing line, after its step line)
        assert following == f"  -m {call.split(' -m ', 1)[1]} found, 1 compiled", (following, summary)


def test_host_overhead_times_the_shrink_aheads_flags_and_its_dropout_step(monkeypatch, capsys):
    """The flags' rows make one memset each and no launch, the launching rows their launches; the
    dropout step with the shrink ahead runs with FUSE_SHRINK set for its whole timing (and only
    it), three launches and a memset in each pass where the default makes four at 64×64."""
    not_when_recording()
    from benchmarks import host_overhead
    launches, zeros, made = [], [], []

    class Counting(host_overhead._NoLaunch):
        def __getitem__(self, grid):
            launches.append(grid)
            return super().__getitem__(grid)

    real_flags = kernels._ready_flags
    monkeypatch.setattr(kernels, "_ready_flags", lambda n, device: (zeros.append(n), real_flags(n, device))[1])

    def timer(fn, n=0, rounds=0, sync=None):
        launches.clear(), zeros.clear()
        fn()
        made.append((functional.FUSE_SHRINK, len(launches), len(zeros)))
        return 1.0

    monkeypatch.setattr(host_overhead, "_NoLaunch", Counting)
    monkeypatch.setattr(host_overhead, "_median_us", timer)
    host_overhead.main([])
    rows = [line.split("µs  ", 1)[1] for line in capsys.readouterr().out.splitlines() if "µs  " in line]
    assert len(rows) == len(made)
    made = dict(zip(rows, made))
    dropout = host_overhead.DROPOUT_STEP
    ahead = f"{dropout}, the shrink ahead (three launches: four by default here, five at 4096→4096)"
    assert made["lora_linear forward+backward, eager (autograd.Function)"] == ("auto", 3, 0)
    assert made[dropout] == ("auto", 4, 0) and made[ahead] == ("ahead", 3, 2)
    assert made["the same, the shrink ahead's flags (torch.zeros) in its forward"] == ("auto", 0, 1)
    assert made["the same, those flags in its backward"] == ("auto", 0, 1)
    assert made["the same, the launch in its backward (on CUDA on the engine's thread)"] == ("auto", 1, 0)
    assert made["the same, two launches in its backward"] == ("auto", 2, 0)
    assert [row for row, (setting, *_) in made.items() if setting != "auto"] == [ahead]
    assert functional.FUSE_SHRINK == "auto"  # (put back)


def test_the_report_lists_the_autotuners_picks(tmp_path, monkeypatch):
    """report.md and results.json list the tile the autotuner picked for each launch it tuned, named
    from Triton's own tuning key (the kernel's key arguments, then its tensors' dtypes), to be read
    beside the compile report's spills. Triton's Autotuner.run tunes here between two candidates
    under the interpreter, with a stand-in timing that makes the two-stage one the faster."""
    use_triton(monkeypatch)  # (the kernels, under the interpreter, their outputs poisoned first)
    fast, slow = (kernels._config(32, 32, 32, 4, stages, tma=True, group=4) for stages in (2, 3))
    tuner = tuned_between(monkeypatch, [slow, fast], lambda config: 1.0 if config.num_stages == 2 else 2.0)
    run.main(["--device", "cpu", "--shapes", "32x48", "--tokens", "16", "--ranks", "4", "--providers", "base,fused",
              "--dropout", "0.1", "--modes", "forward+backward", "--warmup-ms", "1", "--rep-ms", "2",
              "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    picks = json.loads((folder / "results.json").read_text())["autotune_picks"]
    assert len(picks) == len(tuner.cache) >= 3, picks
    assert all(" w4 s2" in p["tile"] and p["dtypes"] == "float32" for p in picks), picks  # (the faster, fitted)
    found = {(p["launch"], p["dropout"], p["M"], p["N"], p["K"]) for p in picks}
    # (x: 16 tokens of 32 features; the output's 48 features round up to 64 in the key)
    assert ("product", "on x", 16, 4, 32) in found, found  # the forward's shrink, x masked
    assert ("GEMM + low rank (Wᵀ view)", "no", 16, 64, 32) in found, found  # y = x Wᵀ + (L B) + b
    assert any(dropout == "on x A" for _, dropout, *_ in found), found  # dX's masked low-rank term
    text = (folder / "report.md").read_text()
    assert "## The autotuner's picks" in text
    assert "| launch | M | N | K | rank block | dropout | dtypes | tile |\n|---|---:|---:|---:|---:|---|---|---|\n" in text
    assert "| GEMM + low rank (Wᵀ view) | 16 | 64 | 32 | 16 | no | float32 | 16x32x32 w4 s2 tma |" in text, text
