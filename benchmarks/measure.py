"""Measurement, in one place: inputs, the float64 check, timing, memory, and FLOP counting.

Every provider goes through the same steps: one untimed, unchecked forward+backward by the caller
(the first call, which compiles and autotunes, so nothing of that reaches the check or the
timings), ``check`` (output and gradients against float64, on the path the timed calls take),
``memory`` (one forward+backward with the saved tensors counted), then ``Timer`` once per mode.
"""

import math
import statistics
import time

import torch

from lora_kernels import functional
from lora_kernels.reference import lora_linear_reference

from .providers import Layer

MODES = ("forward", "backward", "forward+backward")

# Relative Frobenius error ‖got − ref‖ / ‖ref‖ allowed against float64, per dtype. fp32 on a GPU may
# run on TF32 tensor cores (about 3e-4 expected), hence the looser GPU figure.
TOLERANCES = {torch.float32: {"cpu": 1e-4, "cuda": 5e-3}, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# Rotate through enough input copies that together they exceed the caches (an H100 has 50 MB of L2),
# so small shapes are not timed on cache-resident data; at least 2, at most 8 copies.
ROTATE_BYTES = 256 * 2**20
MAX_COPIES = 8

GRAD_NAMES = {"x": "dX", "W": "dW", "b": "db", "A": "dA", "B": "dB"}


def tolerance(dtype, device):
    tol = TOLERANCES[dtype]
    return tol[device.type if device.type in tol else "cuda"] if isinstance(tol, dict) else tol


def flop_count(M, K, N, rank, mode, *, lora, trainable_base):
    """FLOPs of one step, counting each product as 2·m·n·k (bias and elementwise work not counted).

    forward:  base 2MKN (x Wᵀ), LoRA 2Mr(K+N) (x A, then S B)
    backward: base 2MKN for dX, + 2MKN for dW when the base trains;
              LoRA 4Mr(K+N): dS = dY Bᵀ (2MNr), dS Aᵀ (2MrK), dA = xᵀ dS (2MKr), dB = Sᵀ dY (2MrN)
    `base` is counted without the LoRA terms: each provider is credited with the work its layer defines,
    never with extra passes it makes.
    """
    forward, backward = functional.flops(M, K, N, rank if lora else 0, (True, trainable_base, False, lora, lora))
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


# --- inputs ---------------------------------------------------------------------------------------


def make_inputs(M, K, N, *, dtype, device, generator=None):
    """Copies of fresh random (x, dY), never zeros; x is a leaf requiring grad, as a layer input is.

    Drawn on the device itself (the generator must live there): the GPU sweep needs billions of
    random numbers, which would take the CPU longer than the timing.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (itemsize * M * (K + N)))))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    xs = [randn(M, K).requires_grad_() for _ in range(copies)]
    dys = [randn(M, N) for _ in range(copies)]
    return xs, dys


def _trained(layer, x):
    """(names, tensors) autograd differentiates for this layer: x, then the trained parameters."""
    names, tensors = ["x"], [x]
    for name, t in layer.params.items():
        if t is not None and t.requires_grad:
            names.append(name)
            tensors.append(t)
    return names, tensors


def forward_backward(layer, x, dy):
    """One training step of the layer: y and {"dX": ..., "dA": ...} in the seed's layout."""
    names, tensors = _trained(layer, x)
    y = layer.fn(x)
    grads = torch.autograd.grad(y, tensors, dy)
    out = {"out": y}
    for name, g in zip(names, grads):
        out[GRAD_NAMES[name]] = g.t() if name in layer.transposed else g
    return out


# --- correctness ----------------------------------------------------------------------------------


def expected(weights, x, dy, *, lora, keep=None, dropout=0.0):
    """The float64 answer from the same (already rounded) inputs: the seed's formula, or F.linear;
    with a LoRA-dropout keep mask, ``F.linear(x, W, b) + alpha · ((x ⊙ keep / (1 − p)) A) B``."""
    def up(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    W, b, A, B = (up(t) for t in (weights.W, weights.b, weights.A, weights.B))
    params = {"W": W, "b": b, "A": A, "B": B} if lora else {"W": W, "b": b}

    def fn(x64):
        if lora and keep is not None:
            dropped = x64 * keep / (1 - dropout) if dropout < 1 else x64 * 0  # p = 1 drops the LoRA term
            return torch.nn.functional.linear(x64, W, b) + weights.alpha * (dropped @ A @ B)
        if lora:
            return lora_linear_reference(x64, W, b, A, B, weights.alpha)
        return torch.nn.functional.linear(x64, W, b)

    return {k: v.detach() for k, v in forward_backward(Layer(fn, params), up(x), dy.double()).items()}


def rel_err(got, ref):
    """‖got − ref‖ / ‖ref‖; NaN if got has a NaN. A reference of zeros (dA and dB when dropout
    drops every element) gives 0 for zeros and infinity for anything else, not 0/0."""
    got, ref = got.detach().double(), ref.detach().double()
    diff, norm = torch.linalg.vector_norm(got - ref).item(), torch.linalg.vector_norm(ref).item()
    if norm == 0:
        return 0.0 if diff == 0 else diff * math.inf  # (NaN stays NaN)
    return diff / norm


def worst(errors):
    """The largest of ``errors`` (a dict of relative errors), NaN if any is NaN: ``max`` alone keeps
    the first value it meets when a later one is NaN, so a NaN gradient would pass a check."""
    values = list(errors.values())
    return math.nan if any(v != v for v in values) else max(values)


def check(layer, x, dy, ref):
    """{"out": err, "dX": err, ...}: relative Frobenius errors of the output and every gradient."""
    got = forward_backward(layer, x, dy)
    if set(got) != set(ref):
        raise RuntimeError(f"gradients {sorted(got)} do not match the expected {sorted(ref)}")
    return {k: rel_err(got[k], ref[k]) for k in ref}


# --- memory ---------------------------------------------------------------------------------------


def memory(layer, x, dy):
    """(peak bytes, saved bytes, saved activation bytes) over one forward+backward.

    peak: torch.cuda.max_memory_allocated during the step minus what was allocated before it
    (weights, inputs), i.e. what the layer needs on top; None on CPU, which has no such counter.
    saved: sizes of the tensors autograd keeps for backward, each storage counted once (x and S are
    often saved by several nodes); the activation figure leaves out the layer's own parameters,
    which stay in memory whether or not they are saved.
    """
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    params = {t.untyped_storage().data_ptr() for t in layer.params.values() if t is not None}
    tensors = _trained(layer, x)[1]
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.fn(x)
    grads = torch.autograd.grad(y, tensors, dy)
    peak = None
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    del y, grads
    saved = sum(storages.values())
    activations = sum(n for ptr, n in storages.items() if ptr not in params)
    return peak, saved, activations


# --- timing ---------------------------------------------------------------------------------------


def mode_step(layer, mode, xs, dys):
    """(setup, step) for one mode: ``step(setup())`` is one iteration, and only ``step`` is timed.

    The setup picks the next input copy (rotation) and, for the backward alone, runs the forward
    that builds the graph, so the timed backward consumes a fresh graph like in training (no
    retain_graph, which torch.compile's donated buffers forbid anyway).
    """
    state = {"i": 0}

    def pick():
        i = state["i"] = (state["i"] + 1) % len(xs)
        return xs[i], dys[i]

    if mode == "forward":
        return pick, lambda xy: layer.fn(xy[0])

    if mode == "backward":
        def setup():
            x, dy = pick()
            return layer.fn(x), _trained(layer, x)[1], dy

        return setup, lambda s: torch.autograd.grad(s[0], s[1], s[2])

    if mode == "forward+backward":
        def step(xy):
            x, dy = xy
            return torch.autograd.grad(layer.fn(x), _trained(layer, x)[1], dy)

        return pick, step

    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def ceilings(device, timer):
    """This card's two ceilings, measured (datasheet rates are only leads): device copy
    bandwidth, counting bytes read plus written, and the bf16 GEMM rate on random 8192³ operands."""
    n = 8192
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: None, lambda _: dst.copy_(src))[0]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = timer(lambda: None, lambda _: a @ b)[0]
    del src, dst, a, b
    return {"copy_tb_s": 2 * 2**30 / copy_ms / 1e9, "bf16_tflops": 2 * n**3 / gemm_ms / 1e9,
            "copy_ms": copy_ms, "gemm_ms": gemm_ms}


class Timer:
    """Median milliseconds of ``step(setup())`` after a warm-up, on CUDA events or perf_counter.

    The budget is wall time: an estimate from a few iterations sets how many warm-up and timed
    iterations fit in warmup_ms and rep_ms (as triton.testing.do_bench does), at least 5 timed.
    On CUDA the L2 cache is also flushed before each timed call, like do_bench, so the weights
    arrive cold as they do in a model where every layer has its own: by writing a buffer, as
    do_bench does, or with ``clean_l2`` by reading it (``_flush_l2``).
    """

    def __init__(self, device, *, warmup_ms, rep_ms):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None
        self.spent_s = 0.0  # wall time inside the timer, to tell timing from the rest of the sweep
        self.spread = None  # (20th, 80th percentile) ms of the last measurement's timed runs

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, setup, step, *, clean_l2=False):
        started = time.perf_counter()
        try:
            return self._measure(setup, step, clean_l2)
        finally:
            self.spent_s += time.perf_counter() - started

    def _flush_l2(self, clean):
        # Written (zero_, as do_bench flushes), the buffer's last lines stay in the L2 cache dirty,
        # for the timed call to write back to memory as its own reads evict them: about 8.5 µs
        # for a thin launch reading past ~35 MiB, if a fit to the sixth H200 run's thin launches
        # reads them right (benchmarks/NOTES.md, thirty-eighth session; the variants' CLEAN rows
        # measure it), hidden under a GEMM's compute. Read, it leaves clean lines, which cost
        # nothing to evict. (Summed as int64s: wider loads than its int8s.)
        if clean:
            self._flush.view(torch.int64).sum()
        else:
            self._flush.zero_()

    def _measure(self, setup, step, clean_l2):
        def one():  # an untimed iteration, costed like a timed one
            state = setup()
            if self.cuda:
                self._flush_l2(clean_l2)
            step(state)

        self._sync()
        t0 = time.perf_counter()
        for _ in range(3):
            one()
        self._sync()
        per_iter_ms = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)
        for _ in range(max(1, min(1000, round(self.warmup_ms / per_iter_ms)))):
            one()
        reps = max(5, min(1000, round(self.rep_ms / per_iter_ms)))
        times = self._cuda_times(setup, step, reps, clean_l2) if self.cuda else self._cpu_times(setup, step, reps)
        cuts = statistics.quantiles(times, n=5, method="inclusive")  # the 20th, ..., 80th percentiles (reps >= 5)
        self.spread = (cuts[0], cuts[-1])
        return statistics.median(times), reps

    def _cuda_times(self, setup, step, reps, clean_l2):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            state = setup()
            self._flush_l2(clean_l2)
            start.record()
            step(state)
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def _cpu_times(self, setup, step, reps):
        times = []
        for _ in range(reps):
            state = setup()
            t0 = time.perf_counter()
            step(state)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
