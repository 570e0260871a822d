"""`foe sim {clusters,forward,serve,calibrate}`: the cost model that projects MoE and FoE onto clusters.

Imports foe.sim only (no torch): projections run in seconds on any machine. Only `--checkpoint`
loads the model package, to read and check the checkpoint's config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from foe.cli.common import checkpoint_from_args, number_list

if TYPE_CHECKING:
    from foe.config import ModelConfig
    from foe.sim.hardware import Cluster


_ints = number_list(int, "integers")
_floats = number_list(float)


def _common(p: argparse.ArgumentParser, nodes_default: str = "1") -> None:
    p.add_argument("--preset", default="7b", help="model size preset (default 7b)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="use the config of a checkpoint (or of a `foe train` run's latest one) instead of a preset")
    p.add_argument("--cluster", default="h100", help="h100, h200, cpu-gloo or a JSON file (default h100)")
    p.add_argument("--nodes", type=_ints, default=_ints(nodes_default), help=f"node counts (default {nodes_default})")
    p.add_argument("--devices-per-node", type=int, default=None, help="override the preset's devices per node")
    p.add_argument("--imbalance", default="measured",
                   help="routing skew: measured (src/foe/sim/data/routing_stats.json), none, or a cv number")
    p.add_argument("--algo", choices=("ring", "tree", "auto"), default="auto", help="all-reduce algorithm model")
    p.add_argument("--out", type=Path, default=Path("results/sim"), help="output directory (default results/sim)")


EXAMPLES = {
    "sim": "examples:\n  foe sim clusters\n  foe sim forward --preset 7b --out /tmp/sim\n"
           "  foe sim serve --preset 1b --num-requests 50 --out /tmp/sim\n",
    "clusters": "examples:\n  foe sim clusters\n",
    "forward": "examples:\n  foe sim forward --preset 7b --out /tmp/sim\n"
               "  foe sim forward --mode decode --cluster h200 --nodes 1,2 --out /tmp/sim\n"
               "  foe sim forward --checkpoint runs/cq-default/foe/step_00000600 --cluster cpu-gloo "
               "--batch-sizes 1,8 --out /tmp/sim\n",
    "serve": "examples:\n  foe sim serve --preset 7b --out /tmp/sim\n"
             "  foe sim serve --preset 1b --nodes 1 --scales 0.5 --num-requests 50 --out /tmp/sim\n",
    "calibrate": "examples:\n  foe sim calibrate --out /tmp/sim\n"
                 "  foe sim calibrate --bench-json results/bench_forward.json --out /tmp/sim\n",
}


def _help(name: str) -> dict:
    return {"epilog": EXAMPLES[name], "formatter_class": argparse.RawDescriptionHelpFormatter}


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "sim", help="cost model: project MoE (ep, tp) against FoE (gp) onto GPU clusters",
        description="Predict forward and serving latency of MoE and FoE on a cluster from published or "
                    "measured rates. See docs/cost-model.md.", **_help("sim"))
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM", required=True)

    p = sub.add_parser("clusters", help="list cluster presets", **_help("clusters"))
    p.set_defaults(func=clusters)

    p = sub.add_parser("forward", help="per-layer time breakdown and speedup against batch size",
                       **_help("forward"))
    _common(p)
    p.add_argument("--strategies", default="ep,tp,gp")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--seq-len", type=int, default=2048, help="prefill: tokens per sequence (default 2048)")
    p.add_argument("--context", type=int, default=9000, help="decode: cached tokens per sequence (default 9000)")
    p.add_argument("--batch-sizes", type=_ints, default=_ints("1,2,4,8,16,32,64,128"))
    p.set_defaults(func=forward)

    p = sub.add_parser("serve", help="serving simulation: the paper's TTFT/TBT/E2E table as MoE/FoE ratios",
                       **_help("serve"))
    _common(p, nodes_default="1,2")
    p.add_argument("--moe-strategy", choices=("ep", "tp"), default="ep")
    p.add_argument("--scales", type=_floats, default=_floats("0.5,0.75,1.5"), help="mean inter-arrival s")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens generated per request (default: LongBench's per-task max_new_tokens)")
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per engine step")
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bands", action="store_true",
                   help="also re-run with each uncertain constant (GEMM efficiency, per-layer and per-step overhead, "
                        "InfiniBand per-peer cost) at both ends of its range and print every mean ratio as a band")
    p.set_defaults(func=serve)

    p = sub.add_parser("calibrate", help="fit the cpu-gloo preset to measurements; predicted vs measured",
                       **_help("calibrate"))
    p.add_argument("--measured", type=Path, default=None, help="measure_cpu.py JSON (default: the stored one)")
    p.add_argument("--bench-json", type=Path, default=None, help="foe bench forward JSON to check against")
    p.add_argument("--save", action="store_true",
                   help="also replace the calibration shipped in the package (src/foe/sim/data/"
                        "cpu_gloo_calibrated.json), which `--cluster cpu-gloo` uses; by default only OUT is written")
    p.add_argument("--out", type=Path, default=Path("results/sim"))
    p.set_defaults(func=calibrate)


def _config(args: argparse.Namespace, arch: str) -> "ModelConfig":
    """The preset's (or checkpoint's: a checkpoint or run directory, as everywhere) config as `arch`."""
    from foe.config import ModelConfig
    from foe.model.checkpoint import load_config
    ckpt = checkpoint_from_args(args)
    if ckpt is not None:
        return load_config(ckpt).replace(arch=arch)
    return ModelConfig.from_preset(args.preset, arch=arch)


def _cluster(args: argparse.Namespace, nodes: int) -> "Cluster":
    from foe.sim.hardware import get_cluster
    return get_cluster(args.cluster, nodes=nodes, devices_per_node=args.devices_per_node)


def _print(rows: list[list]) -> None:
    from foe.sim.paper import format_table
    print(format_table(rows))


def clusters(args: argparse.Namespace) -> int:
    from foe.sim.hardware import CLUSTERS, get_cluster
    rows = [["name", "dev/node", "TFLOP/s", "eff", "HBM TB/s", "intra GB/s", "intra us", "inter GB/s", "inter us", "source"]]
    for name in CLUSTERS:
        c = get_cluster(name)
        rows.append([name, c.devices_per_node, f"{c.matmul_flops / 1e12:.3g}", f"{c.matmul_efficiency:.2f}",
                     f"{c.mem_bandwidth / 1e12:.3g}", f"{c.intra.bandwidth / 1e9:.3g}", f"{c.intra.latency * 1e6:.0f}",
                     f"{c.inter.bandwidth / 1e9:.3g}", f"{c.inter.latency * 1e6:.0f}", c.source[:60]])
    _print(rows)
    return 0


def _runnable(args: argparse.Namespace, strategies: list[str], cluster) -> list[str]:  # noqa: ANN001
    """The strategies whose placement the code would run on this cluster; the others are named and skipped
    (gp must run: it is the baseline of the ratios)."""
    from foe.sim.cost_model import ARCH_OF, layout
    keep = []
    for s in strategies:
        try:
            layout(_config(args, ARCH_OF[s]), s, cluster)
            keep.append(s)
        except ValueError as e:
            if s == "gp":
                raise
            print(f"{s}: skipped on {cluster.world} ranks: {e}")
    return keep


def forward(args: argparse.Namespace) -> int:
    from foe.sim.batch import Batch
    from foe.sim.cost_model import ARCH_OF, forward_time
    from foe.sim.imbalance import load_routing_stats
    from foe.sim.report import forward_rows, plot_breakdown, plot_speedup
    strategies = [s for s in args.strategies.split(",") if s]
    if "gp" not in strategies:
        raise ValueError("--strategies must include gp (the FoE baseline of the speedups)")
    routing = load_routing_stats(args.imbalance)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = dict(preset=args.checkpoint or args.preset, cluster=args.cluster, mode=args.mode, routing=routing.source,
                     runs={})
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for nodes in args.nodes:
        cl = _cluster(args, nodes)
        runnable = _runnable(args, strategies, cl)
        res = {s: [forward_time(_config(args, ARCH_OF[s]), s, cl,
                                Batch.prefill(b, args.seq_len) if args.mode == "prefill" else Batch.decode(b, args.context),
                                routing, args.algo) for b in args.batch_sizes] for s in runnable}
        print(f"\n{args.preset} on {cl.nodes} x {cl.devices_per_node} {cl.name}, {args.mode} "
              f"({'seq ' + str(args.seq_len) if args.mode == 'prefill' else 'context ' + str(args.context)}); "
              f"per-layer parts in us")
        _print(forward_rows([f for s in runnable for f in res[s]]))
        for s in runnable:
            if s != "gp":
                curves[f"{s}/gp, {cl.world} GPUs"] = (args.batch_sizes, [a.total / g.total for a, g in zip(res[s], res["gp"])])
        mid = len(args.batch_sizes) // 2
        plot_breakdown([res[s][i] for i in (0, mid, len(args.batch_sizes) - 1) for s in runnable],
                       f"{args.preset} {args.mode}, {cl.world} x {cl.name}: forward-pass breakdown",
                       args.out / f"breakdown_{args.mode}_{cl.world}.png")
        out["runs"][str(nodes)] = {s: [f.to_dict() for f in res[s]] for s in runnable}
    plot_speedup(curves, f"{args.preset} {args.mode}: predicted speedup of FoE (gp) over MoE",
                 args.out / f"speedup_{args.mode}.png")
    (args.out / f"forward_{args.mode}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}/forward_{args.mode}.json, speedup_{args.mode}.png, breakdown_{args.mode}_*.png")
    return 0


def serve(args: argparse.Namespace) -> int:
    from foe.sim.imbalance import load_routing_stats
    from foe.sim.paper import comparison_table, ratios
    from foe.sim.report import plot_cdfs
    from foe.sim.requests import longbench_requests
    from foe.sim.serving import Policy, serve as run
    routing = load_routing_stats(args.imbalance)
    policy = Policy(token_budget=args.token_budget, max_running=args.max_running)
    args.out.mkdir(parents=True, exist_ok=True)
    moe, foe = _config(args, "moe"), _config(args, "foe")
    out: dict = dict(preset=args.checkpoint or args.preset, cluster=args.cluster, moe_strategy=args.moe_strategy,
                     policy=vars(policy), routing=routing.source, runs={})
    for nodes in args.nodes:
        cl = _cluster(args, nodes)
        projected, runs = {}, {}
        for scale in args.scales:
            reqs = longbench_requests(args.num_requests, scale, args.seed, args.output_len)
            rm = run(moe, args.moe_strategy, cl, routing, reqs, policy)
            rf = run(foe, "gp", cl, routing, reqs, policy)
            sm, sf = rm.summary(), rf.summary()
            projected[scale] = ratios(sm, sf)
            runs[str(scale)] = dict(moe=sm, foe=sf, ratios=projected[scale])
            plot_cdfs({f"MoE {args.moe_strategy} TTFT": rm.ttft, "FoE gp TTFT": rf.ttft,
                       f"MoE {args.moe_strategy} E2E": rm.e2e, "FoE gp E2E": rf.e2e},
                      f"{args.preset}, {cl.world} x {cl.name}, scale {scale:g}s",
                      args.out / f"serve_cdf_{args.preset}_{cl.world}_{scale:g}.png")
            print(f"{cl.world} GPUs scale {scale:g}s: utilisation MoE {sm['engine']['utilisation']:.0%} "
                  f"FoE {sf['engine']['utilisation']:.0%}; mean TTFT MoE {sm['ttft']['mean'] * 1e3:.1f} ms "
                  f"FoE {sf['ttft']['mean'] * 1e3:.1f} ms; mean TBT MoE {sm['tbt']['mean'] * 1e3:.2f} ms "
                  f"FoE {sf['tbt']['mean'] * 1e3:.2f} ms")
        print(f"\n{args.preset}, {cl.nodes} node(s) x {cl.devices_per_node} {cl.name}: MoE ({args.moe_strategy}) "
              f"time / FoE (gp) time, simulated vs the paper's 7B figures")
        _print(comparison_table(projected, nodes))
        print()
        if args.bands:
            bands = _bands(args, cl, routing, policy, moe, foe, projected)
            runs["bands"] = bands
            print("the same, mean over requests, as bands over the uncertain constants (foe.sim.hardware.UNCERTAIN, "
                  "each at both ends of its range, one at a time):")
            for scale, metrics in bands.items():
                print("  " + f"{scale:>5}s  " + "  ".join(f"{m} {lo:.2f}-{hi:.2f}x" for m, (lo, hi) in metrics.items()))
            print()
        out["runs"][str(nodes)] = runs
    path = args.out / f"serve_{args.preset}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} and serve_cdf_*.png")
    return 0


def _bands(args: argparse.Namespace, cl, routing, policy, moe, foe, projected: dict) -> dict:  # noqa: ANN001
    """For each scale and metric, the (min, max) mean MoE/FoE ratio over the projection re-run with each
    UNCERTAIN constant at each end of its range (the central run included)."""
    from foe.sim.hardware import UNCERTAIN, with_constant
    from foe.sim.paper import ratios
    from foe.sim.requests import longbench_requests
    from foe.sim.serving import serve as run
    seen: dict[str, dict[str, list[float]]] = {f"{s:g}": {m: [st["mean"]] for m, st in projected[s].items()}
                                               for s in projected}
    for name, (lo, hi, _) in UNCERTAIN.items():
        for value in (lo, hi):
            c = with_constant(cl, name, value)
            for scale in args.scales:
                reqs = longbench_requests(args.num_requests, scale, args.seed, args.output_len)
                r = ratios(run(moe, args.moe_strategy, c, routing, reqs, policy).summary(),
                           run(foe, "gp", c, routing, reqs, policy).summary())
                for m in r:
                    seen[f"{scale:g}"][m].append(r[m]["mean"])
    return {scale: {m: (min(v), max(v)) for m, v in metrics.items()} for scale, metrics in seen.items()}


def calibrate(args: argparse.Namespace) -> int:
    from foe.sim.calibrate import MEASURED_FILE, calibrate as fit, load_bench_rows, save
    path = args.measured or MEASURED_FILE
    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read measurements {path}: {e} (run python -m foe.sim.measure_cpu)") from None
    bench = load_bench_rows(args.bench_json) if args.bench_json else None
    result = fit(measured, bench)
    f = result["fit"]
    print(f"fitted cpu-gloo: matmul {f['matmul_flops'] / 1e9:.1f} GFLOP/s x efficiency {f['matmul_efficiency']:.2f}, "
          f"memory {f['mem_bandwidth'] / 1e9:.1f} GB/s, gloo latency {f['link_latency_s'] * 1e3:.3f} ms, "
          f"bandwidth {f['link_bandwidth'] / 1e9:.2f} GB/s, per-layer overhead {f['layer_overhead_s'] * 1e3:.3f} ms")
    if bench:
        print(f"refit on {len(bench)} bench forwards: matmul efficiency {f['bench_matmul_efficiency']:.2f}, "
              f"per-layer overhead {f['bench_layer_overhead_s'] * 1e3:.3f} ms, "
              f"per-collective latency {f['bench_collective_latency_s'] * 1e3:.3f} ms")
    rows = [["kind", "case", "measured ms", "predicted ms", "error", "micro-fit ms", "micro-fit error"]]
    for r in result["rows"]:
        rows.append([r["kind"], r["case"], f"{r['measured'] * 1e3:.3f}", f"{r['predicted'] * 1e3:.3f}",
                     f"{r['error'] * 100:+.1f}%"]
                    + ([f"{r['predicted_micro'] * 1e3:.3f}", f"{r['error_micro'] * 100:+.1f}%"]
                       if "predicted_micro" in r else ["", ""]))
    _print(rows)
    for label, key, pick in (("micro-benchmarks (collectives, 1-rank forwards)", "error", lambda r: "bench" not in r["kind"]),
                             ("bench forward, refit (in-sample, 3 parameters)", "error", lambda r: "bench" in r["kind"]),
                             ("bench forward, micro fit only (out-of-sample)", "error_micro", lambda r: "bench" in r["kind"])):
        errs = sorted(abs(r[key]) for r in result["rows"] if pick(r) and key in r)
        if errs:
            print(f"{label}: median |error| {errs[len(errs) // 2] * 100:.1f}%, max {errs[-1] * 100:.1f}% "
                  f"over {len(errs)} cases")
    if not bench:
        print("(no --bench-json: calibrated on gloo collectives and single-process forwards only)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    cluster = args.out / "cpu_gloo_fitted.json"
    cluster.write_text(json.dumps(result["cluster"], indent=1) + "\n")
    print(f"wrote {args.out / 'calibration.json'} and {cluster} (use it with --cluster {cluster})")
    if args.save:
        print(f"replaced the shipped cpu-gloo calibration: {save(result)}")
    return 0
