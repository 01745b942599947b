"""Run peft's LoRA ``Linear`` layers through ``lora_linear``.

    from peft import LoraConfig, get_peft_model
    from lora_kernels.peft import fuse_lora, unfuse_lora

    model = get_peft_model(base_model, LoraConfig(r=16, lora_alpha=32, target_modules=[...]))
    report = fuse_lora(model)      # every plain peft LoRA Linear now runs one fused call
    ...                            # train / evaluate as usual; peft's API keeps working
    unfuse_lora(model)             # peft's own forwards back

``fuse_lora`` changes the class of each ``peft.tuners.lora.layer.Linear`` instance to
``FusedLinear``, a subclass whose only change is ``forward`` (``unfuse_lora`` changes it back).
Nothing is stored on the instance, so a pickled model (``torch.save(model)``; loading it needs
``lora_kernels`` importable), a ``copy.deepcopy`` and an ``nn.DataParallel`` replica (a shallow copy
of the instance) each run the fused forward on their own weights. The new forward computes

    lora_linear(x, W, base.bias, lora_A.weight.t(), lora_B.weight.t(), scaling, p)

with ``W = base.weight`` for an ``nn.Linear`` base (and an unbiased ``FalconLinear`` of
transformers, an ``nn.Linear`` computing ``x @ weight.T``), ``base.weight.t()`` for transformers'
``Conv1D`` (GPT-2's, which stores its weight as (in, out) and computes ``addmm(bias, x, weight)``;
peft marks it ``fan_in_fan_out``, which matters to merging only; where Conv1D's ``x.view`` would
refuse a non-contiguous input, the fused call computes), ``scaling = layer.scaling[adapter]``
(peft's ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, and any later
``set_scale``) and ``p`` the ``nn.Dropout`` probability of
``layer.lora_dropout[adapter]`` while that module is in training mode (0 in eval mode or for
``nn.Identity``, which is what peft uses for ``lora_dropout=0``).

Every call first checks that the layer is in a state this formula serves; if not, that call runs
peft's original forward, so results never depend on whether a layer was fused. peft's path serves:

* layers that are not plain LoRA linears: a base that is not exactly one of those three
  (bitsandbytes, GPTQ, HQQ, ... bases), peft layer classes other than ``lora.Linear`` (Embedding,
  Conv, quantized LoRA layers) and subclasses of it, and layers whose forward is already replaced
  on the instance (an ``accelerate`` hook keeps peft's forward and would bypass the class's);
  these are not patched;
* adapter configurations: DoRA, any other LoRA variant peft implements specially
  (``layer.lora_variant``), ``lora_bias=True``, not exactly one active adapter, an active adapter
  this layer has no weights for;
* states: adapters merged (``merge_adapter``) or disabled (``disable_adapter()``), peft's input
  casting turned off (``peft.helpers.disable_input_dtype_casting``: x reaches the adapters in its
  own dtype, which peft's forward refuses where they differ), a FalconLinear
  base with a bias (added after the product, it stays fp32 under autocast), weights that are
  tensor subclasses (torchao, sharded DTensors), hooks on ``base_layer`` / ``lora_A`` / ``lora_B`` /
  ``lora_dropout`` (accelerate offloading would be bypassed otherwise), and global module hooks
  (``register_module_forward_hook``: calibration and activation-statistics tools);
* calls: extra arguments (``adapter_names`` for mixed-batch inference, ``alora_offsets``, ...),
  an input that is a tensor subclass (tensor parallelism's DTensor activations), and an input
  or a base bias whose dtype differs from the base weight's outside autocast: ``F.linear`` raises
  there, so peft's forward runs and raises its own error rather than a different one from us.

Numerics: identical to peft for fp32 models. With 16-bit bases and fp32 adapters, peft casts x up
and runs the LoRA path in fp32; ``lora_linear`` runs every product in x's dtype with fp32
accumulation. Outputs and input gradients then differ from peft's at the 16-bit rounding level
(both are that far from a float64 evaluation); the adapters' gradients carry 16-bit rounding
error here (bf16: about 3e-3 relative) where peft's carry fp32's, and with an fp16 base S and dS
are fp16 here, whose range (65504) a loss-scaled dY may pass where peft's fp32 ones do not. Under
autocast both run the products in the autocast dtype.

Call ``fuse_lora`` on the peft model before wrapping it (DDP, ``fully_shard``, ``torch.compile``):
it finds the layers through ``named_modules`` and reads their weights to report. The patched
forward compiles whole with ``torch.compile(fullgraph=True)`` (the checks become guards).
"""

