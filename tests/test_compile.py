"""torch.compile: the custom ops pass opcheck, and a model compiles whole (fullgraph, no graph
break) with the same numbers as eager, forward and backward."""

import contextlib
import copy
import warnings

import pytest
import torch

import lora_kernels
from conftest import DEVICE, TOL, make_inputs, reference, rel_err


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(backend, dropout_p):
    x, W, b, A, B = make_inputs((3, 5), 24, 20, 4, torch.float32)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    # (where lora_linear draws it: on the kernels' device, on the CPU for the PyTorch path)
    seed = torch.tensor(1234, device=DEVICE if backend == "triton" else "cpu") if dropout_p else None
    fwd = torch.ops.lora_kernels.lora_linear_fwd.default
    torch.library.opcheck(fwd, (x, W, b, A, B, 0.5, dropout_p, seed, backend))
    y, S = fwd(x.detach(), W, b, A.detach(), B.detach(), 0.5, dropout_p, seed, backend)
    bwd = torch.ops.lora_kernels.lora_linear_bwd.default
    for needs in ([True, False, False, True, True], [True] * 5):
        torch.library.opcheck(bwd, (torch.randn_like(y), x.detach(), W, A.detach(), B.detach(), S,
                                    0.5, dropout_p, seed, needs, backend))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 48)
        self.down = torch.nn.Linear(48, 32, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled graphs are cached per code object, and the backend is fixed when a graph is traced:
    # without a reset, the second backend's test would replay the first one's graph.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_model(dropout=0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), torch.nn.LayerNorm(32), Block())
    lora_kernels.replace_linear_with_lora(model, rank=4, alpha=2.0, dropout=dropout)
    for m in model.modules():
        if isinstance(m, lora_kernels.LinearWithLoRA):
            m.linear.requires_grad_(False)
            torch.nn.init.normal_(m.lora.B, std=0.1)  # B starts at zero: make the LoRA path count
    return model.to(DEVICE)


def grads_of(model, x, seed=0):
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    return y, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_fullgraph_compile_no_graph_breaks(backend):
    model = lora_model()
    x = torch.randn(2, 7, 32, device=DEVICE)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    y_eager, g_eager = grads_of(model, x)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y_comp, g_comp = grads_of(compiled, x)
    assert rel_err(y_comp, y_eager) < TOL[torch.float32]
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < TOL[torch.float32]


def test_symbolic_alpha_compiles_whole(backend):
    """With dynamic=True torch.compile traces alpha as a symbolic float (and so after an alpha
    changed between calls), which once failed in the input checks: the layer compiles whole, a new
    alpha gives eager's numbers (Dynamo pins the float the op receives, so each new value is a
    recompile), and a non-finite one is still refused."""
    layer = lora_model()[0].up
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for alpha, tokens in ((2.0, 5), (-0.75, 5), (3.5, 9)):
        layer.lora.alpha = alpha
        x = torch.randn(tokens, 32, device=DEVICE)
        assert rel_err(compiled(x), layer(x)) < TOL[torch.float32]
    layer.lora.alpha = float("nan")
    with pytest.raises(Exception, match="alpha must be finite"):
        compiled(x)


def test_tensor_alpha_compiles_whole(backend):
    """A one-element tensor alpha (the seed's layer takes one; eager mode reads it as a number)
    compiles whole too, where it once failed in the input checks: traced, its value is known only
    when the graph runs, so it scales B in the graph instead of entering the op as a constant. A
    new value needs no recompile; output and gradients against float64."""
    from torch._dynamo.testing import CompileCounterWithBackend
    x, W, b, A, B = make_inputs((3, 5), 24, 20, 4, torch.float32)
    A.requires_grad_(), B.requires_grad_()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x, alpha: lora_kernels.lora_linear(x, W, b, A, B, alpha), backend=counter,
                      fullgraph=True)
    dy = torch.randn(3, 5, 20, device=DEVICE)
    for alpha in (2.0, -0.75, 0.1):
        y = f(x, torch.tensor(alpha))  # (on the CPU, as a module's alpha usually is)
        dA, dB = torch.autograd.grad(y, [A, B], dy)
        want, (_, _, _, want_dA, want_dB) = reference(x, W, b, A, B, alpha, dy)
        assert rel_err(y, want) < TOL[torch.float32]
        assert rel_err(dA, want_dA) < TOL[torch.float32] and rel_err(dB, want_dB) < TOL[torch.float32]
    assert counter.frame_count == 1
    with pytest.raises(Exception, match="alpha must be a real number"):  # (not a real part alone)
        f(x, torch.tensor(1 + 2j))


