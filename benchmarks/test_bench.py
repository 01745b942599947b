"""pytest-benchmark view of the same providers and modes: ``pytest benchmarks/ --benchmark-only``.

On CUDA: the Llama-3-8B projection shapes at 8192 tokens, rank 16, bf16 (the run's anchor point).
Without CUDA: one tiny fp32 shape, and the providers that need CUDA to mean anything are skipped.
Each test first checks its provider against float64, so a wrong provider fails instead of being timed.
The project's test command runs ``pytest tests`` only, so none of this slows CI.
"""

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from .measure import (MODES, check, expected, flop_count, forward_backward, make_inputs, mode_step, tolerance,  # noqa: E402
                      worst)
from .providers import PROVIDERS, ProviderUnavailable, make_weights  # noqa: E402
from .run import ANCHOR_RANK, ANCHOR_TOKENS, CPU_SHAPES, GPU_SHAPES  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    CONFIGS = [(K, N, ANCHOR_TOKENS, ANCHOR_RANK) for K, N in GPU_SHAPES]
    DTYPE, ROUNDS, WARMUP_ROUNDS = torch.bfloat16, 30, 5
else:
    CONFIGS = [(*CPU_SHAPES[0], 128, 16)]
    DTYPE, ROUNDS, WARMUP_ROUNDS = torch.float32, 20, 3

NEEDS_CUDA = {
    "fused": "the fused Triton kernels need an NVIDIA GPU (on CPU lora_linear runs its PyTorch path, "
             "which python -m benchmarks.run reports)",
    "fused-torch": "without a GPU, fused runs the same PyTorch path",
    "fused-routed": "without a GPU, fused runs the same PyTorch path",
    "compiled": "torch.compile's first build on CPU takes longer than this whole tiny suite; "
                "python -m benchmarks.run measures it",
}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # As in run.py: a parallel CPU GEMM stalls at every barrier when another process takes a core.
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _inputs(config):
    K, N, M, r = config
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    weights = make_weights(K, N, r, dtype=DTYPE, device=DEVICE, generator=generator)
    xs, dys = make_inputs(M, K, N, dtype=DTYPE, device=DEVICE, generator=generator)
    refs = {lora: expected(weights, xs[0], dys[0], lora=lora) for lora in (True, False)}
    return weights, xs, dys, refs


@functools.lru_cache(maxsize=None)
def _checked_layer(config, provider):
    """The provider's layer and its errors against float64; built and checked once per config. (As in
    benchmarks.run, the checked call is not the first: on a GPU the first compiles and autotunes,
    and the later ones, which are timed, launch the compiled kernels directly.)"""
    weights, xs, dys, refs = _inputs(config)
    layer = PROVIDERS[provider](weights)
    forward_backward(layer, xs[0], dys[0])
    return layer, check(layer, xs[0], dys[0], refs[layer.lora])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-M{c[2]}-r{c[3]}")
def test_bench(benchmark, config, provider, mode):
    if not CUDA and provider in NEEDS_CUDA:
        pytest.skip(NEEDS_CUDA[provider])
    try:
        layer, errors = _checked_layer(config, provider)
    except ProviderUnavailable as e:
        pytest.skip(str(e))
    assert worst(errors) <= tolerance(DTYPE, DEVICE), f"{provider} disagrees with float64: {errors}"

    _, xs, dys, _ = _inputs(config)
    setup, step = mode_step(layer, mode, xs, dys)

    def untimed_setup():
        state = setup()  # next input copy, and the forward when timing the backward alone
        _sync()
        return (state,), {}

    def timed(state):
        step(state)
        _sync()  # inside the timed call, so the time covers the GPU work and not only its launch

    K, N, M, r = config
    benchmark.group = f"{K}→{N} M={M} r={r} {mode}"
    benchmark.extra_info.update(
        provider=provider, mode=mode, dtype=str(DTYPE), max_err=worst(errors),
        flops=flop_count(M, K, N, r, mode, lora=layer.lora, trainable_base=False))
    benchmark.pedantic(timed, setup=untimed_setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
