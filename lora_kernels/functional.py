"""``lora_linear``: input checks, backend choice, the two custom ops and their autograd, the PyTorch
path (``torch_matmul``) and the FLOP formulas.

The math, with S kept as the only saved intermediate (M × r), and x̃ = x ⊙ m the
LoRA-dropout input (m the keep mask, q = 1 / (1-p); without dropout m = 1, q = 1):

    S  = q · x̃ A                     dS = c · dY Bᵀ
    y  = x Wᵀ + alpha · S B + b      dX = dY W + t · (dS Aᵀ) ⊙ m
                                     dA = t · x̃ᵀ dS,   dB = alpha · Sᵀ dY
                                     dW = dYᵀ x,   db = Σ_M dY    (only when the base trains)

with c · t = alpha · q and c = |alpha| held to [2^-8, 1] (``_dS_scale``). S is the reference's
own (dropped-out) x A, and dS, for 2^-8 <= |alpha| < 1 (peft's lora_alpha / r), the reference's own
alpha · dY Bᵀ up to its sign, or free of alpha where alpha would enlarge it: then a 16-bit dS
overflows only where the reference's dS and the unscaled dY Bᵀ both would. The rest of alpha
enters in fp32 inside the kernel, on B's and Aᵀ's tiles before their cast (in fp16, on the
accumulators of y and dX instead: ``sum_scale``, see ``kernels``) and on dA's and dB's
accumulators (``scale``, ``pair_scale``), so no alpha overflows anything in fp16 that the
reference's own order of operations keeps in range (up to 2^77, for alpha · q in dX under
dropout, and short of alpha · B past fp32's range: see ``kernels``). At the other end, for 2^-8 <= |alpha| < 1 a 16-bit dS turns subnormal where the reference's does (a
GradScaler's loss scale lifts both), where an unscaled one kept 1/|alpha| more range below.

Every product above is one call of ``kernels.lora_matmul`` or its twin ``torch_matmul`` (dA and
dB one call together; S inside y's call and dS inside dX's where ``fuse_shrink`` says; db a sum):
the Triton kernel or the same contract in PyTorch; the mask is never stored, each product
regenerates it from the seed. Forward and backward are registered as
custom ops (``lora_kernels::lora_linear_fwd`` / ``_bwd``) with shape functions and autograd, so
``torch.compile`` keeps them whole, with no graph break, on both backends. Eager mode runs the same
two functions, context and gradients through a plain ``autograd.Function`` instead: the custom-op
dispatcher costs more host time per call than the layer's launches (benchmarks/NOTES.md). Under
``no_grad`` the forward function runs alone.

Precision: products run in the activations' dtype (``x.dtype``), adapters included (peft keeps
fp32 adapters beside bf16 weights), and accumulate in fp32 (fp64 for fp64); S and dS are stored
in that dtype too (every product that reads them casts to it anyway), and gradients come back in
each parameter's own dtype.
"""

import contextlib
import math
import numbers
import os
import re
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, is_fake
from torch.utils.flop_counter import register_flop_formula

try:  # triton is a Linux-only dependency; elsewhere the PyTorch path serves every call
    from . import kernels
    _NO_KERNELS = None
except ImportError as error:  # no triton, or one older than the kernels need (3.6)
    kernels = None
    _NO_KERNELS = f"the Triton kernels cannot be imported ({error})"

BACKENDS = ("auto", "triton", "torch")
# What the kernels compute in (float8 and other floating types have no accumulation path here).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The tensor types that are no subclass: the kernels may read their storage.
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
# What the modules fuse: those, and fake ones standing for them (a memory estimator's model, or
# torch.export's, by default not strict), which lora_linear sends to the ops' shape functions, as
# torch.compile's are. (Not any subclass with fake tensors inside: a quantized weight's.)
FUSABLE_TENSORS = PLAIN_TENSORS + (FakeTensor,)


def torch_keep_mask(rows, cols, si, sj, seed, p, device):
    """LoRA-dropout keep mask on the PyTorch path: element (i, j) is entry i·si + j·sj of one
    stream drawn from ``seed`` (an int, or a 0-d tensor on the CPU), so forward and backward (which
    index it differently) agree."""
    numel = (rows - 1) * si + (cols - 1) * sj + 1 if rows and cols else 0
    g = torch.Generator(device=device).manual_seed(int(seed))
    return (torch.rand(numel, generator=g, device=device) >= p).as_strided((rows, cols), (si, sj))


