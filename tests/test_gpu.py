"""Checks that need a CUDA GPU: bf16 and TF32 through the kernels, offsets past 2^31, CUDA graphs
(by hand and through torch.compile's reduce-overhead mode).

The rest of the suite also runs on the GPU (its tensors go to CUDA when one is present); these add
what the interpreter cannot show. Skipped without CUDA.
"""

import pytest
import torch

import lora_kernels
from conftest import TOL, make_inputs, record, reference, rel_err, use_triton
from lora_kernels import functional, kernels

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    # The kernels, with every buffer they write poisoned (NaN): the caching allocator would
    # otherwise hand a test the last one's freed outputs, which could hide an unwritten tile.
    use_triton(monkeypatch)


def errors_vs_reference(inputs, alpha, dtype_run=None):
    x, W, b, A, B = [t.clone() if t is not None else None for t in inputs]
    for t in (x, A, B):
        t.requires_grad_()
    y = (dtype_run or lora_kernels.lora_linear)(x, W, b, A, B, alpha)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, g = reference(x, W, b, A, B, alpha, dy)
    return {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, g[0]), "dA": rel_err(A.grad, g[3]),
            "dB": rel_err(B.grad, g[4])}


def seed_formula(x, W, b, A, B, alpha):
    # PyTorch in the same dtype, the seed's own formula: the yardstick for 16-bit error.
    return torch.nn.functional.linear(x, W, b) + alpha * (x @ A.to(x.dtype) @ B.to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [((2, 333), 1000, 777, 16), ((4097,), 512, 1536, 64), ((64,), 4096, 4096, 8)])
@pytest.mark.parametrize("adapter", ["same", "fp32"])
def test_half_within_twice_pytorch(dtype, shape, adapter):
    lead, K, N, r = shape
    inputs = make_inputs(lead, K, N, r, dtype, adapter_dtype=torch.float32 if adapter == "fp32" else None)
    ours = errors_vs_reference(inputs, 0.5)
    record(dtype, ours)
    torch_err = errors_vs_reference(inputs, 0.5, dtype_run=seed_formula)
    for k in ours:
        assert ours[k] <= 2 * torch_err[k] + 1e-3, (k, ours[k], torch_err[k])


@pytest.mark.parametrize("persistent", [False, True], ids=["a-program-per-item", "persistent"])
def test_the_shrink_ahead_gives_the_same_bits_every_run(persistent, monkeypatch):
    """kernels.SHRINK_AHEAD where programs do run at once (the interpreter runs them one by one): a
    tile may reach its epilogue before its row block's shrink item has stored L, or while it
    stores it, and must then compute L itself, never read it half-written. Forward and backward
    (S in y's launch, dS in dX's), 8192 tokens in 64 row blocks, a config forced (the persistent
    grid takes 132 programs, each its tiles in turn), every buffer the kernels write NaN-poisoned
    (this file's autouse fixture: S too, so an L read before it was stored shows): five runs give
    the same bits, and each is within twice PyTorch's own bf16 error of float64."""
    monkeypatch.setattr(functional, "FUSE_SHRINK", "ahead")
    config = kernels._config(128, 128, 64, 8, 3, tma=True, persistent=persistent, store=persistent)
    monkeypatch.setattr(kernels._lora_matmul_kernel, "configs", [config])
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)  # (a kernel compiled for another config has its launch key)
    inputs = make_inputs((8192,), 1024, 2048, 16, torch.bfloat16, seed=6)
    x, W, b, A, B = inputs
    dy = torch.randn(8192, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).bfloat16()
    runs = []
    for _ in range(5):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        y = lora_kernels.lora_linear(xs, W, b, As, Bs, 0.5)
        y.backward(dy)
        runs.append((y, xs.grad, As.grad, Bs.grad))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    ours = errors_vs_reference(inputs, 0.5)
    torch_err = errors_vs_reference(inputs, 0.5, dtype_run=seed_formula)
    for k in ours:
        assert ours[k] <= 2 * torch_err[k] + 1e-3, (k, ours[k], torch_err[k])


