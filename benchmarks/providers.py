"""The layers compared, all computing ``y = x Wᵀ + b + alpha · (x A) B`` from the same weights.

``PROVIDERS`` maps a name to a factory ``factory(weights, dropout=0.0) -> Layer``; only `peft`
and the `fused` ones have a LoRA dropout, checked with the mask their next call draws (`fused`
names it; peft's nn.Dropout mask is drawn again from the same seed); the others ignore it and
are checked without dropout. A ``Layer`` holds the
forward callable and the tensors it trains, so the measurement code can run any of them the same way:
``y = layer.fn(x)`` then ``torch.autograd.grad(y, [x, *trained tensors], dy)``.
"""

import contextlib
import dataclasses
import functools
import os
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from lora_kernels import functional, lora_linear
from lora_kernels.reference import lora_linear_reference


class ProviderUnavailable(Exception):
    """The provider cannot run here (a package is missing): reported as SKIPPED, not as an error."""


@dataclasses.dataclass
class Weights:
    """The layer's parameters in the seed's layout: W (N, K), b (N,), A (K, r), B (r, N), and alpha."""

    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def shape(self):
        """(K, N, rank)."""
        return self.A.shape[0], self.B.shape[1], self.A.shape[1]

    def as_dict(self):
        return {"W": self.W, "b": self.b, "A": self.A, "B": self.B}


def make_weights(K, N, rank, *, dtype, device, alpha=2.0, trainable_base=False, generator=None, adapter_dtype=None):
    """Random weights scaled so that both terms of y are of order 1; the adapters in
    ``adapter_dtype`` (default: the base's ``dtype``).

    B is random, not the seed's zero init: with B = 0 the LoRA path adds nothing and a provider that
    drops it, or scales it wrong, would still pass the check.
    """
    def randn(*shape, scale, dt=dtype):  # drawn on the device: the generator, if given, must live there
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dt)

    W = randn(N, K, scale=K ** -0.5).requires_grad_(trainable_base)
    b = randn(N, scale=0.1).requires_grad_(trainable_base)
    A = randn(K, rank, scale=K ** -0.5, dt=adapter_dtype or dtype).requires_grad_()
    B = randn(rank, N, scale=rank ** -0.5, dt=adapter_dtype or dtype).requires_grad_()
    return Weights(W, b, A, B, float(alpha))


class Layer(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]  # x (M, K) -> y (M, N)
    # "W", "b", "A", "B" -> the tensor this provider trains for it (used when it requires grad).
    params: dict
    # Names whose tensor is stored transposed from the seed's layout (peft keeps nn.Linear weights):
    # their gradients are transposed back before they are compared.
    transposed: tuple = ()
    # Whether the layer computes the LoRA layer (False for `base`, which is checked against F.linear).
    lora: bool = True
    # LoRA dropout probability the layer applies: above 0 its output is random, so it is checked
    # only if the layer can say which mask its next call draws (next_mask), else only timed.
    dropout: float = 0.0
    # next_mask(x, torch_seed) -> the keep mask (x's shape, bool) that the layer's next call on x
    # applies once torch.manual_seed(torch_seed) has run; it leaves torch's generator so seeded.
    next_mask: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
    # Whether next_mask repeats the layer's draw from outside (peft's nn.Dropout) rather than the
    # layer naming it: a failed check may then be the mask's, not the layer's (see run.py).
    mask_inferred: bool = False
    # backend(x) -> the path lora_linear takes for a call on x ("triton" or "torch"), for this
    # package's layers: their rows say where it is the PyTorch path.
    backend: Optional[Callable[[torch.Tensor], str]] = None


# --- the providers -------------------------------------------------------------------------------


def _base(w, **_):
    # The floor: the bare GEMM the LoRA layer adds to. Its backward is dX alone while the base is
    # frozen (W and b do not require grad), and dX, dW, db when it trains.
    return Layer(lambda x: F.linear(x, w.W, w.b), {"W": w.W, "b": w.b}, lora=False)


def _one_dtype(w):
    """The seed's formula and the cuBLAS baselines multiply x by A as they are: torch's products
    take one dtype, so adapters in another (fp32 beside a 16-bit base: peft's default, and
    LinearWithLoRA's) have no such baseline without a cast the user would have to add."""
    if w.A.dtype != w.W.dtype:
        raise ProviderUnavailable(f"x ({str(w.W.dtype).removeprefix('torch.')}) times A "
                                  f"({str(w.A.dtype).removeprefix('torch.')}): torch's products need one dtype")


