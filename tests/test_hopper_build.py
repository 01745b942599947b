"""The kernels compile for Hopper (sm_90), for older NVIDIA GPUs and for datacenter Blackwell
(sm_100), checked without a GPU; each compiled kernel writes its output (one compiled to a lone
trap fails ``benchmarks.precompile``).

Triton's interpreter, which runs the kernels in CI, skips the GPU compiler, and so misses what
only the compiler rejects (once: a module-level constant the kernel read, which the interpreter
accepted and the compiler refused, so the kernel could not have run on any GPU). Here
``benchmarks.precompile`` records every launch of a forward and backward (each dtype, TF32,
dropout, a trainable base, both shrink placements, ranks above and below the fused-shrink limit)
and compiles each for sm_90 with the ptxas Triton ships: every launch with the GPU suite's fixed
tile config, and every autotune config for bf16 launches.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

pytest.importorskip("triton")
from benchmarks.precompile import recording_launches, save_launches  # noqa: E402
from conftest import make_inputs  # noqa: E402
from lora_kernels import functional, kernels  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def precompile(cache, *options, **env):
    """Run benchmarks.precompile (compiled, not interpreted) with Triton's cache in ``cache``;
    returns what it printed."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")},
           "TRITON_CACHE_DIR": str(cache), "PYTHONPATH": ROOT, **env}
    done = subprocess.run([sys.executable, "-m", "benchmarks.precompile", *options], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Every launch states its compile options (kernels.COMPILE_OPTIONS): Triton 3.9 warns where one
    # is left to its default, which 3.10 changes.
    assert "TRITON_DEFAULT_FP_FUSION is unset" not in done.stderr, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    """Triton's cache for this file's compiles: new for each run, so every kernel goes through the
    compiler in it, and shared by its tests, so a kernel two of them compile (the Blackwell pair's
    forward, dA, dB and dW) is compiled once. A kernel's cache key holds its target and every
    constexpr: a hit is the same kernel for the same GPU, and its row reads the same binary."""
    return tmp_path_factory.mktemp("triton-cache")


def compile_for_hopper(tmp_path, triton_cache, autotune, *options, arch=90, shapes="256x512,512x256", **env):
    """Run benchmarks.precompile for sm_90 (or ``arch``) and return its table's rows (one per
    compiled config)."""
    report = tmp_path / f"report-{autotune}.md"
    precompile(triton_cache, "--arch", str(arch), "--jobs", str(min(4, os.cpu_count() or 1)),
               "--shapes", shapes, "--tokens", "128", *options, "--report", str(report),
               LORA_KERNELS_AUTOTUNE=autotune, **env)
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in report.read_text().splitlines() if line.startswith("| ") and not line.startswith("| use")]


def test_autotuned_configs_compile_for_hopper(tmp_path, triton_cache):
    """Every tile config the autotuner may pick, square or not, with and without TMA (once only
    square tiles compiled: a helper's two return statements had different types otherwise), and the
    deep ones for thin outputs, the persistent ones with their TMA store of the output tile (its
    staged tile beside the pipeline's) or, in the paired launch, without, without spills, in the
    shared memory Hopper has."""
    rows = compile_for_hopper(tmp_path, triton_cache, "1", "--ranks", "16", "--dtypes", "bf16")
    tiles = {row[3] for row in rows}
    assert len(rows) >= 60 and any(" tma" in t for t in tiles) and any(" tma" not in t for t in tiles)
    assert any(t.endswith(" persistent tma-store") for t in tiles) and any(t.endswith(" persistent") for t in tiles)
    assert any(t.split()[0].split("x")[0] != t.split()[0].split("x")[1] for t in tiles)  # non-square tiles
    assert any(f"x{kernels.DEEP_K} " in t for t in tiles)  # the thin outputs' deep tiles
    for use, sizes, dot, tile, seconds, regs, spilled, smem, wgmma, tma in rows:
        assert regs.isdigit() and int(spilled) == 0 and 0 < float(smem) <= 227, (use, sizes, tile, smem)


