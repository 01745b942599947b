"""The benchmark's own bookkeeping: the issue-4 targets table, and a sweep stopped by its time
limit still writing what it measured (the GPU run is too short to lose a sweep to a timeout)."""

import json
import os
import signal

import pytest

pytest.importorskip("matplotlib")

from benchmarks import run, targets  # noqa: E402


def _rows(times, K=4096, N=1024, M=8192, r=16):
    return [{"K": K, "N": N, "tokens": M, "rank": r, "mode": mode, "provider": p, "ms": ms}
            for (mode, p), ms in times.items()]


def test_targets_table_ratios_and_verdicts():
    main = {"card": "GPU", "date": "2026-11-28", "dtype": "bfloat16", "rows": _rows({
        ("forward", "base"): 1.00, ("forward", "fused"): 1.04,                       # 1.04 <= 1.05: met
        ("forward+backward", "base"): 2.00, ("forward+backward", "fused"): 2.30,     # 1.15 > 1.10: missed
        ("forward+backward", "peft"): 9.99, ("forward+backward", "addmm"): 2.80,     # 1.22 >= 1.2: met
        ("forward+backward", "compiled"): 2.50})}                                    # 1.09 < 1.15: missed
    dropout = {"dropout": 0.1, "rows": _rows({("forward+backward", "peft"): 3.0, ("forward+backward", "fused"): 2.5})}
    line = [ln for ln in targets.table(main, dropout).splitlines() if ln.startswith("| 4096→1024")]
    assert line == ["| 4096→1024 | 8192 | 16 | 1.04 ✓ | 1.15 ✗ | 1.20 ✗ | 1.22 ✓ | 1.09 ✗ |"]
    # Without a dropout run, peft's ratio comes from the main run; so it does, marked, for a
    # configuration the dropout run did not cover.
    assert "| 4.34 ✓ |" in targets.table(main)
    other = {**dropout, "rows": [dict(row, tokens=2048) for row in dropout["rows"]]}
    assert "| 4.34 ✓ † |" in targets.table(main, other)


def test_stopped_sweep_still_writes_its_results(tmp_path, monkeypatch):
    """A SIGTERM (what `timeout` sends) in the second configuration: the first is written."""
    calls = []
    real = run.bench_provider

    def stop_in_second_config(name, weights, *args):
        calls.append(weights.shape)
        if len(set(calls)) > 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name, weights, *args)

    monkeypatch.setattr(run, "bench_provider", stop_in_second_config)
    run.main(["--device", "cpu", "--shapes", "32x48,64x32", "--tokens", "16", "--ranks", "4",
              "--providers", "base,fused", "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    (folder,) = tmp_path.iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert {(r["K"], r["N"]) for r in saved["rows"]} == {(32, 48)}  # the first configuration, whole
    assert all(r["ms"] > 0 for r in saved["rows"])
    assert any("INCOMPLETE: stopped by signal 15 after 1 of 2" in n for n in saved["notes"])
    assert "INCOMPLETE" in (folder / "report.md").read_text()
