"""Drop-in modules with the seed's constructors, initialisation and state-dict keys.

A state dict saved from the seed's ``LinearWithLoRA`` (``linear.weight``, ``linear.bias``,
``lora.A``, ``lora.B``) loads into these with ``strict=True``, and back. Also here:
``replace_linear_with_lora`` and ``merge_and_unload``, and the checks ``peft.py`` shares for whether
a call may fuse (``plain_module``, ``param``, ``readable_input``).
"""

import contextlib
import math
import numbers
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules import module as _module

from . import reference
from .functional import FUSABLE_TENSORS, lora_linear


class LoRALayer(reference.LoRALayer):
    """The seed's low-rank pair, its initialisation and forward unchanged (``A`` (in_dim, rank),
    kaiming-uniform; ``B`` (rank, out_dim), zeros; alone, ``alpha · x A B``). The constructor also
    checks rank (an int >= 1) and alpha (a finite real number, or a tensor), and holds a constant
    one-element tensor alpha as a number. The fused path is ``LinearWithLoRA``'s."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        # (here, naming it, rather than at the first forward from inside a multiplication)
        if not isinstance(alpha, (numbers.Real, torch.Tensor)):
            raise TypeError(f"alpha must be a real number or a tensor, got {type(alpha).__name__}")
        super().__init__(in_dim, out_dim, rank, alpha)
        if (isinstance(alpha, torch.Tensor) and not isinstance(alpha, torch.nn.Parameter) and alpha.numel() == 1
                and alpha.dim() <= 1 and not alpha.requires_grad):
            # A constant one-element tensor (the seed's layer takes one; with one dimension at most
            # it scales without broadcasting any x) held as a number: torch.compile could only read
            # a tensor's value through a data-dependent .item().
            self.alpha = alpha.item()
        if isinstance(self.alpha, numbers.Real) and not -math.inf < self.alpha < math.inf:
            raise ValueError(f"alpha must be finite, got {self.alpha}")

    def reset_parameters(self):
        """Draw A and zero B again, as ``__init__`` does: what tools call on each module of a model
        built on the meta device once ``to_empty`` has given it memory (FSDP2's recipe for models
        too large to build whole; FSDP1's default ``param_init_fn``). Without it the adapters
        would keep whatever that memory held."""
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        torch.nn.init.zeros_(self.B)

    def extra_repr(self):
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.A.shape[1]}, alpha={self.alpha}"


def plain_module(module, cls):
    """Whether calling ``module`` runs ``cls.forward`` and nothing else, so that a fused call may
    compute it from its weights without calling it: exactly ``cls`` (not a subclass), no forward
    replaced on the instance, no hooks of its own (forward or backward) and no global module hooks.
    Subclasses (QAT, bitsandbytes, ...) and hooks (weight_norm's, accelerate's offloading, FSDP2
    sharding the layer itself, activation-statistics tools) need the module's own call."""
    return (type(module) is cls and "forward" not in module.__dict__
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks or _module._global_forward_hooks
                     or _module._global_forward_pre_hooks or _module._global_backward_hooks
                     or _module._global_backward_pre_hooks))


def param(module, name):
    """``module.<name>`` for a tensor a module holds, read without nn.Module's ``__getattr__``
    (about 0.6 µs a lookup, and a layer's call makes several), in attribute access's order: an
    instance attribute (a DataParallel replica's weights are set so), else a parameter (where
    ``torch.func.functional_call`` and FSDP2 put theirs), else a buffer (a frozen weight may be
    one), else None. The same as attribute access for the exact classes the fused calls accept
    (``plain_module``), which define no properties of these names; call it after that check
    (a scripted module's dicts are of another kind)."""
    attrs = module.__dict__
    if name in attrs:
        return attrs[name]
    value = module._parameters.get(name)
    return module._buffers.get(name) if value is None else value


def plain_tensors(*tensors):
    """Whether each tensor (None allowed) is a plain ``torch.Tensor`` or ``nn.Parameter``, whose
    storage the kernels may read, or a fake one standing for it (``functional.FUSABLE_TENSORS``).
    A subclass (a torchao quantized weight, tensor parallelism's DTensor) means something else by
    its storage and computes through its own ops."""
    return all(t is None or type(t) in FUSABLE_TENSORS for t in tensors)


