"""`foe info`, `foe init`, `foe generate`: look at, create and sample from models."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from foe.cli.common import (add_device_arg, add_dtype_arg, add_model_args, at_least, check_output,
                            checkpoint_from_args, config_from_args, float_in, model_from_args)
from foe.tables import align_right


INFO_EXAMPLES = """\
examples:
  foe info --preset 7b                          MoE and FoE sizes of the 7b preset
  foe info --preset small --arch moe            the small preset, config printed as MoE
  foe info --checkpoint runs/cq-default/foe     a checkpoint or a `foe train` run directory
"""
INIT_EXAMPLES = """\
examples:
  foe init --preset tiny --out /tmp/foe-tiny                 random FoE weights, byte-level tokenizer
  foe init --preset small --arch moe --seed 1 --out /tmp/moe-small
  foe init --checkpoint runs/cq-default/foe --out /tmp/foe-copy   copy weights and tokenizer
  foe init --preset tiny --out /tmp/foe-tiny --force         replace the checkpoint written above
"""
GENERATE_EXAMPLES = """\
examples:
  foe generate --preset tiny --prompt-ids "1 2 3" --max-new-tokens 8
  foe generate --preset tiny --dtype float64 --prompt-ids "1 2 3"     float64 weights, activations and KV
  foe generate --preset tiny --device cuda --dtype bfloat16           on the GPU (--device auto picks it)
  foe generate --checkpoint runs/cq-default/foe --prompt-ids "464 3290" --temperature 0.8 --top-p 0.9 \\
      --sample-seed 0
"""
# Files of a checkpoint directory that `init` replaces or removes, so that no stale tokenizer,
# optimizer or trainer state of an earlier checkpoint is left beside new weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STALE_FILES = TOKENIZER_FILES + ("optimizer.safetensors", "trainer_state.json")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = commands.add_parser("info", help="parameter counts, FLOPs and KV bytes of MoE and FoE at a preset",
                            description="Print the size of the MoE and FoE variants of a preset (or of a "
                                        "checkpoint's config) side by side.", epilog=INFO_EXAMPLES,
                            formatter_class=raw)
    add_model_args(p)
    p.set_defaults(func=info)

    p = commands.add_parser("init", help="write a randomly initialised checkpoint (or copy one)",
                            description="Create a checkpoint directory (config.json + model.safetensors). From "
                                        "--preset: random weights (seeded by --seed), no tokenizer file (foe then "
                                        "uses its byte-level tokenizer). From --checkpoint: a copy of that "
                                        "checkpoint's weights, config and tokenizer files, without optimizer or "
                                        "trainer state (a clean model checkpoint of a training run). --out must "
                                        "be empty or new unless --force.", epilog=INIT_EXAMPLES, formatter_class=raw)
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR: replaces its checkpoint files and removes a stale "
                        f"{', '.join(STALE_FILES)}; other files are left alone")
    p.set_defaults(func=init)

    p = commands.add_parser("generate", help="generate tokens from a prompt of token ids",
                            description="Greedy or sampled generation with the bare model and a KV cache; prints "
                                        "the new token ids.", epilog=GENERATE_EXAMPLES, formatter_class=raw)
    add_model_args(p)
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--prompt-ids", default="1 2 3", help="space-separated token ids (default '1 2 3')")
    p.add_argument("--max-new-tokens", type=at_least(1), default=16, help="tokens to generate, >= 1 (default 16)")
    p.add_argument("--temperature", type=float_in(0.0, math.inf), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=at_least(0), default=0, help="sample among the k likeliest; 0 = all (default)")
    p.add_argument("--sample-seed", type=int, default=None, help="seed for sampling")
    p.set_defaults(func=generate)


def info(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rows = [("arch", "params", "active", "GFLOP/token", "KV KiB/token (fp16)", "groups")]
    for arch in ("moe", "foe"):
        c = cfg.replace(arch=arch)
        rows.append((arch, f"{c.num_params / 1e6:,.2f}M", f"{c.num_active_params / 1e6:,.2f}M",
                     f"{c.flops_per_token() / 1e9:.3f}", f"{c.kv_bytes_per_token(2) / 1024:.1f}", str(c.num_groups)))
    print(align_right(rows))
    print(f"\nconfig: {cfg.to_json()}")
    return 0


def init(args: argparse.Namespace) -> int:
    from foe.model.checkpoint import save_checkpoint
    out = Path(args.out)
    check_output(out, "--out", is_dir=True)
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not args.force:
        raise ValueError(f"--out {out} is not empty ({', '.join(present[:5])}{' ...' if len(present) > 5 else ''}); "
                         f"choose a new directory or pass --force to replace the checkpoint in it")
    model = model_from_args(args)
    src = checkpoint_from_args(args)
    # Read the source tokenizer before touching --out: it may be the same directory.
    tokenizer = {n: (src / n).read_bytes() for n in TOKENIZER_FILES if src and (src / n).is_file()}
    for name in STALE_FILES:
        (out / name).unlink(missing_ok=True)
    path = save_checkpoint(model, out)
    for name, data in tokenizer.items():
        (path / name).write_bytes(data)
    what = f"copy of {src}" if src else "random weights, byte-level tokenizer"
    print(f"wrote {path} ({model.num_params():,} parameters, arch={model.cfg.arch}; {what}"
          f"{' with its tokenizer' if tokenizer else ''})")
    return 0


def generate(args: argparse.Namespace) -> int:
    from foe.engine.sampler import SamplingParams
    from foe.generate import generate as gen
    try:
        ids = [int(t) for t in args.prompt_ids.split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by spaces, got {args.prompt_ids!r}") from None
    model = model_from_args(args)
    if any(not 0 <= t < model.cfg.vocab_size for t in ids):
        raise ValueError(f"token ids must be in [0, {model.cfg.vocab_size})")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)
    out = gen(model, [ids], args.max_new_tokens, params)[0]
    print(" ".join(map(str, out)))
    return 0
