"""Table and plot for `foe bench model` results (the dict `model_latency.run_model_bench` returns).

Reads results only; runs nothing.
"""

from __future__ import annotations

from pathlib import Path

from foe.tables import align_right


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}-{t['p90_ms']:.2f})"


def format_table(result: dict) -> str:
    """One line per (phase, seq len, batch): medians with p10-p90, ratios and fraction of the floor."""
    m = result["machine"]
    r = m["rates"]
    gpu = None if m.get("device", "cpu") == "cpu" else m["device"]  # older JSON has no "device"
    lines = [
        f"preset {result['settings']['preset']}: MoE {result['params']['moe'] / 1e6:.2f}M params, "
        f"FoE {result['params']['foe'] / 1e6:.2f}M; {gpu + ', host ' if gpu else ''}"
        f"{m['cpu']}, {m['cores']} cores, {r['threads']} threads, "
        f"torch {m['torch']}; load average {m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after",
        f"machine: {result['settings'].get('dtype', 'float32')} matmul {r['matmul_gflops']:.0f} GFLOP/s "
        f"({r['matmul_size']}^2), copy "
        f"{r['copy_gbps']:.1f} GB/s ({r['copy_mib']} MiB, read+write); floor = max(FLOPs/rate, bytes/bandwidth)",
        f"times in ms ({result['settings']['clock']} clock): median (p10-p90) of {result['settings']['repeats']}; "
        "naive = HF Mixtral-style per-expert loop (MoE weights)",
    ]
    has_naive = any("naive" in row["timings"] for row in result["rows"])
    head = ["phase", "L", "B", "tokens", "MoE ms", "FoE ms"] + (["naive ms"] if has_naive else []) + \
        ["FoE/MoE"] + (["naive/MoE", "naive/FoE"] if has_naive else []) + ["floor ms", "MoE %floor", "FoE %floor"]
    table = [head]
    for row in result["rows"]:
        t, d = row["timings"], row["derived"]
        cells = [row["phase"], str(row["seq_len"]), str(row["batch"]), str(row["new_tokens"]),
                 _ms(t["moe"]), _ms(t["foe"])]
        if has_naive:
            cells.append(_ms(t["naive"]) if "naive" in t else "-")
        cells.append(f"{d['foe_over_moe']:.2f}")
        if has_naive:
            cells += [f"{d['moe_speedup_vs_naive']:.2f}x" if "naive" in t else "-",
                      f"{d['foe_speedup_vs_naive']:.2f}x" if "naive" in t else "-"]
        cells += [f"{row['floor_ms']['moe']:.2f}", f"{100 * d['moe_frac_floor']:.0f}%",
                  f"{100 * d['foe_frac_floor']:.0f}%"]
        table.append(cells)
    lines.append(align_right(table))
    if result.get("feed_forward_rows"):
        lines.append(format_feed_forward(result))
    if result.get("skipped"):
        lines.append("skipped (B * L > --max-prefill-tokens): " + ", ".join(
            f"{s['phase']} B={s['batch']} L={s['seq_len']}" for s in result["skipped"]))
    lines.append(format_targets(result))
    return "\n".join(lines)


def format_feed_forward(result: dict) -> str:
    """The feed-forward layer alone: what the fast path replaces, without the shared attention."""
    rows = result["feed_forward_rows"]
    has_naive = any("naive" in r["timings"] for r in rows)
    head = ["tokens", "MoE ms", "FoE ms"] + (["naive ms"] if has_naive else []) + ["FoE/MoE"] + \
        (["naive/MoE", "naive/FoE"] if has_naive else []) + ["floor ms", "MoE %floor", "FoE %floor"] + \
        (["naive %floor"] if has_naive else [])
    table = [head]
    for row in rows:
        t, d = row["timings"], row["derived"]
        naive = "naive" in t
        cells = [str(row["tokens"]), _ms(t["moe"]), _ms(t["foe"])]
        cells += [_ms(t["naive"]) if naive else "-"] if has_naive else []
        cells.append(f"{d['foe_over_moe']:.2f}")
        if has_naive:
            cells += [f"{d['moe_speedup_vs_naive']:.2f}x" if naive else "-",
                      f"{d['foe_speedup_vs_naive']:.2f}x" if naive else "-"]
        cells += [f"{row['floor_ms']['moe']:.3f}", f"{100 * d['moe_frac_floor']:.0f}%",
                  f"{100 * d['foe_frac_floor']:.0f}%"]
        cells += [f"{100 * d['naive_frac_floor']:.0f}%" if naive else "-"] if has_naive else []
        table.append(cells)
    return "one feed-forward layer alone (layer 0; router + experts + combine):\n" + align_right(table)


