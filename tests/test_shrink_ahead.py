"""SHRINK_AHEAD (``kernels.Shrink(..., ahead=True)``): L = s_scale · x̃ A computed once per row block
by a shrink item in the big product's own launch, ahead of the row block's tiles, which read it
in their epilogue once its flag says it is there, and compute it themselves where it is not yet.

The interpreter runs a grid's programs one after another. With a program per item, every shrink
item runs before its tiles: they all read the published L. With a persistent grid (the
interpreter's 8 "SMs", each program taking items p, p + 8, ...), program 0 meets tiles of row
blocks whose shrink item belongs to a program not yet run: those tiles compute L themselves. Flags
preset so that no L ever counts as there force the second way everywhere. (On a GPU the same
tests run where the order is the hardware's: tests/test_gpu.py adds a larger one.)
"""

import pytest
import torch

from conftest import DEVICE, TOL, rel_err, use_triton
from lora_kernels import kernels

pytestmark = pytest.mark.triton

M, K, N, R = 100, 48, 130, 8  # ragged against every tile below


def _inputs(dtype, seed=0, m=M, n=N):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    return rnd(m, K), rnd(K, n, scale=K ** -0.5), rnd(K, R, scale=K ** -0.5), rnd(R, n, scale=R ** -0.5), rnd(n)


def _force(monkeypatch, persistent):
    # One config (the autotuner then runs it as it is): 16-row tiles in groups of two row blocks,
    # so the 100 rows make 7 row blocks in 4 groups, 5 column blocks each.
    config = kernels._config(16, 32, 16, 4, 2, tma=True, persistent=persistent, store=persistent, group=2)
    monkeypatch.setattr(kernels._lora_matmul_kernel, "configs", [config])
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)  # (on a GPU: a kernel compiled for another config has its key)
    if persistent:  # (8 programs, as the interpreter's stand-in has SMs: on a GPU too, each loops over items)
        monkeypatch.setattr(kernels, "_num_sms", lambda device: 8)


def _flags_seen(monkeypatch, start=0):
    """Hands the launches flags that start at ``start``; returns the list of them, to read after."""
    seen = []

    def flags(n, device):
        seen.append(torch.full((n,), start, device=device, dtype=torch.int32))
        return seen[-1]
    monkeypatch.setattr(kernels, "_ready_flags", flags)
    return seen


def _run(x, w, A, B, b, dropout, dtype, l_dtype=None):
    return kernels.lora_matmul(x, w, lowrank=(kernels.Shrink(A, 0.75, l_dtype or dtype, ahead=True), B), r_scale=1.5,
                               bias=b, dropout=dropout, out_dtype=dtype, dot_dtype=dtype)


@pytest.mark.parametrize("where", [None, "x", "lowrank"])
@pytest.mark.parametrize("persistent", [False, True], ids=["a-program-per-item", "persistent"])
def test_ahead_matches_float64_and_leaves_its_flags_zero(persistent, where, monkeypatch):
    """y = x w + 1.5 · L B + b and L = 0.75 · x̃ A against float64, with LoRA dropout on x (the mask
    on the shrink items' x and the tiles' own L, never on x w) or on the low-rank term (dX's), into
    NaN-poisoned outputs; and every flag back at zero after the launch, as each launch must find
    them: each row block's shrink item and its five tiles all counted."""
    use_triton(monkeypatch)
    _force(monkeypatch, persistent)
    flags = _flags_seen(monkeypatch)
    x, w, A, B, b = _inputs(torch.float64, seed=1 + persistent)
    seed, p = torch.tensor(11), 0.3
    dropout = None if where is None else (where, seed, p, *((K, 1) if where == "x" else (N, 1)))
    y, L = _run(x, w, A, B, b, dropout, torch.float64)

    xm = x * kernels.keep_mask(M, K, 11, p, x.device) if where == "x" else x
    L_ref = 0.75 * xm @ A
    low = 1.5 * L_ref @ B
    if where == "lowrank":
        low = low * kernels.keep_mask(M, N, 11, p, x.device)
    assert rel_err(L, L_ref) < TOL[torch.float64]
    assert rel_err(y, x @ w + low + b) < TOL[torch.float64]
    # (the last launch's: a --record-launches run makes each call once more, recorded, not run)
    assert flags[-1].numel() == kernels._cdiv(M, 16) and flags[-1].eq(0).all(), flags[-1]


