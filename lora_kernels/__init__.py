"""lora_kernels: a fused LoRA linear layer for PyTorch, with Triton kernels forward and backward."""

from .adapters import (count_parameters, format_parameter_count, load_adapter, lora_state_dict,
                       mark_only_lora_as_trainable, peft_alpha, save_adapter)
from .functional import lora_linear
from .modules import LinearWithLoRA, LoRALayer, merge_and_unload, replace_linear_with_lora

__version__ = "0.1.0"
__all__ = ["lora_linear", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "merge_and_unload",
           "mark_only_lora_as_trainable", "count_parameters", "format_parameter_count", "lora_state_dict",
           "save_adapter", "load_adapter", "peft_alpha"]
