"""What a fine-tuning run uses beyond the bare layer: LoRA dropout, merge/unmerge, autocast."""

import pytest
import torch
import triton
import triton.language as tl

import lora_kernels
from conftest import (DEVICE, TOL, backends_with, bf16_through_kernels, make_inputs, reference, rel_err,
                      seed_of_next_call, use_triton)
from lora_kernels import functional, kernels
from test_lora_linear import LaunchSpy


# Odd sizes (pointer loads), and sizes whose rows are whole 16 bytes (TMA loads where the kernels
# have them): the mask must land on the same elements either way.
DROPOUT_SHAPES = {"odd": ((3, 41), 37, 29, 6), "aligned": ((2, 40), 64, 48, 8)}


@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
# (the fused shrink is a Triton kernel variant: the PyTorch path has the separate one only)
@pytest.mark.parametrize("backend,shrink", backends_with(
    lambda b: ["separate", "fused", "ahead"] if b == "triton" else ["separate"]), indirect=["backend"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_dropout_matches_reference_with_same_mask(backend, p, shrink, shape, monkeypatch):
    monkeypatch.setattr(functional, "FUSE_SHRINK", {"separate": "0", "fused": "1", "ahead": "ahead"}[shrink])
    lead, K, N, r = DROPOUT_SHAPES[shape]
    x, W, b, A, B = make_inputs(lead, K, N, r, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, A, B)]
    spy = LaunchSpy(kernels._lora_matmul_kernel)
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", spy)
    # Every launch through the spy: on a GPU a kernel already compiled is otherwise launched directly.
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    torch.manual_seed(7)
    y = lora_kernels.lora_linear(*leaves, 1.25, dropout_p=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    if backend == "triton" and kernels._tma_available(torch.device(DEVICE)):
        assert set(spy.allow_tma) == {shape == "aligned"}  # the masks met TMA-loaded tiles too
    if backend == "triton" and kernels.INTERPRET:
        # the masked dA's reduction split: masks past the first chunk of rows (the interpreter's
        # 64-row chunks and 8 "SMs" split it; a GPU's 132 SMs and 256-row chunks do not, here)
        assert any(spy.splits)

    seed = seed_of_next_call(7, backend)
    keep = functional.keep_mask(x.numel() // K, K, seed, p, DEVICE, backend).reshape(x.shape)
    x64 = x.double().requires_grad_()
    W64, b64 = W.double().requires_grad_(), b.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    y_ref = torch.nn.functional.linear(x64, W64, b64) + 1.25 * ((x64 * keep / (1 - p)) @ A64 @ B64)
    y_ref.backward(dy.double())
    for out, ref in [(y, y_ref), (leaves[0].grad, x64.grad), (leaves[1].grad, W64.grad),
                     (leaves[2].grad, b64.grad), (leaves[3].grad, A64.grad), (leaves[4].grad, B64.grad)]:
        assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("dtype_name, adapter_name, alpha, r", [("float16", "float32", 1000.0, 8),
                                                                ("float64", "float64", 0.75, 8),
                                                                ("float32", "float32", 0.75, 100)])
@pytest.mark.parametrize("fuse", ["0", "1", "ahead"], ids=["separate", "fused", "ahead"])
def test_dropout_where_the_sum_is_scaled_in_fp64_and_past_one_rank_block(dtype_name, adapter_name, alpha, r, fuse,
                                                                         monkeypatch):
    """dX's masked low-rank term in the dtypes whose scales differ from fp32's: in fp16 alpha goes
    on the fp32 sum (dY W / alpha + dS Aᵀ ⊙ m, times alpha: ``sum_scale``), which the term, added
    onto the empty accumulator before the K loop where dS is given, must follow (it is divided by
    the sum's scale there); fp64 accumulates in fp64; and a rank past one block (BLOCK_R is at
    most 64: two trips of the rank loop; the shrink separate either way). Every shrink placement,
    every gradient against float64 with the same mask; the LoRA term carries most of y and dX
    here. (fp32 adapters beside fp16, peft's default: dA would pass fp16's range.)"""
    use_triton(monkeypatch)
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    dtype, p = getattr(torch, dtype_name), 0.3
    lead, K, N, _ = DROPOUT_SHAPES["aligned"]
    assert 8 <= kernels.FUSE_MAX_RANK < 100  # the premise: a block holds up to FUSE_MAX_RANK ranks
    x, W, b, A, B = make_inputs(lead, K, N, r, dtype, adapter_dtype=getattr(torch, adapter_name), seed=4)
    assert dtype != torch.float16 or kernels._SUM_SCALED[0] <= alpha <= kernels._SUM_SCALED[1]  # the premise
    leaves = [t.clone().requires_grad_() for t in (x, W, b, A, B)]
    torch.manual_seed(5)
    y = lora_kernels.lora_linear(*leaves, alpha, dropout_p=p)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    y.backward(dy)
    keep = functional.keep_mask(x.numel() // K, K, seed_of_next_call(5, "triton"), p, DEVICE, "triton").reshape(x.shape)
    x64, W64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, b, A, B))
    lora = alpha * ((x64 * keep / (1 - p)) @ A64 @ B64)
    y_ref = torch.nn.functional.linear(x64, W64, b64) + lora
    y_ref.backward(dy.double())
    dx_lora = alpha * (dy.double() @ B64.t() @ A64.t()) * keep / (1 - p)
    assert lora.norm() > y_ref.norm() / 2 and dx_lora.norm() > x64.grad.norm() / 2  # the premise
    for out, ref in [(y, y_ref), (leaves[0].grad, x64.grad), (leaves[1].grad, W64.grad),
                     (leaves[2].grad, b64.grad), (leaves[3].grad, A64.grad), (leaves[4].grad, B64.grad)]:
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-trained", "x-frozen"])
def test_dropout_on_a_transposed_x(backend, x_grad):
    """The mask is drawn by each element's place in x as the caller sees it, whatever x's strides
    (here a transposed view); with x frozen, dA takes the backward's other branch (dS alone)."""
    M, K, N, r, p = 37, 29, 24, 5, 0.3
    _, W, b, A, B = make_inputs((M,), K, N, r, torch.float32)
    x = torch.randn(K, M, device=DEVICE).t().requires_grad_(x_grad)  # strides (1, M)
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    torch.manual_seed(11)
    y = lora_kernels.lora_linear(x, W, b, A_, B_, 0.75, dropout_p=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = functional.keep_mask(M, K, seed_of_next_call(11, backend), p, DEVICE, backend).reshape(M, K)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y_ref = torch.nn.functional.linear(x64, W.double(), b.double()) + 0.75 * ((x64 * keep / (1 - p)) @ A64 @ B64)
    y_ref.backward(dy.double())
    pairs = [(y, y_ref), (A_.grad, A64.grad), (B_.grad, B64.grad)] + ([(x.grad, x64.grad)] if x_grad else [])
    for out, ref in pairs:
        assert rel_err(out, ref) < TOL[torch.float32]


def test_dropout_keep_rate_and_unbiased_mean(backend):
    p, M, K, N = 0.3, 96, 64, 48
    keep = functional.keep_mask(M, K, 2024, p, DEVICE, backend)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate

    # E[y] is the no-dropout output. Positive inputs make the LoRA term large, so a missing
    # 1/(1-p) rescale would be off by tens of standard errors; per-token means are independent.
    g = torch.Generator().manual_seed(3)
    x, A, B = (torch.rand(*s, generator=g).to(DEVICE) for s in [(M, K), (K, 4), (4, N)])
    W, b = torch.randn(N, K, generator=g).to(DEVICE) * 0.1, torch.randn(N, generator=g).to(DEVICE)
    y0 = lora_kernels.lora_linear(x, W, b, A, B, 1.0)
    d = torch.stack([(lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=p) - y0).mean(1)
                     for _ in range(4)]).flatten().double()
    t = d.mean() / (d.std() / len(d) ** 0.5)
    assert abs(t.item()) < 5, t.item()
    assert d.std() > 0  # dropout did something


def _hash32(x):
    # kernels._hash32 in int64 arithmetic, wrapped to 32 bits
    state = (x * 747796405 + 2891336453) & 0xFFFFFFFF
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & 0xFFFFFFFF
    return (word >> 22) ^ word


def _uniform_reference(offsets, seed):
    """kernels._keep's uniform draw u in [0, 1) at each offset, recomputed in PyTorch from its definition."""
    o = offsets.to(torch.int64)
    k = _hash32(torch.tensor(seed))
    m = _hash32(k) | 1
    mixed = (((o & 0xFFFFFFFF) ^ (((o >> 32) * 0x9E3779B9) & 0xFFFFFFFF) ^ k) * m) & 0xFFFFFFFF
    return (_hash32(mixed) >> 8).to(torch.float32) * (1.0 / 16777216)


def _keep_reference(offsets, seed, p):
    """kernels._keep's mask: u >= p, p in fp32 as the kernels take it."""
    return _uniform_reference(offsets, seed) >= torch.tensor(p, dtype=torch.float32)


@triton.jit
def _keep_at(out_ptr, seed_ptr, p, row0, n, si, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK).to(tl.int64)
    keep = kernels._keep(tl.load(seed_ptr), p, rows, tl.arange(0, 1).to(tl.int64), si, 1, WIDE)
    tl.store(out_ptr + tl.arange(0, BLOCK)[:, None], keep, mask=(tl.arange(0, BLOCK) < n)[:, None])


@pytest.mark.triton
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999, 1.0])
def test_kernel_mask_is_its_definition(p):
    """The kernels' keep mask is exactly _keep's hash, here recomputed in PyTorch: for a mask of
    x (offsets i·K + j); in _keep's 32-bit form for offsets up to just below 2^32 (past 2^31, where
    an int32 would turn negative); and in its 64-bit form (WIDE) for offsets past 2^32 (rows of a
    huge x), where the high word mixes in. (p = 1 keeps nothing.)"""
    seed = 987654321
    keep = functional.keep_mask(37, 53, seed, p, DEVICE, "triton").cpu()
    assert torch.equal(keep, _keep_reference(torch.arange(37 * 53).reshape(37, 53), seed, p))
    for si, row0, wide in [(67108879, 0, False), (2**31 + 7, 3, True)]:
        out = torch.zeros(64, 1, dtype=torch.bool, device=DEVICE)
        _keep_at[(1,)](out, torch.tensor(seed, device=DEVICE), p, row0, 64, si, BLOCK=64, WIDE=wide)
        offsets = (row0 + torch.arange(64)) * si
        assert (offsets.max() > 2**33) if wide else (2**31 < offsets.max() < 2**32)
        assert torch.equal(out.cpu()[:, 0], _keep_reference(offsets, seed, p))
    assert p < 1.0 or not keep.any()


