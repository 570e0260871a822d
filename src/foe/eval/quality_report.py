"""The report of `foe compare-quality` (foe.eval.quality_study): the printed tables and the PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHS = ("moe", "foe")
LABEL = {"moe": "MoE", "foe": "FoE"}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _iv(d: dict[str, float], fmt: str = ".3f", pct: bool = False) -> str:
    f = (lambda v: f"{v:+.2%}") if pct else (lambda v: f"{v:{fmt}}")
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def format_study(r: dict[str, Any]) -> str:
    m = r["models"]
    seeds = r["seeds"]
    out = [f"MoE vs FoE, preset {r['preset']} (sync {r['sync']}): {m['moe']['params'] / 1e6:.2f}M parameters, "
           f"{m['moe']['active_params'] / 1e6:.2f}M active, {m['moe']['tokens_trained'] / 1e6:.2f}M training "
           f"tokens per run, {len(seeds)} seeds",
           "",
           f"1. Balance coefficient, tuned per architecture (seed {seeds[0]}; dev loss on the first "
           f"{r['dev_tokens']:,} held-out tokens; * = chosen):"]
    dev = {(s["arch"], s["aux_coef"]): s["dev_loss"] for s in r["sweep"]}
    rows = [["aux coef", "MoE dev loss", "FoE dev loss"]]
    for c in r["aux_coefs"]:
        rows.append([f"{c:g}"] + [f"{dev[(a, c)]:.4f}" + ("*" if r["best_aux_coef"][a] == c else " ") for a in ARCHS])
    out += [_table(rows), ""]
    out.append(f"2. Test loss (nats/token) on {r['test_tokens']:,} other held-out tokens, ± standard error over "
               f"windows; each at its own coefficient (MoE {r['best_aux_coef']['moe']:g}, FoE "
               f"{r['best_aux_coef']['foe']:g}):")
    rows = [["seed", "MoE", "FoE", "FoE - MoE", "relative"]]
    for tm, tf in zip(m["moe"]["test"], m["foe"]["test"]):
        d = tf["val_loss"] - tm["val_loss"]
        rows.append([str(tm["seed"]), f"{tm['val_loss']:.4f} ± {tm['val_loss_stderr']:.4f}",
                     f"{tf['val_loss']:.4f} ± {tf['val_loss_stderr']:.4f}", f"{d:+.4f}", f"{d / tm['val_loss']:+.2%}"])
    rows.append(["mean [95% CI]", _iv(m["moe"]["test_loss"], ".4f"), _iv(m["foe"]["test_loss"], ".4f"),
                 _iv(r["paired"]["diff"], "+.4f"), _iv(r["paired"]["rel"], pct=True)])
    out += [_table(rows), f"unigram baseline on the same tokens: {r['unigram_test_loss']:.4f}", ""]

    out.append("3. Expert load on the test windows (mean over seeds; coefficient of variation and max/mean of "
               "tokens per expert within each routing domain; 0 and 1 = perfectly even):")
    n_moe, n_foe = (m[a]["experts_per_domain"] for a in ARCHS)

    def load(a: str, key: str, metric: str) -> str:
        vals = [t[key][metric] for t in m[a]["test"]]
        return f"{sum(vals) / len(vals):.3f}"

    rows = [["", "MoE", "FoE"],
            [f"CV in own routing domain ({n_moe} / {n_foe} experts)", load("moe", "load_own", "load_cv"),
             load("foe", "load_own", "load_cv")],
            [f"CV in FoE's expert sets ({n_foe} experts)", load("moe", "load_in_foe_groups", "load_cv"),
             load("foe", "load_in_foe_groups", "load_cv")],
            ["max/mean in own routing domain", load("moe", "load_own", "load_max_over_mean"),
             load("foe", "load_own", "load_max_over_mean")]]
    out += [_table(rows), ""]
    if m["moe"]["test"][0]["mc"]:
        out.append("4. Multiple choice (zero-shot, lm-eval acc / acc_norm, mean over seeds ± lm-eval's stderr "
                   "over items):")
        rows = [["task", "n", "MoE", "FoE"]]
        for task in m["moe"]["test"][0]["mc"]:
            rows.append([task, str(m["moe"]["test"][0]["mc"][task]["n"])] + [_mc(m[a]["test"], task) for a in ARCHS])
        out += [_table(rows), ""]
    tps = {a: sum(m[a]["tok_per_s"]) / len(m[a]["tok_per_s"]) for a in ARCHS}
    out.append(f"training throughput (mean over seeds): MoE {tps['moe']:,.0f} tok/s, FoE {tps['foe']:,.0f} tok/s; "
               f"study wall time {r['wall_seconds'] / 60:.1f} min")
    v = r["verdict"]
    out += ["", f"Verdict (margin fixed up front: FoE's test loss within {r['margin']:.0%} of MoE's): "
            f"{v['text'].upper()}: {v['why']}."]
    return "\n".join(out)


def _mc(tests: list[dict[str, Any]], task: str) -> str:
    rs = [t["mc"][task] for t in tests]
    mean = {k: sum(x[k] for x in rs) / len(rs) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    return f"{mean['acc']:.3f} ± {mean['acc_stderr']:.3f} / {mean['acc_norm']:.3f} ± {mean['acc_norm_stderr']:.3f}"


def plot_study(r: dict[str, Any], path: Path) -> None:
    """Left: dev loss against training tokens at each architecture's chosen coefficient, the mean over
    seeds with a min-max band. Right: the coefficient sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for a, color in zip(ARCHS, ("tab:blue", "tab:orange")):
        m = r["models"][a]
        curves = list(m["curves"].values())
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        vals = [[dict(c)[s] for c in curves] for s in steps]
        x = [s * m["tokens_per_step"] / 1e6 for s in steps]
        mean = [sum(v) / len(v) for v in vals]
        ax.plot(x, mean, color=color, marker="o", ms=3,
                label=f"{LABEL[a]} (aux {m['aux_coef']:g}), mean of {len(curves)} seeds")
        ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.25, lw=0)
        sweep = sorted((s["aux_coef"], s["dev_loss"]) for s in r["sweep"] if s["arch"] == a)
        ax2.plot([c for c, _ in sweep], [v for _, v in sweep], color=color, marker="o", label=LABEL[a])
        ax2.plot([m["aux_coef"]], [dict(sweep)[m["aux_coef"]]], color=color, marker="*", ms=14)
    lo = min(min(v for _, v in c[len(c) // 3:]) for a in ARCHS for c in r["models"][a]["curves"].values())
    ax.set_ylim(lo - 0.1, lo + 1.2)  # the tail, where the architectures differ; the first evaluations are far above
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("dev loss (nats/token)")
    ax.set_title(f"preset {r['preset']}: validation loss, band = min-max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    if min(r["aux_coefs"]) > 0:
        ax2.set_xscale("log")
    ax2.set_xlabel("load-balancing coefficient")
    ax2.set_ylabel(f"final dev loss, seed {r['seeds'][0]}")
    ax2.set_title("sweep (* = chosen)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
