"""Training utilities for LoRA adapters: freeze the base, count parameters, save and load A and B,
and ``peft_alpha`` (peft's lora_alpha and r as the seed's alpha).

The adapter of a model is the ``A`` and ``B`` of every ``LoRALayer`` in it (the seed's point 4:
per task, store only these). Their names are the model's own state-dict names, e.g.
``blocks.0.attn.qkv.lora.A``, so an adapter file loads into any model built the same way:
the same base architecture passed through ``replace_linear_with_lora`` with the same rank and alpha.
Names are taken below the usual wrappers (``torch.compile``'s ``_orig_mod``, also where a compiled
submodule sits, and the ``.module`` of ``DistributedDataParallel`` / ``DataParallel``), so an
adapter saved from a wrapped model loads into the plain one and the other way round. FSDP2
(``fully_shard``) adapters are DTensors: files always hold the plain, full tensors, and a sharded
model saves and loads them as one (see ``save_adapter``).
"""

import json
import math
import numbers
import os
import pickle
from collections import namedtuple

import torch

from . import reference
from .modules import LinearWithLoRA

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover (torch built without distributed)
    DTensor = distribute_tensor = None

try:  # FSDP1's flat parameters: refused (_refuse_fsdp1)
    from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP1
except ImportError:  # pragma: no cover
    _FSDP1 = None

try:  # optional: without it adapters are written with torch.save
    import safetensors.torch as _safetensors
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _safetensors = None

# Name of the metadata entry holding {layer name: {"rank": r, "alpha": a}} as JSON. safetensors
# metadata is str -> str, so one JSON string keeps the per-layer values typed and exact.
_LAYERS_KEY = "lora_kernels.layers"
_FORMAT_KEY = "format"
_FORMAT = "lora_kernels.adapter.v1"

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


def _unwrap(model):
    """The module inside ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel`` wrappers,
    so adapter names do not depend on them (no ``_orig_mod.`` or ``module.`` prefix)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _without_compile(name):
    """``name`` without torch.compile's ``_orig_mod`` parts, which sit wherever a submodule was
    compiled and put back (``layers.0._orig_mod.attn...``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _unprefixed(key, params):
    """A file's name as the model knows it: files saved by earlier versions from a wrapped model
    carry the wrappers' names (``module.`` in front, ``_orig_mod.`` anywhere), dropped where the
    model has no such name itself."""
    key = _without_compile(key)
    while key not in params and key.startswith("module."):
        key = key.split(".", 1)[1]
    return key


def _lora_layers(model):
    """(name, LoRALayer) for every adapter below ``model``, ``model`` itself included, named as in
    the plain model (no wrapper's ``module.`` or ``_orig_mod.``). ``lora_kernels.reference``'s
    LoRALayer (the seed's code) counts too: this package's derives from it, with the same A, B
    and alpha."""
    return [(_without_compile(name), m) for name, m in _unwrap(model).named_modules()
            if isinstance(m, reference.LoRALayer)]


def _refuse_fsdp1(model):
    """FSDP1 (``FullyShardedDataParallel``) keeps each rank's slice of flattened parameters: A and B
    there are 1-D shards (some empty), which would be saved as such or fail deep inside."""
    if _FSDP1 is not None and any(isinstance(m, _FSDP1) for m in model.modules()):
        raise ValueError("the model is wrapped in FullyShardedDataParallel (FSDP1), whose parameters are "
                         "flattened shards that lora_kernels does not gather: use FSDP2 (fully_shard), whose "
                         "sharded adapters save_adapter gathers and load_adapter distributes, or save and "
                         "load with the model unwrapped")


def _is_dtensor(t):
    return DTensor is not None and isinstance(t, DTensor)


def _key(layer_name, param):
    return f"{layer_name}.{param}" if layer_name else param


def mark_only_lora_as_trainable(model):
    """Set ``requires_grad`` on the LoRA ``A`` and ``B`` only, every other parameter frozen.

    Returns ``model``. Build the optimizer afterwards (or from ``requires_grad`` parameters) so it
    does not hold state for the frozen base. A model without LoRA layers raises ``ValueError``:
    freezing all of it would leave nothing to train, without a word (a peft model's adapters are
    peft's own modules: peft marks them trainable itself).
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers (lora_kernels.LoRALayer or its reference's): freezing "
                         "every parameter would leave nothing to train; call replace_linear_with_lora first")
    lora = {id(p) for _, layer in layers for p in (layer.A, layer.B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)
    return model


def count_parameters(model):
    """``(trainable, total)`` numbers of parameter elements; a shared parameter counts once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips duplicates of tied weights
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def format_parameter_count(trainable, total):
    """E.g. ``"trainable 12,288 of 1,234,567 (0.99%)"``."""
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} of {total:,} ({share:.2f}%)"


def lora_state_dict(model):
    """The adapter tensors only, keyed by their full names in ``model`` (below any
    ``torch.compile`` / DDP / DataParallel wrapper).

    Like ``state_dict()``, the values are detached and share storage with the parameters (under
    FSDP2 they are the sharded DTensors).
    """
    _refuse_fsdp1(model)
    out = {}
    for name, layer in _lora_layers(model):
        out[_key(name, "A")] = layer.A.detach()
        out[_key(name, "B")] = layer.B.detach()
    return out


