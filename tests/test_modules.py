"""The modules are a drop-in for the seed's: same constructor, init, state-dict keys, numbers."""

import copy
import math

import pytest
import torch

import lora_kernels
from conftest import DEVICE, TOL, rel_err, replicate_like_data_parallel
from lora_kernels import reference as seed


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(24, 40)
        self.block = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(40, 40, bias=False), torch.nn.Tanh())
        self.out = torch.nn.Linear(40, 9)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


def build(lib, seed_=0):
    torch.manual_seed(seed_)
    model = Tiny()
    lib.replace_linear_with_lora(model, rank=4, alpha=1.5)
    return model


def test_state_dict_keys_and_init_match_seed():
    ours, ref = build(lora_kernels), build(seed)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "inp.linear.weight" in ours.state_dict() and "inp.lora.A" in ours.state_dict()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k  # same RNG draws: kaiming-uniform A, zero B, same base
    assert isinstance(ours.inp, lora_kernels.LinearWithLoRA)


@pytest.mark.parametrize("kind", ["trainable", "per-column", "3-d"])
def test_alphas_the_fused_call_does_not_take_run_as_the_seed_does(backend, kind):
    """An alpha given as a Parameter (the seed's layer trains it, and saves it as lora.alpha), as a
    tensor of one value per output column, or of more dimensions than x (both broadcast) runs the
    reference's calls: the seed's outputs and gradients, alpha's too, and its state-dict keys;
    merge folds it in where it fits the weight, and refuses by name where it does not."""
    def alpha():  # (a plain tensor attribute does not move with .to(): made on the device it meets)
        return {"trainable": lambda: torch.nn.Parameter(torch.tensor(1.5)),
                "per-column": lambda: torch.linspace(0.5, 2.0, 5, device=DEVICE),
                "3-d": lambda: torch.full((1, 1, 1), 1.5, device=DEVICE)}[kind]()

    torch.manual_seed(0)
    ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, alpha())
    torch.manual_seed(0)
    ref = seed.LinearWithLoRA(torch.nn.Linear(6, 5), 2, alpha())
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for m in (ours, ref):
            m.lora.B.copy_(torch.randn(2, 5, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 6, device=DEVICE)
    ours.to(DEVICE), ref.to(DEVICE)
    y, y_ref = ours(x), ref(x)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) < TOL[torch.float32], name
    with torch.no_grad():
        if kind == "3-d":  # (the seed's output gained a dimension: no weight gives that)
            with pytest.raises(ValueError, match=r"alpha of shape \(1, 1, 1\).*does not fold"):
                ours.merge()
            assert not ours.merged
        else:
            assert rel_err(ours.merge()(x), y_ref) < TOL[torch.float32]


def test_state_dict_loads_both_ways_strict():
    ours, ref = build(lora_kernels, 1), build(seed, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref2 = build(seed, 3)
    ref2.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(ref.state_dict().values(), ref2.state_dict().values()):
        assert torch.equal(a, b)


def test_same_outputs_and_grads_as_seed(backend):
    ref = build(seed).to(DEVICE)
    with torch.no_grad():  # B starts at zero: make the LoRA path count
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = build(lora_kernels, 5).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 24, device=DEVICE)
    y_ref, y = ref(x), ours(x)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    named = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, named[name].grad) < TOL[torch.float32], name


def test_forward_is_one_fused_call(monkeypatch):
    calls = []
    real = lora_kernels.functional._forward_impl
    monkeypatch.setattr(lora_kernels.functional, "_forward_impl", lambda *a: calls.append(1) or real(*a))
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(8, 6), rank=2, alpha=1.0)
    y = layer(torch.randn(3, 5, 8))
    assert calls == [1]
    assert not y._is_view()  # like F.linear: an in-place op on the output is safe (FSDP2 hooks)


def test_replace_is_idempotent_and_recursive():
    model = build(lora_kernels)
    lora_kernels.replace_linear_with_lora(model, rank=4, alpha=1.5)
    assert isinstance(model.block[1], lora_kernels.LinearWithLoRA)
    assert isinstance(model.block[1].linear, torch.nn.Linear)  # not wrapped twice
    keys = list(model.state_dict())
    # Handed a wrapped layer itself (this package's or the seed's), or a model holding one of the
    # seed's, it leaves it alone as well.
    for layer in (model.block[1], seed.LinearWithLoRA(torch.nn.Linear(8, 4), 2, 1.0)):
        assert lora_kernels.replace_linear_with_lora(layer, rank=4, alpha=1.5) is layer
        assert type(layer.linear) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    holder = torch.nn.Sequential(seed.LinearWithLoRA(torch.nn.Linear(8, 4), 2, 1.0))
    lora_kernels.replace_linear_with_lora(holder, rank=4, alpha=1.5)
    assert type(holder[0]) is seed.LinearWithLoRA and type(holder[0].linear) is torch.nn.Linear