def test_tf32(monkeypatch):
    """With PyTorch's TF32 switch on, the kernels use TF32 too; the error stays at TF32's level."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        errs = errors_vs_reference(make_inputs((1000,), 2048, 1024, 16, torch.float32), 1.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    record("float32 (tf32)", errs)
    assert max(errs.values()) < 3e-3, errs


def test_fp32_ieee_by_default():
    errs = errors_vs_reference(make_inputs((1000,), 2048, 1024, 16, torch.float32), 1.0)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_offsets_past_2_31(tma, monkeypatch):
    """x and y with more than 2^31 elements: the last rows (int32 offsets would wrap) are right,
    through TMA descriptors (Hopper) and through pointer loads."""
    monkeypatch.setattr(kernels, "TMA", tma)
    K = N = 2048
    M = (1 << 31) // K + 300
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * M * K:  # x, y, dx in bf16 plus headroom
        pytest.skip(f"needs ~{24 * M * K >> 30} GiB free, have {free >> 30}")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=g)
    A = (torch.randn(K, 16, device="cuda", generator=g) * K ** -0.5).bfloat16().requires_grad_()
    B = (torch.randn(16, N, device="cuda", generator=g) * 0.25).bfloat16().requires_grad_()
    x.requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, 2.0)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    y.backward(dy)
    tail = slice(M - 257, M)  # rows whose element offsets are past 2^31
    y_ref, grads = reference(x[tail], W, b, A, B, 2.0, dy[tail])
    assert rel_err(y[tail], y_ref) < 1.6e-2
    assert rel_err(x.grad[tail], grads[0]) < 1.6e-2
    # dA and dB reduce over every row: float64 sums of the same products, a slice of rows at a time
    # (a float64 copy of x alone would take 17 GB).
    A64, B64 = A.detach().double(), B.detach().double()
    dA_ref, dB_ref = torch.zeros_like(A64), torch.zeros_like(B64)
    for start in range(0, M, 1 << 18):
        x64, dy64 = x.detach()[start:start + (1 << 18)].double(), dy[start:start + (1 << 18)].double()
        dA_ref += x64.t() @ (2.0 * dy64 @ B64.t())
        dB_ref += (2.0 * x64 @ A64).t() @ dy64
    assert rel_err(A.grad, dA_ref) < 1.6e-2
    assert rel_err(B.grad, dB_ref) < 1.6e-2


def test_cuda_graph_replay_matches_eager():
    """A training step captured into a CUDA graph (what torch.compile's reduce-overhead mode and
    hand-made graphs do) replays to eager's numbers: the launches, the TMA scratch allocations and
    the backward thread's launches all land in the graph. New inputs are copied into the captured
    buffers before each replay, as such code does."""
    x, W, b, A, B = make_inputs((256,), 128, 192, 16, torch.bfloat16)
    x, A, B = (t.clone().requires_grad_() for t in (x, A, B))
    dy = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)

    def step():
        A.grad = B.grad = x.grad = None
        y = lora_kernels.lora_linear(x, W, b, A, B, 1.5)
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # autotuning and allocations before the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    grads_static = (x.grad, A.grad, B.grad)

    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        new_x = torch.randn(x.shape, device="cuda", generator=g).bfloat16()
        new_dy = torch.randn(dy.shape, device="cuda", generator=g).bfloat16()
        with torch.no_grad():
            x.copy_(new_x)
            dy.copy_(new_dy)
        graph.replay()
        replayed = [t.clone() for t in (y_static, *grads_static)]
        eager = step()
        for got, want in zip(replayed, (eager, x.grad, A.grad, B.grad)):
            assert torch.equal(got, want)  # the same kernels on the same data: bitwise equal


def test_cuda_graph_replays_draw_new_dropout_masks(monkeypatch):
    """With LoRA dropout, each replay of a captured forward draws a new seed on the GPU, where the
    kernels read it (a seed drawn on the host would be baked into the graph: one mask for every
    replay), and its output is the layer's for the mask of the seed it drew."""
    p, alpha = 0.5, 1.5
    x, W, b, A, B = make_inputs((256,), 128, 192, 16, torch.float32)
    seeds = []
    matmul = kernels.lora_matmul

    def spy(*args, dropout=None, **kwargs):  # keeps the seed buffer the graph will write
        if dropout is not None:
            seeds.append(dropout[1])
        return matmul(*args, dropout=dropout, **kwargs)
    monkeypatch.setattr(kernels, "lora_matmul", spy)

    def step():
        return lora_kernels.lora_linear(x, W, b, A, B, alpha, dropout_p=p)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    seeds.clear()
    with torch.cuda.graph(graph):
        y_static = step()
    assert len(seeds) == 1 and seeds[0].is_cuda  # the forward's one masked product: the shrink

    x64, W64, b64, A64, B64 = (t.double() for t in (x, W, b, A, B))
    drawn = []
    for _ in range(3):
        graph.replay()
        seed = int(seeds[0])
        keep = kernels.keep_mask(256, 128, seed, p, "cuda")
        want = torch.nn.functional.linear(x64, W64, b64) + alpha * ((x64 * keep / (1 - p)) @ A64 @ B64)
        assert rel_err(y_static, want) < TOL[torch.float32]
        drawn.append(seed)
    assert len(set(drawn)) == 3, drawn


