"""`foe bench step`: where the time of one engine step goes (decode and mixed steps)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foe.cli.common import add_device_arg, at_least, check_output, device_name


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "step", help="one engine step taken apart: paged attention vs a dense cache, profile",
        description="Time a decode step (BATCH sequences at CONTEXT tokens) and a mixed step (the same plus "
                    "one CHUNK-token prompt) through the paged KV pool, with the native decode kernel and "
                    "with the torch path, beside the same decode over a dense cache; time LLMEngine.step() "
                    "split into schedule / model / sampling; print torch.profiler's top operators. "
                    "Random weights, one process.")
    p.add_argument("--preset", default="small", help="size preset (default small)")
    p.add_argument("--arch", choices=("moe", "foe"), default="moe", help="architecture (default moe)")
    p.add_argument("--batch", type=at_least(1), default=64, help="decoding sequences (default 64)")
    p.add_argument("--context", type=at_least(1), default=256, help="tokens each one holds (default 256)")
    p.add_argument("--chunk", type=at_least(1), default=256, help="the mixed step's prompt chunk (default 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the engine-step requests (default 0: greedy)")
    p.add_argument("--repeats", type=at_least(1), default=20, help="timed calls per variant (default 20)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                   help="model and KV dtype (default float32)")
    add_device_arg(p)
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch threads (default 1: the engine core's share of a 2-core machine)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (on cuda, after synchronising); cpu: this thread's CPU time (robust "
                        "on a busy machine; needs --threads 1; not on cuda)")
    p.add_argument("--json", default="results/bench_step.json", metavar="PATH",
                   help="where to write results (default results/bench_step.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from foe.bench.engine_step import StepBenchConfig, format_report, run_step_bench

    check_output(args.json, "--json")
    cfg = StepBenchConfig(preset=args.preset, arch=args.arch, batch=args.batch, context=args.context,
                          chunk=args.chunk, temperature=args.temperature, repeats=args.repeats, dtype=args.dtype,
                          threads=args.threads, clock=args.clock, device=device_name(args))
    res = run_step_bench(cfg)
    print(format_report(res))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")
    return 0
