"""Where the fused layer's time goes, piece by piece and variant by variant, in one GPU run.

    python -m benchmarks.variants [--tokens 8192] [--rank 16] [--dtype bf16] [--out DIR]

First the host's time per call at a tiny shape (launch overhead). Then for each shape, side by
side: the cuBLAS floor (``F.linear`` forward; ``dY W`` for dX), this package's kernel as a plain
GEMM (how far Triton is from cuBLAS before any LoRA work; with and without TMA loads), each piece
of the fused layer alone (shrink, GEMM + low rank, dS, dX, dA, dB, and dA with dB in two launches
or the layer's one paired launch; the thin ones also without the deep tiles that
``kernels.hopper_configs`` offers them, and beside cuBLAS's own), the layer's forward with the
shrink separate or fused into the big product's K loop (``functional.FUSE_SHRINK``): on a GPU
each of these replayed from a CUDA graph (the kernels' time, no host time: ``GRAPHED_KINDS``).
Then the layer's forward+backward, eager (a user's step) and replayed from a CUDA graph, and its
launches called directly, with the thin products (shrink, dS, dA with dB) on Triton or on cuBLAS
(``composed``), eager and from a CUDA graph; and LoRA dropout's masked shrink and dX, each in turn
with the same launch without dropout (``IN_TURN``) and with its mask hashed on 64-bit offsets
(``on_64_bit_offsets``). Last, at the --sweep shapes, the forward's GEMM
launch forced to each config the autotuner timed near its pick, beside its timing, and to each
persistent candidate (``forced``), at the --sweep-dx shapes dX's launch forced to its pick and
each persistent candidate, and at the --sweep-thin shapes the thin dS = dY Bᵀ forced to each
candidate. At the --clean-l2 shapes, F.linear, the three thin launches, the layer's forward, and
the base's and the layer's steps from CUDA graphs are timed again after an L2 flush that reads rather than writes
(``CLEAN``): what the timer's usual flush charges a launch that reads much. And the layer's
launches again with dA and dB on a second stream beside dX (``BESIDE``). Every ratio is to the floor
of the same run; each new variant's row is checked against its twin (``TWINS``) and, where the two
are of one kind, timed in turn with it for a ratio that clock drift does not decide, and the rows
that conclusions rest on (``AGAINST_FLOOR``, the sweeps') are timed in turn with their floor too.
Writes ``variants.md`` and ``variants.json`` under --out (default $OUT, else benchmarks/results/).
The numbers feed benchmarks/NOTES.md.

Off a GPU it runs only under TRITON_INTERPRET=1 with tiny shapes: a check of the code, not timing.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import statistics
import time

import torch
import triton

import lora_kernels
from lora_kernels import functional, kernels

from . import report
from .measure import Timer, rel_err, tolerance
from .run import DTYPES, Stopped, _shapes, _stop

DEFAULT_SHAPES = "4096x4096,4096x1024,4096x14336,14336x4096"
TOKENS, RANK = 8192, 16  # (the defaults: issue 4's)
# The sweeps' shapes: the forward's GEMM where its time dominates the layer's forward, and the GPU's
# rather than the host's; dX where its reduction is shortest (over N = 1024 out-features: a K loop
# of 16 steps, against which a tile's epilogue weighs most; the fifth H200 run's dX there was 1.22 ×
# cuBLAS's, 0.94-1.02 at the other shapes, timed apart), and at 4096→4096, where the sixth run,
# timing dX in turn with cuBLAS, put it at 1.098 × (its pick a non-persistent tile, where the forward's
# GEMM beside it, persistent, ran 1.013 ×). About as many rows as the thirtieth session's two forward
# sweeps, whose time the variants step's limit allows.
DEFAULT_SWEEP = "4096x4096"
DEFAULT_SWEEP_DX = "4096x1024,4096x4096"
# dS's launch (a thin product: the rank is its N) at 4096→1024, where the sixth run's pick (128x16x64
# w8 s3, 0.0159 ms) ran 1.32 × the pick among the candidates without the deep tiles (64x16x128 w4 s4,
# 0.0115), which the autotuner had timed too: forced to every candidate, beside the autotuner's own
# timing of each, which for a launch this short may hold the host's time to issue it as well.
DEFAULT_SWEEP_THIN = "4096x1024"
# The CLEAN rows' shapes: their thin launches read 16 to 128 MiB, either side of the ~35 MiB of dirty
# lines a written flush leaves (the fit beside TWINS' CLEAN rows); at two shapes, for the step's time.
DEFAULT_CLEAN = "4096x4096,4096x1024"


def with_configs(fn, configs):
    """fn with the autotuner's candidates replaced by ``configs``, tuned apart: its own choices, and
    its own compiled kernels for the direct launch, swapped in for each call. (A lone config runs
    as it is, untimed and unpruned, as Triton's autotuner runs one.)"""
    tuner = kernels._lora_matmul_kernel
    own = {"configs": configs, "cache": {}}
    own_compiled = {}

    @functools.wraps(fn)
    def run():
        saved, saved_compiled = {k: getattr(tuner, k) for k in own}, kernels._COMPILED
        tuner.__dict__.update(own)
        kernels._COMPILED = own_compiled
        try:
            return fn()
        finally:
            tuner.__dict__.update(saved)
            kernels._COMPILED = saved_compiled
    return run


def on_64_bit_offsets(fn):
    """fn with LoRA dropout's mask hashed in its 64-bit form (``kernels._keep``'s WIDE, all there
    was before version 22) on the same offsets: the same mask, so the row must match its twin's,
    and in turn with it the 32-bit offsets' gain. (On plans of its own: they are kept by their
    call's description, which does not hold the flag.)"""
    @functools.wraps(fn)
    def run():
        saved = kernels._wide, kernels._PLANS
        kernels._wide, kernels._PLANS = (lambda *args: True), {}
        try:
            return fn()
        finally:
            kernels._wide, kernels._PLANS = saved
    return run


def clean_l2(fn):
    """fn, timed after an L2 flush that reads (``measure.Timer``'s clean_l2) rather than writes: no
    dirty lines left for its own reads to write back (``time_row``)."""
    @functools.wraps(fn)
    def run():
        return fn()
    run.clean_l2 = True
    return run


def time_row(timer, fn):
    """A row's median ms: ``timer`` on fn, after the L2 flush the row asks for (``clean_l2``)."""
    flush = {"clean_l2": True} if getattr(fn, "clean_l2", False) else {}  # (stand-in timers take none)
    return timer(lambda: None, lambda _: fn(), **flush)[0]


def without_deep_tiles(fn):
    """fn with the autotuner's candidates as they were before the thin outputs' deep tiles
    (``kernels.DEEP_K``), tuned apart."""
    return with_configs(fn, [c for c in kernels._lora_matmul_kernel.configs if c.kwargs["BLOCK_K"] < kernels.DEEP_K])


def forced(fn, within):
    """fn (one launch) run with each config the autotuner keeps for it whose own timing was within
    ``within`` × its pick's, then with each persistent one, one config at a time: [(config, that
    run, the autotuner's median ms for the config, whether it picked it)]. The configs are those
    the autotuner timed, fitted to the launch by its pruner (a lone config runs unpruned), and the
    timings those its choice was made from (read back from its disk cache, or timed afresh here
    without one, when its pick may differ from a later tuning's); fn is called once, through
    Triton's dispatch."""
    tuner = kernels._lora_matmul_kernel
    timings, picked = {}, tuner.configs[0]
    if len(tuner.configs) > 1:  # (the interpreter has one config: nothing to time, nothing pruned)
        tuner.configs_timings = {}
        tuned = with_configs(fn, tuner.configs)
        with _no_direct_launch():
            tuned()
        timings, picked = tuner.configs_timings, tuner.best_config
    near = ([c for c in timings if timings[c][0] <= within * timings[picked][0]] if within > 1 else []) or [picked]
    persistent = [c for c in timings if c.kwargs.get("PERSISTENT") and c not in near]
    return [(c, with_configs(fn, [c]), timings[c][0] if c in timings else None, c == picked)
            for c in near + persistent]


def graphed(fn, device):
    """fn captured once into a CUDA graph and replayed: the GPU's time with no host time between
    launches (what CUDA graphs or torch.compile's reduce-overhead mode would get). Returns the
    graph's output tensors, which each replay rewrites."""
    graph, out = [], []

    @functools.wraps(fn)  # (with what the row's fn carries: forced's note on its config)
    def run():
        if not graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up (autotuning, cuBLAS workspaces) off the capture
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            graph.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph[0]):
                out.append(fn())
        graph[0].replay()
        return out[0]
    return run