def keep_mask(rows, cols, seed, p, device, backend):
    """The (rows, cols) keep mask that a dropout call drawing ``seed`` applies to its x on this
    backend, for tests and the benchmark's check (the layer's calls never call this: the kernels
    draw the mask per tile, ``torch_matmul`` per product)."""
    if backend == "triton":
        return kernels.keep_mask(rows, cols, seed, p, device)
    return torch_keep_mask(rows, cols, cols, 1, seed, p, device)


def _through(t, *dtypes):
    """``t.to(d1).to(d2)...``, skipping each cast that changes nothing: an unneeded ``to`` still costs
    a dispatch (about 1 µs of host time), and a layer step on this path made some forty."""
    for dtype in dtypes:
        if t.dtype != dtype:
            t = t.to(dtype)
    return t


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default  # (the overload itself: the packet's lookup costs host time)


def torch_matmul(x, w, *, scale=1.0, lowrank=None, r_scale=1.0, bias=None, dropout=None, pair=None, pair_scale=1.0,
                 out_dtype, dot_dtype, out_shape=None):
    """PyTorch twin of ``kernels.lora_matmul``: same contract (its RNG stream differs). In-place
    ``addmm`` keeps it to one output buffer, as the kernel does."""
    if pair is not None:
        assert lowrank is None and bias is None, "a paired launch runs plain products"
        x2, w2 = pair
        return (torch_matmul(x, w, scale=scale, dropout=dropout, out_dtype=out_dtype, dot_dtype=dot_dtype),
                torch_matmul(w2.t(), x2.t(), scale=pair_scale, out_dtype=out_dtype, dot_dtype=dot_dtype))
    if dropout is not None:
        where, seed, p, si, sj = dropout
        shape = x.shape if where == "x" else (x.shape[0], w.shape[1])
        keep = torch_keep_mask(*shape, si, sj, seed, p, x.device)
        if where == "x":
            x = x * keep
    # Operands rounded to dot_dtype, as the kernel's tensor cores read them, and the product formed
    # in the output's dtype where that is wider, as the kernel writes its fp32 accumulator: fp32
    # adapters' gradients beside a 16-bit base (token sums past fp16's 65504) stay finite.
    acc = torch.promote_types(dot_dtype, out_dtype)
    x, w = _through(x, dot_dtype, acc), _through(w, dot_dtype, acc)
    if bias is not None:
        out = torch.addmm(_through(bias, dot_dtype, acc), x, w, alpha=scale)
    else:
        # (scale through addmm's own factor, on the sum before its rounding to a 16-bit dtype: mm
        # then mul_ overflowed fp16 where the scaled product fitted, as the kernel's does not.)
        out = torch.mm(x, w) if scale == 1.0 else torch.addmm(x.new_empty(()), x, w, beta=0, alpha=scale)
    if lowrank is not None:
        # r_scale through the GEMM's own factor, on its fp32 sum (the kernel's fp16 path does the
        # same, sum_scale): never on R rounded to a 16-bit dtype, where a large one overflowed fp16
        # while the product fitted.
        low_x, low_w = (_through(t, dot_dtype, out.dtype) for t in lowrank)
        if dropout is not None and where == "lowrank":
            out.add_(torch.addmm(out.new_zeros(()), low_x, low_w, beta=0, alpha=r_scale) * keep)
        else:
            out.addmm_(low_x, low_w, alpha=r_scale)
    out = _through(out, out_dtype)
    # _unsafe_view, as aten's own matmul does: a reshape would hand out a view of a temporary, and an
    # in-place op on a view-typed output trips FSDP2's hooks.
    return out if out_shape is None else _UNSAFE_VIEW(out, out_shape)


# The fused shrink saves a launch (host time) and costs redundant rank-r MMAs in every column
# block (GPU time, growing with the product). On the H200 (benchmarks/NOTES.md, second run, 8192
# tokens, rank 16) it won at M·N·K = 2^35 (4096→1024: forward+backward 0.88 against 1.16 ms in
# eager mode, 0.28 against 0.30 under a CUDA graph); from 2^37 up it lost 2-9% under a CUDA graph
# and 4-11% in the eager forward. With LoRA dropout on x it would also draw the mask once per
# column block instead of once: forward+backward took 4.5-5.9× the base's time.
FUSE_MAX_MNK = 2**36
# LORA_KERNELS_FUSE_SHRINK=1 or 0 forces either placement; =ahead takes a third, in the big
# product's launch but once per row block (kernels.SHRINK_AHEAD: no redundant MMAs, no launch of
# its own, and under dropout on x the mask drawn once), not yet measured on a GPU (benchmarks/NOTES.md,
# thirty-ninth session). Read at import, as the kernels' other switches are: reading the
# environment on every call cost about 2% of a layer step's host time.
FUSE_SHRINK = os.environ.get("LORA_KERNELS_FUSE_SHRINK", "auto").strip().lower() or "auto"
if FUSE_SHRINK not in ("auto", "0", "1", "ahead"):  # (a typo, "true" say, would otherwise mean auto without a word)
    raise ValueError(f"LORA_KERNELS_FUSE_SHRINK must be auto, 0, 1 or ahead, not {FUSE_SHRINK!r}")


