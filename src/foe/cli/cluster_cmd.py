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
    g.add_argument("--mtu", type=at_least(576, 65535), default=1500, help="veth MTU, bytes (default 1500)")


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
    return ClusterSpec(name=args.name, nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                       intra_mbit=args.intra_mbit, inter_mbit=args.inter_mbit, mtu=args.mtu)


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
    from foe.cluster.jobs import forget_spec, run_driver, run_job, save_spec
    from foe.cluster.netns import bring_up, tear_down
    spec, argv = _spec(args), _command(args)
    _stop_on_signals()
    bring_up(spec)
    try:
        save_spec(spec)
        print(spec.describe(), file=sys.stderr, flush=True)
        if args.driver:
            return run_driver(spec, argv, args.timeout)
        return run_job(spec, argv, Path(args.logs or f"/tmp/foe-cluster-{spec.name}"), args.timeout)
    finally:
        tear_down(spec.name)
        forget_spec(spec.name)
