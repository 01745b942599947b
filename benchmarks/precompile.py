"""Compile the fused layer's Triton kernels for an NVIDIA GPU ahead of time, with or without one.

    python -m benchmarks.precompile [--jobs N] [--arch 90] [--sms 132] [--smem 227] [--report FILE] [--variants]
        [--host] [--shapes ...] [--tokens ...] [--ranks ...] [--dtypes bf16,...] [--tf32] [--dropout P] [--trainable-base]
    python -m benchmarks.precompile --save-cache FILE.tar.xz [--arch 90]  |  --load-cache FILE.tar.xz
    LORA_KERNELS_AUTOTUNE=0 python -m benchmarks.precompile --launches-from FILE   (after pytest --record-launches FILE)

It runs the layer's forward and backward for the benchmark sweep's configurations (the same
defaults as ``benchmarks.run`` on a GPU) on CPU placeholders, intercepts every kernel launch, and
compiles each launch's pruned autotune configs for the target into Triton's on-disk cache, N
processes at a time. No launch runs and no GPU is touched: a stand-in driver names the target.

Three uses:

* anywhere (no GPU needed): proof that every kernel specialization the layer launches compiles for
  Hopper (sm_90, the default) or another NVIDIA GPU (``--arch 80`` for an A100), and a table of
  each config's registers, spilled bytes and shared memory, as ptxas left them in the binary (read
  back with the cuobjdump that Triton ships);
* on the GPU host, right before the benchmark (``scripts/gpu_check.sh``): the autotuner compiles
  a launch's candidates only when a step first meets it (on threads since version 11, but one
  launch at a time), so a cold sweep spends minutes compiling; filled in parallel first, every
  launch at once, the cache leaves it only the timing;
* ``--first-step``: instead, time what a training process's first step spends compiling these
  launches' candidates through the autotuner (in an empty ``TRITON_CACHE_DIR``).

``--save-cache FILE`` packs Triton's cache, as the compiles left it, for another machine, and
``--load-cache FILE`` unpacks it there (``scripts/gpu_check.sh cache`` and the GPU run): so the
GPU's minutes are not spent compiling. A cache key holds Triton's build, which differs between
Python versions, so the pack is compiled with the GPU machine's Python, torch and Triton, and is
loaded only where its fingerprint matches.

The launches are recorded with the arguments the GPU run will pass (sizes, strides, dtypes, the
split count for ``--sms`` SMs), so the compiled specializations are the ones it will look up.
``--launches-from`` takes the test suite's instead, recorded by ``pytest --record-launches FILE``
in a run under the interpreter (``recording_launches``): the GPU run's test shards' kernels.
"""

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from lora_kernels import functional, kernels

from . import report
from .run import GPU_RANKS, GPU_SHAPES, GPU_TOKENS, _ints, _shapes, plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# H100 and H200 (SXM) both have 132 SMs; the split count of dA and dB depends on it.
HOPPER_SMS = 132
# Shared memory a block may opt into, in KiB, by compute capability (CUDA's programming guide): the
# pruner fits each config's pipeline stages to it, so a compile for another GPU must use its figure.
# T4 (7.5), A100 (8.0), A10/RTX 30x0 (8.6), Orin (8.7), L4/L40/RTX 40x0 (8.9), H100/H200 (9.0),
# B200 (10.0), RTX 50x0 (12.0).
SMEM_KIB = {75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}


