"""One decoder layer's seven projections, trained together: ``python -m benchmarks.model_step``.

The sweep (``benchmarks.run``) times each projection alone, so a step whose GPU work is shorter
than its host time (4096→1024 at 8192 tokens, every shape at 2048) shows the host's pace. In a
model the host runs ahead: while the GPU works through a large projection, the host is already
issuing the next one's launches, so a small projection's host time can hide behind a large one's
GPU time. This times what a training step pays: Llama-3-8B's q, k, v, o, gate, up and down
projections, each a LoRA layer of one provider, forward and backward in one autograd call (q, k,
v, gate and up read one hidden state, as in the model, so its gradient sums five), side by side
for each provider of --providers (by default base, fused, fused-routed on a GPU, peft and addmm),
with the ratio to the bare base layers and fused's speedup.

Each provider's seven layers are first checked against float64, as in the sweep; then timed. On a
GPU: bf16, 8192 and 2048 tokens, rank 16. Without one: the same layer scaled down 16 times, fp32,
on CPU (fused then runs its PyTorch path: a check of the code, not of the kernels' speed). Writes
``model-step.md`` and ``model-step.json`` under --out (default $OUT, else benchmarks/results/).
"""

import argparse
import json
import os
import signal
import time

import torch

from . import report
from .measure import Timer, check, expected, tolerance, worst
from .providers import PROVIDERS, ProviderUnavailable, make_weights
from .run import DTYPES, Stopped, _ints, _names, _probability, _stop, describe_error

# name, input (h: the hidden state, a: attention's output, m: the MLP's activation), out features
# (Llama-3-8B: hidden 4096, 8 KV heads of 128, MLP 14336).
PROJECTIONS = [("q", "h", 4096), ("k", "h", 1024), ("v", "h", 1024), ("o", "a", 4096),
               ("gate", "h", 14336), ("up", "h", 14336), ("down", "m", 4096)]
WIDTHS = {"h": 4096, "a": 4096, "m": 14336}


def build(provider, weights, dropout):
    """The provider's seven layers, one per projection, from ``weights`` (name -> Weights)."""
    return {name: PROVIDERS[provider](weights[name], dropout=dropout) for name, _, _ in PROJECTIONS}


def make_step(layers, inputs, dys):
    """One training step of the seven layers: forward, then one backward for all of them."""
    tensors = list(inputs.values()) + [t for layer in layers.values() for t in layer.params.values()
                                       if t is not None and t.requires_grad]

    def step(_):
        ys = [layers[name].fn(inputs[source]) for name, source, _ in PROJECTIONS]
        return torch.autograd.grad(ys, tensors, [dys[name] for name, _, _ in PROJECTIONS])
    return step


def check_layers(layers, weights, inputs, dys, lora):
    """The largest relative error, over the seven layers, of the output and every gradient (NaN if
    any is NaN)."""
    errors = {}
    for name, source, _ in PROJECTIONS:
        x = inputs[source]
        found = check(layers[name], x, dys[name], expected(weights[name], x, dys[name], lora=lora))
        errors.update({(name, what): err for what, err in found.items()})
    return worst(errors)


