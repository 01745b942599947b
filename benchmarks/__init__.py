"""Benchmark suite for lora_kernels: the fused LoRA linear layer against the layers users would pick instead.

    python -m benchmarks.run            # the sweep; CPU machines get a small sweep of the PyTorch path
    pytest benchmarks/ --benchmark-only # the same providers through pytest-benchmark

Layout, one concern per module:

- ``providers``: the layers compared (a dict name -> factory), built from one set of weights;
- ``measure``: correctness check against float64, timing, memory, FLOP counting;
- ``report``: the markdown table, the JSON, report.md and the plots;
- ``run``: the command line and the sweep;
- ``targets``: issue 4's table from a results.json (and a dropout run's);
- ``model_step``: a Llama-3-8B layer's seven projections in one training step;
- ``host_overhead``: the layer's host time per step (cProfile with --profile);
- ``variants``: the kernels piece by piece against cuBLAS (GPU);
- ``precompile``: Triton's cache filled ahead of time, or a first step's compiles timed;
- ``test_bench``: the same providers through pytest-benchmark.
"""
