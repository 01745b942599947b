"""The benchmark sweep: ``python -m benchmarks.run [--help]``.

Every provider (see ``providers.py``) computes the same layer from the same weights and inputs; each
is first checked against float64 (output, dX, dA, dB, and dW, db when the base trains), then its
memory is measured and it is timed in each mode. One run gives every figure side by side: time,
TFLOP/s, the ratio to `base` (the floor), the speedup of `fused` over each other provider.

On an NVIDIA GPU the default sweep is the Llama-3-8B projections in bf16, budgeted to finish in under
4 minutes on an H100 (see ``plan`` and ``DEFAULT_TIMING``). Without one, the same command runs a small
fp32 sweep of the PyTorch paths on CPU in well under a minute.
"""

import argparse
import datetime
import os
import signal
import statistics
import sys
import time
import traceback

import torch

from lora_kernels import functional

from . import report
from .measure import (MODES, Timer, ceilings, check, expected, flop_count, forward_backward, make_inputs, memory,
                      mode_step, tolerance, worst)
from .providers import GPU_ONLY, PROVIDERS, ProviderUnavailable, make_weights

# (K in-features, N out-features) of Llama-3-8B's projections: q/o, k/v, gate/up, down.
GPU_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
# Issue 4's targets: 8192 tokens at rank 16, and no regression at rank 64 or at 2048 tokens.
GPU_TOKENS = [2048, 8192]
GPU_RANKS = [16, 64]
CPU_SHAPES = [(256, 256), (512, 1024)]
CPU_TOKENS = [128, 256, 512]
CPU_RANKS = [16]

# Milliseconds of warm-up and of timed runs per measurement (wall time, see measure.Timer). The GPU
# default sweep makes 564 measurements (12 configurations × 7 providers × 3 modes, then 6 a
# configuration and mode timed in turn, and 8 more in forward+backward: EVERY_PROVIDER_IN_TURN), so
# this is most of what the budget lets the sweep choose: 10 + 60 ms (0.067 s a measurement in the
# sixth H200 run, ~38 s in all) still gives 60 samples of a 1 ms step and leaves
# the rest of the 4 minutes to the first calls (torch.compile, and the fused kernels' autotuning).
# do_bench's own 25 + 100 ms would add ~25 s. CPU figures are only indicative and get less.
DEFAULT_TIMING = {"cuda": (10.0, 60.0), "cpu": (10.0, 50.0)}

# Without --full-product, tokens are swept at this rank and ranks at this token count.
ANCHOR_RANK, ANCHOR_TOKENS = 16, 8192

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

CPU_BANNER = """\
CPU FIGURES: no NVIDIA GPU here. `fused` runs lora_kernels' PyTorch path, not its Triton kernels,
which need an NVIDIA GPU. These numbers compare PyTorch formulations on a CPU; they say nothing
about the fused kernels' speed."""

INTERPRETER_BANNER = """CPU FIGURES: no NVIDIA GPU here. `fused` runs lora_kernels' Triton kernels through Triton's
interpreter (TRITON_INTERPRET=1 with LORA_KERNELS_BACKEND=triton), which emulates them in Python,
thousands of times slower than compiled: these numbers say nothing about the kernels' speed."""


