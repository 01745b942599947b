"""Every tile config the GPU autotuner may pick, checked numerically on the layer's products.

The GPU test suite runs one fixed config (LORA_KERNELS_AUTOTUNE=0) and the interpreter another, so
without this file the configs users get would only meet the benchmark's check. Its own file so
that scripts/gpu_check.sh gives it shards of its own: on a GPU each config is compiled here.
"""

import os
import re

import pytest
import torch

import lora_kernels
from conftest import DEVICE, TOL, make_inputs, rel_err, seed_of_next_call, use_triton
from lora_kernels import functional, kernels
from test_lora_linear import check_all, tma_stores

# The layer's sizes here (48 out-features: partial N tiles, and the paired dA and dB few enough to
# split the 600 tokens). scripts/gpu_check.sh compiles for exactly these ahead of the GPU run.
TOKENS, IN_FEATURES, OUT_FEATURES = 600, 64, 48


class EveryConfig:
    """Stands in for the autotuned kernel: runs each launch once with every tile config the GPU
    autotuner would try there (pruned as it prunes them), each into NaN-poisoned outputs, checks
    that they all agree, and leaves the last one's result for the caller. A launch with configs
    that write non-finite values or disagree fails naming every one of them (on the H200 a
    NaN-writing config was reported without its name: the first failure stopped the check)."""

    def __init__(self, kernel, dtype, configs):
        self.kernel, self.tol, self.configs = kernel, TOL[dtype], configs
        self.tiles, self.split = set(), False

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            self.split |= named["K_PER_SPLIT"] < named["K"]
            outputs = ([named["out_ptr"]] + ([named["s_ptr"]] if kwargs["FUSE_SHRINK"] else [])
                       + ([named["out2_ptr"]] if kwargs["PAIRED"] else []))
            first, wrong = None, []
            configs = kernels._prune(self.configs, named, **kwargs)
            kernels.compile_configs(self.kernel.fn, args, kwargs, configs)  # (on a GPU: all at once, on threads)
            for config in configs:
                name = kernels.tile_name(config.all_kwargs())
                for out in outputs:
                    out.fill_(float("nan"))
                self.kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
                self.tiles.add(name)
                got = [out.clone() for out in outputs]
                if not all(torch.isfinite(g).all() for g in got):
                    wrong.append(f"{name}: non-finite values")
                    continue
                if first is None:
                    first = got  # (the first config that writes finite values is the others' yardstick)
                differs = max(rel_err(a, b) for a, b in zip(got, first))
                if not differs < self.tol:
                    wrong.append(f"{name}: differs by {differs:.1e}")
            launch = {k: v for k, v in kwargs.items() if k in ("HAS_LOWRANK", "FUSE_SHRINK", "PAIRED", "DOT_DTYPE")}
            assert not wrong, (f"{len(wrong)} of {len(configs)} configs wrong at M={named['M']} N={named['N']} "
                               f"K={named['K']} R={named['R']} {launch}: " + "; ".join(wrong))
        return run


def test_every_config_names_each_config_that_writes_nan_or_disagrees(monkeypatch):
    """The check itself (a stub kernel, no Triton): of four configs, one that leaves its output
    unwritten (NaN) and one that computes another value are both named, with the launch's sizes."""
    import types
    configs = kernels.hopper_configs()[:4]
    names = [kernels.tile_name(c.all_kwargs()) for c in configs]
    out = torch.empty(4, 4)

    class Fn:  # what EveryConfig calls: fn[grid](*args, **flags, **config)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                name = kernels.tile_name(kwargs)
                if name != names[1]:  # (names[1] writes nothing: its output stays NaN)
                    out.fill_(1.5 if name == names[2] else 1.0)
            return launch

    kernel = types.SimpleNamespace(fn=Fn(), arg_names=["out_ptr", "M", "N", "K", "R", "K_PER_SPLIT"])
    monkeypatch.setattr(kernels, "_prune", lambda configs, named, **kwargs: configs)
    monkeypatch.setattr(kernels, "compile_configs", lambda *args: None)
    with pytest.raises(AssertionError) as failed:
        EveryConfig(kernel, torch.float32, configs)[(1,)](out, 4, 4, 8, 2, 8, HAS_LOWRANK=False,
                                                          FUSE_SHRINK=False, PAIRED=False)
    message = str(failed.value)
    assert message.startswith("2 of 4 configs wrong at M=4 N=4 K=8 R=2"), message
    assert f"{names[1]}: non-finite values" in message and f"{names[2]}: differs by 5.0e-01" in message