def test_a_reused_block_is_not_tied_and_merges():
    """One block used in two places (ALBERT's sharing) gets one wrapper, which is no tie: it merges,
    and merge_and_unload gives the unmerged model's outputs."""
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    model = lora_kernels.replace_linear_with_lora(torch.nn.Sequential(block, block), rank=2, alpha=1.0)
    layer = model[0][0]
    assert model[1][0] is layer and not layer.weight_tied
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        merged = lora_kernels.merge_and_unload(model)
        assert type(merged[0][0]) is torch.nn.Linear and merged[1][0] is merged[0][0]
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_rank_below_one_refused():
    with pytest.raises(ValueError, match="rank"):
        lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 4), rank=0, alpha=1.0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(rank=2.0), "rank must be an int, got float"), (dict(rank=True), "rank must be an int, got bool"),
    (dict(rank=None), "rank must be an int, got NoneType"),
    (dict(dropout=True), "dropout must be a number in [0, 1], got bool"),
    (dict(dropout=torch.tensor(0.1)), "dropout must be a number in [0, 1], got Tensor"),
    (dict(dropout=None), "dropout must be a number in [0, 1], got NoneType"),
    (dict(alpha=None), "alpha must be a real number or a tensor, got NoneType"),
    (dict(alpha="2"), "alpha must be a real number or a tensor, got str"),
    (dict(alpha=1j), "alpha must be a real number or a tensor, got complex"),
    (dict(linear=torch.nn.Conv1d(4, 4, 1)), "LinearWithLoRA wraps a linear layer (an nn.Linear: in_features, "
                                            "out_features and weight), got Conv1d")])
def test_constructor_refuses_wrong_types_by_name(kwargs, words):
    """At construction, naming the argument: not an error from inside torch.empty, nor (dropout) a
    layer that works in eval mode and fails its first training step."""
    with pytest.raises(TypeError) as info:
        lora_kernels.LinearWithLoRA(**{"linear": torch.nn.Linear(4, 4), "rank": 2, "alpha": 1.0, **kwargs})
    assert words in str(info.value)
    # numpy's integers and floats are numbers: accepted
    np = pytest.importorskip("numpy")
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 4), np.int64(2), 1.0, dropout=np.float32(0.25))
    assert layer.lora.A.shape == (4, 2)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)])
def test_constructor_refuses_a_non_finite_alpha(alpha):
    """At construction (as for the rank), in the layer and in replace_linear_with_lora, which then
    wraps nothing: not at the first forward."""
    with pytest.raises(ValueError, match="alpha must be finite, got (nan|inf|-inf)"):
        lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 4), 2, alpha)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="alpha must be finite"):
        lora_kernels.replace_linear_with_lora(model, 2, alpha)
    assert all(type(m) is torch.nn.Linear for m in model)


