"""Evaluate a model: validation perplexity on held-out text and zero-shot multiple-choice accuracy.

Perplexity uses the same held-out documents as training (foe.train.data.split_documents), so a
checkpoint evaluated with its run's data settings (`heldout_settings` reads them) is scored on text it
never saw; it carries a standard error over windows (foe.eval.heldout). Multiple-choice tasks are scored
by foe.eval.scoring (lm-eval's acc / acc_norm with their standard errors). Results are one JSON-able dict.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from foe.eval.heldout import score_windows
from foe.eval.scoring import score_items
from foe.eval.tasks import TASKS, load_task
from foe.model.transformer import Transformer
from foe.train.config import TrainConfig
from foe.train.data import SPLIT_SCHEME, PackedData, held_out_stream


def validation_perplexity(model: Transformer, tok: Tokenizer, sources: list[str] | tuple[str, ...],
                          seq_len: int, val_fraction: float = 0.02, max_tokens: int = 1 << 30,
                          batch_size: int = 8) -> dict[str, float]:
    """Loss, its standard error and perplexity on the held-out documents of `sources` (up to `max_tokens`)."""
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    val = held_out_stream(sources, tok, val_fraction)
    batches = PackedData(val[:0], val, seq_len, 0).val_batches(batch_size, max_tokens)
    return score_windows(model, batches).to_dict()


@dataclass(frozen=True)
class HeldOutSettings:
    """Where the held-out text comes from: data sources, held-out fraction, window length."""
    data: tuple[str, ...]
    val_fraction: float
    seq_len: int


def heldout_settings(saved: dict[str, Any] | None, data: list[str] | None, val_fraction: float | None,
                     seq_len: int | None) -> tuple[HeldOutSettings, list[str]]:
    """The held-out settings to score with, and warnings for the user. `saved` is the checkpoint's training
    record (trainer_state.json, or None when it has none); the other arguments are what the user typed
    (None: not given). Unset values come from the run, so a run is scored on its own held-out documents.
    Raises ValueError where the asked-for split would score documents the run trained on."""
    default = TrainConfig(out_dir="")
    if saved is None:
        s = HeldOutSettings(tuple(data or default.data), val_fraction or default.val_fraction,
                            seq_len or default.seq_len)
        return s, ["this checkpoint has no training record (trainer_state.json), so whether the scored text "
                   "was held out from its training cannot be checked"]
    run = TrainConfig.from_dict(saved["train_config"])
    s = HeldOutSettings(tuple(data or run.data), val_fraction or run.val_fraction, seq_len or run.seq_len)
    warnings = []
    if s.data != run.data:
        warnings.append(f"the run trained on {list(run.data)}; scoring the held-out documents of {list(s.data)} "
                        f"instead, which may contain text it trained on")
    elif s.val_fraction > run.val_fraction:
        raise ValueError(f"--val-fraction {s.val_fraction:g} is larger than the run's {run.val_fraction:g}: the "
                         f"extra documents were training data. Use at most {run.val_fraction:g} (the default "
                         f"is the run's own)")
    if saved.get("split_scheme") != SPLIT_SCHEME:
        warnings.append("this run was trained by an older foe that held out the last tokens, not whole "
                        "documents, and trained its tokenizer on all the text: its score on today's held-out "
                        "documents may include a little training text")
    return s, warnings


def parse_task_specs(specs: list[str] | None) -> dict[str, str | None]:
    """['arc_easy', 'boolq=/data/boolq.jsonl', 'all'] -> {task: path or None (built-in smoke set)}."""
    out: dict[str, str | None] = {}
    for spec in specs or ["all"]:
        name, _, path = spec.partition("=")
        if name == "all":
            out.update({t: None for t in TASKS if t not in out})
            continue
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} or 'all'")
        out[name] = path or None
    return out


def evaluate_tasks(model: Transformer, tok: Tokenizer, tasks: dict[str, str | None], batch_size: int = 16
                   ) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, path in tasks.items():
        t0 = time.perf_counter()
        items = load_task(name, path)
        r = score_items(model, tok, items, batch_size)
        r["source"] = str(path) if path else "built-in smoke-test set (not the real benchmark)"
        r["seconds"] = time.perf_counter() - t0
        results[name] = r
    return results


def mean_accuracy(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over tasks of acc and acc_norm, with the standard error of that mean (tasks are
    independent samples: the root of the summed squared task errors, over the number of tasks)."""
    if not results:
        return {}
    k = len(results)
    out = {m: sum(r[m] for r in results.values()) / k for m in ("acc", "acc_norm")}
    out.update({f"{m}_stderr": math.sqrt(sum(r[f"{m}_stderr"] ** 2 for r in results.values())) / k
                for m in ("acc", "acc_norm")})
    return out


def format_task_table(columns: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Rows = tasks, one 'acc ± stderr / acc_norm ± stderr' column per model (lm-eval's standard errors)."""
    names = list(columns)
    tasks = list(next(iter(columns.values())))

    def cell(r: dict[str, Any]) -> str:
        return f"{r['acc']:.3f} ± {r['acc_stderr']:.3f} / {r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}"

    rows = [["task", "n"] + [f"{n} acc / acc_norm" for n in names]]
    for t in tasks:
        rows.append([t, str(columns[names[0]][t]["n"])] + [cell(columns[n][t]) for n in names])
    rows.append(["mean", ""] + [cell(mean_accuracy(columns[n])) for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)