def test_compile_reduce_overhead_trains_as_eager(monkeypatch):
    """torch.compile's mode="reduce-overhead" (CUDA graph trees: a remedy where a step's host time
    exceeds its GPU time, docs/usage.md) of a model of LinearWithLoRA layers: the custom ops'
    launches, forward and backward, are recorded into graphs in a memory pool of their own and
    replayed, and every step gives eager's outputs and gradients on its new input. Graphs must
    really be used: Inductor skips them silently for what it deems unsafe (and counts the skips),
    and a replay calls no launcher (counted here)."""
    from torch._dynamo.utils import counters
    launches = []  # the compiled model's launcher calls, by step
    at = [None]  # (the step the compiled model runs, None while the eager one does)
    matmul = kernels.lora_matmul

    def counted(*args, **kwargs):
        if at[0] is not None:
            launches.append(at[0])
        return matmul(*args, **kwargs)
    monkeypatch.setattr(kernels, "lora_matmul", counted)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.GELU(), torch.nn.Linear(192, 96))
        lora_kernels.replace_linear_with_lora(model, rank=16, alpha=1.5)
        for layer in (model[0], model[2]):
            layer.linear.requires_grad_(False)
            torch.nn.init.normal_(layer.lora.B, std=0.1)  # (B starts at zero: make the LoRA path count)
        return model.cuda()

    eager, model = build(), build()
    compiled = torch.compile(model, mode="reduce-overhead")
    counters.clear()
    for step in range(5):  # a warm-up run, the recording, then replays
        x = torch.randn(2, 256, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))
        results = []
        for module, call, counting in ((eager, eager, None), (model, compiled, step)):
            at[0] = counting
            module.zero_grad(set_to_none=True)
            y = call(x)
            y.square().mean().backward()
            at[0] = None
            # (cloned at once: the next replay writes the graph's outputs in place)
            results.append([y.detach().clone()] + [p.grad.clone() for p in module.parameters() if p.requires_grad])
        assert len(results[1]) == 5  # y and the four adapters' gradients
        for got, want in zip(results[1], results[0]):
            assert rel_err(got, want) < TOL[torch.float32]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert 0 in launches and not [s for s in launches if s >= 3], launches  # the last two steps replayed


