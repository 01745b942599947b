"""Host time of the layer's Python path, with every kernel launch stubbed out: ``python -m
benchmarks.host_overhead``. Runs anywhere (CPU tensors, no GPU, no Triton compile).

On a GPU the host must enqueue a step's launches faster than the GPU runs them, or the GPU waits:
at 8192 tokens a 4096→1024 projection's forward+backward is about 0.2 ms of GPU work, so a few
hundred microseconds of Python per step would show in every timing. This measures that Python:
lora_linear's checks, the autograd wrapper, the six launchers' argument preparation, and (for
comparison) the custom-op route that torch.compile takes. Triton's own launch path is not in it
(it needs a GPU); F.linear's forward+backward on the same tiny CPU tensors is printed beside it.
"""

import time
from unittest import mock

import torch

from lora_kernels import functional, kernels


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _median_us(fn, n=2000, rounds=5):
    for _ in range(100):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(times)[rounds // 2]


def main():
    torch.set_num_threads(1)
    M, K, N, r = 64, 64, 64, 16
    x = torch.randn(M, K, requires_grad=True)
    W, b, dy = torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    A, B = torch.randn(K, r, requires_grad=True), torch.randn(r, N, requires_grad=True)
    inputs = (x, W, b, A, B, 2.0, 0.0, None, "triton")

    def eager_step():
        y = functional.lora_linear(x, W, b, A, B, 2.0)
        torch.autograd.grad(y, [x, A, B], dy)

    def op_step():  # the custom ops, as a compiled graph calls them
        y = functional._forward(*inputs)[0]
        torch.autograd.grad(y, [x, A, B], dy)

    def base_step():
        y = torch.nn.functional.linear(x, W, b)
        torch.autograd.grad(y, [x], dy)

    with mock.patch.object(kernels, "_lora_matmul_kernel", _NoLaunch()), \
            mock.patch.object(functional, "select_backend", lambda *args: "triton"):
        rows = [("lora_linear forward+backward, eager (autograd.Function)", _median_us(eager_step)),
                ("the same through the custom ops", _median_us(op_step)),
                ("one launcher's argument preparation (lora_matmul)",
                 _median_us(lambda: kernels.lora_matmul(x.detach(), W.t(), out_dtype=torch.float32,
                                                        dot_dtype=torch.float32)))]
    rows.append(("F.linear forward+backward, computed (64×64, CPU)", _median_us(base_step)))
    for name, us in rows:
        print(f"{us:8.1f} µs  {name}")


if __name__ == "__main__":
    main()
