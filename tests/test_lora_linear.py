"""Outputs and every gradient of ``lora_linear`` against the float64 oracle, on both backends."""

import warnings

import pytest
import torch

import lora_kernels
from conftest import (DEVICE, TOL, bf16_through_kernels, make_inputs, record, reference, rel_err, seed_of_next_call,
                      use_triton)
from lora_kernels import functional, kernels

# Odd sizes that span several 32-wide interpreter tiles; (lead dims, K, N, rank).
SHAPES = [
    ((37,), 70, 50, 5),
    ((2, 19), 33, 65, 1),
    ((3, 2, 7), 48, 17, 3),
    ((130,), 40, 96, 100),   # rank over one 64-wide rank block
    ((9,), 20, 24, 256),     # rank far above in/out features
    ((300,), 24, 40, 8),     # long token reduction: dA and dB take the split path
]


def dtypes_for(backend):
    # bf16 is tested on the PyTorch path here; Triton's interpreter computes it wrong
    # and the GPU check runs it through the kernels.
    out = [torch.float32, torch.float16, torch.float64]
    return out + [torch.bfloat16] if backend == "torch" or bf16_through_kernels() else out


def run(x, W, b, A, B, alpha, train_base=False):
    # New leaves that share the inputs' storage and strides (a clone of a strided view would be
    # contiguous, and the layouts are what some tests are about).
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    W = W.detach().requires_grad_(train_base)
    b = b.detach().requires_grad_(train_base) if b is not None else None
    y = lora_kernels.lora_linear(x, W, b, A, B, alpha)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y, dy, x, W, b, A, B


def check_all(inputs, alpha, dtype, train_base=False):
    y, dy, x, W, b, A, B = run(*inputs, alpha, train_base=train_base)
    y_ref, grads = reference(x, W, b, A, B, alpha, dy)
    tol = TOL[dtype]
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, grads[0]),
            "dA": rel_err(A.grad, grads[3]), "dB": rel_err(B.grad, grads[4])}
    assert y.dtype == x.dtype  # (the gradients' dtypes: test_backward_returns_each_gradient_in_its_parameters_dtype)
    if train_base:
        errs["dW"] = rel_err(W.grad, grads[1])
        if b is not None:
            errs["db"] = rel_err(b.grad, grads[2])
    else:
        assert W.grad is None
    record(dtype, errs)
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol:g}: {bad}"
    return errs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
def test_matches_reference_fp32(backend, shape):
    lead, K, N, r = shape
    check_all(make_inputs(lead, K, N, r, torch.float32), 0.75, torch.float32)


FUSED_SHAPES = SHAPES + [((45,), 70, 50, 16), ((33,), 40, 72, 64)]  # ranks 16 and 64 fill BLOCK_R


@pytest.mark.triton
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("fuse", ["1", "0", "ahead"], ids=["fused", "separate", "ahead"])
def test_shrink_placements(shape, dtype_name, fuse, monkeypatch):
    """The shrink inside the big product's K loop (functional.FUSE_SHRINK = "1"), in a pass of its
    own ("0") and in the big product's launch ahead of each row block's tiles ("ahead"): same
    numbers; ranks above kernels.FUSE_MAX_RANK take the separate shrink every way."""
    use_triton(monkeypatch)
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    lead, K, N, r = shape
    dtype = getattr(torch, dtype_name)
    check_all(make_inputs(lead, K, N, r, dtype), 0.75, dtype, train_base=True)


@pytest.mark.triton
@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("fuse", ["1", "0", "ahead"], ids=["fused", "separate", "ahead"])
def test_an_inf_spreads_as_in_the_reference(fuse, where, monkeypatch):
    """An inf in x (or in dY) at a rank below its block (rank 3 in a BLOCK_R of 16): every output and
    gradient holds inf and NaN where float64's do, in every shrink placement. A shrink computed in
    the big product's launch padded its ranks with inf · 0 = NaN, and their product with R's
    zero padding turned the whole row NaN where the reference has infs."""
    use_triton(monkeypatch)
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    x, W, b, A, B = make_inputs((7,), 16, 20, 3, torch.float32, seed=11)
    dy = torch.randn((7, 20), generator=torch.Generator().manual_seed(12)).to(x.device)
    (x if where == "x" else dy)[2, 5] = -float("inf")
    leaves = [t.detach().requires_grad_() for t in (x, A, B)]
    y = lora_kernels.lora_linear(leaves[0], W, b, *leaves[1:], 0.5)
    y.backward(dy)
    y_ref, grads = reference(x, W, b, A, B, 0.5, dy)
    for name, out, ref in [("y", y, y_ref), ("dx", leaves[0].grad, grads[0]), ("dA", leaves[1].grad, grads[3]),
                           ("dB", leaves[2].grad, grads[4])]:
        assert all(torch.equal(f(out), f(ref)) for f in (torch.isnan, torch.isposinf, torch.isneginf)), name
        assert ref.isinf().any() or (name, where) in {("y", "dy"), ("dx", "x")}, name  # (the case in question)
        finite = ref.isfinite()
        assert rel_err(out[finite], ref[finite]) <= TOL[torch.float32], name


def test_fuse_shrink_rule(monkeypatch):
    """The shrink fuses into small products (the launch it saves matters more there), not into
    large ones, not under LoRA dropout on x (the mask would be drawn once per column block), and
    not past FUSE_MAX_RANK; FUSE_SHRINK = "1" / "0" / "ahead" (LORA_KERNELS_FUSE_SHRINK) force each
    placement within the rank limit, "ahead" under either dropout too (its mask drawn once)."""
    from lora_kernels.functional import FUSE_MAX_MNK, fuse_shrink
    monkeypatch.setattr(functional, "FUSE_SHRINK", "auto")
    big = torch.empty(1, 1).expand(8192, 4096), torch.empty(1, 1).expand(4096, 4096)  # M·N·K = 2^37, no storage
    small = torch.empty(1, 1).expand(8192, 4096), torch.empty(1, 1).expand(4096, 1024)  # 2^35
    assert 8192 * 4096 * 1024 < FUSE_MAX_MNK <= 8192 * 4096 * 4096
    r16, r65 = torch.empty(1, 1).expand(4096, 16), torch.empty(1, 1).expand(4096, 65)
    assert fuse_shrink(*small, r16, None) == "loop" and fuse_shrink(*big, r16, None) is None
    assert fuse_shrink(*small, r16, ("lowrank", 0, 0.1, 1, 1))  # the backward's mask is drawn once anyway
    assert not fuse_shrink(*small, r16, ("x", 0, 0.1, 1, 1))
    assert not fuse_shrink(*small, r65, None)
    monkeypatch.setattr(functional, "FUSE_SHRINK", "1")
    assert fuse_shrink(*big, r16, ("x", 0, 0.1, 1, 1)) == "loop" and fuse_shrink(*small, r65, None) is None
    monkeypatch.setattr(functional, "FUSE_SHRINK", "ahead")
    assert all(fuse_shrink(*shape, r16, drop) == "ahead" for shape in (small, big)
               for drop in (None, ("x", 0, 0.1, 1, 1), ("lowrank", 0, 0.1, 1, 1)))
    assert fuse_shrink(*small, r65, None) is None
    monkeypatch.setattr(functional, "FUSE_SHRINK", "0")
    assert fuse_shrink(*small, r16, None) is None
    # the limits themselves: rank FUSE_MAX_RANK still fuses, FUSE_MAX_MNK multiply-adds do not
    monkeypatch.setattr(functional, "FUSE_SHRINK", "auto")
    at, below = torch.empty(1, 1).expand(4096, 2048), torch.empty(1, 1).expand(4096, 2047)
    assert 8192 * 4096 * 2048 == FUSE_MAX_MNK
    r_max = torch.empty(1, 1).expand(4096, kernels.FUSE_MAX_RANK)
    assert fuse_shrink(big[0], below, r_max, None) == "loop" and fuse_shrink(big[0], at, r_max, None) is None