@pytest.mark.triton
@pytest.mark.parametrize("si, sj", [(36, 1), (2**31 + 7, 1), (3, 2**31 + 5), (2**33, 2**20)])
def test_every_masked_launch_hashes_the_offsets_it_is_given(si, sj, monkeypatch):
    """Each place the kernel masks (X of a product, of dA beside dB, dX's low-rank term before the
    K loop and after it with the fused shrink) draws element (i, j)'s keep from offset i·si + j·sj,
    in 64 bits (DROP_WIDE) where those offsets reach 2^32: against the mask's definition, in float64."""
    use_triton(monkeypatch)
    g = torch.Generator().manual_seed(8)
    M, K, N, r, p, seed = 40, 36, 20, 8, 0.5, 4242
    x, w, w2, L, R, A = (torch.randn(*s, generator=g).to(DEVICE) for s in ((M, K), (K, N), (K, N), (M, r), (r, N),
                                                                         (K, r)))
    x2 = torch.randn(12, K, generator=g).to(DEVICE)
    keep_x, keep_out = (_keep_reference(torch.arange(M)[:, None] * si + torch.arange(n)[None, :] * sj, seed, p)
                        .to(DEVICE) for n in (K, N))
    f32, s = dict(out_dtype=torch.float32, dot_dtype=torch.float32), torch.tensor(seed, device=DEVICE)
    x64, w64, L64, R64, A64 = (t.double() for t in (x, w, L, R, A))
    on_x, on_out = ("x", s, p, si, sj), ("lowrank", s, p, si, sj)
    out, out2 = kernels.lora_matmul(x, w, dropout=on_x, pair=(x2, w2), **f32)
    y, S = kernels.lora_matmul(x, w, lowrank=(kernels.Shrink(A, 1.0, torch.float32), R), dropout=on_out, **f32)
    low_first = kernels.lora_matmul(x, w, lowrank=(L, R), dropout=on_out, **f32)
    for got, want in [(kernels.lora_matmul(x, w, dropout=on_x, **f32), (x64 * keep_x) @ w64),
                      (out, (x64 * keep_x) @ w64), (out2, (x2.double() @ w2.double()).t()),
                      (low_first, x64 @ w64 + keep_out * (L64 @ R64)),
                      (y, x64 @ w64 + keep_out * ((x64 @ A64) @ R64)), (S, x64 @ A64)]:
        assert rel_err(got, want) < TOL[torch.float32]
    assert 0 < keep_x.sum() < keep_x.numel() and 0 < keep_out.sum() < keep_out.numel()


