"""`foe serve` (the OpenAI-compatible server) and `foe bench engine` (engine throughput)."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from foe.cli.common import add_dtype_arg, add_model_args, at_least, float_in

if TYPE_CHECKING:
    from foe.config import ModelConfig
    from foe.engine.scheduler import SchedulerConfig
    from foe.parallel.launch import Rendezvous

DEFAULT_MASTER_PORT = 29500  # torchrun's


positive_int = at_least(1)
# a TCP port; 0 = any free port (the banner prints the one bound)
port_number = at_least(0, 65535, " (0: any free port)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="sequences per step and shard (default 64)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                   help="token budget per step and shard: the chunked-prefill size (default 512)")
    g.add_argument("--num-blocks", type=positive_int, default=None,
                   help="KV blocks per shard (default: enough for max-num-seqs full-length sequences, "
                        "capped at 1 GiB of KV)")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--enable-prefix-caching", action="store_true", help="share KV blocks of common prompt prefixes")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, streaming, metrics)",
                            description="Serve a model over the OpenAI API: /v1/completions (SSE streaming, "
                                        "logprobs, echo), /v1/chat/completions (with --chat-template), "
                                        "/v1/models, /health, /metrics (Prometheus).")
    add_model_args(p)
    add_dtype_arg(p)
    _add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free port)")
    g.add_argument("--served-model-name", default=None, help="model id in the API (default: foe-<arch>)")
    g.add_argument("--chat-template", metavar="FILE", default=None,
                   help="Hugging Face-style Jinja2 chat template; enables /v1/chat/completions (default: the "
                        "checkpoint's tokenizer_config.json chat_template, if any)")
    g.add_argument("--drain-timeout", metavar="S", type=float_in(0, math.inf), default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let requests in flight finish (new ones get 503) before "
                        "stopping anyway; a second signal stops at once (default 30)")
    g = p.add_argument_group("parallel")
    g.add_argument("--strategy", choices=("none", "ep", "tp", "gp"), default="none",
                   help="how ranks split the model: ep/tp (MoE), gp (FoE); none = one process (default)")
    g.add_argument("--nproc", type=positive_int, default=1,
                   help="ranks per node (local gloo processes, as torchrun's --nproc-per-node; default 1)")
    g.add_argument("--ranks-per-group", type=positive_int, default=1, help="gp: ranks sharing one FoE group")
    g.add_argument("--ranks-per-node", type=positive_int, default=None,
                   help="node layout for communication accounting (one node; with --nnodes it is --nproc)")
    g = p.add_argument_group("several nodes", "torchrun's conventions: world = nnodes x nproc, global rank = "
                             "node_rank x nproc + local rank; node 0 serves the API, node k > 0 only runs ranks")
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
    p.set_defaults(func=serve)

    b = bench.add_parser("engine", help="engine throughput: continuous batching vs one-at-a-time vs static batches",
                         description="Tokens/s of the engine at saturation against the same requests served one "
                                     "after another and in static batches, in one run; prints ratios.")
    add_model_args(b, default_preset="small")
    add_dtype_arg(b)
    _add_engine_args(b)
    b.add_argument("--num-requests", type=positive_int, default=24)
    b.add_argument("--prompt-len", default="16:128", help="prompt length range lo:hi (default 16:128)")
    b.add_argument("--output-len", default="16:64", help="output length range lo:hi (default 16:64)")
    b.add_argument("--static-batch", type=positive_int, default=8, help="batch size of the static-batching baseline")
    b.add_argument("--repeats", type=positive_int, default=2,
                   help="rounds over all modes; best time per mode (default 2)")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    b.set_defaults(func=bench_engine)


def _range(s: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in s.split(":"))
    except ValueError:
        raise ValueError(f"{name} must be lo:hi, got {s!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} needs 1 <= lo <= hi, got {s!r}")
    return lo, hi


def _scheduler_config(args: argparse.Namespace, model_cfg: ModelConfig, dp_size: int, dtype_bytes: int
                      ) -> SchedulerConfig:
    """dtype_bytes: bytes per element of the KV cache (the model's dtype)."""
    from foe.engine.scheduler import SchedulerConfig
    num_blocks = args.num_blocks
    if num_blocks is None:
        per_seq = -(-model_cfg.max_seq_len // args.block_size)
        block_bytes = model_cfg.kv_bytes_per_token(dtype_bytes) * args.block_size
        num_blocks = max(per_seq, min(args.max_num_seqs * per_seq, (1 << 30) // block_bytes))
    return SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           num_blocks=num_blocks, block_size=args.block_size, dp_size=dp_size,
                           enable_prefix_caching=args.enable_prefix_caching)


def serve(args: argparse.Namespace) -> int:
    from foe.cli.common import config_from_args, dtype_from_args
    from foe.engine.chat import ChatTemplate, chat_settings
    from foe.engine.launch import serve_forever
    from foe.engine.server import ServerConfig
    from foe.engine.worker import ModelSpec
    from foe.parallel import ParallelDims

    model_cfg = config_from_args(args)
    rdzv = _rendezvous(args)
    strategy = args.strategy if rdzv.world_size > 1 or args.strategy != "none" else "none"
    dims = ParallelDims(strategy, world_size=rdzv.world_size, ranks_per_group=args.ranks_per_group,
                        ranks_per_node=args.nproc if rdzv.nnodes > 1 else args.ranks_per_node)
    dims.validate(model_cfg)
    dtype = dtype_from_args(args)
    spec = ModelSpec(checkpoint=args.checkpoint, config=None if args.checkpoint else model_cfg, seed=args.seed,
                     dtype=dtype)
    # the template (from the file or the checkpoint's tokenizer_config.json) compiles before anything loads
    chat, bos, eos = chat_settings(args.checkpoint, args.chat_template)
    if chat is not None:
        ChatTemplate(chat)
    server_cfg = ServerConfig(model_name=args.served_model_name or f"foe-{model_cfg.arch}", host=args.host,
                              port=args.port, chat_template=chat, bos_token=bos, eos_token=eos)
    scheduler_cfg = _scheduler_config(args, model_cfg, dims.dp_size, dtype.itemsize)
    if rdzv.node_rank > 0:
        from foe.engine.worker import serve_node
        return serve_node(spec, dims, rdzv, scheduler_cfg.num_blocks, scheduler_cfg.block_size)
    return serve_forever(spec, dims, scheduler_cfg, server_cfg, args.drain_timeout, rdzv)


def _rendezvous(args: argparse.Namespace) -> Rendezvous:
    """The job's layout from --nnodes/--node-rank/--master-*/--nproc (ValueError naming a contradiction)."""
    from foe.parallel.launch import Rendezvous
    if args.nnodes > 1 and args.ranks_per_node not in (None, args.nproc):
        raise ValueError(f"with --nnodes, a node holds --nproc ({args.nproc}) ranks; drop --ranks-per-node "
                         f"{args.ranks_per_node}")
    port = args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT if args.nnodes > 1 else 0
    return Rendezvous(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                      master_port=port, timeout_s=args.dist_timeout)


def bench_engine(args: argparse.Namespace) -> int:
    from foe.bench.engine_throughput import EngineBenchConfig, print_report, run_engine_bench
    from foe.cli.common import model_from_args
    model = model_from_args(args)
    cfg = EngineBenchConfig(num_requests=args.num_requests, prompt_len=_range(args.prompt_len, "--prompt-len"),
                            output_len=_range(args.output_len, "--output-len"), static_batch=args.static_batch,
                            seed=args.seed, repeats=args.repeats)
    result = run_engine_bench(model, _scheduler_config(args, model.cfg, 1, model.embed.weight.itemsize), cfg)
    print_report(result)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0
