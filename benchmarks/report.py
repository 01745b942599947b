"""Reporting, in one place: the markdown table, the results folder (JSON, report.md, plots)."""

import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

from lora_kernels import functional

DEFAULT_PARENT = Path(__file__).resolve().parent / "results"

COLUMNS = ["shape", "tokens", "rank", "mode", "provider", "ms", "p20–p80", "TFLOP/s", "×base", "fused speedup",
           "peak MiB", "saved MiB", "max err", "status"]


def slug(text):
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _cpu_name():
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo names the model
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def card(device):
    """(the device's name, its folder name: the GPU slugified, or cpu-<processor>)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slug(name)
    name = _cpu_name()
    return name, "cpu-" + slug(re.sub(r"\b(cpu|processor)\b|@.*", "", name, flags=re.I) or name)


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "peft"):
        try:
            out[pkg] = __import__(pkg).__version__
        except ImportError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def settings():
    """The LORA_KERNELS_* variables of this run (direct launches off, TMA off, ...):
    they change what is measured, so every report names them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORA_KERNELS_")}


def describe_settings(values):
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "no LORA_KERNELS_* variable set (the defaults)"


def launch_name(flags):
    """Which product a launch of the kernel computes, from its constexpr flags (a launch's kwargs or
    the autotuner's key): 'product', 'two products (paired)', 'GEMM + low rank', 'GEMM + fused
    shrink' or 'GEMM + shrink ahead', and the operands it reads through a transposed view."""
    kernels = functional.kernels
    use = ("GEMM + shrink ahead" if flags["FUSE_SHRINK"] == kernels.SHRINK_AHEAD.value else
           "GEMM + fused shrink" if flags["FUSE_SHRINK"] else "GEMM + low rank" if flags["HAS_LOWRANK"]
           else "two products (paired)" if flags["PAIRED"] else "product")
    views = [name for name, flag in (("Xᵀ", "X_TRANSPOSED"), ("Wᵀ", "W_TRANSPOSED")) if flags[flag]]
    return use + (f" ({', '.join(views)} view)" if views else "")


def autotune_picks():
    """The autotuner's choice for each launch it tuned in this process (its in-memory cache, which
    holds the picks read back from its on-disk cache too): what a reader checks against the
    compile report's registers and spills (``benchmarks.precompile --report``). Sizes as the
    tuning key holds them, rounded up to powers of two. Empty where the kernels cannot be imported
    (no Triton)."""
    kernels = functional.kernels
    if kernels is None:
        return []
    tuner = kernels._lora_matmul_kernel
    dropout = {kernels.DROP_NONE.value: "no", kernels.DROP_X.value: "on x", kernels.DROP_LOWRANK.value: "on x A"}
    picks = []
    for key, config in tuner.cache.items():
        # Triton's key: the values of the kernel's key arguments, then each tensor argument's dtype,
        # in the kernel's order (x and w first: for a shrink, w is A).
        flags = dict(zip(tuner.keys, key))
        x, w = (d.removeprefix("torch.") for d in key[len(tuner.keys):len(tuner.keys) + 2])
        picks.append({"launch": launch_name(flags), "M": flags["M_KEY"], "N": flags["N_KEY"], "K": flags["K_KEY"],
                      "rank block": flags["BLOCK_R"], "dropout": dropout.get(flags["DROPOUT"], flags["DROPOUT"]),
                      "dtypes": x if x == w else f"{x}, {w}",
                      "tile": kernels.tile_name(config.all_kwargs())})  # (a pruned config: TMA as launched)
    return sorted(picks, key=lambda p: tuple(map(str, p.values())))


def picks_markdown(picks):
    if not picks:
        return []
    lines = ["## The autotuner's picks", "",
             "Each launch the fused provider tuned in this run (or found tuned in the autotuner's "
             "cache on disk): its tile (compile reports, e.g. "
             "`gpu-check/precompile.md`, give each tile's registers and spills). M, N, K as the tuning "
             "key holds them: rounded up to powers of two.", "",
             "| " + " | ".join(picks[0]) + " |",
             "|" + "|".join("---:" if all(isinstance(p[k], int) for p in picks) else "---" for k in picks[0]) + "|"]
    lines += ["| " + " | ".join(map(str, p.values())) + " |" for p in picks]
    return lines + [""]