def run(args, out, started):
    """Check, then time, each provider at each token count; the results are rewritten after each
    row, so a run stopped by its time limit (SIGTERM) keeps what it measured."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    scale = 1 if device.type == "cuda" else 16  # the CPU's stand-in: every width / 16
    timer = Timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {name: make_weights(WIDTHS[source] // scale, n // scale, args.rank, dtype=dtype, device=device,
                                  generator=gen) for name, source, n in PROJECTIONS}
    rows, stopped = [], None
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for M in args.tokens:
            inputs = {s: torch.randn(M, w // scale, generator=gen, device=device).to(dtype).requires_grad_()
                      for s, w in WIDTHS.items()}
            dys = {name: torch.randn(M, n // scale, generator=gen, device=device).to(dtype)
                   for name, _, n in PROJECTIONS}
            for provider in args.providers:
                row = {"tokens": M, "provider": provider, "ms": None, "x_base": None, "fused_speedup": None,
                       "max_err": None, "status": "ok"}
                rows.append(row)
                measure(row, provider, weights, inputs, dys, args, timer)
                print(f"{M:6d} tokens  {provider:10s} " + (f"{row['ms']:9.3f} ms" if row["ms"] else row["status"]),
                      flush=True)
                ratios(rows, M)
                write(rows, args, out, started)
    except Stopped as e:
        stopped = str(e)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return write(rows, args, out, started, stopped)


def measure(row, provider, weights, inputs, dys, args, timer):
    """Check the provider's seven layers against float64, then time one step of them, into ``row``."""
    dtype, device = DTYPES[args.dtype], next(iter(inputs.values())).device
    try:
        layers = build(provider, weights, args.dropout)
        lora = provider != "base"
        step = make_step(layers, inputs, dys)
        # The first call compiles and autotunes. Not the one checked: on a GPU the later calls launch
        # the compiled kernels directly (kernels._launch), and those are timed.
        step(None)
        if args.dropout == 0 or not lora:
            row["max_err"] = check_layers(layers, weights, inputs, dys, lora)
            if not row["max_err"] <= tolerance(dtype, device):  # (`not <=` also catches NaN)
                row["status"] = f"WRONG (off by {row['max_err']:.1e})"
                return
        else:
            row["status"] = f"timed, not checked (dropout {args.dropout})"
        # (this package's layers: how many of the seven take the PyTorch path, e.g. fused-routed's small ones)
        on_torch = [name for name, source, _ in PROJECTIONS
                    if layers[name].backend and layers[name].backend(inputs[source]) == "torch"]
        if on_torch:
            row["status"] += (" (PyTorch path)" if len(on_torch) == len(PROJECTIONS)
                              else f" ({', '.join(on_torch)} on the PyTorch path)")
        row["ms"] = timer(lambda: None, step)[0]
    except ProviderUnavailable as e:
        row["status"] = f"SKIPPED: {e}"
    except Exception as e:  # one provider's failure must not hide the others
        row["status"] = f"ERROR: {describe_error(e)}"


def ratios(rows, M):
    """×base and fused's speedup for the rows of M tokens measured so far."""
    this = {r["provider"]: r["ms"] for r in rows if r["tokens"] == M}
    for r in rows:
        if r["tokens"] == M and r["ms"]:
            r["x_base"] = r["ms"] / this["base"] if this.get("base") else None
            r["fused_speedup"] = r["ms"] / this["fused"] if this.get("fused") else None


def write(rows, args, out, started, stopped=None):
    name, _ = report.card(torch.device(args.device))
    meta = {"card": name, "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "rank": args.rank,
            "dropout": args.dropout, "versions": report.versions(), "elapsed_s": round(time.perf_counter() - started, 1),
            "stopped": stopped, "settings": report.settings()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model-step.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    scaled = "" if args.device == "cuda" else " Widths scaled down 16× (CPU stand-in: PyTorch paths only)."
    lines = [f"# Seven projections of a Llama-3-8B layer, one training step, on {name}, {meta['date']}", "",
             f"q, k, v, o, gate, up, down as LoRA layers, forward and one backward together; {args.dtype}, "
             f"rank {args.rank}, LoRA dropout {args.dropout}; ×base: to the bare base layers (frozen, dX only) "
             f"in the same run; fused speedup: the provider's time over fused's.{scaled}"
             + (f" INCOMPLETE: {stopped}." if stopped else ""), "",
             f"Settings: {report.describe_settings(meta['settings'])}.", "",
             "| tokens | provider | ms | ×base | fused speedup | max err | status |", "|---:|---|---:|---:|---:|---:|---|"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['provider']} | {fmt(r['ms'], '.3f')} | {fmt(r['x_base'], '.3f')} | "
                     f"{fmt(r['fused_speedup'], '.2f')} | {fmt(r['max_err'], '.1e')} | {r['status']} |")
    with open(os.path.join(out, "model-step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "model-step.md")


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=_ints, default=[8192, 2048] if cuda else [128])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    # (fused-routed: the layer with small projections on its PyTorch path, timed right after fused;
    # without a GPU fused runs that path already)
    p.add_argument("--providers", type=_names(list(PROVIDERS)),
                   default=["base", "fused"] + (["fused-routed"] if cuda else []) + ["peft", "addmm"])
    p.add_argument("--dropout", type=_probability, default=0.0, help="LoRA dropout of peft and the fused providers (timed, not checked: its masks are not rebuilt here)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--warmup-ms", type=float, default=20.0)
    # (the bare base's seven projections, forward+backward at 8192 tokens, add up to about 10 ms in
    # the third H200 run's sweep: 300 ms gives some 25 timed steps per provider)
    p.add_argument("--rep-ms", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads (default 1, as benchmarks.run's: a parallel GEMM stalls at "
                        "every barrier when another process takes a core; 0 keeps torch's default)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if "base" not in args.providers:
        p.error("--providers must include base, the floor every ratio is to")
    started = time.perf_counter()
    path = run(args, args.out, started)
    print(f"wrote {path} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
