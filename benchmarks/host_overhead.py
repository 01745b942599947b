"""Host time of the layer's Python path: ``python -m benchmarks.host_overhead [--device cuda]
[--profile FILE]``. By default on CPU tensors with every kernel launch stubbed out (runs anywhere,
no GPU, no Triton compile); with ``--device cuda``, real bf16 launches at 64×64, where the GPU's
work is a few µs, so a step's time is the host's. ``--profile`` writes cProfile tables of a step.

On a GPU the host must enqueue a step's launches faster than the GPU runs them, or the GPU waits:
at 8192 tokens a 4096→1024 projection's forward+backward is about 0.2 ms of GPU work, so a few
hundred microseconds of Python per step would show in every timing. This measures that Python:
lora_linear's checks, the autograd wrapper, the launchers' argument preparation, and (for
comparison) the custom-op route that torch.compile takes, and peft's LoRA Linear with its own
forward and after ``fuse_lora``. Triton's own launch path is not in it (it needs a GPU); F.linear's
steps, the addmm baseline's, lora_linear's own on its PyTorch path and peft's own forward on the
same tiny CPU tensors are computed, not stubbed. On CUDA it also
takes a direct launch apart (``_launch_parts``): the package's Python and allocations, Triton's
launcher with the driver, and the step with every launch stubbed out.
"""

import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import signal
import time
from unittest import mock

import torch

from lora_kernels import functional, kernels

from . import providers

from .run import Stopped, _stop


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _StubKernel:
    """Stands in for a compiled kernel in ``kernels._COMPILED``: the direct path calls its ``run``,
    which launches nothing and keeps the arguments it was given."""

    def __init__(self, kernel):
        self.function, self.packed_metadata, self.args = kernel.function, kernel.packed_metadata, None

    def run(self, *args):
        self.args = args


def _launch_parts(launch, eager_step, device, dtype):
    """What a direct launch's host time is made of, once the steps have run (so ``kernels._COMPILED``
    holds their kernels): ``[(name, step, context)]``, each step timed inside its context.

    The second H200 run measured 67 µs per direct launch and 0.86 ms per eager step at 64×64, where
    this CPU with the launches stubbed takes 10-20 µs and about 0.2 ms: these rows say where the
    rest goes. Triton's launcher asks the driver about every tensor it is given
    (cuPointerGetAttribute, for 11 pointers a launch), which addresses given as ints skip."""
    stubs, real = {}, {}
    for key, (kernel, meta) in kernels._COMPILED.items():
        stub = _StubKernel(kernel)
        stubs[key], real[stub] = (stub, meta), kernel

    @contextlib.contextmanager
    def stubbed():
        with mock.patch.object(kernels, "_COMPILED", stubs):
            yield
        # A launch whose key was not known went through Triton's dispatch, ran, and was cached
        # among the stubs: the row timed real launches too.
        if any(type(kernel) is not _StubKernel for kernel, _ in stubs.values()):
            raise RuntimeError("a launch missed its compiled kernel while stubbed: it ran for real")

    with stubbed():
        launch()  # to learn which kernel it calls, with which arguments
    called = [stub for stub in real if stub.args is not None]
    if len(called) != 1:
        raise RuntimeError(f"one launch called {len(called)} compiled kernels directly, not one: "
                           "is the direct path off (LORA_KERNELS_FAST_LAUNCH=0, a launch hook)?")
    kernel, args = real[called[0]], called[0].args
    addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    none = contextlib.nullcontext
    return [
        ("  of which lora_matmul's Python and allocations (kernel.run stubbed out)", launch, stubbed()),
        ("  of which kernel.run alone: Triton's launcher, scratch allocation, driver", lambda: kernel.run(*args), none()),
        ("  the same with the pointers passed as addresses (no driver query per tensor)",
         lambda: kernel.run(*addresses), none()),
        ("one torch.empty (64×64)", functools.partial(torch.empty, (64, 64), device=device, dtype=dtype), none()),
        ("lora_linear forward+backward, eager, every launch stubbed out (kernel.run)", eager_step, stubbed()),
    ]