def fuse_shrink(x, w, A, dropout):
    """Where the Triton path computes the shrink: None for a launch of its own, ``"loop"`` inside
    the big product's K loop, ``"ahead"`` in its launch, once per row block. ``auto`` chooses
    between the first two by the rule above; ``FUSE_SHRINK`` ``1``, ``0`` and ``ahead`` force each,
    for ranks up to ``kernels.FUSE_MAX_RANK`` (the whole rank is held in one block)."""
    if FUSE_SHRINK == "0" or A.shape[1] > kernels.FUSE_MAX_RANK:
        return None
    if FUSE_SHRINK == "ahead":
        return "ahead"
    if FUSE_SHRINK == "1":
        return "loop"
    fused = (dropout is None or dropout[0] != "x") and x.shape[0] * x.shape[1] * w.shape[1] < FUSE_MAX_MNK
    return "loop" if fused else None


def shrink_expand(backend, x, w, A, R, s_scale, r_scale, *, bias=None, dropout=None, dtype, out_shape):
    """``(x w + r_scale · L R + bias, L)`` with ``L = s_scale · x̃ A``, the first in ``out_shape`` (the
    caller's leading dimensions): y with S in the forward, dX with dS in the backward. The Triton
    path may compute L in the big product's launch (``fuse_shrink``): inside its K loop (one pass
    over x, at the cost of redundant rank-r MMAs in every column block), or ahead of each row
    block's tiles (kernels.SHRINK_AHEAD); otherwise L is its own small product first. L is stored
    in ``dtype``, the products' own."""
    place = fuse_shrink(x, w, A, dropout) if backend == "triton" else None
    if place is not None:
        return kernels.lora_matmul(x, w, lowrank=(kernels.Shrink(A, s_scale, dtype, place == "ahead"), R),
                                   r_scale=r_scale, bias=bias, dropout=dropout, out_dtype=dtype, dot_dtype=dtype,
                                   out_shape=out_shape)
    matmul = kernels.lora_matmul if backend == "triton" else torch_matmul
    on_x = dropout if dropout is not None and dropout[0] == "x" else None
    L = matmul(x, A, scale=s_scale, dropout=on_x, out_dtype=dtype, dot_dtype=dtype)
    out = matmul(x, w, lowrank=(L, R), r_scale=r_scale, bias=bias, dropout=None if on_x else dropout,
                 out_dtype=dtype, dot_dtype=dtype, out_shape=out_shape)
    return out, L


def _read_torch_below(text):
    # (ASCII digits only, as int() would take others; and no 9**999999999 to compute)
    match = re.fullmatch(r"\s*([0-9]{1,40})\s*(?:\*\*\s*([0-9]{1,3})\s*)?", text)
    if not match:
        raise ValueError("LORA_KERNELS_TORCH_BELOW must be a whole number of multiply-adds (M·N·K), "
                         f"such as 137438953472 or 2**37, not {text!r}")
    return int(match[1]) ** int(match[2] or 1)


# Eager calls on CUDA whose product has fewer multiply-adds than this (M·N·K: tokens × in × out
# features) take the PyTorch path: in a small step the host's time, not the GPU's, sets the pace,
# and cuBLAS calls may cost the host less than Triton launches. Compiled and traced calls keep
# the kernels (the choice would be fixed in the graph, at one size), as do calls captured in a
# CUDA graph, whose replays cost no host time per launch.
# LORA_KERNELS_TORCH_BELOW sets it; 0, the default, keeps every CUDA call on the kernels: on an
# H200's host a training step cost the same on either path, and only a forward under no_grad less
# (benchmarks/NOTES.md, fifth GPU run).
TORCH_BELOW = _read_torch_below(os.environ.get("LORA_KERNELS_TORCH_BELOW", "0"))


def _host_bound(x, out_features):
    """Whether an eager CUDA call is small enough (``TORCH_BELOW``) for the PyTorch path. Never a
    traced or fake call (``_through_ops``: its choice would be baked into the graph, whatever the
    size it later runs at). (A checkpointed layer's recompute chooses again: the same choice, at
    the same size, unless one of the two runs in CUDA graph capture, where the dropout masks of
    the two paths, drawn from one seed, would differ.)"""
    return (TORCH_BELOW > 0 and out_features is not None and not _through_ops(x)
            and x.numel() * out_features < TORCH_BELOW and not torch.cuda.is_current_stream_capturing())