class ReluLinear(torch.nn.Linear):
    """An nn.Linear subclass with its own forward (as QAT's LinearReLU): only its forward knows."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def trained_pair(make_linear, seed_=3):
    """(ours, the seed's) around the same base, adapters trained (B is zero at init)."""
    layers = []
    for lib in (lora_kernels, seed):
        torch.manual_seed(seed_)
        layer = lib.LinearWithLoRA(make_linear(), 3, 1.5)
        torch.nn.init.normal_(layer.lora.B)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("kind", ["subclass", "hooks", "backward_hook", "weight_norm"])
def test_linear_with_its_own_forward_or_hooks_runs_them(backend, kind):
    """The fused call reads weight and bias and skips linear(x): right only for a plain nn.Linear.
    Anything else (a subclass's forward, forward hooks, old-style weight_norm's pre-hook, which
    rebuilds the weight) runs as the reference runs it: linear(x) plus the LoRA term."""
    make = {"subclass": lambda: ReluLinear(10, 7), "hooks": lambda: torch.nn.Linear(10, 7),
            "backward_hook": lambda: torch.nn.Linear(10, 7),
            "weight_norm": lambda: torch.nn.utils.weight_norm(torch.nn.Linear(10, 7))}[kind]
    ours, ref = trained_pair(make)
    calls = []
    for layer in (ours, ref):
        if kind == "hooks":
            layer.linear.register_forward_pre_hook(lambda m, args: calls.append("pre"))
            layer.linear.register_forward_hook(lambda m, args, out: out * 2)  # changes the output
        if kind in ("hooks", "backward_hook"):
            layer.linear.register_full_backward_hook(lambda m, grad_in, grad_out: calls.append("backward"))
        if kind == "weight_norm":
            with torch.no_grad():
                layer.linear.weight_g.mul_(3.0)  # the weight the pre-hook rebuilds changes
    x = torch.randn(4, 6, 10)
    y, y_ref = ours(x), ref(x)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    if kind != "subclass" and kind != "weight_norm":
        assert calls == (["pre", "pre"] if kind == "hooks" else []) + ["backward", "backward"]
    if kind == "weight_norm":  # its weight is computed from weight_g and weight_v: no merging into it
        with pytest.raises(ValueError, match="plain nn.Linear that stores its weight"):
            ours.merge()
    assert rel_err(ours.lora.B.grad, ref.lora.B.grad) < TOL[torch.float32]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_hooked_half_base_with_fp32_adapters(dropout):
    """The unfused calls a hooked linear takes: the output in the base's dtype beside fp32 adapters
    (peft's default), as the fused call gives it, and LoRA dropout as ``nn.functional.dropout``
    draws it (same seed), against float64."""
    torch.manual_seed(2)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(10, 7), 3, 1.5, dropout=dropout)
    torch.nn.init.normal_(layer.lora.B)
    layer.linear.half()
    layer.linear.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(5, 10).half()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x64 = x.double()
    dropped = torch.nn.functional.dropout(x64, dropout) if dropout else x64
    want = 2 * torch.nn.functional.linear(x64, layer.linear.weight.double(), layer.linear.bias.double()) + \
        1.5 * (dropped @ layer.lora.A.double() @ layer.lora.B.double())
    assert y.dtype == torch.float16 and rel_err(y, want) < TOL[torch.float16]


@pytest.mark.parametrize("kind", ["lora_hook", "global_hook"])
def test_lora_hooks_and_global_hooks_run(backend, kind):
    """The reference calls its lora sub-module and every module's global hooks: a hook on
    ``layer.lora`` (scaling its term) or a global forward hook (on every module's output) must run
    as it does there, so such layers take the unfused path."""
    ours, ref = trained_pair(lambda: torch.nn.Linear(10, 7))
    calls = []

    def hook(module, args, out):
        calls.append(type(module).__name__)
        return -2 * out

    handles = []
    if kind == "lora_hook":
        handles = [layer.lora.register_forward_hook(hook) for layer in (ours, ref)]
    else:
        handles = [torch.nn.modules.module.register_module_forward_hook(hook)]
    try:
        x = torch.randn(4, 6, 10)
        y, y_ref = ours(x), ref(x)
    finally:
        for h in handles:
            h.remove()
    expected = ["LoRALayer"] * 2 if kind == "lora_hook" else ["Linear", "LoRALayer", "LinearWithLoRA"] * 2
    assert sorted(calls) == sorted(expected)
    assert rel_err(y, y_ref) < TOL[torch.float32]