class _StandInDriver:
    """Just enough of Triton's driver for compiling (``warmup``) without a GPU: it names the target."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _Recorder:
    """Stands in for the autotuned kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # Tensors become their dtype (Triton's warmup accepts that): placeholders then pickle
            # for free, and a dtype specializes as a 16-byte-aligned pointer, as CUDA memory is.
            self.launches.append((tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        return launch


def _unseen_empty(shape, device, dtype):  # (not through a test's spy on kernels._empty, which counts buffers)
    return torch.empty(shape, device=device, dtype=dtype)


@contextlib.contextmanager
def launched_on(recorder, sms, arch):
    """The package's launches made as on the target GPU (its SM count, TMA from sm_90, the GPU's
    split chunk), each recorded by ``recorder`` in place of the kernel: nothing runs."""
    with mock.patch.object(kernels, "_lora_matmul_kernel", recorder), \
            mock.patch.object(kernels, "_num_sms", lambda device: sms), \
            mock.patch.object(kernels, "_tma_available", lambda device: arch >= 90), \
            mock.patch.object(kernels, "SPLIT_CHUNK", kernels.GPU_SPLIT_CHUNK), \
            mock.patch.object(kernels, "_empty", _unseen_empty):
        yield


def _spec(value):
    # What Triton specializes an argument on (kernels._arg_class): a number's class, a pointer's
    # dtype (recorded in place of its tensor, see _Recorder), a constexpr's value.
    return kernels._arg_class(value) if type(value) in (int, float) else str(value)


def record(configs, dtypes, sms, arch, *, trainable_base=False, dropout=0.0, variants=False, tf32=False,
           adapter_dtype=None, ahead_at=None):
    """The kernel launches (args, kwargs) of one forward+backward of the layer at each (K, N, M, r)
    and dtype, the adapters in ``adapter_dtype`` if given (else in the base's): with ``variants``,
    for the shrink separate and in the K loop (and ahead, at ``ahead_at``'s tokens and rank only,
    by default the variants' own), as plain GEMMs and with dA and dB unpaired too (what
    ``benchmarks.variants`` times; a test checks that against its pieces); with ``tf32``, fp32
    products on TF32 tensor cores as well."""
    from .variants import RANK, TOKENS, on_64_bit_offsets
    ahead_at = ahead_at or (TOKENS, RANK)

    recorder, extra = _Recorder(), _Recorder()  # the layer's launches, then what only variants adds
    seed = torch.tensor(12345) if dropout > 0 else None
    fuse_options = ("0", "1", "ahead") if variants else (functional.FUSE_SHRINK,)
    needs = [True, trainable_base, trainable_base, True, True]
    with launched_on(recorder, sms, arch), torch.no_grad():
        for (K, N, M, r), dtype, fuse in itertools.product(configs, dtypes, fuse_options):
            if variants and fuse == "ahead" and (M, r) != ahead_at:
                continue  # (the variants time it at theirs alone: the pack has room for no more)
            # Uninitialised CPU memory: no launch reads it, and torch.empty costs nothing.
            x, dy = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
            W, b = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
            A, B = torch.empty(K, r, dtype=adapter_dtype or dtype), torch.empty(r, N, dtype=adapter_dtype or dtype)
            for precision in ("ieee", "tf32") if tf32 and dtype == torch.float32 else (None,):
                chosen = mock.patch.object(kernels, "_input_precision", lambda d, p=precision: p or _precision(d))
                with chosen, mock.patch.object(functional, "FUSE_SHRINK", fuse):
                    _, S = functional._forward(x, W, b, A, B, 2.0, dropout, seed, "triton")
                    functional._backward(dy, x, W, A, B, S, 2.0, dropout, seed, needs, "triton")
                    if not variants or fuse == "ahead":
                        continue
                    # benchmarks.variants also times plain GEMMs: y (with and without TMA), dX ...
                    # (recorded apart and compiled last: a precompile stopped by its time limit
                    # has then compiled the sweep's launches of every shape first)
                    with mock.patch.object(kernels, "_lora_matmul_kernel", extra):
                        kernels.lora_matmul(x, W.t(), bias=b, out_dtype=dtype, dot_dtype=dtype)
                        kernels.lora_matmul(x, torch.empty(K, N, dtype=dtype), bias=b, out_dtype=dtype, dot_dtype=dtype)
                        with mock.patch.object(kernels, "TMA", False):
                            kernels.lora_matmul(x, W.t(), bias=b, out_dtype=dtype, dot_dtype=dtype)
                        kernels.lora_matmul(dy, W, out_dtype=dtype, dot_dtype=dtype)
                        # ... and dA = xᵀ dS and dB = Sᵀ dY in launches of their own, which the layer
                        # pairs: otherwise compiled inside the variants step, their candidates
                        # would take minutes of its limit.
                        S_ = torch.empty(M, r, dtype=dtype)
                        kernels.lora_matmul(x.t(), S_, out_dtype=dtype, dot_dtype=dtype)
                        kernels.lora_matmul(S_.t(), dy, out_dtype=dtype, dot_dtype=dtype)
                        # ... and LoRA dropout's shrink and dX with S (dS) given, which the layer
                        # fuses at some sizes (variants.IN_TURN)
                        # (each also on 64-bit offsets, variants.on_64_bit_offsets)
                        drop = torch.tensor(0)
                        for hashed in (lambda fn: fn, on_64_bit_offsets):
                            hashed(lambda: kernels.lora_matmul(x, A, scale=1 / 0.9, dropout=("x", drop, 0.1, K, 1),
                                                               out_dtype=dtype, dot_dtype=dtype))()
                            hashed(lambda: kernels.lora_matmul(dy, W, lowrank=(S_, A.t()), r_scale=2.0,
                                                               dropout=("lowrank", drop, 0.1, K, 1), out_dtype=dtype,
                                                               dot_dtype=dtype))()
    return recorder.launches + extra.launches


_precision = kernels._input_precision  # the real choice, for the recorder's patch to fall back on


def record_host(dtypes, sms, arch):
    """The launches of ``benchmarks.variants``' host-time pieces (64×64, rank 16: the layer's
    forward+backward with either shrink placement, its launches called directly, and one plain
    GEMM without bias), recorded by running those very pieces on
    CPU placeholders, so that they are exactly what the variants step will look up."""
    from .variants import host_pieces

    recorder = _Recorder()
    with launched_on(recorder, sms, arch), mock.patch.object(functional, "select_backend", lambda *args: "triton"):
        for dtype in dtypes:
            for fn in host_pieces(dtype, torch.device("cpu")).values():
                fn()
    return recorder.launches


@contextlib.contextmanager
def recording_launches(sms=HOPPER_SMS, arch=90):
    """For ``pytest --record-launches FILE`` (tests/conftest.py), in a run under Triton's
    interpreter: inside, every call of ``kernels.lora_matmul`` is also recorded as the target GPU
    would launch it, and so is the Triton path of the layer's eager forward and backward where they
    take the PyTorch path here and the kernels on a GPU: backend auto (the GPU run sets no
    LORA_KERNELS_TORCH_BELOW) and bf16 (which the interpreter computes wrong). Each call then
    computes as it would here, but one at a time. What it misses: benchmarks/NOTES.md, twenty-seventh
    session. Yields the list of launches it fills."""
    recorder = _Recorder()
    matmul, forward, backward = kernels.lora_matmul, functional._forward_impl, functional._backward_impl
    # One call at a time (DataParallel's threads): the target's patches are module globals, which
    # another thread's launch must neither see nor restore out of turn. (So a test of threads
    # launching at once passes here whatever it checks: the recording run is no verdict.)
    lock = threading.RLock()

    def recording(*args, **kwargs):  # a launch here, recorded as the GPU makes it, then run
        with lock:
            with launched_on(recorder, sms, arch):
                matmul(*args, **kwargs)
            return matmul(*args, **kwargs)

    def as_on_the_gpu(impl):  # the layer's eager forward and backward (their last argument: the backend)
        def call(*args):
            if args[-1] == "torch" and functional.backend_setting() != "torch":  # (on a GPU: the kernels)
                with lock, launched_on(recorder, sms, arch), mock.patch.object(kernels, "lora_matmul", matmul):
                    impl(*args[:-1], "triton")
            return impl(*args)
        return call

    with mock.patch.object(kernels, "lora_matmul", recording), \
            mock.patch.object(functional, "_forward_impl", as_on_the_gpu(forward)), \
            mock.patch.object(functional, "_backward_impl", as_on_the_gpu(backward)):
        yield recorder.launches


def kind(launch):
    """A launch's arguments but its floats (no part of a kernel's specialization; scales vary) and
    its flags, as text: two launches of one kind compile the same kernels."""
    args, kwargs = launch
    return repr((tuple(None if type(a) is float else a for a in args),
                 sorted((k, str(v)) for k, v in kwargs.items())))


def save_launches(path, launches):
    """Write ``launches`` (as ``record`` returns them) to ``path``, each kind once (--launches-from)."""
    kinds = {}
    for launch in launches:
        kinds.setdefault(kind(launch), launch)
    with open(path, "wb") as f:
        pickle.dump(list(kinds.values()), f)
    return len(kinds)


@contextlib.contextmanager
def compiles_heard(path=None):
    """Inside, every kernel Triton loads from its cache directory or compiles is heard (Triton's
    compilation listener): yields a list of (the pytest test running, or "", kernel name, its
    pointer dtypes, seconds, whether it was found in the cache). With ``path``, ``compiles_report``
    is written there from the start and again after each kernel heard (so a process killed by a
    time limit keeps all but a compile in progress). For ``pytest --report-compiles``: which of
    the GPU run's tests still compile with a carried pack, and for how long."""
    heard, lock = [], threading.Lock()  # (kernels.compile_configs compiles on threads)

    def write():
        with lock:
            with open(path + ".part", "w") as f:
                f.write(compiles_report(heard))
            os.replace(path + ".part", path)  # (never a half-written report: gpu_check packs it any time)

    def listener(*, src, times, cache_hit, **_):
        seconds = (times.ir_initialization + sum(t for _, t in times.lowering_stages) + times.store_results) / 1e6
        # (defensive: a listener that raised would fail the compile, and Inductor's kernels are heard too)
        pointers = ",".join(sorted({str(t) for t in getattr(src, "signature", {}).values() if str(t).startswith("*")}))
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]  # ("path::name[id] (call)")
        heard.append((test, src.name, pointers, seconds, cache_hit))
        if path:
            write()

    if path:
        write()
    before, triton.knobs.compilation.listener = triton.knobs.compilation.listener, listener
    try:
        yield heard
    finally:
        triton.knobs.compilation.listener = before


def compiles_report(heard):
    """``compiles_heard``'s list as markdown: its first line the totals, then a row per compile
    (compiler seconds per kernel: kernels compiled on threads at once add up to more than the wall time)."""
    heard = list(heard)  # (one snapshot: other threads may append)
    compiled = [h for h in heard if not h[4]]
    lines = [f"{len(heard) - len(compiled)} kernels found in Triton's cache, {len(compiled)} compiled "
             f"({sum(h[3] for h in compiled):.1f} s of compiler time)"]
    if compiled:
        lines += ["", "| test | kernel | pointers | compile s |", "|---|---|---|---:|"]
        lines += [f"| {test or '(outside a test)'} | {name} | {pointers} | {seconds:.2f} |"
                  for test, name, pointers, seconds, _ in compiled]
    return "\n".join(lines) + "\n"


def jobs_for(launches):
    """(launch, config) pairs: every config the autotuner keeps for each launch, deduplicated."""
    tuner = kernels._lora_matmul_kernel
    seen, jobs = set(), []
    for args, kwargs in launches:
        configs = tuner.configs
        if len(configs) > 1:  # as the autotuner does: a lone config runs as it is, unpruned
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                configs = tuner.prune_configs(kwargs)
            finally:
                tuner.nargs = None
        for config in configs:
            spec = (tuple(_spec(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())),
                    tuple(sorted(config.all_kwargs().items())))
            if spec not in seen:
                seen.add(spec)
                jobs.append((args, kwargs, config.all_kwargs()))
    return jobs


def first_step(launches, arch):
    """Seconds the launches' first calls spend compiling in a training step's process: each launch
    through the autotuner here, which compiles its candidates as in a first step
    (``kernels.compile_configs``, LORA_KERNELS_COMPILE_THREADS at once), with its timings stubbed
    out and nothing launched. The autotuner's choices, in memory and on disk, and Triton's driver
    are as they were afterwards."""
    tuner = kernels._lora_matmul_kernel
    # (driver._active, not .active: without a GPU, reading .active looks for one and raises)
    saved = driver._active, tuner.cache, tuner.cache_results, tuner.__dict__.get("do_bench")
    driver.set_active(_StandInDriver(arch))
    tuner.cache, tuner.cache_results = {}, False
    # Each timing calls the candidate once, which compiles it if it is not yet (and launches nothing:
    # warmup=True); do_bench is a cached_property of Triton's.
    tuner.__dict__["do_bench"] = lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1]
    started = time.perf_counter()
    try:
        for args, kwargs in launches:  # (through the autotuner)
            tuner.run(*map(triton.runtime.jit.MockTensor.wrap_dtype, args), grid=(1,), warmup=True, **kwargs)
        return time.perf_counter() - started
    finally:
        driver._active, tuner.cache, tuner.cache_results, do_bench = saved
        tuner.__dict__.pop("do_bench")
        if do_bench is not None:
            tuner.__dict__["do_bench"] = do_bench