import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from peft.tuners.lora import layer as _peft_lora_layer
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer as _PeftLoraLayer
from transformers.pytorch_utils import Conv1D

from .functional import FUSABLE_TENSORS, lora_linear
from .modules import param, plain_module, readable_input

__all__ = ["fuse_lora", "unfuse_lora", "FuseReport"]

# How a fused call reads the base layer, by class: y = x Wᵀ + b with W the weight as stored, or
# transposed (GPT-2's Conv1D stores it as (in, out) and computes addmm(bias, x, weight)), or with
# no bias (transformers' FalconLinear, an nn.Linear computing x @ weight.T and then adding its
# bias, which autocast leaves in fp32, so that a biased one's output is fp32 there: those run
# peft's forward). FalconLinear is looked up once its module is imported (peft imports Conv1D).
_AS_STORED, _TRANSPOSED, _UNBIASED = "as stored", "transposed", "unbiased only"
_BASES = {torch.nn.Linear: _AS_STORED, Conv1D: _TRANSPOSED}
_FALCON = ("transformers.models.falcon.modeling_falcon", "FalconLinear")


def _layout(base_class):
    """How a fused call reads a base layer of this class; None if it serves none."""
    if base_class not in _BASES:
        falcon = getattr(sys.modules.get(_FALCON[0]), _FALCON[1], None)
        if falcon is not None:
            _BASES[falcon] = _UNBIASED
    return _BASES.get(base_class)


# Call kwargs peft's forward pops before calling the base layer; None means "not used".
_PEFT_CALL_KWARGS = ("adapter_names", "alora_offsets")

# Reasons a layer is never patched (fixed by its structure).
_NOT_LINEAR = ("not a peft lora.Linear (another LoRA layer type: Embedding, Conv, quantized, target_parameters' "
               "ParamWrapper, ...)")
_SUBCLASS = "a subclass of peft's lora.Linear (its methods may differ)"
_FORWARD_TAKEN = "its forward is already replaced on the instance (e.g. by an accelerate hook)"
_BASE = ("base layer is not exactly torch.nn.Linear, or transformers' Conv1D or FalconLinear (quantized or "
         "wrapped base)")
# Reasons a patched layer runs peft's forward, checked on every call.
_DISABLED = "adapters disabled"
_NO_CAST = "peft's input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
_MERGED = "adapter merged into the base weight"
_NOT_ONE = "not exactly one active adapter"
_ABSENT = "the active adapter has no LoRA weights in this layer"
_DORA = "DoRA (use_dora=True)"
_VARIANT = "a LoRA variant peft implements specially (layer.lora_variant)"
_LORA_BIAS = "lora_bias=True (lora_B carries a bias)"
_MODULES = "lora_A / lora_B / lora_dropout are not plain nn.Linear / nn.Dropout / nn.Identity"
_WEIGHTS = ("weights are not plain floating-point tensors (tensor subclass, e.g. torchao or a "
            "sharded DTensor), or lora_A and lora_B differ in dtype")
_HOOKS = ("hooks or a replaced forward on base_layer / lora_A / lora_B / lora_dropout (e.g. accelerate "
          "offloading), or global module hooks")
_SCALING = "scaling is not a finite Python number"
_BIAS_AFTER = ("a FalconLinear base with a bias (added after the product: in fp32 under autocast, where "
               "one fused call would return the product's dtype)")