@pytest.mark.parametrize("dtype, l_dtype, where", [(torch.float16, torch.float16, None),
                                                   (torch.float16, torch.float16, "x"),
                                                   (torch.float32, torch.float16, None)])
def test_tiles_that_find_no_L_compute_the_same_bits(dtype, l_dtype, where, monkeypatch):
    """Flags preset to -READY (no shrink item's arrival ever counts): every tile computes L itself,
    and y comes out bit for bit as where every tile read the stored L (a program per item, in
    order). L is stored rounded to its dtype (fp16 here; also beside fp32 products): the tiles
    round theirs alike, so the output never depends on which program came first."""
    use_triton(monkeypatch)
    x, w, A, B, b = _inputs(dtype, seed=3)
    dropout = None if where is None else ("x", torch.tensor(5), 0.25, K, 1)
    _force(monkeypatch, persistent=False)
    _flags_seen(monkeypatch)
    y_read, L_read = _run(x, w, A, B, b, dropout, dtype, l_dtype)
    for persistent in (False, True):
        _force(monkeypatch, persistent)
        flags = _flags_seen(monkeypatch, start=-kernels.READY.value)
        y_own, L_own = _run(x, w, A, B, b, dropout, dtype, l_dtype)
        assert torch.equal(L_own, L_read) and torch.equal(y_own, y_read)
        # each row block's five tiles counted, its shrink item's READY added: none saw it (the last
        # row block, rows 96-99, is as full a count as the others)
        assert flags[-1][:7].tolist() == [5] * 7
    xm = x.double() * kernels.keep_mask(M, K, 5, 0.25, x.device) if where == "x" else x.double()
    L_ref = 0.75 * xm @ A.double()
    ref = x.double() @ w.double() + 1.5 * L_ref.to(l_dtype).double() @ B.double() + b.double()
    assert rel_err(L_read, L_ref) < TOL[l_dtype] and rel_err(y_read, ref) < TOL[dtype]


def test_tiles_that_compute_L_spread_an_inf_as_the_reference(monkeypatch):
    """Flags preset to -READY and an inf in x: the tiles' own L has ranks past R (8, in a block of
    16) of inf · 0 = NaN, which must not reach y: its row is +inf, as float64's."""
    use_triton(monkeypatch)
    _force(monkeypatch, persistent=False)
    _flags_seen(monkeypatch, start=-kernels.READY.value)
    x, w, A, B, b = _inputs(torch.float32, seed=7)
    x[3, 5], w[5], A[5], B = float("inf"), w[5].abs(), A[5].abs(), B.abs()  # (row 3 of x w and of L B: +inf)
    y, _ = _run(x, w, A, B, b, None, torch.float32)
    ref = x.double() @ w.double() + 1.5 * (0.75 * x.double() @ A.double()) @ B.double() + b.double()
    assert ref[3].isposinf().all()  # (the case in question)
    assert all(torch.equal(f(y), f(ref)) for f in (torch.isnan, torch.isposinf, torch.isneginf))
    finite = ref.isfinite()
    assert rel_err(y[finite], ref[finite]) < TOL[torch.float32]