def _median_us(fn, n=2000, rounds=5, sync=None, wait=True):
    """Median over rounds of the µs per call of ``n`` calls back to back (with ``sync`` before the
    first and, if ``wait``, after the last: on a GPU, the time to issue them, once the GPU keeps
    up; without ``wait``, the host's issue time even where the GPU would not keep up)."""
    for _ in range(100):
        fn()
    times = []
    for _ in range(rounds):
        if sync:
            sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if sync and wait:
            sync()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(times)[rounds // 2]


def _profile(step, calls=300):
    """cProfile of ``calls`` steps, the 30 functions with the most time of their own."""
    for _ in range(30):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


class _PassThrough(torch.autograd.Function):
    """A Python autograd.Function that computes nothing: its step is what the engine and a Python
    Function cost by themselves (on CUDA the engine runs its backward on a thread of its own, which
    must take the GIL), the share of the layer's step that no change to its own code can remove."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _LayerShaped(torch.autograd.Function):
    """The same, with the layer's Function's inputs (nine), saved tensors (five) and gradients (x, A
    and B): against _PassThrough, what the layer's signature costs the engine; against the layer's
    step less its bodies, what is left for the bodies themselves when the engine runs them. Its
    outputs and gradients are views of tensors made once, so it allocates nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, alpha, dropout_p, seed, backend, made):
        y, S, dx, dA, dB = made
        ctx.save_for_backward(x, weight, A, B, S)
        ctx.alpha, ctx.backend, ctx.grads = alpha, backend, (dx, dA, dB)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        ctx.saved_tensors  # (unpacked, as the layer's backward does)
        dx, dA, dB = (g.view_as(g) for g in ctx.grads)
        return dx, None, None, dA, dB, None, None, None, None, None


class _Launching(torch.autograd.Function):
    """_PassThrough calling ``launch`` (one launch; or two, or the shrink ahead's flag memset) in
    its forward or, ``in_backward``, in its backward, which on CUDA the engine runs on a thread of
    its own: the two steps' difference is what that thread adds to it. (In the fifth H200 run the eager step cost 228 µs more with
    its three launches, two of them the backward's, than with every ``kernel.run`` stubbed out,
    where one ``kernel.run`` called in a loop cost 19 µs. Not all of that is the thread: on this
    project's CPU a stubbed launch costs 12 µs called in a loop and about 25 inside either pass of a
    step, whose other code leaves the processor's caches cold for it.)"""

    @staticmethod
    def forward(ctx, x, launch, in_backward):
        ctx.launch = launch if in_backward else None
        if not in_backward:
            launch()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.launch is not None:
            ctx.launch()
        return grad, None, None


# (With dropout the layer's shrink has launches of its own, four a step here, five at 4096→4096;
# the shrink ahead makes three, and a flag memset in each pass. Without dropout, variants' host
# pieces time the placements.)
DROPOUT_STEP = "lora_linear forward+backward with LoRA dropout 0.1, eager"