@dataclass
class FuseReport:
    """What ``fuse_lora`` did. ``fused``: names of the layers that now run ``lora_linear``;
    ``fallback``: reason -> names of the LoRA layers that run peft's forward (as things stand at
    the ``fuse_lora`` call; patched layers re-check on every call). ``int(report)`` and
    ``len(report)`` are the number of fused layers."""

    fused: List[str] = field(default_factory=list)
    fallback: Dict[str, List[str]] = field(default_factory=dict)

    def __int__(self):
        return len(self.fused)

    def __len__(self):
        return len(self.fused)


def _plain_weight(t):
    return type(t) in FUSABLE_TENSORS and t.is_floating_point()


def _structural_reason(layer):
    """Why this LoRA layer is never patched, or None."""
    if not isinstance(layer, _PeftLoraLinear):
        return _NOT_LINEAR
    fused = isinstance(layer, FusedLinear)  # already patched (fully_shard may have subclassed it since)
    if not fused and type(layer) is not _PeftLoraLinear:
        return _SUBCLASS
    if not fused and "forward" in layer.__dict__:
        return _FORWARD_TAKEN
    if _layout(type(layer.base_layer)) is None:
        return _BASE
    return None


def _fused_call(layer):
    """For a patched layer in its current state: why it must run peft's forward (a str), or the
    arguments of its ``lora_linear`` call after x (one pass over the layer's attributes: they are
    looked up on every call, and each lookup costs host time)."""
    if layer.disable_adapters:
        return _DISABLED
    if not layer.__dict__.get("cast_input_dtype_enabled", True):  # (a plain attribute: set on the instance)
        return _NO_CAST
    if layer.merged:
        return _MERGED
    active = layer.active_adapters
    if len(active) != 1:
        return _NOT_ONE
    adapter = active[0]
    # Submodules and parameters are read from their dicts (see modules.param): a dozen lookups
    # through nn.Module's __getattr__ cost about 6 µs a call.
    modules = layer._modules
    lora_A = modules["lora_A"]._modules.get(adapter)
    if lora_A is None:
        return _ABSENT
    if layer.use_dora.get(adapter, False):
        return _DORA
    if adapter in getattr(layer, "lora_variant", {}):
        return _VARIANT
    if layer.lora_bias.get(adapter, False):
        return _LORA_BIAS
    base = modules["base_layer"]
    lora_B, dropout = modules["lora_B"]._modules.get(adapter), modules["lora_dropout"]._modules.get(adapter)
    if not (type(lora_A) is torch.nn.Linear and type(lora_B) is torch.nn.Linear
            and type(dropout) in (torch.nn.Dropout, torch.nn.Identity)
            and param(lora_A, "bias") is None and param(lora_B, "bias") is None):
        return _MODULES
    base_class = type(base)
    layout = _layout(base_class)
    if not (layout is not None and plain_module(base, base_class)
            and plain_module(lora_A, torch.nn.Linear) and plain_module(lora_B, torch.nn.Linear)
            and plain_module(dropout, type(dropout))):
        return _HOOKS
    weight, bias = param(base, "weight"), param(base, "bias")
    A, B = param(lora_A, "weight"), param(lora_B, "weight")
    if bias is not None and layout is _UNBIASED:
        return _BIAS_AFTER
    if not (_plain_weight(weight) and (bias is None or _plain_weight(bias)) and _plain_weight(A)
            and _plain_weight(B) and A.dtype == B.dtype):
        return _WEIGHTS
    scaling = layer.scaling[adapter]
    # (a NaN or infinite one, or an int no float holds, which lora_linear refuses: peft's forward
    # gives what peft gives, so fusing never changes a layer's result)
    if type(scaling) not in (float, int) or not abs(scaling) <= sys.float_info.max:
        return _SCALING
    p = dropout.p if type(dropout) is torch.nn.Dropout and dropout.training else 0.0
    return weight.t() if layout is _TRANSPOSED else weight, bias, A.t(), B.t(), float(scaling), p


