"""Bad input raises a clear error before any kernel runs; the backend switch is honoured."""

import pytest
import torch

import lora_kernels
from conftest import DEVICE, make_inputs, use_triton


def randn(*shape, **kwargs):  # replacements on the inputs' device, so the check under test is the first to fail
    return torch.randn(*shape, device=DEVICE, **kwargs)


def ones(*shape, **kwargs):
    return torch.ones(*shape, device=DEVICE, **kwargs)


def good():
    return list(make_inputs((4, 6), 10, 12, 3, torch.float32))


def call(x, W, b, A, B, alpha=1.0):
    return lora_kernels.lora_linear(x, W, b, A, B, alpha)


class Subclass(torch.Tensor):
    """A tensor subclass (a quantized weight, a DTensor), whose storage the kernels must not read."""


@pytest.mark.parametrize("change,error,words", [
    (lambda a: a.__setitem__(0, randn(4, 6, 11)), ValueError, ["(..., 10)", "(4, 6, 11)"]),
    (lambda a: a.__setitem__(0, randn(())), ValueError, ["(..., 10)", "()"]),
    (lambda a: a.__setitem__(1, randn(12, 10, 1)), ValueError, ["weight must be 2-D", "(12, 10, 1)"]),
    (lambda a: a.__setitem__(2, randn(11)), ValueError, ["bias", "(12,)", "(11,)"]),
    (lambda a: a.__setitem__(2, randn(1, 12)), ValueError, ["bias", "(12,)", "(1, 12)"]),
    (lambda a: a.__setitem__(2, randn(12, 1)), ValueError, ["bias", "(12,)", "(12, 1)"]),
    (lambda a: a.__setitem__(3, randn(9, 3)), ValueError, ["A must be (10, r)", "(9, 3)"]),
    (lambda a: a.__setitem__(4, randn(3, 13)), ValueError, ["B (r, 12)", "(3, 13)"]),
    (lambda a: a.__setitem__(4, randn(2, 12)), ValueError, ["(2, 12)"]),
    (lambda a: a.__setitem__(3, randn(10)), ValueError, ["2-D", "(10,)"]),
    (lambda a: (a.__setitem__(3, randn(10, 0)), a.__setitem__(4, randn(0, 12))), ValueError,
     ["rank must be >= 1"]),
    (lambda a: a.__setitem__(0, ones(4, 6, 10, dtype=torch.int64)), TypeError, ["x", "floating", "int64"]),
    (lambda a: a.__setitem__(3, ones(10, 3, dtype=torch.int32)), TypeError, ["A", "floating", "int32"]),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, ["share a dtype", "float64"]),
    (lambda a: a.__setitem__(2, a[2].half()), TypeError, ["bias", "float16"]),
    (lambda a: a.__setitem__(4, a[4].double()), TypeError, ["A and B", "float64"]),
    (lambda a: a.__setitem__(0, a[0].cpu().numpy()), TypeError, ["x must be a torch.Tensor", "ndarray"]),
    (lambda a: a.__setitem__(1, a[1].as_subclass(Subclass)), TypeError, ["weight is a tensor subclass", "Subclass"]),
    (lambda a: [a.__setitem__(i, a[i].to(torch.float8_e4m3fn)) for i in range(3)], TypeError,
     ["x must have a floating-point dtype", "float8_e4m3fn"]),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, ["one device", "bias on meta"]),
    (lambda a: a.__setitem__(0, a[0].to("meta")), ValueError, ["one device", "x on meta", "weight on"]),
    (lambda a: a.__setitem__(1, a[1].to("meta")), ValueError, ["one device", "weight on meta"]),
    (lambda a: a.__setitem__(3, a[3].to("meta")), ValueError, ["one device", "A on meta"]),
    (lambda a: a.__setitem__(4, a[4].to("meta")), ValueError, ["one device", "B on meta"]),
    (lambda a: a.__setitem__(1, a[1].to_sparse()), TypeError, ["weight must be a dense", "sparse_coo"]),
    (lambda a: a.__setitem__(3, a[3].to_sparse_csr()), TypeError, ["A must be a dense", "sparse_csr"]),
    (lambda a: a.__setitem__(0, torch.nested.nested_tensor(list(a[0]))), TypeError, ["x is a nested tensor"]),
    (lambda a: a.__setitem__(0, torch.nested.nested_tensor(list(a[0]), layout=torch.jagged)), TypeError,
     ["x is a nested tensor"]),
], ids=["x-last-dim", "x-scalar", "W-rank", "bias-shape", "bias-row", "bias-column", "A-rows", "B-cols", "B-rank-mismatch", "A-1d",
        "rank-0", "x-int", "A-int", "W-dtype", "bias-dtype", "B-dtype", "x-numpy", "subclass", "float8", "device",
        "x-device", "W-device", "A-device", "B-device",
        "W-sparse", "A-sparse", "x-nested", "x-jagged"])
