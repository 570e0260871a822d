"""Tables and plots for `foe bench forward` results (reads the JSON dict, computes nothing new)."""

from __future__ import annotations

from pathlib import Path

from foe.tables import align_right


def table(result: dict) -> str:
    head = ("mode", "batch", "strategy", "median ms", "p10-p90 ms", "B/tok/layer intra", "B/tok/layer inter",
            "calls/layer", "comm ms", "imbalance")
    lines = [head]
    for r in sorted(result["results"], key=lambda r: (r["mode"], r["batch"], r["strategy"])):
        calls = ", ".join(f"{v:g} {k.replace('all_to_all_counts', 'a2a-counts').replace('all_to_all', 'a2a').replace('all_reduce', 'ar')}"
                          for k, v in sorted(r["collective_calls_per_layer"].items()))
        lines.append((r["mode"], str(r["batch"]), f"{r['strategy']} ({r['arch']})", f"{r['latency_ms_median']:.1f}",
                      f"{r['latency_ms_p10']:.1f}-{r['latency_ms_p90']:.1f}",
                      f"{r['bytes_per_token_per_layer_intra']:,.0f}", f"{r['bytes_per_token_per_layer_inter']:,.0f}",
                      calls or "-", f"{r['comm_ms_per_forward']:.1f}", f"{r['load_imbalance_max_over_mean']:.2f}"))
    out = align_right(lines, rule=True)
    rat = [("mode", "batch", "MoE strategy", "latency MoE/FoE", "bytes MoE/FoE")]
    for r in result["ratios"]:
        rat.append((r["mode"], str(r["batch"]), r["moe_strategy"], f"{r['latency_ratio']:.2f}x", f"{r['bytes_ratio']:.2f}x"))
    return out + "\n\nMoE time / FoE (gp) time, same ranks, same global batch:\n" + align_right(rat, rule=True)


def plot(result: dict, path: str | Path) -> Path:
    from foe.plotting import pyplot, save_figure
    plt = pyplot()
    modes = sorted({r["mode"] for r in result["results"]}, reverse=True)
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        rows = [r for r in result["results"] if r["mode"] == mode]
        for s in sorted({r["strategy"] for r in rows}):
            rs = sorted((r for r in rows if r["strategy"] == s), key=lambda r: r["batch"])
            x = [r["batch"] for r in rs]
            lab = f"{s} ({rs[0]['arch'].upper()})"
            axes[0, j].errorbar(x, [r["latency_ms_median"] for r in rs],
                                yerr=[[r["latency_ms_median"] - r["latency_ms_p10"] for r in rs],
                                      [r["latency_ms_p90"] - r["latency_ms_median"] for r in rs]],
                                marker="o", capsize=3, label=lab)
            axes[1, j].plot(x, [r["bytes_per_token_per_layer_intra"] + r["bytes_per_token_per_layer_inter"] for r in rs],
                            marker="o", label=lab)
        for ax, ylabel in ((axes[0, j], "forward latency, ms (median, p10-p90)"),
                           (axes[1, j], "bytes moved per token per layer")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (sequences)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
            ax.grid(alpha=0.3)
            ax.legend()
    cfg = result["config"]
    where = f" on {cfg['nnodes']} nodes" if cfg.get("nnodes", 1) > 1 else ""
    how = "NCCL, CUDA" if cfg.get("device") == "cuda" else "gloo, CPU"
    fig.suptitle(f"foe bench forward: preset {cfg['preset']}, {cfg['nproc']} ranks{where} ({how})")
    return save_figure(fig, path)