def fusable_alpha(alpha):
    """Whether the fused call takes ``alpha``: a real number, or a constant one-element real tensor
    of at most one dimension. The seed's layer also trains an alpha given as a Parameter,
    broadcasts a tensor of several values (one per column, say) or of more dimensions, and takes
    a bool or complex one: those run its own calls."""
    if isinstance(alpha, torch.Tensor):
        return (alpha.numel() == 1 and alpha.dim() <= 1 and not alpha.requires_grad
                and not alpha.is_complex() and alpha.dtype != torch.bool)
    return isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)


def readable_input(x):
    """Whether the kernels can read the input ``x``: a plain tensor, dense and not nested. A sparse
    or nested one runs the unfused calls (which serve what they can, a jagged nested tensor say)."""
    return type(x) in FUSABLE_TENSORS and x.layout is torch.strided and not x.is_nested


class LinearWithLoRA(torch.nn.Module):
    """``linear(x) + alpha · (dropout(x) A) B`` in one fused call.

    ``dropout`` is peft's ``lora_dropout``: applied to the LoRA path's input in training mode only.
    ``merge()`` folds the update into ``linear.weight`` for inference (the forward is then the base
    layer alone, at its speed); ``unmerge()`` takes it out again.

    A ``linear`` that is not a plain, unhooked ``nn.Linear`` (or a ``lora`` that is not a plain,
    unhooked ``LoRALayer``), or weights or an input that are tensor subclasses, run the
    reference's calls, ``linear(x) + lora(x)``, unfused. The adapters start on ``linear``'s device,
    in the default dtype (fp32), drawn on the default device as the reference's are, so the numbers
    are the reference's.
    """

    # True where replace_linear_with_lora found the weight shared with another module (or a user
    # set it): merge() then refuses. A class default, so __init__ need not set it and a layer
    # pickled before the attribute existed still loads.
    weight_tied = False

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        # (a number, checked here: a bool or a tensor would pass in eval mode and fail the first
        # training step)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a number in [0, 1], got {type(dropout).__name__}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if not all(hasattr(linear, a) for a in ("in_features", "out_features", "weight")):
            raise TypeError("LinearWithLoRA wraps a linear layer (an nn.Linear: in_features, out_features and "
                            f"weight), got {type(linear).__name__}")
        self.linear = linear
        # Drawn on the default device, as the reference's, then moved; fake ones (a model built
        # under FakeTensorMode, where torch's .to() of a parameter fails) made on the weight's.
        device = linear.weight.device
        with torch.device(device) if type(linear.weight) is FakeTensor else contextlib.nullcontext():
            self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        if self.lora.A.device != device:
            self.lora.to(device)
        self.dropout = dropout
        self.merged = False
        self.register_state_dict_post_hook(_save_unmerged)
        self.register_load_state_dict_pre_hook(_load_unmerged)
        self.register_load_state_dict_post_hook(_remerge_after_load)

    def forward(self, x):
        if self.merged:
            return self.linear(x)
        p = self.dropout if self.training else 0.0
        # The reference's own calls where the fused one would skip something (see plain_module and
        # plain_tensors), cannot read x (readable_input) or take alpha (fusable_alpha), and for
        # torch.fx's symbolic tracing (x a Proxy), which records them as the reference's graph.
        linear, lora = self._modules["linear"], self._modules["lora"]  # (dict reads: see param)
        if (plain_module(linear, torch.nn.Linear) and plain_module(lora, LoRALayer) and readable_input(x)
                and fusable_alpha(lora.alpha)):
            weight, bias, A, B = param(linear, "weight"), param(linear, "bias"), param(lora, "A"), param(lora, "B")
            if plain_tensors(weight, bias, A, B):
                return lora_linear(x, weight, bias, A, B, lora.alpha, p)
        y = self.linear(x)
        x = torch.nn.functional.dropout(x, p) if p else x
        return y + self.lora(x.to(self.lora.A.dtype)).to(y.dtype)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given or finds inside one: fail here,
        # saying what to do, rather than deep in TorchScript's compiler about _modules.
        raise RuntimeError("LinearWithLoRA cannot be compiled by torch.jit.script (its forward reads its "
                           "submodules through __dict__ and calls Triton kernels): use torch.compile or "
                           "torch.export, or lora_kernels.merge_and_unload(model) first to script the merged model")

    def _delta(self):
        # alpha · (A B)ᵀ, in fp32 at least so merging and unmerging round only once, into W's dtype.
        dtype = torch.promote_types(self.linear.weight.dtype, torch.float32)
        # (alpha on A B, then transposed: a per-column alpha, shape (out,), scales its columns, as in
        # the seed's alpha · (x A B))
        delta = self.lora.alpha * (self.lora.A.to(dtype) @ self.lora.B.to(dtype))
        if delta.shape != self.lora.A.shape[:1] + self.lora.B.shape[1:] or delta.is_complex():
            raise ValueError(f"an alpha of shape {tuple(getattr(self.lora.alpha, 'shape', ()))} (or complex) does not "
                             "fold into linear.weight: the layer is left unmerged")
        return delta.t()

    def _updated(self, weight, sign):
        """``weight`` plus (sign 1) or minus (-1) ``_delta()``, summed as wide and rounded once to
        weight's dtype."""
        return torch.add(weight.to(torch.promote_types(weight.dtype, torch.float32)), self._delta(),
                         alpha=sign).to(weight.dtype)

    @torch.no_grad()
    def _merged_weight(self):
        """``linear.weight`` with the update folded in, in its dtype, written nowhere; raises
        ValueError where ``merge`` refuses."""
        if type(self.linear) is not torch.nn.Linear or "weight" not in self.linear._parameters:
            raise ValueError(f"merge() needs a plain nn.Linear that stores its weight, got "
                             f"{type(self.linear).__name__} (a subclass with its own forward, or a weight "
                             "computed from others, as weight_norm's is); the layer is left unmerged")
        if self.weight_tied:
            raise ValueError("linear.weight is shared with another module or place (tied weights, e.g. an "
                             "lm_head tied to the embedding, or one nn.Linear used twice): merging would "
                             "change the other too; the layer is left unmerged (to merge a model, wrap it "
                             "without that layer: replace_linear_with_lora on its blocks, not on the lm_head)")
        weight = self.linear.weight
        merged = self._updated(weight, 1)  # checked after the cast: fp16 overflows to inf there
        if not torch.isfinite(merged).all():
            bad = (~torch.isfinite(merged)).sum().item()
            raise ValueError(f"merging would put {bad} non-finite values into linear.weight "
                             f"({tuple(weight.shape)}, {weight.dtype}); the layer is left unmerged")
        return merged

    @torch.no_grad()
    def merge(self):
        """Fold ``alpha · (A B)ᵀ`` into ``linear.weight``; refuses if that would hold NaN or Inf, if
        the weight is tied (it would change another module or place too: ``weight_tied``, set by
        ``replace_linear_with_lora`` for ties inside the module it was given, or by hand), or if
        ``linear`` is not a plain nn.Linear storing its weight (weight_norm's is computed: the
        merge would be lost)."""
        if not self.merged:
            self.linear.weight.copy_(self._merged_weight())
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of ``linear.weight`` (exact up to its dtype's rounding)."""
        if not self.merged:
            return self
        weight = self.linear.weight
        weight.copy_(self._updated(weight, -1))
        self.merged = False
        return self

    def extra_repr(self):
        return f"dropout={self.dropout}, merged={self.merged}"


@torch.no_grad()
def _save_unmerged(module, state_dict, prefix, local_metadata):
    # A merged layer saves its weight unmerged: the state dict means the same whether or not the
    # layer was merged when it was saved, so loading it never applies the update twice.
    if module.merged:
        key = prefix + "linear.weight"
        weight = state_dict[key]
        state_dict[key] = module._updated(weight, -1)


def _load_unmerged(module, state_dict, prefix, local_metadata, *args):
    # A state dict holds the weight unmerged (above): a merged layer unmerges before it loads one,
    # and merges again after (with the adapters it loaded), so it never holds a stale update.
    module._remerge = module.merged
    module._assigned = local_metadata.get("assign_to_params_buffers", False)
    module.unmerge()


def _remerge_after_load(module, incompatible_keys):
    if not getattr(module, "_remerge", False):
        return
    module._remerge = False
    if module._assigned:  # load_state_dict(assign=True): the weight is the caller's tensor now
        module.linear.weight.data = module.linear.weight.data.clone()
    try:
        module.merge()
    except ValueError as error:  # the load itself went through: stay unmerged, say why
        warnings.warn(f"loaded, but left unmerged: {error}", UserWarning, stacklevel=2)


def replace_linear_with_lora(model, rank, alpha, dropout=0.0):
    """Replace every ``torch.nn.Linear`` below ``model`` with ``LinearWithLoRA``, in place.

    Layers already wrapped (by this package or the seed) are left alone, as is ``model`` if it is
    one, so a second call does not wrap them twice; ``model`` itself an ``nn.Linear`` is left as it
    is, with a warning (the seed's passes it by silently: it only replaces children). A layer whose
    weight is shared with another module (an lm_head tied to the embedding) is marked so, and its
    ``merge()`` refuses; a block reused in several places is no such tie. PyTorch's ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` are left alone, with a
    warning: they read their Linears' weights themselves (MultiheadAttention always, the layers'
    fast path in eval mode), past any adapter. transformers' ``Conv1D`` (GPT-2's linear layers)
    is no ``nn.Linear``: it is passed by, as the seed passes it, but with a warning, since a GPT-2
    then gets one adapter, on its lm_head (peft's LoRA serves Conv1D). A peft model's adapter layers
    and ``modules_to_save`` copies are left alone, with a warning (``lora_kernels.peft.fuse_lora``
    is the way to fuse them).
    """
    if isinstance(model, (LinearWithLoRA, reference.LinearWithLoRA)):  # wrapped already: its linear too
        return model
    # A weight is tied when it serves more than one place: two distinct modules hold it, or its
    # module fills two slots (one nn.Linear under two parents, or under two names of one; each
    # parent's wrapper then has its own adapter around the one weight, as the seed's does). A
    # block reused in several places is no tie: its Linear fills one slot, in the block, and gets
    # one wrapper, so merging changes every place alike. (modules() lists each module once;
    # _modules keeps every name.)
    slots = {}
    for parent in model.modules():
        for child in parent._modules.values():
            if child is not None:
                slots[id(child)] = slots.get(id(child), 0) + 1
    counts = {}
    for module in model.modules():
        for place in map(_place, module.parameters(recurse=False)):
            counts[place] = counts.get(place, 0) + slots.get(id(module), 1)
    skipped = {}  # why -> names
    why = _left_alone(model)
    if why is None and isinstance(model, torch.nn.Linear):  # (no parent to put a wrapper in)
        why = _ITSELF
    if why:
        skipped[why] = ["the module given"]
    else:
        _replace(model, rank, alpha, dropout, {i for i, n in counts.items() if n > 1}, "", skipped)
    if skipped:
        warnings.warn("\n".join(f"replace_linear_with_lora left these modules without LoRA ({why}): "
                                + ", ".join(names) for why, names in skipped.items()), UserWarning, stacklevel=2)
    return model


def merge_and_unload(model):
    """Fold every ``LinearWithLoRA``'s update into its linear and put that linear back where the
    layer was, in place: the model ``replace_linear_with_lora`` was given, with merged weights and
    its own state-dict keys, for inference and export (peft's ``merge_and_unload``). Returns the
    model (the linear itself when ``model`` is one LinearWithLoRA). If a layer cannot merge (see
    ``merge``), the error, naming the layer, is raised before any weight is written: nothing changes."""
    # (every name a layer has: named_children() would list a layer under two names of one parent once)
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if isinstance(child, LinearWithLoRA)]
    layers = [layer for *_, layer in slots] + ([model] if isinstance(model, LinearWithLoRA) else [])
    seed_layers = [name for name, m in model.named_modules() if isinstance(m, reference.LinearWithLoRA)]
    if not layers and not seed_layers:
        # (as a mistaken call, a peft model's say, it must not pass for a merged model)
        raise ValueError("merge_and_unload found no lora_kernels.LinearWithLoRA layers in the model: nothing to "
                         "merge (a peft model, fused by lora_kernels.peft or not, merges with its own "
                         "merge_and_unload())")
    pending = [layer for layer in dict.fromkeys(layers) if not layer.merged]
    # An FSDP2 unit (or a layer whose weights are sharded DTensors) cannot be unloaded: the linear
    # put back would hold shards with nothing left to gather them, and fail at its next call.
    sharded = [name or "the model" for name, m in model.named_modules() if isinstance(m, LinearWithLoRA) and _sharded(m)]
    if sharded:
        raise ValueError("merge_and_unload cannot unload FSDP-sharded layers (" + ", ".join(sharded)
                         + "): load a full state dict into an unsharded copy of the model and merge that")
    # Every layer's checks first, one merged weight at a time (holding them all would double a
    # model's memory), then the writes: merging some and unmerging them on a refusal would round
    # a 16-bit weight twice, changing weights the call promised to leave alone.
    names = {id(m): name or "the model" for name, m in model.named_modules()}
    for layer in pending:
        try:
            layer._merged_weight()
        except ValueError as error:  # (which layer: merge() alone cannot know its name)
            raise ValueError(f"merge_and_unload changed nothing: {names[id(layer)]} cannot merge: {error}") from None
    for layer in pending:
        layer.merge()
    for parent, name, layer in slots:
        setattr(parent, name, layer.linear)
    if seed_layers:  # (the seed's layer has no merge: say so rather than hand back a model still wrapped)
        warnings.warn("merge_and_unload left the seed's LinearWithLoRA layers (lora_kernels.reference) "
                      "unmerged, which it cannot merge: " + ", ".join(seed_layers), UserWarning, stacklevel=2)
    return model.linear if isinstance(model, LinearWithLoRA) else model