def test_a_shrink_item_that_comes_last_resets_its_flag(monkeypatch):
    """64 rows and 64 columns (4 row blocks of 2 column blocks, in 2 groups) on the persistent
    grid: programs 0 to 3 take, second, the tiles of row blocks 2 and 3, whose shrink items
    (programs 6 and 7) run after them, and come last: the items' atomics reset those flags, the
    tiles' the other two. Every flag zero after, y against float64."""
    use_triton(monkeypatch)
    _force(monkeypatch, persistent=True)
    flags = _flags_seen(monkeypatch)
    x, w, A, B, b = _inputs(torch.float64, seed=5, m=64, n=64)
    y, L = _run(x, w, A, B, b, None, torch.float64)
    assert rel_err(y, x @ w + 1.5 * (0.75 * x @ A) @ B + b) < TOL[torch.float64]
    assert flags[-1].eq(0).all(), flags[-1]


@pytest.mark.skipif(not kernels.INTERPRET, reason="which tiles overtake their shrink item is the interpreter's order")
def test_a_tile_whose_flag_counts_its_L_reads_it(monkeypatch):
    """The other way round: flags preset to READY say every L is there before any is. On the
    persistent grid, the tiles that run before their row block's shrink item then read its L
    unwritten (NaN, as the poisoned buffer holds it) rather than compute it: the flag alone decides."""
    use_triton(monkeypatch)
    _force(monkeypatch, persistent=True)
    _flags_seen(monkeypatch, start=kernels.READY.value)
    x, w, A, B, b = _inputs(torch.float32, seed=4)
    y, L = _run(x, w, A, B, b, None, torch.float32)
    assert torch.isfinite(L).all() and not torch.isfinite(y).all()


@pytest.mark.skipif(not kernels.INTERPRET, reason="counts a helper's calls as the interpreter makes them")
def test_tiles_that_find_their_L_published_compute_no_shrink(monkeypatch):
    """What the shrink ahead is for: x A computed once per row block. With a program per item every
    shrink item runs before its row block's tiles, so every tile, the first (which finds the flag
    at exactly READY) among them, reads the published L: _shrink_rows runs once per row block, in
    the shrink items, never in a tile."""
    use_triton(monkeypatch)
    _force(monkeypatch, persistent=False)
    flags = _flags_seen(monkeypatch)
    calls, shrink_rows = [], kernels._shrink_rows

    def counted(*args, **kwargs):
        calls.append(None)
        return shrink_rows(*args, **kwargs)
    monkeypatch.setattr(kernels, "_shrink_rows", counted)  # (the interpreter looks it up in the module)
    x, w, A, B, b = _inputs(torch.float32, seed=2)
    y, L = _run(x, w, A, B, b, None, torch.float32)
    assert len(calls) == kernels._cdiv(M, 16) == 7
    assert rel_err(y, x.double() @ w.double() + 1.5 * (0.75 * x.double() @ A.double()) @ B.double()
                   + b.double()) < TOL[torch.float32]
    assert flags[-1].eq(0).all()


def test_the_pruner_counts_the_shrink_items_tiles_of_A():
    """The shrink items' loop holds an X tile and an A tile a stage, the K loop's an X tile and a W
    tile, in buffers they may share: the pruner counts the wider. A deep thin config (128×64×256,
    N = 64) beside fp32 A at rank 64 (peft's adapters): W's tile 128 bytes a row of K, A's 256; two
    stages of X and W fit Hopper's 227 KiB (192), two of X and A do not (256): the config goes."""
    import triton.language as tl
    named = {"M": 8192, "N": 64, "R": 64, "x_ptr": torch.bfloat16, "w_ptr": torch.bfloat16, "l_ptr": torch.float32,
             "r_ptr": torch.float32, "out_ptr": torch.bfloat16}
    deep = kernels._config(128, 64, 256, 8, 3, tma=True)

    def kept(fuse):
        return [kernels.tile_name(c.all_kwargs()) for c in kernels._prune(
            [deep, deep], named, FUSE_SHRINK=fuse, BLOCK_R=64, ALLOW_TMA=True, DOT_DTYPE=tl.bfloat16, HAS_LOWRANK=True)]
    assert kept(0) == ["128x64x256 w8 s2 tma"]
    assert "128x64x256" not in " ".join(kept(kernels.SHRINK_AHEAD.value))