@pytest.mark.triton
def test_kernel_mask_keeps_an_element_exactly_while_p_is_at_most_its_draw():
    """The kernels compare u >= p as integers (u's 24 bits against ceil(p · 2^24)): at p = u an
    element keeps, half a step of u's above it drops (p · 2^24 not a whole number there: a floor
    in place of the ceiling would keep it), half a step below it keeps."""
    seed = 4242
    u = _uniform_reference(torch.arange(64), seed).double()
    j = int(((u - 0.375).abs()).argmin())  # a draw in [1/4, 1/2), where fp32 holds p = u ± 2^-25 exactly
    assert 0.25 <= u[j] < 0.5
    for p, keeps in [(u[j], True), (u[j] + 2**-25, False), (u[j] - 2**-25, True)]:
        assert functional.keep_mask(1, 64, seed, p.item(), DEVICE, "triton")[0, j].item() == keeps, (p.item(), keeps)


@pytest.mark.triton
def test_kernel_mask_statistics():
    """The hash-based mask behaves as independent draws: its rate, and the joint rates of each
    element with its right and lower neighbours and with itself under the next seed, are within
    5 standard errors of independence."""
    p, M, K = 0.5, 256, 256
    a = functional.keep_mask(M, K, 1234, p, DEVICE, "triton").double()
    b = functional.keep_mask(M, K, 1235, p, DEVICE, "triton").double()
    q = 1 - p
    for name, joint, n in [("rate", a.mean(), a.numel()), ("right", (a[:, 1:] * a[:, :-1]).mean(), M * (K - 1)),
                           ("below", (a[1:] * a[:-1]).mean(), (M - 1) * K), ("next seed", (a * b).mean(), M * K)]:
        want = q if name == "rate" else q * q
        assert abs(joint.item() - want) < 5 * (want * (1 - want) / n) ** 0.5, (name, joint.item())


