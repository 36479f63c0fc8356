"""Turns the suite's raw.json (benchmarks/test_bench_ops.py) into report.md, results.csv and report.png.

Speed-up is reference-eager median / provider median, for the same case in
the same run. Bandwidth: an op's GB/s counts the bytes of its inputs (each is
read once at best; the outputs are small); the copy provider moves the same
bytes in and out, so its GB/s counts them twice.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

BASELINE = "reference"
COPY = "copy"
COLUMNS = ["op", "case", "provider", "median_ms", "iqr_ms", "speedup_vs_reference", "peak_mb", "gb_per_s",
           "percent_of_copy_bandwidth", "gflop_per_s", "rounds", "threads"]


def _median_iqr(seconds: list[float]) -> tuple[float, float]:
    if len(seconds) < 2:
        return seconds[0], 0.0
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return statistics.median(seconds), q3 - q1


def load_rows(raw_json: Path) -> list[dict]:
    """The rows of raw.json (benchmarks/test_bench_ops.py: each provider's timed
    calls in seconds), with median, IQR, GB/s and the ratios to the reference."""
    data = json.loads(Path(raw_json).read_text())
    rows = []
    for result in data["results"]:
        median, iqr = _median_iqr(result["seconds"])
        moved = result["bytes"] * (2 if result["provider"] == COPY else 1)
        rows.append(dict(op=result["op"], case=result["case"], provider=result["provider"], group=result.get("group"),
                         description=result["description"], median_ms=median * 1e3, iqr_ms=iqr * 1e3,
                         peak_mb=result["peak_bytes"] / 2**20, gb_per_s=moved / median / 1e9 if moved else float("nan"),
                         rounds=len(result["seconds"]), threads=result["threads"],
                         gflop_per_s=result.get("flops", 0) / median / 1e9 if result.get("flops") else float("nan")))
    by_case = defaultdict(dict)
    for row in rows:
        by_case[(row["op"], row["case"])][row["provider"]] = row
    for providers in by_case.values():
        base, copy = providers.get(BASELINE), providers.get(COPY)
        for row in providers.values():
            row["speedup_vs_reference"] = base["median_ms"] / row["median_ms"] if base else float("nan")
            row["percent_of_copy_bandwidth"] = (100 * row["gb_per_s"] / copy["gb_per_s"]
                                                if copy and row["provider"] != COPY else float("nan"))
    return rows


def _percent(value: float) -> str:
    return "" if value != value else f"{value:.0f}%"


def markdown(rows: list[dict]) -> str:
    lines = ["# medmtl benchmark report", "",
             f"{rows[0]['threads'] if rows else '?'} threads; all providers of a case run in one process on the "
             "same inputs, taking turns round by round (each round: one untimed call, then one timed call, of "
             "every provider). Speed-up = reference-eager median / median. Peak = bytes allocated through torch during "
             "one call. GB/s counts the inputs' bytes (twice for the copy, which reads and writes them).", ""]
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    for op, case in cases:
        case_rows = [r for r in rows if r["op"] == op and r["case"] == case]
        with_copy = any(r["provider"] == COPY for r in case_rows)
        with_flops = any(r["gflop_per_s"] == r["gflop_per_s"] for r in case_rows)
        lines += [f"## {op}: {case}", "", case_rows[0]["description"] + f" ({case_rows[0]['rounds']} rounds)", ""]
        header = "| provider | median ms | IQR ms | speed-up vs reference | peak MB |"
        rule = "|---|---:|---:|---:|---:|"
        if with_copy:
            header += " GB/s | % of copy GB/s |"
            rule += "---:|---:|"
        if with_flops:
            header += " GFLOP/s |"
            rule += "---:|"
        lines += [header, rule]
        for r in case_rows:
            line = (f"| {r['provider']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | "
                    f"{r['speedup_vs_reference']:.2f}x | {r['peak_mb']:.2f} |")
            if with_copy:
                line += f" {r['gb_per_s']:.1f} | {_percent(r['percent_of_copy_bandwidth'])} |"
            if with_flops:
                line += f" {r['gflop_per_s']:.1f} |"
            lines.append(line)
        lines.append("")
    groups = [g for g in dict.fromkeys(r.get("group") for r in rows) if g]
    if groups:
        lines += ["## Summed over the cases of a group", "",
                  "| group | provider | summed median ms | speed-up vs reference | max peak MB | peak vs reference |",
                  "|---|---|---:|---:|---:|---:|"]
        for group in groups:
            group_rows = [r for r in rows if r.get("group") == group]
            providers = list(dict.fromkeys(r["provider"] for r in group_rows))
            total = {p: sum(r["median_ms"] for r in group_rows if r["provider"] == p) for p in providers}
            peak = {p: max(r["peak_mb"] for r in group_rows if r["provider"] == p) for p in providers}
            for p in providers:
                speedup = total.get(BASELINE, float("nan")) / total[p]
                peak_ratio = peak[p] / peak[BASELINE] if peak.get(BASELINE) else float("nan")
                lines.append(f"| {group} | {p} | {total[p]:.1f} | {speedup:.2f}x | {peak[p]:.1f} | {peak_ratio:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> list[str]:
    """One panel per op: a row of bars per case (one bar per provider), the speed-up
    against the reference eager on a log axis (1x marked). Returns the panels' titles."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = list(dict.fromkeys(r["op"] for r in rows))
    # the reference is 1x by definition: the line at 1 stands for it
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p not in (COPY, BASELINE)]
    columns = 2 if len(ops) > 1 else 1
    panel_rows = math.ceil(len(ops) / columns)
    cases_per_op = {op: list(dict.fromkeys(r["case"] for r in rows if r["op"] == op)) for op in ops}
    tallest = max(len(c) for c in cases_per_op.values()) if ops else 1
    fig, axes = plt.subplots(panel_rows, columns, squeeze=False,
                             figsize=(7.5 * columns, 0.6 + panel_rows * (0.9 + 0.32 * tallest * len(providers) / 2)))
    height = 0.8 / max(len(providers), 1)
    for ax, op in zip(axes.flat, ops):
        cases = cases_per_op[op]
        for j, provider in enumerate(providers):
            values = [next((r["speedup_vs_reference"] for r in rows
                            if r["op"] == op and r["case"] == c and r["provider"] == provider), float("nan"))
                      for c in cases]
            ax.barh([i + j * height for i in range(len(cases))], values, height, label=provider,
                    color=f"C{j}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([i + height * (len(providers) - 1) / 2 for i in range(len(cases))], cases, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("speed-up vs reference eager (log)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(providers), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ops


def write_report(raw_json: Path, out_dir: Path) -> str:
    rows = load_rows(raw_json)
    out_dir = Path(out_dir)
    text = markdown(rows)
    (out_dir / "report.md").write_text(text + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / "report.png")
    return text