def _ints(text):
    """Comma-separated counts, each at least 1 (a sweep of zero tokens or rank 0 has no ratio to give)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 1, got {text!r}")
    return values


def _shapes(text):
    out = []
    for item in text.split(","):
        k, _, n = item.strip().lower().replace("→", "x").replace(":", "x").partition("x")
        out.append((int(k), int(n)))
        if min(out[-1]) < 1:
            raise argparse.ArgumentTypeError(f"in and out features must be at least 1, got {item.strip()!r}")
    return out


def _probability(text):
    p = float(text)
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"a dropout probability is in [0, 1], got {text}")
    return p


def _names(choices):
    def parse(text):
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in names if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return names
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the fused LoRA linear layer against base, reference, compiled, addmm and peft.",
        epilog="Defaults on a GPU: Llama-3-8B shapes 4096x4096,4096x1024,4096x14336,14336x4096, tokens "
               "2048,8192 at rank 16 plus rank 64 at 8192 tokens, bf16. On CPU: 256x256,512x1024, "
               "tokens 128,256,512, rank 16, fp32. Results go to benchmarks/results/<card>-<date>[-<name>]/ "
               "(or $OUT/benchmarks/results/ when OUT is set, or --out).")
    p.add_argument("--dtype", choices=DTYPES, help="bf16 on a GPU, fp32 on CPU by default")
    p.add_argument("--adapter-dtype", choices=DTYPES,
                   help="the adapters' dtype (default: --dtype's); fp32 beside a bf16 base is peft's default "
                        "(autocast_adapter_dtype) and LinearWithLoRA's. reference, compiled and addmm multiply "
                        "x by A as they are, so with another dtype than x's they are SKIPPED")
    p.add_argument("--shapes", type=_shapes, help="comma-separated KxN (in x out features), e.g. 4096x14336")
    p.add_argument("--tokens", type=_ints, help="comma-separated token counts M")
    p.add_argument("--ranks", type=_ints, help="comma-separated LoRA ranks")
    p.add_argument("--full-product", action="store_true",
                   help=f"every tokens x ranks pair; by default tokens are swept at rank {ANCHOR_RANK} and "
                        f"ranks at {ANCHOR_TOKENS} tokens (or the middle value when those are not listed)")
    p.add_argument("--providers", type=_names(list(PROVIDERS)),
                   help=f"comma-separated, from {','.join(PROVIDERS)} (default all but fused-routed, and "
                        f"without a GPU all but {','.join(GPU_ONLY)}, which there repeat fused's PyTorch path)")
    p.add_argument("--modes", type=_names(list(MODES)), default=list(MODES),
                   help=f"comma-separated, from {','.join(MODES)} (default all)")
    p.add_argument("--trainable-base", action="store_true",
                   help="W and b require grad too (default: frozen, the LoRA case)")
    p.add_argument("--alpha", type=float, default=2.0, help="the LoRA scale, used as is (default 2.0)")
    p.add_argument("--dropout", type=_probability, default=0.0,
                   help="LoRA dropout of peft (lora_dropout) and the fused providers (dropout_p), e.g. 0.1, peft's "
                        "common setting; above 0 their outputs are random: each is checked with the mask their call "
                        "draws, drawn again from torch's seed, and the other providers still run without "
                        "dropout")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--warmup-ms", type=float, help="warm-up per measurement (default 10)")
    p.add_argument("--rep-ms", type=float, help="timed runs per measurement (default 60 on GPU, 50 on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads (default 1: a parallel GEMM stalls at every barrier when "
                        "another process takes a core, which ruins small CPU timings; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="parent directory of the results folder")
    p.add_argument("--name", metavar="SUFFIX", help="appended to the results folder's name (e.g. dropout)")
    return p.parse_args(argv)


def plan(shapes, tokens, ranks, full_product):
    """The (K, N, M, r) configurations and a note saying how they were chosen.

    The full product of many tokens and ranks grows fast, and the fused kernels autotune once per
    size class, so by default: every token count at one rank, every rank at one token count (12
    configurations on the GPU defaults, where the full product would be 16).
    """
    if full_product or len(tokens) == 1 or len(ranks) == 1:
        pairs = [(m, r) for m in tokens for r in ranks]
        note = None
    else:
        rank0 = ANCHOR_RANK if ANCHOR_RANK in ranks else sorted(ranks)[len(ranks) // 2]
        tokens0 = ANCHOR_TOKENS if ANCHOR_TOKENS in tokens else sorted(tokens)[len(tokens) // 2]
        pairs = sorted({(m, rank0) for m in tokens} | {(tokens0, r) for r in ranks})
        note = (f"tokens {','.join(map(str, tokens))} at rank {rank0}; ranks {','.join(map(str, ranks))} "
                f"only at {tokens0} tokens (the full product is --full-product)")
    return [(k, n, m, r) for k, n in shapes for m, r in pairs], note


def _row(device, K, N, M, r, provider, mode, status):
    return {"device": device.type, "K": K, "N": N, "tokens": M, "rank": r, "mode": mode, "provider": provider,
            "ms": None, "ms_p20": None, "ms_p80": None, "reps": None, "tflops": None, "x_base": None, "fused_speedup": None,
            "peak_mib": None, "saved_mib": None, "saved_all_mib": None, "max_err": None, "errors": None,
            "check_s": None, "base_again_ms": None, "x_base_in_turn": None, "fused_speedup_in_turn": None,
            "status": status}


def describe_error(e, limit=300):
    """``ExcType: message`` on one line (CUDA's messages span several, which would break a
    markdown table row), cut to `limit` characters."""
    text = f"{type(e).__name__}: " + " ".join(str(e).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_tolerance(dtype, adapter_dtype, device):
    """The bound of the float64 check: the less precise of the base's and the adapters' dtypes'
    (a provider may run every product in either)."""
    return max(tolerance(dtype, device), tolerance(adapter_dtype, device))


def bench_provider(name, weights, xs, dys, refs, args, timer, config, modes):
    """One row per mode for one provider: checked, then measured, then timed."""
    device = xs[0].device
    K, N, M, r = config

    def rows(status, **fields):
        return [{**_row(device, K, N, M, r, name, mode, status), **fields} for mode in modes]

    try:
        layer = PROVIDERS[name](weights, dropout=args.dropout)
    except ProviderUnavailable as e:
        return rows(f"SKIPPED: {e}")
    except Exception as e:  # a provider that cannot even be built is reported, not fatal
        return rows(f"ERROR: {describe_error(e)}")
    try:
        started = time.perf_counter()
        # The first call compiles and autotunes, outside the timings. It is not the one checked: on a
        # GPU the later calls launch the compiled kernels directly (kernels._launch), and those are timed.
        forward_backward(layer, xs[0], dys[0])
        ref, checked, masked = refs[layer.lora], layer.dropout == 0, False
        if layer.dropout > 0 and layer.next_mask is not None:
            # A random output, but the mask its next call draws can be named: checked with it.
            keep = layer.next_mask(xs[0], args.seed)  # (torch's generator now seeded for that call)
            ref = expected(weights, xs[0], dys[0], lora=layer.lora, keep=keep, dropout=layer.dropout)
            checked = masked = True
            del keep
        errors = check(layer, xs[0], dys[0], ref)
    except Exception as e:
        return rows(f"ERROR: {describe_error(e)}")
    check_s = time.perf_counter() - started
    max_err = worst(errors)
    passed = max_err <= check_tolerance(weights.W.dtype, weights.A.dtype, device)  # (False for NaN too)
    if checked and not passed:
        off = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
        failure = f"{off} off by {errors[off]:.1e}"
        if not layer.mask_inferred:
            return rows(f"WRONG ({failure}" + (", with its dropout mask)" if masked else ")"),
                        errors=errors, max_err=max_err, check_s=check_s)
        # A mask drawn again from outside the layer (peft's) that fails may be the harness's
        # mistake, not the layer's: timed, and the row says so.
        status = (f"timed, check FAILED with the dropout mask drawn again from its seed ({failure}): "
                  f"that mask may not be the one {name} drew")
    elif not checked:
        status = f"timed, not checked (dropout {layer.dropout} is random, and {name}'s mask cannot be rebuilt)"
        errors = max_err = None  # (errors against the reference without dropout would mean nothing)
    else:
        on_torch = layer.backend is not None and layer.backend(xs[0]) == "torch"
        details = (["PyTorch path"] if on_torch else []) \
            + ([f"dropout {layer.dropout} checked with its mask"] if masked else [])
        status = "ok" + (f" ({', '.join(details)})" if details else "")
    try:  # (an out-of-memory here is this provider's, reported in its rows)
        peak, saved, activations = memory(layer, xs[-1], dys[-1])
    except Exception as e:
        return rows(f"ERROR: in memory(): {describe_error(e)}", errors=errors, max_err=max_err, check_s=check_s)
    shared = {"check_s": check_s, "errors": errors, "max_err": max_err, "peak_mib": None if peak is None else peak / 2**20,
              "saved_mib": activations / 2**20, "saved_all_mib": saved / 2**20}
    out = []
    for mode in modes:
        row = {**_row(device, K, N, M, r, name, mode, status), **shared}
        try:
            ms, reps = timer(*mode_step(layer, mode, xs, dys))
        except Exception as e:
            row["status"] = f"ERROR: {describe_error(e)}"
        else:
            flops = flop_count(M, K, N, r, mode, lora=layer.lora, trainable_base=args.trainable_base)
            row.update(ms=ms, ms_p20=timer.spread[0], ms_p80=timer.spread[1], reps=reps, tflops=flops / ms / 1e9)
        out.append(row)
    return out


def add_ratios(rows):
    """×base and fused speedup, within one configuration and mode."""
    by = {(r["mode"], r["provider"]): r["ms"] for r in rows}
    for row in rows:
        base, fused = by.get((row["mode"], "base")), by.get((row["mode"], "fused"))
        if row["ms"] is not None:
            row["x_base"] = row["ms"] / base if base else None
            if row["provider"] != "fused" and fused:
                row["fused_speedup"] = row["ms"] / fused


# The mode whose speedups issue 4's targets read (over peft, addmm and compiled): there every
# provider is timed in turn, not only base and fused (about 7 s more in the GPU sweep).
EVERY_PROVIDER_IN_TURN = ("forward+backward",)


def time_in_turn(config_rows, weights, xs, dys, timer, args):
    """`base` and `fused` timed again in turn, once the configuration's providers are done: base,
    fused, fused, base in each mode (a steady drift then weighs on both alike), `fused-torch`
    between the two fused where it ran (base, fused, fused-torch, fused-torch, fused, base: which
    path a small step should take is read from these), and in EVERY_PROVIDER_IN_TURN's modes each
    other provider that timed too, in the middle, in --providers order (the GPU sweep: base, fused,
    fused-torch, reference, compiled, addmm, peft, then back). The ratio of each one's median to
    base's goes in its rows as x_base_in_turn (the targets take their ratios from these), and a
    provider's median over fused's as fused_speedup_in_turn. Timed minutes apart, in the sweep's
    fixed order, the providers drifted with the GPU's clocks and the host's load (the base's own
    time moved by -64% to +48% within one configuration on the H200). The base's rows get
    base_again_ms, its median here, for the drift note. A provider that fails here is left out of
    the turn; base's or fused's failure leaves the mode without times in turn."""
    rows = {(r["provider"], r["mode"]): r for r in config_rows if r["ms"] is not None}
    for mode in args.modes:
        turn = [name for name in ("fused", "fused-torch") if (name, mode) in rows]
        if ("base", mode) not in rows or "fused" not in turn:
            continue
        if mode in EVERY_PROVIDER_IN_TURN:
            turn += [name for name in args.providers if name not in ("base", *turn) and (name, mode) in rows]
        layers = {name: PROVIDERS[name](weights, dropout=args.dropout) for name in ["base", *turn]}
        ms = {name: [] for name in layers}
        for name in ["base", *turn, *reversed(turn), "base"]:
            if name in ms:
                try:
                    ms[name].append(timer(*mode_step(layers[name], mode, xs, dys))[0])
                except Exception:  # figures for the ratios' noise only: the sequential ones stand
                    del ms[name]
        if "base" not in ms or "fused" not in ms:
            continue
        median = {name: statistics.median(times) for name, times in ms.items()}
        rows[("base", mode)]["base_again_ms"] = median["base"]
        for name in median.keys() - {"base"}:
            rows[(name, mode)]["x_base_in_turn"] = median[name] / median["base"]
            if name != "fused":
                rows[(name, mode)]["fused_speedup_in_turn"] = median[name] / median["fused"]


def drift_note(rows):
    drift = [r["base_again_ms"] / r["ms"] - 1 for r in rows if r.get("base_again_ms") and r["ms"]]
    if drift:
        return (f"base timed again at the end of each configuration, in turn with fused: {min(drift):+.1%} to "
                f"{max(drift):+.1%} from its first time (the drift and noise that the sequential ratios to base "
                "carry; the ratios in parentheses, and the targets, come from the times in turn)")
    return None


class Stopped(BaseException):  # not Exception: a provider's error handling must not swallow it
    """SIGTERM arrived (a `timeout` ran out): the sweep ends, and what it measured is still written."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