def test_compile_with_dropout(backend):
    """Dropout's seed is drawn inside the graph; aot_eager keeps eager's RNG, so numbers match."""
    model = lora_model(dropout=0.25).train()
    x = torch.randn(3, 5, 32, device=DEVICE)
    y_eager, g_eager = grads_of(model, x, seed=5)
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_comp, g_comp = grads_of(compiled, x, seed=5)
    assert rel_err(y_comp, y_eager) < TOL[torch.float32]
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < TOL[torch.float32]
    _, g_other = grads_of(compiled, x, seed=6)
    assert not torch.equal(g_other[0], g_comp[0])  # a new seed draws a new mask


def test_compiled_autograd_of_an_eager_forward(backend):
    """Eager forwards run an autograd.Function; when compiled autograd traces their backward (as
    DDP and FSDP2 users turn on), it must reach the backward op, not trace into the launchers,
    and in one graph: a graph break in every layer's backward would cost each its own graph."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    model = lora_model(dropout=0.25).train()
    x = torch.randn(2, 3, 32, device=DEVICE)
    _, g_eager = grads_of(model, x, seed=3)
    model.zero_grad()
    torch.manual_seed(3)
    y = model(x)
    counters.clear()
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        y.square().mean().backward()
    assert not counters["graph_break"], list(counters["graph_break"])
    g_comp = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < TOL[torch.float32]
    torch._dynamo.reset()


@pytest.mark.parametrize("transform", ["functionalize", "vmap"])
def test_fake_tensors_inside_functorch_transforms(transform):
    """Under functionalization or vmap a fake tensor arrives wrapped in a plain Tensor: the call
    must still see it is fake and take the custom op's shape function (not the eager
    autograd.Function, which these transforms refuse)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" performance warning
        x, W, A, B = torch.randn(8, 32), torch.randn(16, 32), torch.randn(32, 4), torch.randn(4, 16)

        def f(x):
            return lora_kernels.lora_linear(x, W, None, A, B, 1.0)
        y = torch.func.functionalize(f)(x) if transform == "functionalize" else torch.func.vmap(f)(x[None])
    assert y.shape == ((8, 16) if transform == "functionalize" else (1, 8, 16))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_records_the_op(backend, strict):
    """torch.export records each layer as one call of the forward op, strict or not (not strict,
    its default, traces with fake tensors, which once sent the module to the reference's unfused
    calls), with dynamic token counts, and the program, saved and loaded, computes the model: against
    a float64 copy with the adapters merged into plain nn.Linears."""
    import copy
    import io

    model = lora_model().eval()
    x = torch.randn(2, 7, 32, device=DEVICE)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)
    program = torch.export.export(model, (x,), dynamic_shapes=dims, strict=strict)
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.lora_kernels.lora_linear_fwd.default) == 4, calls
    assert torch.ops.aten.linear.default not in calls and torch.ops.aten.matmul.default not in calls, calls
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    merged = lora_kernels.merge_and_unload(copy.deepcopy(model).double())
    x = torch.randn(3, 11, 32, device=DEVICE)  # (another batch and token count)
    assert rel_err(loaded(x), merged(x.double())) < TOL[torch.float32]


