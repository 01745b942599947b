"""Adapter utilities: freezing, counting, saving/loading only A and B, and peft's alpha convention."""

import contextlib
import copy
import importlib.util
import json
import math
import re

import pytest
import torch

from lora_kernels import LinearWithLoRA, LoRALayer, replace_linear_with_lora
from lora_kernels.adapters import (count_parameters, format_parameter_count, load_adapter, lora_state_dict,
                                   mark_only_lora_as_trainable, peft_alpha, save_adapter)

RANK, ALPHA = 2, 0.5


class Tiny(torch.nn.Module):
    """Nested names on purpose, so adapter keys look like a real model's (``blocks.0.fc.lora.A``)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)                      # 80
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 16),      # 128 + 16
                                 "out": torch.nn.Linear(16, 8, bias=False)})  # 128
            for _ in range(2))
        self.norm = torch.nn.LayerNorm(8)                           # 16

    def forward(self, idx):
        h = self.embed(idx)
        for blk in self.blocks:
            h = h + blk["out"](torch.relu(blk["fc"](h)))
        return self.norm(h)


BASE_PARAMS = 80 + 2 * (128 + 16 + 128) + 16  # 640
# Per block: fc A (8, 2) + B (2, 16) = 48; out A (16, 2) + B (2, 8) = 48.
LORA_PARAMS = 2 * (48 + 48)  # 192


def build(seed=0, rank=RANK, alpha=ALPHA):
    """The same base weights for a given seed, then LoRA layers with their default init."""
    torch.manual_seed(seed)
    model = Tiny()
    replace_linear_with_lora(model, rank, alpha)
    return model


def randomize_lora(model, seed=1):
    """Non-zero A and B: B starts at zero, and a test on zeros would pass with nothing loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.A.copy_(torch.randn(m.A.shape, generator=g))
                m.B.copy_(torch.randn(m.B.shape, generator=g))
    return model


def test_mark_only_lora_as_trainable():
    model = build()
    assert mark_only_lora_as_trainable(model) is model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    lora = {n for n in flags if n.endswith((".lora.A", ".lora.B"))}
    assert len(lora) == 8
    assert all(flags[n] for n in lora)
    assert not any(flags[n] for n in flags.keys() - lora)
    # Gradients then reach only the adapters.
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert all((p.grad is not None) == (n in lora) for n, p in model.named_parameters())


def test_mark_only_lora_as_trainable_without_lora_layers_raises():
    """Freezing a model with no LoRA layers (a plain or a peft model) would leave nothing to train,
    silently: it raises, and changes nothing."""
    plain = Tiny()
    with pytest.raises(ValueError, match="no LoRA layers"):
        mark_only_lora_as_trainable(plain)
    assert all(p.requires_grad for p in plain.parameters())


def test_mark_only_lora_as_trainable_takes_the_reference_layers():
    """A model built with the seed's classes (lora_kernels.reference) has the same A and B."""
    from lora_kernels import reference
    model = torch.nn.Sequential(reference.LinearWithLoRA(torch.nn.Linear(4, 3), 2, ALPHA))
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora.A", "0.lora.B"}


def test_mark_only_lora_as_trainable_unfreezes_frozen_adapters():
    """A model frozen whole first (model.requires_grad_(False), or loaded so) gets its adapters back."""
    model = build().requires_grad_(False)
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{n}.lora.{p}" for i in (0, 1) for n in ("fc", "out") for p in "AB"}


def test_count_parameters_and_format():
    torch.manual_seed(0)
    plain = Tiny()
    assert count_parameters(plain) == (BASE_PARAMS, BASE_PARAMS)
    model = build()
    assert count_parameters(model) == (BASE_PARAMS + LORA_PARAMS, BASE_PARAMS + LORA_PARAMS)
    mark_only_lora_as_trainable(model)
    assert count_parameters(model) == (LORA_PARAMS, BASE_PARAMS + LORA_PARAMS)
    assert format_parameter_count(LORA_PARAMS, BASE_PARAMS + LORA_PARAMS) == "trainable 192 of 832 (23.08%)"
    assert format_parameter_count(12_288, 1_234_567) == "trainable 12,288 of 1,234,567 (1.00%)"
    assert format_parameter_count(0, 0) == "trainable 0 of 0 (0.00%)"


