"""The crossover: MoE/FoE forward latency measured on emulated clusters whose inter-node rate is swept
around the H100-scaled point, against the communication-to-compute quotient q, with the cost model's
prediction for the same emulated cluster on the same axes (`foe cluster sweep`).

The prediction is out of sample: for each point the cost model is fitted only on micro-benchmarks (one
rank's GEMMs, copy and single-process forwards, measured once; the shaped link's all-reduce and
all-to-all, measured on that cluster), never on a forward of the sweep, and then predicts each forward.

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

from foe.cluster.jobs import cluster_up, run_job
from foe.cluster.scaling import ScaledRates, Shape, scaled_to_h100
from foe.cluster.topology import ClusterSpec

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


def _scaled(cfg: SweepConfig) -> ScaledRates:
    """The H100-scaled rates the sweep multiplies, their arithmetic printed."""
    scaled = scaled_to_h100(cfg.preset, cfg.shape, ranks=cfg.nodes * cfg.ranks_per_node)
    print("\n".join(scaled.arithmetic), file=sys.stderr, flush=True)
    return scaled


def _cluster_at(cfg: SweepConfig, scaled: ScaledRates, factor: float) -> ClusterSpec:
    """The cluster whose inter-node rate is factor x the scaled one; intra-node at the scaled rate when a node
    holds several ranks."""
    spec = ClusterSpec(name=cfg.name, nodes=cfg.nodes, ranks_per_node=cfg.ranks_per_node,
                       intra_mbit=scaled.intra_mbit if cfg.ranks_per_node > 1 else None,
                       inter_mbit=scaled.inter_mbit * factor)
    print(f"foe cluster sweep: x{factor:g} of the H100-scaled inter-node rate: {spec.describe()}", file=sys.stderr,
          flush=True)
    return spec


def _tag(factor: float) -> str:
    """A file name for a factor with no dot in it: "x0p03" (Path.with_suffix would cut at the dot)."""
    return "x" + f"{factor:g}".replace(".", "p")


def _bench_argv(cfg: SweepConfig, out: Path) -> list[str]:
    sh = cfg.shape
    shape = (["--modes", "prefill", "--seq-len", str(sh.length)] if sh.phase == "prefill"
             else ["--modes", "decode", "--context-len", str(sh.length)])
    return [sys.executable, "-m", "foe.cli.main", "bench", "forward", "--preset", cfg.preset, "--strategies",
            ",".join(STRATEGIES), "--batch-sizes", str(sh.seqs), *shape, "--repeats", str(cfg.repeats),
            "--warmup", "2", "--out", str(out)]


COLLECTIVE_SIZES = "16384,131072,1048576"  # bytes per rank: the micro-benchmark on each shaped link


def measure_one_rank(preset: str) -> dict:
    """This machine's compute micro-benchmarks, one process and one thread: GEMMs, a copy, single-process
    forwards of the preset (what `foe.sim.calibrate` fits compute on)."""
    from foe.sim.measure_cpu import measure_compute, measure_forward
    return {"compute": measure_compute(reps=5), "forward": measure_forward(preset, reps=3)}


def fitted_cluster(one_rank: dict, collectives: list[dict]):  # noqa: ANN201
    """The cost model fitted on micro-benchmarks only: one rank's compute and this link's collectives."""
    from foe.sim.calibrate import calibrate
    from foe.sim.hardware import Cluster
    return Cluster.from_dict(calibrate({**one_rank, "collectives": collectives})["micro_cluster"])


def predict_runs(bench_json: Path, cluster) -> dict[str, float]:  # noqa: ANN001
    """The fitted cost model's forward latency (s) for each strategy of a `foe bench forward` run."""
    from foe.sim.calibrate import _bench_pred, load_bench_rows
    from foe.sim.imbalance import load_routing_stats
    routing = load_routing_stats()
    return {r["strategy"]: _bench_pred(r, cluster, routing).total for r in load_bench_rows(bench_json)}


def errors(points: list[dict]) -> dict[str, float]:
    """Median relative errors of the predicted latencies and MoE/FoE ratios."""
    import statistics
    lat = [abs(p["predicted_s"][s] / p["measured_s"][s] - 1) for p in points for s in STRATEGIES]
    rat = [abs(p["predicted_ratio"][s] / p["measured_ratio"][s] - 1) for p in points for s in ("ep", "tp")]
    return {"latency_median": statistics.median(lat), "ratio_median": statistics.median(rat),
            "latency_max": max(lat), "ratio_max": max(rat)}