def test_direct_launches_match_tritons_path(monkeypatch):
    """The direct launch path (kernels._launch) on real kernels: a key's first launch goes through
    Triton and is remembered, the next ones call the compiled kernel. Every call, first or later,
    with aligned and unaligned inputs (another specialization), on another stream too, into
    NaN-filled outputs, matches float64."""
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                     device=device, dtype=dtype))
    triton_path = []
    kernel = kernels._lora_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            triton_path.append(grid)
            return kernel[grid]
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", Spy())
    x, W, b, A, B = make_inputs((300,), 256, 192, 16, torch.float32)
    flat = torch.randn(300 * 256 + 1, device=x.device)
    unaligned = flat[1:].view(300, 256)  # 4 bytes past a 16-byte boundary: Triton compiles another kernel
    unaligned.copy_(x)
    dy = torch.randn(300, 192, device=x.device)
    y_ref, g = reference(x, W, b, A, B, 0.75, dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    seen = set()
    for inputs, stream in [(x, None), (x, None), (unaligned, None), (unaligned, side), (x, side)]:
        before = len(triton_path)
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            xi, Ai, Bi = (t.detach().requires_grad_() for t in (inputs, A, B))  # (views keep their offset)
            y = lora_kernels.lora_linear(xi, W, b, Ai, Bi, 0.75)
            y.backward(dy)
        torch.cuda.synchronize()
        for name, got, want in [("y", y, y_ref), ("dx", xi.grad, g[0]), ("dA", Ai.grad, g[3]), ("dB", Bi.grad, g[4])]:
            assert rel_err(got, want) < TOL[torch.float32], (name, rel_err(got, want))
        if inputs.data_ptr() in seen:  # a repeat: every launch direct
            assert len(triton_path) == before, len(triton_path) - before
        seen.add(inputs.data_ptr())
    # (y with S, dX with dS, dA with dB: three keys, and two more for the unaligned x's y and dA)
    assert len(kernels._COMPILED) >= 5


def test_reduce_overhead_compile_trains_like_eager():
    """torch.compile(mode="reduce-overhead"), the way out where eager mode is host-bound:
    a model of fused layers runs its training steps from CUDA graphs (none skipped) with eager's
    outputs and adapter gradients."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.GELU(), torch.nn.Linear(192, 64))
    lora_kernels.replace_linear_with_lora(model, rank=16, alpha=2.0)
    model = model.to("cuda", torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora." in name)
    for m in model.modules():
        if isinstance(m, lora_kernels.LoRALayer):
            torch.nn.init.normal_(m.B, std=0.1)  # (the seed starts B at zero)
    adapters = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, mode="reduce-overhead")
    counters.clear()

    def step(fn, x, dy):  # copies: a later replay rewrites the graphs' outputs
        for p in adapters:
            p.grad = None
        y = fn(x)
        y.backward(dy)
        return [y.detach().clone()] + [p.grad.clone() for p in adapters]

    for i in range(4):  # the first calls warm up and record the graphs, the later ones replay them
        g = torch.Generator(device="cuda").manual_seed(i)
        x = torch.randn(2, 96, 128, device="cuda", generator=g).bfloat16()
        dy = torch.randn(2, 96, 64, device="cuda", generator=g).bfloat16()
        torch.compiler.cudagraph_mark_step_begin()
        got = step(compiled, x, dy)
        want = step(model, x, dy)
        assert len(got) == 5  # y, and A and B of both layers
        for a, b in zip(got, want):
            assert rel_err(a, b) < TOL[torch.bfloat16]
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_small_calls_take_cublas_below_the_threshold(monkeypatch):
    """With ``TORCH_BELOW`` set (LORA_KERNELS_TORCH_BELOW) and the backend on auto, a call with
    fewer multiply-adds than it runs its forward and backward as cuBLAS calls and a larger one the
    kernels, both right against float64; in CUDA graph capture the small one keeps the kernels."""
    from lora_kernels import functional
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(functional, "TORCH_BELOW", 2**22)
    launches = []
    real = kernels.lora_matmul
    monkeypatch.setattr(kernels, "lora_matmul", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    for lead, K, N, kernels_run in [((2, 32), 256, 128, False), ((4096,), 512, 512, True)]:  # 2^21, 2^30
        launches.clear()
        errs = errors_vs_reference(make_inputs(lead, K, N, 8, torch.float32), 0.75)
        assert bool(launches) == kernels_run, (lead, K, N, len(launches))
        assert max(errs.values()) < TOL[torch.float32], errs
    x, W, b, A, B = make_inputs((64,), 256, 128, 8, torch.float32)
    launches.clear()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")  # (compiles and tunes the kernel, outside the capture)
        lora_kernels.lora_linear(x, W, b, A, B, 0.75)
        warm_up = len(launches)
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lora_kernels.lora_linear(x, W, b, A, B, 0.75)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert launches and len(launches) == 2 * warm_up  # (the captured call's launches are the kernels', not cuBLAS)
    y_ref = reference(x, W, b, A, B, 0.75, torch.ones_like(y))[0]
    assert rel_err(y, y_ref) < TOL[torch.float32]