def test_count_parameters_counts_a_tied_weight_once():
    torch.manual_seed(0)
    tied = Tiny()
    tied.blocks[1]["out"].weight = tied.blocks[0]["out"].weight  # (16, 8) shared: 128 fewer
    assert count_parameters(tied) == (BASE_PARAMS - 128, BASE_PARAMS - 128)


def test_lora_state_dict_names_and_values():
    model = randomize_lora(build())
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(f"blocks.{i}.{n}.lora.{p}" for i in (0, 1) for n in ("fc", "out") for p in "AB")
    full = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, full[k]) and not v.requires_grad


FORMATS = [pytest.param("adapter.safetensors", id="safetensors"), pytest.param("adapter.pt", id="torch")]


def _need_format(filename):
    if filename.endswith(".safetensors"):
        pytest.importorskip("safetensors")


@pytest.mark.parametrize("filename", FORMATS)
def test_save_load_roundtrip(tmp_path, filename):
    _need_format(filename)
    trained = randomize_lora(build())
    path = tmp_path / filename
    save_adapter(trained, path)

    fresh = build()  # same base weights, fresh adapters (B zero)
    x = torch.tensor([[1, 4, 9, 2], [0, 3, 5, 7]])
    assert not torch.equal(fresh(x), trained(x))
    result = load_adapter(fresh, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k
    assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("filename", FORMATS)
def test_file_holds_only_the_adapter(tmp_path, filename):
    _need_format(filename)
    from lora_kernels.adapters import _read_adapter
    model = randomize_lora(build())
    save_adapter(model, tmp_path / filename)
    tensors, metadata = _read_adapter(tmp_path / filename)
    assert sorted(tensors) == sorted(lora_state_dict(model))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert '"blocks.0.fc.lora": {"rank": 2, "alpha": 0.5}' in metadata["lora_kernels.layers"]


@pytest.mark.parametrize("filename", FORMATS)
def test_file_names_its_format(tmp_path, filename):
    _need_format(filename)
    from lora_kernels.adapters import _read_adapter
    save_adapter(randomize_lora(build()), tmp_path / filename)
    assert _read_adapter(tmp_path / filename)[1]["format"] == "lora_kernels.adapter.v1"


@pytest.mark.parametrize("filename", FORMATS)
def test_save_adapter_with_a_shared_parameter(tmp_path, filename):
    """Two layers sharing one A (tied adapters): the file holds a copy under each name (safetensors
    refuses tensors that share storage), and loads into a model tied the same way."""
    _need_format(filename)
    def tied(model):
        model.blocks[1]["fc"].lora.A = model.blocks[0]["fc"].lora.A
        return model
    trained = tied(randomize_lora(build(), seed=11))
    save_adapter(trained, tmp_path / filename)
    fresh = tied(build())
    load_adapter(fresh, tmp_path / filename)
    for k, v in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k


def test_load_keeps_model_dtype(tmp_path):
    trained = randomize_lora(build())
    save_adapter(trained, tmp_path / "a.pt")
    fresh = build().to(torch.float64)
    load_adapter(fresh, tmp_path / "a.pt")
    A = fresh.blocks[0]["fc"].lora.A
    assert A.dtype == torch.float64
    assert torch.equal(A, trained.blocks[0]["fc"].lora.A.double())


def _saved(tmp_path, model):
    path = tmp_path / "a.pt"
    save_adapter(model, path)
    return path


def test_load_error_missing_name(tmp_path):
    path = _saved(tmp_path, randomize_lora(build()))
    bigger = build()
    bigger.extra = LinearWithLoRA(torch.nn.Linear(3, 3), RANK, ALPHA)
    with pytest.raises(ValueError, match=r"missing from the file: extra\.lora\.A, extra\.lora\.B"):
        load_adapter(bigger, path)
    # Non-strict allows it, reports it, and loads the rest.
    result = load_adapter(bigger, path, strict=False)
    assert result.missing_keys == ["extra.lora.A", "extra.lora.B"]
    assert not torch.equal(bigger.blocks[0]["fc"].lora.B, torch.zeros(RANK, 16))


def test_load_error_unexpected_name(tmp_path):
    model = randomize_lora(build())
    model.extra = LinearWithLoRA(torch.nn.Linear(3, 3), RANK, ALPHA)
    path = _saved(tmp_path, model)
    with pytest.raises(ValueError, match=r"unexpected .*: extra\.lora\.A, extra\.lora\.B"):
        load_adapter(build(), path)
    assert load_adapter(build(), path, strict=False).unexpected_keys == ["extra.lora.A", "extra.lora.B"]


def test_load_error_wrong_shape_changes_nothing(tmp_path):
    path = _saved(tmp_path, randomize_lora(build(rank=3)))
    target = build(rank=RANK)
    before = {k: v.clone() for k, v in lora_state_dict(target).items()}
    with pytest.raises(ValueError) as info:
        load_adapter(target, path, strict=False)  # shapes are checked even when not strict
    msg = str(info.value)
    assert "blocks.0.fc.lora.A is [8, 3] in the file but [8, 2] in the model" in msg
    assert "blocks.1.out.lora.B is [3, 8] in the file but [2, 8] in the model" in msg
    # Checked before copying: a failed load leaves the model as it was.
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(target).items())