class FusedLinear(_PeftLoraLinear):
    """peft's ``lora.Linear`` with its forward run through ``lora_linear`` (see module doc)."""

    def forward(self, x, *args, **kwargs):
        call = None
        if not args and all(k in _PEFT_CALL_KWARGS and v is None for k, v in kwargs.items()) \
                and readable_input(x):
            call = _fused_call(self)
        if type(call) is not tuple:
            return super().forward(x, *args, **kwargs)
        weight, bias = call[0], call[1]
        if (x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype)) \
                and not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)  # (F.linear raises: peft's own error)
        return lora_linear(x, *call)

    def _get_name(self):  # repr(model) reads as peft's
        return _PeftLoraLinear.__name__


# peft's LoRA for nn.MultiheadAttention keeps a LoRA Linear on its base's out_proj, whose weight it
# merges in around each call and whose forward nothing calls: the outer layer stands for both.
_PeftMultiheadAttention = getattr(_peft_lora_layer, "MultiheadAttention", ())


def _lora_layers(model):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _PeftLoraLayer)]
    inner = {id(m) for _, outer in layers if isinstance(outer, _PeftMultiheadAttention)
             for m in outer.base_layer.modules()}
    return [(name, m) for name, m in layers if id(m) not in inner]


def _describe(layer, reason):
    """The reason with the detail that tells layers apart (a class, the active adapters)."""
    if reason in (_NOT_LINEAR, _SUBCLASS):
        return f"{reason}: {type(layer).__name__}"
    if reason == _BASE:
        return f"{reason}: base {type(layer.base_layer).__name__}"
    if reason == _NOT_ONE:
        return f"{reason}: active {list(layer.active_adapters)}"
    if reason == _VARIANT:
        return f"{reason}: {type(layer.lora_variant[layer.active_adapters[0]]).__name__}"
    return reason


def fuse_lora(model):
    """Make every peft LoRA ``Linear`` layer below ``model`` run its forward through
    ``lora_kernels.lora_linear``, in place. Returns a ``FuseReport`` (``int(report)`` = number of
    fused layers). Layers or states it cannot serve keep peft's forward (see the module doc); one
    ``UserWarning`` per call names them, grouped by reason. Layers peft makes later (``add_adapter``
    on a new target) need another call; calling it again is harmless: layers already patched are
    not wrapped twice. ``unfuse_lora`` undoes it.
    """
    report = FuseReport()
    for name, layer in _lora_layers(model):
        reason = _structural_reason(layer)
        if reason is None:
            if not isinstance(layer, FusedLinear):
                layer.__class__ = FusedLinear
            call = _fused_call(layer)
            reason = call if isinstance(call, str) else None
        if reason is None:
            report.fused.append(name)
        else:
            report.fallback.setdefault(_describe(layer, reason), []).append(name)
    if not report.fused and not report.fallback:
        warnings.warn(f"lora_kernels.fuse_lora: no peft LoRA layers found in {type(model).__name__}",
                      UserWarning, stacklevel=2)
    if report.fallback:
        n = sum(len(v) for v in report.fallback.values())
        lines = [f"lora_kernels.fuse_lora: {n} LoRA layer(s) run peft's own forward, "
                 f"{len(report.fused)} run lora_linear:"]
        for reason, names in report.fallback.items():
            lines.append(f"  {reason} -> {', '.join(names)}")
        warnings.warn("\n".join(lines), UserWarning, stacklevel=2)
    return report


def unfuse_lora(model):
    """Give every layer patched by ``fuse_lora`` below ``model`` its original forward back.
    Returns the number of layers restored."""
    restored = 0
    for name, layer in _lora_layers(model):
        if not isinstance(layer, FusedLinear):
            continue
        if type(layer) is not FusedLinear or "forward" in layer.__dict__:
            # Changing the class back would drop the class made since (fully_shard's), and a hook
            # that replaced forward on the instance would keep calling the fused one.
            warnings.warn(f"lora_kernels.unfuse_lora: {name}'s forward or class was replaced after "
                          "fuse_lora (by a hook, fully_shard?); left as it is", UserWarning, stacklevel=2)
            continue
        layer.__class__ = _PeftLoraLinear
        restored += 1
    return restored