def test_dropout_repeatable_under_manual_seed(backend):
    args = make_inputs((50,), 33, 20, 4, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(lora_kernels.lora_linear(*args, 1.0, dropout_p=0.4))
    following = lora_kernels.lora_linear(*args, 1.0, dropout_p=0.4)  # (a model's next layer, or next step)
    torch.manual_seed(12)
    other = lora_kernels.lora_linear(*args, 1.0, dropout_p=0.4)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], other)
    assert not torch.equal(outs[1], following)  # each call draws its own seed from torch's generator


def test_dropout_edges_and_eval(backend):
    x, W, b, A, B = make_inputs((20,), 18, 14, 3, torch.float32)
    plain = lora_kernels.lora_linear(x, W, b, A, B, 2.0)
    assert torch.equal(lora_kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.0), plain)
    # p = 1 drops the whole LoRA term, and A and B get zero gradients.
    A1, B1 = A.clone().requires_grad_(), B.clone().requires_grad_()
    y1 = lora_kernels.lora_linear(x, W, b, A1, B1, 2.0, dropout_p=1.0)
    assert rel_err(y1, torch.nn.functional.linear(x, W, b)) < TOL[torch.float32]
    y1.sum().backward()
    assert torch.equal(A1.grad, torch.zeros_like(A1)) and torch.equal(B1.grad, torch.zeros_like(B1))

    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(18, 14), rank=3, alpha=2.0, dropout=0.5).to(DEVICE)
    with torch.no_grad():
        layer.linear.weight.copy_(W), layer.linear.bias.copy_(b), layer.lora.A.copy_(A), layer.lora.B.copy_(B)
    assert torch.equal(layer.eval()(x), plain)
    assert not torch.equal(layer.train()(x), plain)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            lora_kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout"):
        lora_kernels.LinearWithLoRA(torch.nn.Linear(4, 4), rank=1, alpha=1.0, dropout=2.0)


