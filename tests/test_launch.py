"""The direct launch path (kernels._launch): a launch whose compiled kernel is known skips Triton's
dispatch. Only a GPU runs it for real (tests/test_gpu.py); here its key is checked against
Triton's own specialization rules, and its plumbing against a stand-in compiled kernel."""

import inspect
import types

import pytest
import torch
import triton

from conftest import not_when_recording
from lora_kernels import kernels

INTS = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, 4096, 8192 * 4096, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 1]


def _tensors():
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                   torch.int64)}
    return [t[offset:] for t in base.values() for offset in (0, 1, 2, 4, 8)]


def test_arg_class_determines_triton_specialization():
    """Arguments in one class must get one specialization from Triton's binder, or the direct path
    would run a kernel compiled for another (an int taken as the constant 1, a pointer assumed
    16-byte aligned)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    backends = [BaseBackend]
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        backends.append(CUDABackend)
    except ImportError:
        pass
    values = INTS + [0.0, 0.5, 1.0, 1e300] + _tensors()
    for backend in backends:
        seen = {}
        for v in values:
            spec = native_specialize_impl(backend, v, False, True, True)
            # (a pointer as _launch_key reads it: dtype and address modulo 16)
            cls = ((kernels._DTYPE_OF(v), kernels._MOD_16(kernels._ADDRESS_OF(v))) if isinstance(v, torch.Tensor)
                   else kernels._arg_class(v))
            assert seen.setdefault(cls, spec) == spec, (backend, v, cls, spec, seen[cls])
        # and the classes are not so coarse that they are empty: ints 1, aligned, unaligned, wide
        assert len({kernels._arg_class(v) for v in INTS}) >= 5


class _Compiled(triton.compiler.CompiledKernel):
    run = None  # (a property on the real class, which would load a binary)

    def __init__(self, names, constants):
        self.src = types.SimpleNamespace(fn=types.SimpleNamespace(arg_names=names), constants=constants)
        self.module = None  # (read by the real class's __del__)
        self.function, self.packed_metadata, self.calls = "function", "metadata", []
        self.run = lambda *a: self.calls.append(a)


class _Tuner:
    """Stands in for the autotuner: records Triton-path launches and returns a compiled kernel
    with a config of its own (as the real one returns the kernel for the config it picked)."""

    def __init__(self, names, n_args):
        self.names, self.n_args, self.launches, self.kernels = names, n_args, [], []

    def __getitem__(self, grid):
        def launch(*args, **flags):
            assert len(args) == self.n_args
            config = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, USE_TMA=False, PERSISTENT=False,
                          TMA_STORE=False)
            values = {**flags, **config}
            constants = {(i,): values[name] for i, name in enumerate(self.names) if name in values}
            self.launches.append((grid(config), args, flags))
            self.kernels.append(_Compiled(self.names, constants))
            return self.kernels[-1]
        return launch


M, N = 200, 100


def _direct(monkeypatch):
    """A launch's arguments and flags, the autotuner stood in for (``_Tuner``), and "CUDA device 3"
    whose current stream is 1003: the direct path's setting, on the CPU."""
    names = kernels._lora_matmul_kernel.arg_names
    x = torch.zeros(256, 64)
    args = ((x,) * 8 + (M, N, 64, 16, 64, 256, 128, 64) + (64, 1) * 7 + (1.5, 1.0, 2.0, 1.0, x, 0.0, 0, 0)
            + (x, x, x, 0) + (64, 1) * 3 + (0, 1.0))
    assert len(args) == names.index("HAS_LOWRANK")  # every runtime argument
    tuner = _Tuner(names, len(args))
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", tuner)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "FAST_LAUNCH", True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    flags = dict(HAS_LOWRANK=True, FUSE_SHRINK=0, HAS_BIAS=False, DROPOUT=0, DROP_WIDE=False, PAIRED=False,
                 X_TRANSPOSED=False, W_TRANSPOSED=False, ALLOW_TMA=False, ALLOW_TMA_STORE=False,
                 DOT_DTYPE=triton.language.float32, ACC_DTYPE=triton.language.float32, INPUT_PRECISION="ieee",
                 BLOCK_R=16)
    grid = lambda meta: (kernels._cdiv(M, meta["BLOCK_M"]) * kernels._cdiv(N, meta["BLOCK_N"]), 1)
    return tuner, torch.device("cuda", 3), grid, args, flags