class Doubled(torch.Tensor):
    """A weight that F.linear sees doubled, as a quantized weight's ops see its scales: its storage
    alone does not say what it computes."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            args = [a.as_subclass(torch.Tensor) * 2 if isinstance(a, Doubled) else a for a in args]
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_tensor_subclass_weight_runs_its_own_ops(backend):
    """A base weight that is a tensor subclass computes through its own ops, as in the reference;
    reading its storage in the kernels would give other numbers."""
    def make():
        linear = torch.nn.Linear(10, 7)
        linear.weight = torch.nn.Parameter(linear.weight.detach().as_subclass(Doubled), requires_grad=False)
        return linear

    ours, ref = trained_pair(make)
    x = torch.randn(4, 10)
    y, y_ref = ours(x), ref(x)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    plain = torch.nn.functional.linear(x, ours.linear.weight.as_subclass(torch.Tensor), ours.linear.bias)
    assert rel_err(y - ours.lora(x), plain) > 0.1  # the subclass's meaning did change the output
    y.sum().backward()
    y_ref.sum().backward()
    assert rel_err(ours.lora.A.grad, ref.lora.A.grad) < TOL[torch.float32]


def test_fx_symbolic_trace(backend):
    """torch.fx's symbolic tracing (x is a Proxy) records the reference's calls, with its numbers."""
    ours, _ = trained_pair(lambda: torch.nn.Linear(10, 7))
    model = torch.nn.Sequential(ours, torch.nn.ReLU()).to(DEVICE)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 10, device=DEVICE)
    assert rel_err(traced(x), model(x)) < TOL[torch.float32]


def test_load_state_dict_into_a_merged_layer():
    """A state dict holds the weight unmerged; loading one into a merged layer (restoring a
    checkpoint after merge() for inference) must not leave it merged with a stale update."""
    torch.manual_seed(0)
    src = lora_kernels.LinearWithLoRA(torch.nn.Linear(12, 8), 3, 2.0)
    torch.nn.init.normal_(src.lora.B)
    x = torch.randn(5, 12)
    expected = src(x).detach()
    checkpoint = src.state_dict()
    dst = lora_kernels.LinearWithLoRA(torch.nn.Linear(12, 8), 3, 2.0)
    torch.nn.init.normal_(dst.lora.B)
    dst.merge()
    dst.load_state_dict(checkpoint)
    assert dst.merged  # still merged for inference, with the loaded adapters
    assert rel_err(dst(x), expected) < TOL[torch.float32]
    dst.unmerge()
    assert rel_err(dst(x), expected) < TOL[torch.float32]
    assert rel_err(dst.linear.weight, src.linear.weight) < TOL[torch.float32]
    # Only the adapters (strict=False): the old update comes out, the loaded one goes in.
    other = lora_kernels.LinearWithLoRA(torch.nn.Linear(12, 8), 3, 2.0)
    other.load_state_dict({k: v for k, v in checkpoint.items() if k.startswith("linear.")}, strict=False)
    other.merge()
    other.load_state_dict({k: v for k, v in checkpoint.items() if k.startswith("lora.")}, strict=False)
    assert rel_err(other(x), expected) < TOL[torch.float32]


def test_load_state_dict_into_merged_layers_finishes_and_leaves_the_source_alone():
    """A layer that cannot merge the loaded adapters (non-finite) stays unmerged with a warning,
    the rest of the model still loads; with assign=True the merge does not write into the
    caller's tensors."""
    torch.manual_seed(1)
    src = torch.nn.Sequential(*(lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 6), 2, 1.0) for _ in range(2)))
    for layer in src:
        torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(4, 6)
    expected = src(x).detach()
    checkpoint = {k: v.clone() for k, v in src.state_dict().items()}

    dst = copy.deepcopy(src)
    for layer in dst:
        layer.merge()
    given = {k: v.clone() for k, v in checkpoint.items()}
    dst.load_state_dict(checkpoint, assign=True)
    assert all(torch.equal(checkpoint[k], v) for k, v in given.items())  # the caller's tensors, untouched
    assert rel_err(src(x), expected) == 0 and all(layer.merged for layer in dst)
    assert rel_err(dst(x), expected) < TOL[torch.float32]

    huge = dict(checkpoint, **{"0.lora.B": torch.full_like(checkpoint["0.lora.B"], float("inf"))})
    with pytest.warns(UserWarning, match="left unmerged"):
        dst.load_state_dict(huge)
    assert not dst[0].merged and dst[1].merged
    assert torch.equal(dst[0].lora.B, huge["0.lora.B"])
    assert rel_err(dst[1](x), src[1](x)) < TOL[torch.float32]


def test_parameter_alpha_without_grad_is_accepted():
    """The seed registers an nn.Parameter alpha as a parameter: one that does not train works."""
    alpha = torch.nn.Parameter(torch.tensor(0.5), requires_grad=False)
    ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, alpha)
    torch.nn.init.normal_(ours.lora.B)
    x = torch.randn(3, 6)
    assert rel_err(ours(x), ours.linear(x) + 0.5 * (x @ ours.lora.A @ ours.lora.B)) < TOL[torch.float32]


def test_merge_refuses_a_tied_weight():
    """An lm_head tied to the embedding: merging in place would change the embedding too."""
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 30, bias=False)
            self.head.weight = self.emb.weight

    model = lora_kernels.replace_linear_with_lora(TiedLM(), rank=2, alpha=1.0)
    assert model.head.weight_tied and not model.mid.weight_tied
    torch.nn.init.normal_(model.head.lora.B)
    before = model.emb.weight.clone()
    with pytest.raises(ValueError, match=r"shared with another module.*wrap it without that layer"):
        model.head.merge()
    assert torch.equal(model.emb.weight, before) and not model.head.merged
    model.mid.merge()  # an untied layer merges as before
    assert model.mid.merged


