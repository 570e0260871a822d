"""`foe train`, `foe eval`, `foe compare-quality`: train MoE/FoE models, evaluate them, compare them.

Data-parallel training: `torchrun --standalone --nproc-per-node 2 -m foe.cli.main train ...` (gloo on
CPU); --micro-batch is per process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from foe.cli.common import (GIVEN, add_device_arg, add_dtype_arg, add_model_args, at_least, check_output, config_from_args,
                            float_in, model_from_args, number_list, remember_given, tokenizer_from_args)

TASK_HELP = ("multiple-choice task, repeatable: NAME (built-in smoke-test set) or NAME=PATH (jsonl in the HF "
             "dataset's schema); names: arc_easy boolq copa hellaswag piqa sciq, or 'all' (default)")


FRACTION = float_in(0.0, 1.0, lo_open=True, hi_open=True)
NONNEG = float_in(0.0, math.inf)
TRAIN_EXAMPLES = """\
examples:
  foe train --preset tiny --steps 20 --seq-len 64 --micro-batch 4 --out /tmp/foe-run
  foe train --preset tiny --out /tmp/foe-run --resume --steps 40       extend the run above to 40 steps
  foe train --preset tiny --arch moe --data builtin --steps 10 --bf16 --out /tmp/moe-run
  torchrun --standalone --nproc-per-node 2 -m foe.cli.main train --preset tiny --steps 10 --seq-len 64 \\
      --micro-batch 2 --out /tmp/foe-dp                         data-parallel on 2 processes
"""
EVAL_EXAMPLES = """\
examples:
  foe eval --checkpoint runs/compare-quality/foe/aux0.01/seed0   a run directory: its latest checkpoint
  foe eval --preset tiny --task copa --val-tokens 4096 --json /tmp/eval.json
  foe eval --checkpoint runs/compare-quality/moe/aux0.01/seed0/step_00000400 --no-ppl --task boolq --task piqa
"""
COMPARE_EXAMPLES = """\
examples:
  foe compare-quality                                          the study: mini, 3 seeds, 3 coefficients (~45 min)
  foe compare-quality --quick --out /tmp/cq-quick              every part in about a minute (preset tiny)
  foe compare-quality --quick --out /tmp/cq-quick --resume     continue an interrupted study; finished runs are reused
  foe compare-quality --seeds 5 --aux-coefs 0.003,0.01,0.03 --out runs/cq5   more seeds, another grid