class LaunchSpy:
    """Stands in for the kernel and records what each launch was told about TMA (``allow_tma``:
    the launches of one product; a paired launch never uses TMA; ``allow_store``: every launch's
    ALLOW_TMA_STORE), and whether it split its reduction."""

    def __init__(self, kernel):
        self.kernel, self.allow_tma, self.paired, self.splits, self.allow_store = kernel, [], 0, [], []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            if kwargs["PAIRED"]:
                self.paired += 1
                assert not kwargs["ALLOW_TMA"]
            else:
                self.allow_tma.append(kwargs["ALLOW_TMA"])
            self.splits.append(named["K_PER_SPLIT"] < named["K"])
            self.allow_store.append(kwargs["ALLOW_TMA_STORE"])
            return launch(*args, **kwargs)
        return run


@pytest.mark.triton
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_tma_and_pointer_loads(tma, dtype_name, monkeypatch):
    """Operands whose rows are whole 16 bytes go through TMA descriptors (every product here but
    the paired dA and dB, transposed views included), or all through pointer loads with
    LORA_KERNELS_TMA=0: both give the reference's numbers, split reductions and dW included."""
    use_triton(monkeypatch)
    monkeypatch.setattr(kernels, "TMA", tma)
    monkeypatch.setattr(functional, "FUSE_SHRINK", "0")  # S and y, dS and dX in launches of their own
    spy = LaunchSpy(kernels._lora_matmul_kernel)
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", spy)
    # Every launch through the spy: on a GPU a kernel already compiled is otherwise launched directly.
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    dtype = getattr(torch, dtype_name)
    # (48 out-features: partial N tiles, and few enough tiles that dA with dB and dW split)
    check_all(make_inputs((300,), 64, 48, 16, dtype), 0.75, dtype, train_base=True)
    assert len(spy.allow_tma) == 5 and spy.paired == 1  # S, y, dS, dX, dW; dA with dB
    assert any(spy.splits)
    assert set(spy.allow_tma) == {tma and kernels._tma_available(torch.device(DEVICE))}


def tma_stores(monkeypatch):
    """Under the interpreter, a list that receives each TMA store's tile offsets (row, column) as
    it is made; None on a GPU, whose compiled stores Python does not see."""
    if not kernels.INTERPRET:
        return None
    from triton.runtime import interpreter
    stores, store = [], interpreter.InterpreterBuilder.create_descriptor_store

    def recorded(builder, desc, value, indices):
        stores.append(tuple(int(i.data.reshape(-1)[0]) for i in indices))  # (one program's: one offset each)
        return store(builder, desc, value, indices)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_store", recorded)
    return stores


@pytest.mark.triton
@pytest.mark.parametrize("out_features", [48, 45])
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16"])
def test_tma_store_of_every_output_tile(dtype_name, out_features, monkeypatch):
    """A config with TMA_STORE (the persistent candidates', ``kernels.hopper_configs``) writes each output
    tile through a descriptor where the launch allows it (S, y, dS, dX: rows of whole 16 bytes, one
    product, no split), in a persistent grid of small tiles: row and column blocks at offsets, the
    last of each cut by the output's edge (300 tokens, 48 out-features, 32 × 32 tiles), which the
    copy must clip. Rows of 45 elements are no whole 16 bytes, so y keeps pointer stores, as do
    the paired dA with dB and dW's split reduction."""
    use_triton(monkeypatch)
    monkeypatch.setattr(functional, "FUSE_SHRINK", "0")
    stores = tma_stores(monkeypatch)
    tuner = kernels._lora_matmul_kernel
    config = kernels._config(32, 32, 32, 4, 2, tma=True, persistent=True, store=True)
    monkeypatch.setattr(tuner, "configs", [config])  # (a lone config runs as it is, unpruned)
    spy = LaunchSpy(tuner)
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", spy)
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)  # (a compiled kernel is looked up by launch, not config)
    dtype = getattr(torch, dtype_name)
    check_all(make_inputs((300,), 64, out_features, 16, dtype), 0.75, dtype, train_base=True)
    y_stored = out_features == 48
    assert spy.allow_store == [True, y_stored, True, True, False, False]  # S, y, dS, dX; dW, dA with dB
    assert spy.splits == [False] * 4 + [True] * 2 and spy.paired == 1
    if stores is not None:  # S and dS 10 row blocks of one column block, dX 10 × 2, y 10 × 2 if stored
        assert len(stores) == 10 + 10 + 20 + 20 * y_stored and (288, 32) in stores


def test_no_tma_descriptor_for_sizes_past_int32():
    """The kernel states a descriptor's sizes as int32: an operand with 2^31 rows or more (as a
    stand-in: no such tensor fits here) is read through pointers, not a descriptor that would see
    it cut short."""
    def operand(rows, cols):  # (shape, strides, dtype, address) as lora_matmul describes an operand
        return (rows, cols), (cols, 1), torch.bfloat16, 1 << 20
    assert kernels._tma_ok(*operand(2 ** 31 - 1, 16)) and kernels._tma_ok(*operand(16, 2 ** 31 - 8))
    assert not kernels._tma_ok(*operand(2 ** 31, 16)) and not kernels._tma_ok(*operand(16, 2 ** 31))


def test_prune_keeps_a_tma_store_only_where_its_staged_tile_costs_no_stage():
    """The pruner counts a TMA store's staged output tile in shared memory, beside the pipeline's
    stages, and keeps the store only where the config's stages leave room for it (at 8192×4096,
    rank 16: in bf16 each persistent candidate's, 128×256 in three stages 144 + 64 KiB; not a
    four-stage 128×256's, 192 KiB, which keeps its stages and stores by pointers; in fp32 none:
    each candidate as without the store, no stage lost); a launch that allows no store gets each
    config as its twin without."""
    import triton.language as tl

    def kept(allow, configs, dtype=torch.bfloat16):
        named = {"M": 8192, "N": 4096, "R": 16, **dict.fromkeys(("x_ptr", "w_ptr", "l_ptr", "r_ptr", "out_ptr"), dtype)}
        return [kernels.tile_name(c.all_kwargs()) for c in kernels._prune(
            configs, named, DOT_DTYPE=tl.bfloat16, ALLOW_TMA=True, ALLOW_TMA_STORE=allow, BLOCK_R=16, HAS_LOWRANK=True)]

    candidates = kernels.hopper_configs()
    stored = [c for c in candidates if c.kwargs["TMA_STORE"]]
    assert len(stored) == 4 and all(c.kwargs["PERSISTENT"] for c in stored)
    names = [kernels.tile_name(c.all_kwargs()) for c in stored]
    assert kept(True, stored) == names and names[0] == "128x256x64 w8 s3 tma persistent tma-store"
    assert kept(False, stored) == [name.removesuffix(" tma-store") for name in names]
    assert kept(True, [kernels._config(128, 256, 64, 8, 4, tma=True, persistent=True, store=True)]) == [
        "128x256x64 w8 s4 tma persistent"]
    assert kept(True, stored, torch.float32) == kept(False, stored, torch.float32) == [
        "128x256x64 w8 s2 tma persistent", "256x128x64 w8 s2 tma persistent", "128x128x64 w8 s3 tma persistent",
        "128x128x64 w4 s3 tma persistent"]
    assert all(name.endswith(" tma-store") == (name in names) for name in kept(True, candidates))


@pytest.mark.parametrize("rank", [1, 3, 8, 16, 64, 100, 256])
def test_ranks(backend, rank):
    check_all(make_inputs((29,), 34, 45, rank, torch.float32, seed=rank), 0.5, torch.float32)


