"""The Triton kernel, its autotuning and its launcher (``lora_matmul``, with a direct-launch path).

Every product in the LoRA layer, forward and backward, has one shape:

    out = scale · (X @ W) + r_scale · (L @ R) + bias          X (M, K), W (K, N), L (M, r), R (r, N)

with each operand given by its strides, so a transpose is free. The layer uses it these ways
(see ``functional.py``):

    S  = x A                      shrink:            X = x,   W = A
    y  = x Wᵀ + alpha · S B + b   GEMM + low rank:   X = x,   W = Wᵀ,   L = S,  R = B,  r_scale = alpha
    dS = c · dY Bᵀ                shrink:            X = dY,  W = Bᵀ,   scale = c
    dX = dY W + t · dS Aᵀ         GEMM + low rank:   X = dY,  W = W,    L = dS, R = Aᵀ, r_scale = t
    dA = t · xᵀ dS                reduction over M:  X = xᵀ,  W = dS,   scale = t  (split, see below)
    dBᵀ = alpha · dYᵀ S           the same shape:    X2 = dYᵀ, W2 = S   (paired with dA: one launch)
    dW = dYᵀ x                    plain GEMM:        X = dYᵀ, W = x     (only when the base trains)

and, where ``functional.fuse_shrink`` says, S inside y's launch and dS inside dX's (FUSE_SHRINK,
``Shrink``: L = x A accumulated in the same K loop as X W, or computed once per row block by a
shrink item ahead of that row block's tiles, SHRINK_AHEAD), one launch fewer each.

with c · t = alpha (``functional._dS_scale``: c = |alpha| held to [2^-8, 1], as in the
reference's dS between). S is x A as the reference computes it, without alpha. The low-rank
term's factor (r_scale: alpha in y, t in dX; "alpha" below) multiplies R's tiles in fp32 before
their cast to the dot's dtype, or, in fp16, the fp32 accumulator. fp16's range ends at 65504 (and
its normal numbers at 6e-5), so alpha · B rounded to fp16 overflowed (or lost digits) where the
output fitted; there the sum is scale/alpha · X W + L R (see lora_matmul for dropout's dX),
multiplied by alpha once, before the bias (``sum_scale``), for 2^-64 <= |alpha| <= 2^77, where
for any fp16 operands X W / alpha stays a normal fp32 number (``_SUM_SCALED``). bf16 has fp32's range, and fp32 and fp64 are the accumulator's own dtype: they
keep alpha on R's tiles, as does an fp16 alpha outside that range. So a large alpha overflows
neither a 16-bit S or dS nor anything else the reference's own order of operations keeps in
range, short of alpha · B itself passing fp32's range (3.4e38: the PyTorch path's CPU BLAS
overflows there too) or an fp16 alpha past 2^77 (where any nonzero fp16 B makes alpha · B
overflow, and the reference's y stays finite only if its fp16 S B rounds to zero).

One kernel with flags rather than three near-copies: the tile loop is the same, and the autotuner
keys on the flags and sizes, so each use still gets its own tile shape.

Reductions over many tokens with a small output (dA, dB) would leave most of the GPU idle: the two
share one launch (PAIRED, one grid over both outputs' tiles), and the K loop can be split across a
second grid axis. Each split writes its own slice of a partial buffer (in the accumulator's dtype,
fp32 or fp64) and the launcher sums the slices in a fixed order: deterministic, no atomics, and
safe to autotune (a trial overwrites, it never accumulates).
"""

import contextlib
import functools
import itertools
import operator
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Tensor descriptors and the scratch allocator, as used here, need Triton 3.6 (the suite failed
# with 3.4, and 3.1 has neither): name the problem rather than fail on a missing name.
_TRITON = re.match(r"(\d+)\.(\d+)", triton.__version__)
if not _TRITON or tuple(map(int, _TRITON.groups())) < (3, 6):
    raise ImportError(f"lora_kernels' Triton kernels need Triton 3.6 or newer, found {triton.__version__}")

from triton.runtime import _allocation, _async_compile  # noqa: E402

# The interpreter runs on CPU tensors with no GPU driver, where an autotuner with more than one
# config cannot benchmark: give it one small config. Read once, like Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# LORA_KERNELS_AUTOTUNE=0 uses one fixed GPU config: the correctness suite meets dozens of
# shapes, and autotuning each one would spend minutes compiling configs it never times again.
AUTOTUNE = os.environ.get("LORA_KERNELS_AUTOTUNE", "1") != "0"
# The autotuner's timings are kept on disk (Triton's cache, keyed by Triton's version, the GPU
# target, the kernel's source, the tuning key and the candidate configs): a training run meets a
# few dozen keys and each costs its candidates' timings, again in every new process without it.
# LORA_KERNELS_AUTOTUNE_CACHE=0 times them afresh in every process.
AUTOTUNE_CACHE = os.environ.get("LORA_KERNELS_AUTOTUNE_CACHE", "1") != "0"


def _cpu_quota(path="/sys/fs/cgroup/cpu.max"):
    """CPUs' worth of time a container's quota grants (cgroup v2 "QUOTA PERIOD"), or None: a
    Kubernetes pod limited to 2 CPUs still sees every core of its node in its affinity mask."""
    try:
        with open(path) as f:
            quota, period = f.read().split()
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def _compile_threads():
    # LORA_KERNELS_COMPILE_THREADS=N: how many of a new launch's candidate configs compile at once
    # (compile_configs); default, the CPUs this process may use, at most 16 (each compile holds its
    # own compiler state, ~0.1-0.2 GB); 1 compiles them one at a time, as Triton's autotuner does.
    setting = os.environ.get("LORA_KERNELS_COMPILE_THREADS", "")
    if not setting:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(16, cpus, _cpu_quota() or cpus)
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"LORA_KERNELS_COMPILE_THREADS must be a whole number of threads, 1 or more, not {setting!r}")
    return int(setting)


COMPILE_THREADS = _compile_threads()

# Each split of a split reduction spans a whole number of chunks of this many rows of the reduced
# dimension (a multiple of every BLOCK_K below, so a split boundary never cuts a tile). The
# interpreter's smaller chunk lets the tests' reductions of a few hundred rows split.
GPU_SPLIT_CHUNK = 256
SPLIT_CHUNK = 64 if INTERPRET else GPU_SPLIT_CHUNK


def _check_split_chunk(configs):
    # TMA loads cannot be masked at a split's end (pointer loads are: mask_k), so every BLOCK_K
    # must divide the chunk: no tile crosses into the next split's rows.
    assert all(SPLIT_CHUNK % c.kwargs["BLOCK_K"] == 0 for c in configs), "a BLOCK_K does not divide SPLIT_CHUNK"
    return configs


# How deep the thin outputs' tiles are (hopper_configs), and the widest output they serve.
DEEP_K = 256
THIN_N = 64