def test_a_weight_tied_by_memory_is_tied():
    """A tied state dict loaded into a model built on the meta device (``assign=True``) leaves the
    lm_head and the embedding two Parameters over one memory: that too is a tie, which merging
    (and merge_and_unload) would write into the embedding. Slices of one buffer that do not start
    at the same element are not."""
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8)
            self.head = torch.nn.Linear(8, 30, bias=False)
            self.head.weight = self.emb.weight

    state = TiedLM().state_dict()
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()  # (torch.save keeps that)
    with torch.device("meta"):
        model = TiedLM()
    model.load_state_dict(state, assign=True)
    assert model.head.weight is not model.emb.weight  # the case: two Parameters, one memory
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    assert model.head.weight_tied
    torch.nn.init.normal_(model.head.lora.B)
    before = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match="shared with another module"):
        lora_kernels.merge_and_unload(model)
    assert torch.equal(model.emb.weight, before)

    flat = torch.randn(2 * 36)  # two layers' weights as slices of one buffer: no tie
    apart = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False))
    apart[0].weight = torch.nn.Parameter(flat[:36].view(6, 6))
    apart[1].weight = torch.nn.Parameter(flat[36:].view(6, 6))
    lora_kernels.replace_linear_with_lora(apart, rank=2, alpha=1.0)
    assert not apart[0].weight_tied and not apart[1].weight_tied
    with torch.device("meta"):  # nor are the meta device's weights, all at address 0
        on_meta = lora_kernels.replace_linear_with_lora(torch.nn.Sequential(torch.nn.Linear(6, 6),
                                                                            torch.nn.Linear(6, 6)), rank=2, alpha=1.0)
    assert not on_meta[0].weight_tied and not on_meta[1].weight_tied


def test_merge_and_unload():
    """The model replace_linear_with_lora was given, with merged weights: the same outputs, its own
    state-dict keys, no LinearWithLoRA left; a single layer gives back its linear."""
    def build():
        torch.manual_seed(2)
        return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(),
                                   torch.nn.Sequential(torch.nn.Linear(12, 6, bias=False)))
    plain_keys = build().state_dict().keys()
    model = lora_kernels.replace_linear_with_lora(build(), rank=3, alpha=0.7)
    for layer in (model[0], model[2][0]):
        torch.nn.init.normal_(layer.lora.B)
    model[2][0].merge()  # one already merged: folded once, not twice
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = model(x)
        assert lora_kernels.merge_and_unload(model) is model
        assert rel_err(model(x), y) < TOL[torch.float32] and rel_err(y, build()(x)) > 0.01
    assert not any(isinstance(m, lora_kernels.LinearWithLoRA) for m in model.modules())
    assert model.state_dict().keys() == plain_keys
    # Nothing left to merge (called twice, or on a model it never wrapped: a peft model's, say) is
    # an error, not a model handed back as if merged.
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"no lora_kernels.LinearWithLoRA layers.*peft model.*merge_and_unload"):
        lora_kernels.merge_and_unload(model)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))

    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 3), 2, 1.0)
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = layer(x)
        linear = lora_kernels.merge_and_unload(layer)
        assert type(linear) is torch.nn.Linear and rel_err(linear(x), y) < TOL[torch.float32]