def test_load_error_alpha_mismatch(tmp_path):
    path = _saved(tmp_path, randomize_lora(build(alpha=2.0)))
    with pytest.raises(ValueError, match=r"blocks\.0\.fc\.lora was trained with alpha=2\.0 but the model has alpha=0\.5"):
        load_adapter(build(alpha=0.5), path)


def test_load_takes_an_alpha_equal_up_to_float32_rounding(tmp_path):
    """An alpha of 0.1 given as a float32 scalar (from a config array, say) is stored as
    0.10000000149...: a model built with 0.1 has the same setting and loads it; 0.1001 does not."""
    np = pytest.importorskip("numpy")
    path = _saved(tmp_path, randomize_lora(build(alpha=np.float32(0.1))))
    load_adapter(build(alpha=0.1), path)
    with pytest.raises(ValueError, match="alpha mismatch"):
        load_adapter(build(alpha=0.1001), path)


def test_load_refuses_an_alpha_off_by_more_than_float32_rounding(tmp_path):
    """Only float32 rounding (about 6e-8 relative) counts as the same alpha: one 1e-5 away (a
    value retyped with fewer digits, say) is another setting, and is refused."""
    path = _saved(tmp_path, randomize_lora(build(alpha=0.1)))
    with pytest.raises(ValueError, match="alpha mismatch"):
        load_adapter(build(alpha=0.1 * (1 + 1e-5)), path)
    load_adapter(build(alpha=0.1 * (1 + 1e-7)), path)


def test_load_refuses_merged_layers(tmp_path):
    path = _saved(tmp_path, randomize_lora(build()))
    target = randomize_lora(build(), seed=2)
    target.blocks[1]["out"].merge()
    with pytest.raises(ValueError, match=r"merged layers \(call unmerge\(\) before loading\): blocks\.1\.out$"):
        load_adapter(target, path)
    target.blocks[1]["out"].unmerge()
    load_adapter(target, path)


def test_load_into_model_without_lora(tmp_path):
    path = _saved(tmp_path, randomize_lora(build()))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="call replace_linear_with_lora first"):
        load_adapter(Tiny(), path)