@pytest.mark.parametrize("dtype_name", ["float16", "float64", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[5:], ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
def test_dtypes(backend, dtype_name, bias, shape):
    """Every gradient, dW and db included, in each dtype; the 300-token shape takes the split
    reductions (dA, dB, dW), whose partial sums fp64 must keep in fp64."""
    dtype = getattr(torch, dtype_name)
    if dtype not in dtypes_for(backend):
        pytest.skip("bf16 through the kernels needs a GPU (the interpreter computes bf16 wrong)")
    lead, K, N, r = shape
    check_all(make_inputs(lead, K, N, r, dtype, bias=bias), 1.5, dtype, train_base=True)


@pytest.mark.parametrize("adapter_name", ["float32", "float16"])
def test_backward_computes_exactly_the_gradients_asked_for_in_their_dtypes(backend, adapter_name):
    """Each subset of the gradients asked for takes its own branch of the backward: those asked for
    come back as float64 has them (a negative alpha: its sign in every branch), in their
    parameters' dtypes, read from the backward's own outputs (autograd would cast a wrong dtype
    back to the parameter's, so A.grad's cannot tell): dx, dW, db the base's, dA and dB the
    adapters'; the others come back None (nothing computed for a frozen weight)."""
    adapter = getattr(torch, adapter_name)
    x, W, b, A, B = make_inputs((21,), 18, 14, 3, torch.float16, adapter_dtype=adapter)
    y, S = functional._forward_impl(x, W, b, A, B, -1.5, 0.0, None, backend)
    dy = torch.randn_like(y)
    _, want = reference(x, W, b, A, B, -1.5, dy)
    alone = [[i == j for j in range(5)] for i in range(5)]
    for needs in [[True] * 5, [False, True, True, True, False]] + alone:
        grads = functional._backward_impl(dy, x, W, A, B, S, -1.5, 0.0, None, needs, backend)
        assert [g is not None for g in grads] == needs
        for g, w, t, need in zip(grads, want, (x, W, b, A, B), needs):
            if need:
                assert g.dtype == t.dtype and rel_err(g, w) <= TOL[torch.float16], needs


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fp32_adapters_beside_half_base(backend, dtype_name):
    """peft's default: fp32 A and B beside a 16-bit base; grads come back in fp32."""
    dtype = getattr(torch, dtype_name)
    if dtype not in dtypes_for(backend):
        pytest.skip("bf16 through the kernels needs a GPU")
    check_all(make_inputs((41,), 36, 52, 7, dtype, adapter_dtype=torch.float32), 2.0, dtype)


@pytest.mark.parametrize("alpha", [32.0, -0.125], ids=["large-alpha", "small-alpha"])
@pytest.mark.parametrize("adapter_name", ["float32", "float16"])
def test_alpha_and_loss_scale_do_not_overflow_fp16_ds(backend, alpha, adapter_name):
    """fp16 base and a loss-scaled dY. A large alpha makes alpha · dY Bᵀ (the reference's dS) pass
    65504; a small one (peft's lora_alpha / r) leaves it in range where dY Bᵀ passes 65504. Either
    way dX, dA and dB fit in their dtypes: dS is kept as the smaller of the two
    (functional._dS_scale; a negative alpha's sign on the readers), so all three come back finite
    and as float64 has them, on both backends, with peft's fp32 adapters or fp16 ones."""
    adapter = getattr(torch, adapter_name)
    x, W, b, A, B = make_inputs((32,), 64, 96, 4, torch.float16, adapter_dtype=adapter, seed=7)
    x, A, B = (x * 0.005).requires_grad_(), (A * 0.1).requires_grad_(), (B * (0.6 if alpha > 1 else 6)).requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, alpha)
    dy = (2000 * torch.randn(y.shape, generator=torch.Generator().manual_seed(8))).to(y.device, y.dtype)
    y.backward(dy)
    _, grads = reference(x, W, b, A, B, alpha, dy)
    dS = dy.double() @ B.detach().double().t()
    assert max(alpha * dS.abs().max(), dS.abs().max()) > 65504  # (the case in question)
    assert min(alpha * dS.abs().max(), dS.abs().max()) < 65504 / 2
    assert all(g.abs().max() < torch.finfo(t.dtype).max / 2 for g, t in [(grads[0], x), (grads[3], A), (grads[4], B)])
    errs = {"dx": rel_err(x.grad, grads[0]), "dA": rel_err(A.grad, grads[3]), "dB": rel_err(B.grad, grads[4])}
    assert all(e <= TOL[torch.float16] for e in errs.values()), errs


@pytest.mark.parametrize("alpha", [2.0 ** -8, -2.0 ** -8, 2.0], ids=["floor", "negative-floor", "above-one"])
def test_ds_scale_is_alpha_held_to_its_range_exactly(backend, alpha):
    """dS = c · dY Bᵀ with c = |alpha| held to [2^-8, 1] (functional._dS_scale), at the range's
    ends: c · dY Bᵀ sits at 0.5-0.9 × fp16's 65504 here, so a c any larger (a floor above 2^-8, a
    ceiling above 1) would overflow the fp16 dS to inf, where the reference's gradients fit."""
    c = min(max(abs(alpha), 2.0 ** -8), 1.0)
    x, W, b, A, B = make_inputs((32,), 64, 96, 4, torch.float16, seed=7)
    g = torch.Generator().manual_seed(8)
    B = (60 + torch.randn(B.shape, generator=g)).to(B.device, B.dtype)  # one sign: dY Bᵀ grows with N
    dy = ((45000 / (c * 60 * 96)) * (1 + 0.05 * torch.randn(32, 96, generator=g))).to(x.device, x.dtype)
    x, A, B = (x * 0.005).requires_grad_(), (A * 0.1).requires_grad_(), B.requires_grad_()
    lora_kernels.lora_linear(x, W, b, A, B, alpha).backward(dy)
    _, grads = reference(x, W, b, A, B, alpha, dy)
    dS = c * (dy.double() @ B.detach().double().t()).abs().max()
    assert 65504 / 2 < dS < 0.9 * 65504  # (the case in question)
    assert all(g.abs().max() < 65504 / 2 for g in (grads[0], grads[3], grads[4]))
    errs = {"dx": rel_err(x.grad, grads[0]), "dA": rel_err(A.grad, grads[3]), "dB": rel_err(B.grad, grads[4])}
    assert all(e <= TOL[torch.float16] for e in errs.values()), errs


def test_dropout_keeps_its_rescale_out_of_fp16_ds(backend):
    """LoRA dropout's 1/(1-p) scales dX's low-rank term and dA, never dS (the reference's dS has
    none): at p = 0.9 (q = 10) dY Bᵀ fits fp16 where q · dY Bᵀ would not, and every gradient comes
    back as float64 has it."""
    p = 0.9
    x, W, b, A, B = make_inputs((32,), 64, 96, 4, torch.float16, seed=13)
    x, A, B = (x * 0.05).requires_grad_(), (A * 0.1).requires_grad_(), (B * 0.6).requires_grad_()
    torch.manual_seed(14)
    y = lora_kernels.lora_linear(x, W, b, A, B, 1.0, dropout_p=p)
    dy = (2000 * torch.randn(y.shape, generator=torch.Generator().manual_seed(15))).to(y.device, y.dtype)
    y.backward(dy)
    keep = functional.keep_mask(32, 64, seed_of_next_call(14, backend), p, DEVICE, backend)
    x64, W64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, b, A, B))
    (torch.nn.functional.linear(x64, W64, b64) + ((x64 * keep / (1 - p)) @ A64 @ B64)).backward(dy.double())
    dS = (dy.double() @ B64.detach().t()).abs().max()
    assert 65504 / 2 > dS > 65504 * (1 - p)  # (the case in question)
    errs = {"dx": rel_err(x.grad, x64.grad), "dA": rel_err(A.grad, A64.grad), "dB": rel_err(B.grad, B64.grad)}
    assert all(e <= TOL[torch.float16] for e in errs.values()), errs