def test_merge_and_unload_unwraps_a_layer_under_every_name():
    """One LinearWithLoRA placed under two names of one parent: both places get the linear back."""
    model = torch.nn.Sequential(lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 6), 2, 1.0))
    model.add_module("again", model[0])
    torch.nn.init.normal_(model[0].lora.B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = model(x)
        lora_kernels.merge_and_unload(model)
        assert type(model[0]) is torch.nn.Linear and model.again is model[0]
        assert rel_err(model(x), y) < TOL[torch.float32]


def test_merge_and_unload_says_it_left_the_seeds_layers():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
    model[1] = lora_kernels.reference.LinearWithLoRA(model[1], 2, 1.0)
    lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    with pytest.warns(UserWarning, match=r"seed's LinearWithLoRA.*unmerged.*: 1$"):
        lora_kernels.merge_and_unload(model)
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_changes_nothing_when_a_layer_cannot_merge(dtype):
    """Bit for bit, in bf16 too: a merge taken back out would round the first layer's weight twice."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    lora_kernels.replace_linear_with_lora(model, rank=4, alpha=2.0).to(dtype)
    for layer in model:
        torch.nn.init.normal_(layer.lora.B)
    before = [layer.linear.weight.clone() for layer in model]
    model[1].weight_tied = True  # as for an lm_head tied to the embedding
    with pytest.raises(ValueError, match="changed nothing: 1 cannot merge: linear.weight is shared with another module"):
        lora_kernels.merge_and_unload(model)
    assert all(isinstance(layer, lora_kernels.LinearWithLoRA) and not layer.merged for layer in model)
    for layer, w in zip(model, before):
        assert torch.equal(layer.linear.weight, w)


def test_one_linear_in_two_places_is_tied():
    """One nn.Linear under two parents gets a wrapper (and adapter) in each, as the seed's
    replacement gives it; under two names of one parent only the first is wrapped, as the seed's.
    Either way the weight serves two places, so merging one would change the other's output."""
    class Holder(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.proj = linear

    shared = torch.nn.Linear(6, 6)
    model = torch.nn.ModuleDict({"enc": Holder(shared), "dec": Holder(shared), "own": Holder(torch.nn.Linear(6, 6))})
    lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    enc, dec = model["enc"].proj, model["dec"].proj
    assert enc is not dec and enc.linear is dec.linear is shared
    assert enc.weight_tied and dec.weight_tied and not model["own"].proj.weight_tied
    torch.nn.init.normal_(enc.lora.B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = dec(x)
    with pytest.raises(ValueError, match="shared with another module"):
        enc.merge()
    with pytest.raises(ValueError, match="shared with another module"):
        lora_kernels.merge_and_unload(model)
    with torch.no_grad():
        assert torch.equal(dec(x), before)

    aliased = torch.nn.Sequential(torch.nn.Linear(6, 6))
    aliased.add_module("again", aliased[0])
    lora_kernels.replace_linear_with_lora(aliased, rank=2, alpha=1.0)
    assert isinstance(aliased[0], lora_kernels.LinearWithLoRA) and aliased[0].weight_tied
    assert type(aliased.again) is torch.nn.Linear


def test_adapters_start_on_the_base_device_with_the_seeds_numbers():
    """Wrapping a layer already on its device (a model moved to the GPU first) puts the adapters
    there too, drawn as the seed draws them."""
    torch.manual_seed(4)
    on_meta = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5, device="meta"), 2, 1.0)
    assert on_meta.lora.A.device.type == "meta" and on_meta.lora.A.dtype == torch.float32
    ours, ref = trained_pair(lambda: torch.nn.Linear(6, 5), seed_=4)
    assert torch.equal(ours.lora.A, ref.lora.A)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_start_in_fp32_beside_a_half_base(dtype):
    """The README: the adapters start in fp32 whatever the base's dtype (as the reference's are
    drawn), as peft keeps them, and train in fp32."""
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(8, 6).to(dtype), 2, 0.5)
    assert layer.linear.weight.dtype == dtype and layer.lora.A.dtype == layer.lora.B.dtype == torch.float32
    model = lora_kernels.replace_linear_with_lora(torch.nn.Sequential(torch.nn.Linear(8, 6)).to(dtype), 2, 0.5)
    assert model[0].lora.A.dtype == torch.float32


def test_sparse_input_runs_the_reference_calls():
    """The seed's layer takes a sparse x (F.linear does); the kernels cannot read one, so the layer
    runs the reference's calls for it, with the seed's numbers."""
    torch.manual_seed(0)
    ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, 0.5)
    torch.nn.init.normal_(ours.lora.B)
    x = torch.randn(4, 6) * (torch.rand(4, 6) > 0.5)
    torch.testing.assert_close(ours(x.to_sparse()), ours(x), rtol=1e-5, atol=1e-6)


def test_nested_input_runs_the_reference_calls():
    """A jagged nested x (variable-length sequences) works in the seed's layer; the kernels cannot
    read one, so the layer runs the reference's calls for it, with the seed's numbers per sequence."""
    torch.manual_seed(0)
    ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, 0.5)
    torch.nn.init.normal_(ours.lora.B)
    seqs = [torch.randn(3, 6), torch.randn(5, 6)]
    y = ours(torch.nested.nested_tensor(seqs, layout=torch.jagged))
    for got, x in zip(y.unbind(), seqs):
        torch.testing.assert_close(got, ours(x), rtol=1e-5, atol=1e-6)