def _reference(w, **_):
    _one_dtype(w)
    return Layer(lambda x: lora_linear_reference(x, w.W, w.b, w.A, w.B, w.alpha), w.as_dict())


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # One compiled function for the whole sweep, with dynamic shapes: compiling per (shape, tokens,
    # rank) would cost more than the sweep's budget. The products go to the same external GEMMs
    # (cuBLAS / mkldnn) either way; only the fused elementwise kernel is shape-generic.
    return torch.compile(lora_linear_reference, dynamic=True)


def _compiled(w, **_):
    _one_dtype(w)
    fn = _compiled_reference()
    return Layer(lambda x: fn(x, w.W, w.b, w.A, w.B, w.alpha), w.as_dict())


class AddmmLoRA(torch.autograd.Function):
    """cuBLAS with the LoRA term folded into the base GEMM's output in place, and its own backward.

        forward:  S = x A;  y = F.linear(x, W, b);  y += alpha · S B   (addmm_, no M×N temporary)
        backward: dS = alpha · dY Bᵀ;  dX = dY W + dS Aᵀ;  dA = xᵀ dS;  dB = alpha · Sᵀ dY;
                  dW = dYᵀ x, db = Σ dY only when the base trains.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, alpha):
        x2 = x.reshape(-1, x.shape[-1])
        S = x2 @ A
        y = F.linear(x2, W, b)
        y.addmm_(S, B, alpha=alpha)
        ctx.save_for_backward(x, W, A, B, S)
        ctx.alpha = alpha
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, W, A, B, S = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dW = db = dA = dB = None
        if need_x or need_A:
            dS = torch.mm(dy2, B.t()).mul_(ctx.alpha)  # (M, r): scaling here is cheaper than on M×N
        if need_x:
            dx = torch.mm(dy2, W).addmm_(dS, A.t()).view(x.shape)
        if need_A:
            dA = torch.mm(x2.t(), dS)
        if need_B:
            dB = torch.mm(S.t(), dy2).mul_(ctx.alpha)  # (r, N)
        if need_W:
            dW = torch.mm(dy2.t(), x2)
        if need_b:
            db = dy2.sum(0)
        return dx, dW, db, dA, dB, None


def _addmm(w, **_):
    _one_dtype(w)
    return Layer(lambda x: AddmmLoRA.apply(x, w.W, w.b, w.A, w.B, w.alpha), w.as_dict())


def _peft(w, dropout=0.0, **_):
    """peft's LoRA ``Linear`` holding the same weights: lora_A.weight = Aᵀ, lora_B.weight = Bᵀ.

    Built through ``get_peft_model`` on a module holding one nn.Linear (the public API, stable across
    peft versions); the layer is then called directly, so PeftModel's wrapper is not timed.
    peft's scale is lora_alpha / r, so lora_alpha = alpha · r gives the seed's alpha. The adapters
    are ours, in their dtype (the base's unless the sweep's --adapter-dtype says otherwise):
    get_peft_model's default (autocast_adapter_dtype) leaves them in fp32 beside a bf16 base, and
    peft's forward then casts x up and runs the LoRA path in fp32.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ProviderUnavailable("peft is not installed (pip install peft)") from e
    K, N, rank = w.shape
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(K, N, device="meta")  # no throwaway init: W and b are shared below
    config = LoraConfig(r=rank, lora_alpha=w.alpha * rank, lora_dropout=dropout, target_modules=["proj"])
    holder.proj.weight = torch.nn.Parameter(w.W.detach())  # same storage as W: no copy
    holder.proj.bias = torch.nn.Parameter(w.b.detach())
    layer = get_peft_model(holder, config).base_model.model.proj
    # get_peft_model froze the base and may have cast the adapters: set both to ours.
    layer.base_layer.weight.requires_grad_(w.W.requires_grad)
    layer.base_layer.bias.requires_grad_(w.b.requires_grad)
    layer.lora_A["default"].weight = torch.nn.Parameter(w.A.detach().t().contiguous())
    layer.lora_B["default"].weight = torch.nn.Parameter(w.B.detach().t().contiguous())
    assert abs(layer.scaling["default"] - w.alpha) <= 1e-6 * abs(w.alpha), layer.scaling
    drop = layer.lora_dropout["default"]
    assert (dropout == 0 or (type(drop) is torch.nn.Dropout and drop.p == dropout and drop.training)), drop

    def next_mask(x, torch_seed):
        # peft's forward draws nothing before its nn.Dropout, which draws from torch's generator
        # for x's device: the same draw, from the same seed, on a tensor of the shape, dtype and
        # device of the x it drops is its mask (dropout's kernels draw by element count, not by the
        # values; the vector width they draw with may follow the dtype). peft casts x to the
        # adapters' dtype first.
        torch.manual_seed(torch_seed)
        keep = F.dropout(torch.ones_like(x, dtype=layer.lora_A["default"].weight.dtype), dropout, training=True) != 0
        torch.manual_seed(torch_seed)
        return keep

    params = {"W": layer.base_layer.weight, "b": layer.base_layer.bias,
              "A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
    return Layer(layer, params, transposed=("A", "B"), dropout=dropout,
                 next_mask=next_mask if dropout > 0 else None, mask_inferred=True)


def _fused(w, dropout=0.0, **_):
    # On CUDA tensors this runs the Triton kernels; on CPU the package's PyTorch path.
    # dropout_p is passed only when asked for, so the default call is the plain six-argument one.
    kwargs = {"dropout_p": dropout} if dropout > 0 else {}

    def backend_of(x):
        return functional.select_backend(x, w.A.dtype, w.W.shape[0])

    def next_mask(x, torch_seed):
        # lora_linear draws its seed with functional.draw_seed first thing, so after manual_seed
        # the same draw here is the next call's seed; the mask is the backend's for that seed.
        backend = backend_of(x)
        torch.manual_seed(torch_seed)
        seed = int(functional.draw_seed(x.device, backend))
        torch.manual_seed(torch_seed)  # (neither mask below draws from torch's generator)
        return functional.keep_mask(x.numel() // x.shape[-1], x.shape[-1], seed, dropout, x.device,
                                    backend).view(x.shape)

    return Layer(lambda x: lora_linear(x, w.W, w.b, w.A, w.B, w.alpha, **kwargs), w.as_dict(), dropout=dropout,
                 next_mask=next_mask if dropout > 0 else None, backend=backend_of)


@contextlib.contextmanager
def _patched(values, key, value):
    """``values[key] = value`` (os.environ, or a module's ``vars``) for the calls inside, then as before."""
    before = values.get(key, _patched)  # (_patched: "was not there")
    values[key] = value
    try:
        yield
    finally:
        if before is _patched:
            del values[key]
        else:
            values[key] = before


def torch_path():
    """``LORA_KERNELS_BACKEND=torch`` for the calls inside (lora_linear reads it on every call)."""
    return _patched(os.environ, "LORA_KERNELS_BACKEND", "torch")


# The threshold `fused-routed` runs with: the third H200 run's crossover at rank 16 (benchmarks/NOTES.md,
# fifteenth session), under which every projection at 2048 tokens, and k and v at 8192, take cuBLAS.
ROUTED_BELOW = 2**37


def _fused_within(context, w, dropout):
    """``fused`` with each call (and its mask's draw, and its backend's choice) inside ``context()``;
    the backward keeps the forward's backend. (Entering the context costs the host a few µs a call,
    which these rows carry.)"""
    layer = _fused(w, dropout=dropout)

    def within(f):
        def call(*args):
            with context():
                return f(*args)
        return call

    return layer._replace(fn=within(layer.fn), next_mask=layer.next_mask and within(layer.next_mask),
                          backend=within(layer.backend))


def _fused_torch(w, dropout=0.0, **_):
    """``fused`` on its PyTorch path (LORA_KERNELS_BACKEND=torch): the same checks, autograd.Function
    and math, each product a cuBLAS call instead of a Triton launch. Beside `fused`, per shape:
    where a step is so short that its host time sets the pace, which path costs less?"""
    return _fused_within(torch_path, w, dropout)


def _fused_routed(w, dropout=0.0, **_):
    """``fused`` with ``functional.TORCH_BELOW = ROUTED_BELOW``: the layer as it would be with that
    rule on (eager calls on CUDA below it take the PyTorch path), for the model step, where large
    and small projections mix."""
    return _fused_within(lambda: _patched(vars(functional), "TORCH_BELOW", ROUTED_BELOW), w, dropout)


PROVIDERS = {
    "base": _base,
    "reference": _reference,
    "compiled": _compiled,
    "addmm": _addmm,
    "peft": _peft,
    "fused": _fused,
    "fused-torch": _fused_torch,
    "fused-routed": _fused_routed,
}
# Without a GPU, fused runs its PyTorch path already: these would repeat it.
GPU_ONLY = ("fused-torch", "fused-routed")