def test_fp16_adapter_grads_scaled_before_their_rounding(backend):
    """fp16 adapters and an alpha below 1: dB = alpha · Sᵀ dY fits in fp16 where Sᵀ dY does not.
    alpha applies to the fp32 sum before its rounding on both backends (the PyTorch path's mm then
    mul_ returned inf), as in the reference's order (alpha · dY first)."""
    g = torch.Generator().manual_seed(3)
    x, W, b, A, B = make_inputs((64,), 8, 8, 2, torch.float16, seed=3)
    x = (30 + torch.rand(x.shape, generator=g).to(x.device, x.dtype)).requires_grad_()
    A = (0.1 + 0.01 * torch.rand(A.shape, generator=g)).to(A.device, A.dtype).requires_grad_()
    B = (0.1 + 0.01 * torch.rand(B.shape, generator=g)).to(B.device, B.dtype).requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, 0.5)
    dy = (60 + torch.rand(y.shape, generator=g)).to(y.device, y.dtype)
    y.backward(dy)
    _, grads = reference(x, W, b, A, B, 0.5, dy)
    assert 65504 < 2 * grads[4].abs().max() and grads[4].abs().max() < 60000  # (the case in question)
    errs = {"dx": rel_err(x.grad, grads[0]), "dA": rel_err(A.grad, grads[3]), "dB": rel_err(B.grad, grads[4])}
    assert all(e <= TOL[torch.float16] for e in errs.values()), errs


def test_fp32_adapter_grads_past_fp16_range(backend):
    """fp32 adapters beside an fp16 base, with a loss-scaled gradient (GradScaler's): dA and dB sum
    over 2048 tokens past fp16's 65504. They come back finite, as float64 has them (products
    accumulated and written in fp32), on both backends."""
    x, W, b, A, B = make_inputs((2048,), 16, 24, 4, torch.float16, adapter_dtype=torch.float32, seed=5)
    x = (x.abs() + 0.5).requires_grad_()  # same-signed tokens: the sums over them grow with the token count
    A, B = A.requires_grad_(), B.requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, 1.5)
    dy = (64 + torch.randn(y.shape, generator=torch.Generator().manual_seed(6))).to(y.device, y.dtype)
    y.backward(dy)
    y_ref, grads = reference(x, W, b, A, B, 1.5, dy)
    assert min(grads[3].abs().max(), grads[4].abs().max()) > 65504  # (the case in question)
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, grads[0]), "dA": rel_err(A.grad, grads[3]),
            "dB": rel_err(B.grad, grads[4])}
    assert all(e <= TOL[torch.float16] for e in errs.values()), errs


def test_trainable_base(backend):
    check_all(make_inputs((3, 23), 40, 35, 4, torch.float32), 0.5, torch.float32, train_base=True)


@pytest.mark.parametrize("p", [0.0, 0.4], ids=["", "dropout"])
@pytest.mark.parametrize("trained", [("A",), ("B",), ("x",), ("bias",), ("weight",), ("x", "bias"), ("weight", "A")],
                         ids=lambda t: "+".join(t))
def test_each_gradient_alone(backend, trained, p):
    """Any subset of the inputs may require grad (a frozen A or B, a bias trained beside a frozen
    weight): each gradient asked for matches float64, and the others stay None. Each subset takes
    its own branch of the backward, so each is checked with LoRA dropout too (the mask drawn
    again)."""
    names = ("x", "weight", "bias", "A", "B")
    inputs = [t.requires_grad_(n in trained) for n, t in zip(names, make_inputs((3, 13), 40, 35, 4, torch.float32))]
    torch.manual_seed(9)
    y = lora_kernels.lora_linear(*inputs, 0.5, dropout_p=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    x, W, b, A, B = (t.detach().double().requires_grad_() for t in inputs)
    keep = functional.keep_mask(39, 40, seed_of_next_call(9, backend), p, DEVICE, backend).reshape(x.shape) if p else 1
    (torch.nn.functional.linear(x, W, b) + 0.5 * ((x * keep / (1 - p)) @ A @ B)).backward(dy.double())
    want = [t.grad for t in (x, W, b, A, B)]
    for name, t, w in zip(names, inputs, want):
        if name in trained:
            assert rel_err(t.grad, w) < TOL[torch.float32], name
        else:
            assert t.grad is None, name


def test_half_products_accumulate_in_fp32(backend):
    """fp16 products accumulate in fp32 (the README's promise), which only a long reduction of
    same-signed terms tells apart from fp16 accumulation: here the output's own rounding (2.3e-4 to
    2.7e-4 on both paths on the CPU) is about all the error allowed, where fp16 partial sums (one
    rounding per 32-deep tile, as the interpreter computes them) gave 1.0e-3."""
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 16, 8192, 16, 4
    x = torch.rand(M, K, generator=g).half().to(DEVICE)
    W = (torch.rand(N, K, generator=g) / K).half().to(DEVICE)
    A = (torch.rand(K, r, generator=g) / K).half().to(DEVICE)
    B = torch.rand(r, N, generator=g).half().to(DEVICE)
    y = lora_kernels.lora_linear(x, W, None, A, B, 0.5)
    want, _ = reference(x, W, None, A, B, 0.5, torch.ones_like(y))
    assert rel_err(y, want) < 4e-4


def test_non_contiguous_x(backend):
    x, W, b, A, B = make_inputs((40,), 30, 26, 4, torch.float32)
    big = torch.randn(30, 40, dtype=torch.float32, device=DEVICE)
    transposed = big.t()                      # (40, 30), strides (1, 40)
    sliced = torch.randn(3, 11, 61, device=DEVICE)[:, ::2, 1:61:2]  # strided in every dim (copied by reshape)
    every_other = torch.randn(40, 60, device=DEVICE)[:, ::2]  # 2-D: reaches the kernels with strides (60, 2)
    assert not transposed.is_contiguous() and not sliced.is_contiguous() and every_other.stride() == (60, 2)
    for xv in (transposed, sliced, every_other):
        before = xv.clone()
        check_all((xv, W, b, A, B), 1.25, torch.float32)
        assert torch.equal(xv, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_transposed_weight_and_adapters(backend, dtype):
    """Weights given as transposed views: the base stored (in, out), as GPT-2's Conv1D stores it,
    and the adapters as peft's lora_A and lora_B weights, (r, in) and (out, r). Each gradient
    comes back in its parameter's layout."""
    x, W, b, A, B = make_inputs((3, 7), 48, 40, 8, dtype)
    W, A, B = (t.t().contiguous().t() for t in (W, A, B))
    assert W.stride() == (1, 40) and A.stride() == (1, 48) and B.stride() == (1, 8)
    for train_base in (False, True):
        check_all((x, W, b, A, B), 0.75, dtype, train_base=train_base)


@pytest.mark.parametrize("layout", ["strided", "expanded", "column"])
def test_non_contiguous_bias(backend, layout):
    """A bias given as a view (every other element, one value broadcast, a matrix's column) is
    added element by element as given, never read as if it were contiguous."""
    x, W, _, A, B = make_inputs((3, 13), 30, 26, 4, torch.float32)
    g = torch.Generator().manual_seed(5)
    full = torch.randn(26, 3, generator=g).to(DEVICE)
    b = {"strided": full.t().reshape(-1)[::3], "expanded": full[:1, 0].expand(26), "column": full[:, 1]}[layout]
    assert b.shape == (26,) and b.stride() != (1,)
    for train_base in (False, True):
        check_all((x, W, b, A, B), 0.75, torch.float32, train_base=train_base)


def test_zero_tokens(backend):
    x, W, b, A, B = make_inputs((0,), 20, 12, 3, torch.float32)
    y, dy, x, W, b, A, B = run(x, W, b, A, B, 1.0)
    assert y.shape == (0, 12)
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    assert x.grad.shape == (0, 20)
    x, W, b, A, B = make_inputs((2, 0, 4), 20, 12, 3, torch.float32)
    assert lora_kernels.lora_linear(x, W, b, A, B, 1.0).shape == (2, 0, 4, 12)


@pytest.mark.parametrize("K, N", [(0, 12), (20, 0)], ids=["no-in-features", "no-out-features"])
def test_zero_features(backend, K, N):
    """nn.Linear allows 0 in or out features (F.linear returns the bias, or nothing): so does the
    layer, with every gradient, the base's included, of the right shape and value (zeros where the
    sum is empty, written over the NaN-poisoned buffers)."""
    x, W, b, A, B = make_inputs((2, 5), K, N, 3, torch.float32)
    y, dy, x, W, b, A, B = run(x, W, b, A, B, 1.5, train_base=True)
    y_ref, grads = reference(x, W, b, A, B, 1.5, dy)
    assert y.shape == (2, 5, N) and torch.allclose(y, y_ref.float())
    for got, want in zip((x.grad, W.grad, b.grad, A.grad, B.grad), grads):
        assert got.shape == want.shape and torch.allclose(got, want.float(), atol=1e-6)


def test_inputs_not_modified(backend):
    inputs = make_inputs((17,), 24, 30, 4, torch.float32)
    copies = [t.clone() for t in inputs]
    run(*inputs, 3.0, train_base=True)
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))