def run_sweep(cfg: SweepConfig) -> dict:
    """Every factor's run and prediction; writes crossover.json and crossover.png under cfg.out_dir."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scaled = _scaled(cfg)
    print("foe cluster sweep: one rank's compute micro-benchmarks", file=sys.stderr, flush=True)
    one_rank = measure_one_rank(cfg.preset)
    points = []
    for f in cfg.factors:
        spec = _cluster_at(cfg, scaled, f)
        run = out / _tag(f)
        with cluster_up(spec):
            code = run_job(spec, _bench_argv(cfg, run), out / f"{_tag(f)}-ranks", timeout_s=3600)
            if code == 0:  # the link's micro-benchmark, on the same cluster
                code = run_job(spec, [sys.executable, "-m", "foe.sim.measure_cpu", "--collectives-only", "--reps",
                                      "3", "--sizes", COLLECTIVE_SIZES, "--out", str(run) + "-collectives.json"],
                               out / f"{_tag(f)}-ranks", timeout_s=3600)
        if code != 0:
            raise RuntimeError(f"bench forward failed at x{f:g} (exit code {code}); logs in {out}")
        rows = {r["strategy"]: r for r in json.loads(run.with_suffix(".json").read_text())["results"]}
        measured = {s: rows[s]["latency_ms_median"] / 1e3 for s in STRATEGIES}
        collectives = json.loads(Path(str(run) + "-collectives.json").read_text())["collectives"]
        pred = predict_runs(run.with_suffix(".json"), fitted_cluster(one_rank, collectives))
        points.append({"factor": f, "inter_mbit": spec.inter_mbit, "intra_mbit": spec.intra_mbit,
                       "q": scaled.quotient(spec.inter_mbit),
                       "measured_s": measured, "predicted_s": pred,
                       "measured_ratio": {s: measured[s] / measured["gp"] for s in ("ep", "tp")},
                       "predicted_ratio": {s: pred[s] / pred["gp"] for s in ("ep", "tp")},
                       "bytes_inter": {s: rows[s]["bytes_per_token_per_layer_inter"] for s in STRATEGIES}})
    result = {"config": {**dataclasses.asdict(cfg)}, "scaled": dataclasses.asdict(scaled),
              "q_h100": scaled.quotient(scaled.inter_mbit), "points": points, "errors": errors(points),
              "one_rank_micro_benchmarks": one_rank,
              "cost_model": "foe.sim fitted per point on micro-benchmarks only: one rank's GEMMs, copy and "
                            "single-process forwards, and that link's all-reduce/all-to-all at "
                            f"{COLLECTIVE_SIZES} bytes; no forward run of the sweep is used"}
    (out / "crossover.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "crossover.png")
    return result


def run_serving_sweep(cfg: SweepConfig, num_prompts: int, scales: tuple[float, ...]) -> dict:
    """`foe bench compare` (MoE ep against FoE gp, the paper's serving experiment) at each factor of the
    H100-scaled inter-node rate; writes serving_crossover.json and .png under cfg.out_dir."""
    from foe.cluster.jobs import run_driver
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = cfg.nodes * cfg.ranks_per_node
    scaled = _scaled(cfg)
    points = []
    for f in cfg.factors:
        spec = _cluster_at(cfg, scaled, f)
        run = out / f"serve-{_tag(f)}"
        argv = [sys.executable, "-m", "foe.cli.main", "bench", "compare", "--preset", cfg.preset, "--nproc", str(world),
                "--num-prompts", str(num_prompts), "--scales", ",".join(f"{x:g}" for x in scales), "--out", str(run),
                "--no-progress"]
        with cluster_up(spec):
            code = run_driver(spec, argv, timeout_s=7200)
        if code != 0:
            raise RuntimeError(f"bench compare failed at x{f:g} (exit code {code}); its logs are in {run}")
        rows = json.loads((run / "compare.json").read_text())["rows"]
        points.append({"factor": f, "inter_mbit": spec.inter_mbit, "q": scaled.quotient(spec.inter_mbit),
                       "ratios": {str(r["scale_s"]): {m: r["ratios"][m]["mean"] for m in ("ttft", "itl", "e2el")}
                                  for r in rows}})
    result = {"config": dataclasses.asdict(cfg), "num_prompts": num_prompts, "scales": list(scales),
              "scaled": dataclasses.asdict(scaled), "q_h100": scaled.quotient(scaled.inter_mbit), "points": points}
    (out / "serving_crossover.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot_serving(result, out / "serving_crossover.png")
    return result


def serving_table(result: dict) -> str:
    lines = [f"{'x H100 rate':>11}  {'inter Mbit/s':>12}  {'q':>6}  {'scale':>5}  {'TTFT':>6}  {'TBT':>6}  {'E2E':>6}   "
             f"(mean MoE ep / FoE gp)"]
    for p in result["points"]:
        for scale, r in p["ratios"].items():
            lines.append(f"{p['factor']:>11g}  {p['inter_mbit']:>12.1f}  {p['q']:>6.3f}  {float(scale):>5g}  "
                         f"{r['ttft']:>5.2f}x  {r['itl']:>5.2f}x  {r['e2el']:>5.2f}x")
    return "\n".join(lines)


def _plot_serving(result: dict, path: Path) -> Path:
    def draw(ax, q: list[float], pts: list[dict]) -> None:  # noqa: ANN001
        for metric, name, color in (("ttft", "TTFT", "tab:red"), ("itl", "TBT", "tab:green"),
                                    ("e2el", "E2E", "tab:purple")):
            for scale, style in zip(pts[0]["ratios"], ("o-", "s--", "^:")):
                ax.plot(q, [p["ratios"][scale][metric] for p in pts], style, color=color,
                        label=f"{name}, arrivals every {float(scale):g} s")
    c = result["config"]
    return _quotient_plot(result, path, draw, "mean latency, MoE ep / FoE gp (> 1: FoE faster)",
                          f"bench compare, emulated cluster: {c['preset']}, {c['nodes']} x {c['ranks_per_node']} "
                          f"rank(s), {result['num_prompts']} requests per scale")


def _quotient_plot(result: dict, path: Path, draw, ylabel: str, title: str) -> Path:  # noqa: ANN001
    """Ratios against q on a log axis, with the parity line and the H100 quotient marked; `draw(ax, q, points)`
    adds the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = sorted(result["points"], key=lambda p: p["q"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, [p["q"] for p in pts], pts)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(result["q_h100"], color="black", lw=1, ls=":", label="the 7b-on-H100 quotient")
    ax.set_xscale("log")
    ax.set_xlabel("q = time to move a layer's activations over the inter-node link / a rank's layer compute")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    lines = [f"{'x H100 rate':>11}  {'inter Mbit/s':>12}  {'q':>6}  {'ep/gp meas':>10}  {'ep/gp sim':>9}  "
             f"{'tp/gp meas':>10}  {'tp/gp sim':>9}  {'gp ms':>7}"]
    for p in result["points"]:
        m, s = p["measured_ratio"], p["predicted_ratio"]
        lines.append(f"{p['factor']:>11g}  {p['inter_mbit']:>12.1f}  {p['q']:>6.3f}  {m['ep']:>9.2f}x  {s['ep']:>8.2f}x  "
                     f"{m['tp']:>9.2f}x  {s['tp']:>8.2f}x  {p['measured_s']['gp'] * 1e3:>7.1f}")
    e = result["errors"]
    lines.append(f"cost model fitted on micro-benchmarks only: median error {e['latency_median']:.0%} over latencies "
                 f"(max {e['latency_max']:.0%}), {e['ratio_median']:.0%} over MoE/FoE ratios (max {e['ratio_max']:.0%})")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    def draw(ax, q: list[float], pts: list[dict]) -> None:  # noqa: ANN001
        for st, color in (("ep", "tab:blue"), ("tp", "tab:orange")):
            ax.plot(q, [p["measured_ratio"][st] for p in pts], "o-", color=color, label=f"MoE {st} / FoE gp, measured")
            ax.plot(q, [p["predicted_ratio"][st] for p in pts], "--", color=color, alpha=0.7,
                    label=f"MoE {st} / FoE gp, cost model (fit on micro-benchmarks)")
    c = result["config"]
    return _quotient_plot(result, path, draw, "forward latency, MoE / FoE (> 1: FoE faster)",
                          f"{c['preset']}, {c['nodes']} nodes x {c['ranks_per_node']} rank(s), {c['shape']['phase']} "
                          f"{c['shape']['seqs']}x{c['shape']['length']}: emulated cluster")