def _config(bm, bn, bk, warps, stages, *, tma, persistent=False, store=False, group=8):
    """One candidate: its tile, Triton's warps and pipeline stages, and the kernel's switches:
    TMA loads (USE_TMA), a persistent grid, and a TMA store of the output tile (TMA_STORE)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "USE_TMA": tma,
                          "PERSISTENT": persistent, "TMA_STORE": store}, num_warps=warps, num_stages=stages)


def hopper_configs():
    """The autotuner's candidates on any GPU: Hopper-first tile shapes (the pruner below shrinks
    them to small problems), each with pointer loads and with TMA loads (USE_TMA; taken only
    where the launch allows it), the first four shapes also as a persistent grid with TMA loads
    and a TMA store (one program per SM looping over tiles), the two largest again in four stages
    (TMA), and deep tiles for thin outputs: which is faster is the measurement's call.

    The persistent configs' TMA store (TMA_STORE; where the launch allows it, ALLOW_TMA_STORE,
    and the pruner finds room for its staged tile) writes the output tile from shared memory by
    the tensor memory accelerator, an asynchronous copy that the program's next tile need not
    wait for, where every thread's stores of its part of the tile would. In the sixth H200 run
    (benchmarks/NOTES.md, version 23) each persistent config with it took 0.968-0.985 × its time
    without in the forward at 4096→4096, and 0.960-1.017 × in dX at 4096→1024, timed in turn:
    128x256 with the store ran the forward's GEMM at 1.021 × cuBLAS, where the autotuner's pick
    without it ran 1.085 ×."""
    shapes = [
        # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 32, 128, 4, 4),
        (32, 64, 128, 4, 4),
    ]
    configs = []
    for i, (bm, bn, bk, w, s) in enumerate(shapes):
        loads = [(False, False), (True, False)] + ([(True, True)] if i < 4 else [])  # (USE_TMA, PERSISTENT)
        configs += [_config(bm, bn, bk, w, s, tma=tma, persistent=persistent, store=persistent)
                    for tma, persistent in loads]
    # The two largest tiles in four stages as well, with TMA (192 KiB of tiles in bf16: deeper
    # prefetch where a GEMM waits on memory: the autotuner decides whether it pays).
    configs += [_config(bm, bn, 64, 8, 4, tma=True) for bm, bn in ((128, 256), (256, 128))]
    # Thin outputs (N up to THIN_N: the shrink, dS, dA beside dB, whose N is the rank) stream one
    # long operand through few tiles. In the second H200 run the shrink at 8192 tokens read x at
    # 1.2-1.9 TB/s (4096 features: 64 programs of 128 rows, 16 KiB a stage) and 2.9 TB/s (14336;
    # 64 rows, 16 KiB a stage in four), against a 4.2 TB/s device copy. Tiles DEEP_K deep hold
    # 24-72 KiB a stage (rank 16, bf16) in 3-4 stages: more of the stream in flight against the
    # memory's latency, and 2-4× fewer loop trips (waits, barriers) per byte; the smaller ones give
    # more programs. The pruner offers them to thin outputs only; the autotuner decides.
    configs += [_config(bm, 64, DEEP_K, w, s, tma=tma) for bm, w, s in ((128, 8, 3), (64, 4, 4), (32, 4, 4))
                for tma in (False, True)]
    return configs


def _configs():
    # USE_TMA asks for tensor-memory-accelerator loads, taken where the launch allows them (ALLOW_TMA:
    # the kernel checks both), so the fixed configs below use them wherever they can.
    if INTERPRET:
        return [_config(32, 32, 32, 4, 3, tma=True, group=4)]
    if not AUTOTUNE:
        # One fixed tile, fitted like any candidate to the problem and the GPU's shared memory by
        # _prune, which Triton's autotuner calls only on a list of several configs (a lone one runs
        # as it is: in fp64, 64×64×64 in three stages needs 192 KiB, more than an A100 or an L4
        # has). So the list holds it twice, and the pruner drops the duplicate.
        fixed = _config(64, 64, 64, 4, 3, tma=True)
        return [fixed, fixed]
    return hopper_configs()


def _cdiv(a, b):
    # Host-side ceiling division: triton.cdiv (like next_power_of_2, see _pow2) is a constexpr
    # function whose wrapper costs microseconds a call from Python, and a layer step makes dozens.
    return -(-a // b)


def _pow2(n):
    # triton.next_power_of_2, without its constexpr-function wrapper's cost on the host.
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def tile_name(config):
    """'BMxBNxBK wWARPS sSTAGES [tma] [persistent] [tma-store]' for a config's ``all_kwargs()``,
    as the tools report it."""
    c = config
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
            + (" tma" if c.get("USE_TMA") else "") + (" persistent" if c.get("PERSISTENT") else "")
            + (" tma-store" if c.get("TMA_STORE") else ""))


def _fit(block, size):
    # tl.dot needs every block dimension >= 16; no point in a tile larger than the problem.
    return max(16, min(block, _pow2(size)))


# Shared memory a block may use on Hopper (227 KiB); other GPUs report their own (A100: 163 KiB).
SMEM_BYTES = 227 * 1024


def _smem_bytes(tensor):
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return torch.cuda.get_device_properties(tensor.device).shared_memory_per_block_optin
    return SMEM_BYTES


# NVIDIA GPUs whose MMAs accumulate in tensor memory (512 columns of 32 bits for 128 rows), by
# compute capability's major version: datacenter Blackwell (sm_100, sm_103) and Thor (sm_110).
TENSOR_MEMORY_MAJORS = (10, 11)


def _sm_major(tensor):
    # (0 for anything but an NVIDIA GPU's tensor: benchmarks/precompile.py stands in for one)
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda and torch.version.hip is None:
        return torch.cuda.get_device_capability(tensor.device)[0]
    return 0


def _dtype(tensor):
    # (The ahead-of-time compiler, benchmarks/precompile.py, prunes with dtypes in place of tensors.)
    return tensor if isinstance(tensor, torch.dtype) else tensor.dtype


def _prune(configs, named_args, **kwargs):
    """Shrink tiles to the problem (a shrink has N = rank), trim pipeline stages until the tiles
    fit in the GPU's shared memory (fp32 and fp64 tiles are 2-4× bf16's), and drop the duplicates."""
    # (A paired launch's tile covers rows of one product: fit it to the larger one.)
    M, N = max(named_args["M"], named_args.get("M2", 0)), named_args["N"]
    smem = _smem_bytes(named_args.get("x_ptr"))
    allow_tma = kwargs.get("ALLOW_TMA", False)

    def size(name):  # an operand's bytes per element as stored, as its tiles sit in shared memory
        return _dtype(named_args[name]).itemsize

    # Each pipeline stage holds an X tile, a W tile and, with the shrink in the K loop, a BLOCK_K ×
    # BLOCK_R tile of A (at rank 64 that is 64 KiB more in four stages of BLOCK_K = 128: the compiled
    # kernel would need more than the estimate, and fail to launch on a GPU with less to spare). A
    # may be fp32 beside bf16 activations (peft's adapters).
    a_bytes = kwargs["BLOCK_R"] * size("l_ptr") if kwargs.get("FUSE_SHRINK") == SHRINK_LOOP.value else 0
    # SHRINK_AHEAD's shrink items stream X and A tiles in a loop of their own, whose buffers the K
    # loop's may share: the wider of A's and W's tiles counts (A's, at rank 64 in fp32 beside a thin W).
    ahead = kwargs.get("FUSE_SHRINK") == SHRINK_AHEAD.value
    # In tensor memory a 128×256 tile's fp32 accumulator takes 256 of the 512 columns, and with the
    # fused shrink a second accumulator as wide (dropout's share of dX has one there; Triton 3.6 and
    # 3.7 make one without dropout too) the rest, the shrink's finding none: compiled for sm_100,
    # sm_103 and sm_110 (Triton 3.6 to 3.9), those kernels came out as a lone trap, which would end
    # the process's CUDA context at the autotuner's first timing. With dropout's second
    # accumulator, 128×128 on four warps failed ptxas's register allocation (an error the autotuner
    # skips, after compiling). (Without the fused shrink, dropout's share of dX has no tile of its
    # own: see LOW_FIRST in the kernel.)
    narrow = _sm_major(named_args.get("x_ptr")) in TENSOR_MEMORY_MAJORS and kwargs.get("FUSE_SHRINK")
    second_acc = narrow and kwargs.get("DROPOUT") == _DROP_MODE["lowrank"]
    seen, kept = set(), []
    for c in configs:
        bm, bn, bk = _fit(c.kwargs["BLOCK_M"], M), _fit(c.kwargs["BLOCK_N"], N), c.kwargs["BLOCK_K"]
        if bk >= DEEP_K and N > THIN_N:  # (the deep tiles are for thin outputs, see hopper_configs)
            continue
        if (narrow and bn > 128) or (second_acc and bm * bn >= 128 * 128 and c.num_warps < 8):
            continue
        w_bytes = max(bn * size("w_ptr"), kwargs["BLOCK_R"] * size("l_ptr")) if ahead else bn * size("w_ptr")
        per_stage = (bm * size("x_ptr") + w_bytes + a_bytes) * bk
        stages = c.num_stages
        while stages > 2 and stages * per_stage > smem:
            stages -= 1
        if stages * per_stage > smem:
            continue
        # A TMA store copies the output tile from shared memory, staged beside the pipeline's
        # stages: taken only where it costs no stage (as measured, in 16-bit dtypes at rank 16; in
        # fp32 the wide tiles have no room for it, and would lose a stage or their place).
        store = (c.kwargs.get("TMA_STORE", False) and kwargs.get("ALLOW_TMA_STORE", False)
                 and stages * per_stage + bm * bn * size("out_ptr") <= smem)
        kw = dict(c.kwargs, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=c.kwargs.get("USE_TMA", False) and allow_tma,
                  TMA_STORE=store)
        key = (tuple(sorted(kw.items())), c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=stages))
    # The smallest tile fits any dtype: never leave the autotuner with nothing.
    return kept or [_config(32, 32, 32, 4, 2, tma=False)]


# Where the LoRA-dropout mask applies: nowhere, to the X tiles (x in S = x̃ A, xᵀ in dA = x̃ᵀ dS),
# or to the low-rank term at the output (dX's share dS Aᵀ ⊙ m). The 1/(1-p) rescale is not done
# here: the caller passes it in a scale (``functional._Dropout.rescale``), so masks are exact zeros.
# (Module-level values a kernel reads must be tl.constexpr objects: the GPU compiler rejects plain
# globals and annotations, though the interpreter accepts them.)
DROP_NONE = tl.constexpr(0)
DROP_X = tl.constexpr(1)
DROP_LOWRANK = tl.constexpr(2)
_DROP_MODE = {None: DROP_NONE.value, "x": DROP_X.value, "lowrank": DROP_LOWRANK.value}  # for the launcher
# Where a launch that makes L = s_scale · x̃ A itself (a Shrink) computes it (FUSE_SHRINK; 0: L is
# given, or there is none). SHRINK_LOOP: in every tile's K loop beside X W, one rank-r MMA more per
# step in each column block (redundant but for one). SHRINK_AHEAD: once per row block, by a shrink
# item of its own, launched ahead of the row block's tiles in the same grid, which read the
# published L in their epilogue (see the kernel): x's rows are then read twice, the second time
# from L2, and the tiles' K loops are those of a GEMM with L given.
SHRINK_LOOP = tl.constexpr(1)
SHRINK_AHEAD = tl.constexpr(2)
# SHRINK_AHEAD's flag of a row block counts its tiles' reads (1 each) and its L's arrival (READY):
# whichever comes last resets it, so a launch leaves its flags zero as it found them, and the
# autotuner's repeated runs of one launch each start afresh.
READY = tl.constexpr(1 << 30)


@triton.jit
def _hash32(x):
    # PCG's output permutation of a uint32 ("pcg_hash" in Jarzynski and Olano, "Hash Functions for
    # GPU Rendering", JCGT 2020): a bijection with full avalanche, in 9 integer operations.
    state = x * 747796405 + 2891336453
    word = ((state >> ((state >> 28) + 4)) ^ state) * 277803737
    return (word >> 22) ^ word


@triton.jit
def _keep(seed, p, rows, cols, si, sj, WIDE: tl.constexpr):
    # A pure function of the seed and the element's offset o = i·si + j·sj in x: the backward
    # regenerates the forward's mask instead of saving M×K bits of it. With k = hash(seed) and an
    # odd m = hash(k) | 1: u = hash(((lo(o) ^ C·hi(o)) ^ k) · m), 24 bits of it as a uniform in
    # [0, 1), one hash per element. (tl.rand runs 10 Philox rounds per element and keeps one of
    # its four words: at 8192 tokens, 4096→4096, the three masks of a step cost about 0.4 ms on the
    # H200, half the base GEMM's step.) Below 2^32 offsets (high word 0) the map is a bijection: no
    # two elements share a draw. The multiply by m keeps two seeds' masks from being shifted
    # copies of each other (with k alone, mask_s2(o) = mask_s1(o ^ D) for a D fixed by the seeds).
    k = _hash32(seed.to(tl.uint32))
    m = _hash32(k) | 1
    if WIDE:  # the masked operand's offsets reach 2^32 (_wide): o in 64 bits, its high word mixed in
        o = rows[:, None] * si + cols[None, :] * sj
        lo = (o & 0xFFFFFFFF).to(tl.uint32) ^ ((o >> 32).to(tl.uint32) * 0x9E3779B9)
    else:  # hi(o) = 0: lo(o) is the row's and the column's low words added in 32 bits, wrapping as
        # o's low word does: per element one 32-bit add, not a 64-bit add and the high word's
        # multiply (on sm_90 about a third fewer instructions per element, and fewer registers)
        lo = (rows * si).to(tl.uint32)[:, None] + (cols * sj).to(tl.uint32)[None, :]
    h = _hash32((lo ^ k) * m)
    # u >= p as integers: h's top 24 bits >= ceil(p · 2^24), exact for the fp32 p (no conversion
    # per element; p = 1 gives 2^24, which no 24 bits reach)
    return (h >> 8) >= tl.ceil(p * 16777216.0).to(tl.uint32)


@triton.jit
def _dropped(x, seed, p, rows, cols, si, sj, WIDE: tl.constexpr):
    # x with the elements that _keep drops zeroed
    return tl.where(_keep(seed, p, rows, cols, si, sj, WIDE), x, 0.0)


@triton.jit
def _times(tile, factor, ACC_DTYPE: tl.constexpr):
    # tile · factor (an fp64 scalar) in the accumulator's dtype: an fp32 tile takes the factor cast
    # first, since an fp64 scalar would promote the whole tile to fp64
    if ACC_DTYPE == tl.float64:
        out = tile.to(tl.float64) * factor
    else:
        out = tile.to(ACC_DTYPE) * tl.cast(factor, ACC_DTYPE)
    return out


@triton.jit
def _tile(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c, CACHE: tl.constexpr = tl.constexpr("")):
    # The (rows, cols) tile of a strided operand, zeros past its edges (masked rows and columns).
    # (CACHE: tl.load's cache_modifier. Its default wrapped: Triton 3.6 passes a bare "" on unwrapped.)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=mask_rows[:, None] & mask_cols[None, :], other=0.0, cache_modifier=CACHE)


@triton.jit
def _put(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c, tile):
    # _tile's store: the tile, in the operand's dtype, into its (rows, cols) within the edges
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, tile.to(ptr.dtype.element_ty),
             mask=mask_rows[:, None] & mask_cols[None, :])


@triton.jit
def _operand(desc, ptr, rows, cols, row0, col0, mask_rows, mask_cols, stride_r, stride_c, TMA: tl.constexpr,
             TRANSPOSED: tl.constexpr):
    # A tile of X or W: by TMA from the descriptor _descriptor made (at (row0, col0); a transposed
    # operand is loaded as stored and transposed: the MMA reads either layout from shared memory),
    # or from the pointer
    if TMA:
        if TRANSPOSED:
            tile = desc.load([col0, row0]).T
        else:
            tile = desc.load([row0, col0])
    else:
        tile = _tile(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c)
    return tile


@triton.jit
def _expand(acc, lo, r_ptr, rr, rn, mask_r, mask_n, stride_rr, stride_rn, r_scale, DOT_DTYPE: tl.constexpr,
            ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # acc + lo (r_scale · R[rr, rn]): a BLOCK_R slice of the low-rank product, lo the matching
    # columns of L
    hi = _tile(r_ptr, rr, rn, mask_r, mask_n, stride_rr, stride_rn)
    return tl.dot(lo.to(DOT_DTYPE), _times(hi, r_scale, ACC_DTYPE).to(DOT_DTYPE), acc,
                  input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _low_rank(acc, l_ptr, r_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_rr, stride_rn, r_scale,
              BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    # acc + L (r_scale · R) for the rows rm of L (M, R) and the columns rn of R (R, N), BLOCK_R ranks
    # a trip.
    # Not software-pipelined (num_stages=1): up to rank 64 the loop runs once, and a pipeline buys
    # nothing there but a copy of the L and R tiles per stage (compiled for sm_90, fp32 adapters at
    # rank 64 then pushed the 4-stage tiles to 240-288 KiB of shared memory; one copy fits in the
    # freed K-loop buffers).
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        lo = _tile(l_ptr, rm, rr, mask_m, mask_r, stride_lm, stride_lr)
        acc = _expand(acc, lo, r_ptr, rr, rn, mask_r, mask_n, stride_rr, stride_rn, r_scale, DOT_DTYPE, ACC_DTYPE,
                      INPUT_PRECISION)
    return acc


@triton.jit
def _shrink_rows(x_desc, xp, l_ptr, rm, mask_m, m0, k_lo, k_hi, sxm, sxk, stride_lm, stride_lr, R, s_scale,
                 seed, p_drop, drop_si, drop_sj, DROPOUT: tl.constexpr, DROP_WIDE: tl.constexpr,
                 TMA_LOADS: tl.constexpr, X_TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    # s_scale · x̃ A for the rows rm (x̃: x masked under DROP_X), in a K loop of its own: a shrink
    # item's, or (SHRINK_AHEAD) a tile's that found its rows' L not yet published. The same code and
    # tiles either way, so both get the same bits.
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        mask_k = rk < k_hi
        x = _operand(x_desc, xp, rm, rk, m0, k0, mask_m, mask_k, sxm, sxk, TMA_LOADS, X_TRANSPOSED).to(DOT_DTYPE)
        if DROPOUT == DROP_X:
            x = _dropped(x, seed, p_drop, rm, rk, drop_si, drop_sj, DROP_WIDE)
        a = _tile(l_ptr, rk, rr, mask_k, mask_r, stride_lm, stride_lr).to(DOT_DTYPE)
        shrink = tl.dot(x, a, shrink, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return _times(shrink, s_scale, ACC_DTYPE)


@triton.jit
def _descriptor(ptr, ROWS, COLS, stride_r, stride_c, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    # A TMA descriptor of a (ROWS, COLS) operand. Its last dimension must be the contiguous one, so
    # an operand stored transposed (a view like xᵀ) is described as stored: (COLS, ROWS).
    # (One return: the compiler checks every return statement's type, taken or not.)
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, shape=[COLS, ROWS], strides=[stride_c, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[ROWS, COLS], strides=[stride_r, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    return desc


# Compile options every launch states rather than leave to Triton's defaults: FMA contraction on,
# Triton 3.6's default and what every test and GPU run so far checked. Triton 3.9 warns on each
# first compile that its default turns to off in 3.10, which would change the kernels' rounding
# with no change here. (Triton 3.9's TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _wide(rows, cols, si, sj):
    # Whether a masked (rows, cols) operand's offsets i·si + j·sj (si, sj >= 0) reach 2^32 (_keep's WIDE)
    return (rows - 1) * si + (cols - 1) * sj >= 2**32


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed_ptr, p, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # The mask itself, for the PyTorch reference in tests: the same seed load and _keep as the
    # fused kernels.
    rm = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(seed_ptr), p, rm, rk, K, 1, WIDE)
    _put(out_ptr, rm, rk, rm < M, rk < K, K, 1, keep)


def keep_mask(M, K, seed, p, device):
    """The (M, K) boolean mask that the kernels apply for this seed and p."""
    assert 0.0 <= p <= 1.0, "dropout's p is in [0, 1]"
    out = torch.empty((M, K), dtype=torch.bool, device=device)
    if out.numel():
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
        with _on_device(out.device):
            _keep_mask_kernel[(_cdiv(M, 32), _cdiv(K, 32))](out, M, K, seed, p, BLOCK=32, WIDE=_wide(M, K, K, 1),
                                                            **COMPILE_OPTIONS)
    return out


def _bench(fn, quantiles):
    # Triton's autotuner hands each candidate's launch here to be timed: _gather (below the kernel,
    # which a line more here would move, and with it the kernel's cache key) takes it from there.
    return _gather(fn, quantiles)


@triton.autotune(
    configs=_check_split_chunk(_configs()),
    # Sizes enter the key rounded up to powers of two: a new sequence length (or token count of
    # dA, dB) must not re-run the tuning. The rank enters as BLOCK_R (16, 32 or 64): it sets the
    # shared memory of the fused shrink's tiles, so a tile tuned at one rank may not fit at another.
    key=["M_KEY", "N_KEY", "K_KEY", "HAS_LOWRANK", "FUSE_SHRINK", "X_TRANSPOSED", "W_TRANSPOSED", "DROPOUT",
         "ALLOW_TMA", "ALLOW_TMA_STORE", "BLOCK_R", "PAIRED", "DROP_WIDE"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench,
    cache_results=AUTOTUNE_CACHE,
)
@triton.jit
def _lora_matmul_kernel(
    # pointers (with FUSE_SHRINK, l_ptr is the shrink's weight A and s_ptr receives L = s_scale · x A;
    # with SHRINK_AHEAD, ready_ptr holds a flag per row block, zero at launch: READY)
    x_ptr, w_ptr, l_ptr, r_ptr, bias_ptr, out_ptr, s_ptr, ready_ptr,
    # sizes: out is (M, N), the main product reduces over K, the low-rank one over R
    M, N, K, R, K_PER_SPLIT, M_KEY, N_KEY, K_KEY,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_os, stride_om, stride_on, stride_sm, stride_sr, stride_b,
    # fp64 whatever the dtypes: Triton would pass a Python float as fp32, and round an fp64 product's
    # alpha (0.1 to 0.10000000149) to 1.5e-8 where its numbers are good to 1e-15. With a low-rank
    # term the accumulator is scale · X W + L (r_scale · R), then times sum_scale (the layer's
    # alpha is r_scale, or in fp16 sum_scale: see the module docstring).
    scale: tl.float64, s_scale: tl.float64, r_scale: tl.float64, sum_scale: tl.float64,
    # LoRA dropout: element (i, j) of the masked operand keeps iff u(seed, i·drop_si + j·drop_sj) >= p (_keep),
    # with the seed read from device memory (a CUDA graph replays the RNG op that wrote it); DROP_WIDE:
    # some of those offsets reach 2^32
    seed_ptr, p_drop, drop_si, drop_sj,
    # PAIRED: a second product out2 = X2 @ W2 (M2, N) in the same launch, same N and K, its row blocks
    # after the first's (the layer's dA and dBᵀ: two small reductions that alone fill a fraction of
    # the GPU each, and cost a launch each), scaled by scale2 instead of scale
    x2_ptr, w2_ptr, out2_ptr, M2, stride_x2m, stride_x2k, stride_w2k, stride_w2n, stride_o2s, stride_o2m, stride_o2n,
    scale2: tl.float64,
    # meta-parameters
    HAS_LOWRANK: tl.constexpr, FUSE_SHRINK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_WIDE: tl.constexpr, PAIRED: tl.constexpr,
    # operand layouts: X (W) stored with its first dimension contiguous, as xᵀ (Wᵀ) views are
    X_TRANSPOSED: tl.constexpr, W_TRANSPOSED: tl.constexpr,
    # ALLOW_TMA: the launcher found X and W fit for TMA (the pruner reads it); USE_TMA: the config's choice.
    # ALLOW_TMA_STORE and TMA_STORE, the same for the output (see hopper_configs).
    ALLOW_TMA: tl.constexpr, USE_TMA: tl.constexpr, ALLOW_TMA_STORE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, TMA_STORE: tl.constexpr,
):
    pid_split = tl.program_id(1)
    seed = 0
    if DROPOUT != DROP_NONE:
        seed = tl.load(seed_ptr)
    IN_LOOP: tl.constexpr = FUSE_SHRINK == SHRINK_LOOP
    AHEAD: tl.constexpr = FUSE_SHRINK == SHRINK_AHEAD
    # The reduction's own offsets fit int32 (TMA wants int32 coordinates); each is widened before it
    # meets a stride.
    k_lo = pid_split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # The config asks for TMA loads and the launch allows them (a lone config is not pruned, so
    # both are checked here).
    TMA_LOADS: tl.constexpr = USE_TMA and ALLOW_TMA
    if TMA_LOADS:
        # Tensor-memory-accelerator loads (Hopper): the copy engine fetches whole tiles into shared
        # memory and zero-fills past the tensor's edge, with no address arithmetic in the threads.
        # Split chunks are whole BLOCK_Ks, so no tile crosses a split.
        x_desc = _descriptor(x_ptr, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, X_TRANSPOSED)
        w_desc = _descriptor(w_ptr, K, N, stride_wk, stride_wn, BLOCK_K, BLOCK_N, W_TRANSPOSED)
    else:
        x_desc, w_desc = x_ptr, w_ptr  # (stand-ins, never read: _operand takes either)
    # (The launcher allows a TMA store only of one product's whole sum: not paired, not split.)
    TMA_STORES: tl.constexpr = TMA_STORE and ALLOW_TMA_STORE
    if TMA_STORES:
        out_desc = _descriptor(out_ptr, M, N, stride_om, stride_on, BLOCK_M, BLOCK_N, False)

    # Each program computes output tiles pid, pid + programs, ...: one tile when the grid has a
    # program per tile, several when the launcher sizes the grid to the GPU (PERSISTENT configs:
    # one wave, no tail of half-empty waves, descriptors made once).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_rows = num_m  # row blocks, the second product's after the first's
    if PAIRED:
        num_rows += tl.cdiv(M2, BLOCK_M)
    num_items = num_rows * num_n
    if AHEAD:  # and a shrink item per row block
        num_items += num_m
    pid = tl.program_id(0)
    if PERSISTENT:
        tile_end = num_items
        tile_step = tl.num_programs(0)
    else:  # bounds the compiler sees as one trip, so it drops the loop: one tile's straight-line code
        tile_end = pid + 1
        tile_step = 1
    for tile in range(pid, tile_end, tile_step):
        # Grouped order: consecutive tiles walk down GROUP_M row blocks before the next column
        # block, so each column block of W is read GROUP_M times while those rows of X stay in L2.
        if AHEAD:
            # Each group's items: a shrink item per row block first, then the group's tiles, whose
            # epilogues need the L it publishes. Launched in that order, the shrink items are done
            # by then as a rule (the tiles' K loops are far longer); a tile that finds its L not yet
            # there computes it itself (never waits: programs need not run at once, as the
            # interpreter runs them one by one). The tiles then read x's rows from L2.
            group = tile // (GROUP_M * (num_n + 1))
            first_m = group * GROUP_M
            group_size = min(num_m - first_m, GROUP_M)
            local = tile - group * GROUP_M * (num_n + 1) - group_size  # < 0: a shrink item
            shrink_item = local < 0
            pid_m = first_m + tl.where(shrink_item, local + group_size, local % group_size)
            pid_n = tl.where(shrink_item, 0, local // group_size)
        else:
            shrink_item: tl.constexpr = False  # (a constant: no branch compiled for shrink items)
            group = tile // (GROUP_M * num_n)
            first_m = group * GROUP_M
            group_size = min(num_rows - first_m, GROUP_M)
            pid_m = first_m + (tile % (GROUP_M * num_n)) % group_size
            pid_n = (tile % (GROUP_M * num_n)) // group_size
        if shrink_item:  # (its own names: a branch's names in common with the other's are joined, types and all)
            item_rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            item_rr = tl.arange(0, BLOCK_R)
            item_l = _shrink_rows(x_desc, x_ptr, l_ptr, item_rm, item_rm < M, pid_m * BLOCK_M, k_lo, k_hi, stride_xm,
                                  stride_xk, stride_lm, stride_lr, R, s_scale, seed, p_drop, drop_si, drop_sj,
                                  DROPOUT, DROP_WIDE, TMA_LOADS, X_TRANSPOSED, BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE,
                                  ACC_DTYPE, INPUT_PRECISION)
            _put(s_ptr, item_rm, item_rr, item_rm < M, item_rr < R, stride_sm, stride_sr, item_l)
            # Every thread's stores of L before one thread's release of the flag (then cumulative):
            # a tile that acquires the flag reads all of L.
            tl.debug_barrier()
            if tl.atomic_add(ready_ptr + pid_m, READY, sem="acq_rel") == num_n:  # (its tiles all came first)
                tl.atomic_xchg(ready_ptr + pid_m, 0, sem="relaxed")
        else:
            # This tile's product: its operands, output and row count (scalar selects, no branch).
            xp, wp, op, rows = x_ptr, w_ptr, out_ptr, M
            sxm, sxk, swk, swn = stride_xm, stride_xk, stride_wk, stride_wn
            sos, som, son = stride_os, stride_om, stride_on
            if PAIRED:
                second = pid_m >= num_m
                pid_m = tl.where(second, pid_m - num_m, pid_m)
                xp, wp = tl.where(second, x2_ptr, x_ptr), tl.where(second, w2_ptr, w_ptr)
                op, rows = tl.where(second, out2_ptr, out_ptr), tl.where(second, M2, M)
                sxm, sxk = tl.where(second, stride_x2m, stride_xm), tl.where(second, stride_x2k, stride_xk)
                swk, swn = tl.where(second, stride_w2k, stride_wk), tl.where(second, stride_w2n, stride_wn)
                sos, som = tl.where(second, stride_o2s, stride_os), tl.where(second, stride_o2m, stride_om)
                son = tl.where(second, stride_o2n, stride_on)

            # int64 offsets: pid · stride passes 2^31 on large activations and would wrap silently.
            rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m = rm < rows
            mask_n = rn < N

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            # A masked low-rank term (dropout's share of dX) with L given goes in first, onto the empty
            # accumulator, divided by the scale the sum gets below: added at the end it needs an M×N
            # tile of its own beside the finished accumulator, for which ptxas failed its register
            # allocation on sm_100 at 128×256 and at 128×128 on four warps (Triton 3.6 and 3.9). With
            # the fused shrink, L is known only after the K loop: that term stays at the end.
            LOW_FIRST: tl.constexpr = HAS_LOWRANK and DROPOUT == DROP_LOWRANK and not FUSE_SHRINK
            if LOW_FIRST:
                low = _low_rank(acc, l_ptr, r_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_rr,
                                stride_rn, r_scale, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION)
                keep = _keep(seed, p_drop, rm, rn, drop_si, drop_sj, DROP_WIDE)
                acc = tl.where(keep, _times(low, 1.0 / scale, ACC_DTYPE), 0.0)
            if IN_LOOP:  # the whole rank fits one block (the launcher checks): L = x A on the side
                rr = tl.arange(0, BLOCK_R)
                mask_r = rr < R
                shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
            m0 = pid_m * BLOCK_M  # (the TMA tiles' corner: unused, and compiled away, by pointer loads)
            n0 = pid_n * BLOCK_N
            for k0 in range(k_lo, k_hi, BLOCK_K):
                rk = tl.arange(0, BLOCK_K).to(tl.int64) + k0
                mask_k = rk < k_hi
                x = _operand(x_desc, xp, rm, rk, m0, k0, mask_m, mask_k, sxm, sxk, TMA_LOADS,
                             X_TRANSPOSED).to(DOT_DTYPE)
                w = _operand(w_desc, wp, rk, rn, k0, n0, mask_k, mask_n, swk, swn, TMA_LOADS,
                             W_TRANSPOSED).to(DOT_DTYPE)
                # DROP_X masks this product's X (S's x, or dA's xᵀ), or with a Shrink only the x feeding L
                # (SHRINK_AHEAD: none of this loop's).
                x_drop = x
                if DROPOUT == DROP_X and not AHEAD:
                    if PAIRED:  # the mask is the first product's (dA's x̃): the second's tiles skip its hash
                        if not second:
                            x_drop = _dropped(x, seed, p_drop, rm, rk, drop_si, drop_sj, DROP_WIDE)
                    else:
                        x_drop = _dropped(x, seed, p_drop, rm, rk, drop_si, drop_sj, DROP_WIDE)
                if IN_LOOP:
                    a = _tile(l_ptr, rk, rr, mask_k, mask_r, stride_lm, stride_lr).to(DOT_DTYPE)
                    shrink = tl.dot(x_drop, a, shrink, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                    acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                else:
                    acc = tl.dot(x_drop, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if PAIRED:  # (the tiles selected, not the scales: the interpreter rounds a select of fp64 scalars to fp32)
                acc = tl.where(second, _times(acc, scale2, ACC_DTYPE), _times(acc, scale, ACC_DTYPE))
            else:
                acc = _times(acc, scale, ACC_DTYPE)

            if HAS_LOWRANK:
                # The rank-r update rides on the same accumulator: y is written once, no M×N temporary.
                # Only a masked update computed here (dropout's share of dX, fused shrink) needs one.
                if not LOW_FIRST:
                    masked: tl.constexpr = DROPOUT == DROP_LOWRANK
                    if masked:
                        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
                    else:
                        low = acc
                    if FUSE_SHRINK:
                        if IN_LOOP:
                            shrink = _times(shrink, s_scale, ACC_DTYPE)
                            if pid_n == 0:  # every column block computed the same L; one of them saves it
                                _put(s_ptr, rm, rr, mask_m, mask_r, stride_sm, stride_sr, shrink)
                        else:  # AHEAD: these rows' L as their shrink item stored it, or not yet there, computed
                            rr = tl.arange(0, BLOCK_R)
                            mask_r = rr < R
                            # (one thread's acquire, its result shared through a barrier: every
                            # thread's loads after it; past L1, which another SM's stores bypass)
                            seen = tl.atomic_add(ready_ptr + pid_m, 1, sem="acq_rel")
                            # (the row block's last tile, after its L; the tensor first in the sum:
                            # Triton 3.7's and 3.8's interpreters cannot compare with READY + a tensor)
                            if seen == num_n - 1 + READY:
                                tl.atomic_xchg(ready_ptr + pid_m, 0, sem="relaxed")
                            if seen >= READY:
                                shrink = _tile(s_ptr, rm, rr, mask_m, mask_r, stride_sm, stride_sr, ".cg")
                            else:  # (rounded as stored: the output's bits never depend on which came first)
                                shrink = _shrink_rows(x_desc, x_ptr, l_ptr, rm, mask_m, pid_m * BLOCK_M, k_lo, k_hi,
                                                      stride_xm, stride_xk, stride_lm, stride_lr, R, s_scale, seed,
                                                      p_drop, drop_si, drop_sj, DROPOUT, DROP_WIDE, TMA_LOADS,
                                                      X_TRANSPOSED, BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE,
                                                      INPUT_PRECISION).to(s_ptr.dtype.element_ty)
                        # (L's ranks past R as stored, zeros: computed, they are inf · 0 = NaN
                        # where x holds an inf, and NaN · R's zero padding would fill y's row)
                        shrink = tl.where(mask_r[None, :], shrink, 0.0)
                        low = _expand(low, shrink, r_ptr, rr, rn, mask_r, mask_n, stride_rr, stride_rn, r_scale,
                                      DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION)
                    else:
                        low = _low_rank(low, l_ptr, r_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_rr,
                                        stride_rn, r_scale, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION)
                    if masked:
                        acc += tl.where(_keep(seed, p_drop, rm, rn, drop_si, drop_sj, DROP_WIDE), low, 0.0)
                    else:
                        acc = low
                acc = _times(acc, sum_scale, ACC_DTYPE)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn * stride_b, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]

            if TMA_STORES:  # (the copy engine clips the tile at the output's edges)
                out_desc.store([m0, n0], acc.to(out_ptr.dtype.element_ty))
            else:
                _put(op + pid_split.to(tl.int64) * sos, rm, rn, mask_m, mask_n, som, son, acc)


def compile_configs(kernel, args, flags, configs):
    """Compile ``kernel`` (the JITFunction the autotuner wraps) for the launch ``args``/``flags``
    with each config, on up to COMPILE_THREADS threads at once (Triton's AsyncCompileMode: its
    compiler lets go of the GIL in the MLIR passes and in ptxas), into the kernel cache its
    launches look up. A config that fails to compile is left out, to fail again (and be reported)
    when it is launched."""
    workers = min(COMPILE_THREADS, len(configs))
    # (The interpreter compiles nothing; and one AsyncCompileMode at a time: a caller's own stands.)
    if INTERPRET or workers < 2 or _async_compile.active_mode.get() is not None:
        return
    flags = {k: v for k, v in flags.items() if k not in ("grid", "warmup")}  # (the autotuner's call has them)
    with ThreadPoolExecutor(workers) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            kernel.warmup(*args, grid=(1,), **flags, **config.all_kwargs())


# The autotuner's timings, taken in turn. Triton's autotuner times its candidates one after
# another, each in one run of calls (do_bench), so each meets the GPU's clock where it stands then:
# in the sixth H200 run (benchmarks/NOTES.md) it timed the forward's two last candidates at
# 4096→4096 7.6% and 18.6% slower than they ran replayed from CUDA graphs later (256x128x64 w8 s4
# tma: 0.470 against 0.397 ms), where the rows it timed first came within -2% to +5%; the clocks
# drift between rows by as much (a suspicion, not a finding: the next run's sweeps say). Here a
# tuning run's first timing gathers every candidate's launch (_gather) and times them together,
# call by call in turn (_time_in_turn): a drift then weighs on each about alike.
TUNE_MS = 25  # each candidate's timed calls: about this many ms of its kernel (do_bench's rep), 5 to 100 calls
_gathered = None  # while _in_turn gathers: the launches handed to _gather so far


def _gather(fn, quantiles):
    """The autotuner's do_bench. While _in_turn gathers: call the launch once (so that a config
    that does not compile or fit fails here, inside the autotuner's timing, which catches it) and
    keep it; otherwise time it alone, as do_bench does. (A fault of a launch at run time surfaces
    at _time_in_turn's first wait, unnamed; do_bench's own wait after the first call named it no
    better: neither is caught.)"""
    if _gathered is None:
        return triton.testing.do_bench(fn, warmup=5, rep=TUNE_MS, quantiles=quantiles)
    fn()
    _gathered.append(fn)
    return None


def _in_turn(configs, time_one):
    """{config: [median, p20, p80] ms}: ``time_one(config)`` is the autotuner's timing of a config,
    which hands its launch to _gather; the launches gathered are timed together (_time_in_turn).
    A config whose timing came back (inf: it did not compile or fit) keeps that."""
    global _gathered
    launches, timed = {}, {}
    _gathered = []
    try:
        for config in configs:
            result = time_one(config)
            if result is None:
                assert _gathered, "the autotuner's do_bench returned no timing and gathered no launch"
                launches[config] = _gathered.pop()
            else:
                timed[config] = result
    finally:
        _gathered = None
    if launches:
        try:
            timed.update(_time_in_turn(launches, _CudaClock()))
        except Exception as e:
            # (Unmeasured on a GPU so far: should the timing in turn fail there, a layer's first step
            # still gets its tiles, each launch timed alone by do_bench as _gather times one, and the
            # failure is said. A launch's own fault fails again there, and propagates.)
            import warnings
            warnings.warn(f"lora_kernels: timing the autotuner's candidates in turn failed ({type(e).__name__}: "
                          f"{e}); each is timed alone instead", RuntimeWarning)
            timed.update({config: triton.testing.do_bench(fn, warmup=5, rep=TUNE_MS, quantiles=(0.5, 0.2, 0.8))
                          for config, fn in launches.items()})
    return timed


class _CudaClock:
    """One timed call of a launch, on CUDA events, the L2 cache flushed before it as do_bench does
    (the weights then arrive cold, as they do in a model where every layer has its own)."""

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn):
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return lambda: start.elapsed_time(end)  # (read after wait())

    def wait(self):
        torch.cuda.synchronize()


def _time_in_turn(launches, clock):
    """{config: [median, p20, p80] ms} of ``launches`` ({config: launch}): three calls of each to
    estimate its time, then about TUNE_MS of its kernel (5 to 100 calls), the calls of all of them
    interleaved: in rounds of one call of each launch (of those due), each launch's calls spread
    evenly over the rounds, centred. A drift then moves each launch's median by about as much, but
    for its place in a round: about one round's drift apart. (The quantiles are do_bench's, as the
    autotuner asks for them: it ranks by the first.)"""
    estimates = {config: [clock(fn) for _ in range(3)] for config, fn in launches.items()}
    clock.wait()
    calls = {config: max(5, min(100, round(TUNE_MS / max(sorted(ms() for ms in three)[1], 1e-3))))
             for config, three in estimates.items()}
    rounds, order, timed = max(calls.values()), list(launches), {config: [] for config in launches}
    # (the rounds of each launch's n calls: the k-th in the middle of the k-th n-th of the rounds)
    at = {config: {(2 * k + 1) * rounds // (2 * n) for k in range(n)} for config, n in calls.items()}
    for r in range(rounds):
        for config in order:
            if r in at[config]:
                timed[config].append(clock(launches[config]))
    clock.wait()
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return {config: torch.quantile(torch.tensor([ms() for ms in pending], dtype=torch.float64), quantiles).tolist()
            for config, pending in timed.items()}


def _compile_before_timing(tuner):
    """Triton's autotuner compiles each candidate right before timing it, one after another, inside
    the first call that meets a new launch: for a Llama-3-8B's projections, 169 candidates at about
    half a second each on the H200 machine (benchmarks/NOTES.md). Here the first timing of a tuning
    run compiles all of that run's candidates at once (compile_configs); the timings then find
    them compiled. Only when the autotuner really times them: a tuning found in its disk cache
    compiles just the chosen config, as Triton's autotuner does. That first timing also times
    every candidate, in turn (``_in_turn``); the autotuner's timing of each then returns its
    result."""
    prune, time_one = tuner.prune_configs, tuner._bench
    candidates = []  # the tuning run in progress (launches through the autotuner take turns)
    timed = {}  # its timings, taken at its first

    def prune_configs(kwargs):
        candidates[:] = configs = prune(kwargs)
        return configs

    def compile_then_time(*args, config, **flags):
        configs, candidates[:] = list(candidates), []
        if configs:
            compile_configs(tuner.fn, args, flags, configs)
            timed.clear()
            timed.update(_in_turn(configs, lambda c: time_one(*args, config=c, **flags)))
        return timed.pop(config) if config in timed else time_one(*args, config=config, **flags)

    tuner.prune_configs, tuner._bench = prune_configs, compile_then_time


_compile_before_timing(_lora_matmul_kernel)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def _input_precision(dot_dtype):
    # Follow PyTorch's own switch for fp32 matmuls, so fp32 users get the numbers they asked for:
    # IEEE fp32 by default, TF32 tensor cores when they allowed them. The newer per-backend
    # setting wins when set ("none" defers to the older global one, which raises if both are used).
    if dot_dtype != torch.float32:
        return "ieee"
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting != "none":
        return "tf32" if setting == "tf32" else "ieee"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"


# LORA_KERNELS_TMA=0 keeps every launch on pointer loads (a way around a TMA problem).
TMA = os.environ.get("LORA_KERNELS_TMA", "1") != "0"


@functools.lru_cache(maxsize=None)
def _tma_available(device):
    # NVIDIA Hopper (compute capability 9) and later (ROCm GPUs report 9.x too, without TMA); the
    # interpreter emulates descriptors, so CI tests them.
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    return INTERPRET


def _tma_ok(shape, strides, dtype, address):
    """Whether a 2-D operand so laid out can be read through a TMA descriptor (``_tma_layout``);
    not if empty."""
    return shape[0] * shape[1] > 0 and _tma_layout(*shape, *strides, dtype.itemsize, address)


def _tma_layout(n0, n1, s0, s1, itemsize, address):
    """Whether a TMA descriptor can state a 2-D layout: one unit stride, the other a multiple of 16
    bytes and at least a row long (a broadcast operand's stride of 0 is no layout a descriptor can
    state), a 16-byte-aligned start (an odd slice has none), and sizes under 2^31, as the kernel
    states them to the descriptor (int32)."""
    if max(n0, n1) >= 2 ** 31:
        return False
    other, row = (s0, n1) if s1 == 1 else (s1, n0) if s0 == 1 else (0, 1)
    return other >= max(row, 1) and other * itemsize % 16 == 0 and address % 16 == 0


def _scratch(size, alignment, stream):
    # A fresh buffer for every launch (the caching allocator's): one kept per stream and reused
    # (tried in version 19) would stay in whatever memory pool was current when it was made, as
    # torch.compile's CUDA graph trees' is while they warm up, and the pool could hand it out again.
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator():
    # A descriptor made inside a kernel needs a few bytes of global scratch per program, from an
    # allocator Triton keeps per thread (autograd runs the backward on a thread of its own):
    # install PyTorch's wherever none is set, and leave one a user has set alone.
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


_NO_SWITCH = contextlib.nullcontext()  # (stateless: one serves every launch)


def _on_device(device):
    # Switch devices only where the current one differs: torch.cuda.device's context costs host
    # time on every launch, and in a model on one GPU the current device is already the tensors'.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_SWITCH


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter's stand-in: enough "SMs" that the tests' small reductions (dA, dB, dW over a
    # few hundred tokens) take the split path, and that a persistent grid loops over tiles.
    return 8


def _empty(shape, device, dtype):
    # Every buffer a kernel writes comes from here, so tests can hand out NaN-filled ones and
    # catch an element the kernel forgot to write. (Contiguous, as torch.empty makes it: a plan
    # takes the strides of the buffers it allocates as such.)
    return torch.empty(shape, device=device, dtype=dtype)


def _ready_flags(n, device):
    # SHRINK_AHEAD's flags, one a row block, zero: no L is there yet. Fresh for every launch (not
    # one buffer kept: two launches on two streams at once would count on each other's flags).
    return torch.zeros(n, device=device, dtype=torch.int32)


# Triton's per-call dispatch (the autotuner's wrapper, then JITFunction.run binding and
# specializing some 50 arguments) cost more host time than the package's own launcher, and a layer step
# made six launches: on the first H200 run, ~91 µs per launch against a GPU time of tens of µs
# (benchmarks/NOTES.md). So a launch whose compiled kernel is already known goes straight to it.
# LORA_KERNELS_FAST_LAUNCH=0 always takes Triton's own path.
FAST_LAUNCH = os.environ.get("LORA_KERNELS_FAST_LAUNCH", "1") != "0"
_COMPILED = {}  # launch key (_launch_key) -> (compiled kernel, its constexpr values by name, in order)
# Triton's autotuner keeps a call's arguments on itself while it tunes (Autotuner.nargs) and
# clears them when any call ends: with Triton 3.6, two threads in it at once (DataParallel's
# replicas, each device's autograd thread) made one fail with a TypeError mid-tuning (reproduced on
# the CPU with the kernel stubbed; not with 3.9). Launches through Triton's dispatch take turns;
# direct launches need no lock.
_TRITON_DISPATCH = threading.Lock()


def _arg_class(a):
    """What Triton's binder specializes a number argument on (3.6 to 3.9): an int's being 1 (a
    constant), a multiple of 16 and its width (i32/i64); nothing for a float (its type is fixed:
    fp32, or fp64 as annotated). A pointer's is its dtype and 16-byte alignment, which
    ``_launch_key`` reads as the dtype and the address modulo 16. Two launches whose arguments agree
    on these get the same compiled kernel (tests/test_launch.py checks this against Triton's own
    function)."""
    if type(a) is int:
        return (a == 1, a % 16 == 0, -0x80000000 <= a < 0x80000000)
    if type(a) is not float:
        raise TypeError(f"a launch argument of type {type(a).__name__}: only ints and floats have a class here")
    return None


def _set(hook):
    # Triton's launch hooks are chains (empty by default: the launcher still calls them, and builds
    # their launch metadata, on every launch) or, from older code, a function or None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked():
    # Anything that watches or alters Triton's launches (a profiler's hooks, a stage-inspection
    # hook, a pre-run hook on the kernel) must see them, so such launches go through Triton's own path.
    rt = triton.knobs.runtime
    return (_set(rt.launch_enter_hook) or _set(rt.launch_exit_hook)
            or getattr(rt, "add_stages_inspection_hook", None) is not None
            or bool(getattr(getattr(_lora_matmul_kernel, "fn", None), "pre_run_hooks", None)))


def _options():
    # The compile options Triton reads from its knobs on every launch (JITFunction.run, 3.6-3.9):
    # one set after a kernel was cached must select another kernel.
    c = triton.knobs.compilation
    return (triton.knobs.runtime.debug, c.instrumentation_mode, getattr(c, "fpsan_homomorphic_casts", None))


# The kernel's runtime arguments by kind, from its signature: pointers (tensors), the floats,
# and ints (sizes and strides). Each tuple of the ints' classes is numbered once (_CLASS_IDS), so
# the key holds a number, not 30-odd tuples to hash again on every lookup. (A call's plan keeps its
# key: it is computed once per plan, not per launch.)
_ARG_NAMES = _lora_matmul_kernel.arg_names[:_lora_matmul_kernel.arg_names.index("HAS_LOWRANK")]
_FLOAT_ARGS = ("scale", "s_scale", "r_scale", "sum_scale", "p_drop", "scale2")
_POINTERS = operator.itemgetter(*[i for i, n in enumerate(_ARG_NAMES) if n.endswith("_ptr")])
_INTS = operator.itemgetter(*[i for i, n in enumerate(_ARG_NAMES) if not n.endswith("_ptr") and n not in _FLOAT_ARGS])
_SIZE_KEY = slice(_ARG_NAMES.index("M_KEY"), _ARG_NAMES.index("K_KEY") + 1)  # the autotuner's key
_CLASS_IDS = {}  # a tuple of the ints' classes -> its number (never cleared: one number, one tuple)
_NUMBERS = itertools.count()  # (next() is one call: two threads that miss at once get two numbers)
# A pointer's class as the key holds it, read without a Python call per tensor (a launch passes
# twelve): its dtype, and its address modulo 16, which tells Triton's aligned-or-not and more (an
# address with another remainder of the same alignment misses once, and is keyed apart).
_DTYPE_OF = operator.attrgetter("dtype")
_ADDRESS_OF = torch.Tensor.data_ptr
_MOD_16 = (16).__rmod__  # a -> a % 16
# NVIDIA only: ROCm's Triton also specializes a pointer on its storage fitting 2 GiB (32-bit
# buffer offsets), which _arg_class does not capture.
_DIRECT_OK = torch.version.hip is None


def _launch_key(device, flags, args):
    """Everything that picks the compiled kernel: the device, the flags, the autotuner's size key
    (M_KEY, N_KEY, K_KEY) and each argument's specialization class (``_arg_class``; a float has
    none), a pointer's as its dtype and address modulo 16 (finer than Triton's, so never wrong)."""
    classes = tuple(map(_arg_class, _INTS(args)))
    number = _CLASS_IDS.get(classes)
    if number is None:
        number = _CLASS_IDS.setdefault(classes, next(_NUMBERS))
    pointers = _POINTERS(args)
    return (device.index, *flags.values(), *args[_SIZE_KEY], number, *map(_DTYPE_OF, pointers),
            *map(_MOD_16, map(_ADDRESS_OF, pointers)), *_options())


def _launch(device, grid, args, flags, plan=None):
    """``_lora_matmul_kernel[grid](*args, **flags)``; once a key (``_launch_key``) has run that
    way, later launches with the same key call the compiled kernel directly. ``plan``: the call's
    ``_Plan``, which keeps the key it stands for (computed once), or None."""
    fast = FAST_LAUNCH and device.type == "cuda" and _DIRECT_OK and not _hooked()
    if fast:
        key = None if plan is None else plan.key
        if key is None:
            key = _launch_key(device, flags, args)
            if plan is not None:
                plan.key = key
        hit = _COMPILED.get(key)
        if hit is not None:
            kernel, meta = hit
            g0, g1 = grid(meta)
            kernel.run(g0, g1, 1, torch._C._cuda_getCurrentRawStream(device.index), kernel.function,
                       kernel.packed_metadata, None, None, None, *args, *meta.values())
            return
    with _TRITON_DISPATCH:
        kernel = _lora_matmul_kernel[grid](*args, **flags, **COMPILE_OPTIONS)
    if fast and isinstance(kernel, triton.compiler.CompiledKernel):
        # The config comes from the compiled kernel itself, not the autotuner's best_config, which
        # another thread (DataParallel's replicas) may have set in between.
        names = kernel.src.fn.arg_names
        constants = kernel.src.constants
        meta = {names[i]: constants[(i,)] for i in range(len(args), len(names))}
        _COMPILED[key] = (kernel, meta)


# fp16 alphas that go on the accumulator (the module docstring): over this range, fp16 products'
# sums divided by alpha, and then multiplied, stay normal fp32. A sum is at most 65504² · K < 2^63
# (K, the reduction, fits int32), which over 2^-64 stays under fp32's 2^128; a nonzero product is at
# least fp16's smallest step squared, 2^-48, which over 2^77 stays above fp32's smallest normal, 2^-126.
_SUM_SCALED = (2.0 ** -64, 2.0 ** 77)


class Shrink(NamedTuple):
    """In place of a ready L in ``lowrank=(L, R)``: have the kernel compute L = scale · x̃ A (x̃: x
    under ``dropout="x"``), store it as ``dtype``, and return it beside out. Inside every tile's K
    loop, or with ``ahead`` once per row block, by shrink items ahead of its tiles (SHRINK_AHEAD)."""
    A: torch.Tensor
    scale: float
    dtype: torch.dtype
    ahead: bool = False


# The fused shrink keeps all of L's block (BLOCK_M × rank) in registers beside the accumulator.
FUSE_MAX_RANK = 64


class _Plan:
    """What a launch of ``lora_matmul`` derives from its call's description (``_plan``'s arguments):
    the buffers to allocate, the ints, flags and grid to launch with, and the launch's key into
    ``_COMPILED`` once one has computed it (``_launch_key``)."""
    __slots__ = ("empty", "out_shape", "s_shape", "ready_shape", "out2_shape", "split", "dest_shape", "dest2_shape",
                 "acc_dtype",
                 "ints", "pair_ints", "sum_scaled", "tma", "flags", "grid", "key")


def _plan(device, lowrank, shrink, bias, paired, where, si, sj, out_dtype, dot_dtype, out_shape, settings,
          shapes, strides, dtypes, mods):
    """The plan (``_Plan``) of a ``lora_matmul`` call so described: which operands it has (``lowrank``,
    ``bias``, ``paired``: whether given; ``shrink``: a Shrink's (dtype, ahead), or None; ``where``: dropout's, or
    None), and each given tensor's shape, strides, dtype and address modulo 16, in the order x, w, L
    (or A), R, bias, seed, x2, w2; ``settings`` are the globals read here (``_settings``). Reads
    nothing else: its arguments are the key ``lora_matmul`` caches plans by."""
    described = iter(zip(shapes, strides, dtypes, mods))
    x = next(described)
    w = next(described)
    l_, r_ = (next(described), next(described)) if lowrank else (x, x)
    b_ = next(described) if bias else x
    if where is not None:
        next(described)  # the seed (its dtype and alignment are in the key, for _launch_key's sake)
    x2, w2 = (next(described), next(described)) if paired else (x, x)
    tma, split_chunk, sms, tma_available, precision, max_rank = settings[:6]  # (the rest only keys the plan)
    (M, K), (sxm, sxk) = x[0], x[1]
    N = w[0][1]
    swk, swn = w[1]
    R = l_[0][1] if lowrank else 0  # (L is (M, R); a Shrink's A, (K, R))
    M2 = x2[0][0] if paired else 0
    fused = shrink is not None
    ahead = fused and shrink[1]
    assert not fused or R <= max_rank, "the fused shrink holds the whole rank in one block"
    if paired:
        assert not lowrank and not bias, "a paired launch runs plain products"
        assert w2[0] == w[0] and x2[0][1] == K, "paired products share K and N"
        assert (x2[2], w2[2]) == (x[2], w[2]), "paired products share dtypes"
    plan = _Plan()
    plan.out_shape = (M, N) if out_shape is None else out_shape
    plan.s_shape, plan.out2_shape = (M, R), (N, M2)
    # (SHRINK_AHEAD's flags, one per row block of the smallest tile the pruner makes, 16 rows)
    plan.ready_shape = _cdiv(M, 16) if ahead else None
    plan.empty = M * N == 0 or (paired and M2 * N == 0)
    if plan.empty:
        return plan

    # Split the reduction when even the smallest tiles (32 × 32) would leave at least half the SMs
    # idle (dA, dB: K or N by r). Not whenever the largest tiles would: a split costs a partial
    # buffer and a launch or two more to sum it, and eager mode is host-bound (benchmarks/NOTES.md),
    # while the autotuner can pick small tiles that give dA and dB at 4096 features 128 programs.
    split = 1
    if not lowrank and not bias:
        tiles = (_cdiv(M, 32) + _cdiv(M2, 32)) * _cdiv(N, 32)
        split = max(1, min(_cdiv(K, split_chunk), sms // tiles))
    k_per_split = _cdiv(_cdiv(K, split), split_chunk) * split_chunk if split > 1 else max(K, 1)
    split = _cdiv(K, k_per_split) if split > 1 else 1
    acc_dtype = torch.float64 if dot_dtype == torch.float64 else torch.float32
    plan.split, plan.acc_dtype = split, acc_dtype
    plan.dest_shape, plan.dest2_shape = (split, M, N), (split, M2, N)

    # (A paired launch selects its operands per tile, which descriptors made up front cannot follow.)
    allow_tma = tma and not paired and tma_available and _tma_ok(*x) and _tma_ok(*w)
    # The output as the kernel writes it, (M, N) with rows N apart, for a TMA store: not a split's
    # partial sums. (Fresh, so 16-byte aligned: lora_matmul checks.)
    allow_tma_store = (tma and not paired and split == 1 and tma_available
                       and _tma_layout(M, N, N, 1, out_dtype.itemsize, 0))
    plan.tma = allow_tma or allow_tma_store
    # In fp16, alpha on the fp32 sum where it is in range (the module docstring; lora_matmul checks).
    plan.sum_scaled = lowrank and dot_dtype == torch.float16
    # The kernel's ints in its order (tests/test_launch.py checks each by name): M, N, K, R, K_PER_SPLIT,
    # M_KEY, N_KEY, K_KEY, then the strides of x, w, L (or A), R, the output (split, row, column), S, bias.
    plan.ints = (M, N, K, R, k_per_split, _pow2(M + M2), _pow2(N), _pow2(K), sxm, sxk, swk, swn, *l_[1], *r_[1],
                 M * N if split > 1 else 0, N, 1,  # (dest: fresh, rows N apart)
                 *((max(R, 1), 1) if fused else x[1]),  # (s_out: fresh L, as torch strides it, or x standing in)
                 b_[1][0] if bias else 0)
    # M2, the strides of x2, w2 and out2 = (x2 @ w2)ᵀ, contiguous (N, M2): the kernel writes its
    # transpose, or a split's partial sums
    plan.pair_ints = (M2, *x2[1], *w2[1], *((M2 * N, N, 1) if split > 1 else (0, 1, M2))) if paired else (0,) * 8
    plan.flags = dict(
        HAS_LOWRANK=lowrank, FUSE_SHRINK=SHRINK_AHEAD.value if ahead else SHRINK_LOOP.value if fused else 0,
        HAS_BIAS=bias, DROPOUT=_DROP_MODE[where], PAIRED=paired,
        # (the masked operand: the first product's X, or the output)
        DROP_WIDE=where is not None and _wide(M, K if where == "x" else N, si, sj),
        X_TRANSPOSED=sxk != 1 and sxm == 1, W_TRANSPOSED=swn != 1 and swk == 1,
        ALLOW_TMA=allow_tma, ALLOW_TMA_STORE=allow_tma_store,
        DOT_DTYPE=_TL_DTYPE[dot_dtype], ACC_DTYPE=_TL_DTYPE[acc_dtype], INPUT_PRECISION=precision,
        # (a block of up to 64 ranks: the fused shrink's whole rank, R <= FUSE_MAX_RANK; otherwise
        # the low-rank loop's step, one trip up to rank 64)
        BLOCK_R=max(16, min(max_rank, _pow2(R))),
    )

    def grid(meta):  # a program per output tile (and shrink item), or (PERSISTENT) at most one per SM
        rows = _cdiv(M, meta["BLOCK_M"])
        items = (rows + _cdiv(M2, meta["BLOCK_M"])) * _cdiv(N, meta["BLOCK_N"]) + (rows if ahead else 0)
        return (min(items, sms) if meta["PERSISTENT"] else items, split)
    plan.grid = grid
    plan.key = None
    return plan


def _settings(device, dot_dtype):
    """The globals ``_plan`` reads, and the compile options ``_launch_key`` does: a plan and its key
    hold for one value of each (tests and benchmarks/precompile.py change them)."""
    return (TMA, SPLIT_CHUNK, _num_sms(device), _tma_available(device), _input_precision(dot_dtype), FUSE_MAX_RANK,
            *_options())


# Plans by their call's description (_plan's arguments). A layer's launches repeat a few
# descriptions, and deriving a plan cost about as much host time as the launch key did (each
# ~7-11 µs a launch inside a step, on a CPU: benchmarks/NOTES.md): done once, both are a lookup.
_PLANS = {}
_MAX_PLANS = 8192  # (a run through very many shapes starts over)
_SHAPE_OF = operator.attrgetter("shape")
_STRIDES_OF = torch.Tensor.stride


def lora_matmul(x, w, *, scale=1.0, lowrank=None, r_scale=1.0, bias=None, dropout=None, pair=None, pair_scale=1.0,
                out_dtype, dot_dtype, out_shape=None):
    """``scale · (x @ w) + r_scale · (L @ R) + bias`` for 2-D operands of any strides, through the
    Triton kernel.

    ``lowrank`` is ``(L, R)``, ``(Shrink(...), R)`` (then the result is ``(out, L)``) or None.
    ``dropout`` is None or ``(where, seed, p, si, sj)``: zero element (i, j) of ``x`` (where="x";
    with a Shrink, only the x feeding L) or of ``L @ R`` (where="lowrank") unless
    ``u(seed, i·si + j·sj) >= p`` (``_keep``), with ``seed`` a 0-d int64 tensor (on x's device, or copied
    there; where="lowrank" with L given takes ``scale`` 1).
    Operands are cast to ``dot_dtype`` for the tensor cores and accumulated in fp32 (fp64 for fp64).
    A plain product (no ``lowrank``, no ``bias``) with few tiles and a long reduction is split over
    the reduction (deterministically, see the module docstring); the layer's products that carry
    either never need a split.

    ``pair=(x2, w2)`` computes a second product of the same K, N and dtypes in the same launch (its
    row blocks after the first's; plain products only, and a dropout on x masks the first's x
    alone) and returns ``(out, out2)`` with ``out2 = pair_scale · (x2 @ w2)ᵀ``, contiguous: the
    layer's dA and dB = alpha · (dYᵀ S)ᵀ, two reductions over the tokens with r columns that alone
    fill a fraction of the GPU each.

    ``out_shape`` allocates out in another shape of the same rows (the layer's leading dimensions,
    as ``(*x.shape[:-1], N)`` of the caller's x): the kernel writes it as (M, N) all the same.
    """
    # (Host time matters here: three to six launches a layer step. What follows from the operands'
    # sizes, strides, dtypes and alignments is derived once per description, in _plan.)
    device = x.device
    shrink = None
    l_ = r_ = b_ = seed = x2 = w2 = x  # stand-ins for absent operands, never read (their flags are off)
    ops = [x, w]
    if lowrank is not None:
        l_, r_ = lowrank
        if isinstance(l_, Shrink):
            shrink, l_ = l_, l_.A
        ops += (l_, r_)
    if bias is not None:
        b_ = bias
        ops.append(b_)
    where, p, si, sj = None, 0.0, 0, 0
    if dropout:
        where, seed, p, si, sj = dropout
        # (_keep compares integers with ceil(p · 2^24), and _wide takes the last offset for the largest)
        assert 0.0 <= p <= 1.0 and si >= 0 and sj >= 0, "dropout's p is in [0, 1], its offsets' strides >= 0"
        if seed.device != device:
            seed = seed.to(device)
        ops.append(seed)
    if pair is not None:
        x2, w2 = pair
        assert x2.device == device and w2.device == device, "paired products share their device"
        ops += (x2, w2)
    key = (device, lowrank is not None, None if shrink is None else (shrink.dtype, shrink.ahead), bias is not None,
           pair is not None, where, si, sj, out_dtype, dot_dtype, out_shape, _settings(device, dot_dtype),
           tuple(map(_SHAPE_OF, ops)), tuple(map(_STRIDES_OF, ops)), tuple(map(_DTYPE_OF, ops)),
           tuple(map(_MOD_16, map(_ADDRESS_OF, ops))))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(*key)

    out = _empty(plan.out_shape, device, out_dtype)
    if plan.empty:  # an output with no elements: nothing to launch for it
        if pair is not None:  # (one of the two may have elements)
            return (lora_matmul(x, w, scale=scale, dropout=dropout, out_dtype=out_dtype, dot_dtype=dot_dtype),
                    lora_matmul(w2.t(), x2.t(), scale=pair_scale, out_dtype=out_dtype, dot_dtype=dot_dtype))
        if shrink is None:
            return out
        # no column block to compute L in, yet L may have rows (N = 0)
        x_drop = dropout if dropout and dropout[0] == "x" else None
        return out, lora_matmul(x, shrink.A, scale=shrink.scale, dropout=x_drop, out_dtype=shrink.dtype,
                                dot_dtype=dot_dtype)
    split = plan.split
    dest = out if split == 1 else _empty(plan.dest_shape, device, plan.acc_dtype)
    s_out = ready = dest2 = x  # (stand-ins, never written, unless fused or paired)
    fresh = [dest]
    if shrink is not None:
        s_out = _empty(plan.s_shape, device, shrink.dtype)
        fresh.append(s_out)
        if plan.ready_shape is not None:
            ready = _ready_flags(plan.ready_shape, device)
    if pair is not None:
        out2_t = _empty(plan.out2_shape, device, out_dtype)  # (x2 @ w2)ᵀ, the caller's layout
        dest2 = out2_t.t() if split == 1 else _empty(plan.dest2_shape, device, plan.acc_dtype)
        fresh.append(dest2)
    # A masked low-rank term with L given enters the accumulator before X W does (LOW_FIRST in the
    # kernel), as r_scale · (L R) / scale: with scale 1 (then 1/alpha where alpha moves onto the sum
    # below) that is the term the output itself carries, where another scale could overflow fp32
    # while the output fits. The layer's dX has scale 1.
    assert where != "lowrank" or shrink is not None or scale == 1.0, \
        "a masked low-rank term with L given takes scale 1"
    sum_scale = 1.0
    if plan.sum_scaled and _SUM_SCALED[0] <= abs(r_scale) <= _SUM_SCALED[1]:
        # In fp16, r_scale (alpha) on the fp32 sum (the module docstring): scale/alpha · X W + L R, times alpha.
        scale, r_scale, sum_scale = scale / r_scale, 1.0, r_scale
    # (floats as floats: p given as an int would make Triton compile another kernel, which no key tells)
    args = (x, w, l_, r_, b_, dest, s_out, ready, *plan.ints,
            float(scale), 1.0 if shrink is None else float(shrink.scale), float(r_scale), float(sum_scale),
            seed, float(p), si, sj, x2, w2, dest2, *plan.pair_ints, float(pair_scale))
    flags, memo = plan.flags, plan  # (memo: where _launch keeps the launch key)
    if any(map(_MOD_16, map(_ADDRESS_OF, fresh))):
        # The plan took its fresh buffers as 16-byte aligned, as PyTorch's CUDA allocators make
        # them (512 bytes): without that, no TMA store, and no key of the plan's for this launch.
        flags, memo = {**flags, "ALLOW_TMA_STORE": False}, None
    with _on_device(device):  # Triton launches on the current device, not the tensors'
        if plan.tma and device.type == "cuda":
            _ensure_allocator()
        _launch(device, plan.grid, args, flags, memo)
    if split > 1:
        # Fixed-order sum over the splits: bitwise repeatable, unlike atomics. Straight into out
        # when it has the partial buffer's dtype (one launch less); a 16-bit out gets the fp32 sum
        # rounded once (torch.sum into a 16-bit out would round every split first).
        for o, d in [(out.view(dest.shape[1:]), dest)] + ([(out2_t.t(), dest2)] if pair is not None else []):
            if o.dtype == d.dtype:
                torch.sum(d, 0, out=o)
            else:
                o.copy_(d.sum(0))
    if pair is not None:
        return out, out2_t
    return (out, s_out) if shrink is not None else out