def test_deterministic(backend):
    """Two backward passes give bitwise equal gradients (the split reduction, no atomics). (The
    interpreter runs one program at a time, so on the CPU atomics would pass this too: the compiled
    code is searched for them in test_hopper_build.py; on a GPU this test sees them.)"""
    inputs = make_inputs((300,), 24, 40, 8, torch.float32)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)  # the same dy both times
        _, _, x, W, b, A, B = run(*inputs, 1.0, train_base=True)
        grads.append([x.grad, W.grad, b.grad, A.grad, B.grad])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("loss", [torch.square, lambda y: y], ids=["dy-needs-grad", "dy-constant"])
def test_double_backward_is_refused(backend, loss):
    """The kernels have no derivative of their own: create_graph=True through the layer raises,
    rather than returning gradients that miss the second-order terms. Also where the gradient
    flowing in needs none itself (y.sum()'s, a gradient penalty's critic output), where a guard on
    it alone let the penalty's terms through W, A and B drop silently."""
    x, W, b, A, B = (t.clone().requires_grad_() for t in make_inputs((5,), 6, 7, 2, torch.float32))
    y = lora_kernels.lora_linear(x, W, b, A, B, 1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss(y).sum(), x, create_graph=True)


def test_batched_gradients(backend):
    """autograd.grad(is_grads_batched=True), which jacobian(vectorize=True) uses, runs the backward
    under vmap: the PyTorch path computes it, the kernels (one gradient at a time) refuse clearly."""
    x, W, b, A, B = make_inputs((4,), 6, 5, 2, torch.float64)
    x.requires_grad_()
    jac = torch.autograd.functional.jacobian
    want = jac(lambda x: torch.nn.functional.linear(x, W, b) + 0.5 * (x @ A @ B), x)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="batched gradients .* LORA_KERNELS_BACKEND=torch"):
            jac(lambda x: lora_kernels.lora_linear(x, W, b, A, B, 0.5), x, vectorize=True)
    else:
        assert rel_err(jac(lambda x: lora_kernels.lora_linear(x, W, b, A, B, 0.5), x, vectorize=True), want) < 1e-12
    # One gradient at a time works on both.
    assert rel_err(jac(lambda x: lora_kernels.lora_linear(x, W, b, A, B, 0.5), x), want) < 1e-12


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_func_transforms_and_forward_ad_raise(backend, grad):
    """torch.func transforms and forward-mode AD raise, as the README says, with or without grad
    mode: the forward that skips the autograd.Function under no_grad must not hand the kernels
    vmap's wrappers, nor drop (Triton) or compute (PyTorch) a tangent no backward would match."""
    x, W, b, A, B = make_inputs((3, 4), 6, 5, 2, torch.float32)
    for transform in (torch.func.vmap, torch.func.grad):  # (named: not PyTorch's advice to write setup_context)
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="lora_kernels: torch.func transforms"):
            transform(lambda x: lora_kernels.lora_linear(x, W, b, A, B, 0.5).sum())(x)
    import torch.autograd.forward_ad as fwAD
    with torch.set_grad_enabled(grad), fwAD.dual_level(), pytest.raises(NotImplementedError,
                                                                        match="lora_kernels: forward-mode AD"):
        lora_kernels.lora_linear(fwAD.make_dual(x, torch.ones_like(x)), W, b, A, B, 0.5)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_records_the_op_and_saves(backend, grad, tmp_path):
    """torch.jit.trace, with grad mode on or off (it usually runs under no_grad), records the layer
    as one call of its custom op: not the PyTorch path's ops with the traced batch size fixed in
    them, nor a Python autograd.Function, which torch.jit.save cannot export. The op's body runs
    untraced (the tracer would hand the Triton launcher its sizes as tensors). Saved and loaded
    again, the module computes the layer and its gradients at another batch shape."""
    x, W, b, A, B = make_inputs((3, 4), 6, 5, 2, torch.float64)
    layer = lora_kernels.LinearWithLoRA(torch.nn.Linear(6, 5), 2, 0.5).to(DEVICE, torch.float64)
    with torch.no_grad():
        for p, t in [(layer.linear.weight, W), (layer.linear.bias, b), (layer.lora.A, A), (layer.lora.B, B)]:
            p.copy_(t)
    with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(layer, x)
    # (no TracerWarning from the input checks, whose comparisons of traced sizes are not recorded)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "lora_kernels" in w.filename]
    assert not ours, ours
    graph = str(traced.graph)
    assert "lora_kernels::lora_linear_fwd" in graph and "aten::" not in graph, graph
    torch.jit.save(traced, tmp_path / "layer.pt")
    loaded = torch.jit.load(tmp_path / "layer.pt")
    other = make_inputs((7, 2), 6, 5, 2, torch.float64, seed=1)[0].requires_grad_()
    dy = torch.randn(7, 2, 5, dtype=torch.float64, device=DEVICE)
    y = loaded(other)
    y.backward(dy)
    want, (dx, _, _, dA, dB) = reference(other, W, b, A, B, 0.5, dy)
    assert rel_err(y, want) < TOL[torch.float64]
    assert rel_err(other.grad, dx) < TOL[torch.float64]
    assert rel_err(loaded.lora.A.grad, dA) < TOL[torch.float64] and rel_err(loaded.lora.B.grad, dB) < TOL[torch.float64]


def test_no_grad_forward_skips_autograd(backend, monkeypatch):
    """Under no_grad (evaluation, generation) the forward runs without the autograd.Function, whose
    apply costs host time: the same numbers as with grad mode on, against float64 too."""
    x, W, b, A, B = (t.requires_grad_() for t in make_inputs((2, 5), 16, 24, 4, torch.float32))
    with_grad = lora_kernels.lora_linear(x, W, b, A, B, 0.75)
    monkeypatch.setattr(functional._EagerLoRALinear, "apply", None)  # a call would fail
    with torch.no_grad():
        y = lora_kernels.lora_linear(x, W, b, A, B, 0.75)
    want, _ = reference(x, W, b, A, B, 0.75, torch.ones_like(y))
    assert not y.requires_grad and y.shape == (2, 5, 24)
    assert torch.equal(y, with_grad.detach()) and rel_err(y, want) < TOL[torch.float32]


def test_inference_mode_under_enable_grad(backend):
    """Inference mode records no graph even under enable_grad: the forward alone, as the reference
    gives it, not a graph that would try to save inference tensors."""
    x, W, b, A, B = make_inputs((3,), 16, 24, 4, torch.float32)
    A.requires_grad_(), B.requires_grad_()
    with torch.inference_mode(), torch.enable_grad():
        y = lora_kernels.lora_linear(x, W, b, A, B, 0.75)
    want, _ = reference(x, W, b, A, B, 0.75, torch.ones(3, 24, device=DEVICE))
    assert not y.requires_grad and rel_err(y, want) < TOL[torch.float32]