def test_direct_launch_replays_the_kernel_its_key_compiled(monkeypatch):
    tuner, cuda, grid, args, flags = _direct(monkeypatch)
    names, n_args, x = tuner.names, tuner.n_args, args[0]

    kernels._launch(cuda, grid, args, flags)  # first: Triton's path
    assert len(tuner.launches) == 1
    kernel = tuner.kernels[0]
    args2 = args[:8] + (M + 16,) + args[9:]  # another M of the same classes and M_KEY
    kernels._launch(cuda, grid, args2, flags)  # second: the compiled kernel, directly
    assert len(tuner.launches) == 1 and len(kernel.calls) == 1
    # (and another tensor of the dtype and alignment: a layer's next batch)
    kernels._launch(cuda, grid, (torch.zeros(256, 64),) + args2[1:], flags)
    assert len(tuner.launches) == 1 and len(kernel.calls) == 2
    kernel.calls.pop()
    call = kernel.calls[0]
    tiles = kernels._cdiv(M + 16, 64) * kernels._cdiv(N, 32)
    assert call[:9] == (tiles, 1, 1, 1003, "function", "metadata", None, None, None)
    assert call[9:9 + n_args] == args2
    # then every constexpr, in the signature's order, with the config the kernel was compiled for
    tail = call[9 + n_args:]
    assert len(tail) == len(names) - n_args
    assert dict(zip(names[n_args:], tail)) == {**flags, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32,
                                                 "GROUP_M": 8, "USE_TMA": False, "PERSISTENT": False,
                                                 "TMA_STORE": False}

    # Anything that selects another kernel goes back through Triton: an unaligned pointer, another
    # dtype, an int that becomes 1 or leaves a multiple of 16, another autotune size key or flag,
    # another device.
    misses = [
        (cuda, args[:1] + (x.view(-1)[1:],) + args[2:], flags),
        (cuda, args[:1] + (x.double(),) + args[2:], flags),
        (cuda, args[:10] + (1,) + args[11:], flags),
        (cuda, args[:16] + (65,) + args[17:], flags),
        (cuda, args[:13] + (512,) + args[14:], flags),
        (cuda, args, {**flags, "HAS_BIAS": True}),
        (cuda, args, {**flags, "PAIRED": True}),
        (cuda, args, {**flags, "ALLOW_TMA_STORE": True}),
        (cuda, args[:-11] + (x.view(-1)[1:],) + args[-10:], flags),  # the second product's X unaligned
        (torch.device("cuda", 0), args, flags),
    ]
    for i, (device, a, f) in enumerate(misses):
        kernels._launch(device, grid, a, f)
        assert len(tuner.launches) == 2 + i, i
    assert len(kernel.calls) == 1

    # A compile option Triton reads on every launch, set after the kernel was cached: another kernel.
    count = len(tuner.launches)
    monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    kernels._launch(cuda, grid, args, flags)
    assert len(tuner.launches) == count + 1 and len(kernel.calls) == 1
    monkeypatch.setattr(triton.knobs.runtime, "debug", False)
    kernels._launch(cuda, grid, args, flags)
    assert len(kernel.calls) == 2  # and back

    # Hooks on Triton's launches, ROCm (whose Triton also specializes pointers on their storage's
    # size), or the switch off: Triton's path every time.
    count = len(tuner.launches)
    for name, value in [("_hooked", lambda: True), ("_DIRECT_OK", False), ("FAST_LAUNCH", False)]:
        with monkeypatch.context() as m:
            m.setattr(kernels, name, value)
            kernels._launch(cuda, grid, args, flags)
    assert len(tuner.launches) == count + 3 and len(kernel.calls) == 2