def test_bad_input(change, error, words):
    args = good()
    change(args)
    snapshot = [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided
                and not t.is_nested else None for t in args]
    with pytest.raises(error) as info:
        call(*args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    for before, after in zip(snapshot, args):  # nothing was modified on the way to the error
        if isinstance(before, torch.Tensor):
            assert torch.equal(before, after)


@pytest.mark.parametrize("alpha,error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                         (-float("inf"), ValueError), (True, TypeError),
                                         (torch.tensor([1.0, 2.0]), TypeError), ("2", TypeError),
                                         (torch.ones(1, 1, 1, 1), ValueError),  # would broadcast y (3-D) to 4-D
                                         (torch.tensor(float("nan")), ValueError), (torch.tensor(1 + 2j), TypeError),
                                         (torch.tensor(2.0, requires_grad=True), ValueError),  # its grad would be lost
                                         (10 ** 400, ValueError)])  # an int no float can hold
def test_bad_alpha(alpha, error):
    with pytest.raises(error, match="alpha"):
        call(*good(), alpha=alpha)


def test_alpha_forms_the_seed_accepts():
    """A Python int, a numpy scalar and a one-element tensor (of no more dimensions than x) all
    scale like the float."""
    import numpy as np
    args = good()
    expected = call(*args, alpha=2.0)
    for alpha in (2, np.float32(2.0), torch.tensor(2.0), torch.tensor([2.0]), torch.full((1, 1), 2.0)):
        assert torch.equal(call(*args, alpha=alpha), expected)


def test_interpreter_keeps_bf16_off_the_kernels_for_cuda_tensors_too(monkeypatch):
    """With TRITON_INTERPRET=1 on a GPU machine, CUDA tensors would run the kernels through the
    interpreter too, which computes bf16 wrong: the same rule as for CPU tensors."""
    from types import SimpleNamespace
    from lora_kernels import functional
    monkeypatch.setattr(functional.kernels, "INTERPRET", True)
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # only what the choice reads
    for choice, want in (("auto", "torch"), ("triton", "torch")):
        monkeypatch.setenv("LORA_KERNELS_BACKEND", choice)
        assert functional.select_backend(x, torch.float32) == want
        # bf16 adapters beside an fp32 x too
        assert functional.select_backend(SimpleNamespace(is_cuda=True, dtype=torch.float32), torch.bfloat16) == want
    assert functional.select_backend(SimpleNamespace(is_cuda=True, dtype=torch.float32), torch.float32) == "triton"
    monkeypatch.setattr(functional.kernels, "INTERPRET", False)
    assert functional.select_backend(x, torch.float32) == "triton"


