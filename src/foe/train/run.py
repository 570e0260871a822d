"""A whole training run: data, tokenizer, model, the step loop, logging, validation, checkpoints, resume.

Run by `foe train` in one process, or in several with `torchrun --nproc-per-node N -m foe.cli.main
train ...` (gloo on CPU): every rank builds the same model from the seed and reads its own shard of
each step's samples; rank 0 alone writes the log, the progress bar and checkpoints.

Log (OUT/log.jsonl, one JSON object a line): a "meta" record, then "train" records (loss, ce, aux,
z, lr, grad_norm, tokens, tok_per_s, load balance) every log_every steps and "val" records (val_loss,
val_ppl) every eval_every steps and at step 0 and the end. On resume the records past the checkpoint
are dropped first, so the log reads as if the run had never been interrupted; a resume that changes
settings adds a "resume" record saying which, and what that does to the learning-rate schedule.

Resuming keeps everything that decides what is learned (data, batch, optimiser, model) as saved; only
`steps` (extend or shorten a run; the cosine schedule is stretched to the new total) and the logging and
checkpointing cadence may change. Any other difference is an error that lists the settings.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from foe.config import ModelConfig
from foe.model.checkpoint import atomic_write, load_config
from foe.model.transformer import Transformer
from foe.tokenizer import TOKENIZER_FILE, check_vocab_fits, load_tokenizer, train_bpe
from foe.train.checkpointing import (has_checkpoint, load_training_state, read_trainer_state,
                                     remove_partial_checkpoints, resolve_checkpoint, save_training_checkpoint)
from foe.train.config import TrainConfig
from foe.train.data import (SPLIT_SCHEME, PackedData, fingerprint, read_documents, split_documents,
                            tokenize_documents, unigram_loss)
from foe.parallel.launch import rank_device
from foe.train.distributed import barrier, init_from_env
from foe.train.trainer import Trainer, load_balance

LOG_FILE = "log.jsonl"


class JsonlLog:
    """Append-only JSONL log on rank 0; `truncate_after(step)` drops records of steps past a checkpoint."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in _records(self.path) if r["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill mid-write
    return out


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG_FILE
    return _records(path) if path.is_file() else []


def _tokenizer(run: Path, docs: list[str], vocab_size: int, rank: int, world: int):
    """Rank 0 trains the BPE and writes it to the run directory; the other ranks read that file."""
    if rank == 0:
        tok = train_bpe(docs, vocab_size)
        run.mkdir(parents=True, exist_ok=True)
        tok.save(str(run / TOKENIZER_FILE))
    barrier(world)
    return tok if rank == 0 else load_tokenizer(run)


# Settings a resumed run may change: they decide what is logged and kept, not what is learned.
RESUME_FREE = ("out_dir", "progress", "log_every", "eval_every", "ckpt_every", "keep_ckpts")


def resume_changes(saved: TrainConfig, given: TrainConfig, saved_model: ModelConfig, given_model: ModelConfig,
                   step: int) -> dict[str, list[Any]]:
    """The settings `given` changes against the run saved at `step`, as {name: [saved, given]}; raises
    ValueError listing every change a resume cannot honour."""
    changed = {f: [getattr(saved, f), getattr(given, f)] for f in TrainConfig.__dataclass_fields__
               if f not in ("out_dir", "progress") and getattr(saved, f) != getattr(given, f)}
    bad = [f"{f}: saved {a!r}, given {b!r}" for f, (a, b) in changed.items() if f not in RESUME_FREE + ("steps",)]
    bad += [f"model {f}: saved {getattr(saved_model, f)!r}, given {getattr(given_model, f)!r}"
            for f in ModelConfig.__dataclass_fields__ if getattr(saved_model, f) != getattr(given_model, f)]
    if bad:
        raise ValueError("--resume continues the saved run, but these settings differ from it: " + "; ".join(bad)
                         + f". Only --steps and {', '.join('--' + f.replace('_', '-') for f in RESUME_FREE[2:])} "
                         "may change; start a new run (another --out) to change the others")
    if "steps" in changed and given.steps <= step:
        raise ValueError(f"--steps {given.steps}, but the saved run is already at step {step}: pass more steps")
    return changed