def test_a_plan_keeps_the_launch_key_it_stands_for(monkeypatch):
    """A call's plan keeps its launch's key (``_launch_key``), computed on its first launch: later
    launches of the plan go direct without computing it again."""
    tuner, cuda, grid, args, flags = _direct(monkeypatch)
    computed, key_of = [], kernels._launch_key
    monkeypatch.setattr(kernels, "_launch_key", lambda *a: computed.append(a) or key_of(*a))
    plan = kernels._Plan()
    plan.key = None
    kernels._launch(cuda, grid, args, flags, plan)  # Triton's path: the key computed and kept
    assert len(computed) == 1 and plan.key == key_of(cuda, flags, args) and len(tuner.launches) == 1
    kernels._launch(cuda, grid, args, flags, plan)  # direct, with the plan's key
    assert len(computed) == 1 and len(tuner.launches) == 1 and len(tuner.kernels[0].calls) == 1
    kernels._launch(cuda, grid, args, flags)  # without a plan: computed (the same key, so direct)
    assert len(computed) == 2 and len(tuner.kernels[0].calls) == 2


def _described(a):
    # A launch argument as the kernel sees it: a tensor's layout, dtype and alignment; a number's type and value.
    if isinstance(a, torch.Tensor):
        return tuple(a.shape), a.stride(), a.dtype, a.data_ptr() % 16
    return type(a), a


def _launched(calls, monkeypatch, shared):
    """What ``lora_matmul`` hands ``_launch`` for each call (the grid at two configs, and the launch
    key the plan keeps, as the direct path makes it), its plans kept across the calls (``shared``)
    or made anew for each."""
    seen = []
    def record(device, grid, args, flags, plan):
        grids = [grid(dict(BLOCK_M=bm, BLOCK_N=bn, PERSISTENT=p)) for bm, bn, p in ((32, 32, False), (64, 16, True))]
        if plan.key is None:
            plan.key = kernels._launch_key(device, flags, args)
        seen.append((tuple(map(_described, args)), flags, grids, plan.key))
    monkeypatch.setattr(kernels, "_launch", record)
    monkeypatch.setattr(kernels, "_PLANS", {})
    for setting, call in calls:
        if not shared:
            kernels._PLANS.clear()
        with monkeypatch.context() as m:
            setting(m)
            call()
    return seen