def test_triton_backend_off_the_interpreter_takes_meta_and_fake_inputs_and_refuses_cpu_ones(monkeypatch):
    """On a GPU machine (no interpreter) LORA_KERNELS_BACKEND=triton gives a meta or fake input the
    Triton path (the ops' shape functions serve it, nothing launches), as on a CUDA tensor; a real
    CPU tensor, which no kernel can read there, is refused by name."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from lora_kernels import functional
    if functional.kernels is None:
        pytest.skip("no Triton: every call takes the PyTorch path")
    monkeypatch.setattr(functional.kernels, "INTERPRET", False)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with FakeTensorMode():
        fake = torch.empty(2, 3)
    assert functional.select_backend(torch.empty(2, 3, device="meta"), torch.float32) == "triton"
    assert functional.select_backend(fake, torch.float32) == "triton"
    with pytest.raises(RuntimeError, match="LORA_KERNELS_BACKEND=triton with cpu tensors needs CUDA tensors"):
        functional.select_backend(torch.empty(2, 3), torch.float32)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        call(*good())


def test_small_eager_cuda_calls_take_the_pytorch_path_below_the_threshold(monkeypatch):
    """``TORCH_BELOW``: under ``auto``, a CUDA call with fewer multiply-adds (x's elements × out
    features) than it takes the PyTorch path; one at it, a call without out features, a compiled
    one, one in CUDA graph capture, a named backend, or a threshold of 0 (the default) keep the kernels."""
    from types import SimpleNamespace
    from lora_kernels import functional
    if functional.kernels is None:
        pytest.skip("no Triton: every call takes the PyTorch path")
    monkeypatch.setattr(functional.kernels, "INTERPRET", False)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    x = SimpleNamespace(is_cuda=True, is_meta=False, dtype=torch.bfloat16, numel=lambda: 64 * 4096)  # 64 tokens, 4096 features
    choose = functional.select_backend
    monkeypatch.setattr(functional, "TORCH_BELOW", 0)  # (off: the default, read at import in test_launch)
    assert choose(x, torch.bfloat16, 1024) == "triton"
    monkeypatch.setattr(functional, "TORCH_BELOW", 64 * 4096 * 1024)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (CPU builds: a stub that raises)
    assert choose(x, torch.bfloat16, 1023) == "torch" and choose(x, torch.bfloat16, 1024) == "triton"
    assert choose(x, torch.bfloat16) == "triton"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose(x, torch.bfloat16, 8) == "triton"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert choose(x, torch.bfloat16, 8) == "torch"
    step = torch.compile(lambda t: t * 2 if choose(x, torch.bfloat16, 8) == "triton" else t,
                         fullgraph=True, backend="eager")
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    assert choose(x, torch.bfloat16, 8) == "triton"

    # Fake CUDA tensors (a memory estimate, say; here on a CPU build, whose capture query raises)
    # and traced calls keep the kernels' path, whatever their size.
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")

    def stub():
        raise RuntimeError("a CPU build's stub")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", stub)
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda")
        assert choose(fake, torch.float32, 4) == "triton"
        assert lora_kernels.lora_linear(fake, torch.empty(5, 3, device="cuda"), None, torch.empty(3, 2, device="cuda"),
                                        torch.empty(2, 5, device="cuda"), 1.0).shape == (2, 5)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert choose(x, torch.bfloat16, 8) == "torch"
    monkeypatch.setattr(torch._C, "_get_tracing_state", lambda: object())  # (torch.jit.trace)
    assert choose(x, torch.bfloat16, 8) == "triton"
    monkeypatch.undo()

    # lora_linear asks with the layer's out features (weight's rows)
    seen = []
    monkeypatch.setattr(functional, "select_backend", lambda x, dtype, n=None: (seen.append(n), "torch")[1])
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    call(*good())
    assert seen == [good()[1].shape[0]]


@pytest.mark.parametrize("text, value", [("0", 0), ("137438953472", 2**37), (" 2**37 ", 2**37), ("2 ** 36", 2**36)])
def test_torch_below_setting_reads_a_number_or_a_power(text, value):
    from lora_kernels import functional
    assert functional._read_torch_below(text) == value


@pytest.mark.parametrize("text", ["", "2^37", "-5", "1e9", "9**99999", "\uff12**\uff13\uff17"])  # (full-width digits)
def test_a_bad_torch_below_setting_is_named(text):
    from lora_kernels import functional
    with pytest.raises(ValueError, match="LORA_KERNELS_TORCH_BELOW must be a whole number"):
        functional._read_torch_below(text)


def test_kernels_that_cannot_be_imported_are_never_a_silent_fallback(monkeypatch):
    """Triton missing or too old: CUDA tensors still run (the PyTorch path), with a warning that
    says why; asking for the kernels by name raises the reason."""
    from types import SimpleNamespace
    from lora_kernels import functional
    monkeypatch.setattr(functional, "kernels", None)
    monkeypatch.setattr(functional, "_NO_KERNELS", "the Triton kernels cannot be imported (too old)")
    cuda_like = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))  # no GPU needed
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match=r"cannot be imported \(too old\).*unfused PyTorch path"):
        assert functional.select_backend(cuda_like, torch.float32) == "torch"
    # torch.compile cannot trace a warning: there the choice is made quietly, with no graph break.
    step = torch.compile(lambda t: t * 2 if functional.select_backend(cuda_like, torch.float32) == "torch" else t,
                         fullgraph=True, backend="eager")
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="LORA_KERNELS_BACKEND=triton but the Triton kernels cannot be imported"):
        functional.select_backend(cuda_like, torch.float32)


def test_backends_agree(monkeypatch):
    """The same call through each available backend gives the same numbers (fp64: to rounding)."""
    from conftest import backends
    args = list(make_inputs((7, 5), 21, 18, 4, torch.float64))
    outs = []
    for b in backends():
        monkeypatch.setenv("LORA_KERNELS_BACKEND", b.values[0])
        if b.values[0] == "triton":
            use_triton(monkeypatch)  # (its outputs poisoned before the kernels write them)
        outs.append(call(*args, alpha=0.3))
    # (alpha = 0.3 is not a float32: a kernel taking it as one, Triton's type for a Python float
    # unless annotated, would agree to about 1e-8 only, as the kernels did on a GPU until fixed.)
    tol = 1e-12
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=tol, atol=tol)