def test_every_launch_compiles_for_hopper(tmp_path, triton_cache):
    # The GPU suite's fixed tile config, for every kind of launch.
    rows = compile_for_hopper(tmp_path, triton_cache, "0", "--ranks", "16,100", "--dtypes", "fp64,fp32,fp16,bf16",
                              "--tf32", "--dropout", "0.1", "--trainable-base", "--variants")
    assert len(rows) >= 60, f"too few launches recorded: {len(rows)}"
    seen, views, tma_rows = set(), set(), 0
    for use, sizes, dot, tile, seconds, regs, spilled, smem, wgmma, tma in rows:
        assert regs.isdigit(), "no register count: is cuobjdump missing from Triton's package?"
        assert float(seconds) > 0 and int(regs) > 0 and 0 < float(smem) <= 227, (use, sizes, dot, tile)
        seen.add((re.sub(r" \(.*\)", "", use.split(",")[0]), dot))
        views.update(re.findall(r"[XW]ᵀ", use))
        # Tiles the launcher cleared for TMA load through the copy engine; the others never do.
        assert (tma == "yes") == (" tma" in tile), (use, sizes, dot, tile)
        tma_rows += (" tma" in tile)
        block_m = int(re.match(r"(\d+)x", tile).group(1))
        if dot in ("bf16", "fp16", "fp32 tf32") and block_m >= 64:
            # Tensor cores the Hopper way (warpgroup MMA), not the older mma.sync or plain FMAs.
            assert wgmma == "yes", (use, sizes, dot, tile)
        if dot in ("fp32", "fp64"):
            assert wgmma == "no", (use, sizes, dot, tile)  # IEEE asked for: no TF32 tensor cores
    uses = {"product", "GEMM + low rank", "GEMM + fused shrink", "two products"}  # (the last: dA with dB)
    dots = {"fp64", "fp32", "fp32 tf32", "fp16", "bf16"}
    assert seen == {(u, d) for u in uses for d in dots}, seen
    assert views == {"Xᵀ", "Wᵀ"}  # transposed operands (xᵀ in dA, Wᵀ in the forward) compiled too
    # TMA and pointer loads both occur: the ranks of 100 (200-byte rows in fp16) rule TMA out.
    assert 0 < tma_rows < len(rows)


def test_a_packed_cache_is_found_where_it_is_unpacked(tmp_path):
    """``scripts/gpu_check.sh cache``: kernels compiled here, packed (``--save-cache``) and unpacked
    into another cache directory (``--load-cache``, as on the GPU machine), are found there, not
    compiled again: their group files, which name the entry's files by absolute path, are pointed
    at the new place. The same layer call's launches recorded in a run under the interpreter (the
    test shards', ``pytest --record-launches``) find them too. A pack whose fingerprint is not the
    machine's is not unpacked."""
    args = ("--shapes", "64x48", "--tokens", "128", "--ranks", "16", "--dtypes", "fp16", "--jobs", "2")
    fixed = {"LORA_KERNELS_AUTOTUNE": "0"}
    out = precompile(tmp_path / "here", *args, **fixed)
    compiled = int(re.search(r"compiled (\d+) of \1 ", out).group(1))
    assert compiled >= 3 and "; 0 found in Triton's cache" in out, out
    pack = tmp_path / "pack.tar.xz"
    precompile(tmp_path / "here", "--save-cache", str(pack))
    with tarfile.open(pack) as tar:
        names = tar.getnames()
    assert sum(n.endswith(".cubin") for n in names) == compiled and not any(n.endswith(".llir") for n in names)
    shutil.rmtree(tmp_path / "here")  # (as on another machine: the paths Triton wrote into the pack are gone)
    assert "unpacked" in precompile(tmp_path / "there", "--load-cache", str(pack))
    out = precompile(tmp_path / "there", *args, **fixed)
    assert f"; {compiled} found in Triton's cache" in out, out
    with recording_launches() as launches:  # (backend auto: here the PyTorch path, on the GPU the kernels)
        x, W, b, A, B = make_inputs((128,), 64, 48, 16, torch.float16)
        y = functional.lora_linear(x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_(), 2.0)
        y.backward(torch.randn_like(y))  # (not .sum()'s: its gradient, expanded, has strides of 0)
    save_launches(tmp_path / "launches.pkl", launches)
    out = precompile(tmp_path / "there", "--launches-from", str(tmp_path / "launches.pkl"), **fixed)
    assert f" {compiled} (launch, config) compiles" in out and f"; {compiled} found in Triton's cache" in out, out

    other = tmp_path / "other.tar.xz"  # the same kernels, said to be from another Triton build
    with tarfile.open(pack) as tar, tarfile.open(other, "w:xz") as out_tar:
        for member in tar.getmembers():
            data = tar.extractfile(member) if member.isfile() else None
            if member.name == "FINGERPRINT":
                label = re.sub(rb"triton=\w+", b"triton=000000000000", data.read())
                member.size, data = len(label), io.BytesIO(label)
            out_tar.addfile(member, data)
    refused = precompile(tmp_path / "elsewhere", "--load-cache", str(other))
    assert "NOT used, another triton here" in refused, refused
    assert not (tmp_path / "elsewhere").exists()


