"""Shared test set-up: backends, the float64 oracle, error measure and tolerances.

With no GPU, Triton's interpreter runs the kernels on CPU tensors; it must be switched on before
Triton compiles anything, so here, before any test module imports lora_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lora_kernels import kernels  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative Frobenius error allowed per dtype (design.md §4). Observed levels: fp64 ~1e-16,
# fp32 ~2e-7, fp16 ~4e-4, bf16 ~4e-3; each bound is a few times that, so a real bug still fails.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def backends():
    """The backends these tests can run here: the PyTorch path always, Triton on a GPU or under
    the interpreter. Tests parametrized with it and id'ed 'triton' count as kernel runs."""
    out = [pytest.param("torch", id="torch")]
    if kernels.INTERPRET or torch.cuda.is_available():
        out.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return out


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", request.param)
    if request.param == "triton":
        # Poison every buffer a kernel writes: an element it skips stays NaN and fails the test.
        def nan_empty(shape, device, dtype):
            return torch.full(shape, float("nan"), device=device, dtype=dtype)
        monkeypatch.setattr(kernels, "_empty", nan_empty)
    return request.param


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends(), indirect=True)


def make_inputs(lead, K, N, r, dtype, adapter_dtype=None, bias=True, device=DEVICE, seed=0):
    """Fresh random inputs (never zeros), scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    x = rnd(*lead, K)
    W = rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    A = rnd(K, r, scale=K ** -0.5, dt=adapter_dtype)
    B = rnd(r, N, scale=r ** -0.5, dt=adapter_dtype)
    return x, W, b, A, B


def reference(x, W, b, A, B, alpha, dy, base_grads=False):
    """The seed's formula in float64 on the same (already rounded) inputs, with autograd grads."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, b, A, B)]
    x64, W64, b64, A64, B64 = leaves
    y = torch.nn.functional.linear(x64, W64, b64) + alpha * (x64 @ A64 @ B64)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]