def test_negative_views_and_lazy_zero_gradients(backend):
    """Tensors with PyTorch's negative bit (the .imag of a conj(), whose storage holds -t) as every
    input and as dY, and autograd's lazy zero tensors (no storage) as dY: the numbers of their
    values, not of their storage."""
    x, W, b, A, B = make_inputs((7,), 16, 24, 4, torch.float32)

    def neg_view(t):  # the same values, stored negated
        return torch.complex(torch.zeros_like(t), -t).conj().imag

    views = [neg_view(t) for t in (x, W, b, A, B)]
    assert all(v.is_neg() and torch.equal(v, t) for v, t in zip(views, (x, W, b, A, B)))
    check_all(views, 0.75, torch.float32)
    dy = torch.randn(7, 24, device=DEVICE)
    for t in (x, A, B):
        t.requires_grad_()
    lora_kernels.lora_linear(x, W, b, A, B, 0.75).backward(neg_view(dy))
    _, grads = reference(x, W, b, A, B, 0.75, dy)
    for got, want in zip((x.grad, A.grad, B.grad), (grads[0], grads[3], grads[4])):
        assert rel_err(got, want) < TOL[torch.float32]
    zero = torch._efficientzerotensor(7, 24, device=DEVICE)
    got = torch.autograd.grad(lora_kernels.lora_linear(x, W, b, A, B, 0.75), (x, A, B), zero)
    assert all(g.shape == t.shape and not g.isnan().any() and g.count_nonzero() == 0 for g, t in zip(got, (x, A, B)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(backend, bias):
    x, W, b, A, B = make_inputs((2, 3), 5, 4, 2, torch.float64, bias=bias)
    args = [x.requires_grad_(), W.requires_grad_(), b.requires_grad_() if bias else None,
            A.requires_grad_(), B.requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: lora_kernels.lora_linear(*a, 0.75), args, fast_mode=True)


@pytest.mark.triton
@pytest.mark.parametrize("M,N,K,terms,split", [(50, 37, 70, "lowrank+bias", False), (23, 6, 300, "", True),
                                               (23, 6, 300, "bias", False)])  # (the split would add it per split)
def test_kernel_launcher(M, N, K, terms, split, monkeypatch):
    """``lora_matmul`` alone, on transposed operands, with and without the split reduction, which
    a product with a bias (a direct caller's: the layer's never have one) does not take."""
    shapes = use_triton(monkeypatch)
    x = torch.randn(K, M, device=DEVICE).t()          # column-major X
    w = torch.randn(N, K, device=DEVICE).t()          # column-major W
    L, R = torch.randn(M, 9, device=DEVICE), torch.randn(N, 9, device=DEVICE).t()
    bias = torch.randn(N, device=DEVICE)
    lowrank, b = ((L, R) if "lowrank" in terms else None), (bias if "bias" in terms else None)
    out = kernels.lora_matmul(x, w, scale=0.5, lowrank=lowrank, bias=b,
                              out_dtype=torch.float32, dot_dtype=torch.float32)
    ref = 0.5 * x.double() @ w.double()
    if lowrank:
        ref = ref + L.double() @ R.double()
    if b is not None:
        ref = ref + bias.double()
    assert rel_err(out, ref) < TOL[torch.float32]
    assert any(len(s) == 3 for s in shapes) == split  # a (split, M, N) partial buffer was used


def _inside_nan(t, pad=64):
    # t as a view into a NaN-filled buffer `pad` rows (and columns) larger: a load past any of its
    # edges that a mask should have stopped reads NaN, not whatever memory happens to follow it
    buf = torch.full(tuple(n + pad for n in t.shape), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(0, n) for n in t.shape)]
    view.copy_(t)
    return view


@pytest.mark.triton
@pytest.mark.parametrize("low", ["L-given", "fused-shrink", "shrink-ahead", "split"])
def test_no_load_past_an_operands_edges(low, monkeypatch):
    """Every operand (x, w, L or A, R, the bias) a view into a NaN-filled buffer, at sizes ragged
    against every tile: the output is finite and right only if every load is masked at every edge
    (x's columns, w's rows past K, L's and A's ranks, R's rows past the rank, the bias past N; with
    the split reduction, its last split's end at K)."""
    shapes = use_triton(monkeypatch)
    g = torch.Generator().manual_seed(4)
    if low == "split":  # (dA's and dB's shape: few output tiles, many tokens, split in ragged chunks)
        x, w = (_inside_nan(torch.randn(*s, generator=g).to(DEVICE)) for s in ((23, 300), (300, 6)))
        out = kernels.lora_matmul(x, w, out_dtype=torch.float32, dot_dtype=torch.float32)
        assert any(len(s) == 3 for s in shapes)  # (the split path: a (split, M, N) partial buffer)
        assert rel_err(out, x.double() @ w.double()) < TOL[torch.float32]
        return
    M, K, N, r = 37, 20, 45, 5
    x, w, L, A, R, b = (_inside_nan(torch.randn(*s, generator=g).to(DEVICE))
                        for s in ((M, K), (K, N), (M, r), (K, r), (r, N), (N,)))
    f32 = dict(bias=b, r_scale=1.5, out_dtype=torch.float32, dot_dtype=torch.float32)
    if low == "L-given":
        y, L_ref = kernels.lora_matmul(x, w, lowrank=(L, R), **f32), L.double()
    else:
        shrink = kernels.Shrink(A, 0.5, torch.float32, ahead=low == "shrink-ahead")
        y, S = kernels.lora_matmul(x, w, lowrank=(shrink, R), **f32)
        L_ref = 0.5 * x.double() @ A.double()
        assert rel_err(S, L_ref) < TOL[torch.float32]
    ref = x.double() @ w.double() + 1.5 * L_ref @ R.double() + b.double()
    assert rel_err(y, ref) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("r_scale", [0.1, 1e5])
def test_r_scale_multiplies_16_bit_r_in_the_accumulators_dtype(r_scale, monkeypatch):
    """fp16 adapters beside an fp32 base: alpha multiplies R's tiles in fp32 before the fp32
    product, where fp16 would round alpha · R (0.1) or overflow it (1e5: past 65504). The low-rank
    term is most of y here, so a rounding of it shows (3e-4 from float64 against fp32's bound of 3e-6)."""
    use_triton(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, w, L = (torch.randn(*s, generator=g).to(DEVICE) for s in ((37, 20), (20, 45), (37, 5)))
    w = w * 1e-2 * r_scale
    R = torch.randn(5, 45, generator=g).to(DEVICE, torch.float16)
    out = kernels.lora_matmul(x, w, lowrank=(L, R), r_scale=r_scale, out_dtype=torch.float32,
                              dot_dtype=torch.float32)
    want = x.double() @ w.double() + r_scale * (L.double() @ R.double())
    assert rel_err(out, want) < TOL[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("scale", [0.0, 2.0 ** -60, 0.5, -1.0])
def test_a_masked_low_rank_term_takes_scale_1(scale, monkeypatch):
    """A masked low-rank term with L given enters the accumulator before the K loop, as
    r_scale · (L R) / scale (``LOW_FIRST`` in the kernel): with scale 1 that is the term the output
    carries, where another scale could pass fp32's range (2^-60 here, with L R about 2^70) or be 0,
    so ``lora_matmul`` takes no other. (The layer's dX has scale 1; in fp16 the launcher then moves
    alpha onto the sum, dividing it by alpha: tests/test_training.py checks that.) Scale 1: the
    kernel's numbers, with a large term."""
    use_triton(monkeypatch)
    x, w, L, R = (torch.randn(*s, device=DEVICE) for s in ((8, 16), (16, 12), (8, 4), (4, 12)))
    L = L * 2.0 ** 68
    drop = ("lowrank", torch.tensor(3), 0.5, 12, 1)
    with pytest.raises(AssertionError, match="a masked low-rank term with L given takes scale 1"):
        kernels.lora_matmul(x, w, scale=scale, lowrank=(L, R), dropout=drop, out_dtype=torch.float32,
                            dot_dtype=torch.float32)
    out = kernels.lora_matmul(x, w, lowrank=(L, R), r_scale=0.75, dropout=drop, out_dtype=torch.float32,
                              dot_dtype=torch.float32)
    keep = functional.keep_mask(8, 12, 3, 0.5, DEVICE, "triton")
    want = x.double() @ w.double() + 0.75 * (L.double() @ R.double()) * keep
    assert 0 < keep.sum() < keep.numel() and rel_err(out, want) < TOL[torch.float32]


@pytest.mark.triton
def test_a_16_bit_split_sum_rounds_once(monkeypatch):
    """A split reduction into a 16-bit output (dA and dB of fp16 adapters) sums its fp32 partials
    in fp32 and rounds once: here each partial is past fp16's 65504 while the whole fits, so
    rounding each partial first would make inf and NaN of it."""
    shapes = use_triton(monkeypatch)
    tokens = 4 * kernels.SPLIT_CHUNK  # four splits of SPLIT_CHUNK tokens
    g = torch.Generator().manual_seed(5)
    x = (1 + 0.1 * torch.rand(tokens, 8, generator=g)).to(DEVICE, torch.float16)
    sign = torch.where(torch.arange(tokens) < tokens // 2, 1.0, -1.0)[:, None]
    dS = (sign * (1200 + 10 * torch.rand(tokens, 4, generator=g))).to(DEVICE, torch.float16)
    out = kernels.lora_matmul(x.t(), dS, scale=1.0, out_dtype=torch.float16, dot_dtype=torch.float16)
    want = x.double().t() @ dS.double()
    partial = x[:kernels.SPLIT_CHUNK].double().t() @ dS[:kernels.SPLIT_CHUNK].double()
    assert partial.abs().min() > 65504 > want.abs().max()  # the premise
    assert any(len(s) == 3 for s in shapes)  # (the split path)
    assert rel_err(out, want) < TOL[torch.float16]


@pytest.mark.triton
@pytest.mark.parametrize("tma", [False, True])
def test_offsets_past_2_31_through_a_strided_view(tma, monkeypatch):
    """x as a view whose rows lie 2^26 elements apart, in a buffer of about 5 GiB of which only the
    view's rows are ever touched (memory is committed lazily): x's element offsets pass 2^31 from
    row 32 on, in the products that read x by rows (y's, dX's) and by columns (dA's). Int32 offsets
    would wrap there. (tests/test_gpu.py runs a dense x of more than 2^31 elements on a GPU.)"""
    use_triton(monkeypatch)
    monkeypatch.setattr(kernels, "TMA", tma)
    M, K, N, r, stride = 40, 16, 24, 4, 1 << 26
    buf = torch.empty((M - 1) * stride + K, device=DEVICE, dtype=torch.float16)
    x = buf.as_strided((M, K), (stride, 1))
    x.copy_(torch.randn(M, K, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.float16))
    assert (M - 1) * stride >= 2 ** 31 + 7 * stride  # the premise: the last eight rows are past it
    _, W, b, A, B = make_inputs((M,), K, N, r, torch.float16, seed=7)
    x.requires_grad_()
    A, B = A.requires_grad_(), B.requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, 1.5)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.float16)
    y.backward(dy)
    y_ref, grads = reference(x, W, b, A, B, 1.5, dy)
    for got, want in [(y, y_ref), (x.grad, grads[0]), (A.grad, grads[3]), (B.grad, grads[4])]:
        assert rel_err(got, want) < TOL[torch.float16]


@pytest.mark.triton
@pytest.mark.parametrize("tokens,K,N,r,split,p,dtype_name,out_name", [
    (90, 48, 80, 5, False, 0.0, "float32", "float32"),    # uneven tiles in both products
    (700, 40, 24, 3, True, 0.3, "float16", "float16"),    # split over the tokens, masked first product
    (700, 40, 24, 3, True, 0.3, "float16", "float32"),    # 16-bit products into fp32 (peft's adapters)
    (300, 0, 24, 4, True, 0.0, "float32", "float32"),     # one product empty (0 in-features): dB alone
    (300, 40, 24, 3, True, 0.0, "float64", "float64"),    # fp64: scales not exact in fp32 stay fp64
])
def test_paired_launch(tokens, K, N, r, split, p, dtype_name, out_name, monkeypatch):
    """``pair=``: the layer's dA = x̃ᵀ dS and dB = (dYᵀ S)ᵀ from one launch (the mask on the first
    product only), dB stored contiguous, each against float64."""
    shapes = use_triton(monkeypatch)
    spy = LaunchSpy(kernels._lora_matmul_kernel)
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", spy)
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    dtype = getattr(torch, dtype_name)
    x, dy = torch.randn(tokens, K, device=DEVICE, dtype=dtype), torch.randn(tokens, N, device=DEVICE, dtype=dtype)
    dS, S = (torch.randn(tokens, r, device=DEVICE, dtype=dtype) for _ in range(2))
    inputs = [t.clone() for t in (x, dy, dS, S)]
    seed = torch.tensor(1234, device=DEVICE)
    dropout = ("x", seed, p, 1, K) if p else None
    out_dtype = getattr(torch, out_name)
    # (two scales, as a direct caller may pass them: the layer's are both alpha; in fp64 neither is
    # a float32, so one rounded to it is seen)
    scale, pair_scale = (0.3, 0.1) if dtype == torch.float64 else (0.5, 2.0)
    dA, dB = kernels.lora_matmul(x.t(), dS, scale=scale, dropout=dropout, pair=(dy.t(), S), pair_scale=pair_scale,
                                 out_dtype=out_dtype, dot_dtype=dtype)
    keep = kernels.keep_mask(tokens, K, 1234, p, DEVICE) if p else torch.ones(tokens, K, dtype=torch.bool, device=DEVICE)
    assert rel_err(dA, scale * (x.double() * keep).t() @ dS.double()) < TOL[dtype]
    assert rel_err(dB, pair_scale * S.double().t() @ dy.double()) < TOL[dtype]
    assert dB.shape == (r, N) and dB.is_contiguous() and dB._base is None and dA.shape == (K, r)
    assert dA.dtype == dB.dtype == out_dtype
    assert all(torch.equal(a, b) for a, b in zip(inputs, (x, dy, dS, S)))  # inputs untouched
    assert (spy.paired, len(spy.allow_tma)) == ((1, 0) if K else (0, 1))  # (an empty dA: no launch)
    assert any(len(s) == 3 for s in shapes) == split  # (split, rows, r) partial buffers


@pytest.mark.parametrize("smem", [kernels.SMEM_BYTES, 99 * 1024])  # Hopper's, and a consumer GPU's
def test_prune_fits_tiles_to_problem_and_shared_memory(smem, monkeypatch):
    """The autotuner's pruning (it only runs with several configs, i.e. on a GPU): tiles shrink to
    the problem, stages drop until X and W tiles (and A's, with the fused shrink, in A's own dtype)
    fit in the GPU's shared memory, and something always stays."""
    monkeypatch.setattr(kernels, "_smem_bytes", lambda tensor: smem)
    import triton
    import triton.language as tl
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=8, num_stages=st)
               for bm, bn, bk, st in [(128, 256, 64, 4), (128, 128, 64, 4), (256, 128, 64, 4), (128, 128, 128, 5),
                                      (64, 64, 64, 3)]]

    def named(M, N, dtype, adapters=None):  # the pruner reads sizes and each operand's dtype
        return {"M": M, "N": N, "x_ptr": dtype, "w_ptr": dtype, "l_ptr": adapters or dtype, "r_ptr": adapters or dtype,
                "out_ptr": dtype}

    for dot, dtype in [(tl.bfloat16, torch.bfloat16), (tl.float32, torch.float32), (tl.float64, torch.float64)]:
        kept = kernels._prune(configs, named(8192, 4096, dtype), DOT_DTYPE=dot)
        assert kept
        for c in kept:
            k = c.kwargs
            assert c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * dtype.itemsize <= smem
        if dot == tl.bfloat16 and smem == kernels.SMEM_BYTES:
            assert len(kept) == len(configs)  # all fit in bf16 (one with fewer stages), none lost
    shrink = kernels._prune(configs, named(8192, 8, torch.bfloat16), DOT_DTYPE=tl.bfloat16)
    assert {c.kwargs["BLOCK_N"] for c in shrink} == {16} and len(shrink) < len(configs)  # deduplicated
    # The fused shrink streams a BLOCK_K × BLOCK_R tile of A beside X and W in every stage, in A's
    # dtype (fp32 adapters beside bf16 activations: twice the bytes).
    for a_dtype in (torch.bfloat16, torch.float32):
        fused = kernels._prune(configs, named(8192, 4096, torch.bfloat16, a_dtype), DOT_DTYPE=tl.bfloat16,
                               FUSE_SHRINK=True, BLOCK_R=64)
        for c in fused:
            k = c.kwargs
            assert c.num_stages * ((k["BLOCK_M"] + k["BLOCK_N"]) * 2 + 64 * a_dtype.itemsize) * k["BLOCK_K"] <= smem
        if smem == kernels.SMEM_BYTES:  # (fp32 A: a stage fewer for 128x256's four)
            stages = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]): c.num_stages for c in fused}
            assert stages[128, 256] == (4 if a_dtype == torch.bfloat16 else 3)
    # A paired launch's tiles cover rows of both products: fitted to the larger (dB's r rows
    # beside dA's features), not to the first product's.
    paired = kernels._prune(configs, dict(named(16, 16, torch.bfloat16), M2=4096), DOT_DTYPE=tl.bfloat16)
    alone = kernels._prune(configs, named(4096, 16, torch.bfloat16), DOT_DTYPE=tl.bfloat16)
    assert {c.kwargs["BLOCK_M"] for c in paired} == {c.kwargs["BLOCK_M"] for c in alone} == {64, 128, 256}
    huge = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=2)]
    assert kernels._prune(huge, named(4096, 4096, torch.float64), DOT_DTYPE=tl.float64)  # never empty


