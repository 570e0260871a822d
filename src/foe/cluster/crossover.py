"""The crossover: MoE/FoE forward latency measured on emulated clusters whose inter-node rate is swept
around the H100-scaled point, against the communication-to-compute quotient q, with the cost model's
prediction for the same emulated cluster on the same axes (`foe cluster sweep`).

For each factor f the cluster's inter-node rate is f x the `--scaled-to h100` rate (intra-node stays at the
scaled rate, or what the veth carries). `foe bench forward` then runs `ep`, `tp` and `gp` side by side on it.
Each point is plotted at q = (T x d_model x 4 B / rate) / t_here, where t_here is the same measured
per-rank layer compute that the scaling used, so that f = 1 sits at the H100 quotient.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from foe.cluster.jobs import forget_spec, run_job, save_spec
from foe.cluster.netns import bring_up, tear_down
from foe.cluster.scaling import Shape, scaled_to_h100
from foe.cluster.topology import ClusterSpec
from foe.config import ModelConfig

STRATEGIES = ("ep", "tp", "gp")


@dataclass(frozen=True)
class SweepConfig:
    preset: str = "small"
    nodes: int = 2
    ranks_per_node: int = 1
    factors: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    shape: Shape = field(default_factory=Shape)
    repeats: int = 5
    out_dir: str = "runs/crossover"
    name: str = "foesw"

    def __post_init__(self) -> None:
        if not self.factors or min(self.factors) <= 0:
            raise ValueError(f"factors must be positive, got {self.factors}")
        if self.nodes < 2:
            raise ValueError("the sweep varies the inter-node rate: it needs at least 2 nodes")


def _bench_argv(cfg: SweepConfig, out: Path) -> list[str]:
    sh = cfg.shape
    shape = (["--modes", "prefill", "--seq-len", str(sh.length)] if sh.phase == "prefill"
             else ["--modes", "decode", "--context-len", str(sh.length)])
    return [sys.executable, "-m", "foe.cli.main", "bench", "forward", "--preset", cfg.preset, "--strategies",
            ",".join(STRATEGIES), "--batch-sizes", str(sh.seqs), *shape, "--repeats", str(cfg.repeats),
            "--warmup", "2", "--out", str(out)]


def predicted(cfg: SweepConfig, inter_bytes_per_s: float, intra_bytes_per_s: float | None) -> dict[str, float]:
    """The cost model's forward latency (s) per strategy on the emulated cluster: this machine's calibrated
    `cpu-gloo` compute, with the links at the emulated rates."""
    from foe.sim.batch import Batch
    from foe.sim.cost_model import forward_time
    from foe.sim.hardware import get_cluster
    from foe.sim.imbalance import load_routing_stats
    base = get_cluster("cpu-gloo")
    inter = dataclasses.replace(base.inter, bandwidth=inter_bytes_per_s, efficiency=1.0)
    intra = base.intra if intra_bytes_per_s is None else dataclasses.replace(base.intra, bandwidth=intra_bytes_per_s,
                                                                             efficiency=1.0)
    cluster = base.replace(nodes=cfg.nodes, devices_per_node=cfg.ranks_per_node, inter=inter, intra=intra)
    sh = cfg.shape
    batch = Batch.prefill(sh.seqs, sh.length) if sh.phase == "prefill" else Batch.decode(sh.seqs, sh.length)
    out = {}
    for s in STRATEGIES:
        model = ModelConfig.from_preset(cfg.preset, arch="foe" if s == "gp" else "moe")
        out[s] = forward_time(model, s, cluster, batch, load_routing_stats()).total
    return out


def run_sweep(cfg: SweepConfig) -> dict:
    """Every factor's run and prediction; writes crossover.json and crossover.png under cfg.out_dir."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = cfg.nodes * cfg.ranks_per_node
    scaled = scaled_to_h100(cfg.preset, cfg.shape, ranks=world)
    print("\n".join(scaled.arithmetic), file=sys.stderr, flush=True)
    points = []
    for f in cfg.factors:
        inter = scaled.inter_mbit * f
        intra = scaled.intra_mbit if cfg.ranks_per_node > 1 else None
        spec = ClusterSpec(name=cfg.name, nodes=cfg.nodes, ranks_per_node=cfg.ranks_per_node,
                           intra_mbit=None if intra is None else round(intra, 3), inter_mbit=round(inter, 3))
        run = out / f"f{f:g}"
        print(f"foe cluster sweep: x{f:g} of the H100-scaled inter-node rate: {spec.describe()}", file=sys.stderr,
              flush=True)
        bring_up(spec)
        try:
            save_spec(spec)
            code = run_job(spec, _bench_argv(cfg, run), out / f"f{f:g}-ranks", timeout_s=3600)
        finally:
            tear_down(spec.name)
            forget_spec(spec.name)
        if code != 0:
            raise RuntimeError(f"bench forward failed at x{f:g} (exit code {code}); logs in {out}")
        rows = {r["strategy"]: r for r in json.loads(run.with_suffix(".json").read_text())["results"]}
        measured = {s: rows[s]["latency_ms_median"] / 1e3 for s in STRATEGIES}
        pred = predicted(cfg, inter * 1e6 / 8, None if intra is None else intra * 1e6 / 8)
        points.append({"factor": f, "inter_mbit": inter, "intra_mbit": intra,
                       "q": scaled.quotient(inter),
                       "measured_s": measured, "predicted_s": pred,
                       "measured_ratio": {s: measured[s] / measured["gp"] for s in ("ep", "tp")},
                       "predicted_ratio": {s: pred[s] / pred["gp"] for s in ("ep", "tp")},
                       "bytes_inter": {s: rows[s]["bytes_per_token_per_layer_inter"] for s in STRATEGIES}})
    result = {"config": {**dataclasses.asdict(cfg)}, "scaled": dataclasses.asdict(scaled),
              "q_h100": scaled.quotient(scaled.inter_mbit), "points": points}
    (out / "crossover.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "crossover.png")
    return result


def table(result: dict) -> str:
    lines = [f"{'x H100 rate':>11}  {'inter Mbit/s':>12}  {'q':>6}  {'ep/gp meas':>10}  {'ep/gp sim':>9}  "
             f"{'tp/gp meas':>10}  {'tp/gp sim':>9}  {'gp ms':>7}"]
    for p in result["points"]:
        m, s = p["measured_ratio"], p["predicted_ratio"]
        lines.append(f"{p['factor']:>11g}  {p['inter_mbit']:>12.1f}  {p['q']:>6.3f}  {m['ep']:>9.2f}x  {s['ep']:>8.2f}x  "
                     f"{m['tp']:>9.2f}x  {s['tp']:>8.2f}x  {p['measured_s']['gp'] * 1e3:>7.1f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = sorted(result["points"], key=lambda p: p["q"])
    q = [p["q"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, color in (("ep", "tab:blue"), ("tp", "tab:orange")):
        ax.plot(q, [p["measured_ratio"][s] for p in pts], "o-", color=color, label=f"MoE {s} / FoE gp, measured")
        ax.plot(q, [p["predicted_ratio"][s] for p in pts], "--", color=color, alpha=0.7,
                label=f"MoE {s} / FoE gp, cost model")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(result["q_h100"], color="black", lw=1, ls=":", label="the 7b-on-H100 quotient")
    ax.set_xscale("log")
    ax.set_xlabel("q = time to move a layer's activations over the inter-node link / a rank's layer compute")
    ax.set_ylabel("forward latency, MoE / FoE (> 1: FoE faster)")
    c = result["config"]
    ax.set_title(f"{c['preset']}, {c['nodes']} nodes x {c['ranks_per_node']} rank(s), {c['shape']['phase']} "
                 f"{c['shape']['seqs']}x{c['shape']['length']}: emulated cluster", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