def _sharded(layer):
    """Whether a layer is (or holds) an FSDP2 unit, or has DTensor parameters (FSDP2, tensor parallel)."""
    fsdp = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", ())
    return (any(isinstance(m, fsdp) for m in layer.modules())
            or any(type(p).__name__ == "DTensor" for p in layer.parameters()))


# Modules whose forward reads their Linear children's weight and bias itself instead of calling them.
_TORCH_ATTENTION_LAYERS = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
_TORCH_ATTENTION = ("PyTorch's attention and transformer layers read their Linears' weights directly, "
                    "past any adapter")
# GPT-2's linear layers in transformers: no nn.Linear, so the seed's replacement passes them by,
# and a model would silently train adapters on its lm_head alone.
_CONV1D = ("transformers' Conv1D, GPT-2's linear layer, is not an nn.Linear: peft's LoRA takes it, and "
           "lora_kernels.peft.fuse_lora fuses it")
_CONV1D_SUBCLASS = ("a subclass of transformers' Conv1D is not an nn.Linear: peft's LoRA takes it, and runs its "
                    "own forward there (lora_kernels.peft.fuse_lora fuses Conv1D itself only)")


# A peft model's adapter layers (LoRA's and every other tuner's) and its trained copies
# (modules_to_save): their Linears wrapped, a peft model would get adapters on its adapters,
# which mark_only_lora_as_trainable then freezes.
_PEFT_LAYERS = ("BaseTunerLayer", "AuxiliaryTrainingWrapper")
_PEFT = ("peft's adapter layers and modules_to_save hold what peft trains: lora_kernels.peft.fuse_lora runs a "
         "peft model's LoRA layers through the fused kernels")
