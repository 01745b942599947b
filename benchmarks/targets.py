"""Issue 4's targets, read off benchmark results: ``python -m benchmarks.targets RESULTS.json
[--dropout DROPOUT_RESULTS.json] [--out FILE]``.

Each ratio comes from one run (times measured side by side, and in turn where the run timed the pair
so: benchmarks.run.time_in_turn; marked ‡ where not); the speedup over peft is taken from
the dropout run when one is given (peft's common lora_dropout = 0.1, against fused with the same
dropout), else from the main run. The anchor is 8192 tokens at rank 16; rank 64 and 2048 tokens
are reported against the same bounds, to show where each target holds and where not. A speedup
whose baseline is itself less than the bound over the bare base is out of reach for a layer that
runs the base's products: the cell then gives the bare base's own speedup over that baseline
("base's: C"), which such a layer cannot beat but for timing noise.
"""

import argparse
import json

# (column, mode, the ratio of two providers' times, bound: at most it over base, at least it as a speedup)
TARGETS = [
    ("forward × base", "forward", "fused/base", 1.05),
    ("fwd+bwd × base", "forward+backward", "fused/base", 1.10),
    ("speedup vs peft", "forward+backward", "peft/fused", 1.5),
    ("speedup vs addmm", "forward+backward", "addmm/fused", 1.2),
    ("speedup vs compiled", "forward+backward", "compiled/fused", 1.15),
]


def _times(rows):
    return {(r["K"], r["N"], r["tokens"], r["rank"], r["mode"], r["provider"]): r["ms"] for r in rows if r["ms"]}


def _in_turn(rows):
    """Each provider's time over base's from the times in turn (benchmarks.run.time_in_turn), where
    the run has them, and base's own, 1.0: the ratio of two of these is the ratio of the two
    providers' times in turn."""
    return {(r["K"], r["N"], r["tokens"], r["rank"], r["mode"], r["provider"]):
            1.0 if r["provider"] == "base" else r["x_base_in_turn"] for r in rows
            if r["provider"] == "base" or r.get("x_base_in_turn")}


def _statuses(rows):
    return {(r["K"], r["N"], r["tokens"], r["rank"], r["mode"], r["provider"]): r.get("status") for r in rows}


def _missing(statuses, key, provider):
    """Why a provider has no time here: "fused WRONG" (ERROR, SKIPPED), or "—" when it did not run."""
    status = statuses.get((*key, provider))
    return f"{provider} {status.split()[0].rstrip(':,')}" if status else "—"


def _incomplete(results, which):
    return [f"**INCOMPLETE** ({which}): {n.removeprefix('INCOMPLETE: ')}." for n in results.get("notes", [])
            if n.startswith("INCOMPLETE")]


# What a dropout run must share with the main run for its speedup over peft to stand beside the rest.
SAME_SETUP = ("card", "device", "versions", "settings", "dtype", "adapter_dtype", "alpha", "trainable_base")


def check_same_setup(results, dropout_results):
    """Raise ValueError naming each setting in which the dropout run differs from the main run."""
    def setting(run, k):  # (a run from before adapter_dtype was recorded held its adapters in its dtype)
        return run.get(k, run.get("dtype")) if k == "adapter_dtype" else run.get(k)
    diffs = [f"{k}: {setting(results, k)!r} in the main run, {setting(dropout_results, k)!r} in the dropout run"
             for k in SAME_SETUP if setting(results, k) != setting(dropout_results, k)]
    if diffs:
        raise ValueError("the dropout run was not made like the main run, so its speedup over peft would "
                         "not stand beside the other targets: " + "; ".join(diffs))