# Compiles the launches of benchmarks.precompile.record(*RECORD) for sm_90 in a process of its own
# (the stand-in driver stays there), each (launch, config) once, and prints what CHECK makes of them.
COMPILED_LAUNCHES = """
import re, sys, torch
from triton.runtime import driver
from benchmarks import precompile as p
from lora_kernels import kernels
driver.set_active(p._StandInDriver(90))
jobs = p.jobs_for(p.record(*RECORD))
names = kernels._lora_matmul_kernel.arg_names
compiled = [(dict(zip(names, args)), kernels._lora_matmul_kernel.fn.warmup(*args, grid=(1,), **kwargs, **config))
            for args, kwargs, config in jobs]
print(CHECK)
"""


def inspect_compiled(tmp_path, record, check, script=None, **env):
    """The last line ``check`` (an expression of ``compiled``: (named args, compiled kernel) pairs)
    printed, for the launches of ``precompile.record(*record)`` compiled for sm_90 (or that of
    ``script``, run in place of that one)."""
    script = script or COMPILED_LAUNCHES.replace("RECORD", record).replace("CHECK", check)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ROOT, **env}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")[-2]


def test_scales_reach_the_compiled_kernel_as_fp64(tmp_path):
    """Triton passes a Python float as fp32 unless the kernel says otherwise: alpha = 0.1 reached
    fp64 products as 0.10000000149 (1.5e-8 off, where fp64 is good to 1e-15). The interpreter
    passes floats as fp64, so only the compiled kernel shows it."""
    # (The fixed tile config: a scale's type does not depend on the tile, and each candidate costs a compile.)
    found = inspect_compiled(tmp_path, "([(64, 32, 128, 4)], [torch.float64], 132, 90)",
                             "sorted({t for _, k in compiled for t in re.findall(r'%(\\w*scale\\w*): (\\w+)', k.asm['ttir'])})",
                             LORA_KERNELS_AUTOTUNE="0")
    assert found == "[('r_scale', 'f64'), ('s_scale', 'f64'), ('scale', 'f64'), ('scale2', 'f64'), ('sum_scale', 'f64')]", found


def test_compiled_kernels_use_no_atomics(tmp_path):
    """The README's bitwise-repeatable gradients rest on reductions without atomics: split ones are
    summed afterwards in a fixed order. The interpreter runs one program at a time, so atomics would
    pass every CPU test; here the compiled code of a step whose dA and dB split over 8192 tokens is
    searched for atomic or reducing instructions."""
    found = inspect_compiled(
        tmp_path, "([(64, 48, 8192, 4)], [torch.float32, torch.bfloat16], 132, 90)",
        "len(compiled), sum(a['K_PER_SPLIT'] < a['K'] for a, _ in compiled), "
        "sorted({m for _, k in compiled for m in re.findall(r'\\b(atom|red|cp\\.reduce)\\.', k.asm['ptx'])})",
        LORA_KERNELS_AUTOTUNE="0")
    jobs, split, atomics = found.split(" ", 2)
    assert int(jobs) >= 4 and int(split) >= 2 and atomics == "[]", found