def backend_setting():
    """``LORA_KERNELS_BACKEND``: auto, triton or torch. Unlike the other switches, read on every
    call: the benchmarks and tests set it around single calls (benchmarks.providers.torch_path),
    and a running model can be switched to the PyTorch path (docs/usage.md says so)."""
    choice = os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def select_backend(x, adapter_dtype, out_features=None):
    """'triton' or 'torch' for these inputs (x: (..., in_features); the layer's ``out_features``),
    honouring ``LORA_KERNELS_BACKEND`` and, under ``auto``, ``TORCH_BELOW``."""
    choice = backend_setting()
    if choice == "torch" or kernels is None:
        if choice == "triton":
            raise RuntimeError(f"LORA_KERNELS_BACKEND=triton but {_NO_KERNELS}")
        # Never a silent fall back to the unfused path (but torch.compile cannot trace a warning).
        if choice == "auto" and x.is_cuda and not torch.compiler.is_compiling():
            warnings.warn(f"lora_kernels: {_NO_KERNELS}; CUDA tensors take the unfused PyTorch path",
                          RuntimeWarning, stacklevel=3)
        return "torch"
    if x.is_cuda and not kernels.INTERPRET:
        return "torch" if choice == "auto" and _host_bound(x, out_features) else "triton"
    if choice == "auto":
        return "torch"
    if not kernels.INTERPRET:
        if x.is_meta or _fake(x):  # (shapes only: the ops' shape functions serve it, nothing launches)
            return "triton"
        raise RuntimeError(
            f"LORA_KERNELS_BACKEND=triton with {x.device.type} tensors needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before lora_kernels is imported to run the kernels on the CPU")
    # Triton's interpreter computes bfloat16 wrong: keep bf16 on the PyTorch path.
    if torch.bfloat16 in (x.dtype, adapter_dtype):
        return "torch"
    return "triton"


def draw_seed(device, backend):
    """A call's LoRA-dropout seed (0-d int64), from torch's generator, drawn where it is read: the
    kernels read it on their device, so no host sync, and a CUDA graph replay draws a new one (a
    host-side number would be baked into the graph: one mask for every replay); the PyTorch path
    seeds a generator with it, on the CPU. ``lora_linear`` draws it first thing, so after
    ``torch.manual_seed(s)`` this returns the seed of the next call."""
    return torch.randint(2**31 - 1, (), dtype=torch.int64, device=device if backend == "triton" else "cpu")