def run_training(tcfg: TrainConfig, mcfg: ModelConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) and return a summary: final validation loss/perplexity, unigram baseline,
    throughput, load balance, and the path of the last checkpoint."""
    rank, world = init_from_env(tcfg.device)
    run = Path(tcfg.out_dir)
    ckpt, state, changes = None, None, {}
    if has_checkpoint(run):
        if not resume:
            raise ValueError(f"{run} already holds a training run; pass --resume to continue it, "
                             f"or choose another --out")
        ckpt = resolve_checkpoint(run)
        state = read_trainer_state(ckpt)
        if state["world"] != world:
            raise ValueError(f"{ckpt} was written by {state['world']} processes; resume with the same number")
        # The data order, optimiser and model must be those of the original run; see resume_changes.
        changes = resume_changes(TrainConfig.from_dict({**state["train_config"], "out_dir": str(run)}), tcfg,
                                 load_config(ckpt), mcfg, state["step"])
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len {tcfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if rank == 0:  # a write killed mid-way (any earlier attempt) left its temporary directory behind
        remove_partial_checkpoints(run)
    if state is not None and state.get("split_scheme") != SPLIT_SCHEME:
        raise ValueError(f"{ckpt} was written by an older foe that held out the last tokens rather than whole "
                         f"documents (and trained its tokenizer on the held-out text too); it cannot be resumed "
                         f"with the current split. Start a new run, or use this checkpoint as it is")
    train_docs, val_docs = split_documents(read_documents(tcfg.data), tcfg.val_fraction)
    # The tokenizer learns from the training documents only: held-out text must be new to every part of the run.
    tok = load_tokenizer(ckpt) if ckpt else _tokenizer(run, train_docs, mcfg.vocab_size, rank, world)
    check_vocab_fits(tok, mcfg.vocab_size, "the trained tokenizer" if ckpt is None else str(ckpt / TOKENIZER_FILE))
    data = PackedData.from_streams(tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok),
                                   tcfg.seq_len, tcfg.seed)
    data_fp = fingerprint(torch.cat([data.train, data.val]))
    if state is not None and state["data_fingerprint"] != data_fp:
        raise ValueError(f"the training data changed since {ckpt} was written (fingerprint {data_fp} vs "
                         f"{state['data_fingerprint']}); resume needs the same data files")

    torch.manual_seed(tcfg.seed)
    # several ranks: each on the device the launcher gave it (its local rank's GPU), whatever --device named
    model = Transformer(mcfg).to(rank_device() if world > 1 else tcfg.device)
    trainer = Trainer(model, tcfg, data, rank, world)
    start = load_training_state(ckpt, model, trainer.opt)["step"] if ckpt else 0
    log = JsonlLog(run / LOG_FILE, rank == 0)
    unigram = unigram_loss(data, mcfg.vocab_size, trainer.val_batches())
    if start == 0:
        log.truncate_after(-1)
        log.write({"kind": "meta", "step": 0, "arch": mcfg.arch, "params": model.num_params(),
                   "active_params": mcfg.num_active_params, "world": world, "train_tokens": len(data.train),
                   "val_tokens": len(data.val), "tokens_per_step": trainer.tokens_per_step,
                   "unigram_val_loss": unigram, "model_config": mcfg.to_dict(), "train_config": tcfg.to_dict()})
    else:
        log.truncate_after(start)
        if changes:
            note = ""
            if "steps" in changes:
                note = (f"the cosine learning-rate schedule now decays over {tcfg.steps} steps instead of "
                        f"{changes['steps'][0]}, so from step {start} on the learning rate differs from the "
                        f"original run's")
            log.write({"kind": "resume", "step": start, "changes": changes, "note": note})
            if rank == 0:
                print(f"resuming {run} at step {start} with changed settings: "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                      + (f" ({note})" if note else ""), file=sys.stderr)
        if start >= tcfg.steps and rank == 0:
            print(f"nothing to train: {run} already finished its {tcfg.steps} steps; pass a larger --steps "
                  f"with --resume to train further", file=sys.stderr)

    def validate(step: int) -> float:
        v = trainer.validation_loss()
        log.write({"kind": "val", "step": step, "val_loss": v, "val_ppl": math.exp(v)})
        return v

    val = validate(0) if start == 0 and rank == 0 else float("nan")
    bar = tqdm(total=tcfg.steps, initial=start, disable=not (tcfg.progress and rank == 0), unit="step",
               dynamic_ncols=True)
    window_tokens, window_s, train_s = 0, 0.0, 0.0
    balance: dict[str, float] = {}
    t_run = time.perf_counter()
    for step in range(start, tcfg.steps):
        st = trainer.train_step(step)
        done = step + 1
        window_tokens += trainer.tokens_per_step
        window_s += st.seconds
        train_s += st.seconds
        balance = load_balance(st.expert_counts, mcfg.num_groups)
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            log.write({"kind": "train", "step": done, "tokens": done * trainer.tokens_per_step, "loss": st.loss,
                       "ce": st.ce, "aux": st.aux, "z": st.z, "lr": st.lr, "grad_norm": st.grad_norm,
                       "tok_per_s": window_tokens / max(window_s, 1e-9), **balance})
            bar.set_postfix(loss=f"{st.ce:.3f}", val=f"{val:.3f}", tok_s=f"{window_tokens / max(window_s, 1e-9):.0f}")
            window_tokens, window_s = 0, 0.0
        if rank == 0 and (done % tcfg.eval_every == 0 or done == tcfg.steps):
            val = validate(done)
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
            if rank == 0:
                save_training_checkpoint(run, done, model, trainer.opt, tok, {
                    "samples_consumed": done * trainer.samples_per_step, "world": world,
                    "data_fingerprint": data_fp, "split_scheme": SPLIT_SCHEME,
                    "train_config": tcfg.to_dict()}, keep=tcfg.keep_ckpts)
            barrier(world)
        bar.update(1)
    bar.close()
    if rank == 0 and val != val:  # resumed a finished run: nothing trained, measure the model anyway
        val = trainer.validation_loss()
    return {"out_dir": str(run), "checkpoint": str(resolve_checkpoint(run)) if rank == 0 else None,
            "arch": mcfg.arch, "steps": tcfg.steps, "resumed_from": start, "world": world,
            "tokens_trained": tcfg.steps * trainer.tokens_per_step, "final_val_loss": val,
            "final_val_ppl": math.exp(val) if val == val else float("nan"), "unigram_val_loss": unigram,
            "train_seconds": train_s, "wall_seconds": time.perf_counter() - t_run,
            "tok_per_s": (tcfg.steps - start) * trainer.tokens_per_step / max(train_s, 1e-9), **balance}