CLEAN = ", L2 flushed by reading"  # (clean_l2: the rows after an L2 flush that leaves no dirty lines)
CLEAN_BASE, CLEAN_STEP = "base F.linear fwd+bwd, CUDA graph" + CLEAN, "layer fwd+bwd, separate shrink, CUDA graph" + CLEAN

# Kinds of rows whose pieces are timed replayed from a CUDA graph on a GPU: one launch's host time
# (67 µs direct, 150-190 through Triton's dispatch, on the H200 host) is longer than a thin
# product's GPU time, and the timer's L2 flush gives the host only a short head start, so timed
# eagerly those rows measured the host: in the fourth run the same shrink (x of 8192×4096) took
# 0.060 ms at 4096→4096 and 0.127 at 4096→1024. "step" stays eager: a user's step.
GRAPHED_KINDS = ("fwd", "dx", "graph step", "graph step" + CLEAN)


def composed(thin, x, W, b, A, B, dy, dtype, beside=False):
    """The layer's step (alpha 2) as functional._forward_impl and _backward_impl run it on the Triton
    path with a separate shrink, its launches called directly (no autograd), and its thin products
    (S, dS, dA with dB) through ``thin``: kernels.lora_matmul, the layer's own, or
    functional.torch_matmul, cuBLAS calls, which cost the host a fraction of a Triton launch.
    ``beside`` (CUDA): dA with dB on a second stream that waits for dS alone, issued after dX,
    free to run beside it. Returns a zero-argument callable that returns (dX, dA, dB)."""
    # (torch_matmul folds dA's and dB's alpha into an addmm, as the PyTorch path does.)
    # dA and dB need dS, not dX: on a second stream their programs may take SMs that dX leaves
    # idle (at 4096→4096 its 1024 tiles of 128×256 on 132 SMs make 7.76 waves, the last a quarter
    # empty for one tile's time, about 48 µs in the sixth run; the paired launch took 45 µs alone).
    # In a CUDA graph the two are sibling nodes, which a replay may start in either order. (The
    # join before returning keeps each tensor's use ordered before its memory is reused.)
    second = torch.cuda.Stream(x.device) if beside else None

    def run():
        S = thin(x, A, out_dtype=dtype, dot_dtype=dtype)
        kernels.lora_matmul(x, W.t(), lowrank=(S, B), r_scale=2.0, bias=b, out_dtype=dtype, dot_dtype=dtype)
        dS = thin(dy, B.t(), out_dtype=dtype, dot_dtype=dtype)
        if second is not None:
            here = torch.cuda.current_stream(x.device)
            second.wait_stream(here)  # (dS issued, dX not yet: the pair waits for dS alone)
        dx = kernels.lora_matmul(dy, W, lowrank=(dS, A.t()), r_scale=2.0, out_dtype=dtype, dot_dtype=dtype)
        if second is None:
            return (dx, *thin(x.t(), dS, scale=2.0, pair=(dy.t(), S), pair_scale=2.0, out_dtype=dtype, dot_dtype=dtype))
        with torch.cuda.stream(second):
            dA, dB = thin(x.t(), dS, scale=2.0, pair=(dy.t(), S), pair_scale=2.0, out_dtype=dtype, dot_dtype=dtype)
        here.wait_stream(second)
        return dx, dA, dB
    return run


def switched(fn, flag, value, module=kernels):
    """``fn`` run with ``module.flag`` set to ``value`` (put back after each call). A launch flag
    it sets (ALLOW_TMA) is in the autotuner's key: tuned apart."""
    def run():
        previous = getattr(module, flag)
        setattr(module, flag, value)
        try:
            return fn()
        finally:
            setattr(module, flag, previous)
    return run