def test_torch_jit_script_is_refused():
    """README: torch.jit.script is not supported, and says so by raising (TorchScript cannot
    compile the module's forward, which reads its submodules through __dict__), not by running
    something else, with a message that says what to use instead."""
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(8, 4), rank=2, alpha=1.0)
    refused = r"LinearWithLoRA cannot be compiled by torch.jit.script.*torch.compile.*merge_and_unload"
    with pytest.raises(RuntimeError, match=refused):
        torch.jit.script(layer)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    with pytest.raises(RuntimeError, match=refused):
        torch.jit.script(model)
    # as the message says: merged and unloaded, the model scripts, with the layer's numbers
    torch.nn.init.normal_(model[0].lora.B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = model(x)
        scripted = torch.jit.script(lora_kernels.merge_and_unload(model))
        assert rel_err(scripted(x), y) < TOL[torch.float32]


def test_replace_leaves_pytorch_attention_and_transformer_layers_alone_with_a_warning():
    """nn.MultiheadAttention reads its out_proj's weight itself, and nn.TransformerEncoderLayer its
    Linears' in eval mode (its fast path): the seed's replacement breaks them (AttributeError) and
    an adapter there would never run. Ours leaves them as they are, says so, and wraps the rest."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 3, 8)
    expected = model.eval()(x)
    with pytest.warns(UserWarning, match=r"without LoRA .*: 1\.layers\.0, 1\.layers\.1$"):
        lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    assert isinstance(model[0], lora_kernels.LinearWithLoRA)
    assert not any(isinstance(m, lora_kernels.LinearWithLoRA) for m in model[1].modules())
    torch.testing.assert_close(model(x), expected)  # eval mode, where the fast path reads the weights
    model.train()(x)
    mha = torch.nn.MultiheadAttention(8, 2)
    with pytest.warns(UserWarning, match="the module given"):
        lora_kernels.replace_linear_with_lora(mha, rank=2, alpha=1.0)
    assert type(mha.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear


def test_replace_says_a_linear_given_itself_stays_unwrapped():
    """The seed's replacement wraps children only, so a bare nn.Linear comes back as it was,
    silently; ours says so and how to wrap it."""
    linear = torch.nn.Linear(4, 4)
    with pytest.warns(UserWarning, match=r"wrap it with LinearWithLoRA\(linear, rank, alpha\)\): the module given$"):
        assert lora_kernels.replace_linear_with_lora(linear, rank=2, alpha=1.0) is linear
    assert type(linear) is torch.nn.Linear and not list(linear.children())


def test_replace_names_gpt2s_conv1d_layers_it_passes_by():
    """transformers' GPT-2 builds its projections from Conv1D, not nn.Linear: the seed's
    replacement wraps only the lm_head, silently. Ours does the same and says so."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.warns(UserWarning, match=r"Conv1D.*: transformer\.h\.0\.attn\.c_attn, .*transformer\.h\.1\.mlp\.c_proj$"):
        lora_kernels.replace_linear_with_lora(model, rank=2, alpha=1.0)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, lora_kernels.LinearWithLoRA)]
    assert wrapped == ["lm_head"] and model.lm_head.weight_tied  # (tied to the token embedding)
    with pytest.warns(UserWarning, match="Conv1D.*: the module given"):
        lora_kernels.replace_linear_with_lora(model.transformer.h[0].attn.c_attn, rank=2, alpha=1.0)

    class MyConv1D(transformers.pytorch_utils.Conv1D):  # a user's subclass is named too
        pass
    with pytest.warns(UserWarning, match="subclass of transformers' Conv1D.*Conv1D itself only.*: proj$"):
        lora_kernels.replace_linear_with_lora(torch.nn.ModuleDict({"proj": MyConv1D(8, 4)}), rank=2, alpha=1.0)