@pytest.mark.parametrize("filename", FORMATS)
def test_save_load_per_column_alpha(tmp_path, filename):
    """An alpha of one value per output column (the seed's layer broadcasts it) is stored value by
    value, and a model whose alphas differ in one value is refused."""
    _need_format(filename)
    def per_column(model, last=2.0):
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.alpha = torch.linspace(0.5, last, m.B.shape[1])
        return model
    trained = per_column(randomize_lora(build()))
    save_adapter(trained, tmp_path / filename)
    fresh = per_column(build())
    load_adapter(fresh, tmp_path / filename)
    for k, v in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k
    with pytest.raises(ValueError, match="alpha mismatch"):
        load_adapter(per_column(build(), last=2.5), tmp_path / filename)
    with pytest.raises(ValueError, match="alpha mismatch"):
        load_adapter(build(), tmp_path / filename)  # (one number against several)


def test_load_refuses_parameters_on_the_meta_device(tmp_path):
    """copy_ into a meta tensor does nothing: a model built on the meta device (accelerate's
    init_empty_weights) would load without a word and hold nothing after to_empty()."""
    path = _saved(tmp_path, randomize_lora(build()))
    with torch.device("meta"):
        skeleton = build()
    with pytest.raises(ValueError, match=r"meta device.*blocks\.0\.fc\.lora\.A"):
        load_adapter(skeleton, path)
    skeleton.to_empty(device="cpu")
    load_adapter(skeleton, path)
    for k, v in lora_state_dict(randomize_lora(build())).items():
        assert torch.equal(lora_state_dict(skeleton)[k], v), k


def test_load_refuses_a_later_format_of_ours_and_takes_safetensors_own_format_tag(tmp_path):
    """A file that names another format of this package's is refused by name, the model left
    as it was; safetensors' conventional "format": "pt" (files from elsewhere) is read."""
    from lora_kernels.adapters import _read_adapter
    trained = randomize_lora(build())
    save_adapter(trained, tmp_path / "adapter.pt")
    tensors, metadata = _read_adapter(tmp_path / "adapter.pt")
    for tag, refused in (("lora_kernels.adapter.v2", True), ("pt", False)):
        torch.save({"tensors": tensors, "metadata": {**metadata, "format": tag}}, tmp_path / "other.pt")
        fresh = build()
        before = {k: v.clone() for k, v in lora_state_dict(fresh).items()}
        if refused:
            with pytest.raises(ValueError, match=r"format 'lora_kernels.adapter.v2', which this version .* "
                                                 r"reads 'lora_kernels.adapter.v1'"):
                load_adapter(fresh, tmp_path / "other.pt")
            assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(fresh).items())
        else:
            load_adapter(fresh, tmp_path / "other.pt")
            assert all(torch.equal(v, lora_state_dict(trained)[k]) for k, v in lora_state_dict(fresh).items())


