"""lora_kernels: a fused LoRA linear layer for PyTorch, with Triton kernels forward and backward."""

from .functional import lora_linear
from .modules import LinearWithLoRA, LoRALayer, replace_linear_with_lora

__version__ = "0.1.0"
__all__ = ["lora_linear", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]