def format_targets(result: dict) -> str:
    out = ["targets: fast path >= 3x naive at batch >= 16; prefill within 2x of the floor"]
    targets = result["targets"]
    for arch in ("moe", "foe"):
        t = targets[arch]
        s = t["min_speedup_vs_naive_batch_ge_16"]
        f = t["max_prefill_over_floor"]
        speed = "n/a" if s is None else f"worst {s:.2f}x -> {'met' if t['speedup_target_met'] else 'NOT met'}"
        ffn = t.get("ffn_min_speedup_vs_naive_tokens_ge_16")
        speed += "" if ffn is None else f" (feed-forward alone, >= 16 tokens: worst {ffn:.2f}x)"
        floor = "n/a" if f is None else f"worst {f:.2f}x floor -> {'met' if t['floor_target_met'] else 'NOT met'}"
        out.append(f"  {arch}: speedup vs naive {speed}; prefill {floor}")
    b = targets.get("bound")
    if b:
        verdict = ("so 3x is out of reach on this machine" if b["max_possible_speedup"] < 3
                   else "so 3x is possible in principle")
        out.append(f"  bound: at {b['phase']} B={b['batch']} L={b['seq_len']} the naive loop already runs at "
                   f"{100 * b['naive_frac_floor']:.0f}% of the floor: no code can be more than "
                   f"{b['max_possible_speedup']:.2f}x faster there, {verdict}")
    return "\n".join(out)


def plot(result: dict, path: str | Path) -> Path:
    """Latency against batch size, one panel per phase, a line per variant and seq len, floor dashed."""
    from foe.plotting import pyplot, save_figure
    plt = pyplot()

    rows, ffn_rows = result["rows"], result.get("feed_forward_rows") or []
    phases = [p for p in ("prefill", "decode") if any(r["phase"] == p for r in rows)]
    panels = len(phases) + bool(ffn_rows)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    styles = {"moe": ("tab:blue", "o"), "foe": ("tab:orange", "s"), "naive": ("tab:gray", "^")}
    if ffn_rows:
        _plot_feed_forward(axes[0][-1], ffn_rows, styles)
    for ax, phase in zip(axes[0], phases):
        for i, L in enumerate(sorted({r["seq_len"] for r in rows if r["phase"] == phase})):
            sel = sorted((r for r in rows if r["phase"] == phase and r["seq_len"] == L), key=lambda r: r["batch"])
            bs = [r["batch"] for r in sel]
            dash = (0, (1, 1)) if i % 2 else "solid"
            for name, (color, marker) in styles.items():
                if all(name in r["timings"] for r in sel):
                    ax.plot(bs, [r["timings"][name]["median_ms"] for r in sel], color=color, marker=marker,
                            linestyle=dash, label=f"{name} L={L}")
            ax.plot(bs, [r["floor_ms"]["moe"] for r in sel], color="black", linestyle="-." if i % 2 else "--",
                    linewidth=1, label=f"floor L={L}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("forward latency, ms (median)")
        what = "L new tokens per sequence" if phase == "prefill" else "1 new token, L cached"
        ax.set_title(f"{phase}: {what}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    r = result["machine"]["rates"]
    fig.suptitle(f"foe bench model, preset {result['settings']['preset']}: {r['threads']} threads, "
                 f"{result['settings']['clock']} clock, "
                 f"{r['matmul_gflops']:.0f} GFLOP/s, {r['copy_gbps']:.1f} GB/s")
    return save_figure(fig, path)


def _plot_feed_forward(ax, rows: list[dict], styles: dict[str, tuple[str, str]]) -> None:
    """One feed-forward layer alone: latency against tokens, each variant and the floor."""
    tokens = [r["tokens"] for r in rows]
    for name, (color, marker) in styles.items():
        if all(name in r["timings"] for r in rows):
            ax.plot(tokens, [r["timings"][name]["median_ms"] for r in rows], color=color, marker=marker, label=name)
    ax.plot(tokens, [r["floor_ms"]["moe"] for r in rows], color="black", linestyle="--", linewidth=1, label="floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("latency, ms (median)")
    ax.set_title("one feed-forward layer alone")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