def test_load_safetensors_file_without_metadata(tmp_path):
    """A safetensors file holding the tensors only (written by safetensors.torch.save_file from
    another tool, say) carries no metadata: it loads, with no alpha to check."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    trained = randomize_lora(build(), seed=12)
    safetensors_torch.save_file({k: v.contiguous() for k, v in lora_state_dict(trained).items()},
                                str(tmp_path / "bare.safetensors"))
    fresh = build()
    assert load_adapter(fresh, tmp_path / "bare.safetensors") == ([], [])
    for k, v in lora_state_dict(trained).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k


@pytest.mark.parametrize("filename", FORMATS)
def test_load_reads_the_format_by_content(tmp_path, filename):
    """A file renamed (or a name in capitals) is read in the format it holds."""
    _need_format(filename)
    trained = randomize_lora(build())
    save_adapter(trained, tmp_path / filename.upper())
    if filename.endswith(".safetensors"):  # written as safetensors whatever the case of its extension
        assert (tmp_path / filename.upper()).read_bytes()[8:9] == b"{"
    # (renamed to no extension, and to the other format's: torch.load alone would take a name
    # ending in .safetensors for safetensors)
    other = "adapter.pt" if filename.endswith(".safetensors") else "adapter.safetensors"
    for name in ("adapter", other):
        renamed = tmp_path / name
        renamed.write_bytes((tmp_path / filename.upper()).read_bytes())
        fresh = build()
        load_adapter(fresh, renamed)
        for k, v in lora_state_dict(trained).items():
            assert torch.equal(lora_state_dict(fresh)[k], v), (name, k)


def test_load_names_a_file_that_is_no_adapter(tmp_path):
    """Files that are not adapters get one clear error naming the file, not what torch.load or
    safetensors raise from deep inside (a KeyError 101 for text, a bare EOFError when empty)."""
    def saved(name):
        save_adapter(randomize_lora(build()), tmp_path / name)
        return (tmp_path / name).read_bytes()

    cases = {"text.bin": b"hello, world\n", "empty.pt": b"", "truncated.pt": saved("a.pt")[:100]}
    if importlib.util.find_spec("safetensors"):
        cases["truncated.safetensors"] = saved("a.safetensors")[:-4]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    # Other programs' dicts with a "tensors" entry that is no map of names to tensors.
    foreign = {"tensors-a-tensor.pt": {"tensors": torch.randn(3)},
               "tensors-of-lists.pt": {"tensors": {"blocks.0.fc.lora.A": [1.0]}},
               "metadata-a-list.pt": {"tensors": {}, "metadata": ["x"]}}
    for name, blob in foreign.items():
        torch.save(blob, tmp_path / name)
    for name in [*cases, "state_dict.pt", *foreign]:
        path, model = tmp_path / name, randomize_lora(build())
        before = {k: v.clone() for k, v in lora_state_dict(model).items()}
        with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' is not an adapter file written by save_adapter"):
            load_adapter(model, path)
        assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items()), name


def test_load_never_unpickles_objects(tmp_path):
    """A .pt is read with weights_only: a file carrying an arbitrary object (which unpickling
    would run) is refused as no adapter, and the object's code does not run."""
    import os
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    blob = torch.load(_saved(tmp_path, randomize_lora(build())), weights_only=True)
    blob["extra"] = Payload()
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="is not an adapter file written by save_adapter"):
        load_adapter(build(), tmp_path / "evil.pt")
    assert not marker.exists()


@contextlib.contextmanager
def one_process_group():
    """A gloo process group of this process alone (rank 0 of 1), destroyed on leaving."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_is_refused_by_name(tmp_path):
    """FSDP1's parameters are flat shards: A and B would be saved as 1-D slices, or fail inside."""
    path = _saved(tmp_path, randomize_lora(build()))
    with one_process_group():
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrapped = FullyShardedDataParallel(build(), use_orig_params=True, device_id=torch.device("cpu"))
        for call in (lambda: save_adapter(wrapped, tmp_path / "b.pt"), lambda: load_adapter(wrapped, path),
                     lambda: lora_state_dict(wrapped)):
            with pytest.raises(ValueError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
                call()
        assert not (tmp_path / "b.pt").exists()


def test_ddp_wrapper_saves_the_plain_names(tmp_path):
    """DistributedDataParallel's .module is below the names (a one-process group, on the CPU)."""
    with one_process_group():
        model = randomize_lora(build(), seed=9)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert sorted(lora_state_dict(ddp)) == sorted(lora_state_dict(model))
        save_adapter(ddp, tmp_path / "ddp.pt")
    from lora_kernels.adapters import _read_adapter
    tensors, metadata = _read_adapter(tmp_path / "ddp.pt")
    assert sorted(tensors) == sorted(lora_state_dict(model))
    assert sorted(json.loads(metadata["lora_kernels.layers"])) == [f"blocks.{i}.{n}.lora" for i in (0, 1) for n in ("fc", "out")]


def test_fully_shard_on_one_process_saves_and_loads(tmp_path):
    """A model under fully_shard (FSDP2, its adapters DTensors) on a one-process group: rank 0
    writes the full tensors, and a sharded model loads them back."""
    with one_process_group():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (1,))
        trained = randomize_lora(build(), seed=10)
        want = {k: v.clone() for k, v in lora_state_dict(trained).items()}
        fully_shard(trained, mesh=mesh)
        assert all(type(v).__name__ == "DTensor" for v in lora_state_dict(trained).values())
        save_adapter(trained, tmp_path / "a.pt")
        fresh = fully_shard(build(), mesh=mesh)
        load_adapter(fresh, tmp_path / "a.pt")
        got = {k: v.full_tensor() for k, v in lora_state_dict(fresh).items()}
    plain = build()
    load_adapter(plain, tmp_path / "a.pt")
    for k, v in want.items():
        assert torch.equal(lora_state_dict(plain)[k], v) and torch.equal(got[k], v), k