def test_a_plan_serves_only_calls_described_alike(monkeypatch):
    """``lora_matmul`` derives a launch's ints, flags and grid once per description of its call
    (``_plan``) and reuses them: each call below differs from the first in one thing the launch
    depends on, and each gets what it gets with no plan made before it."""
    not_when_recording()
    # The same settings wherever it runs: through the interpreter (CI) or compiled beside a GPU,
    # where a CPU device has no TMA and the split chunk is the GPU's (the sixth GPU run's smoke
    # step failed on that: two more calls launched alike).
    monkeypatch.setattr(kernels, "_tma_available", lambda device: True)
    monkeypatch.setattr(kernels, "SPLIT_CHUNK", 64)
    g = torch.Generator().manual_seed(5)
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)
    M, K, N, r = 64, 48, 32, 8
    x, w, L, R, b = randn(M, K), randn(K, N), randn(M, r), randn(r, N), randn(N)
    A, seed = randn(K, r), torch.tensor(7)
    odd = randn(M * K + 1)[1:].view(M, K)  # x's layout 4 bytes off 16-byte alignment
    tall, thin = randn(360, K), randn(360, 4)  # a reduction over 360 (split, as dA's over the tokens)

    def product(x=x, w=w, lowrank=(L, R), bias=b, **kw):
        kw = {"out_dtype": x.dtype, "dot_dtype": x.dtype, "r_scale": 2.0, **kw}
        return lambda: kernels.lora_matmul(x, w, lowrank=lowrank, bias=bias, **kw)

    plain = dict(lowrank=None, bias=None)
    none = lambda m: None
    calls = [(none, c) for c in [
        product(),
        product(x=x.t().contiguous().t()), product(w=w.t().contiguous().t()), product(x=x[:40]), product(x=odd),
        product(x=x.double(), w=w.double(), lowrank=(L.double(), R.double()), bias=b.double()),
        product(x=x.half(), w=w.half(), lowrank=(L.half(), R.half()), bias=b.half(), r_scale=2.0 ** 80),
        product(x=x.half(), w=w.half(), lowrank=(L.half(), R.half()), bias=b.half()),
        product(bias=None), product(bias=randn(2 * N)[::2]), product(lowrank=None),
        product(lowrank=(L.t().contiguous().t(), R)), product(lowrank=(L, R.t().contiguous().t())),
        product(lowrank=(L[:, :4], R[:4])), product(out_dtype=torch.float64),
        product(lowrank=(kernels.Shrink(A, 0.5, torch.float32), R)),
        product(lowrank=(kernels.Shrink(A, 0.5, torch.float16), R)),
        product(dropout=("x", seed, 0.1, K, 1)), product(dropout=("x", seed, 0.1, 1, K)),
        product(dropout=("lowrank", seed, 0.1, K, 1)),
        product(out_shape=(2, M // 2, N)),
        product(x=tall.t(), w=thin, **plain), product(x=tall.t(), w=thin, **plain, scale=3.0),
        product(x=tall.t(), w=thin, **plain, pair=(randn(N, 360), randn(360, 4)), pair_scale=0.5),
        product(x=randn(M, 0), w=randn(0, N)), product(w=randn(K, 0)), product(x=randn(0, K)),
    ]]
    calls += [(lambda m: m.setattr(kernels, "TMA", False), product()),
              (lambda m: m.setattr(kernels, "SPLIT_CHUNK", 32), product(x=tall.t(), w=thin, **plain)),
              (lambda m: m.setattr(kernels, "_num_sms", lambda device: 2), product(x=tall.t(), w=thin, **plain)),
              (lambda m: m.setattr(kernels, "_tma_available", lambda device: False), product()),
              (lambda m: m.setattr(kernels, "_input_precision", lambda dtype: "tf32"), product()),
              (none, product(lowrank=(randn(M, 64), randn(64, N)))),
              (lambda m: m.setattr(kernels, "FUSE_MAX_RANK", 32), product(lowrank=(randn(M, 64), randn(64, N)))),
              (none, product())]
    made = []
    plan = kernels._plan
    monkeypatch.setattr(kernels, "_plan", lambda *a: made.append(a) or plan(*a))
    shared = _launched(calls, monkeypatch, shared=True)
    assert len(made) < len(calls)  # (some plans were reused: the first call's by the last)
    assert shared == _launched(calls, monkeypatch, shared=False)
    # and the calls' launches differ (but the last's, as the first's, and TMA off either way)
    assert len({repr(launch) for launch in shared}) == len(shared) - 2


def test_an_fp16_alpha_goes_on_the_sum_only_within_its_range(monkeypatch):
    """In fp16 the launch passes scale/alpha, 1 and alpha as (scale, r_scale, sum_scale) for
    2^-64 <= |alpha| <= 2^77 (``_SUM_SCALED``), else alpha as r_scale: a rule per call, not per plan."""
    seen = []
    monkeypatch.setattr(kernels, "_launch", lambda device, grid, args, flags, plan: seen.append(args))
    x, w, L, R = (torch.randn(*s).half() for s in ((16, 32), (32, 16), (16, 4), (4, 16)))
    names = ("scale", "r_scale", "sum_scale")
    at = [kernels._ARG_NAMES.index(n) for n in names]
    for alpha, dtype in [(2.0, torch.float16), (2.0 ** 80, torch.float16), (-2.0 ** -70, torch.float16),
                         (-2.0 ** 77, torch.float16), (2.0, torch.float32)]:
        kernels.lora_matmul(x.to(dtype), w.to(dtype), scale=3.0, lowrank=(L.to(dtype), R.to(dtype)), r_scale=alpha,
                            out_dtype=dtype, dot_dtype=dtype)
        on_sum = dtype == torch.float16 and 2.0 ** -64 <= abs(alpha) <= 2.0 ** 77
        assert [seen[-1][i] for i in at] == ([3.0 / alpha, 1.0, alpha] if on_sum else [3.0, alpha, 1.0]), alpha


def test_fresh_buffers_off_alignment_get_no_tma_store_and_no_plan_key(monkeypatch):
    """A plan takes the buffers it allocates as 16-byte aligned (PyTorch's CUDA allocators align to
    512 bytes); an allocator that did otherwise gets a launch without the TMA store, keyed anew."""
    not_when_recording()
    seen = []
    monkeypatch.setattr(kernels, "_launch", lambda device, grid, args, flags, plan: seen.append((flags, plan)))
    monkeypatch.setattr(kernels, "_tma_available", lambda device: True)
    x, w = torch.randn(64, 32), torch.randn(32, 64)
    kernels.lora_matmul(x, w, out_dtype=torch.float32, dot_dtype=torch.float32)
    off = lambda shape, device, dtype: torch.empty(64 * 64 + 1, dtype=dtype)[1:].view(shape)
    monkeypatch.setattr(kernels, "_empty", off)
    kernels.lora_matmul(x, w, out_dtype=torch.float32, dot_dtype=torch.float32)
    (aligned, plan), (unaligned, none) = seen
    assert aligned["ALLOW_TMA_STORE"] and isinstance(plan, kernels._Plan) and none is None
    assert unaligned == {**aligned, "ALLOW_TMA_STORE": False}


@pytest.mark.parametrize("call", ["x", "x, paired", "lowrank"])
def test_the_mask_takes_its_64_bit_form_from_the_first_offset_past_2_32(monkeypatch, call):
    """_keep hashes an element's offset i·si + j·sj in 32-bit arithmetic while every offset of the
    masked operand (the product's X, dA's xᵀ beside dB, or dX's output) is below 2^32: the launcher
    asks for the 64-bit form (DROP_WIDE) exactly when the last one reaches it. Two rows, so the last
    offset is si + (cols - 1)·sj."""
    not_when_recording()
    seen = []
    monkeypatch.setattr(kernels, "_launch", lambda device, grid, args, flags, plan: seen.append(flags))
    x, w, seed = torch.randn(2, 24), torch.randn(24, 16), torch.tensor(3)
    masked = "lowrank" if call == "lowrank" else "x"
    cols = 16 if masked == "lowrank" else 24
    for last, wide in [(2**32 - 1, False), (2**32, True), (2**31, False), (2**40, True)]:
        sj = 3
        dropout = (masked, seed, 0.1, last - (cols - 1) * sj, sj)
        kw = dict(out_dtype=torch.float32, dot_dtype=torch.float32, dropout=dropout)
        if call == "lowrank":
            kw["lowrank"] = (torch.randn(2, 4), torch.randn(4, 16))
        if call == "x, paired":
            kw["pair"] = (torch.randn(16, 24), w)
        kernels.lora_matmul(x, w, **kw)
        assert seen.pop()["DROP_WIDE"] == wide, (last, wide)
    kernels.lora_matmul(x, w, out_dtype=torch.float32, dot_dtype=torch.float32)
    assert not seen.pop()["DROP_WIDE"]
    # (the integer threshold takes p in [0, 1]; the last offset is the largest for strides >= 0)
    for p, si in [(-0.1, 24), (1.5, 24), (float("nan"), 24), (0.1, -24)]:
        with pytest.raises(AssertionError, match="dropout's p is in"):
            kernels.lora_matmul(x, w, out_dtype=torch.float32, dot_dtype=torch.float32, dropout=("x", seed, p, si, 1))
    assert not seen


def test_the_autotuners_key_holds_every_flag_that_changes_the_tiles_work(monkeypatch):
    """A flag the plan sets that changes a tile's K loop or its registers (which operands, layouts,
    TMA, the mask's hash and its width, the rank's block) is in the autotuner's key, so a launch
    never reuses tiles timed for other work: outside it only the bias (the epilogue's one vector),
    the dtypes (Triton's autotuner keys on the tensors' own) and the fp32 input precision (a
    global setting, not per launch). A flag added later must be placed on one side or the other."""
    monkeypatch.setattr(kernels, "_launch", lambda *args: None)  # (CPU tensors: on a GPU machine, not launched)
    kernels.lora_matmul(torch.randn(8, 32), torch.randn(32, 16), out_dtype=torch.float32, dot_dtype=torch.float32)
    flags = {name for plan in kernels._PLANS.values() if not plan.empty for name in plan.flags}
    assert "DROP_WIDE" in flags
    assert flags - set(kernels._lora_matmul_kernel.keys) == {"HAS_BIAS", "DOT_DTYPE", "ACC_DTYPE", "INPUT_PRECISION"}


def test_each_argument_reaches_the_kernel_parameter_of_its_name(monkeypatch):
    """The plan packs sizes and strides by position alone: each must land on the kernel parameter
    of its name. Operands with sizes and strides all apart (views: transposed, strided, a strided
    bias), each kind of call: L given with bias and dropout on x, the shrink fused, a paired product."""
    seen = []
    monkeypatch.setattr(kernels, "_launch", lambda device, grid, args, flags, plan: seen.append(
        dict(zip(kernels._ARG_NAMES, args))))
    M, K, N, R, M2 = 24, 40, 100, 8, 16  # (sizes and their powers of two apart: M_KEY 32, N_KEY 128, K_KEY 64)
    # (every stride of the first call different from every other)
    x, w = torch.randn(M, 2 * K)[:, ::2], torch.randn(N, 3 * K)[:, ::3].t()
    L, Rw, bias = torch.randn(M, 5 * R)[:, ::5], torch.randn(R, 7 * N)[:, ::7], torch.randn(4 * N)[::4]
    seed = torch.tensor(7)
    out = kernels.lora_matmul(x, w, scale=0.5, lowrank=(L, Rw), r_scale=3.0, bias=bias, dropout=("x", seed, 0.25, K, 1),
                              out_dtype=torch.float32, dot_dtype=torch.float32)
    got = seen.pop()
    assert all(got[name] is t for name, t in [("x_ptr", x), ("w_ptr", w), ("l_ptr", L), ("r_ptr", Rw),
                                              ("bias_ptr", bias), ("out_ptr", out), ("seed_ptr", seed)])
    assert {k: got[k] for k in ("M", "N", "K", "R", "K_PER_SPLIT", "M_KEY", "N_KEY", "K_KEY")} == dict(
        M=M, N=N, K=K, R=R, K_PER_SPLIT=K, M_KEY=32, N_KEY=128, K_KEY=64)
    assert [got[f"stride_{s}"] for s in ("xm", "xk", "wk", "wn", "lm", "lr", "rr", "rn", "os", "om", "on", "b")] == [
        2 * K, 2, 3, 3 * K, 5 * R, 5, 7 * N, 7, 0, N, 1, 4]
    assert (got["scale"], got["r_scale"], got["sum_scale"], got["p_drop"], got["drop_si"], got["drop_sj"]) == (
        0.5, 3.0, 1.0, 0.25, K, 1)
    A = torch.randn(K, 3 * R)[:, ::3]
    out, S = kernels.lora_matmul(x, w, lowrank=(kernels.Shrink(A, 2.0, torch.float32), Rw), out_dtype=torch.float32,
                                 dot_dtype=torch.float32)
    got = seen.pop()
    assert got["l_ptr"] is A and got["s_ptr"] is S and got["out_ptr"] is out and got["s_scale"] == 2.0
    assert (got["R"], got["stride_lm"], got["stride_lr"], got["stride_sm"], got["stride_sr"]) == (R, 3 * R, 3, R, 1)
    x2 = torch.randn(M2, 5 * K)[:, ::5]
    out, out2 = kernels.lora_matmul(x, w, pair=(x2, w), pair_scale=4.0, out_dtype=torch.float32,
                                    dot_dtype=torch.float32)
    got = seen.pop()
    assert got["x2_ptr"] is x2 and got["w2_ptr"] is w and got["out2_ptr"].data_ptr() == out2.data_ptr()
    assert (got["M2"], got["M_KEY"], got["scale2"]) == (M2, 64, 4.0)
    # (out2 is (x2 w)ᵀ, contiguous (N, M2): the kernel writes its transpose, rows 1 apart)
    assert [got[f"stride_{s}"] for s in ("x2m", "x2k", "w2k", "w2n", "o2s", "o2m", "o2n")] == [5 * K, 5, 3, 3 * K, 0, 1, M2]


def test_launcher_passes_every_runtime_argument_then_the_constexprs(monkeypatch):
    """The direct path appends the constexprs to the launcher's arguments: the launcher's runtime
    arguments must be exactly the kernel's parameters before its first constexpr, in order."""
    raw = kernels._lora_matmul_kernel.fn.fn
    params = list(inspect.signature(raw).parameters.values())
    constexpr = [p.annotation is triton.language.constexpr for p in params]
    first = constexpr.index(True)
    assert all(constexpr[first:])
    seen = []
    monkeypatch.setattr(kernels, "_launch", lambda device, grid, args, flags, plan: seen.append((args, flags)))
    x, w = torch.randn(8, 32), torch.randn(32, 16)
    kernels.lora_matmul(x, w, lowrank=(torch.randn(8, 4), torch.randn(4, 16)), bias=torch.randn(16),
                        out_dtype=torch.float32, dot_dtype=torch.float32)
    args, flags = seen[0]
    assert len(args) == first
    # _launch_key sorts the arguments by their names: pointers are tensors, floats, ints the rest
    kinds = [torch.Tensor if n.endswith("_ptr") else float if n in kernels._FLOAT_ARGS else int
             for n in kernels._ARG_NAMES]
    assert [type(a) if type(a) in (int, float) else torch.Tensor for a in args] == kinds
    assert set(flags) <= {p.name for p in params[first:]}
    assert [p.name for p in params[kernels._SIZE_KEY]] == ["M_KEY", "N_KEY", "K_KEY"]  # the slice _launch keys on
    # A dropout p given as an int is passed as a float: Triton would specialize an int (1 as a
    # constant, 0 as i32), which the key, blind to floats, would not tell apart.
    for p in (0, 1):
        kernels.lora_matmul(x, w, dropout=("x", torch.tensor(7), p, 32, 1), out_dtype=torch.float32,
                            dot_dtype=torch.float32)
        assert type(seen[-1][0][kernels._ARG_NAMES.index("p_drop")]) is float


AUTOTUNE_CACHE = r"""
import sys
from triton.runtime import driver
from benchmarks.precompile import _StandInDriver
from lora_kernels import kernels
driver.set_active(_StandInDriver(90))  # (the disk cache's key names the GPU target)
tuner = kernels._lora_matmul_kernel
print(tuner.cache_results)
if not tuner.cache_results:
    sys.exit()
configs, key, timed = kernels.hopper_configs()[:3], ("M_KEY", 8192, "N_KEY", 4096), []

def bench():  # stands in for timing each config: the last one is the fastest
    timed.append(key)
    tuner.configs_timings = {c: [float(3 - i)] * 3 for i, c in enumerate(configs)}
    tuner.cache[key] = min(tuner.configs_timings, key=tuner.configs_timings.get)

assert tuner.check_disk_cache(key, configs, bench) is False and len(timed) == 1  # timed, then written
tuner.cache.clear()  # as in a new process
assert tuner.check_disk_cache(key, configs, bench) is True and len(timed) == 1  # read back, not timed
assert tuner.cache[key].all_kwargs() == configs[-1].all_kwargs()
assert tuner.check_disk_cache(key, configs[:2], bench) is False and len(timed) == 2  # other candidates: timed
print("read back")
"""


@pytest.mark.parametrize("setting", ["1", "0"])
def test_autotune_timings_are_kept_on_disk(tmp_path, setting):
    """With LORA_KERNELS_AUTOTUNE_CACHE unset (or 1), the autotuner keeps its timings in Triton's
    cache, and a new process reads its choice back instead of timing the candidates again (a GPU is
    needed to time them; here a stand-in does, with Triton's own disk-cache code); other
    candidates are timed anew. With 0, nothing is kept. (Triton never caches under its interpreter.)"""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=root, LORA_KERNELS_AUTOTUNE_CACHE=setting)
    done = subprocess.run([sys.executable, "-c", AUTOTUNE_CACHE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == (["True", "read", "back"] if setting == "1" else ["False"])


def test_launches_switch_device_only_where_the_current_one_differs(monkeypatch):
    """Triton launches on the current CUDA device: a launch on another GPU's tensors switches to it
    for the launch; on the current device (every launch of a model on one GPU) no switch is made."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    switch = kernels._on_device(torch.device("cuda", 1))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1
    assert not isinstance(kernels._on_device(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(kernels._on_device(torch.device("cpu")), torch.cuda.device)


def test_launches_through_tritons_dispatch_take_turns(monkeypatch):
    """Triton's autotuner keeps a call's arguments on itself while it tunes and clears them when
    any call ends, so threads (DataParallel's replicas) must not be inside it at once: launches
    through Triton's dispatch are serialized (here on the CPU, where every launch takes it)."""
    import threading
    import time
    inside, most = [0], [0]
    lock = threading.Lock()

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.002)  # long enough for the other threads to arrive
                with lock:
                    inside[0] -= 1
            return run

    monkeypatch.setattr(kernels, "_lora_matmul_kernel", Kernel())
    x = torch.randn(8, 16)
    threads = [threading.Thread(target=lambda: [kernels.lora_matmul(x, x.t(), out_dtype=x.dtype, dot_dtype=x.dtype)
                                                for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


SWITCHES = """
from lora_kernels import functional, kernels
print(functional.FUSE_SHRINK, functional.TORCH_BELOW, kernels.TMA, kernels.FAST_LAUNCH, kernels.AUTOTUNE,
      kernels.COMPILE_THREADS, len(kernels._lora_matmul_kernel.configs))
"""


def _import_with(env):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("LORA_KERNELS_")}
    return subprocess.run([sys.executable, "-c", SWITCHES], cwd=root, env={**base, "PYTHONPATH": root, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("env,expected", [
    ({}, "auto 0 True True True"),
    ({"LORA_KERNELS_FUSE_SHRINK": "0", "LORA_KERNELS_TMA": "0", "LORA_KERNELS_FAST_LAUNCH": "0",
      "LORA_KERNELS_AUTOTUNE": "0", "LORA_KERNELS_COMPILE_THREADS": "3", "LORA_KERNELS_TORCH_BELOW": "2**37"},
     "0 137438953472 False False False 3"),
    ({"LORA_KERNELS_FUSE_SHRINK": "1"}, "1 0 True True True"),
    ({"LORA_KERNELS_FUSE_SHRINK": " Ahead "}, "ahead 0 True True True"),
], ids=["unset", "all-set", "fuse-1", "fuse-ahead"])
def test_switches_are_read_from_the_environment_at_import(env, expected):
    """docs/usage.md's environment variables, as a user sets them (before the import), reach the
    switches the code reads (the tests elsewhere set the module attributes)."""
    import os
    done = _import_with(env)
    assert done.returncode == 0, done.stderr[-3000:]
    *switches, configs = done.stdout.split()
    # (compile threads by default: the CPUs the process may use, within a container's quota, at most 16)
    cpus = len(os.sched_getaffinity(0))
    expected += "" if "LORA_KERNELS_COMPILE_THREADS" in env else f" {min(16, cpus, kernels._cpu_quota() or cpus)}"
    assert " ".join(switches) == expected
    # (LORA_KERNELS_AUTOTUNE=0: the one fixed tile, listed twice so that the autotuner prunes it)
    assert (configs == "2") == (env.get("LORA_KERNELS_AUTOTUNE") == "0") and int(configs) >= 2


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_compile_threads_setting_is_named(value):
    done = _import_with({"LORA_KERNELS_COMPILE_THREADS": value})
    assert done.returncode != 0 and "LORA_KERNELS_COMPILE_THREADS must be a whole number" in done.stderr


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_a_bad_fuse_shrink_setting_is_named(value):
    """A typo would otherwise mean "auto" without a word."""
    done = _import_with({"LORA_KERNELS_FUSE_SHRINK": value})
    assert done.returncode != 0 and "LORA_KERNELS_FUSE_SHRINK must be auto, 0, 1 or ahead" in done.stderr


def test_a_bad_torch_below_setting_is_named_at_import():
    done = _import_with({"LORA_KERNELS_TORCH_BELOW": "2^37"})
    assert done.returncode != 0 and "LORA_KERNELS_TORCH_BELOW must be a whole number" in done.stderr


@pytest.mark.parametrize("text, cpus", [("200000 100000\n", 2), ("50000 100000", 1), ("max 100000", None),
                                        ("", None), ("garbled", None)])
def test_compile_threads_respect_a_containers_cpu_quota(tmp_path, text, cpus):
    """cgroup v2's cpu.max ("QUOTA PERIOD", or "max") bounds the default compile threads: a pod
    limited to 2 CPUs sees every core of its node in its affinity mask."""
    from lora_kernels import kernels
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert kernels._cpu_quota(str(path)) == cpus
    assert kernels._cpu_quota(str(tmp_path / "missing")) is None