def _steps(device, dtype):
    M, K, N, r = 64, 64, 64, 16
    g = torch.Generator(device=device).manual_seed(0)
    # x as a model passes it, (batch, tokens, features): 2 sequences of 32 tokens
    x, W, b, dy = (torch.randn(*s, generator=g, device=device).to(dtype)
                   for s in [(2, M // 2, K), (N, K), (N,), (2, M // 2, N)])
    A, B = (torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_() for s in [(K, r), (r, N)])
    x.requires_grad_()
    inputs = (x, W, b, A, B, 2.0, 0.0, None, "triton")

    def eager_step(p=0.0):
        y = functional.lora_linear(x, W, b, A, B, 2.0, dropout_p=p)
        torch.autograd.grad(y, [x, A, B], dy)

    def train_forward():  # the forward with its autograd.Function and saved tensors, no backward
        functional.lora_linear(x, W, b, A, B, 2.0)

    def eval_forward():  # evaluation or generation: the forward alone, under no_grad
        with torch.no_grad():
            functional.lora_linear(x, W, b, A, B, 2.0)

    def op_step():  # the custom ops, as a compiled graph calls them
        y = functional._forward(*inputs)[0]
        torch.autograd.grad(y, [x, A, B], dy)

    def base_step():
        y = torch.nn.functional.linear(x, W, b)
        torch.autograd.grad(y, [x], dy)

    def addmm_step():  # the benchmark's addmm baseline: a bare autograd.Function over cuBLAS calls
        y = providers.AddmmLoRA.apply(x, W, b, A, B, 2.0)
        torch.autograd.grad(y, [x, A, B], dy)

    def passthrough_step():
        torch.autograd.grad(_PassThrough.apply(x), [x], dy)

    made = (torch.empty_like(dy), torch.empty(2, M // 2, r, device=device, dtype=dtype), torch.empty_like(x.detach()),
            torch.empty_like(A.detach()), torch.empty_like(B.detach()))

    def layer_shaped_step():
        torch.autograd.grad(_LayerShaped.apply(x, W, b, A, B, 2.0, 0.0, None, "triton", made), [x, A, B], dy)

    def base_forward():  # generation with the adapters unmerged: a forward per token, host-bound on a GPU
        with torch.no_grad():
            torch.nn.functional.linear(x, W, b)

    x2 = x.detach().reshape(M, K)

    def launch():
        kernels.lora_matmul(x2, W.t(), out_dtype=dtype, dot_dtype=dtype)

    def launching(in_backward, launch=launch):
        torch.autograd.grad(_Launching.apply(x, launch, in_backward), [x], dy)

    def flags():  # what the shrink ahead adds to each of its launches: a memset (PyTorch's, not Triton's)
        kernels._ready_flags(M // 16, device)

    def twice():
        launch(), launch()

    S = torch.randn(M, r, generator=g, device=device).to(dtype)

    def backward_body():  # what the autograd engine runs for the backward (on CUDA, on a thread of its own)
        functional._backward_impl(dy, x.detach(), W, A.detach(), B.detach(), S, 2.0, 0.0, None,
                                  [True, False, False, True, True], "triton")
    # (The PyTorch path's rows are the layer's own steps, timed with LORA_KERNELS_BACKEND=torch set
    # around the whole timing rather than around each call: setting it costs about 3 µs.)
    baselines = {"lora_linear forward+backward, eager, PyTorch path (LORA_KERNELS_BACKEND=torch)": eager_step,
                 "addmm baseline forward+backward (benchmarks.providers.AddmmLoRA)": addmm_step,
                 "F.linear forward+backward": base_step,
                 "lora_linear forward under no_grad, PyTorch path": eval_forward,
                 "F.linear forward under no_grad": base_forward}
    # (No kernels: timed right after the layer's step, before anything that compiles.)
    engine = {"a Python autograd.Function that computes nothing, forward+backward": passthrough_step,
              "the same with the layer's inputs, saved tensors and gradients": layer_shaped_step}
    # With LoRA dropout 0.1, the layer's and peft's: last, their kernels compile first on a GPU. (The
    # fifth H200 run's fused step with dropout took 1.31 against 0.90 ms without at 4096→4096,
    # peft's 1.10 against 1.04: these say how much of it is the host's.)
    dropout = {DROPOUT_STEP: functools.partial(eager_step, 0.1),
               **_peft_steps(x, W, b, dy, dropout=0.1)}
    return (eager_step, train_forward, eval_forward, op_step, launch, launching, flags, twice, backward_body,
            baselines, engine, _peft_steps(x, W, b, dy), dropout)


def _peft_steps(x, W, b, dy, dropout=0.0):
    """peft's LoRA Linear on the same base (rank 16, alpha 32, lora_dropout ``dropout``),
    forward+backward: its own forward, and after ``fuse_lora`` (our layer as most users reach it);
    and without dropout its own forward alone under no_grad (generation). {} without peft."""
    try:
        import peft
        from lora_kernels.peft import fuse_lora
    except ImportError:
        return {}
    steps, layers = {}, []
    # (Adapters as get_peft_model makes them: fp32 beside a bf16 base on the GPU, peft's default.)
    with_dropout = f", lora_dropout {dropout}" if dropout else ""
    for name, fuse in [(f"peft LoRA Linear, fp32 adapters (peft's default){with_dropout}, its own forward "
                        "(forward+backward)", False),
                       (f"peft LoRA Linear, fp32 adapters (peft's default){with_dropout}, after fuse_lora "
                        "(forward+backward)", True)]:
        base = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0]))
        with torch.no_grad():
            base[0].weight.copy_(W.float()), base[0].bias.copy_(b.float())
        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["0"])
        model = peft.get_peft_model(base.to(x.device, x.dtype), config)
        layer = model.base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # (peft starts B at zero)
        if fuse:
            fuse_lora(model)
        leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        steps[name] = lambda layer=layer, leaves=leaves: torch.autograd.grad(layer(x), leaves, dy)
        layers.append(layer)
    if not dropout:
        steps["peft LoRA Linear, fp32 adapters, its own forward under no_grad"] = torch.no_grad()(
            lambda layer=layers[0]: layer(x))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu",
                        help="cpu (launches stubbed out, the default) or cuda (real launches, bf16, at 64×64, where the "
                             "GPU's work is a few µs: the time per step is the host's)")
    parser.add_argument("--profile", metavar="FILE", help="also write the rows and a cProfile each of the eager step, the backward's body "
                             "(functional._backward_impl) and F.linear's step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    cuda = device.type == "cuda"
    steps = _steps(device, torch.bfloat16 if cuda else torch.float32)
    (eager_step, train_forward, eval_forward, op_step, launch, launching, flags, twice, backward_body, baselines,
     engine, peft_steps, dropout_steps) = steps

    def stubs():  # on the CPU no kernel runs: every launch is stubbed out, and the PyTorch path is kept off
        stack = contextlib.ExitStack()
        if not cuda:
            stack.enter_context(mock.patch.object(kernels, "_lora_matmul_kernel", _NoLaunch()))
            stack.enter_context(mock.patch.object(functional, "select_backend", lambda *args: "triton"))
        return stack

    # (300 calls a round on a GPU, where a step is a millisecond of host time; 2000 on the CPU)
    timer = functools.partial(_median_us, n=300 if cuda else 2000, sync=torch.cuda.synchronize if cuda else None)
    lines, profiles = [], []
    where = torch.cuda.get_device_name(device) if cuda else "CPU, launches stubbed out"

    def write():  # after every row and profile: a run stopped by its time limit keeps what it had
        if not args.profile:
            return
        with open(args.profile, "w") as f:
            f.write(f"# Host time of one layer step ({where}), {time.strftime('%Y-%m-%d')}\n\n"
                    f"torch {torch.__version__}; `python -m benchmarks.host_overhead "
                    f"--device {args.device} --profile FILE`\n\n```\n" + "\n".join(lines) + "\n```\n")
            for name, text in profiles:
                f.write(f"\n## cProfile of 300 calls: {name}\n\n```\n{text.strip()}\n```\n")

    def row(name, step, **timing):
        try:
            lines.append(f"{timer(step, **timing):8.1f} µs  {name}")
        except Exception as e:  # one row that fails (peft's, say) must not cost the others
            lines.append(f"  FAILED  {name}: {type(e).__name__}: {e}")
        print(lines[-1], flush=True)
        write()

    def profile(name, step):
        if args.profile:
            profiles.append((name, _profile(step)))
            write()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with stubs():
            row("lora_linear forward+backward, eager (autograd.Function)", eager_step)
            for name, step in engine.items():
                row(name, step)
            row("lora_linear forward, grad enabled (the autograd.Function, no backward)", train_forward)
            row("lora_linear forward under no_grad (evaluation)", eval_forward)
            row("the same through the custom ops", op_step)
            # Against the eager step, less the forward with grad: what the autograd engine adds (on
            # CUDA it runs the backward on a thread of its own; the third H200 run timed the backward
            # alone at 4096→1024 at 0.81 ms for two launches, against 0.18 ms for the forward's one).
            row("the backward's body called directly (functional._backward_impl, no autograd engine)",
                backward_body)
            row("one launch (lora_matmul)" if cuda else "one launcher's argument preparation (lora_matmul)", launch)
            row("the Function that computes nothing, making that launch in its forward (forward+backward)",
                functools.partial(launching, False))
            row("the same, the launch in its backward (on CUDA on the engine's thread)", functools.partial(launching, True))
            # Once a backward, or once a launch? (On this project's CPU a stubbed launch cost 18 µs
            # more as the first call on a thread woken for it, three such launches 23 µs more:
            # benchmarks/results/thread-wakeup-cpu-amd-epyc-2026-11-30.md.)
            row("the same, two launches in its backward", functools.partial(launching, True, twice))
            # Is it Triton's launch that costs more there, or any CUDA call? The shrink ahead's
            # flags are a PyTorch memset, one in each pass.
            row("the same, the shrink ahead's flags (torch.zeros) in its forward", functools.partial(launching, False, flags))
            row("the same, those flags in its backward", functools.partial(launching, True, flags))
            if cuda:
                try:
                    parts = _launch_parts(launch, eager_step, device, torch.bfloat16)
                except Exception as e:  # (as a row's failure: the rows after it still run)
                    parts = []
                    lines.append(f"  FAILED  the launch's parts: {type(e).__name__}: {e}")
                    print(lines[-1], flush=True)
                if parts:  # (host costs: timed without waiting for the GPU at the end)
                    lines.append("  -- a direct launch taken apart; the step without launches (time to issue) --")
                    print(lines[-1], flush=True)
                for name, step, context in parts:
                    try:
                        with context:
                            row(name, step, wait=False)
                    except RuntimeError as e:
                        lines.append(f"  FAILED  {name}: {e}")
                        print(lines[-1], flush=True)
            for name, step in peft_steps.items():
                row(name, step)
            # (cProfile sees one thread: on CUDA the autograd engine runs the backward on its own, so
            # the backward's body is also profiled called directly.)
            profile("lora_linear forward+backward, eager", eager_step)
            profile("the backward's body (functional._backward_impl), called directly", backward_body)
        # Outside the stubs: each of these computes (cuBLAS calls on CUDA). The layer on its PyTorch
        # path against addmm's bare autograd.Function over the same calls is what lora_linear's own
        # Python costs; against the eager step, what the Triton launches cost beyond cuBLAS calls.
        for name, step in baselines.items():
            with providers.torch_path() if "PyTorch path" in name else contextlib.nullcontext():
                row(f"{name} ({'CUDA' if cuda else 'computed on the CPU'}, 64×64)", step)
        profile("F.linear forward+backward", baselines["F.linear forward+backward"])
        with stubs():
            for name, step in dropout_steps.items():
                row(name, step)
            with mock.patch.object(functional, "FUSE_SHRINK", "ahead"):
                row(f"{DROPOUT_STEP}, the shrink ahead (three launches: four by default here, five at 4096→4096)",
                    dropout_steps[DROPOUT_STEP])
    except Stopped as e:
        lines.append(f"INCOMPLETE: {e}")
        write()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.profile:
        print(f"wrote {args.profile}")


if __name__ == "__main__":
    main()