def test_safetensors_missing_package(tmp_path, monkeypatch):
    import lora_kernels.adapters as adapters
    monkeypatch.setattr(adapters, "_safetensors", None)
    with pytest.raises(ImportError, match=r"safetensors package is not installed.*\.pt"):
        save_adapter(build(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


ALPHA_FORMS = [pytest.param(lambda: torch.tensor(ALPHA), id="tensor"),
               pytest.param(lambda: __import__("numpy").float32(ALPHA), id="numpy"),
               pytest.param(lambda: torch.tensor([ALPHA]), id="tensor-of-one")]  # one value: stored as a float


def with_alpha(model, alpha):
    """Every LoRALayer's alpha set to ``alpha`` as given (the constructor may turn a constant 0-d
    tensor into a number; an alpha assigned afterwards stays what it is)."""
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.alpha = alpha
    return model


@pytest.mark.parametrize("make_alpha", ALPHA_FORMS)
@pytest.mark.parametrize("filename", FORMATS)
def test_save_load_non_float_alpha(tmp_path, filename, make_alpha):
    """A layer's alpha may be a 0-d tensor or a numpy scalar; the file stores it as a float."""
    _need_format(filename)
    from lora_kernels.adapters import _read_adapter
    trained = with_alpha(randomize_lora(build(), seed=3), make_alpha())
    x = torch.randint(0, 10, (2, 6))
    trained(x)  # the layer takes this alpha
    path = tmp_path / filename
    save_adapter(trained, path)
    assert '"blocks.0.fc.lora": {"rank": 2, "alpha": 0.5}' in _read_adapter(path)[1]["lora_kernels.layers"]
    for target in (with_alpha(build(), make_alpha()), build(alpha=ALPHA)):  # either form loads
        load_adapter(target, path)
        for k, v in lora_state_dict(trained).items():
            assert torch.equal(lora_state_dict(target)[k], v), k
    with pytest.raises(ValueError, match=r"trained with alpha=0\.5 but the model has alpha=2\.0"):
        load_adapter(with_alpha(build(), torch.tensor(2.0)), path)


def _compiled(model):
    return torch.compile(model, backend="eager")


def _layers_compiled(model):
    # Each layer compiled and put back, as per-block compilation does: names gain an _orig_mod inside.
    for block in model.blocks:
        for name in block:
            block[name] = _compiled(block[name])
    return model


# DataParallel scatters a batch to the GPUs whenever there are any: with one, these CPU models fail.
_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel of a CPU model needs no GPU present")
WRAPPERS = [pytest.param(_compiled, id="compile"),
            pytest.param(torch.nn.DataParallel, id="DataParallel", marks=_CPU_ONLY),
            pytest.param(lambda m: torch.nn.DataParallel(_compiled(m)), id="DataParallel-compile", marks=_CPU_ONLY),
            pytest.param(_layers_compiled, id="compiled-layers")]


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_save_load_through_wrappers(tmp_path, wrap):
    """An adapter saved from a wrapped model (torch.compile's _orig_mod, at the top or inside,
    DataParallel's module) has the plain model's names, and loads into the plain model and into a wrapped one."""
    x = torch.randint(0, 10, (3, 5))
    trained = randomize_lora(build(), seed=4)
    wrapped = wrap(trained)
    assert set(lora_state_dict(wrapped)) == set(lora_state_dict(trained))
    save_adapter(wrapped, tmp_path / "wrapped.pt")
    plain = build()
    load_adapter(plain, tmp_path / "wrapped.pt")
    assert torch.equal(plain(x), trained(x))

    save_adapter(trained, tmp_path / "plain.pt")
    target = wrap(build())
    assert not torch.equal(target(x), trained(x))
    load_adapter(target, tmp_path / "plain.pt")
    assert torch.equal(target(x), trained(x))


def test_load_file_with_wrapper_prefixes(tmp_path):
    """Files that earlier versions saved from a wrapped model carry its prefixes (module.,
    _orig_mod.): they still load into the plain model."""
    x = torch.randint(0, 10, (3, 5))
    trained = randomize_lora(build(), seed=6)
    save_adapter(trained, tmp_path / "plain.pt")
    blob = torch.load(tmp_path / "plain.pt", weights_only=True)
    blob["tensors"] = {"module._orig_mod." + k.replace("blocks.0.fc.", "blocks.0.fc._orig_mod."): v
                       for k, v in blob["tensors"].items()}
    torch.save(blob, tmp_path / "prefixed.pt")
    plain = build()
    assert load_adapter(plain, tmp_path / "prefixed.pt") == ([], [])
    assert torch.equal(plain(x), trained(x))


def test_load_checks_alpha_of_files_with_wrapper_prefixes(tmp_path):
    """Such files name their layers in the metadata with the same prefixes: the alpha check must
    still find them, or a different alpha would silently rescale the adapter."""
    trained = randomize_lora(build(), seed=6)
    save_adapter(trained, tmp_path / "plain.pt")
    blob = torch.load(tmp_path / "plain.pt", weights_only=True)
    blob["tensors"] = {"module." + k: v for k, v in blob["tensors"].items()}
    layers = json.loads(blob["metadata"]["lora_kernels.layers"])
    blob["metadata"]["lora_kernels.layers"] = json.dumps({"module." + n: v for n, v in layers.items()})
    torch.save(blob, tmp_path / "prefixed.pt")
    assert load_adapter(build(), tmp_path / "prefixed.pt") == ([], [])
    other = build(alpha=4 * ALPHA)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"alpha mismatch: blocks\.0\.fc\.lora was trained with alpha=0\.5"):
        load_adapter(other, tmp_path / "prefixed.pt")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_adapter_of_a_bare_lora_layer(tmp_path):
    """A LoRALayer that is the model itself: its names are the state dict's, "A" and "B"."""
    layer = LoRALayer(6, 5, RANK, ALPHA)
    randomize_lora(layer)
    assert sorted(lora_state_dict(layer)) == sorted(layer.state_dict()) == ["A", "B"]
    save_adapter(layer, tmp_path / "a.pt")
    torch.save({"tensors": lora_state_dict(layer), "metadata": {}}, tmp_path / "b.pt")  # as named in the model
    for name in ("a.pt", "b.pt"):
        fresh = LoRALayer(6, 5, RANK, ALPHA)
        assert load_adapter(fresh, tmp_path / name) == ([], [])
        assert torch.equal(fresh.A, layer.A) and torch.equal(fresh.B, layer.B)


class Holder(torch.nn.Module):
    """A user's wrapper whose attribute happens to be called ``module`` (not DDP's: its names keep it)."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, idx):
        return self.module(idx)


def test_a_model_whose_own_names_start_with_module(tmp_path):
    x = torch.randint(0, 10, (3, 5))
    trained = Holder(randomize_lora(build(), seed=7))
    assert all(k.startswith("module.blocks.") for k in lora_state_dict(trained))
    save_adapter(trained, tmp_path / "a.pt")
    fresh = Holder(build())
    assert load_adapter(fresh, tmp_path / "a.pt") == ([], [])
    assert torch.equal(fresh(x), trained(x))
    with pytest.raises(ValueError, match=r"alpha mismatch: module\.blocks\.0\.fc\.lora was trained with alpha=0\.5"):
        load_adapter(Holder(build(alpha=4 * ALPHA)), tmp_path / "a.pt")


def test_load_file_with_nested_wrapper_prefixes(tmp_path):
    """A file from a model wrapped twice (DataParallel around DistributedDataParallel, say) carries
    module.module.: both are dropped."""
    x = torch.randint(0, 10, (3, 5))
    trained = randomize_lora(build(), seed=8)
    blob = torch.load(_saved(tmp_path, trained), weights_only=True)
    blob["tensors"] = {"module.module." + k: v for k, v in blob["tensors"].items()}
    torch.save(blob, tmp_path / "nested.pt")
    plain = build()
    assert load_adapter(plain, tmp_path / "nested.pt") == ([], [])
    assert torch.equal(plain(x), trained(x))


def test_load_refuses_file_with_dtensors(tmp_path):
    """A .pt written from an FSDP2 model by an older save_adapter holds DTensor shards: a clear
    error instead of PyTorch's mixed Tensor/DTensor one."""
    with one_process_group():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (1,))
        model = randomize_lora(build(), seed=5)
        tensors = {k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in lora_state_dict(model).items()}
    torch.save({"tensors": tensors, "metadata": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"holds sharded DTensors, not full tensors \(blocks\.0\.fc\.lora\.A"):
        load_adapter(build(), tmp_path / "old.pt")


def test_peft_alpha_values_and_errors():
    assert peft_alpha(16, 8) == 2.0
    assert peft_alpha(8, 4) == 2.0
    assert peft_alpha(8, 4, use_rslora=True) == 4.0
    assert peft_alpha(1, 2, use_rslora=True) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert peft_alpha(0.5, 1) == 0.5
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        peft_alpha(8, 0)
    with pytest.raises(ValueError, match="r must be >= 1"):
        peft_alpha(8, -2, use_rslora=True)
    with pytest.raises(TypeError, match="r must be an integer"):
        peft_alpha(8, 2.5)
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        peft_alpha(float("nan"), 4)
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        peft_alpha(float("inf"), 4)
    with pytest.raises(TypeError, match="lora_alpha must be a real number"):
        peft_alpha("8", 4)


def test_peft_alpha_refuses_bools():
    # (bool is an int to Python: True would pass for r=1 or lora_alpha=1 without a word)
    with pytest.raises(TypeError, match="r must be an integer, got bool"):
        peft_alpha(8, True)
    with pytest.raises(TypeError, match="lora_alpha must be a real number, got bool"):
        peft_alpha(True, 4)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_peft_alpha_matches_peft(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    in_f, out_f, r, lora_alpha = 24, 12, 4, 8
    base = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
    ours = LinearWithLoRA(copy.deepcopy(base[0]), r, peft_alpha(lora_alpha, r, use_rslora))
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["0"], lora_dropout=0.0,
                             use_rslora=use_rslora)
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft starts B at zero too; test a real update
        ours.lora.A.copy_(layer.lora_A["default"].weight.T)
        ours.lora.B.copy_(layer.lora_B["default"].weight.T)
    x = torch.randn(5, 7, in_f)
    with torch.no_grad():
        want, got = model(x), ours(x)
        lora_part = want - layer.base_layer(x)
    assert lora_part.norm() > 0.1 * want.norm()  # the adapter contributes, so alpha matters
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
