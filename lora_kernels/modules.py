"""Drop-in modules with the seed's constructors, initialisation and state-dict keys.

A state dict saved from the seed's ``LinearWithLoRA`` (``linear.weight``, ``linear.bias``,
``lora.A``, ``lora.B``) loads into these with ``strict=True``, and back.
"""

import math

import torch

from .functional import lora_linear


class LoRALayer(torch.nn.Module):
    """The low-rank pair: ``A`` (in_dim, rank), kaiming-uniform; ``B`` (rank, out_dim), zeros."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        # Alone (without a base layer) this is the seed's two small products; the fused path is
        # LinearWithLoRA's.
        return self.alpha * (x @ self.A @ self.B)

    def extra_repr(self):
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.A.shape[1]}, alpha={self.alpha}"


class LinearWithLoRA(torch.nn.Module):
    """``linear(x) + alpha · (x A) B`` in one fused call."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return lora_linear(x, self.linear.weight, self.linear.bias, self.lora.A, self.lora.B, self.lora.alpha)


def replace_linear_with_lora(model, rank, alpha):
    """Replace every ``torch.nn.Linear`` below ``model`` with ``LinearWithLoRA``, in place.

    Layers already wrapped are left alone, so a second call does not wrap them twice.
    """
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            continue
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model