"""


def _add_train_args(p: argparse.ArgumentParser, steps: int, eval_every: int, out: str | None = None,
                    val_fraction: float | None = None, aux_coef: bool = True) -> None:
    from foe.train.config import TrainConfig
    d = TrainConfig(out_dir="")
    if val_fraction is not None:
        d = d.replace(val_fraction=val_fraction)
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="SRC",
                   help="'builtin' (public-domain English shipped with foe) or a .txt/.jsonl file; repeatable "
                        "(default builtin)")
    g.add_argument("--val-fraction", type=FRACTION, default=d.val_fraction, help="held-out share of tokens")
    g.add_argument("--seq-len", type=at_least(1), default=d.seq_len)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=at_least(1), default=steps,
                   help="total steps; with --resume, a new total extends (or shortens) the run")
    g.add_argument("--micro-batch", type=at_least(1), default=d.micro_batch,
                   help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=at_least(1), default=d.grad_accum)
    g.add_argument("--lr", type=float_in(0.0, math.inf, lo_open=True), default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float_in(0.0, 1.0), default=d.min_lr_ratio)
    g.add_argument("--warmup", type=at_least(0), default=d.warmup, help="warmup steps")
    g.add_argument("--weight-decay", type=NONNEG, default=d.weight_decay)
    g.add_argument("--grad-clip", type=NONNEG, default=d.grad_clip, help="max grad norm (0 = off)")
    if aux_coef:
        g.add_argument("--aux-coef", type=NONNEG, default=d.aux_coef, help="load-balancing loss weight")
    g.add_argument("--z-coef", type=NONNEG, default=d.z_coef, help="router z-loss weight (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights and optimizer)")
    g.add_argument("--device", default=d.device)
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", required=out is None, default=out, metavar="DIR",
                   help="run directory (log.jsonl, step_* checkpoints)" + (f" (default {out})" if out else ""))
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint with its saved settings; only "
                        "--steps and the logging/checkpoint cadence may be changed")
    g.add_argument("--eval-every", type=at_least(1), default=eval_every)
    g.add_argument("--val-tokens", type=at_least(1), default=d.val_tokens)
    g.add_argument("--log-every", type=at_least(1), default=d.log_every)
    g.add_argument("--ckpt-every", type=at_least(1), default=d.ckpt_every)
    g.add_argument("--keep-ckpts", type=at_least(1), default=d.keep_ckpts)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = commands.add_parser("train", help="train a MoE or FoE model (single process or torchrun data-parallel)",
                            description="Train a byte-level BPE tokenizer and a MoE/FoE model on packed text; "
                                        "log to OUT/log.jsonl; checkpoint to OUT/step_* (resume with --resume).",
                            epilog=TRAIN_EXAMPLES, formatter_class=raw)
    remember_given(p)  # --resume needs to know which settings the user typed
    add_model_args(p, default_preset="mini")
    _add_train_args(p, steps=1000, eval_every=100)
    p.set_defaults(func=train)

    p = commands.add_parser("eval", help="validation perplexity and zero-shot multiple-choice accuracy",
                            description="Evaluate a checkpoint (or run directory): perplexity on the held-out "
                                        "split of --data and lm-eval-style acc/acc_norm on multiple-choice tasks.",
                            epilog=EVAL_EXAMPLES, formatter_class=raw)
    add_model_args(p)
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--task", action="append", metavar="NAME[=PATH]", help=TASK_HELP)
    p.add_argument("--data", action="append", metavar="SRC",
                   help="text for perplexity (default: the run's training data; builtin for a checkpoint "
                        "without a training record)")
    p.add_argument("--seq-len", type=at_least(1), help="window length (default: the run's)")
    p.add_argument("--val-fraction", type=FRACTION,
                   help="held-out share of the documents (default: the run's; a larger one is refused)")
    p.add_argument("--val-tokens", type=at_least(1), help="score at most this many held-out tokens (default all)")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.set_defaults(func=evaluate)

    p = commands.add_parser("compare-quality", help="multi-seed, fairly tuned quality study of MoE against FoE",
                            description="Train MoE and FoE of one preset over several seeds (paired: same data "
                                        "order per seed), each at its own best load-balancing coefficient from a "
                                        "sweep; report test loss with standard errors, paired differences with a "
                                        "95% interval, expert load on held-out text, multiple choice, a plot, "
                                        "and whether FoE is within --margin of MoE. The default takes about "
                                        "45 minutes on 2 CPU cores; --quick takes about a minute.",
                            epilog=COMPARE_EXAMPLES, formatter_class=raw)
    remember_given(p)  # --quick fills in only what was not typed
    p.add_argument("--preset", default="mini", help="size preset (default mini)")
    p.add_argument("--sync", choices=("attention", "moe", "both"), default="attention")
    p.add_argument("--seeds", type=at_least(2), default=3, help="seeds per architecture (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed; the study uses SEED .. SEED+SEEDS-1")
    p.add_argument("--aux-coefs", type=number_list(float, "coefficients"), default=(0.001, 0.01, 0.1),
                   help="load-balancing coefficients swept per architecture on the first seed "
                        "(default 0.001,0.01,0.1)")
    p.add_argument("--margin", type=FRACTION, default=0.03,
                   help="FoE is 'comparable' if the 95%% interval of (FoE - MoE) / MoE test loss stays below it "
                        "(default 0.03)")
    p.add_argument("--test-tokens", type=at_least(1), help="cap on the test tokens per run (default: all "
                   "held-out tokens past the first --val-tokens)")
    p.add_argument("--quick", action="store_true",
                   help="a small study for smoke tests: preset tiny, 2 seeds, 2 coefficients, 40 short steps, "
                        "task copa (options you type still win)")
    p.add_argument("--task", action="append", metavar="NAME[=PATH]", help=TASK_HELP)
    _add_train_args(p, steps=400, eval_every=50, out="runs/compare-quality", val_fraction=0.08, aux_coef=False)
    p.set_defaults(func=compare)


# What --quick sets, unless typed: a study of about a minute that exercises every part.
QUICK = dict(preset="tiny", seeds=2, aux_coefs=(0.01, 0.1), steps=40, seq_len=64, micro_batch=4, warmup=4,
             eval_every=10, val_tokens=1024, test_tokens=8192, task=["copa"], log_every=10, ckpt_every=40)


def _train_config(args: argparse.Namespace, out: str):
    from foe.train.config import TrainConfig
    return TrainConfig(
        out_dir=out, data=tuple(args.data or ["builtin"]), seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        aux_coef=getattr(args, "aux_coef", TrainConfig.aux_coef),
        z_coef=args.z_coef, bf16=args.bf16, device=args.device, seed=args.seed, val_fraction=args.val_fraction,
        val_tokens=args.val_tokens, eval_every=args.eval_every, log_every=args.log_every,
        ckpt_every=args.ckpt_every, keep_ckpts=args.keep_ckpts, progress=not args.no_progress)


def train(args: argparse.Namespace) -> int:
    from foe.train.run import run_training
    if args.checkpoint:
        raise ValueError("train starts from --preset; to continue a run use --out DIR --resume")
    check_output(args.out, "--out", is_dir=True)
    tcfg, mcfg = _train_config(args, args.out), config_from_args(args)
    if args.resume:
        tcfg, mcfg = _resumed_configs(args, tcfg, mcfg)
    summary = run_training(tcfg, mcfg, resume=args.resume)
    if summary["checkpoint"]:
        print(f"final val loss {summary['final_val_loss']:.4f} (ppl {summary['final_val_ppl']:.2f}); unigram "
              f"baseline {summary['unigram_val_loss']:.4f}; {summary['tok_per_s']:,.0f} tok/s; "
              f"checkpoint {summary['checkpoint']}")
    return 0


# `foe train` option dests that are not TrainConfig fields of the same name.
_DEST_TO_FIELD = {"no_progress": "progress", "out": "out_dir"}


def _resumed_configs(args: argparse.Namespace, tcfg, mcfg):
    """The saved run's settings, overridden by the options typed on this command line (not their defaults,
    which would otherwise differ from most saved runs); run_training then refuses what cannot change."""
    from foe.model.checkpoint import load_config
    from foe.train.checkpointing import has_checkpoint, read_trainer_state, resolve_checkpoint
    from foe.train.config import TrainConfig
    if not has_checkpoint(args.out):
        return tcfg, mcfg  # nothing saved yet: --resume starts the run
    ckpt = resolve_checkpoint(args.out)
    given = getattr(args, GIVEN)
    typed = {_DEST_TO_FIELD.get(d, d) for d in given} & set(TrainConfig.__dataclass_fields__)
    saved = TrainConfig.from_dict(read_trainer_state(ckpt)["train_config"])
    tcfg = saved.replace(**{f: getattr(tcfg, f) for f in typed | {"out_dir", "progress"}})
    saved_model = load_config(ckpt)
    if "preset" in given:
        mcfg = mcfg.replace(arch=args.arch if "arch" in given else saved_model.arch,
                            sync=args.sync if "sync" in given else saved_model.sync)
    else:
        mcfg = saved_model.replace(**{k: getattr(args, k) for k in ("arch", "sync") if k in given})
    return tcfg, mcfg


def evaluate(args: argparse.Namespace) -> int:
    from foe.eval.harness import (evaluate_tasks, format_task_table, heldout_settings, mean_accuracy,
                                  parse_task_specs, validation_perplexity)
    tasks = parse_task_specs(args.task)
    model = model_from_args(args)
    tok = tokenizer_from_args(args)
    results: dict = {"checkpoint": args.checkpoint, "arch": model.cfg.arch}
    if not args.no_ppl:
        settings, warnings = heldout_settings(_training_record(args.checkpoint), args.data, args.val_fraction,
                                              args.seq_len)
        if args.checkpoint is None:
            warnings = []  # random weights from a preset: no training to have seen the text
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        ppl = validation_perplexity(model, tok, settings.data, settings.seq_len, settings.val_fraction,
                                    args.val_tokens or 1 << 30)
        results["perplexity"] = {**ppl, "data": list(settings.data), "val_fraction": settings.val_fraction,
                                 "seq_len": settings.seq_len, "warnings": warnings}
        lo, hi = ppl["val_ppl_ci95"]
        print(f"validation: loss {ppl['val_loss']:.4f} ± {ppl['val_loss_stderr']:.4f} nats/token, perplexity "
              f"{ppl['val_ppl']:.2f} (95% CI {lo:.2f}-{hi:.2f}; {ppl['val_tokens']} held-out tokens of "
              f"{list(settings.data)} in {ppl['val_windows']} windows of {settings.seq_len})")
    results["tasks"] = evaluate_tasks(model, tok, tasks)
    results["mean"] = mean_accuracy(results["tasks"])
    print(format_task_table({model.cfg.arch.upper(): results["tasks"]}))
    if any(r["source"].startswith("built-in") for r in results["tasks"].values()):
        print("(built-in tasks are a small smoke-test set written for foe, not the real benchmarks)")
    if args.json:  # checked writable before the evaluation (cli.main.check_outputs)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _training_record(checkpoint: str | None) -> dict | None:
    """The checkpoint's trainer_state.json (its run's settings), or None for a model-only checkpoint."""
    from foe.model.checkpoint import CheckpointError
    from foe.train.checkpointing import read_trainer_state
    if checkpoint is None:
        return None
    try:
        return read_trainer_state(checkpoint)
    except CheckpointError:
        return None


def compare(args: argparse.Namespace) -> int:
    from foe.eval.harness import parse_task_specs
    from foe.eval.quality_report import format_study
    from foe.eval.quality_study import StudyConfig, compare_quality
    if args.quick:
        for k, v in QUICK.items():
            if k not in getattr(args, GIVEN):
                setattr(args, k, v)
    study = StudyConfig(preset=args.preset, train=_train_config(args, args.out),
                        seeds=tuple(range(args.seed, args.seed + args.seeds)), aux_coefs=tuple(args.aux_coefs),
                        margin=args.margin, sync=args.sync, test_tokens=args.test_tokens or 1 << 30,
                        tasks=parse_task_specs(args.task))
    report = compare_quality(study, resume=args.resume)
    print(format_study(report))
    print(f"\nwrote {args.out}/compare_quality.json and {report['plot']}")
    return 0