def test_dropout_saves_no_mask(backend):
    """Only x, W, A, B, S and the seed are saved: nothing M×K for the mask."""
    x, W, b, A, B = make_inputs((64,), 40, 30, 5, torch.float32)
    A.requires_grad_(), B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.2)
    sizes = sorted(t.numel() for t in saved)
    assert sizes == sorted([x.numel(), W.numel(), A.numel(), B.numel(), 64 * 5, 1]), sizes
    assert all(t.dtype != torch.bool for t in saved)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_merge_unmerge(backend, dtype_name):
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(48, 40), rank=4, alpha=1.5).to(DEVICE, dtype)
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(9, 48, device=DEVICE, dtype=dtype)
    W0 = layer.linear.weight.detach().clone()
    y = layer(x)
    calls = []
    layer.linear.register_forward_hook(lambda *a: calls.append(1))
    layer.unmerge()  # not merged: nothing to take out
    assert torch.equal(layer.linear.weight, W0)
    layer.merge()
    assert layer.merged and not torch.equal(layer.linear.weight, W0)
    W_merged = layer.linear.weight.detach().clone()
    layer.merge()  # merged already: nothing more to fold in
    assert torch.equal(layer.linear.weight, W_merged)
    y_merged = layer(x)
    assert calls == [1]  # the merged forward is the base layer alone
    assert rel_err(y_merged, y) < 2 * TOL[dtype]
    delta = layer._delta()
    layer.unmerge()
    assert not layer.merged
    # Rounding W0 + delta to the weight's dtype loses bits in proportion to the merged weight's
    # size, and subtracting cannot get them back: bound the error by that size.
    err = (layer.linear.weight.double() - W0.double()).norm()
    assert err < TOL[dtype] * (W0.double().norm() + delta.double().norm())
    assert rel_err(layer(x), y) < 2 * TOL[dtype]


def test_merged_state_dict_is_unmerged():
    """Saving a merged layer and loading it into a fresh one must not apply the update twice."""
    torch.manual_seed(1)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(20, 12), rank=3, alpha=2.0)
    torch.nn.init.normal_(layer.lora.B)
    x = torch.randn(5, 20)
    y = layer(x)
    layer.merge()
    fresh = lora_kernels.LinearWithLoRA(torch.nn.Linear(20, 12), rank=3, alpha=2.0)
    fresh.load_state_dict(layer.state_dict())
    assert not fresh.merged and rel_err(fresh(x), y) < TOL[torch.float32]
    assert layer.merged and rel_err(layer(x), y) < TOL[torch.float32]  # saving changed nothing


def test_backward_keeps_the_forwards_backend(monkeypatch):
    """The two backends draw different dropout masks from one seed: a backend switch between
    forward and backward must not mix them."""
    use_triton(monkeypatch)
    x, W, b, A, B = make_inputs((30,), 24, 18, 4, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(3)
    y = lora_kernels.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 1.0, dropout_p=0.5)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = functional.keep_mask(30, 24, seed_of_next_call(3, "triton"), 0.5, DEVICE, "triton")
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    y_ref = torch.nn.functional.linear(x64, W.double(), b.double()) + (x64 * keep / 0.5) @ A64 @ B64
    y_ref.backward(dy.double())
    for got, ref in zip([t.grad for t in leaves], [x64.grad, A64.grad, B64.grad]):
        assert rel_err(got, ref) < TOL[torch.float32]


