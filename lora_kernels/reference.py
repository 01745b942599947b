"""The oracle: the reference code of the seed document this project grew from, kept verbatim in behaviour.

Tests and benchmarks compare against these, ``modules.LoRALayer`` subclasses its ``LoRALayer``, and
a wrapped layer the kernels cannot read runs its unfused calls. Plain PyTorch: they never call the
kernels.
"""

import math

import torch


class LoRALayer(torch.nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def lora_linear_reference(x, weight, bias, A, B, alpha):
    """The seed's formula as a function: ``linear(x) + alpha * (x @ A @ B)``."""
    return torch.nn.functional.linear(x, weight, bias) + alpha * (x @ A @ B)