def _spy_on_every_launch(monkeypatch, dtype, fuse):
    """From here on, every launch runs every config the GPU autotuner may pick; return the spy."""
    use_triton(monkeypatch)
    monkeypatch.setattr(functional, "FUSE_SHRINK", fuse)
    monkeypatch.setattr(kernels, "SPLIT_CHUNK", kernels.GPU_SPLIT_CHUNK)  # every BLOCK_K divides it
    spy = EveryConfig(kernels._lora_matmul_kernel, dtype, kernels.hopper_configs())
    monkeypatch.setattr(kernels, "_lora_matmul_kernel", spy)
    # Every launch through the spy: on a GPU a kernel already compiled is otherwise launched directly.
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
    return spy


def _every_config(monkeypatch, dtype, fuse):
    """Run the layer's forward and backward with every config at each launch; return the spy."""
    spy = _spy_on_every_launch(monkeypatch, dtype, fuse)
    check_all(make_inputs((TOKENS,), IN_FEATURES, OUT_FEATURES, 16, dtype), 0.75, dtype, train_base=True)
    return spy


@pytest.mark.triton
@pytest.mark.parametrize("dtype_name,fuse", [("float16", "0"), ("float32", "1")],
                         ids=["fp16-separate-shrink", "fp32-fused-shrink"])
def test_every_autotune_config(dtype_name, fuse, monkeypatch):
    """Every tile config the autotuner may pick on a GPU, square or not, TMA or pointer loads, a
    program per tile or a persistent grid (here at most 8 programs: the CPU's "SMs"), for each of the
    layer's products (transposed views and split reductions among them), gives the reference's
    numbers: the GPU suite itself runs one fixed config, the interpreter another. The persistent
    configs write by a TMA store every output whose launch allows one (S, y, dS, dX: 600 tokens, 48
    out-features, partial tiles at both edges, which the copy clips), by pointers the paired dA
    with dB and a split's partial sums."""
    dtype = getattr(torch, dtype_name)
    stores = tma_stores(monkeypatch)
    spy = _every_config(monkeypatch, dtype, fuse)
    assert any(" tma" in t for t in spy.tiles) and any(" tma" not in t for t in spy.tiles)
    # programs looping over several tiles, stored by TMA or (paired, split) by pointers
    assert any(t.endswith(" persistent tma-store") for t in spy.tiles) and any(t.endswith(" persistent") for t in spy.tiles)
    assert all(" persistent" in t for t in spy.tiles if t.endswith(" tma-store"))
    if stores is not None:  # (the interpreter's TMA stores: the last row block, 88 of 128 or 256 rows, among them)
        assert stores and max(row for row, _ in stores) == 512
    assert spy.split  # a split reduction among the products
    assert any(t.startswith(("128x64", "64x128", "128x32")) for t in spy.tiles)  # non-square among them
    assert any(f"x{kernels.DEEP_K} " in t for t in spy.tiles)  # the thin outputs' deep tiles