def progress_bar(total):
    """tqdm's bar where it is installed; else a line per configuration and provider (the sweep
    itself needs only torch, and a GPU host without tqdm must not lose its figures to an import)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total)
    return tqdm(total=total, desc="benchmark", unit="layer", file=sys.stderr, dynamic_ncols=True)


class _Lines:
    def __init__(self, total):
        self.total, self.done, self.what = total, 0, ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, what):
        self.what = what

    def update(self):
        self.done += 1
        print(f"benchmark {self.done}/{self.total}: {self.what}", file=sys.stderr, flush=True)


def sweep(configs, args, device, dtype, timer, progress, rows):
    """Measure every configuration, appending its rows to `rows` once the configuration is done."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for config in configs:
        K, N, M, r = config
        weights = make_weights(K, N, r, dtype=dtype, device=device, alpha=args.alpha,
                               trainable_base=args.trainable_base, generator=generator,
                               adapter_dtype=args.adapter_dtype and DTYPES[args.adapter_dtype])
        xs, dys = make_inputs(M, K, N, dtype=dtype, device=device, generator=generator)
        refs = {lora: expected(weights, xs[0], dys[0], lora=lora) for lora in (True, False)}
        config_rows = []
        for name in args.providers:
            progress.set_postfix_str(f"{K}→{N} M={M} r={r} {name}")
            config_rows += bench_provider(name, weights, xs, dys, refs, args, timer, config, args.modes)
            progress.update()
        add_ratios(config_rows)
        rows += config_rows  # (before the times in turn: a stop there keeps the configuration's rows)
        if "base" in args.providers and "fused" in args.providers:
            time_in_turn(config_rows, weights, xs, dys, timer, args)
        del weights, xs, dys, refs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def settings(args):
    """Resolve the defaults, which depend on whether there is a GPU."""
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    tokens = args.tokens or (GPU_TOKENS if cuda else CPU_TOKENS)
    ranks = args.ranks or (GPU_RANKS if cuda else CPU_RANKS)
    if args.providers is None:  # (fused-routed is fused or fused-torch at any one shape: the model step mixes them)
        args.providers = [name for name in PROVIDERS if name != "fused-routed" and (cuda or name not in GPU_ONLY)]
    configs, plan_note = plan(shapes, tokens, ranks, args.full_product)
    warmup_ms, rep_ms = DEFAULT_TIMING[device.type]
    return {
        "device": device,
        "shapes": shapes, "tokens": tokens, "ranks": ranks,
        "dtype": DTYPES[args.dtype or ("bf16" if cuda else "fp32")],
        "configs": configs,
        "plan_note": plan_note,
        "warmup_ms": warmup_ms if args.warmup_ms is None else args.warmup_ms,
        "rep_ms": rep_ms if args.rep_ms is None else args.rep_ms,
        "default_sweep": not (args.shapes or args.tokens or args.ranks or args.full_product),
    }


