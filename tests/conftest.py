"""Shared test set-up: backends, the float64 oracle, error measure and tolerances.

With no GPU, Triton's interpreter runs the kernels on CPU tensors; it must be switched on before
Triton compiles anything, so here, before any test module imports lora_kernels.
"""

import atexit
import os
import shutil
import tempfile
from collections import defaultdict

# A fresh compile cache per run: Inductor's on-disk cache can outlive a change to the ops' schema
# and would replay a graph that calls them the old way.
_CACHE = tempfile.mkdtemp(prefix="lora_kernels_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lora_kernels import functional, kernels  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative Frobenius error allowed per dtype. Largest seen on the CPU paths:
# fp64 6e-16, fp32 3.3e-7, fp16 4.3e-4, bf16 4.5e-3; each bound is a few times that, so a real
# bug (a wrong scale, a missed tile, a term dropped) still fails by orders of magnitude.
TOL = {torch.float64: 1e-14, torch.float32: 3e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# Largest relative error seen per (path, dtype, output), printed at the end of the run.
WORST = defaultdict(float)


def record(dtype, errs):
    backend = os.environ.get("LORA_KERNELS_BACKEND", "auto")
    path = f"{backend} ({'cuda' if torch.cuda.is_available() else 'interpreter' if backend == 'triton' else 'cpu'})"
    for name, e in errs.items():
        key = (path, str(dtype).replace("torch.", ""), name)
        WORST[key] = max(WORST[key], e)


TRITON_PASSED = []
# Runs of the kernels so far: the closing count names the tests that did run one (a test of the
# triton backend may route bf16 to the PyTorch path, test the unfused fallback on purpose, or
# launch a stand-in kernel).
LAUNCHES = [0]
_REAL_KERNEL = kernels._lora_matmul_kernel


def _counted(fn):
    def counting(*args, **kwargs):
        LAUNCHES[0] += 1
        return fn(*args, **kwargs)
    return counting


# Triton's own path runs a kernel through its JIT function's run (the interpreter's too); a direct
# launch of a compiled kernel (CUDA only) goes around it, from _launch.
_REAL_KERNEL.fn.run = _counted(_REAL_KERNEL.fn.run)
kernels._keep_mask_kernel.run = _counted(kernels._keep_mask_kernel.run)
_launch = kernels._launch


def _launch_counted(device, grid, args, flags, plan=None):
    if device.type == "cuda" and kernels._lora_matmul_kernel is _REAL_KERNEL:
        LAUNCHES[0] += 1
    return _launch(device, grid, args, flags, plan)


kernels._launch = _launch_counted


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="I/N", help="run only the I-th of N consecutive slices of the collected "
                     "tests (0-based): scripts/gpu_check.sh runs a long file in parallel processes this way")
    parser.addoption("--record-launches", metavar="FILE", help="(under the interpreter) also record every kernel "
                     "launch as a Hopper GPU would make it, into FILE, for `python -m benchmarks.precompile "
                     "--launches-from FILE`: scripts/gpu_check.sh's cache mode compiles the GPU run's tests' kernels")
    parser.addoption("--report-compiles", metavar="FILE", help="write to FILE which kernels Triton compiled in this "
                     "run, by test, and how many it found in its cache: what the GPU run's test shards still "
                     "compile with a carried pack")


def pytest_configure(config):
    report, path = config.getoption("--report-compiles"), config.getoption("--record-launches")
    if report or path:
        from benchmarks import precompile
    if report:  # (the report is written as kernels are heard: a shard stopped by its time limit keeps it)
        listening = precompile.compiles_heard(report)  # (for the whole run)
        heard = listening.__enter__()

        def stop():
            listening.__exit__(None, None, None)
            print("\n" + precompile.compiles_report(heard).split("\n")[0])
        config.add_cleanup(stop)
    if not path:
        return
    if not kernels.INTERPRET:
        raise pytest.UsageError("--record-launches records a GPU's launches from a run under TRITON_INTERPRET=1")
    global _RECORDING
    _RECORDING = True
    recording = precompile.recording_launches()  # (for the whole run)
    launches = recording.__enter__()

    def save():
        recording.__exit__(None, None, None)
        print(f"\nrecorded {precompile.save_launches(path, launches)} kinds of launch ({len(launches)} launches) "
              f"into {path}")
    config.add_cleanup(save)


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    i, n = map(int, shard.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard {shard}: I must be in 0..N-1")
    # Consecutive slices, not every N-th test: one test's parametrizations share compiled kernels,
    # which on a GPU each process compiles for itself.
    lo, hi = i * len(items) // n, (i + 1) * len(items) // n
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = LAUNCHES[0]
    yield
    item.launched_kernels = LAUNCHES[0] > before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call" and outcome.get_result().passed and getattr(item, "launched_kernels", False):
        TRITON_PASSED.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    where = "on CUDA" if torch.cuda.is_available() else "through the interpreter"
    terminalreporter.write_line(f"{len(TRITON_PASSED)} passed tests ran the Triton kernels {where}")
    if not WORST:
        return
    names = sorted({k[2] for k in WORST}, key=["y", "dx", "dA", "dB", "dW", "db"].index)
    rows = sorted({k[:2] for k in WORST})
    lines = ["| path | dtype | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for path, dt in rows:
        cells = [f"{WORST[(path, dt, n)]:.2e}" if (path, dt, n) in WORST else "" for n in names]
        lines.append(f"| {path} | {dt} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "largest relative error vs the float64 reference")
    terminalreporter.write_line(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "accuracy.md"), "w") as f:
            f.write(text + "\n")


def backends():
    """The backends these tests can run here: the PyTorch path always, Triton on a GPU or under
    the interpreter. Tests parametrized with it and id'ed 'triton' count as kernel runs."""
    out = [pytest.param("torch", id="torch")]
    if HAVE_TRITON:
        out.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return out


HAVE_TRITON = kernels.INTERPRET or torch.cuda.is_available()
_RECORDING = False  # (--record-launches)


def bf16_through_kernels():
    """Whether a bf16 call with LORA_KERNELS_BACKEND=triton runs the kernels: on a GPU. Triton's
    interpreter computes bf16 wrong, so here such a call takes the PyTorch path
    (functional.select_backend) and the tests of bf16 through the kernels skip; but not in a
    --record-launches run, which records the launches the call makes on a GPU for them to be
    compiled beforehand, while the call computes on the PyTorch path (that run is no verdict)."""
    return DEVICE == "cuda" or _RECORDING


def not_when_recording():
    """Skip in a --record-launches run, whose every lora_matmul call also runs once as the GPU
    would launch it: a test that counts the calls' launches (and launches nothing) has no place there."""
    if _RECORDING:
        pytest.skip("counts lora_matmul's launches, which a --record-launches run doubles")


def use_triton(monkeypatch):
    """Route lora_linear to the Triton kernels and poison every buffer they write: an element a
    kernel skips stays NaN and fails the test. Returns the shapes of the buffers handed out."""
    if not HAVE_TRITON:
        pytest.skip("the Triton kernels need a GPU, or TRITON_INTERPRET=1 on the CPU")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    shapes = []

    def nan_empty(shape, device, dtype):
        shapes.append(shape)
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    monkeypatch.setattr(kernels, "_empty", nan_empty)
    return shapes


@pytest.fixture(autouse=True)
def _switches_kept():
    """The LORA_KERNELS_* switches as each test found them, whatever it sets: a CLI's main() (the
    benchmarks set LORA_KERNELS_BACKEND) run without monkeypatch once sent every later CPU test
    through Triton's interpreter, and CI's time from 10 to 24 minutes."""
    before = {k: v for k, v in os.environ.items() if k.startswith("LORA_KERNELS_")}
    yield
    for k in [k for k in os.environ if k.startswith("LORA_KERNELS_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", request.param)
    if request.param == "triton":
        use_triton(monkeypatch)
    return request.param


def pytest_generate_tests(metafunc):
    # (unless the test pairs the backend with other arguments itself: see backends_with)
    named = [m.args[0] for m in metafunc.definition.iter_markers("parametrize")]
    named = {n.strip() for ns in named for n in (ns.split(",") if isinstance(ns, str) else ns)}
    if "backend" in metafunc.fixturenames and "backend" not in named:
        metafunc.parametrize("backend", backends(), indirect=True)


def backends_with(values_for):
    """``(backend, value)`` parameters, for ``@pytest.mark.parametrize("backend,NAME", ...,
    indirect=["backend"])``: each available backend with each of ``values_for(backend)`` (id'ed
    ``backend-value``), where a value means something on one backend only."""
    return [pytest.param(b.values[0], v, id=f"{b.id}-{v}", marks=b.marks)
            for b in backends() for v in values_for(b.values[0])]


def seed_of_next_call(torch_seed, backend):
    """The LoRA-dropout seed the next call draws after ``torch.manual_seed(torch_seed)``."""
    torch.manual_seed(torch_seed)
    return int(functional.draw_seed(torch.device(DEVICE), backend))


def make_inputs(lead, K, N, r, dtype, adapter_dtype=None, bias=True, device=DEVICE, seed=0):
    """Fresh random inputs (never zeros), scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    x = rnd(*lead, K)
    W = rnd(N, K, scale=max(K, 1) ** -0.5)
    b = rnd(N) if bias else None
    A = rnd(K, r, scale=max(K, 1) ** -0.5, dt=adapter_dtype)
    B = rnd(r, N, scale=r ** -0.5, dt=adapter_dtype)
    return x, W, b, A, B


def reference(x, W, b, A, B, alpha, dy, base_grads=False):
    """The seed's formula in float64 on the same (already rounded) inputs, with autograd grads."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, b, A, B)]
    x64, W64, b64, A64, B64 = leaves
    y = torch.nn.functional.linear(x64, W64, b64) + alpha * (x64 @ A64 @ B64)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def replicate_like_data_parallel(root, params):
    """What ``nn.parallel.replicate`` does for one device, on CPU: a shallow copy of every module
    (``_replicate_for_data_parallel``), the copy's parameters set as plain tensor attributes
    (``params``: name -> tensor), the children re-linked to their copies."""
    copies = {m: m._replicate_for_data_parallel() for m in root.modules()}
    for name, m in root.named_modules():
        for key, p in m._parameters.items():
            if p is None:
                copies[m]._parameters[key] = None
            else:
                setattr(copies[m], key, params[f"{name}.{key}" if name else key])
        for key, child in m._modules.items():
            copies[m]._modules[key] = None if child is None else copies[child]
    return copies[root]