# (compute capability, dtype, KiB of shared memory a block may use, from CUDA's programming guide)
@pytest.mark.parametrize("arch, dtypes, smem_kib", [(75, "fp16", 64), (80, "bf16", 163), (89, "bf16", 99)])
def test_autotuned_configs_compile_for_older_gpus(tmp_path, triton_cache, arch, dtypes, smem_kib):
    """The GPUs many LoRA users train on besides Hopper: T4 (sm_75, fp16 only in hardware), A100
    (sm_80), L4 and RTX 40x0 (sm_89). The pruner fits the same candidates to each one's shared
    memory; none may need TMA or Hopper's wgmma."""
    rows = compile_for_hopper(tmp_path, triton_cache, "1", "--ranks", "16", "--dtypes", dtypes, "--trainable-base",
                              arch=arch, shapes="256x512")
    assert len(rows) >= 20, f"too few configs compiled: {len(rows)}"
    for use, sizes, dot, tile, seconds, regs, spilled, smem, wgmma, tma in rows:
        assert regs.isdigit() and 0 < float(smem) <= smem_kib, (use, sizes, dot, tile, smem)
        assert (wgmma, tma) == ("no", "no") and " tma" not in tile, (use, sizes, dot, tile)


@pytest.mark.parametrize("fuse", ["auto", "0"], ids=["fused-shrink", "separate-shrink"])
def test_autotuned_configs_compile_for_blackwell(tmp_path, triton_cache, fuse):
    """Datacenter Blackwell (sm_100: B200, GB200) accumulates its MMAs in tensor memory. Every
    candidate must compile to a kernel that writes its output: Triton made the fused shrink's
    128x256 tiles (with dropout's share of dX also in 3.8 and 3.9) a lone trap, which would end the
    CUDA context at the autotuner's first timing, so the pruner drops those there; the wide tiles
    stay where they compile: since dropout's share of dX with dS given enters the accumulator
    before the K loop, with no tile of its own, that launch's too (with a second tile, ptxas
    failed its register allocation at 128x256 and at 128x128 on four warps)."""
    rows = compile_for_hopper(tmp_path, triton_cache, "1", "--ranks", "16", "--dtypes", "bf16", "--dropout", "0.1",
                              "--trainable-base", arch=100, shapes="256x512", LORA_KERNELS_FUSE_SHRINK=fuse)
    assert len(rows) >= 20, f"too few configs compiled: {len(rows)}"
    for use, sizes, dot, tile, seconds, regs, spilled, smem, wgmma, tma in rows:
        assert regs.isdigit() and 0 < float(smem) <= 227, (use, sizes, dot, tile, smem)
    wide = {row[0] for row in rows if row[3].startswith("128x256")}
    if fuse == "auto":
        assert "GEMM + low rank (Wᵀ view)" in wide and not any("fused shrink" in use for use in wide), wide
    else:  # (dX: "GEMM + low rank", W read as stored; the forward's reads its Wᵀ view)
        assert {"GEMM + low rank", "GEMM + low rank (Wᵀ view)"} <= wide, wide
        assert any(r[0] == "GEMM + low rank" and r[3].startswith("128x128") and " w4 " in r[3] + " " for r in rows)


def test_fixed_config_fits_older_gpus(tmp_path, triton_cache):
    """LORA_KERNELS_AUTOTUNE=0's one tile is fitted to the GPU like any candidate: Triton's
    autotuner runs a lone config unpruned, and in fp64 that tile needed 128-192 KiB of shared
    memory, which an L4 (99 KiB) or an A100 (163 KiB) does not have, so every fp64 launch there failed."""
    rows = compile_for_hopper(tmp_path, triton_cache, "0", "--ranks", "16,64", "--dtypes", "fp64,fp32", arch=89,
                              shapes="256x512")
    assert {row[2] for row in rows} == {"fp64", "fp32"} and len(rows) >= 8, rows
    for use, sizes, dot, tile, seconds, regs, spilled, smem, wgmma, tma in rows:
        assert regs.isdigit() and 0 < float(smem) <= 99, (use, sizes, dot, tile, smem)


