"""`foe bench model`: single-process forward latency of MoE vs FoE vs a naive loop vs the machine floor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foe.cli.common import add_device_arg, add_dtype_arg, device_name, number_list, random_weights_dtype


_ints = number_list(int, "integers", positive=True)


def _phases(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.replace(",", " ").split())


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "model", help="single-process forward latency: MoE vs FoE vs naive loop vs machine floor",
        description="Time prefill and decode forwards of the MoE and FoE models of one preset (random "
                    "weights) for several batch sizes and sequence lengths, interleaved in one run, beside "
                    "a Hugging Face Mixtral-style per-expert loop and the floor set by this machine's "
                    "measured matmul rate and copy bandwidth. Prints a table, writes JSON and a PNG plot.")
    p.add_argument("--preset", default="small", help="size preset: tiny, small, 1b, 7b (default small)")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 4, 16, 64), metavar="B,..",
                   help="sequences per forward (default 1,4,16,64)")
    p.add_argument("--seq-lens", type=_ints, default=(128, 512), metavar="L,..",
                   help="prefill: new tokens per sequence; decode: cached tokens per sequence (default 128,512)")
    p.add_argument("--phases", type=_phases, default=("prefill", "decode"), metavar="P,..",
                   help="prefill and/or decode (default both)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per variant and shape (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive per-expert loop baseline")
    p.add_argument("--no-feed-forward", action="store_true",
                   help="skip timing one feed-forward layer alone at each token count")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="wall: elapsed time (on cuda, after synchronising); cpu: the thread's CPU time, for a busy "
                        "shared machine (needs --threads 1; not on cuda); auto (default): wall, or on the CPU cpu "
                        "with 1 thread when the load average is already near the core count")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, metavar="N",
                   help="skip prefill shapes with batch * seq len above N (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    add_dtype_arg(p, auto="float32 (random weights); the floor's matmul runs in it too")
    add_device_arg(p)
    p.add_argument("--json", default="results/bench_model.json", metavar="PATH",
                   help="where to write results (default results/bench_model.json)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG plot path (default: the JSON path with .png); 'none' to skip")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from foe.bench.model_latency import ModelBenchConfig, run_model_bench
    from foe.bench.model_report import format_table, plot

    bench = ModelBenchConfig(preset=args.preset, batch_sizes=args.batch_sizes, seq_lens=args.seq_lens,
                             phases=args.phases, repeats=args.repeats, warmup=args.warmup,
                             naive=not args.no_naive, feed_forward=not args.no_feed_forward, seed=args.seed, threads=args.threads,
                             max_prefill_tokens=args.max_prefill_tokens, clock=args.clock,
                             dtype=random_weights_dtype(args), device=device_name(args))
    result = run_model_bench(bench)
    print()
    print(format_table(result))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    if (args.plot or "").lower() != "none":
        print(f"wrote {plot(result, args.plot or out.with_suffix('.png'))}")
    return 0