def test_autocast_leaves_fp64_alone():
    x, W, b, A, B = make_inputs((4,), 8, 6, 2, torch.float64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert lora_kernels.lora_linear(x, W, b, A, B, 1.0).dtype == torch.float64


def test_merge_refuses_non_finite():
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(8, 8), rank=2, alpha=1.0).half()
    with torch.no_grad():
        layer.lora.A.fill_(300.0), layer.lora.B.fill_(300.0)  # 2 · 300² = 180000 > fp16 max
    W0 = layer.linear.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.linear.weight, W0)


def test_merge_rounds_the_sum_once_in_fp16():
    """An fp16 weight and an update that alone passes fp16's 65504 where their sum fits: merged as
    the sum in fp32 rounded once (the update rounded to fp16 first would be inf, the merge refused)."""
    torch.manual_seed(4)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(16, 12), rank=3, alpha=2.0).half()
    with torch.no_grad():
        layer.lora.A.normal_(std=3.0), layer.lora.B.normal_(std=3000.0)
        delta = 2.0 * (layer.lora.A.float() @ layer.lora.B.float()).t()
        layer.linear.weight.copy_(-delta.clamp(-60000, 60000) + torch.randn_like(delta))
        W = layer.linear.weight.clone()
    want = W.double() + 2.0 * (layer.lora.A.double() @ layer.lora.B.double()).t()
    assert delta.abs().max() > 65504 > want.abs().max()  # the premise
    layer.merge()
    assert layer.merged and rel_err(layer.linear.weight, want) < TOL[torch.float16]


def test_backward_inside_autocast_keeps_fp32_adapters_gradients(backend):
    """A backward run inside the autocast block (as many training loops do): the layer's backward
    chooses its own precision there too, so the fp32 adapters' gradients, here past fp16's range,
    are summed and written in fp32 (autocast's fp16 matmuls would make inf of them)."""
    g = torch.Generator().manual_seed(6)
    M, K, N, r = 4096, 8, 8, 2
    x, W, A, B = (4 + torch.rand(M, K, generator=g), torch.rand(N, K, generator=g) / K, 1 + torch.rand(K, r, generator=g),
                  1 + torch.rand(r, N, generator=g))
    dy = 1 + torch.rand(M, N, generator=g)
    x, W, A, B, dy = (t.to(DEVICE) for t in (x, W, A, B, dy))
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = lora_kernels.lora_linear(x, W, None, A_, B_, 0.5)
        y.backward(dy.half())
    _, grads = reference(x.half(), W.half(), None, A, B, 0.5, dy.half())
    assert grads[3].abs().max() > 65504 and grads[4].abs().max() > 65504  # the premise
    assert A_.grad.dtype == B_.grad.dtype == torch.float32
    assert rel_err(A_.grad, grads[3]) < TOL[torch.float16] and rel_err(B_.grad, grads[4]) < TOL[torch.float16]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_autocast(backend, dtype_name):
    """Under autocast the layer computes in the autocast dtype, as F.linear would."""
    dtype = getattr(torch, dtype_name)
    if backend == "triton" and dtype == torch.bfloat16 and not bf16_through_kernels():
        pytest.skip("bf16 through the kernels needs a GPU (the interpreter computes bf16 wrong)")
    x, W, b, A, B = make_inputs((2, 21), 30, 26, 4, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with torch.autocast(DEVICE, dtype=dtype):
        y = lora_kernels.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5)
        base = torch.nn.functional.linear(x, W, b)
    assert y.dtype == base.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    assert leaves[0].grad.dtype == leaves[1].grad.dtype == leaves[2].grad.dtype == torch.float32
    y_ref, g = reference(x.to(dtype), W.to(dtype), b.to(dtype), A, B, 0.5, dy)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(leaves[0].grad, g[0]) < TOL[dtype]
    assert rel_err(leaves[1].grad, g[3]) < TOL[dtype]
    assert rel_err(leaves[2].grad, g[4]) < TOL[dtype]
