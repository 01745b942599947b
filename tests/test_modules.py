"""The modules are a drop-in for the seed's: same constructor, init, state-dict keys, numbers."""

import pytest
import torch

import lora_kernels
from conftest import TOL, rel_err
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


def test_state_dict_loads_both_ways_strict():
    ours, ref = build(lora_kernels, 1), build(seed, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref2 = build(seed, 3)
    ref2.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(ref.state_dict().values(), ref2.state_dict().values()):
        assert torch.equal(a, b)


def test_same_outputs_and_grads_as_seed(backend):
    ref = build(seed)
    with torch.no_grad():  # B starts at zero: make the LoRA path count
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = build(lora_kernels, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 24)
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


def test_rank_below_one_refused():
    with pytest.raises(ValueError, match="rank"):
        lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 4), rank=0, alpha=1.0)
