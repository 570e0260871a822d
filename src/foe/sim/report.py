"""Tables and PNG plots of cost-model results (matplotlib, Agg backend; no computation of costs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foe.plotting import pyplot, save_figure
from foe.sim.cost_model import ForwardTime

PARTS = ("compute", "all_to_all", "all_reduce", "imbalance", "overhead")


def forward_rows(results: list[ForwardTime]) -> list[list[Any]]:
    rows: list[list[Any]] = [["strategy", "batch", "total ms", "layer us", "compute", "all-to-all", "all-reduce",
                              "imbalance", "overhead", "a2a KiB/rank", "AR KiB/rank", "max/mean", "mem GB"]]
    for f in results:
        L = f.layer
        rows.append([f.strategy, f.batch, f"{f.total * 1e3:.3f}", f"{L.total * 1e6:.1f}"]
                    + [f"{getattr(L, p) * 1e6:.1f}" for p in PARTS]
                    + [f"{f.a2a_bytes_per_rank / 1024:.0f}", f"{f.allreduce_bytes_per_rank / 1024:.0f}",
                       f"{f.expert_imbalance:.2f}", f"{f.memory_per_rank / 1e9:.1f}" + ("" if f.fits else " !")])
    return rows


def _line_plot(curves: dict[str, tuple[Any, Any]], title: str, path: Path, xlabel: str, ylabel: str,
               log_base: float, unity_line: bool = False, marker: str | None = None) -> Path:
    """One panel of labelled lines over a log x axis, as every sim line plot draws it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=marker, label=label)
    if unity_line:
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=log_base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def plot_speedup(curves: dict[str, tuple[list[int], list[float]]], title: str, path: Path) -> Path:
    """curves: label -> (batch sizes, MoE time / FoE time)."""
    return _line_plot(curves, title, path, "batch size (sequences)", "predicted speedup (MoE time / FoE time)",
                      log_base=2, unity_line=True, marker="o")


def plot_breakdown(results: list[ForwardTime], title: str, path: Path) -> Path:
    """Stacked bars of one forward pass per strategy/batch: layer parts x n_layers, head + final sum + step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(results) + 2), 4.4))
    labels = [f"{f.strategy}\n{f.batch}" for f in results]
    bottom = [0.0] * len(results)
    for part in PARTS:
        vals = [getattr(f.layer, part) * f.n_layers * 1e3 for f in results]
        ax.bar(labels, vals, bottom=bottom, label=part.replace("_", "-"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    vals = [(f.head + f.final_sync + f.step_overhead) * 1e3 for f in results]
    ax.bar(labels, vals, bottom=bottom, label="head + final sum + step")
    ax.set_ylabel("forward-pass time (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    return save_figure(fig, path, dpi=120)


def plot_cdfs(samples: dict[str, Any], title: str, path: Path) -> Path:
    """Empirical CDFs: label -> 1-D array of seconds (plotted in ms; empty arrays are left out)."""
    import numpy as np
    curves = {}
    for label, x in samples.items():
        x = np.sort(np.asarray(x))
        if x.size:
            curves[label] = (x * 1e3, np.arange(1, x.size + 1) / x.size)
    return _line_plot(curves, title, path, "ms", "fraction of requests", log_base=10)