def table(results, dropout_results=None):
    """Markdown: one line per (shape, tokens, rank), a cell per target with its ratio and ✓ or ✗;
    where a provider has no time, its status (WRONG, ERROR, SKIPPED) instead. A dropout run made
    otherwise than the main run (``SAME_SETUP``) raises ValueError."""
    if dropout_results:
        check_same_setup(results, dropout_results)
    times, statuses, in_turn = _times(results["rows"]), _statuses(results["rows"]), _in_turn(results["rows"])
    if dropout_results:
        peft_times, peft_statuses = _times(dropout_results["rows"]), _statuses(dropout_results["rows"])
        peft_in_turn = _in_turn(dropout_results["rows"])
        covered = {(r["K"], r["N"], r["tokens"], r["rank"]) for r in dropout_results["rows"]}
    configs = list(dict.fromkeys((r["K"], r["N"], r["tokens"], r["rank"]) for r in results["rows"]))
    lines = ["| shape | tokens | rank | " + " | ".join(t[0] for t in TARGETS) + " |",
             "|---|---:|---:|" + "---:|" * len(TARGETS)]
    for K, N, M, r in configs:
        cells = []
        for name, mode, ratio, bound in TARGETS:
            num, den = ratio.split("/")
            mark, why, run, turn = "", statuses, times, in_turn  # (the run the ratio comes from)
            a, b = (times.get((K, N, M, r, mode, p)) for p in (num, den))
            if num == "peft" and dropout_results:
                if (K, N, M, r) in covered:
                    a, b = (peft_times.get((K, N, M, r, mode, p)) for p in (num, den))
                    why, run, turn = peft_statuses, peft_times, peft_in_turn
                else:
                    mark = " †"  # the dropout run did not cover this configuration
            if a is None or b is None:  # say why (fused WRONG, peft SKIPPED, ...), not just "—"
                missing = [_missing(why, (K, N, M, r, mode), p) for p, t in ((num, a), (den, b)) if t is None]
                text = " / ".join(m for m in missing if m != "—") or "—"
                cells.append(text + (" (dropout run)" if why is not statuses and text != "—" else mark))
                continue
            # From the times in turn where the run has both (a run from before baselines were
            # timed in turn has fused's and base's only): else from the times measured apart, said.
            ta, tb = (turn.get((K, N, M, r, mode, p)) for p in (num, den))
            apart = not (ta and tb)
            value = a / b if apart else ta / tb
            # Times over base must stay under the bound; speedups must reach it.
            ok = value <= bound if den == "base" else value >= bound
            cell = f"{value:.2f} {'✓' if ok else '✗'}{mark}" + (" ‡" if apart else "")
            # The fused layer runs the base's own products and more, so its speedup over a baseline
            # is at most the base's own, baseline / base (the same run's, and the same timing's):
            # below the bound, the target is out of reach on that card for a layer whose GEMMs are
            # no faster than the base's (cuBLAS). (Not worded "at most": a noisy run may time fused
            # under base.)
            base = run.get((K, N, M, r, mode, "base"))
            own = (a / base if base else None) if apart else ta
            if den == "fused" and own and own < bound:
                cell += f" (base's: {own:.2f})"
            cells.append(cell)
        lines.append(f"| {K}→{N} | {M} | {r} | " + " | ".join(cells) + " |")
    bounds = ", ".join(f"{name} {'≤' if ratio.endswith('base') else '≥'} {bound}"
                       for name, _, ratio, bound in TARGETS)
    head = _incomplete(results, "the main run") + (_incomplete(dropout_results, "the dropout run") if dropout_results else [])
    head += [f"Targets on {results['card']}, {results['date']} ({results['dtype']}): {bounds}.",
            "Ratios of times measured side by side in one run, from the providers timed again in turn at the "
            "end of each configuration (base, fused, ..., fused, base: benchmarks.run.time_in_turn); ‡: from "
            "the times measured apart, where the run did not time that pair in turn; (base's: C): the "
            "bare base's own speedup over that baseline, where it is below the bound: a layer that runs the "
            "base's products and more cannot beat it, but for timing noise"
            + (f"; vs peft from the run with LoRA dropout {dropout_results['dropout']} on both "
               "(†: a configuration that run did not cover, taken without dropout)."
               if dropout_results else "; vs peft without dropout."), ""]
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a benchmarks.run sweep")
    p.add_argument("--dropout", metavar="RESULTS", help="results.json of a run with --dropout (for peft)")
    p.add_argument("--out", metavar="FILE", help="also write the table here")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    dropout = None
    if args.dropout:
        with open(args.dropout) as f:
            dropout = json.load(f)
    try:
        text = table(results, dropout)
    except ValueError as e:
        p.error(str(e))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