@pytest.mark.triton
@pytest.mark.parametrize("fuse", ["0", "1"], ids=["separate-shrink", "fused-shrink"])
def test_every_autotune_config_drops_the_same_elements(fuse, monkeypatch):
    """LoRA dropout's masks (on x in the shrink and in dA, on dX's low-rank term) in every tile
    config, the deep ones among them: each mask is a function of the element's position, so every
    tile shape must drop the same elements, those of the float64 reference with the same mask."""
    p, alpha = 0.3, 0.75
    spy = _spy_on_every_launch(monkeypatch, torch.float32, fuse)
    x, W, b, A, B = make_inputs((TOKENS,), IN_FEATURES, OUT_FEATURES, 16, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(7)
    y = lora_kernels.lora_linear(leaves[0], W, b, leaves[1], leaves[2], alpha, dropout_p=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert any(f"x{kernels.DEEP_K} " in t for t in spy.tiles) and spy.split

    keep = functional.keep_mask(TOKENS, IN_FEATURES, seed_of_next_call(7, "triton"), p, DEVICE, "triton")
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    y_ref = torch.nn.functional.linear(x64, W.double(), b.double()) + alpha * ((x64 * keep / (1 - p)) @ A64 @ B64)
    y_ref.backward(dy.double())
    for got, want in [(y, y_ref), (leaves[0].grad, x64.grad), (leaves[1].grad, A64.grad), (leaves[2].grad, B64.grad)]:
        assert rel_err(got, want) < TOL[torch.float32]


class _DriftingClock:
    """Stands in for kernels._CudaClock: a launch's time is its ``cost(fn)``, plus a drift that
    grows with every timed call (the GPU's clock slowing as it warms)."""

    def __init__(self, cost, drift):
        self.cost, self.drift, self.calls = cost, drift, 0

    def __call__(self, fn):
        ms = self.cost(fn) + self.drift * self.calls
        self.calls += 1
        return lambda: ms

    def wait(self):
        pass


def test_the_autotuner_times_its_candidates_in_turn(monkeypatch):
    """A tuning run's first timing gathers every candidate's launch (the autotuner's do_bench,
    kernels._bench, keeps it) and times them together, call by call in turn: on a clock that drifts
    by more than the candidates differ, and with one call of the fastest delayed, the fastest still
    wins, where a run of calls per candidate one after another picks another. Each launch is called
    once to gather it, three times to estimate it, then about TUNE_MS of it; a candidate that fails
    to compile keeps the autotuner's inf; the autotuner's timing of each config returns the result
    without timing again; the timings get the launch's own arguments, after all the candidates were
    handed to compile_configs at once."""
    import types
    configs = kernels.hopper_configs()[:4]
    failed = kernels.hopper_configs()[4]
    cost = {configs[0]: 1.0, configs[1]: 1.02, configs[2]: 1.03, configs[3]: 0.97}  # the last the fastest
    called, seen, compiled = [], [], []

    def bench(*args, config, **flags):  # as Triton's Autotuner._bench: builds the launch, times it by do_bench
        seen.append((args, flags))
        if config is failed:
            def launch():
                raise RuntimeError("out of resources")  # (OutOfResources, caught by the autotuner)
        else:
            def launch():
                called.append(config)
                late = config is configs[3] and called.count(config) == 10  # (one call of the fastest delayed)
                return cost[config] + (5.0 if late else 0.0)
        try:
            return kernels._bench(launch, quantiles=(0.5, 0.2, 0.8))
        except RuntimeError:
            return [float("inf")] * 3

    clock = _DriftingClock(lambda fn: fn(), drift=0.002)
    monkeypatch.setattr(kernels, "_CudaClock", lambda: clock)
    monkeypatch.setattr(kernels, "compile_configs", lambda kernel, args, flags, configs: compiled.append(list(configs)))
    tuner = types.SimpleNamespace(prune_configs=lambda kwargs: [*configs, failed], _bench=bench, fn=None)
    kernels._compile_before_timing(tuner)
    pruned = tuner.prune_configs({})
    timings = {c: tuner._bench(1, 2, config=c, FLAG=True) for c in pruned}  # as Autotuner.run does
    assert compiled == [pruned]
    assert seen == [((1, 2), {"FLAG": True})] * len(pruned)
    assert min(timings, key=timings.get) is configs[3]
    assert timings[failed] == [float("inf")] * 3
    # each: once gathered, three times estimated, then TUNE_MS of its time (its estimate drifted a little)
    for c in configs:
        assert abs(called.count(c) - 4 - kernels.TUNE_MS / cost[c]) <= 1.5, (called.count(c), cost[c])
    assert len(called) == clock.calls + 4
    # every candidate met about the same drift: the same offset from its cost, within a round's (of
    # four calls; one more for the delayed call, whose median is one sample later)
    offsets = [timings[c][0] - cost[c] for c in configs]
    assert max(offsets) - min(offsets) <= 2 * 4 * clock.drift, offsets
    assert all(t[1] <= t[0] <= t[2] for t in timings.values() if t[0] != float("inf"))
    # the same clock, a run of calls per candidate one after another (Triton's autotuner): another pick
    clock.calls = 0
    one_pass = {c: sorted(clock(lambda c=c: cost[c])() for _ in range(28))[14] for c in configs}
    assert min(one_pass, key=one_pass.get) is not configs[3]
    # a later tuning run gathers and times its own candidates afresh
    before, seen[:] = len(called), []
    tuner.prune_configs({})
    tuner._bench(config=configs[0])
    assert len(called) - before > 4 * (1 + 3 + 5) and len(seen) == len(pruned)


def test_the_autotuner_of_a_triton_kernel_takes_its_timings_in_turn(monkeypatch):
    """Through Triton's own Autotuner (the interpreter runs the kernel): its do_bench, kernels._bench,
    gathers each candidate's launch, and its choice is the candidate _time_in_turn timed fastest."""
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, STEP: tl.constexpr):  # (adds STEP: the stand-in clock tells the config by it)
        tl.store(x_ptr, tl.load(x_ptr) + STEP)

    configs = [triton.Config({"STEP": step}) for step in (1, 2, 4)]
    tuner = triton.autotune(configs=configs, key=[], do_bench=kernels._bench)(add)
    kernels._compile_before_timing(tuner)
    x = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    cost = {1: 1.0, 2: 0.8, 4: 1.1}

    def launch_cost(fn):
        before = int(x.item())
        fn()
        step = int(x.item()) - before
        clock.steps[step] = clock.steps.get(step, 0) + 1
        return cost[step]

    clock = _DriftingClock(launch_cost, drift=0.002)
    clock.steps = {}
    monkeypatch.setattr(kernels, "_CudaClock", lambda: clock)
    monkeypatch.setattr(kernels, "compile_configs", lambda *args: None)
    tuner[(1,)](x)
    assert tuner.best_config.kwargs == {"STEP": 2}
    # each gathered once, three estimates, about TUNE_MS of it timed; then the chosen one launched
    assert abs(clock.calls - 3 * 3 - sum(kernels.TUNE_MS / c for c in cost.values())) <= 3
    assert int(x.item()) == 1 + 2 + 4 + sum(step * n for step, n in clock.steps.items()) + 2
    offsets = [t[0] - cost[c.kwargs["STEP"]] for c, t in tuner.configs_timings.items()]
    assert len(offsets) == 3 and max(offsets) - min(offsets) < 3 * clock.drift * 2, offsets


def test_a_tuning_run_that_fails_while_gathering_leaves_the_next_one_to_time(monkeypatch):
    """An exception in the middle of gathering (a launch's fault, say) propagates, and the next
    tuning run gathers and times as before: _gather is back to timing alone in between."""
    import types
    configs = kernels.hopper_configs()[:3]

    def bench(*args, config, **flags):  # as Triton's Autotuner._bench
        def launch():
            if config is configs[1] and broken:
                raise RuntimeError("illegal memory access")
            return 1.0
        return kernels._bench(launch, quantiles=(0.5, 0.2, 0.8))

    clock = _DriftingClock(lambda fn: fn(), drift=0.0)
    monkeypatch.setattr(kernels, "_CudaClock", lambda: clock)
    monkeypatch.setattr(kernels, "compile_configs", lambda *args: None)
    tuner = types.SimpleNamespace(prune_configs=lambda kwargs: configs, _bench=bench, fn=None)
    kernels._compile_before_timing(tuner)
    broken = True
    tuner.prune_configs({})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner._bench(config=configs[0])
    assert kernels._gathered is None
    broken = False
    tuner.prune_configs({})
    assert tuner._bench(config=configs[0]) == [1.0, 1.0, 1.0] and clock.calls > 3 * 3


def test_a_timing_in_turn_that_fails_leaves_each_launch_timed_alone(monkeypatch):
    """Should the timing in turn fail (its clock, say, new on a GPU), the gathered launches are
    each timed alone by do_bench (as _gather times a launch alone), with a warning naming the
    failure: the tuning run still picks the fastest. A launch that fails there propagates."""
    import types
    configs = kernels.hopper_configs()[:3]
    cost = {configs[0]: 1.0, configs[1]: 0.5, configs[2]: 2.0}
    alone, calls = [], []

    def bench(*args, config, **flags):  # as Triton's Autotuner._bench
        def launch():
            calls.append(config)
            if broken and calls.count(config) > 1 and config is configs[2]:  # (gathered, then faults)
                raise RuntimeError("illegal memory access")
            return cost[config]
        return kernels._bench(launch, quantiles=(0.5, 0.2, 0.8))

    def clock():
        raise RuntimeError("no events here")

    def do_bench(fn, warmup, rep, quantiles):
        assert (warmup, rep, quantiles) == (5, kernels.TUNE_MS, (0.5, 0.2, 0.8))  # (as _gather's, and the autotuner's ranking)
        alone.append(fn())
        return [alone[-1]] * 3
    monkeypatch.setattr(kernels, "_CudaClock", clock)
    monkeypatch.setattr(kernels.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(kernels, "compile_configs", lambda *args: None)
    tuner = types.SimpleNamespace(prune_configs=lambda kwargs: configs, _bench=bench, fn=None)
    kernels._compile_before_timing(tuner)
    broken = False
    tuner.prune_configs({})
    with pytest.warns(RuntimeWarning, match=r"in turn failed \(RuntimeError: no events here\); each is timed alone"):
        timings = {c: tuner._bench(config=c) for c in configs}
    assert timings == {c: [cost[c]] * 3 for c in configs} and sorted(alone) == sorted(cost.values())
    broken = True
    calls.clear()
    tuner.prune_configs({})
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="illegal memory access"):
        tuner._bench(config=configs[0])


def test_the_cuda_clock_flushes_then_times_the_launch_alone(monkeypatch):
    """kernels._CudaClock, with stand-ins for CUDA's events and synchronize: each timed call flushes
    the L2 cache, records its start, makes the launch, records its end, in that order, and its time
    is read only after the wait."""
    log, synced = [], []

    class Event:  # (made in pairs: a call's start, then its end)
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name, self.at = ("start", "end")[len(events) % 2], None
            events.append(self)

        def record(self):
            log.append(self.name)
            self.at = len(log)

        def elapsed_time(self, end):
            assert synced, "an event's time read before the wait"
            return float(end.at - self.at)

    class Flush:
        def zero_(self):
            log.append("flush")

    events = []
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *args, **kwargs: Flush())
        clock = kernels._CudaClock()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(True))
    pending = [clock(lambda: log.append("launch")), clock(lambda: log.append("launch"))]
    assert log == ["flush", "start", "launch", "end"] * 2
    with pytest.raises(AssertionError, match="before the wait"):
        pending[0]()
    clock.wait()
    assert [ms() for ms in pending] == [2.0, 2.0]  # (start, launch, end: two entries from start to end)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's events: on a GPU only")
