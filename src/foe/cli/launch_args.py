"""The launch options every multi-process command shares (torchrun's conventions), and the `Rendezvous`
they describe: from torchrun's environment when it started this process, else from the options."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from foe.cli.common import at_least, float_in

if TYPE_CHECKING:
    from foe.parallel.rendezvous import Rendezvous

DEFAULT_MASTER_PORT = 29500  # torchrun's
positive_int = at_least(1)
port_number = at_least(0, 65535, " (0: any free port)")  # 0 = any free port


def add_launch_args(p: argparse.ArgumentParser, nproc_default: int, node0_does: str) -> None:
    """--nproc and the several-nodes group; `node0_does` says what node 0 does beyond running ranks."""
    g = p.add_argument_group("ranks")
    g.add_argument("--nproc", type=positive_int, default=nproc_default,
                   help=f"ranks per node, as torchrun's --nproc-per-node (default {nproc_default}): local "
                        f"processes, on the CPU (gloo) or one GPU each (NCCL)")
    g = p.add_argument_group("several nodes", "torchrun's conventions: world = nnodes x nproc, global rank = "
                             f"node_rank x nproc + local rank; run the same command on every node with its "
                             f"--node-rank. Node 0 {node0_does}. Or start every rank with torchrun: its RANK, "
                             f"WORLD_SIZE, MASTER_ADDR... are read instead")
    g.add_argument("--nnodes", type=positive_int, default=1, help="number of nodes (default 1)")
    g.add_argument("--node-rank", type=at_least(0), default=0, help="this node's index, 0..nnodes-1 (default 0)")
    g.add_argument("--master-addr", default="127.0.0.1",
                   help="node 0's address as the other nodes reach it; rank 0's rendezvous listens on every "
                        "interface (default 127.0.0.1)")
    g.add_argument("--master-port", type=port_number, default=None,
                   help=f"rendezvous port on node 0 (default {DEFAULT_MASTER_PORT} with several nodes, else any free port)")
    g.add_argument("--dist-timeout", metavar="S", type=float_in(0, math.inf, lo_open=True), default=60.0,
                   help="seconds to wait for the other ranks, at the rendezvous and in each collective, before "
                        "failing with what to check (default 60)")


def rendezvous_from_args(args: argparse.Namespace, nproc_default: int) -> Rendezvous:
    """The job's layout from torchrun's environment, else from --nproc/--nnodes/--node-rank/--master-*;
    on --device (ValueError naming a contradiction)."""
    from foe.cli.common import device_name
    from foe.parallel.rendezvous import Rendezvous
    device = device_name(args)
    env = Rendezvous.from_env(args.dist_timeout, device)
    if env is not None:
        typed = [name for name, value, default in (
            ("nproc", args.nproc, nproc_default), ("nnodes", args.nnodes, 1), ("node-rank", args.node_rank, 0),
            ("master-port", args.master_port, None), ("master-addr", args.master_addr, "127.0.0.1"))
            if value != default]
        if typed:
            raise ValueError(f"started by torchrun (RANK is set), which decides the layout: drop "
                             f"{', '.join('--' + t for t in typed)}")
        return env
    if args.nnodes > 1 and getattr(args, "ranks_per_node", None) not in (None, args.nproc):
        raise ValueError(f"with --nnodes, a node holds --nproc ({args.nproc}) ranks; drop --ranks-per-node "
                         f"{args.ranks_per_node}")
    port = args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT if args.nnodes > 1 else 0
    return Rendezvous(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                      master_port=port, timeout_s=args.dist_timeout, device=device)