@contextlib.contextmanager
def _as_target(smem, arch):
    """The pruner reads the GPU's shared memory and compute capability from a launch's tensors,
    CPU placeholders here: the target's stand in for them."""
    with mock.patch.object(kernels, "_smem_bytes", lambda tensor: smem), \
            mock.patch.object(kernels, "_sm_major", lambda tensor: arch // 10):
        yield


def _init_worker(arch):
    driver.set_active(_StandInDriver(arch))


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin):
    """{"regs", "spilled"} from the binary's resource usage. ptxas spills registers to the stack
    frame (STACK; LOCAL counts only declared local arrays, none here), and the kernel calls no
    function that would need one otherwise: its bytes are the spilled bytes per thread."""
    if not os.path.exists(CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"regs": int(found["REG"]), "spilled": int(found["STACK"]) + int(found["LOCAL"])} if found else {}


_TMA_STORE = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared")


def compile_one(job):
    """Compile one (launch, config) for the target; returns what it cost and what it uses."""
    args, kwargs, config = job
    started = time.perf_counter()
    try:
        compiled = kernels._lora_matmul_kernel.fn.warmup(*args, grid=(1,), **kwargs, **config)
    except Exception as e:  # reported per config: one that fails to compile must not hide the rest
        while e.__cause__ is not None:  # the compiler's own complaint, not the source excerpt around it
            e = e.__cause__
        message = " ".join(str(e.args[-1] if e.args else e).split())
        return {"error": f"{type(e).__name__}: {message[:300]}"}
    seconds = time.perf_counter() - started
    ptx = compiled.asm.get("ptx", "")
    # Every launch writes its output, with st.global or a TMA store (a bulk tensor copy from shared
    # into global memory): neither, and the compiler left a trap instead.
    if "st.global" not in ptx and not _TMA_STORE.search(ptx):
        return {"seconds": seconds,
                "error": "compiled to a kernel that writes nothing" + (" (a trap)" if "trap;" in ptx else "")}
    return {"seconds": seconds, "shared": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, **_resources(compiled.asm["cubin"])}