def run_notes(args, s):
    """Lines for the report that say how this run was made."""
    notes = [s["plan_note"]] if s["plan_note"] else []
    if "peft" in args.providers:
        base = str(s["dtype"]).removeprefix("torch.")
        note = ("peft: its lora.Linear layer called directly (built by get_peft_model), r = rank, "
                "lora_alpha = alpha·rank, adapters in " + (args.adapter_dtype or "the base's dtype"))
        if args.adapter_dtype == "fp32" and s["dtype"] != torch.float32:
            note += (f" beside a {base} base, as peft's default keeps them: peft casts x to the adapters' dtype "
                     "for its LoRA path; the fused layer keeps x as it is and rounds the adapters' tiles to x's "
                     "dtype, accumulating in fp32")
        elif args.adapter_dtype and DTYPES[args.adapter_dtype] != s["dtype"]:
            note += f" beside a {base} base: peft casts x to the adapters' dtype for its LoRA path"
        elif s["dtype"] != torch.float32:
            note += (f" ({str(s['dtype']).removeprefix('torch.')}): peft's own default keeps them in fp32 beside a "
                     "16-bit base and runs the LoRA path in fp32 (x cast up), which is slower, so the comparison "
                     "is conservative for fused")
        notes.append(note)
    if args.dropout > 0:
        notes.append(f"peft and the fused providers run with LoRA dropout {args.dropout}, not comparable with "
                     "the providers without dropout: each is checked against float64 with the mask their call draws, drawn "
                     "again from torch's seed (fused's by the seed it draws, peft's by its nn.Dropout's draw "
                     "repeated): F.linear(x, W, b) + alpha·((x·keep/(1-p)) A) B, output and gradients")
    if "compiled" in args.providers:
        notes.append("compiled: torch.compile(dynamic=True) of the reference, compiled once for the sweep "
                     "(and again where K = N changes: duck sizing)")
    if s["device"].type == "cpu" and hasattr(os, "getloadavg"):
        # Other processes on the same cores disturb CPU timings: say how busy the machine was.
        load, cores = os.getloadavg()[0], os.cpu_count()
        notes.append(f"load average {load:.1f} on {cores} cores at the start"
                     + (": the machine was busy, CPU timings are disturbed" if load > 0.5 * cores else ""))
    return notes