def _check_inputs(x, weight, bias, A, B, alpha):
    """Raise TypeError/ValueError naming the problem before anything runs; return alpha as a float
    (a 0-d tensor under torch.compile if it was given as a tensor). Modifies nothing."""
    # (Host time: about a tenth of an eager step's Python on the CPU went here, so the common case
    # reads each property once and builds nothing.)
    named = (("x", x), ("weight", weight), ("A", A), ("B", B)) + ((("bias", bias),) if bias is not None else ())
    for name, t in named:
        plain = type(t) in PLAIN_TENSORS
        if not plain and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{name} is a nested tensor, which the kernels cannot read: pass a dense one "
                            "(torch.nested.to_padded_tensor, or the jagged tensor's values())")
        if not plain and not (torch.compiler.is_compiling() or is_fake(t)):
            raise TypeError(f"{name} is a tensor subclass ({type(t).__name__}), whose own ops the kernels would "
                            "bypass by reading its storage: pass plain tensors (for such weights and inputs "
                            "LinearWithLoRA runs the reference's unfused calls, and fuse_lora peft's own forward)")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must have a floating-point dtype the kernels compute in (float16, "
                            f"bfloat16, float32 or float64), got {t.dtype}")
        if t.layout is not torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}: call .to_dense()")
    device = x.device
    if (weight.device != device or A.device != device or B.device != device
            or (bias is not None and bias.device != device)):
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., {K}) to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},) to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(bias.shape)}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    r = A.shape[1]
    if r < 1:
        raise ValueError(f"rank must be >= 1, got A of shape {tuple(A.shape)}")
    if A.shape[0] != K or B.shape != (r, N):
        raise ValueError(f"A must be ({K}, r) and B (r, {N}) for weight {tuple(weight.shape)}, "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got x {x.dtype}, weight {weight.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else ""))
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share a dtype, got A {A.dtype} and B {B.dtype}")
    if type(alpha) is float and -math.inf < alpha < math.inf:  # (the usual alpha: nothing more to check)
        return alpha
    if isinstance(alpha, Tensor) and alpha.numel() == 1 and alpha.dtype != torch.bool:
        if alpha.requires_grad:  # .item() would drop its gradient without a word
            raise ValueError("alpha is a tensor that requires grad: the fused layer has no gradient for "
                             "alpha; pass a number or a tensor that does not require grad")
        if alpha.dim() > x.dim():  # the reference's alpha · (x A B) would broadcast y to more dimensions
            raise ValueError(f"alpha of shape {tuple(alpha.shape)} has more dimensions than x "
                             f"{tuple(x.shape)}: pass a number")
        if alpha.is_complex():
            raise TypeError(f"alpha must be a real number, got a {alpha.dtype} tensor")
        if torch.compiler.is_compiling():
            # Traced, its .item() would be a value known only when the graph runs, which neither
            # a check (so a NaN one is not refused here) nor the op's float argument can take:
            # lora_linear folds it into B instead.
            return alpha.reshape(())
        alpha = alpha.item()  # (reference.LoRALayer takes a one-element tensor too)
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    # Comparisons, not math.isfinite: torch.compile may trace alpha as a symbolic float (dynamic=True,
    # or an alpha that changed between calls), and then guards on them instead of failing.
    if not -math.inf < alpha < math.inf:
        raise ValueError(f"alpha must be finite, got {alpha}")
    # (float() would pin a symbolic alpha to the value it was traced with.)
    if torch.compiler.is_compiling():
        return alpha * 1.0
    try:
        return float(alpha)
    except OverflowError:  # a Python int past float's range passes the comparisons above
        raise ValueError(f"alpha must be finite, got a {type(alpha).__name__} too large for a float") from None


class _Dropout:
    """LoRA dropout on x (M, K) for one call: the kept elements are scaled by 1/(1-p), folded into
    the shrinks' ``scale`` so the kernels only ever zero elements; p = 1 drops the LoRA term."""

    def __init__(self, p, seed):
        self.p, self.seed = p, None if p == 0.0 else seed
        self.rescale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)

    def on(self, where, si, sj):
        """The ``dropout`` argument of ``lora_matmul`` / ``torch_matmul``: mask ``where`` ("x" or
        "lowrank"), whose element (i, j) is element i·si + j·sj of x."""
        return None if self.seed is None else (where, self.seed, self.p, si, sj)


def _rows(t: Tensor) -> Tensor:
    """``t`` as (tokens, features). (``reshape(-1, features)``, a quarter cheaper on the host than
    spelling the tokens out, cannot infer them when a layer has 0 in or out features, which
    nn.Linear allows; ``flatten`` has no rule in the legacy vmap that
    ``autograd.grad(is_grads_batched=True)`` runs.)"""
    features = t.shape[-1]
    return t.reshape(-1, features) if features else t.reshape(math.prod(t.shape[:-1]), 0)


def _by_value(*tensors):
    """The tensors as the kernels read them, through their storage: a negative view (the .imag of a
    conj()) stores -t, so it is resolved. (Here, in the ops' bodies, not in lora_linear: torch.compile
    would break its graph on is_neg.)"""
    for t in tensors:  # (a loop, not any() over a generator: host time, twice a step)
        if t is not None and t.is_neg():
            return [t if t is None else t.resolve_neg() for t in tensors]
    return tensors


_NO_CONTEXT = contextlib.nullcontext()  # (stateless: one serves every call)