# What a packed cache leaves out: the compiler's intermediate forms, about half the pack. A cache hit
# needs the binary and the metadata; the PTX stays for compile_one's checks.
_NOT_PACKED = (".source", ".ttir", ".ttgir", ".llir")


def fingerprint(arch):
    """What a Triton cache key takes from the machine, beside the kernel and its options
    (triton.compiler.compile): Triton's build (its sources and its compiled library, which differ
    between Python versions), the backend's (ptxas's version and the target) and the environment
    variables Triton reads as compiler settings."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    parts = {"triton": triton_key(), "backend": make_backend(GPUTarget("cuda", arch, 32)).hash(),
             "environment": str(sorted(get_cache_invalidating_env_vars().items()))}
    return " ".join(f"{name}={hashlib.sha256(part.encode()).hexdigest()[:12]}" for name, part in parts.items())


def cache_groups():
    """{group file: when it was written} of Triton's cache directory: a compile writes its kernel's
    group file (anew where a cache entry was there but not found), a cache hit only reads it."""
    cache = triton.knobs.cache.dir
    folders = [e.path for e in os.scandir(cache) if e.is_dir()] if os.path.isdir(cache) else []
    return {f.path: f.stat().st_mtime_ns for folder in folders for f in os.scandir(folder) if f.name.startswith("__grp__")}


def save_cache(path, arch):
    """Pack Triton's cache directory into ``path`` (.tar.xz), with the fingerprint it is good for."""
    cache = triton.knobs.cache.dir
    entries = sorted(e.name for e in os.scandir(cache) if e.is_dir())  # (not load_cache's marker)
    label = (f"sm_{arch} {fingerprint(arch)} (Python {sys.version.split()[0]}, torch {torch.__version__}, "
             f"triton {triton.__version__})\n").encode()
    # (preset 9: its 64 MiB window spans the many near-alike kernels, 9% smaller than the default's
    # 8 MiB on the 55 MiB pack of 2026-11-30, where a device call carries 64 MiB with the tree;
    # about 3 minutes more to write, on one core.)
    with tarfile.open(path, "w:xz", preset=9) as tar:
        info = tarfile.TarInfo("FINGERPRINT")
        info.size = len(label)
        tar.addfile(info, io.BytesIO(label))
        for entry in entries:
            tar.add(os.path.join(cache, entry), entry, filter=lambda m: None if m.name.endswith(_NOT_PACKED) else m)
    print(f"packed {len(entries)} kernels of {cache} into {path} ({os.path.getsize(path) / 2**20:.1f} MiB), for "
          + label.decode().strip())


