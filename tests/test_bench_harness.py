"""The benchmark harness itself (not a timing): providers interleaved round by
round, and the report's medians and ratios from the raw timings."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import load_rows, markdown, plot
from benchmarks.test_bench_ops import time_interleaved


def test_rounds_interleave_every_provider_untimed_then_timed():
    calls = []
    providers = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(providers, rounds=4)
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    # Two calls (untimed, timed) per provider per round, the order rotating.
    assert calls == ["a", "a", "b", "b", "c", "c",
                     "b", "b", "c", "c", "a", "a",
                     "c", "c", "a", "a", "b", "b",
                     "a", "a", "b", "b", "c", "c"]
    assert all(t >= 0 for ts in times.values() for t in ts)


def _result(provider, seconds, case="C1", group="g"):
    return dict(op="op", case=case, provider=provider, description="d", group=group, bytes=8_000_000, threads=2,
                peak_bytes=2**20, seconds=seconds)


def test_report_rows_take_medians_and_ratios_from_the_raw_timings(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"results": [
        _result("reference", [0.004, 0.001, 0.002, 0.003, 0.100]),   # median 3 ms
        _result("medmtl cpu", [0.0015, 0.0010, 0.0020]),             # median 1.5 ms
    ]}))
    rows = {r["provider"]: r for r in load_rows(raw)}
    assert rows["reference"]["median_ms"] == pytest.approx(3.0)
    assert rows["medmtl cpu"]["median_ms"] == pytest.approx(1.5)
    assert rows["medmtl cpu"]["speedup_vs_reference"] == pytest.approx(2.0)
    assert rows["reference"]["rounds"] == 5 and rows["medmtl cpu"]["rounds"] == 3
    assert rows["reference"]["gb_per_s"] == pytest.approx(8e6 / 3e-3 / 1e9)
    assert rows["reference"]["iqr_ms"] > 0
    assert "| medmtl cpu | 1.500 |" in markdown(list(rows.values()))


def test_report_plot_has_one_readable_panel_per_op(tmp_path):
    from PIL import Image

    rows = [dict(op=op, case=f"case {c}", provider=p, speedup_vs_reference=s)
            for op in ("multiscale_pool", "window_attention", "dilated_feature_enhancement")
            for c in range(6) for p, s in (("reference", 1.0), ("medmtl cpu", 5.0), ("compile", 0.7))]
    assert plot(rows, tmp_path / "report.png") == ["multiscale_pool", "window_attention",
                                                   "dilated_feature_enhancement"]
    width, height = Image.open(tmp_path / "report.png").size
    assert width <= 2000 and height <= 3000  # two columns of panels, not one strip per case