def test_prune_offers_the_deep_tiles_to_thin_outputs_only():
    """The tiles ``kernels.DEEP_K`` deep serve outputs of up to ``THIN_N`` columns (the rank: the
    shrink, dS, dA beside dB), within shared memory in every dtype; a wider output never gets one."""
    import triton.language as tl

    def deep(M, N, dtype=torch.bfloat16):
        named = {"M": M, "N": N, "x_ptr": dtype, "w_ptr": dtype, "l_ptr": dtype, "r_ptr": dtype, "out_ptr": dtype}
        kept = kernels._prune(kernels.hopper_configs(), named, DOT_DTYPE=tl.bfloat16, ALLOW_TMA=True)
        return [c for c in kept if c.kwargs["BLOCK_K"] >= kernels.DEEP_K]

    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["USE_TMA"]) for c in deep(8192, 16)} == {
        (bm, 16, tma) for bm in (128, 64, 32) for tma in (False, True)}
    assert {c.kwargs["BLOCK_N"] for c in deep(8192, 64)} == {64}
    assert deep(8192, 65) == [] and deep(8192, 4096) == [] and deep(16, 4096) == []
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for N in (16, 64):
            for c in deep(8192, N, dtype):
                k = c.kwargs
                assert c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * dtype.itemsize <= kernels.SMEM_BYTES