def load_cache(path):
    """Unpack ``save_cache``'s pack into Triton's cache directory if its fingerprint is this
    machine's (else its keys would never match: nothing is unpacked), and say which it was. Not
    again where this pack was unpacked there before and every file it wrote is still there (a
    device call after another on a warm machine: about 12 s of xz's for nothing)."""
    cache = triton.knobs.cache.dir
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    marker = os.path.join(cache, "lora_kernels-unpacked.json")  # (a file: no cache entry is one)
    with tarfile.open(path, "r|xz") as tar:  # (read as a stream: one pass, the fingerprint first)
        label = tar.extractfile(tar.next()).read().decode().strip()
        target, *packed = label.split(" (")[0].split()  # ("sm_90", ["triton=...", "backend=...", ...])
        here = fingerprint(int(target.removeprefix("sm_"))).split()
        if packed != here:
            differ = ", ".join(h.split("=")[0] for h, p in zip(here, packed) if h != p)
            print(f"{path} NOT used, another {differ} here ({' '.join(here)}: Python "
                  f"{sys.version.split()[0]}, triton {triton.__version__}); it was compiled for {label}")
            return
        try:
            with open(marker) as f:
                before = json.load(f)
            if before["sha256"] == digest and all(os.path.exists(os.path.join(cache, name)) for name in before["files"]):
                print(f"{path} already unpacked into {cache}: {len({n.split('/')[0] for n in before['files']})} "
                      f"kernels compiled for {label}")
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        os.makedirs(cache, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)  # (an unpack stopped halfway leaves none)
        files = []
        while (member := tar.next()) is not None:  # (iterating `tar` would start again at the fingerprint)
            tar.extract(member, cache, filter="data")
            if member.isfile():
                files.append(member.name)
    # Triton's group files list their entry's files by absolute path, and the pack leaves some out:
    # point them at what is here.
    entries = {name.split("/")[0] for name in files}
    for entry in entries:
        folder = os.path.join(cache, entry)
        for group in (f for f in os.listdir(folder) if f.startswith("__grp__")):
            with open(os.path.join(folder, group)) as f:
                children = json.load(f)["child_paths"]
            children = {c: os.path.join(folder, c) for c in children if os.path.exists(os.path.join(folder, c))}
            with open(os.path.join(folder, group), "w") as f:
                json.dump({"child_paths": children}, f)
    with open(marker + ".part", "w") as f:
        json.dump({"sha256": digest, "files": files}, f)
    os.replace(marker + ".part", marker)
    print(f"unpacked {path} into {cache}: {len(entries)} kernels compiled for {label}")


