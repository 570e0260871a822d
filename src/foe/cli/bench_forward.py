"""`foe bench forward`: forward latency, bytes and collectives of MoE (ep, tp) vs FoE (gp)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foe.cli.common import add_device_arg, add_dtype_arg, number_list, random_weights_dtype
from foe.cli.launch_args import add_launch_args, rendezvous_from_args


_ints = number_list(int, "integers")


def _names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "forward", help="the paper's forward-pass latency sweep: MoE ep/tp vs FoE gp on local ranks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Synthetic forward passes at a sweep of batch sizes for MoE `ep` (expert parallel, "
                    "all-to-all), MoE `tp` (head/expert parallel, two all-reduces) and FoE `gp` (group "
                    "parallel, one all-reduce) on the same ranks: local processes, several nodes, or torchrun's. "
                    "Prints a table, writes JSON and a PNG plot.",
        epilog="examples:\n  foe bench forward\n  torchrun --nproc-per-node 2 $(which foe) bench forward   # ranks started by torchrun\n  foe bench forward --nproc 4 --preset small --batch-sizes 1,8,32\n"
               "  foe bench forward --nproc 4 --ranks-per-node 2 --ranks-per-group 2 "
               "--model-override n_kv_heads=2 --model-override n_heads=4   # 2 'nodes' on one host\n"
               "  foe bench forward --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # on host 10.0.0.1, and\n"
               "  foe bench forward --nnodes 2 --node-rank 1 --master-addr 10.0.0.1   # on the second host")
    p.add_argument("--preset", default="small", help="model size preset (default small)")
    p.add_argument("--strategies", type=_names, default=("ep", "tp", "gp"), help="default ep,tp,gp")
    p.add_argument("--modes", type=_names, default=("prefill", "decode"), help="default prefill,decode")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 4, 16, 64), help="sequences per forward (default 1,4,16,64)")
    p.add_argument("--seq-len", type=int, default=64, help="prefill tokens per sequence (default 64)")
    p.add_argument("--context-len", type=int, default=256, help="decode: tokens in the KV cache (default 256)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="node layout for intra/inter accounting on one host (with --nnodes it is --nproc)")
    p.add_argument("--ranks-per-group", type=int, default=1, help="gp: ranks sharing one FoE group (multi-node)")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. n_kv_heads=2 (repeatable)")
    p.add_argument("--out", default="results/bench_forward", help="output prefix for .json and .png")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_arg(p, auto="float32 (random weights)")
    add_device_arg(p)
    add_launch_args(p, 2, "prints and writes the results")
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"--model-override expects KEY=VALUE, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from foe.bench.forward import ForwardBenchConfig, run_forward_bench
    from foe.bench.forward_report import plot, table
    rdzv = rendezvous_from_args(args, 2)
    first = rdzv.torchrun and rdzv.env_rank() == 0 or not rdzv.torchrun and rdzv.node_rank == 0
    bc = ForwardBenchConfig(preset=args.preset, nproc=rdzv.world_size, strategies=args.strategies, modes=args.modes,
                            batch_sizes=args.batch_sizes, seq_len=args.seq_len, context_len=args.context_len,
                            warmup=args.warmup, repeats=args.repeats, ranks_per_node=args.ranks_per_node,
                            ranks_per_group=args.ranks_per_group, seed=args.seed,
                            model_overrides=_overrides(args.model_override),
                            dtype=random_weights_dtype(args), nnodes=rdzv.nnodes, device=rdzv.device)
    bc.validate()
    if first:
        for s in bc.strategies:
            print(f"  {s}: {bc.dims(s).describe(bc.model_config(s))}")
    result = run_forward_bench(bc, rdzv, show_progress=first)
    if result is None:  # not rank 0's node or process: rank 0 reports
        return 0
    print()
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {png} ({result['wall_seconds']:.0f} s)")
    return 0