@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_fp32_precision_follows_pytorch(setting, expected):
    """Both of PyTorch's switches for fp32 matmuls are honoured, the newer one without raising."""
    assert kernels._input_precision(torch.float32) == "ieee"  # PyTorch's default: IEEE
    try:
        torch.backends.cuda.matmul.fp32_precision = setting
        assert kernels._input_precision(torch.float32) == expected
        assert kernels._input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    try:
        for level in ("high", "medium"):  # (docs/usage.md: TF32 at "high" and at "medium")
            torch.set_float32_matmul_precision(level)
            assert kernels._input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("alpha", [1000.0, 2.0 ** 24, -2.0 ** 24])  # (a negative one takes the same path)
@pytest.mark.parametrize("adapter_name", ["float16", "float32"])
@pytest.mark.parametrize("fuse", ["0", "1"])
def test_a_large_alpha_rounds_nothing_past_fp16s_range(backend, fuse, adapter_name, alpha, monkeypatch):
    """alpha scales the fp32 accumulators, never a 16-bit operand: with alpha · B past fp16's
    65504 while y fits, and alpha · A past it while dX fits, y and dX are the reference's, on both
    backends and shrink placements. (alpha on B's and Aᵀ's tiles, rounded to fp16 before the
    product, made inf and NaN of them; until the accumulator's range was widened, still from
    alpha = 2^20 on: hence 2^24, with B or A as much smaller.)"""
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    adapter, c = getattr(torch, adapter_name), abs(alpha) / 1000.0
    x, W, b, A, B = make_inputs((40,), 48, 56, 4, torch.float16, adapter_dtype=adapter, seed=3)
    dy = torch.randn(40, 56, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)
    # (alpha · B large: y, whose dX does not fit fp16 here; alpha · A large: y and dX)
    for x_, A_, B_, big in ((x * 1e-3, A, B * (100 / c), "B"), (x, A * (200 / c), B * 1e-3, "A")):
        A_, B_ = A_.to(adapter), B_.to(adapter)
        assert abs(alpha) * {"A": A_, "B": B_}[big].double().abs().max() > 65504  # the premise
        x_ = x_.clone().requires_grad_()
        y = lora_kernels.lora_linear(x_, W, b, A_, B_, alpha)
        y.backward(dy)
        y_ref, grads = reference(x_, W, b, A_, B_, alpha, dy)
        pairs = {"y": (y, y_ref)} | ({"dx": (x_.grad, grads[0])} if big == "A" else {})
        assert all(want.abs().max() < 65504 for _, want in pairs.values())  # what is compared fits fp16
        errs = {k: rel_err(got, want) for k, (got, want) in pairs.items()}
        assert all(e <= TOL[torch.float16] for e in errs.values()), (big, errs)


@pytest.mark.parametrize("fuse", ["0", "1"])
def test_a_tiny_alpha_keeps_its_digits_in_fp16(backend, fuse, monkeypatch):
    """The other end of fp16's range: alpha = 2^-24 on B's tiles made fp16 subnormals of them, a
    few bits each (alpha · B of 1 is fp16's smallest step), which the accumulator keeps whole.
    Here the LoRA term carries most of y (x A large, W small) and of dX."""
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    alpha = 2.0 ** -24
    x, W, b, A, B = make_inputs((40,), 48, 56, 4, torch.float16, bias=False, seed=5)
    x, W, A, B = x * 8, W * 1e-4, A * 300, B * 50
    xAB = (x.double() @ A.double() @ B.double()).abs()
    assert (alpha * B.double()).abs().max() < 2.0 ** -14 <= (x.double() @ A.double()).abs().max() < 65504  # the premise
    assert alpha * xAB.norm() > 4 * (x.double() @ W.double().t()).norm()  # LoRA's share of y
    check_all((x, W, None, A, B), alpha, torch.float16)


def test_a_tiny_alpha_beside_a_huge_product_stays_finite_in_fp32(backend):
    """Outside fp16 alpha stays on R's tiles: x W / alpha on the accumulator would pass fp32's
    range here (x W about 1e22, alpha 1e-18) where y itself fits."""
    x, W, b, A, B = make_inputs((16,), 32, 16, 4, torch.float32)
    check_all((x * 1e22, W, b, A, B), 1e-18, torch.float32)


@pytest.mark.parametrize("fuse", ["0", "1", "ahead"])
def test_a_large_alpha_leaves_a_16_bit_s_in_range(backend, fuse, monkeypatch):
    """S is kept as the reference computes x A, unscaled, and alpha scales the product's fp32
    accumulator: with alpha · x A past fp16's range (65504) while x A and the output are
    within it, the reference's numbers come out. (S stored as alpha · x A overflowed to inf there,
    and B's zeros at initialisation would have made NaN of it.) Every shrink placement."""
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    x, W, b, A, B = make_inputs((64,), 96, 80, 16, torch.float16, adapter_dtype=torch.float32)
    x, B, alpha = x * 300, B * 1e-3, 400.0
    xA = x.double() @ A.double()
    assert xA.abs().max() < 65504 < alpha * xA.abs().max()  # the premise
    check_all((x, W, b, A, B), alpha, torch.float16)