def _alpha(layer):
    """The layer's alpha as a Python float (it may be a 0-d tensor or a numpy scalar, which json
    cannot write and which compare as tensors), or a list of them for one of several values (one
    per output column, which the seed's layer broadcasts)."""
    alpha = layer.alpha
    if isinstance(alpha, torch.Tensor) and alpha.numel() != 1:
        return alpha.detach().cpu().double().reshape(-1).tolist()
    return float(alpha.detach() if isinstance(alpha, torch.Tensor) else alpha)


def _same_alpha(a, b):
    """Equal up to float32 rounding (an alpha given as a float32 scalar is the same setting), value by value."""
    a, b = (v if isinstance(v, list) else [v] for v in (a, b))
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def _layer_metadata(model):
    layers = {name: {"rank": layer.A.shape[1], "alpha": _alpha(layer)} for name, layer in _lora_layers(model)}
    return {_FORMAT_KEY: _FORMAT, _LAYERS_KEY: json.dumps(layers)}


def _is_safetensors(path):
    """Whether ``save_adapter`` writes ``path`` with safetensors: by its extension, in any case."""
    return os.fspath(path).lower().endswith(".safetensors")


def _holds_safetensors(path):
    """Whether the file at ``path`` is in safetensors' format, by its content (a renamed file too):
    an 8-byte little-endian header length, then the JSON header's "{". torch.save writes a zip
    ("PK") or, in its legacy format, a pickle; neither starts so."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _require_safetensors(path):
    if _safetensors is None:
        raise ImportError(f"{os.fspath(path)!r} asks for the safetensors format but the safetensors "
                          "package is not installed: `pip install safetensors`, or give a path "
                          "with another extension (e.g. .pt) to use torch.save")


def save_adapter(model, path):
    """Write only the adapter (``lora_state_dict``) plus each layer's rank and alpha to ``path``.

    A path ending in ``.safetensors`` (in any case) is written with safetensors (which must be
    installed); any other with ``torch.save``. (``load_adapter`` reads either by the content.)
    Tensors are stored as plain, full tensors on the CPU in their own dtype; alpha is stored as a
    float (a list of them for one value per output column).

    Sharded adapters (FSDP2's DTensors) are gathered with ``full_tensor()``, a collective: then
    every rank must call ``save_adapter`` with the same path, rank 0 alone writes the file, and all
    ranks return once it is written (a barrier), so any rank can read it next. A model without
    DTensors (plain, DDP) is written by whichever process calls, with no communication.
    """
    if not _lora_layers(model):
        raise ValueError("model has no LoRA layers to save; call replace_linear_with_lora first")
    if _is_safetensors(path):  # before the gather, so every rank raises alike
        _require_safetensors(path)
    state = lora_state_dict(model)
    sharded = any(_is_dtensor(v) for v in state.values())
    # Own, contiguous CPU copies: safetensors rejects non-contiguous or storage-sharing tensors,
    # and the adapter is small enough that copying costs nothing.
    tensors = {k: (v.full_tensor() if _is_dtensor(v) else v).to("cpu", copy=True).contiguous()
               for k, v in state.items()}
    if sharded and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return
    metadata = _layer_metadata(model)
    try:
        if _is_safetensors(path):
            _safetensors.save_file(tensors, os.fspath(path), metadata=metadata)
        else:
            torch.save({"tensors": tensors, "metadata": metadata}, path)
    finally:  # also on failure, so the other ranks are not left waiting until the group's timeout
        if sharded:
            torch.distributed.barrier()


def _read_adapter(path):
    """(tensors, metadata) from a file written by ``save_adapter``, in either format whatever its name."""
    not_adapter = f"{os.fspath(path)!r} is not an adapter file written by save_adapter"
    if _holds_safetensors(path):
        _require_safetensors(path)
        try:
            tensors = _safetensors.load_file(os.fspath(path), device="cpu")
            with _safetensors.safe_open(os.fspath(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except _SafetensorError as e:  # (e.g. truncated)
            raise ValueError(f"{not_adapter} (safetensors: {e})") from e
        return tensors, metadata
    # weights_only: an adapter is tensors and strings, so never unpickle arbitrary objects. (From an
    # open file: torch.load hands a path ending in .safetensors to safetensors, whatever it holds.)
    with open(path, "rb") as f:
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
            # (what torch.load raises from deep inside for other files: KeyError 101 for a text
            # file, a bare EOFError for an empty one, a RuntimeError for a broken zip)
            raise ValueError(f"{not_adapter} (torch.load: {type(e).__name__}: {e})") from e
    if not isinstance(blob, dict):
        raise ValueError(not_adapter)
    # (another program's dict may hold a "tensors" entry of its own: ours maps names to tensors)
    tensors, metadata = blob.get("tensors"), blob.get("metadata") or {}
    if not (isinstance(tensors, dict) and isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())):
        raise ValueError(not_adapter)
    sharded = sorted(k for k, v in tensors.items() if _is_dtensor(v))
    if sharded:  # written by an older save_adapter from an FSDP2 model: each rank's shard only
        raise ValueError(f"{os.fspath(path)!r} holds sharded DTensors, not full tensors ("
                         + ", ".join(sharded) + "): save it again with this version's save_adapter")
    return tensors, metadata


def load_adapter(model, path, strict=True):
    """Copy an adapter written by ``save_adapter`` into ``model``'s LoRA layers, in place.

    Every check runs before anything is copied, and each problem is listed in one ``ValueError``:
    names the model has but the file lacks (missing), names the file has but the model lacks
    (unexpected), tensors whose shapes differ (both shapes given), layers whose alpha differs
    from the one the adapter was trained with (a different alpha would silently rescale it), and
    merged layers (their ``linear.weight`` already holds the old update, which unmerging after the
    load would take out wrongly: ``unmerge()`` first).
    With ``strict=False`` missing and unexpected names are allowed; the rest still raise. A file
    that is no adapter (another state dict, a truncated or foreign file) raises a ``ValueError``
    naming it, with what the reader said; so does a file in a later format of this package's.
    Values are copied under ``torch.no_grad()`` into the existing parameters, which keep their
    dtype and device. Into a DTensor parameter (FSDP2), the full tensor from the file is first
    distributed to the parameter's own mesh and placements (``distribute_tensor``, which scatters
    rank 0's copy: a collective, so every rank of a sharded model must call ``load_adapter`` with
    the same file). Returns ``LoadResult(missing_keys, unexpected_keys)``.
    """
    _refuse_fsdp1(model)
    tensors, metadata = _read_adapter(path)
    # A later format of ours may store what this version would misread. (Not any "format": by
    # safetensors' convention a file from elsewhere may say "pt".)
    written = metadata.get(_FORMAT_KEY)
    if isinstance(written, str) and written.startswith(_FORMAT.rsplit(".", 1)[0] + ".") and written != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is an adapter in format {written!r}, which this version of "
                         f"lora_kernels does not read (it reads {_FORMAT!r}): update lora_kernels")
    params = {}
    for name, layer in _lora_layers(model):
        params[_key(name, "A")] = layer.A
        params[_key(name, "B")] = layer.B
    tensors = {_unprefixed(k, params): v for k, v in tensors.items()}

    def layer_name(name):  # a layer named in the metadata, as its A is named in the model
        key = _unprefixed(_key(name, "A"), params)
        return key[:-len(".A")] if key != "A" else ""

    missing = sorted(k for k in params if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in params)
    mismatched = [(k, tuple(tensors[k].shape), tuple(p.shape))
                  for k, p in params.items() if k in tensors and tensors[k].shape != p.shape]

    alpha_diffs = []
    if _LAYERS_KEY in metadata:  # files from elsewhere may carry tensors only
        # (Earlier versions wrote the layers' names with the wrappers' prefixes, as their tensors'.)
        stored = {layer_name(n): v for n, v in json.loads(metadata[_LAYERS_KEY]).items()}
        for name, layer in _lora_layers(model):
            if name in stored and not _same_alpha(stored[name]["alpha"], _alpha(layer)):
                alpha_diffs.append((name, stored[name]["alpha"], _alpha(layer)))

    merged = [_without_compile(name) for name, m in _unwrap(model).named_modules()
              if isinstance(m, LinearWithLoRA) and getattr(m, "merged", False)]
    # (copy_ into a meta tensor does nothing: the adapter would be lost without a word)
    on_meta = sorted(k for k, p in params.items() if k in tensors and p.is_meta)

    problems = []
    if strict and missing:
        problems.append("missing from the file: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected (not LoRA parameters of the model): " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(
            f"{k} is {list(f)} in the file but {list(m)} in the model" for k, f, m in mismatched))
    if alpha_diffs:
        problems.append("alpha mismatch: " + ", ".join(
            f"{n} was trained with alpha={f} but the model has alpha={m}" for n, f, m in alpha_diffs))
    if merged:
        problems.append("merged layers (call unmerge() before loading): " + ", ".join(merged))
    if on_meta:
        problems.append("parameters on the meta device, which hold no values (materialize the model "
                        "first, e.g. model.to_empty(device=...)): " + ", ".join(on_meta))
    if problems:
        hint = "" if params else " (the model has no LoRA layers: call replace_linear_with_lora first)"
        raise ValueError(f"cannot load adapter {os.fspath(path)!r}{hint}:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for k, p in params.items():
            if k not in tensors:
                continue
            value = tensors[k]
            if _is_dtensor(p):  # copy_ cannot mix a plain tensor into a DTensor
                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)  # copy_ casts to the parameter's dtype and device
    return LoadResult(missing, unexpected)


def peft_alpha(lora_alpha, r, use_rslora=False):
    """The ``alpha`` of this package for a peft ``LoraConfig(r=r, lora_alpha=lora_alpha)``.

    This package (like the seed) multiplies the low-rank product by ``alpha`` as given; peft
    multiplies by ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora=True``.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an integer, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a real number, got {type(lora_alpha).__name__}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