def test_the_cuda_clock_times_a_larger_product_slower():
    """On a GPU, the autotuner's clock (kernels._CudaClock, through _time_in_turn) times a matmul
    with sixteen times the work slower, each median between its 20th and 80th percentiles. (Not
    four times: the small one may fill half the SMs where the large one runs two waves.)"""
    a, b, c = (torch.randn(*shape, device=DEVICE) for shape in ((1024, 1024), (4096, 1024), (1024, 4096)))
    timed = kernels._time_in_turn({"small": lambda: a @ a, "large": lambda: b @ c}, kernels._CudaClock())
    assert timed["large"][0] > 2 * timed["small"][0] > 0, timed
    assert all(p20 <= median <= p80 for median, p20, p80 in timed.values()), timed


def test_gpu_check_compiles_ahead_for_these_sizes():
    """`scripts/gpu_check.sh tests` compiles this file's kernels in parallel before the shards run
    (on a GPU each config otherwise compiles here, one at a time): for this file's sizes, since the
    pruner fits tiles to them (a precompile for 96 out-features once missed 67 of 232 compiles)."""
    script = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.sh")).read()
    found = re.findall(r"step precompile-tests\S* .*?--shapes (\d+)x(\d+) --tokens (\d+) --ranks 16 ", script, re.S)
    assert len(found) == 2 and set(found) == {(str(IN_FEATURES), str(OUT_FEATURES), str(TOKENS))}


@pytest.mark.triton
@pytest.mark.skipif(kernels.INTERPRET, reason="Triton's interpreter computes bf16 wrong: on a GPU only")
@pytest.mark.parametrize("fuse", ["0", "1"], ids=["separate-shrink", "fused-shrink"])
def test_every_autotune_config_in_bf16(fuse, monkeypatch):
    """bf16, the dtype most users train in, through every config on a GPU, with the shrink in a
    launch of its own or fused into the base GEMM (whose persistent tiles then stage their TMA
    store beside the A tiles). Last in this file: its configs
    are not compiled ahead, so a shard stopped by its limit loses only these."""
    spy = _every_config(monkeypatch, torch.bfloat16, fuse)
    assert any(t.endswith(" persistent tma-store") for t in spy.tiles), spy.tiles