def pieces(K, N, M, r, dtype, device, sweep=None, clean=False):
    """name -> (kind, zero-argument callable); the first row of each kind is its floor. With
    ``sweep`` ("forward" or "dx", ``SWEEPS``), that sweep's rows instead: its cuBLAS floor, its
    launch autotuned, and the same forced to each config the autotuner timed near its pick, and to
    each persistent candidate (``forced``). With ``clean``, the CLEAN rows too."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, dy = rnd(M, K), rnd(M, N)
    W, b = rnd(N, K, scale=K ** -0.5), rnd(N, scale=0.1)
    Wt = W.t().contiguous()  # Wᵀ stored K×N: the forward's B operand laid out as dX's W is
    A, B = rnd(K, r, scale=K ** -0.5), rnd(r, N, scale=r ** -0.5)
    # S and dS in the activations' dtype and without alpha, as the layer keeps them for an alpha of 1
    # or more (functional.py): alpha (2.0) scales B's tiles in y, Aᵀ's in dX, and dA's and dB's
    # accumulators, as there.
    S = kernels.lora_matmul(x, A, out_dtype=dtype, dot_dtype=dtype)
    dS = kernels.lora_matmul(dy, B.t(), out_dtype=dtype, dot_dtype=dtype)
    mm = lambda *a, **k: kernels.lora_matmul(*a, dot_dtype=dtype, **k)  # noqa: E731
    seed = torch.tensor(1234, device=device)  # (LoRA dropout's, as functional.draw_seed makes one)

    operands = (x, W, b, A, B, dy, dtype)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    xb = x.clone().requires_grad_()

    # Gradients through torch.autograd.grad, as measure.py takes them: .backward() on the same
    # leaves would add each step's gradients into .grad (an M×K in-place add from the second call
    # on), work that neither the floor's nor the layer's step defines.
    def layer(fuse, backward, p=0.0):
        def run():
            if backward:
                return torch.autograd.grad(lora_kernels.lora_linear(xg, W, b, Ag, Bg, 2.0, dropout_p=p), [xg, Ag, Bg],
                                           dy)
            with torch.no_grad():
                return lora_kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=p)
        return switched(run, "FUSE_SHRINK", fuse, functional)

    def pointers_only(fn):
        return switched(fn, "TMA", False)

    def dropped_shrink():
        return mm(x, A, scale=1 / 0.9, dropout=("x", seed, 0.1, K, 1), out_dtype=dtype)

    def dropped_dx():
        return mm(dy, W, lowrank=(dS, A.t()), r_scale=2.0, dropout=("lowrank", seed, 0.1, K, 1), out_dtype=dtype)

    def gemm_sb():  # the forward's GEMM launch, as the layer makes it with the shrink separate
        return mm(x, W.t(), lowrank=(S, B), r_scale=2.0, bias=b, out_dtype=dtype)

    def base_fwd_bwd():  # dX only: the base is frozen
        torch.autograd.grad(torch.nn.functional.linear(xb, W, b), [xb], dy)

    graphs = {} if device.type != "cuda" else {
        # whole steps replayed from CUDA graphs: host time out of the picture
        "base F.linear fwd+bwd, CUDA graph (floor)": ("graph step", base_fwd_bwd),
        "layer fwd+bwd, separate shrink, without the deep tiles, CUDA graph":
            ("graph step", without_deep_tiles(layer("0", True))),
        "layer fwd+bwd, separate shrink, CUDA graph": ("graph step", layer("0", True)),
        "layer fwd+bwd, fused shrink, CUDA graph": ("graph step", layer("1", True)),
        "the layer's launches, CUDA graph": ("graph step", composed(kernels.lora_matmul, *operands)),
        "the layer's launches, thin products on cuBLAS, CUDA graph":
            ("graph step", composed(functional.torch_matmul, *operands)),
        BESIDE: ("graph step", composed(kernels.lora_matmul, *operands, beside=True)),
        AHEAD_STEP: ("graph step", layer("ahead", True)),
        DROPPED_STEP: ("graph step", layer("0", True, 0.1)),
        DROPPED_STEP_AHEAD: ("graph step", layer("ahead", True, 0.1)),
        # (the base's and the layer's steps after a clean flush: a kind of their own, the base its
        # floor, the layer timed in turn with it; the layer's starts with a thin launch, the base's
        # with a GEMM)
        CLEAN_BASE: ("graph step" + CLEAN, clean_l2(base_fwd_bwd)),
        CLEAN_STEP: ("graph step" + CLEAN, clean_l2(layer("0", True))),
    }
    rows = {
        # forward
        "cuBLAS F.linear (floor)": ("fwd", lambda: torch.nn.functional.linear(x, W, b)),
        "cuBLAS F.linear" + CLEAN: ("fwd", clean_l2(lambda: torch.nn.functional.linear(x, W, b))),
        "Triton GEMM + bias, no LoRA": ("fwd", lambda: mm(x, W.t(), bias=b, out_dtype=dtype)),
        "the same, no TMA (pointer loads and stores)": ("fwd", pointers_only(lambda: mm(x, W.t(), bias=b, out_dtype=dtype))),
        "the same, Wᵀ stored K×N (dX's layout of W)": ("fwd", lambda: mm(x, Wt, bias=b, out_dtype=dtype)),
        "shrink S = xA, without the deep tiles": ("fwd", without_deep_tiles(lambda: mm(x, A, out_dtype=dtype))),
        "shrink S = xA": ("fwd", lambda: mm(x, A, out_dtype=dtype)),
        "shrink S = xA" + CLEAN: ("fwd", clean_l2(lambda: mm(x, A, out_dtype=dtype))),
        DROPPED_SHRINK: ("fwd", dropped_shrink),
        DROPPED_SHRINK + WIDE: ("fwd", on_64_bit_offsets(dropped_shrink)),
        "cuBLAS x @ A (peft's shrink)": ("fwd", lambda: x @ A),
        READ_X: ("fwd", lambda: x.sum(dtype=torch.float32)),
        SWEPT: ("fwd", gemm_sb),
        "GEMM with fused shrink": ("fwd", lambda: mm(x, W.t(), lowrank=(kernels.Shrink(A, 1.0, dtype), B), r_scale=2.0,
                                                   bias=b, out_dtype=dtype)),
        "layer forward, separate shrink": ("fwd", layer("0", False)),
        "layer forward, separate shrink" + CLEAN: ("fwd", clean_l2(layer("0", False))),
        "layer forward, fused shrink": ("fwd", layer("1", False)),
        AHEAD_FWD: ("fwd", layer("ahead", False)),
        "cuBLAS + addmm_ forward": ("fwd", lambda: torch.nn.functional.linear(x, W, b).addmm_(x @ A, B, alpha=2.0)),
        # backward pieces, against cuBLAS dX = dY W
        "cuBLAS dX = dY W (floor)": ("dx", lambda: dy @ W),
        "Triton dY W, no LoRA": ("dx", lambda: mm(dy, W, out_dtype=dtype)),
        "dS = dY Bᵀ, without the deep tiles": ("dx", without_deep_tiles(lambda: mm(dy, B.t(), out_dtype=dtype))),
        "dS = dY Bᵀ": ("dx", lambda: mm(dy, B.t(), out_dtype=dtype)),
        "dS = dY Bᵀ" + CLEAN: ("dx", clean_l2(lambda: mm(dy, B.t(), out_dtype=dtype))),
        "cuBLAS dY @ Bᵀ": ("dx", lambda: dy @ B.t()),
        READ_DY: ("dx", lambda: dy.sum(dtype=torch.float32)),
        "dX = dY W + α dS Aᵀ": ("dx", lambda: mm(dy, W, lowrank=(dS, A.t()), r_scale=2.0, out_dtype=dtype)),
        SEPARATE_DX: ("dx", lambda: (lambda dS_: (mm(dy, W, lowrank=(dS_, A.t()), r_scale=2.0, out_dtype=dtype), dS_))(
            mm(dy, B.t(), out_dtype=dtype))),
        AHEAD_DX: ("dx", lambda: mm(dy, W, lowrank=(kernels.Shrink(B.t(), 1.0, dtype, ahead=True), A.t()), r_scale=2.0,
                                    out_dtype=dtype)),
        DROPPED_DX: ("dx", dropped_dx),
        DROPPED_DX + WIDE: ("dx", on_64_bit_offsets(dropped_dx)),
        "dA = α xᵀ dS": ("dx", lambda: mm(x.t(), dS, scale=2.0, out_dtype=dtype)),
        "dB = α Sᵀ dY": ("dx", lambda: mm(S.t(), dy, scale=2.0, out_dtype=dtype)),
        "dA and dB, two launches, without the deep tiles": ("dx", without_deep_tiles(
            lambda: (mm(x.t(), dS, scale=2.0, out_dtype=dtype), mm(S.t(), dy, scale=2.0, out_dtype=dtype)))),
        "dA and dB, two launches": ("dx", lambda: (mm(x.t(), dS, scale=2.0, out_dtype=dtype),
                                                   mm(S.t(), dy, scale=2.0, out_dtype=dtype))),
        "dA and dB, one paired launch (the layer's)": ("dx", lambda: mm(x.t(), dS, scale=2.0, pair=(dy.t(), S),
                                                                       pair_scale=2.0, out_dtype=dtype)),
        "dA and dB, one paired launch (the layer's)" + CLEAN: ("dx", clean_l2(
            lambda: mm(x.t(), dS, scale=2.0, pair=(dy.t(), S), pair_scale=2.0, out_dtype=dtype))),
        "dA and dB, one paired launch, without the deep tiles": ("dx", without_deep_tiles(
            lambda: mm(x.t(), dS, scale=2.0, pair=(dy.t(), S), pair_scale=2.0, out_dtype=dtype))),
        "cuBLAS xᵀ @ dS and Sᵀ @ dY": ("dx", lambda: (x.t() @ dS, S.t() @ dy)),
        READ_X_DY: ("dx", lambda: (x.sum(dtype=torch.float32), dy.sum(dtype=torch.float32))),
        # whole steps, against the base layer's own forward+backward (dX only: the base is frozen)
        "base F.linear fwd+bwd (floor)": ("step", base_fwd_bwd),
        "layer fwd+bwd, separate shrink": ("step", layer("0", True)),
        "layer fwd+bwd, fused shrink": ("step", layer("1", True)),
        AHEAD_EAGER: ("step", layer("ahead", True)),
        "the layer's launches": ("step", composed(kernels.lora_matmul, *operands)),
        "the layer's launches, thin products on cuBLAS": ("step", composed(functional.torch_matmul, *operands)),
    } | graphs
    if not clean:
        rows = {name: row for name, row in rows.items() if not name.endswith(CLEAN)}
    if sweep:
        floor, swept, prefix, within = SWEEPS[sweep]
        kind, launch = rows[swept]
        # (and the swept launch's own twin, if it has one, to be checked against first)
        rows = {name: rows[name] for name in (floor, twin(swept), swept) if name is not None}
        for config, run, tuner_ms, picked in forced(launch, within):
            run.tuned = {"tuner_ms": tuner_ms, "picked": picked}  # (into the row: see main)
            rows[prefix + kernels.tile_name(config.all_kwargs())] = (kind, run)
    if device.type == "cuda":
        rows = {name: (kind, graphed(fn, device) if kind in GRAPHED_KINDS else fn) for name, (kind, fn) in rows.items()}
    return rows


# Each row of a new kernel variant and the row that computes the same thing the established way: its
# result must agree with that row's before it is timed (a miscompiled kernel must not be timed as a
# fast one: in the fourth H200 run, a variant since removed wrote NaN).
TWINS = {
    # (The fifth H200 run: the forward's GEMM 1.09-1.30× cuBLAS, dX's 0.94-1.02× but at 4096→1024;
    # the forward reads W through a transposed view, dX as stored. This row says how much of the gap
    # is the layout.)
    "the same, Wᵀ stored K×N (dX's layout of W)": "Triton GEMM + bias, no LoRA",
    "dA and dB, one paired launch (the layer's)": "dA and dB, two launches",
    # (the thin outputs' deep tiles are new too: checked against the candidates before them)
    "shrink S = xA": "shrink S = xA, without the deep tiles",
    "dS = dY Bᵀ": "dS = dY Bᵀ, without the deep tiles",
    "dA and dB, two launches": "dA and dB, two launches, without the deep tiles",
    "dA and dB, one paired launch, without the deep tiles": "dA and dB, two launches, without the deep tiles",
    "layer fwd+bwd, separate shrink, CUDA graph": "layer fwd+bwd, separate shrink, without the deep tiles, CUDA graph",
    # The thin products on cuBLAS (the NOTES' "thin products on cuBLAS?"), against the same launches
    # all on Triton, each called directly: "× twin" is what handing them to cuBLAS would change, host
    # time included in the eager row. The all-Triton rows, against the layer's step, check that the
    # composition is the layer's; in the eager row their "× twin" is what autograd and the layer's
    # own Python add to its launches.
    "the layer's launches": "layer fwd+bwd, separate shrink",
    "the layer's launches, thin products on cuBLAS": "the layer's launches",
    "the layer's launches, CUDA graph": "layer fwd+bwd, separate shrink, CUDA graph",
    "the layer's launches, thin products on cuBLAS, CUDA graph": "the layer's launches, CUDA graph",
}


# The forward's GEMM launch and dX's, and their rows forced to one config each (pieces' ``sweep``):
# each checked against the launch autotuned, and timed in turn with its cuBLAS floor.
SWEPT = "GEMM + SB + bias (S given)"
SWEEP_PREFIX = "GEMM + SB + bias, forced to "
SWEPT_DX = "dX = dY W + α dS Aᵀ"
SWEEP_DX_PREFIX = "dX = dY W + α dS Aᵀ, forced to "
SWEPT_THIN = "dS = dY Bᵀ"
SWEEP_THIN_PREFIX = "dS = dY Bᵀ, forced to "
# The forward sweep's configs: those the autotuner timed within this factor of its pick (at 8192
# tokens it keeps 26, most of them small tiles far behind; the contenders are the few within noise
# of it). dX's: its pick alone (1.0), before the persistent candidates. dS's: every candidate.
SWEEP_WITHIN = 1.25
# sweep -> (its floor's row, the launch autotuned, its forced rows' prefix, the factor)
SWEEPS = {"forward": ("cuBLAS F.linear (floor)", SWEPT, SWEEP_PREFIX, SWEEP_WITHIN),
          "dx": ("cuBLAS dX = dY W (floor)", SWEPT_DX, SWEEP_DX_PREFIX, 1.0),
          "thin": ("cuBLAS dY @ Bᵀ", SWEPT_THIN, SWEEP_THIN_PREFIX, float("inf"))}
_FORCED = tuple(prefix for _, _, prefix, _ in SWEEPS.values())

# Rows timed in turn with their kind's floor too (cuBLAS, or the base's step). Timed apart, a row's
# ratio to its floor moves with the GPU's clocks: in the fifth H200 run the plain GEMM came out
# 1.30 × cuBLAS at 4096→4096 (128x256x64 w8 s4 tma), its twin on candidates since removed 1.10,
# and the two timed alternately 0.99 × each other. These are the ratios the NOTES' conclusions
# rest on: the forward's GEMM and dX against cuBLAS, the whole step against the base's.
AGAINST_FLOOR = ("Triton GEMM + bias, no LoRA", "the same, Wᵀ stored K×N (dX's layout of W)", SWEPT,
                 "Triton dY W, no LoRA", "dX = dY W + α dS Aᵀ", "layer fwd+bwd, separate shrink, CUDA graph")


# LoRA dropout's two costliest launches (the layer's with dropout 0.1), each timed in turn with the
# same launch without dropout ("× 'that row', timed alternately"; not checked against it: they
# compute other numbers). In the fifth H200 run a step with dropout cost 0.2-0.4 ms more than one
# without at 8192 tokens (1.16-1.24 × the base, against 1.09-1.10), where peft's cost 0.06 ms more
# at 4096→4096. There dX's masked low-rank term needed a tile of its own beside the accumulator
# (255 registers a thread for a 128×256 tile on sm_90, against 174-223 without dropout); since
# version 21 it enters the accumulator before the K loop (still 255: the mask's hash), and three
# launches hash x's mask, since version 22 on 32-bit offsets (a sixth fewer instructions; the
# masked shrink's registers down by up to half, dX's wide tiles still 254-255).
DROPPED_SHRINK = "shrink S = x̃A, dropout 0.1 on x"
DROPPED_DX = "dX = dY W + α (dS Aᵀ ⊙ m), dropout 0.1"
IN_TURN = {DROPPED_SHRINK: "shrink S = xA", DROPPED_DX: "dX = dY W + α dS Aᵀ"}
# The thin products' memory traffic alone: PyTorch's sum of the operands each reads once (x for the
# shrink, dY for dS, both for the paired dA and dB; their outputs are a few KiB), each timed in turn
# with that launch. Timed alone, the sixth H200 run's shrink read x (64 MiB) at about 2.4 TB/s
# against the card's 4.2 TB/s copy (by the fit beside the CLEAN rows below, at the card's read rate
# but for the flush's write-back, which a sum pays too), and the thin products took 0.10 ms of the
# step at 4096→4096 (14% of the base's): a ratio near 1 says they are at the card's read rate, a
# low one how much of that is left.
READ_X = "torch sum of x (reads x once: the shrink's traffic)"
READ_DY = "torch sum of dY (reads dY once: dS's traffic)"
READ_X_DY = "torch sums of x and of dY (the paired dA and dB's traffic)"
IN_TURN.update({READ_X: "shrink S = xA", READ_DY: "dS = dY Bᵀ", READ_X_DY: "dA and dB, one paired launch (the layer's)"})
# Each also with the mask hashed on 64-bit offsets (on_64_bit_offsets), as before version 22: the
# same numbers, timed in turn with its twin ("× twin" is what the 32-bit offsets saved).
WIDE = ", 64-bit mask offsets"
TWINS.update({DROPPED_SHRINK + WIDE: DROPPED_SHRINK, DROPPED_DX + WIDE: DROPPED_DX})
# dA and dB on a second stream beside dX (composed's ``beside``), in turn with the same launches on
# one: whether the paired launch runs in SMs dX leaves idle (at most its 45 µs of the 0.86 ms step
# at 4096→4096, 5%; 14% at 4096→1024, 3% at the two large shapes).
BESIDE = "the layer's launches, dA and dB beside dX on a second stream, CUDA graph"
TWINS[BESIDE] = "the layer's launches, CUDA graph"
# Each also after an L2 flush that reads, not writes (clean_l2), checked against its twin after the
# timer's usual flush and, but for the layer's step (a kind of its own, timed in turn with the
# base's step after the same flush), timed in turn with it. The sixth H200 run's thin launches fit
# 3.75 µs + (bytes read + min(bytes read, 35 MiB)) / 4.29 TB/s within 1 µs (this package's, bar two
# misfits, and one cuBLAS row; cuBLAS's others within 3.4 µs but a pair of launches): as if each
# wrote back ~35 MiB of the flush's dirty lines as it read (a suspicion: the reads past 64 MiB fix
# only the slope; the thirty-eighth session). If so, these rows come out ~8.5 µs faster (less
# below 35 MiB read), F.linear's about the same (its GEMM hides the write-back), and the layer's
# step, which starts with the shrink where the base's starts with a GEMM, that much against the
# base's.
TWINS.update({name + CLEAN: name for name in ("shrink S = xA", "layer forward, separate shrink", "dS = dY Bᵀ",
                                              "dA and dB, one paired launch (the layer's)",
                                              "layer fwd+bwd, separate shrink, CUDA graph")})
TWINS["cuBLAS F.linear" + CLEAN] = "cuBLAS F.linear (floor)"
AGAINST_FLOOR += (CLEAN_STEP,)
# The shrink ahead (kernels.SHRINK_AHEAD, the thirty-ninth session): S inside the forward's GEMM
# launch and dS inside dX's, each computed once per row block by a shrink item ahead of that row
# block's tiles, which read it in their epilogue; x's (dY's) rows are read a second time from L2,
# and the shrink's and dS's launches are gone. Each against the same with the shrink separate,
# checked and timed in turn; the step from a CUDA graph also in turn with the base's. With LoRA
# dropout 0.1 (the mask drawn once per row block by the shrink items; dX's masked term then at
# the end, as with the fused shrink), in turn with the separate shrink's step (other masks: not
# checked against it).
AHEAD_FWD = "layer forward, shrink ahead"
SEPARATE_DX = "dS, then dX = dY W + α dS Aᵀ (two launches)"
AHEAD_DX = "dX = dY W + α dS Aᵀ with dS ahead (one launch, and its flags' memset)"
AHEAD_EAGER = "layer fwd+bwd, shrink ahead"
AHEAD_STEP = "layer fwd+bwd, shrink ahead, CUDA graph"
DROPPED_STEP = "layer fwd+bwd, dropout 0.1, separate shrink, CUDA graph"
DROPPED_STEP_AHEAD = "layer fwd+bwd, dropout 0.1, shrink ahead, CUDA graph"
TWINS.update({AHEAD_FWD: "layer forward, separate shrink", AHEAD_DX: SEPARATE_DX,
              AHEAD_EAGER: "layer fwd+bwd, separate shrink", AHEAD_STEP: "layer fwd+bwd, separate shrink, CUDA graph"})
IN_TURN[DROPPED_STEP_AHEAD] = DROPPED_STEP
AGAINST_FLOOR += (AHEAD_STEP,)


def twin(name):
    """The row whose result ``name``'s must match before it is timed, or None: a forced config's is
    the launch autotuned."""
    for _, swept, prefix, _ in SWEEPS.values():
        if name.startswith(prefix):
            return swept
    return TWINS.get(name)


def disagreement(got, want):
    """The largest relative Frobenius difference between two results (tensors, or tuples of them)."""
    pairs = zip(got, want) if isinstance(got, (tuple, list)) else [(got, want)]
    return max(rel_err(a, b) for a, b in pairs)


def alternate(shape_pieces, timed, timer, rounds=4, floor_rounds=2):
    """Each timed row of a new variant and its timed twin of the same kind again, in ``rounds``
    rounds of the two in turn (row, twin, then twin, row, ...: a steady drift then weighs on both
    alike): the ratio of their medians goes in the row as ``vs_twin``. Likewise each row of
    IN_TURN against its row there, as ``vs_other``, and each row of AGAINST_FLOOR or of the sweep
    against its kind's floor, in ``floor_rounds``, as ``vs_floor``.
    Rows timed apart drift with the GPU's clocks (on the H200 the base's own timings moved by up
    to 48% within one configuration), which must not decide which variant wins. Returns the errors
    of the pairs that failed."""
    floors = {}
    for name, (kind, _) in shape_pieces.items():
        floors.setdefault(kind, name)
    pairs = [(name, twin(name), "vs_twin", rounds) for name in shape_pieces]
    pairs += [(name, IN_TURN[name], "vs_other", rounds) for name in shape_pieces if name in IN_TURN]
    pairs += [(name, floors[kind], "vs_floor", floor_rounds) for name, (kind, _) in shape_pieces.items()
              if (name in AGAINST_FLOOR or name.startswith(_FORCED)) and name != floors[kind]]
    errors = []
    for name, other, field, n in pairs:
        if name not in timed or other not in timed or shape_pieces[name][0] != shape_pieces[other][0]:
            continue
        ms = {name: [], other: []}
        try:  # (one pair that fails must not cost the pairs after it)
            for i in range(n):
                for piece in (name, other) if i % 2 == 0 else (other, name):
                    fn = shape_pieces[piece][1]
                    ms[piece].append(time_row(timer, fn))
        except Exception as e:
            errors.append(f"'{name}' in turn with '{other}': {type(e).__name__}: {e}")
            continue
        timed[name][field] = statistics.median(ms[name]) / statistics.median(ms[other])
    return errors


def write(out, meta, rows, started):
    """variants.json and variants.md under `out`, rewritten after each piece."""
    meta = {**meta, "elapsed_s": round(time.perf_counter() - started, 1)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Kernel variants on {meta['card']}, {meta['date']}", "",
             f"{meta['dtype']}, {meta['tokens']} tokens, rank {meta['rank']}; torch {meta['torch']}, "
             f"triton {meta['triton']}; ratios are to the first row of each group (the floor) in the same run; "
             "the forward's and the backward's pieces (up to the first 'base F.linear fwd+bwd' row) each replayed "
             "from a CUDA graph on a GPU, the host's time out of them; "
             "config: the autotuner's choice for the piece's last launch; the result of each row of a new "
             "variant was compared with its twin's, named in the row, before it was timed (relative Frobenius "
             "difference), and, the two of one kind, timed again in turn, four rounds, for the ratio of their "
             "medians (× twin, timed alternately); some rows, and each 'forced to' one config, also in turn with "
             "their floor, two rounds (× floor, timed alternately); 'the autotuner's timing': its own median for "
             "that config, from which it made its pick."
             + (f" INCOMPLETE: {meta['stopped']}." if meta.get("stopped") else "")
             + "".join(f" {e}." for e in meta.get("errors", [])), "",
             f"Settings: {report.describe_settings(meta['settings'])}.", "",
             "| shape | piece | ms | × floor | config |", "|---|---|---:|---:|---|"]
    for r in rows:
        if r["ms"] is None:  # (the error on one line: a compiler's spans many, which would break the table)
            error = " ".join(str(r["error"]).split()).replace("|", "/")
            lines.append(f"| {r['shape']} | {r['piece']} | FAILED: {error[:400]} | | {r['config'] or ''} |")
        else:
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
            config = (r["config"] or "") + (" (the autotuner's pick)" if r.get("picked") else "")
            if r.get("tuner_ms") is not None:
                config += f"; the autotuner's timing: {r['tuner_ms']:.4f} ms"
            if r.get("differs") is not None:
                config += f"; differs from '{twin(r['piece'])}' by {r['differs']:.1e}"
            if r.get("vs_twin") is not None:
                config += f"; × twin, timed alternately: {r['vs_twin']:.3f}"
            if r.get("vs_other") is not None:
                config += f"; × '{IN_TURN[r['piece']]}', timed alternately: {r['vs_other']:.3f}"
            if r.get("vs_floor") is not None:
                config += f"; × floor, timed alternately: {r['vs_floor']:.3f}"
            config = config.removeprefix("; ")  # (a cuBLAS row has no config of its own)
            lines.append(f"| {r['shape']} | {r['piece']} | {r['ms']:.4f} | {ratio} | {config} |")
    with open(os.path.join(out, "variants.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def host_rows(pieces, time_one):
    """One row per host piece, as it is timed: its ms (``time_one(fn)``) and its ratio to the first
    piece's (F.linear's; none where that one failed: no other piece stands in for it)."""
    floor = None
    for i, (name, fn) in enumerate(pieces.items()):
        row = {"shape": "64→64", "piece": name, "ms": None, "ratio": None, "config": None}
        try:
            fn()
            row["ms"] = time_one(fn)
            if i == 0:
                floor = row["ms"]
            if floor is not None:
                row["ratio"] = row["ms"] / floor
        except Exception as e:  # one piece that fails must not hide the rest
            row["error"] = f"{type(e).__name__}: {e}"
        yield row


def host_pieces(dtype, device):
    """Pieces at a tiny shape (64×64, rank 16), where the GPU's work is a few µs a launch: their
    wall time per call, back to back, is the host's time to issue them."""
    g = torch.Generator(device=device).manual_seed(1)
    x, W, b, dy = (torch.randn(*s, generator=g, device=device).to(dtype) for s in [(64, 64), (64, 64), (64,), (64, 64)])
    A, B = (torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_() for s in [(64, 16), (16, 64)])
    x.requires_grad_()

    def base():
        torch.autograd.grad(torch.nn.functional.linear(x, W, b), [x], dy)

    def layer():
        torch.autograd.grad(lora_kernels.lora_linear(x, W, b, A, B, 2.0), [x, A, B], dy)

    def launch():
        kernels.lora_matmul(x.detach(), W.t(), out_dtype=dtype, dot_dtype=dtype)

    operands = (x.detach(), W, b, A.detach(), B.detach(), dy, dtype)
    return {"F.linear fwd+bwd, host (floor)": base, "layer fwd+bwd, host": layer,
            # (the shrink in launches of its own, as at 4096→4096: five launches a step; ahead: three,
            # and a flag memset in each pass)
            "layer fwd+bwd, separate shrink, host": switched(layer, "FUSE_SHRINK", "0", functional),
            "layer fwd+bwd, shrink ahead, host": switched(layer, "FUSE_SHRINK", "ahead", functional),
            "the layer's launches, host": composed(kernels.lora_matmul, *operands),
            "the layer's launches, thin products on cuBLAS, host": composed(functional.torch_matmul, *operands),
            "layer fwd+bwd, host, Triton's dispatch (no direct launch)": tritons_dispatch(layer),
            "one kernel launch, host": launch,
            "one kernel launch, host, Triton's dispatch": tritons_dispatch(launch)}