def describe(args, kwargs, config):
    """A short name for a job: which product, its sizes and its tile config."""
    named = dict(zip(kernels._lora_matmul_kernel.arg_names, args))
    use = report.launch_name(kwargs)
    if named["K_PER_SPLIT"] < named["K"]:
        use += f", K split {-(-named['K'] // named['K_PER_SPLIT'])} ways"
    tile = kernels.tile_name(dict(config, USE_TMA=config.get("USE_TMA") and kwargs["ALLOW_TMA"],
                                  TMA_STORE=config.get("TMA_STORE") and kwargs["ALLOW_TMA_STORE"]))
    dot = str(kwargs["DOT_DTYPE"]) + (" tf32" if kwargs["INPUT_PRECISION"] == "tf32" else "")
    rows = f"{named['M']}+{named['M2']}" if kwargs["PAIRED"] else named["M"]
    sizes = f"M={rows} N={named['N']} K={named['K']}" + (f" r={named['R']}" if kwargs["HAS_LOWRANK"] else "")
    return use, sizes, tile, dot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes (default: all cores)")
    p.add_argument("--arch", type=int, help="compute capability as 90 (default: the GPU here, else 90)")
    p.add_argument("--sms", type=int, help=f"SMs of the GPU (default: the GPU here, else {HOPPER_SMS})")
    p.add_argument("--smem", type=int, help="KiB of shared memory per block (default: the GPU here, else by --arch)")
    p.add_argument("--shapes", type=_shapes, default=GPU_SHAPES)
    p.add_argument("--tokens", type=_ints, default=GPU_TOKENS)
    p.add_argument("--ranks", type=_ints, default=GPU_RANKS)
    p.add_argument("--full-product", action="store_true")
    p.add_argument("--dtypes", type=lambda t: [DTYPES[d.strip()] for d in t.split(",")], default=[torch.bfloat16],
                   help=f"comma-separated, from {','.join(DTYPES)} (default bf16)")
    p.add_argument("--adapter-dtype", type=lambda t: DTYPES[t.strip()],
                   help="the adapters' dtype (default: each base dtype's), e.g. fp32 beside bf16 as peft keeps them")
    p.add_argument("--tf32", action="store_true", help="fp32 products on TF32 tensor cores as well as in IEEE fp32")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the masked kernels)")
    p.add_argument("--trainable-base", action="store_true")
    p.add_argument("--variants", action="store_true", help="also what benchmarks.variants launches at these shapes")
    p.add_argument("--host", action="store_true",
                   help="also benchmarks.variants' host-time pieces (64x64, 64 tokens, rank 16), in --dtypes")
    p.add_argument("--limit", type=int, help="compile only the first N jobs (a quick check)")
    p.add_argument("--first-step", action="store_true",
                   help="instead, time what a training process's first step spends compiling these launches' "
                        "candidates (in this process, through the autotuner, its timings stubbed out); "
                        "use an empty TRITON_CACHE_DIR")
    p.add_argument("--launches", type=int, help="only the first N of the launches recorded")
    p.add_argument("--launches-from", metavar="FILE",
                   help="instead of the sweep's, the launches `pytest --record-launches FILE` recorded (the test "
                        "suite's; with LORA_KERNELS_AUTOTUNE=0, as the GPU run's tests, its one fixed config)")
    p.add_argument("--report", metavar="FILE", help="write the per-config table (markdown) here")
    p.add_argument("--save-cache", metavar="FILE.tar.xz", help="instead, pack Triton's cache for the --arch target")
    p.add_argument("--load-cache", metavar="FILE.tar.xz",
                   help="instead, unpack a --save-cache pack into Triton's cache, if its fingerprint is this machine's")
    args = p.parse_args(argv)
    if args.first_step and args.limit is not None:
        p.error("--limit cuts compile jobs, not launches: with --first-step use --launches")
    if args.load_cache:
        load_cache(args.load_cache)  # (not used is no failure: the compiles then happen here)
        return 0
    if kernels.INTERPRET:  # (the kernels would have the interpreter's one config)
        p.error("compiles for a GPU: unset TRITON_INTERPRET")

    cuda = torch.cuda.is_available()
    arch = args.arch or (int("%d%d" % torch.cuda.get_device_capability()) if cuda else 90)
    sms = args.sms or (torch.cuda.get_device_properties(0).multi_processor_count if cuda else HOPPER_SMS)
    smem = (args.smem * 1024 if args.smem else torch.cuda.get_device_properties(0).shared_memory_per_block_optin
            if cuda else SMEM_KIB.get(arch, 99) * 1024)
    if args.save_cache:
        save_cache(args.save_cache, arch)
        return 0
    configs, _ = plan(args.shapes, args.tokens, args.ranks, args.full_product)
    source = f"the launches in {args.launches_from}" if args.launches_from else f"{len(configs)} configurations"
    started = time.perf_counter()
    with _as_target(smem, arch):
        if args.launches_from:
            with open(args.launches_from, "rb") as f:
                launches = pickle.load(f)
            if not launches:  # (a recording that failed to record is no empty success)
                p.error(f"{args.launches_from} holds no launches")
        else:
            launches = record(configs, args.dtypes, sms, arch, trainable_base=args.trainable_base,
                              dropout=args.dropout, variants=args.variants, tf32=args.tf32,
                              adapter_dtype=args.adapter_dtype)
        if args.host:
            launches += record_host(args.dtypes, sms, arch)
        launches = launches[:args.launches]
        jobs = jobs_for(launches)[:args.limit]
    print(f"{source}: {len(launches)} launches, {len(jobs)} (launch, config) "
          f"compiles for sm_{arch}" + ("" if args.first_step else f", {args.jobs} processes"), flush=True)
    if args.first_step:
        cache = triton.knobs.cache.dir
        cold = not (os.path.isdir(cache) and os.listdir(cache))  # (a warm cache compiles nothing)
        with _as_target(smem, arch):
            seconds = first_step(launches, arch)
        print(f"first step: {seconds:.1f} s compiling {len(jobs)} candidates of {len(launches)} launches, "
              f"{kernels.COMPILE_THREADS} at once (LORA_KERNELS_COMPILE_THREADS), on {os.cpu_count()} CPUs")
        if args.report:  # a row per run, under one header: run it again with another thread count
            new = not os.path.exists(args.report)
            with open(args.report, "a") as f:
                if new:
                    f.write(f"# A first step's compiles for sm_{arch}, triton {triton.__version__}, torch "
                            f"{torch.__version__}\n\n`python -m benchmarks.precompile {' '.join(argv or sys.argv[1:])}`, "
                            "and again with other settings\n\n"
                            "| compile threads | CPUs | launches | candidates | Triton's cache empty | seconds |\n"
                            "|---:|---:|---:|---:|---|---:|\n")
                f.write(f"| {kernels.COMPILE_THREADS} | {os.cpu_count()} | {len(launches)} | {len(jobs)} | "
                        f"{'yes' if cold else 'no'} | {seconds:.1f} |\n")
        return 0

    # spawn, not fork: the workers must not inherit a CUDA context or torch's thread pools.
    groups = cache_groups()
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker, initargs=(arch,)) as pool:
        results = list(pool.map(compile_one, jobs, chunksize=1))
    elapsed = time.perf_counter() - started

    for r in results:  # Triton checks shared memory at launch, not at compile time: check it here
        if r.get("shared", 0) > smem:
            r["error"] = f"needs {r['shared'] / 1024:.0f} KiB of shared memory, the GPU has {smem / 1024:.0f}"
    failed = [(job, r) for job, r in zip(jobs, results) if "error" in r]
    ok = [r for r in results if "error" not in r]
    spilled = [(job, r) for job, r in zip(jobs, results) if r.get("spilled")]
    total = sum(r["seconds"] for r in ok)
    # (of the jobs that compiled, failed checks after the compiler included)
    found = sum("seconds" in r for r in results) - sum(groups.get(p) != t for p, t in cache_groups().items())
    print(f"compiled {len(ok)} of {len(jobs)} in {elapsed:.1f} s ({total:.1f} s of compiler time, "
          f"{total / max(len(ok), 1):.2f} s each); {len(failed)} failed; {len(spilled)} spill registers; "
          f"{found} found in Triton's cache")
    for job, r in failed:
        print("FAILED", *describe(*job), r["error"])
    if args.report:
        lines = [f"# Ahead-of-time compile for sm_{arch}, triton {triton.__version__}", "",
                 f"{len(jobs)} (launch, config) pairs from {source}; "
                 f"{elapsed:.1f} s with {args.jobs} processes; {found} found in Triton's cache (their compile s "
                 "is a load's).", "",
                 "| use | sizes | dot | tile | compile s | regs | spilled B | smem KiB | wgmma | TMA |",
                 "|---|---|---|---|---:|---:|---:|---:|---|---|"]
        for job, r in zip(jobs, results):
            use, sizes, tile, dot = describe(*job)
            if "error" in r:
                lines.append(f"| {use} | {sizes} | {dot} | {tile} | FAILED: {r['error']} | | | | | |")
            else:
                yes = {True: "yes", False: "no"}
                lines.append(f"| {use} | {sizes} | {dot} | {tile} | {r['seconds']:.2f} | {r.get('regs', '?')} | "
                             f"{r.get('spilled', '?')} | {r['shared'] / 1024:.0f} | {yes[r['wgmma']]} | {yes[r['tma']]} |")
        with open(args.report, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