@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_a_model_built_and_run_under_fake_tensor_mode(backend, device, monkeypatch):
    """Memory estimators build a model under FakeTensorMode and run it: the layers wrap there (as
    the reference's do: torch's .to() of a fake parameter fails, so the adapters are made on the
    weight's device, here also one other than the default) and take the forward op, whose shape
    functions serve forward and backward, not the reference's unfused calls. A real input gets a
    fake result, in the mode and after it (where the kernels once tried to read the fake weights)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from lora_kernels import functional

    calls = []
    monkeypatch.setattr(functional, "_forward", lambda *a: calls.append(a) or torch.ops.lora_kernels.lora_linear_fwd(*a))
    real_x = torch.randn(7, 32, device=device, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = torch.nn.Sequential(torch.nn.Linear(32, 48, device=device), torch.nn.GELU(),
                                    torch.nn.Linear(48, 32, device=device))
        lora_kernels.replace_linear_with_lora(model, rank=4, alpha=2.0, dropout=0.1)
        for x in (torch.randn(2, 7, 32, device=device, requires_grad=True), real_x):
            model(x).sum().backward()
            assert x.grad.shape == x.shape
    assert len(calls) == 4 and all(type(p) is FakeTensor and p.device == x.device and p.grad.shape == p.shape
                                   for p in model.parameters())
    assert type(real_x) is not FakeTensor and type(real_x.grad) is FakeTensor
    assert type(model(real_x)) is FakeTensor  # (the mode's own, which allows real inputs)


def test_flop_counter_counts_what_the_reference_computes(backend):
    """FlopCounterMode (a TorchDispatchMode, as MFU loggers use) sees the Triton kernels of no
    eager call: under any such mode the call takes the custom ops, which it counts by their
    formulas. Forward and backward count what the reference's products do, for every subset of
    (x, W, A, B) that trains, and the outputs and gradients are still the float64 reference's."""
    import itertools

    from torch.utils.flop_counter import FlopCounterMode

    from lora_kernels import reference as seed

    def flops(f, *args):
        with FlopCounterMode(display=False) as counter:
            out = f(*args)
        return out, counter.get_total_flops()

    x, W, b, A, B = make_inputs((3, 7), 32, 48, 4, torch.float32)
    dy = torch.randn(3, 7, 48, device=DEVICE)
    want_y, want_grads = reference(x, W, b, A, B, 2.0, dy, base_grads=True)
    for trains in itertools.product([False, True], repeat=4):
        if not any(trains):
            continue
        counts = []
        for f in (lora_kernels.lora_linear, seed.lora_linear_reference):
            leaves = [t.detach().requires_grad_(need) for t, need in zip((x, W, A, B), trains)]
            y, forward = flops(f, leaves[0], leaves[1], b, leaves[2], leaves[3], 2.0)
            _, backward = flops(y.backward, dy)
            counts.append((forward, backward))
            if f is lora_kernels.lora_linear:
                assert rel_err(y, want_y) < TOL[torch.float32]
                for leaf, want in zip(leaves, [want_grads[i] for i in (0, 1, 3, 4)]):
                    assert leaf.grad is None if not leaf.requires_grad else rel_err(leaf.grad, want) < TOL[torch.float32]
        assert counts[0] == counts[1] and counts[0][1] > 0, (trains, counts)