@contextlib.contextmanager
def _no_direct_launch():
    previous, kernels.FAST_LAUNCH = kernels.FAST_LAUNCH, False
    try:
        yield
    finally:
        kernels.FAST_LAUNCH = previous


def tritons_dispatch(fn):
    """fn with every launch through Triton's own dispatch (kernels.FAST_LAUNCH off)."""
    def run():
        with _no_direct_launch():
            fn()
    return run


def host_ms(fn, device, calls=300):
    """Wall milliseconds per call over many calls issued back to back (one sync at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def _some_shapes(text):
    """KxN,... as a list of (K, N); "" for none."""
    return _shapes(text) if text.strip() else []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_shapes, default=_shapes(DEFAULT_SHAPES), help="KxN,...")
    parser.add_argument("--sweep", type=_some_shapes,
                        help="KxN,... where the forward's GEMM launch is also timed forced to each config the "
                             f"autotuner timed near its pick, and to each persistent one (default: those of "
                             f"{DEFAULT_SWEEP} among --shapes; none: --sweep '')")
    parser.add_argument("--sweep-dx", type=_some_shapes,
                        help="KxN,... where dX's launch is also timed forced to its pick and to each "
                             "persistent config (default: those of "
                             f"{DEFAULT_SWEEP_DX} among --shapes; none: --sweep-dx '')")
    parser.add_argument("--sweep-thin", type=_some_shapes,
                        help="KxN,... where the thin product dS = dY Bᵀ is also timed forced to each "
                             f"candidate config (default: those of {DEFAULT_SWEEP_THIN} among --shapes; "
                             "none: --sweep-thin '')")
    parser.add_argument("--clean-l2", type=_some_shapes,
                        help="KxN,... where a few rows are also timed after an L2 flush that reads (CLEAN; "
                             f"default: those of {DEFAULT_CLEAN} among --shapes; none: --clean-l2 '')")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default bf16 on a GPU, fp16 off one (Triton's interpreter computes bf16 wrong)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    for option, default in (("sweep", DEFAULT_SWEEP), ("sweep_dx", DEFAULT_SWEEP_DX),
                            ("sweep_thin", DEFAULT_SWEEP_THIN), ("clean_l2", DEFAULT_CLEAN)):
        if getattr(args, option) is None:  # (not given: its default shapes among --shapes)
            setattr(args, option, [shape for shape in _shapes(default) if shape in args.shapes])
    device = torch.device(args.device)
    if device.type != "cuda" and not kernels.INTERPRET:
        parser.error("the kernels need a CUDA device (or TRITON_INTERPRET=1 for a code check)")
    if device.type != "cuda" and args.dtype == "bf16":  # (the rows would agree or not by the interpreter's bf16)
        parser.error("Triton's interpreter computes bf16 wrong: off a GPU use --dtype fp16 or fp32")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp16")
    dtype = DTYPES[args.dtype]
    os.environ["LORA_KERNELS_BACKEND"] = "triton"
    timer = Timer(device, warmup_ms=10, rep_ms=40) if device.type == "cuda" else None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} (interpreter)"
    rows, started = [], time.perf_counter()
    meta = {"card": card, "date": time.strftime("%Y-%m-%d"), "tokens": args.tokens, "rank": args.rank,
            "dtype": args.dtype, "torch": torch.__version__, "triton": triton.__version__,
            "settings": report.settings()}
    signal.signal(signal.SIGTERM, _stop)  # a timeout still leaves the pieces done so far
    # (Written after every piece, and whatever ends the run: a piece that hangs the GPU, which a
    # SIGTERM cannot interrupt and the SIGKILL after it ends, loses only itself.)
    try:
        time_one = (lambda fn: host_ms(fn, device)) if timer else (lambda fn: float("nan"))
        for row in host_rows(host_pieces(dtype, device), time_one):
            rows.append(row)
            write(args.out, meta, rows, started)
            print(f"64→64  {row['piece']:34s} " + (row["error"] if row["ms"] is None else f"{row['ms']:9.4f} ms"
                  + (f"  ×{row['ratio']:.3f}" if row["ratio"] is not None else "")), flush=True)
        # The sweeps' rows last, a pass of their own: each runs a config the autotuner would not pick,
        # and one that faults would take the CUDA context, and every reading after it, with it.
        passes = [(K, N, None) for K, N in args.shapes] + [(K, N, "forward") for K, N in args.sweep]
        passes += [(K, N, "dx") for K, N in args.sweep_dx] + [(K, N, "thin") for K, N in args.sweep_thin]
        for K, N, sweep in passes:
            floors, results, timed = {}, {}, {}
            try:
                clean = sweep is None and (K, N) in args.clean_l2
                shape_pieces = pieces(K, N, args.tokens, args.rank, dtype, device, sweep, clean)
                twins = {twin(name) for name in shape_pieces}  # (the rows whose results others are checked against)
            except Exception as e:  # (its setup launches kernels too)
                rows.append({"shape": f"{K}→{N}", "piece": "setup", "ms": None, "ratio": None, "config": None,
                             "error": f"{type(e).__name__}: {e}"})
                continue
            for name, (kind, fn) in shape_pieces.items():
                row = {"shape": f"{K}→{N}", "piece": name, "ms": None, "ratio": None, "config": None,
                       **getattr(fn, "tuned", {})}
                try:
                    kernels._lora_matmul_kernel.best_config = None
                    with _no_direct_launch():  # (a direct launch would leave best_config unset)
                        fn()  # compile and autotune outside the timing
                    # The tile config the autotuner chose for the piece's last launch (none: cuBLAS).
                    best = kernels._lora_matmul_kernel.best_config
                    row["config"] = None if best is None else kernels.tile_name(best.all_kwargs())
                    result = fn()  # checked as timed: the compiled kernels called directly, or the graph replayed
                    if name in twins:
                        results[name] = result
                    if twin(name) is not None:
                        if twin(name) not in results:
                            raise RuntimeError(f"unchecked: '{twin(name)}' has no result to compare with")
                        row["differs"] = disagreement(result, results[twin(name)])
                        if not row["differs"] <= tolerance(dtype, device):  # (`not <=` also catches NaN)
                            raise RuntimeError(f"WRONG: differs from '{twin(name)}' by {row['differs']:.1e}")
                    del result
                    row["ms"] = time_row(timer, fn) if timer else float("nan")
                except Exception as e:  # one piece that fails (to compile, say) must not hide the rest
                    row["error"] = f"{type(e).__name__}: {e}"
                    best = kernels._lora_matmul_kernel.best_config  # (the config it failed with, if one was chosen)
                    row["config"] = row["config"] or (None if best is None else kernels.tile_name(best.all_kwargs()))
                if row["ms"] is not None:
                    timed[name] = row
                floors.setdefault(kind, row["ms"])  # the first row of each kind is its floor
                if row["ms"] is not None and floors[kind] is not None:  # (no ratios if the floor failed)
                    row["ratio"] = row["ms"] / floors[kind]
                rows.append(row)
                write(args.out, meta, rows, started)
                print(f"{K}→{N:<6} {name:34s} " + (f"{row['ms']:9.4f} ms  ×{row['ratio'] or float('nan'):.3f}"
                                                  if row["ms"] is not None else row["error"]), flush=True)
            if timer:  # (the rows stand without the ratios of pairs that failed)
                failed = alternate(shape_pieces, timed, timer)
                meta.setdefault("errors", []).extend(f"{K}→{N} alternate: {e}" for e in failed)
    except Stopped as e:
        meta["stopped"] = str(e)
    except Exception as e:  # anything else: said, and what was measured is still written
        meta["stopped"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        write(args.out, meta, rows, started)
    print(f"wrote {args.out}/variants.md and variants.json in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
