"""`foe cluster`: an emulated cluster of network namespaces with shaped links (up, down, status, job, run)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from foe.cli.common import at_least, float_in

EXAMPLES = """\
examples (as root):
  foe cluster run --nodes 2 --ranks-per-node 2 --intra-mbit 400 --inter-mbit 40 -- \\
      foe bench forward --strategies ep,gp --ranks-per-group 2       up, run on every rank, down
  foe cluster run --nodes 2 --inter-mbit 40 --driver -- foe bench compare --nproc 2
                                                    bench compare in rank 0's namespace; its servers span the cluster
  foe cluster up --nodes 2 --inter-mbit 40          keep one up, then:
  foe cluster job -- foe bench forward              a command on every rank of it
  foe cluster down                                  delete it (idempotent)
"""


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=at_least(1), default=2, help="nodes (default 2)")
    g.add_argument("--ranks-per-node", type=at_least(1), default=1, help="ranks (namespaces, 'GPUs') per node "
                                                                         "(default 1)")
    g.add_argument("--intra-mbit", type=float_in(0, float("inf"), lo_open=True), default=None,
                   help="each rank's rate to ranks of its node, Mbit/s per direction (default: unshaped)")
    g.add_argument("--inter-mbit", type=float_in(0, float("inf"), lo_open=True), default=None,
                   help="each rank's rate to ranks of other nodes, Mbit/s per direction (default: unshaped)")
    g.add_argument("--mtu", type=at_least(576, 65535), default=9000,
                   help="veth MTU, bytes (default 9000): what the links can carry at all grows with it, and so "
                        "does the shaper's granularity of one packet")
    _add_scaling_args(p)


def _add_scaling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rates from a rule", "--scaled-to h100: the rates at which moving a layer's "
                             "activations takes the same fraction of a layer's compute here (for --preset) as "
                             "for the 7b preset on 8x H100 with NVLink and NDR InfiniBand; the arithmetic is "
                             "printed (docs/emulated-cluster.md)")
    g.add_argument("--scaled-to", choices=("h100",), default=None, help="derive both rates by that rule")
    g.add_argument("--preset", default="small", help="the model the cluster will run (default small)")
    g.add_argument("--phase", choices=("prefill", "decode"), default="prefill",
                   help="the phase the quotient is matched for (default prefill)")
    g.add_argument("--seqs", type=at_least(1), default=4, help="sequences of that forward (default 4)")
    g.add_argument("--length", type=at_least(1), default=64,
                   help="prefill: new tokens per sequence; decode: cached tokens (default 64)")


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="foe", help="cluster name: its namespaces are NAME-... (default foe)")


def _add_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="the other ranks' output (default /tmp/foe-cluster-NAME)")
    p.add_argument("--timeout", metavar="S", type=float_in(0, float("inf"), lo_open=True), default=None,
                   help="stop the command after S seconds")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    c = commands.add_parser("cluster", help="an emulated cluster: namespaces as GPUs, shaped links (needs root)",
                            description="Bring up a cluster emulated on this machine: one Linux network "
                                        "namespace per rank, all on one bridge, each rank's links shaped with "
                                        "traffic control to an intra-node and an inter-node rate. Commands run "
                                        "on it with torchrun's environment. See docs/emulated-cluster.md.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = c.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    p = sub.add_parser("up", help="create the namespaces, bridge and shaped links")
    _add_name(p)
    _add_spec_args(p)
    p.set_defaults(func=up)
    p = sub.add_parser("rates", help="print the link rates --scaled-to h100 derives, with the arithmetic")
    p.add_argument("--nodes", type=at_least(1), default=2, help="nodes (default 2)")
    p.add_argument("--ranks-per-node", type=at_least(1), default=1, help="ranks per node (default 1)")
    _add_scaling_args(p)
    p.set_defaults(func=rates, scaled_to="h100")
    p = sub.add_parser("sweep", help="the crossover: bench forward at inter-node rates around the H100-scaled one",
                       description="For each factor, bring up a cluster whose inter-node rate is that factor x "
                                   "the --scaled-to h100 rate, run foe bench forward (ep, tp, gp) on it, tear it "
                                   "down; plot MoE/FoE latency against the comm/compute quotient with the cost "
                                   "model's curve. Writes crossover.json and crossover.png under --out.")
    p.add_argument("--nodes", type=at_least(2), default=2, help="nodes (default 2)")
    p.add_argument("--ranks-per-node", type=at_least(1), default=1, help="ranks per node (default 1)")
    p.add_argument("--factors", default="0.03,0.1,0.3,1,3", help="multiples of the scaled inter-node rate "
                                                                  "(default 0.03,0.1,0.3,1,3)")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed forwards per strategy (default 5)")
    p.add_argument("--out", default="runs/crossover", help="output directory (default runs/crossover)")
    p.add_argument("--serving", action="store_true",
                   help="sweep foe bench compare (TTFT, TBT, E2E of MoE ep vs FoE gp) instead of bench forward")
    p.add_argument("--num-prompts", type=at_least(1), default=16, help="--serving: requests per scale (default 16)")
    p.add_argument("--scales", default="0.5,1.5", help="--serving: arrival scales, s (default 0.5,1.5)")
    _add_scaling_args(p)
    p.set_defaults(func=sweep, scaled_to="h100")
    p = sub.add_parser("down", help="kill what runs in the cluster and delete its namespaces (idempotent)")
    _add_name(p)
    p.set_defaults(func=down)
    p = sub.add_parser("status", help="the cluster's shape and its links' traffic counters")
    _add_name(p)
    p.set_defaults(func=status)
    p = sub.add_parser("job", help="run a command on every rank of a cluster that is up (torchrun's environment)")
    _add_name(p)
    _add_command(p)
    p.set_defaults(func=job)
    p = sub.add_parser("run", help="up, run a command on every rank (or --driver: once on rank 0), down")
    _add_name(p)
    _add_spec_args(p)
    p.add_argument("--driver", action="store_true",
                   help="run the command once, in rank 0's namespace, with FOE_CLUSTER set (for foe bench "
                        "compare, whose servers then span the cluster)")
    _add_command(p)
    p.set_defaults(func=run)


def _spec(args: argparse.Namespace):  # noqa: ANN202
    from foe.cluster.topology import ClusterSpec
    spec = ClusterSpec(name=args.name, nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                       intra_mbit=args.intra_mbit, inter_mbit=args.inter_mbit, mtu=args.mtu)
    if args.scaled_to is None:
        return spec
    if args.intra_mbit is not None or args.inter_mbit is not None:
        raise ValueError("--scaled-to derives both rates: drop --intra-mbit and --inter-mbit")
    from foe.cluster.scaling import with_rates
    return with_rates(spec, _scaled(args))


def _scaled(args: argparse.Namespace):  # noqa: ANN202
    from foe.cluster.scaling import Shape, scaled_to_h100
    rates = scaled_to_h100(args.preset, Shape(args.phase, args.seqs, args.length),
                           ranks=args.nodes * args.ranks_per_node)
    print("\n".join(rates.arithmetic), file=sys.stderr, flush=True)
    return rates


def rates(args: argparse.Namespace) -> int:
    r = _scaled(args)
    print(f"--intra-mbit {r.intra_mbit:.3f} --inter-mbit {r.inter_mbit:.3f}   ({r.phase}; bands: "
          + ", ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in r.band.items()) + ")")
    return 0


def _command(args: argparse.Namespace) -> list[str]:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ValueError("no command given: put it after --, e.g. -- foe bench forward")
    if argv[0] == "foe":  # the same foe as this one, whatever PATH says inside the namespace
        argv = [sys.executable, "-m", "foe.cli.main", *argv[1:]]
    return argv


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP end this process through its `finally` blocks (and so the tear-down), as Ctrl-C."""
    def stop(sig: int, frame: object) -> None:
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def up(args: argparse.Namespace) -> int:
    from foe.cluster.jobs import save_spec
    from foe.cluster.netns import bring_up
    spec = _spec(args)
    bring_up(spec)
    save_spec(spec)
    print(spec.describe())
    return 0