def test_flop_counter_sees_a_module_run_the_references_calls(backend):
    """FlopCounterMode installs global module hooks, under which LinearWithLoRA runs the seed's
    unfused calls (README: "a module runs unfused under FlopCounterMode's module hooks, with the
    same count"): the same operators and totals as the seed's layer, forward and backward, and
    the float64 reference's output and gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_kernels import reference as seed

    x, W, b, A, B = make_inputs((3, 7), 32, 48, 4, torch.float32)
    dy = torch.randn(3, 7, 48, device=DEVICE)
    want_y, want_grads = reference(x, W, b, A, B, 2.0, dy, base_grads=True)
    counts = []
    for cls in (lora_kernels.LinearWithLoRA, seed.LinearWithLoRA):
        layer = cls(torch.nn.Linear(32, 48), 4, 2.0).to(DEVICE)  # (the seed makes its adapters on the CPU)
        with torch.no_grad():
            for p, value in zip((layer.linear.weight, layer.linear.bias, layer.lora.A, layer.lora.B), (W, b, A, B)):
                p.copy_(value)
        leaf = x.detach().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            y = layer(leaf)
            y.backward(dy)
        counts.append({str(op): n for op, n in counter.get_flop_counts()["Global"].items()})
        assert rel_err(y, want_y) < TOL[torch.float32]
        for got, want in zip((leaf.grad, layer.linear.weight.grad, layer.lora.A.grad, layer.lora.B.grad),
                             [want_grads[i] for i in (0, 1, 3, 4)]):
            assert rel_err(got, want) < TOL[torch.float32]
    assert counts[0] == counts[1] and sum(counts[0].values()) > 0, counts
    assert not any(op.startswith("lora_kernels") for op in counts[0]), counts


def float64_grads_with_masks(model, x, seed, backend):
    """The seed's formula in float64 for ``lora_model``'s LoRA layers, each with the dropout mask
    its call draws after ``torch.manual_seed(seed)`` (the layers draw their seeds in call order,
    which is ``modules()``' order here): the gradients of the trainable parameters."""
    from lora_kernels import functional

    twin = copy.deepcopy(model).double()
    torch.manual_seed(seed)
    for layer in (m for m in twin.modules() if isinstance(m, lora_kernels.LinearWithLoRA)):
        call_seed = int(functional.draw_seed(torch.device(DEVICE), backend))

        def forward(x, layer=layer, call_seed=call_seed):
            K = x.shape[-1]
            keep = functional.keep_mask(x.numel() // K, K, call_seed, layer.dropout, DEVICE, backend).reshape(x.shape)
            lora = ((x * keep / (1 - layer.dropout)) @ layer.lora.A @ layer.lora.B) * layer.lora.alpha
            return torch.nn.functional.linear(x, layer.linear.weight, layer.linear.bias) + lora
        layer.forward = forward
    twin(x.detach().double()).square().mean().backward()
    return [p.grad for p in twin.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["reentrant", "non-reentrant", "selective"])
def test_activation_checkpointing_recomputes_the_same_masks(backend, kind):
    """torch.utils.checkpoint with LoRA dropout: the recompute draws the same seeds, so the
    gradients are those of the model run without it, and the float64 reference's with the masks
    drawn again. Selective checkpointing runs a dispatch mode, so the layers take the custom ops
    there; its policy here saves their outputs (each of the four layers' forwards, once)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    model = lora_model(dropout=0.25).train()
    x = torch.randn(3, 5, 32, device=DEVICE)
    _, want = grads_of(model, x, seed=4)
    want64 = float64_grads_with_masks(model, x, 4, backend)
    model.zero_grad()
    kwargs = {"use_reentrant": kind == "reentrant"}
    saved = []
    if kind == "selective":
        def policy(ctx, func, *args, **kwargs):
            if func is torch.ops.lora_kernels.lora_linear_fwd.default:
                saved.append(ctx.is_recompute)
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    torch.manual_seed(4)
    x.requires_grad_(kind == "reentrant")  # (reentrant checkpointing needs an input that requires grad)
    checkpoint(model, x, **kwargs).square().mean().backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(got) == len(want) == len(want64) == 10  # (A and B of four layers, and the LayerNorm)
    for a, b, c in zip(got, want, want64):
        assert rel_err(a, b) < TOL[torch.float32] and rel_err(a, c) < TOL[torch.float32]
    if kind == "selective":
        assert saved.count(False) == 4, saved  # the forward's four calls of the op, saved


@pytest.mark.parametrize("K", [8, 0], ids=["K8", "no-in-features"])
@pytest.mark.parametrize("where", ["fake", "meta"])
def test_shapes_on_fake_and_meta_tensors(where, K):
    """Memory estimators run models on fake tensors, and models are built on the meta device:
    forward and backward give the right shapes and dtypes there, with dropout too, for a frozen
    and a trainable base, and no kernel (which needs real memory) is touched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for train_base in (False, True):
        mode = FakeTensorMode() if where == "fake" else torch.device("meta")
        with mode:
            x, W, b, A, B = (torch.randn(*s) for s in [(2, 5, K), (6, K), (6,), (K, 3), (3, 6)])
            x, A, B = (t.requires_grad_() for t in (x, A, B))
            W.requires_grad_(train_base), b.requires_grad_(train_base)
            y = lora_kernels.lora_linear(x, W, b, A, B, 1.5, dropout_p=0.1)
            y.sum().backward()
        assert y.shape == (2, 5, 6) and (x.grad.shape, A.grad.shape, B.grad.shape) == ((2, 5, K), (K, 3), (3, 6))
        assert y.dtype == x.grad.dtype == A.grad.dtype == torch.float32
        if train_base:
            assert (W.grad.shape, b.grad.shape) == ((6, K), (6,))
        else:
            assert W.grad is None and b.grad is None
