"""``lora_linear``: input checks, backend choice, and the autograd function.

The math (design.md §1), with S kept as the only saved intermediate (M × r):

    S  = alpha · x A                 dS = alpha · dY Bᵀ
    y  = x Wᵀ + S B + b              dX = dY W + dS Aᵀ
                                     dA = xᵀ dS,   dB = Sᵀ dY
                                     dW = dYᵀ x,   db = Σ_M dY    (only when the base trains)

Every product above is one call of ``matmul`` below, which runs the Triton kernel
(``kernels.lora_matmul``) or the same contract in PyTorch. The autograd function is therefore
shared by both backends, and the PyTorch path tests the same plumbing the kernels use.

Precision: products run in the activations' dtype (``x.dtype``), adapters included (peft keeps
fp32 adapters beside bf16 weights), and accumulate in fp32. S and dS are kept in fp32 for 16-bit
inputs (they are tiny), and gradients come back in each parameter's own dtype.
"""

import math
import os

import torch

try:  # triton is a Linux-only dependency; elsewhere the PyTorch path serves every call
    from . import kernels
except ImportError:  # pragma: no cover
    kernels = None

BACKENDS = ("auto", "triton", "torch")


def torch_matmul(x, w, *, scale=1.0, lowrank=None, bias=None, out_dtype, dot_dtype):
    """PyTorch twin of ``kernels.lora_matmul``: same contract, same casts."""
    acc_dtype = torch.float64 if dot_dtype == torch.float64 else torch.float32
    out = (x.to(dot_dtype) @ w.to(dot_dtype)).to(acc_dtype)
    if scale != 1.0:
        out = out * scale
    if lowrank is not None:
        out = out + (lowrank[0].to(dot_dtype) @ lowrank[1].to(dot_dtype)).to(acc_dtype)
    if bias is not None:
        out = out + bias.to(acc_dtype)
    return out.to(out_dtype)


def select_backend(x, adapter_dtype):
    """'triton' or 'torch' for these inputs, honouring ``LORA_KERNELS_BACKEND``."""
    choice = os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch" or kernels is None:
        if choice == "triton":
            raise RuntimeError("LORA_KERNELS_BACKEND=triton but triton is not installed")
        return "torch"
    if x.is_cuda:
        return "triton"
    if choice == "auto":
        return "torch"
    if not kernels.INTERPRET:
        raise RuntimeError(
            f"LORA_KERNELS_BACKEND=triton with {x.device.type} tensors needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before lora_kernels is imported to run the kernels on the CPU")
    # Triton's interpreter computes bfloat16 wrong (design.md §4): keep bf16 on the PyTorch path.
    if torch.bfloat16 in (x.dtype, adapter_dtype):
        return "torch"
    return "triton"


def _check_inputs(x, weight, bias, A, B, alpha):
    """Raise TypeError/ValueError naming the problem before anything runs. Modifies nothing."""
    named = {"x": x, "weight": weight, "A": A, "B": B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., {K}) to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},) to match weight {tuple(weight.shape)}, "
                         f"got shape {tuple(bias.shape)}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    r = A.shape[1]
    if r < 1:
        raise ValueError(f"rank must be >= 1, got A of shape {tuple(A.shape)}")
    if A.shape[0] != K or tuple(B.shape) != (r, N):
        raise ValueError(f"A must be ({K}, r) and B (r, {N}) for weight {tuple(weight.shape)}, "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got x {x.dtype}, weight {weight.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else ""))
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share a dtype, got A {A.dtype} and B {B.dtype}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python number, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, alpha):
        backend = select_backend(x, A.dtype)
        matmul = kernels.lora_matmul if backend == "triton" else torch_matmul
        dtype = x.dtype
        side_dtype = torch.promote_types(dtype, torch.float32)  # S in fp32 unless x is fp64
        x2 = x.reshape(-1, x.shape[-1])
        S = matmul(x2, A, scale=alpha, out_dtype=side_dtype, dot_dtype=dtype)
        y = matmul(x2, weight.t(), lowrank=(S, B), bias=bias, out_dtype=dtype, dot_dtype=dtype)
        ctx.save_for_backward(x, weight, A, B, S)
        ctx.alpha, ctx.matmul, ctx.bias_dtype = alpha, matmul, None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, A, B, S = ctx.saved_tensors
        matmul, dtype = ctx.matmul, x.dtype
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, weight.shape[0]).to(dtype)
        dx = dw = db = dA = dB = None
        if need_x or need_A:
            dS = matmul(dy2, B.t(), scale=ctx.alpha, out_dtype=S.dtype, dot_dtype=dtype)
        if need_x:
            dx = matmul(dy2, weight, lowrank=(dS, A.t()), out_dtype=dtype, dot_dtype=dtype).reshape(x.shape)
        if need_A:
            dA = matmul(x2.t(), dS, out_dtype=A.dtype, dot_dtype=dtype)
        if need_B:
            dB = matmul(S.t(), dy2, out_dtype=B.dtype, dot_dtype=dtype)
        if need_w:
            dw = matmul(dy2.t(), x2, out_dtype=weight.dtype, dot_dtype=dtype)
        if need_b:
            db = dy2.sum(0, dtype=S.dtype).to(ctx.bias_dtype)
        return dx, dw, db, dA, dB, None


def lora_linear(x, weight, bias, A, B, alpha):
    """``y = x @ weight.T + bias + alpha * (x @ A) @ B``, fused.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    A: (in_features, r); B: (r, out_features); alpha: the scale, used as given (not alpha / r).
    Differentiable in x, A, B, and in weight / bias when they require grad.
    """
    _check_inputs(x, weight, bias, A, B, alpha)
    return LoRALinearFunction.apply(x, weight, bias, A, B, float(alpha))
