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


def test_the_autotuner_times_its_candidates_in_turn(monkeypatch):
    """A tuning run's first timing times every candidate in TUNE_ROUNDS rounds, in turn (the order,
    then its reverse): on a clock that drifts by as much as two candidates differ, the fastest still
    wins, where timed one after another (as Triton's autotuner times them) the last would look
    slowest. Each quantile is the median of its rounds; a candidate that failed (inf) is timed once;
    the autotuner's own timing of each returns that result without timing it again."""
    import types
    configs = kernels.hopper_configs()[:4]
    cost = {configs[0]: 1.0, configs[1]: 1.02, configs[2]: 1.03, configs[3]: 0.97}  # the last the fastest
    failed = kernels.hopper_configs()[4]
    calls, clock = [], {"drift": 0.0}

    def bench(*args, config, **flags):  # Triton's Autotuner._bench: [median, p20, p80] in ms
        calls.append(config)
        if config is failed:
            return [float("inf")] * 3
        clock["drift"] += 0.02  # (the GPU's clock slowing down as it warms)
        return [cost[config] + clock["drift"], cost[config], cost[config] + 1.0]

    sequential = {c: bench(config=c) for c in configs}
    assert min(sequential, key=sequential.get) is not configs[3]  # (what drift did to one pass)
    calls.clear()
    clock["drift"] = 0.0
    tuner = types.SimpleNamespace(prune_configs=lambda kwargs: [*configs, failed], _bench=bench, fn=None)
    monkeypatch.setattr(kernels, "compile_configs", lambda *args: None)
    kernels._compile_before_timing(tuner)
    pruned = tuner.prune_configs({})
    timings = {c: tuner._bench(1, 2, config=c, FLAG=True) for c in pruned}  # as Autotuner.run does
    assert min(timings, key=timings.get) is configs[3]
    assert calls[:len(pruned)] == pruned and calls[len(pruned):2 * len(pruned) - 1] == configs[::-1]
    assert [calls.count(c) for c in configs] == [kernels.TUNE_ROUNDS] * 4 and calls.count(failed) == 1
    assert len(calls) == 4 * kernels.TUNE_ROUNDS + 1  # (no timing again when the autotuner asks)
    assert timings[failed] == [float("inf")] * 3
    for c in configs:
        assert timings[c][1:] == [cost[c], cost[c] + 1.0]
    # every candidate met the same drift: the same offset from its cost
    offsets = [timings[c][0] - cost[c] for c in configs]
    assert max(offsets) - min(offsets) < 1e-9, offsets
    # a later run's first timing times its own candidates afresh
    calls.clear()
    tuner.prune_configs({})
    tuner._bench(config=configs[0])
    assert len(calls) == 4 * kernels.TUNE_ROUNDS + 1


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