def results_dir(out_flag, card_slug, date, name=None):
    """--out DIR wins; else $OUT/benchmarks/results when OUT is set; else benchmarks/results here."""
    if out_flag:
        parent = Path(out_flag)
    elif os.environ.get("OUT"):
        parent = Path(os.environ["OUT"]) / "benchmarks" / "results"
    else:
        parent = DEFAULT_PARENT
    return parent / (f"{card_slug}-{date}" + (f"-{name}" if name else ""))


# --- the table ------------------------------------------------------------------------------------


def _fmt(value, spec, missing="—"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def table_cells(row):
    return [
        f"{row['K']}→{row['N']}",
        str(row["tokens"]),
        str(row["rank"]),
        row["mode"],
        row["provider"],
        _fmt(row["ms"], ".4g"),
        "—" if row.get("ms_p20") is None else f"{row['ms_p20']:.4g}–{row['ms_p80']:.4g}",
        _fmt(row["tflops"], ".3g"),
        _fmt(row["x_base"], ".2f") + (f" ({row['x_base_in_turn']:.2f})" if row.get("x_base_in_turn") else ""),
        _fmt(row["fused_speedup"], ".2f") + (f" ({row['fused_speedup_in_turn']:.2f})"
                                             if row.get("fused_speedup_in_turn") else ""),
        _fmt(row["peak_mib"], ".1f", missing="n/a" if row["device"] == "cpu" else "—"),
        _fmt(row["saved_mib"], ".2f"),
        _fmt(row["max_err"], ".1e"),
        row["status"],
    ]


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in ("tokens", "rank", "ms", "p20–p80", "TFLOP/s", "×base", "fused speedup",
                                             "peak MiB", "saved MiB", "max err") else "---"
                            for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


TABLE_NOTES = """\
- ms: median time of one step, p20–p80 the 20th and 80th percentiles of the same timed runs; TFLOP/s: the layer's FLOPs over that time, counted as
  forward 2MKN + 2Mr(K+N); backward 2MKN (dX) [+ 2MKN for dW when the base trains] + 4Mr(K+N);
  `base` is credited with its GEMMs only. Products only, no bias or elementwise work.
- ×base: time over `base`'s time in the same mode (the floor: F.linear alone; its backward is dX only
  while the base is frozen); in parentheses, the same from the providers timed again in turn at the end
  of the configuration, which the targets use: base, fused, fused, base (fused-torch between the two
  fused where it ran; in forward+backward, the mode the targets' speedups read, every other provider
  too, in the middle: base, fused, fused-torch, reference, ..., peft, peft, ..., fused, base). fused speedup:
  the provider's time over `fused`'s (above 1: fused is faster); in parentheses, from the times in turn.
- peak MiB: peak CUDA memory allocated during one forward+backward, over what was allocated before it
  (n/a on CPU). saved MiB: activations autograd saves for backward, each storage once, the layer's own
  parameters left out (the JSON also has the total with them).
- max err: the largest relative Frobenius error ‖got − ref‖/‖ref‖ of the output and gradients
  against float64; a provider over the dtype's tolerance (the less precise of the base's and the
  adapters') is WRONG and not timed (but peft with dropout, whose mask is drawn again from outside
  its layer: its status says the check FAILED, and it is still timed).
- forward is the training forward (autograd recording); backward is timed alone on a fresh graph."""


# --- the results folder ---------------------------------------------------------------------------


def write(folder, meta, rows):
    """Write results.json, report.md and plots.png into `folder`; return the paths.

    Three files, so that a results folder fits the few files a remote GPU run can send back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.json", folder / "report.md"]
    with open(paths[0], "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")
    png = folder / "plots.png"
    png.unlink(missing_ok=True)  # (an earlier run's, in the same card-and-date folder, is not this one's)
    adapters = meta.get("adapter_dtype", meta["dtype"])
    plotted = plot(rows, meta["modes"], png, title=f"{meta['card']}, {meta['dtype']}"
                   + (f", adapters {adapters}" if adapters != meta["dtype"] else ""))
    with open(paths[1], "w") as f:
        f.write(report_markdown(meta, rows, [png.name] if plotted else []))
    return paths + ([png] if plotted else [])


def report_markdown(meta, rows, plot_names):
    v = meta["versions"]
    lines = [f"# lora_kernels benchmark: {meta['card']}, {meta['date']}", ""]
    if meta.get("banner"):
        lines += [f"> {line}" for line in meta["banner"].splitlines()] + [""]
    threads = f", {meta['cpu_threads']} torch thread(s)" if meta.get("cpu_threads") else ""
    lines += [
        f"- device: {meta['card']} ({meta['device']}{threads}); dtype {meta['dtype']}"
        + (f", adapters {meta['adapter_dtype']}" if meta.get("adapter_dtype", meta["dtype"]) != meta["dtype"] else "")
        + f"; alpha {meta['alpha']}; "
        f"base {'trainable' if meta['trainable_base'] else 'frozen'}",
        f"- python {v['python']}, torch {v['torch']}, triton {v['triton']}, peft {v['peft']}, CUDA {v['cuda']}",
        f"- settings: {describe_settings(meta.get('settings', {}))}",
        f"- timing: {meta['timing']}",
        f"- command: `{meta['command']}`",
        f"- {meta['elapsed_note']}",
    ]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    lines += ["", markdown_table(rows), "", TABLE_NOTES, ""]
    lines += picks_markdown(meta.get("autotune_picks", []))
    lines += [f"![{name}]({name})" for name in plot_names]
    return "\n".join(lines) + "\n"


def plot(rows, modes, path, *, title):
    """One row of panels per mode: time, and ratio to `base`, per configuration; a line per provider.

    Returns False when nothing was timed, or without matplotlib.
    """
    try:
        import matplotlib
    except ImportError:  # (the report and the JSON do not need it)
        print("no plots.png: matplotlib is not installed", file=sys.stderr)
        return False
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not any(r["ms"] is not None for r in rows):
        return False
    configs = list(dict.fromkeys((r["K"], r["N"], r["tokens"], r["rank"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by_key = {(r["mode"], r["K"], r["N"], r["tokens"], r["rank"], r["provider"]): r for r in rows}
    labels = [f"{K}→{N}\nM={M} r={r}" for K, N, M, r in configs]
    xs = list(range(len(configs)))
    # One column, so every panel has the full width for the configuration labels (shared below).
    fig, axes = plt.subplots(2 * len(modes), 1, sharex=True, squeeze=False,
                             figsize=(max(8.0, 0.75 * len(configs) + 3), 3.2 * 2 * len(modes)))
    for i, mode in enumerate(modes):
        ax_t, ax_r = axes[2 * i][0], axes[2 * i + 1][0]
        for provider in providers:
            def series(*fields):  # each row's first of the fields it has
                rows = [by_key.get((mode, *c, provider), {}) for c in configs]
                values = [next((row[f] for f in fields if row.get(f) is not None), None) for row in rows]
                return [math.nan if v is None else v for v in values]

            style = {"marker": "o", "linestyle": "--" if provider == "base" else "-"}
            ax_t.plot(xs, series("ms"), label=provider, **style)
            # (the ratio timed in turn where the run has one, as the table's parenthesis and targets.md)
            ax_r.plot(xs, series("x_base_in_turn", "x_base"), label=provider, **style)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("ms (median, log)")
        ax_t.set_title(f"{mode}: time per step")
        ax_r.axhline(1.0, color="grey", linewidth=0.8)
        ax_r.set_ylabel("time / base")
        ax_r.set_title(f"{mode}: ratio to base (F.linear alone, the floor)")
        for ax in (ax_t, ax_r):
            ax.grid(True, which="both", alpha=0.3)
    axes[-1][0].set_xticks(xs)
    axes[-1][0].set_xticklabels(labels, fontsize="small")
    axes[0][0].legend(fontsize="small", ncol=3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # leave the suptitle its own strip above the panels
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def print_table(rows, file=sys.stdout):
    print(markdown_table(rows), file=file)