def down(args: argparse.Namespace) -> int:
    from foe.cluster.jobs import forget_spec
    from foe.cluster.netns import tear_down
    gone = tear_down(args.name)
    forget_spec(args.name)
    print(f"cluster {args.name}: deleted {len(gone)} namespace(s)" if gone else f"cluster {args.name}: nothing to delete")
    return 0


def status(args: argparse.Namespace) -> int:
    from foe.cluster.jobs import load_spec
    from foe.cluster.shaping import link_counters
    spec = load_spec(args.name)
    print(spec.describe())
    for r in range(spec.world_size):
        print(f"  rank {r}: {spec.rank_ns(r)} {spec.address(r)}  {link_counters(spec.rank_ns(r), 'eth0')}")
    return 0


def job(args: argparse.Namespace) -> int:
    from foe.cluster.jobs import load_spec, run_job
    spec = load_spec(args.name)
    _stop_on_signals()
    return run_job(spec, _command(args), Path(args.logs or f"/tmp/foe-cluster-{spec.name}"), args.timeout)


def run(args: argparse.Namespace) -> int:
    from foe.cluster.jobs import cluster_up, run_driver, run_job
    spec, argv = _spec(args), _command(args)
    _stop_on_signals()
    with cluster_up(spec):
        print(spec.describe(), file=sys.stderr, flush=True)
        if args.driver:
            return run_driver(spec, argv, args.timeout)
        return run_job(spec, argv, Path(args.logs or f"/tmp/foe-cluster-{spec.name}"), args.timeout)


def sweep(args: argparse.Namespace) -> int:
    from foe.cli.common import number_list
    from foe.cluster.crossover import SweepConfig, run_serving_sweep, run_sweep, serving_table, table
    from foe.cluster.netns import check_permitted
    from foe.cluster.scaling import Shape
    check_permitted()
    factors = number_list(float, "factors", positive=True)(args.factors)
    cfg = SweepConfig(preset=args.preset, nodes=args.nodes, ranks_per_node=args.ranks_per_node, factors=factors,
                      shape=Shape(args.phase, args.seqs, args.length), repeats=args.repeats, out_dir=args.out)
    _stop_on_signals()
    if args.serving:
        result = run_serving_sweep(cfg, args.num_prompts, number_list(float, "scales", positive=True)(args.scales))
        print(serving_table(result))
        print(f"wrote {args.out}/serving_crossover.json and {args.out}/serving_crossover.png")
        return 0
    result = run_sweep(cfg)
    print(table(result))
    print(f"wrote {args.out}/crossover.json and {args.out}/crossover.png")
    return 0
