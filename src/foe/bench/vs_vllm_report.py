"""The foe / vLLM ratio table (and a plot) from `foe bench vs-vllm` runs; measures nothing.

Per run (one engine, one repeat, one scenario): output throughput and the median over requests of
TTFT, TPOT and E2E (`foe bench serve`'s keys). Repeat r of foe is divided by repeat r of vLLM; the
table gives the median over repeats of each engine's value and of the ratio, and the ratios' range,
which is the noise the repeats show. Throughput ratio > 1: foe faster; latency ratio < 1: foe faster.
A stream whose median gap between events is under BURST_MS arrived in bursts (a starved API process or
client reads many tokens at once): its TTFT and TPOT then are not per-token times, and the table says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (key in a run's result, label, unit)
RATIO_METRICS = (("output_throughput", "throughput", "tok/s"), ("median_ttft_ms", "TTFT p50", "ms"),
                 ("median_tpot_ms", "TPOT p50", "ms"), ("median_e2el_ms", "E2E p50", "ms"))
BURST_MS = 0.1
SCENARIO_LABELS = {"saturation": "all at once", "rate": "fixed rate", "single": "one at a time"}


def _by_repeat(runs: Sequence[dict[str, Any]], engine: str, scenario: str) -> dict[int, dict[str, Any]]:
    return {r["repeat"]: r for r in runs if r["engine"] == engine and r["scenario"] == scenario}


def ratio_rows(runs: Sequence[dict[str, Any]], scenarios: Sequence[str]) -> list[dict[str, Any]]:
    """One row per scenario and metric: per-repeat values of both engines, their ratios and medians."""
    rows = []
    for sc in scenarios:
        foe, vllm = _by_repeat(runs, "foe", sc), _by_repeat(runs, "vllm", sc)
        repeats = sorted(set(foe) & set(vllm))
        if not repeats:
            raise ValueError(f"scenario {sc!r}: no repeat was run on both engines")
        failed = {e: sum(d[r]["failed"] for r in repeats) for e, d in (("foe", foe), ("vllm", vllm))}
        bursty = [e for e, d in (("foe", foe), ("vllm", vllm))
                  if any(d[r].get("median_itl_ms", BURST_MS) < BURST_MS for r in repeats)]
        ref = vllm[repeats[0]]
        for key, label, unit in RATIO_METRICS:
            f = [float(foe[r][key]) for r in repeats]
            v = [float(vllm[r][key]) for r in repeats]
            ratios = [a / b if b > 0 else float("nan") for a, b in zip(f, v)]
            rows.append({"scenario": sc, "metric": key, "label": label, "unit": unit,
                         "num_prompts": ref["num_prompts"], "request_rate": ref["request_rate"],
                         "foe": f, "vllm": v, "ratios": ratios, "foe_median": statistics.median(f),
                         "vllm_median": statistics.median(v), "ratio_median": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios), "failed": failed,
                         "bursty": bursty})
    return rows


def scenario_label(row: dict[str, Any]) -> str:
    rate = f" {row['request_rate']:g}/s" if row["scenario"] == "rate" else ""
    return f"{SCENARIO_LABELS.get(row['scenario'], row['scenario'])}{rate}, {row['num_prompts']} req"


def format_ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    """foe / vLLM per scenario and metric: medians over repeats, the ratio's median and range."""
    n = len(rows[0]["ratios"]) if rows else 0
    head = ("scenario", "metric", "foe", "vLLM", "foe/vLLM", f"range ({n} repeat{'s' * (n != 1)})")
    body, notes = [], []
    last = None
    for row in rows:
        sc = scenario_label(row)
        body.append((sc if sc != last else "", f"{row['label']} ({row['unit']})", f"{row['foe_median']:.1f}",
                     f"{row['vllm_median']:.1f}", f"{row['ratio_median']:.2f}",
                     f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"))
        if sc != last and any(row["failed"].values()):
            notes.append(f"{sc}: {row['failed']['foe']} foe / {row['failed']['vllm']} vLLM requests failed")
        if sc != last and row.get("bursty"):
            names = " and ".join("vLLM" if e == "vllm" else e for e in row["bursty"])
            notes.append(f"{sc}: {names}'s tokens arrived in bursts (median gap between stream events "
                         f"< {BURST_MS:g} ms): its TTFT/TPOT are not per-token times; compare E2E")
        last = sc
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = ["foe serve / vLLM (throughput > 1 or latency < 1: foe better); values are medians over repeats",
             fmt(head), "-" * len(fmt(head)), *map(fmt, body), *(f"* {n}" for n in notes)]
    return "\n".join(line.rstrip() for line in lines)


def plot_ratios(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per metric: the foe/vLLM ratio of each repeat (dots) and their median (bar) per scenario."""
    from foe.plotting import pyplot, save_figure
    plt = pyplot()
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mine = [r for r in rows if r["metric"] == metric]
        xs = range(len(mine))
        ax.bar(xs, [r["ratio_median"] for r in mine], color="C1", alpha=0.6)
        for x, r in zip(xs, mine):
            ax.plot([x] * len(r["ratios"]), r["ratios"], "k.", ms=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [SCENARIO_LABELS.get(r["scenario"], r["scenario"]) for r in mine],
                      rotation=20, fontsize=8)
        ax.set_title(f"{mine[0]['label']}: foe / vLLM")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