_ITSELF = ("an nn.Linear given itself has no parent to put its wrapper in: wrap it with "
           "LinearWithLoRA(linear, rank, alpha)")


def _left_alone(module):
    """Why ``replace_linear_with_lora`` wraps nothing in or of ``module``, or None."""
    if isinstance(module, _TORCH_ATTENTION_LAYERS):
        return _TORCH_ATTENTION
    # (matched by name, a subclass too: transformers and peft need not be installed)
    mro = type(module).__mro__
    conv1d = [c for c in mro if c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")]
    if conv1d:
        return _CONV1D if conv1d[0] is type(module) else _CONV1D_SUBCLASS
    if any(c.__name__ in _PEFT_LAYERS and c.__module__.startswith("peft.") for c in mro):
        return _PEFT
    return None


def _place(p):
    """Where a parameter's values live: two parameters in one place are one weight. Not only the same
    Parameter object: a tied state dict loaded with ``load_state_dict(..., assign=True)`` (a model
    built on the meta device) gives the embedding and the lm_head two Parameters over one memory.
    By the first element's address: views of one buffer at different offsets (a flat buffer's
    slices) are not tied. Meta, empty and subclass tensors (DTensor shards) fall back to the object."""
    if type(p.data) is torch.Tensor and p.device.type != "meta" and p.numel() > 0:
        return (p.device, p.data_ptr())
    return id(p)


def _replace(model, rank, alpha, dropout, shared, prefix, skipped):
    for name, module in model.named_children():
        if isinstance(module, (LinearWithLoRA, reference.LinearWithLoRA)):
            continue
        why = _left_alone(module)
        if why:
            skipped.setdefault(why, []).append(prefix + name)
        elif isinstance(module, torch.nn.Linear):
            layer = LinearWithLoRA(module, rank, alpha, dropout)
            layer.weight_tied = _place(module.weight) in shared
            setattr(model, name, layer)
        else:
            _replace(module, rank, alpha, dropout, shared, f"{prefix}{name}.", skipped)
