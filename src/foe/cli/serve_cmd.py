"""`foe serve` (the OpenAI-compatible server) and `foe bench engine` (engine throughput)."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from foe.cli.common import add_device_arg, add_dtype_arg, add_model_args, float_in
from foe.cli.launch_args import add_launch_args, port_number, positive_int, rendezvous_from_args

if TYPE_CHECKING:
    from foe.config import ModelConfig
    from foe.engine.scheduler import SchedulerConfig



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
    add_device_arg(p)
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
    g.add_argument("--ranks-per-group", type=positive_int, default=1, help="gp: ranks sharing one FoE group")
    g.add_argument("--ranks-per-node", type=positive_int, default=None,
                   help="node layout for communication accounting (one node; with --nnodes it is --nproc)")
    add_launch_args(p, 1, "serves the API, node k > 0 only runs ranks")
    p.set_defaults(func=serve)

    b = bench.add_parser("engine", help="engine throughput: continuous batching vs one-at-a-time vs static batches",
                         description="Tokens/s of the engine at saturation against the same requests served one "
                                     "after another and in static batches, in one run; prints ratios.")
    add_model_args(b, default_preset="small")
    add_dtype_arg(b)
    add_device_arg(b)
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
    from foe.cli.common import config_from_args, device_name, dtype_from_args
    from foe.engine.chat import ChatTemplate, chat_settings
    from foe.engine.launch import serve_forever
    from foe.engine.server import ServerConfig
    from foe.engine.worker import ModelSpec
    from foe.parallel import ParallelDims

    model_cfg = config_from_args(args)
    rdzv = rendezvous_from_args(args, 1)
    strategy = args.strategy if rdzv.world_size > 1 or args.strategy != "none" else "none"
    dims = ParallelDims(strategy, world_size=rdzv.world_size, ranks_per_group=args.ranks_per_group,
                        ranks_per_node=rdzv.nproc if rdzv.nnodes > 1 else args.ranks_per_node)
    dims.validate(model_cfg)
    dtype = dtype_from_args(args)
    spec = ModelSpec(checkpoint=args.checkpoint, config=None if args.checkpoint else model_cfg, seed=args.seed,
                     dtype=dtype, device=device_name(args))
    # the template (from the file or the checkpoint's tokenizer_config.json) compiles before anything loads
    chat, bos, eos = chat_settings(args.checkpoint, args.chat_template)
    if chat is not None:
        ChatTemplate(chat)
    server_cfg = ServerConfig(model_name=args.served_model_name or f"foe-{model_cfg.arch}", host=args.host,
                              port=args.port, chat_template=chat, bos_token=bos, eos_token=eos)
    scheduler_cfg = _scheduler_config(args, model_cfg, dims.dp_size, dtype.itemsize)
    if rdzv.torchrun and rdzv.env_rank() > 0:
        from foe.engine.worker import serve_torchrun_rank
        return serve_torchrun_rank(spec, dims, rdzv, scheduler_cfg.num_blocks, scheduler_cfg.block_size)
    if rdzv.node_rank > 0:
        from foe.engine.worker import serve_node
        return serve_node(spec, dims, rdzv, scheduler_cfg.num_blocks, scheduler_cfg.block_size)
    return serve_forever(spec, dims, scheduler_cfg, server_cfg, args.drain_timeout, rdzv)


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