FIRST_STEP = """
import threading, torch, triton.compiler
from benchmarks import precompile as p
launches = p.record([(64, 64, 64, 16)], [torch.bfloat16], 132, 90)[-1:]  # (one launch: dA with dB)
compiles, compile = [], triton.compiler.compile
def spy(*args, **kwargs):
    compiles.append(threading.get_ident())
    return compile(*args, **kwargs)
triton.compiler.compile = spy  # (what a kernel's first launch binds as its compiler)
p.first_step(launches, 90)
main = threading.get_ident()
print(len(p.jobs_for(launches)), len(compiles), len(set(compiles) - {main}), compiles.count(main))
"""


@pytest.mark.parametrize("threads", ["1", "2"])
def test_first_step_compiles_candidates_on_threads(tmp_path, threads):
    """A new launch's candidate configs compile on LORA_KERNELS_COMPILE_THREADS threads before the
    autotuner times the first of them (the timings then find them compiled: each compiles once),
    where Triton's autotuner compiles them one by one on the calling thread (still so with 1)."""
    found = inspect_compiled(tmp_path, None, None, script=FIRST_STEP, LORA_KERNELS_COMPILE_THREADS=threads)
    candidates, compiles, workers, on_main = map(int, found.split())
    assert candidates >= 8 and compiles == candidates, found
    if threads == "1":
        assert (workers, on_main) == (0, candidates), found
    else:  # (the launch's chosen config, compiled already, is found in the cache: none on the caller's thread)
        assert workers == 2 and on_main == 0, found


COMPILING_TEST = """
import os, signal, torch
from triton.runtime import driver
from benchmarks import precompile as p
from lora_kernels import kernels

def test_compiles():
    driver.set_active(p._StandInDriver(90))
    launches = p.record([(64, 48, 128, 16)], [torch.float16], 132, 90)[:2]  # (the shrink and y's GEMM)
    for args, kwargs, config in p.jobs_for(launches):
        kernels._lora_matmul_kernel.fn.warmup(*args, grid=(1,), **kwargs, **config)

def test_stopped_by_a_time_limit():  # (as `timeout` stops a GPU shard: no end of the run)
    if os.environ.get("STOP"):
        os.kill(os.getpid(), signal.SIGTERM)
"""


def test_the_compiles_of_a_run_are_reported_by_test(tmp_path):
    """``pytest --report-compiles FILE`` (the GPU run's test shards): the kernels Triton compiled
    in the run, each under the test that compiled it, and how many it found in its cache instead,
    written as they are heard, so a run stopped by a time limit keeps them. A second run over the
    same cache compiles nothing."""
    (tmp_path / "test_compiling.py").write_text(COMPILING_TEST)
    # (TMPDIR: the stopped run's conftest leaves its temporary folder behind, here and not in /tmp)
    env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_KERNELS_AUTOTUNE": "0",  # ("0": conftest sets it otherwise)
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    reports = []
    for run, stop in (("cold", "1"), ("warm", "")):
        report = tmp_path / f"{run}.md"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               "--report-compiles", str(report), str(tmp_path / "test_compiling.py")],
                              cwd=tmp_path, env={**env, "STOP": stop}, capture_output=True, text=True, timeout=600)
        reports.append(report.read_text())
        if stop:
            assert done.returncode == -15, done.stdout[-3000:] + done.stderr[-3000:]
        else:
            assert done.returncode == 0 and reports[-1].split("\n")[0] in done.stdout, done.stdout[-3000:]
    cold, warm = reports
    rows = [line.split(" | ") for line in cold.splitlines() if line.startswith("| test_compiling.py::test_compiles |")]
    assert cold.startswith("0 kernels found in Triton's cache, 2 compiled (") and len(rows) == 2, cold
    assert all(row[1:3] == ["_lora_matmul_kernel", "*fp16"] and 0 < float(row[3][:-2]) < 60 for row in rows), cold
    assert warm.startswith("2 kernels found in Triton's cache, 0 compiled (0.0 s") and "|" not in warm, warm