def test_weights_swapped_in_by_functional_call_or_a_data_parallel_replica(backend, monkeypatch):
    """torch.func.functional_call puts its tensors in the modules' parameter dicts, and an
    nn.DataParallel replica holds its weights as plain attributes: the fused call (which reads
    them without nn.Module's __getattr__, modules.param) must use those, not the original's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16))
    lora_kernels.replace_linear_with_lora(model, rank=4, alpha=0.5)
    model.to(DEVICE)
    calls = []
    fused = lora_kernels.modules.lora_linear
    monkeypatch.setattr(lora_kernels.modules, "lora_linear", lambda *a: calls.append(1) or fused(*a))
    new = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(6, 24, device=DEVICE)

    def expected(p):  # the seed's formula in float64
        h = x.double()
        for i in (0, 2):
            W, b, A, B = (p[f"{i}.{k}"].double() for k in ("linear.weight", "linear.bias", "lora.A", "lora.B"))
            h = torch.nn.functional.linear(h, W, b) + 0.5 * (h @ A @ B)
            h = torch.relu(h) if i == 0 else h
        return h

    mine = {n: t.clone().requires_grad_() for n, t in new.items()}
    theirs = {n: t.double().requires_grad_() for n, t in new.items()}
    dy = torch.randn(6, 16, device=DEVICE)
    for run in (lambda: torch.func.functional_call(model, mine, (x,)),
                lambda: replicate_like_data_parallel(model, mine)(x)):
        calls.clear()
        y = run()
        assert len(calls) == 2 and rel_err(y, expected(new)) < TOL[torch.float32]
        assert rel_err(y, model(x)) > 1e-2  # the original's weights give something else
        grads = torch.autograd.grad(y, list(mine.values()), dy)
        want = torch.autograd.grad(expected(theirs), list(theirs.values()), dy.double())
        for name, got, ref in zip(mine, grads, want):
            assert rel_err(got, ref) < TOL[torch.float32], name


def test_weights_held_as_buffers_and_a_scripted_linear(backend, monkeypatch):
    """A frozen weight may be a buffer (a base's weight and bias, or LoRA-FA's frozen A): the
    fused call reads it as attribute access does. A TorchScript child runs the unfused calls."""
    torch.manual_seed(0)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(24, 16), 4, 0.5).to(DEVICE)
    torch.nn.init.normal_(layer.lora.B)
    for module, name in ((layer.linear, "weight"), (layer.linear, "bias"), (layer.lora, "A")):
        value = getattr(module, name).detach().clone()
        delattr(module, name)
        module.register_buffer(name, value)
    calls = []
    fused = lora_kernels.modules.lora_linear
    monkeypatch.setattr(lora_kernels.modules, "lora_linear", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(5, 24, device=DEVICE)
    W, b, A, B = (t.double() for t in (layer.linear.weight, layer.linear.bias, layer.lora.A, layer.lora.B))
    want = torch.nn.functional.linear(x.double(), W, b) + 0.5 * (x.double() @ A @ B)
    assert rel_err(layer(x), want) < TOL[torch.float32] and calls == [1]
    layer.linear = torch.jit.trace(torch.nn.Linear(24, 16).to(DEVICE), (x,))
    W, b = layer.linear.weight.double(), layer.linear.bias.double()
    want = torch.nn.functional.linear(x.double(), W, b) + 0.5 * (x.double() @ A @ B)
    assert rel_err(layer(x), want) < TOL[torch.float32] and calls == [1]


def test_constant_tensor_alpha_is_held_as_a_number():
    """The seed takes a 0-d tensor alpha; a constant one is kept as a float (torch.compile could
    only read a tensor's value through .item()), with the same numbers."""
    ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, torch.tensor(0.5))
    assert isinstance(ours.lora.alpha, float) and ours.lora.alpha == 0.5
    # A one-element tensor of one dimension too; one of more is kept, and checked when called.
    assert lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, torch.tensor([0.5])).lora.alpha == 0.5
    x = torch.randn(3, 6)
    for alpha in (torch.tensor([0.5]), torch.full((1, 1), 0.5)):
        torch.manual_seed(0)
        ours = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, alpha)
        torch.manual_seed(0)
        ref = seed.LinearWithLoRA(torch.nn.Linear(6, 5), 2, alpha)
        torch.nn.init.normal_(ours.lora.B), ref.lora.B.data.copy_(ours.lora.B)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_a_model_built_on_meta_gets_the_adapters_init_from_reset_parameters():
    """The recipe for models too large to build whole (FSDP2's; FSDP1's default param_init_fn):
    build on the meta device, to_empty, then reset_parameters() on every module that has one. The
    adapters must come out as __init__ makes them (A drawn the same way from the same seed, B
    zero), not with whatever memory to_empty handed out."""
    torch.manual_seed(3)
    with torch.device(DEVICE):  # (drawn by the generator reset_parameters will draw from: CUDA's on a GPU)
        want = lora_kernels.LoRALayer(16, 12, 4, 2.0)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 16))
        lora_kernels.replace_linear_with_lora(model, 4, 2.0)
    model.to_empty(device=DEVICE)
    for p in model.parameters():
        with torch.no_grad():
            p.fill_(float("nan"))  # (what to_empty's memory may hold)
    torch.manual_seed(3)
    model[0].lora.reset_parameters()
    assert torch.equal(model[0].lora.A, want.A) and torch.equal(model[0].lora.B, want.B)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x = torch.randn(5, 16, device=DEVICE)
    assert torch.isfinite(model(x)).all()
    assert all(torch.count_nonzero(layer.lora.B) == 0 and torch.isfinite(layer.lora.A).all()
               and torch.count_nonzero(layer.lora.A) > 0 for layer in (model[0], model[2]))