def time_spent(rows, elapsed, timer):
    """Where the time went: timing, and each provider's first calls (compilation, autotuning)."""
    first_calls = {}
    for row in rows:
        if row["mode"] == rows[0]["mode"] and row["check_s"] is not None:  # one check per configuration
            first_calls[row["provider"]] = first_calls.get(row["provider"], 0.0) + row["check_s"]
    note = (f"elapsed {elapsed:.1f} s: {timer.spent_s:.1f} s timing; checks (the first calls, so compilation "
            "and autotuning) " + ", ".join(f"{name} {t:.1f} s" for name, t in first_calls.items())
            + "; the rest is start-up, inputs, float64 references, memory")
    return first_calls, note


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    s = settings(args)
    device, dtype = s["device"], s["dtype"]
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    card_name, card_slug = report.card(device)
    banner = None
    if device.type == "cpu":
        probe = torch.empty(0, device=device, dtype=dtype)
        banner = INTERPRETER_BANNER if functional.select_backend(probe, dtype) == "triton" else CPU_BANNER
    if banner:
        print("\n" + banner + "\n", flush=True)
    notes = run_notes(args, s)
    print(f"{card_name}: {len(s['configs'])} configurations × {len(args.providers)} providers × "
          f"{len(args.modes)} modes, {str(dtype).removeprefix('torch.')}"
          + (f"; {s['plan_note']}" if s["plan_note"] else ""), flush=True)

    timer = Timer(device, warmup_ms=s["warmup_ms"], rep_ms=s["rep_ms"])
    ceiling = None
    if device.type == "cuda":
        try:  # a figure for the report, not a reason to lose the sweep
            ceiling = ceilings(device, timer)
        except Exception as e:
            notes.append(f"the card's ceilings were not measured: {describe_error(e)}")
            traceback.print_exc()
    if ceiling:
        notes.append(f"this card's ceilings, measured in this run: {ceiling['copy_tb_s']:.2f} TB/s device copy "
                     f"(bytes read + written), {ceiling['bf16_tflops']:.0f} TFLOP/s bf16 GEMM (8192³, random data)")
    rows, failed = [], False
    previous = signal.signal(signal.SIGTERM, _stop)  # a timeout still leaves the configurations done
    try:
        with progress_bar(len(s["configs"]) * len(args.providers)) as progress:
            sweep(s["configs"], args, device, dtype, timer, progress, rows)
    # Anything else that escapes the sweep (an out-of-memory, or a sticky CUDA error raised by the
    # next configuration's inputs) must not lose the configurations already measured either.
    except (Stopped, KeyboardInterrupt, Exception) as e:
        done = len({(r["K"], r["N"], r["tokens"], r["rank"]) for r in rows})
        if isinstance(e, Exception):
            failed = True
            print(file=sys.stderr)
            traceback.print_exc()
            why = describe_error(e)
        else:
            why = str(e) or "interrupted"
        notes.append(f"INCOMPLETE: {why} after {done} of {len(s['configs'])} configurations")
        print(f"\n{notes[-1]}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    drift = drift_note(rows)
    if drift:
        notes.append(drift)
    elapsed = time.perf_counter() - started
    first_calls, spent = time_spent(rows, elapsed, timer)

    try:  # (a listing for the report, not a reason to lose the sweep's results)
        picks = report.autotune_picks()
    except Exception as e:
        picks = []
        notes.append(f"the autotuner's picks were not listed: {describe_error(e)}")
    adapter_dtype = DTYPES[args.adapter_dtype] if args.adapter_dtype else dtype
    meta = {
        "card": card_name, "card_slug": card_slug, "device": device.type,
        "date": datetime.date.today().isoformat(), "versions": report.versions(), "settings": report.settings(),
        "dtype": str(dtype).removeprefix("torch."), "alpha": args.alpha, "trainable_base": args.trainable_base,
        "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        "dropout": args.dropout, "cpu_threads": torch.get_num_threads() if banner else None,
        "shapes": s["shapes"], "tokens": s["tokens"], "ranks": s["ranks"],
        "configs": s["configs"], "providers": args.providers, "modes": args.modes,
        "tolerance": check_tolerance(dtype, adapter_dtype, device),
        "timing": (f"median (and 20th-80th percentiles) after a warm-up, {s['warmup_ms']:g} ms of warm-up and {s['rep_ms']:g} ms of timed runs "
                   "per measurement, inputs rotated among copies, "
                   + ("CUDA events, L2 flushed before each run" if device.type == "cuda" else "time.perf_counter")),
        "flop_counting": flop_count.__doc__.strip(),
        "banner": banner, "notes": notes,
        "command": " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        "elapsed_s": elapsed, "timing_s": timer.spent_s, "check_s": first_calls, "elapsed_note": spent,
        "ceilings": ceiling, "autotune_picks": picks,
    }
    folder = report.results_dir(args.out, card_slug, meta["date"], args.name)
    paths = report.write(folder, meta, rows)

    print()
    report.print_table(rows)
    if banner:
        print("\n" + banner)
    print(f"\nresults: {folder}/ ({', '.join(p.name for p in paths)})")
    print(spent)
    if device.type == "cuda" and s["default_sweep"] and elapsed > 240:
        print("note: the default GPU sweep went over its 4-minute budget")
    print(f"total, reports included: {time.perf_counter() - started:.1f} s")
    if failed:  # written above, but the exit status says the sweep did not finish
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