def _autocast_off(device_type):
    """The op chooses its own precision: autocast off inside it. (Only entered when autocast is on:
    the context costs microseconds of host time per call, and a layer step makes two.)"""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, alpha: float,
                  dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (y, S). S = q · x̃ A (the module docstring) is saved for the backward; alpha scales S B inside
    the product (S is the reference's own x A, which a large alpha cannot overflow)."""
    dtype = x.dtype
    K = x.shape[-1]
    drop = _Dropout(dropout_p, seed)
    if backend == "triton":
        x, weight, bias, A, B = _by_value(x, weight, bias, A, B)
    with _autocast_off(x.device.type):
        # (y is allocated in x's leading shape: no reshape of it, which would cost host time.)
        return shrink_expand(backend, _rows(x), weight.t(), A, B, s_scale=drop.rescale, r_scale=alpha, bias=bias,
                             dropout=drop.on("x", K, 1), dtype=dtype, out_shape=(*x.shape[:-1], weight.shape[0]))


_forward = torch.library.custom_op("lora_kernels::lora_linear_fwd", _forward_impl, mutates_args=())


@_forward.register_fake
def _(x, weight, bias, A, B, alpha, dropout_p, seed, backend):
    M = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(M, A.shape[1])


_DS_FLOOR = 2.0 ** -8


def _dS_scale(alpha, q):
    """(c, t) for dS = c · dY Bᵀ and the products that read it (dX's low-rank term, dA), c · t =
    alpha · q. The reference's dS is alpha · dY Bᵀ, and peft's lora_alpha / r is often below 1: a dS
    free of alpha overflowed fp16 there where the reference's fitted (a GradScaler then skips the
    step, and settles on a loss scale alpha times the reference's). Above 1, alpha would enlarge dS
    past the unscaled product: it goes to the readers' fp32 accumulators instead. Below 2^-8
    (lora_alpha = 1 at r = 256), 2^-8 · dY Bᵀ keeps fp16's digits where the reference's dS turns
    subnormal. q = 1/(1-p) is never in dS (the reference's dS has none). (t = ±q exactly where
    c = |alpha|.)"""
    c = min(max(abs(alpha), _DS_FLOOR), 1.0)
    return c, alpha * q / c


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, S: Tensor, alpha: float,
                   dropout_p: float, seed: Optional[Tensor], needs: Sequence[bool],
                   backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dW, db, dA, dB); a gradient not in ``needs`` comes back as None (the op returns
    an empty tensor instead). ``backend`` is the forward's: the two draw different dropout masks
    from one seed."""
    matmul = kernels.lora_matmul if backend == "triton" else torch_matmul
    need_x, need_w, need_b, need_A, need_B = needs
    dtype = x.dtype
    K = weight.shape[1]
    if backend == "triton":
        if dy._is_zerotensor():  # autograd's lazy zeros (some ops' gradients) have no storage to read
            dy = torch.zeros(dy.shape, dtype=dy.dtype, device=dy.device)
        dy, x, weight, A, B = _by_value(dy, x, weight, A, B)
    x2 = _rows(x)
    dy2 = _through(_rows(dy), dtype)
    drop = _Dropout(dropout_p, seed)
    dx = dw = db = dA = dB = None
    with _autocast_off(x.device.type):
        # dS = c · dY Bᵀ, stored in the activations' dtype; t = alpha · q / c scales Aᵀ's tiles
        # (fp16: the accumulator) in dX and dA's fp32 accumulator (the module docstring).
        c, t = _dS_scale(alpha, drop.rescale)
        if need_x:
            dx, dS = shrink_expand(backend, dy2, weight, B.t(), A.t(), s_scale=c, r_scale=t,
                                   dropout=drop.on("lowrank", K, 1), dtype=dtype, out_shape=x.shape)
        elif need_A:
            dS = matmul(dy2, B.t(), scale=c, out_dtype=dtype, dot_dtype=dtype)
        # (dA's mask is on xᵀ, whose element (i, j) is x's (j, i), element j·K + i: strides 1, K)
        if need_A and need_B:  # one launch: dA = t · x̃ᵀ dS beside dBᵀ = alpha · dYᵀ S (see kernels.lora_matmul)
            dA, dB = matmul(x2.t(), dS, scale=t, dropout=drop.on("x", 1, K), pair=(dy2.t(), S), pair_scale=alpha,
                            out_dtype=A.dtype, dot_dtype=dtype)
        elif need_A:
            dA = matmul(x2.t(), dS, scale=t, dropout=drop.on("x", 1, K), out_dtype=A.dtype, dot_dtype=dtype)
        elif need_B:
            dB = matmul(S.t(), dy2, scale=alpha, out_dtype=B.dtype, dot_dtype=dtype)
        if need_w:
            dw = matmul(dy2.t(), x2, out_dtype=weight.dtype, dot_dtype=dtype)
        if need_b:
            db = dy2.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
    return dx, dw, db, dA, dB


def _backward_op(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, S: Tensor, alpha: float,
                 dropout_p: float, seed: Optional[Tensor], needs: Sequence[bool],
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The op's schema returns tensors: an empty one (each its own, outputs may not alias) for a
    # gradient not asked for. (Eager mode calls _backward_impl itself, without these allocations.)
    grads = _backward_impl(dy, x, weight, A, B, S, alpha, dropout_p, seed, needs, backend)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


_backward = torch.library.custom_op("lora_kernels::lora_linear_bwd", _backward_op, mutates_args=())


@_backward.register_fake
def _(dy, x, weight, A, B, S, alpha, dropout_p, seed, needs, backend):
    return tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                 for t, need in zip((x, weight, weight.new_empty(weight.shape[0]), A, B), needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, alpha, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], seed)
    ctx.alpha, ctx.dropout_p, ctx.has_bias, ctx.backend = alpha, dropout_p, bias is not None, backend


def _gradients(ctx, dy, backward):
    """The nine gradients of the forward's inputs, from ``backward`` (the op or its function)."""
    x, weight, A, B, S, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    needs[2] = needs[2] and ctx.has_bias
    grads = backward(dy, x, weight, A, B, S, ctx.alpha, ctx.dropout_p, seed, needs, ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


_forward.register_autograd(lambda ctx, dy, _dS: _gradients(ctx, dy, _backward), setup_context=_setup_context)


def flops(M, K, N, r, needs):
    """(forward, backward) FLOPs of the layer on M tokens, K → N features, rank r (0: the base alone),
    the backward computing the gradients ``needs`` asks for, of (x, W, b, A, B): 2 per multiply-add,
    the bias, alpha and dropout not counted, as FlopCounterMode counts addmm."""
    need_x, need_w, _, need_A, need_B = needs
    products = [(need_x or need_A, N * r),  # dS = dY Bᵀ
                (need_x, N * K + r * K),  # dX = dY W + dS Aᵀ
                (need_w, N * K), (need_A, K * r), (need_B, r * N)]  # dW = dYᵀ x, dA = xᵀ dS, dB = Sᵀ dY
    return 2 * M * (K * N + K * r + r * N), 2 * M * sum(size for need, size in products if need)


# For torch.utils.flop_counter.FlopCounterMode, which sees the ops, not the Triton kernels inside.
@register_flop_formula(torch.ops.lora_kernels.lora_linear_fwd)
def _forward_flops(x_shape, weight_shape, bias_shape, A_shape, *args, out_shape=None):
    return flops(math.prod(x_shape[:-1]), weight_shape[1], weight_shape[0], A_shape[1], [False] * 5)[0]


@register_flop_formula(torch.ops.lora_kernels.lora_linear_bwd)
def _backward_flops(dy_shape, x_shape, weight_shape, A_shape, B_shape, S_shape, alpha, dropout_p, seed, needs,
                    backend, out_shape=None):
    return flops(math.prod(x_shape[:-1]), weight_shape[1], weight_shape[0], A_shape[1], needs)[1]


def _through_ops(t):
    """Whether a call must go through the custom ops: whenever something traces it (torch.compile,
    compiled autograd, export, torch.jit.trace), runs it on fake or meta tensors (memory
    estimators, models built on the meta device), which only the ops' shape functions serve, or
    watches its ops (a TorchDispatchMode: FlopCounterMode, which counts the op by the formulas
    above, and would see no Triton kernel)."""
    # (is_fake for every tensor: it also sees through functionalization's and vmap's wrappers,
    # which are plain Tensors. torch.jit.trace records an op as one call that a saved module can
    # make again, where an autograd.Function would be a Python call it cannot save; and the op's
    # body runs untraced, where the tracer would hand the launcher its sizes as tensors.)
    return (torch.compiler.is_compiling() or t.is_meta or _fake(t) or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() > 0)


def _fake(t):
    """``is_fake(t)``, answered without it for an eager call's plain tensor (about a microsecond of
    host time, twice a step): a fake tensor is a subclass (``FakeTensor``, also as a Parameter) or
    is wrapped in one of the two plain-typed wrappers, functionalization's or functorch's, which
    ``is_fake`` then opens."""
    if type(t) in PLAIN_TENSORS and not (torch._is_functional_tensor(t) or torch._C._functorch.is_functorch_wrapped_tensor(t)):
        return False
    return is_fake(t)


class _EagerLoRALinear(torch.autograd.Function):
    """Eager mode: the custom op's forward, context and backward, without the op dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):
        y, S = _forward_impl(*inputs)
        _setup_context(ctx, inputs, (y, S))
        return y

    @staticmethod
    def backward(ctx, dy):
        # The engine runs a backward with grad mode on only for create_graph=True. The kernels have
        # no derivative of their own, so refuse it here: once_differentiable's guard would raise
        # later only where dy requires grad, and where it does not (y.sum()'s) would return
        # gradients silently missing the layer's second-order terms.
        if torch.is_grad_enabled():
            raise RuntimeError("lora_kernels: double backward (create_graph=True through the layer) is not "
                               "supported: the kernels have no derivative of their own. Use the reference "
                               "formula (lora_kernels.reference) where second derivatives are needed")
        # An eager forward's backward may still be traced (compiled autograd under DDP, say): then
        # the op, and no batched check, whose functorch calls Dynamo cannot trace (a graph break
        # in every layer's backward).
        if _through_ops(dy):
            return _gradients(ctx, dy, _backward)
        # is_grads_batched runs the backward under (legacy) vmap: the kernels need real storage.
        if ctx.backend == "triton" and (torch._C._functorch.is_legacy_batchedtensor(dy)
                                        or torch._C._functorch.is_batchedtensor(dy)):
            raise RuntimeError("lora_kernels: batched gradients (autograd.grad(is_grads_batched=True), "
                               "jacobian(vectorize=True)) cannot run the Triton kernels, which take one "
                               "gradient at a time: compute them one by one, or set LORA_KERNELS_BACKEND=torch")
        return _gradients(ctx, dy, _backward_impl)

    @staticmethod
    def jvp(ctx, *tangents):
        # (Function's own error reads as advice to implement jvp.)
        raise NotImplementedError("lora_kernels: forward-mode AD (torch.autograd.forward_ad, a jvp) is not "
                                  "supported: the kernels have no tangent rule. Use the reference formula "
                                  "(lora_kernels.reference) there")


def lora_linear(x, weight, bias, A, B, alpha, dropout_p=0.0):
    """``y = x @ weight.T + bias + alpha * (dropout(x) @ A) @ B``, fused.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    A: (in_features, r); B: (r, out_features); alpha: the scale, used as given (not alpha / r).
    dropout_p: LoRA dropout on the input of the low-rank path only (peft's ``lora_dropout``);
    applied whenever it is > 0 (the module passes 0 in eval mode). Its mask is drawn from torch's
    generator, so ``torch.manual_seed`` repeats it. Differentiable in x, A, B, and in weight /
    bias when they require grad. Under ``torch.autocast`` the base operands are cast to the
    autocast dtype, as ``F.linear`` would cast them.
    """
    if isinstance(x, Tensor) and not x.is_meta and torch.is_autocast_enabled(x.device.type):
        # As autocast casts F.linear's operands: floating tensors other than fp64.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                           else t for t in (x, weight, bias))
    if torch._C._get_tracing_state() is None:
        alpha = _check_inputs(x, weight, bias, A, B, alpha)
    else:  # torch.jit.trace: sizes are traced tensors there, and each check's comparison of them
        # warns that the trace may not generalize (TracerWarning). It does: no check is recorded,
        # the op computes its shapes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            alpha = _check_inputs(x, weight, bias, A, B, alpha)
    if isinstance(alpha, Tensor):  # (compiling) alpha · B rounded to B's dtype, which for fp16
        B, alpha = B * alpha, 1.0   # adapters overflows past |alpha · B| = 65504 (a float alpha does not)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    # Chosen once, here, for both passes: the backends draw different dropout masks from one seed.
    # (Under torch.compile this choice is fixed when the graph is traced.)
    backend = select_backend(x, A.dtype, weight.shape[0])
    seed = draw_seed(x.device, backend) if dropout_p > 0 else None
    inputs = (x, weight, bias, A, B, alpha, float(dropout_p), seed, backend)
    # (Past _check_inputs a tensor of another type is fake: a model built under FakeTensorMode
    # may take a real x, and its fake weights have no storage for the kernels either. Spelled
    # out: all() over a generator costs 0.3 µs a call here, these 0.07.)
    if _through_ops(x) or not (type(weight) in PLAIN_TENSORS and type(A) in PLAIN_TENSORS and type(B) in PLAIN_TENSORS
                               and (bias is None or type(bias) in PLAIN_TENSORS)):
        return _forward(*inputs)[0]
    if torch._C._are_functorch_transforms_active():  # (apply's own error reads as advice to implement them)
        raise RuntimeError("lora_kernels: torch.func transforms (functorch transforms: vmap, grad, jacrev, jvp, "
                           "functionalize) cannot run the fused layer, which has no rules for them: call "
                           "lora_kernels.reference.lora_linear_reference inside them")
    # Evaluation, generation: no graph to record, and apply costs host time. But forward-mode AD
    # must still reach apply, which raises (as docs/usage.md says). (The dual level is a private
    # variable: read with a default, so a torch without it loses only this shortcut's guard,
    # which tests/test_lora_linear.py would then report, and not every forward.) (Inference mode
    # records no graph either, even under enable_grad.)
    if ((not torch.is_grad_enabled() or torch.is_inference_mode_enabled())
            and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0):
        return _forward_impl(*inputs)[0]
    return _EagerLoRALinear.apply(*inputs)
