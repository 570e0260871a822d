"""Training checkpoints that resume exactly, written atomically, with no pickle anywhere.

Layout of a run directory:
    OUT/step_00000200/   config.json + model.safetensors   (foe.model.checkpoint: a normal checkpoint,
                         tokenizer.json + tokenizer_config.json    loadable by `foe`, transformers, lm-eval)
                         optimizer.safetensors  AdamW moments and step counts, plus the torch RNG state
                         trainer_state.json     step, samples consumed, configs, data fingerprint, hyper-
                                                parameters of the optimizer's param groups
    OUT/latest           the name of the newest complete step directory

A checkpoint is first written to a temporary directory and renamed into place; `latest` is replaced
with os.replace. A kill at any moment leaves `latest` naming a complete checkpoint; the temporary directory of
a killed write is removed when the run next starts or resumes. This module does not
decide when to checkpoint, and does not build models or data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from foe.model.checkpoint import (CONFIG_FILE, CheckpointError, apply_umask, atomic_write, check_state,
                                  load_state, save_checkpoint)
from foe.model.transformer import Transformer
from foe.tokenizer import save_tokenizer

LATEST = "latest"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory whose `latest` names one."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / LATEST).is_file():
        target = p / (p / LATEST).read_text().strip()
        if (target / CONFIG_FILE).is_file():
            return target
        raise CheckpointError(f"{p / LATEST} names {target}, which is not a checkpoint")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    raise CheckpointError(f"{p} is neither a checkpoint ({CONFIG_FILE}) nor a run directory ({LATEST})")


def _tmp_prefix(step_name: str) -> str:
    return f".{step_name}.tmp-"


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete the temporary directories of checkpoint writes that were killed mid-way (they are never
    complete: a finished write renames its directory). Returns what was removed."""
    run = Path(run_dir)
    gone = [p for p in run.glob(_tmp_prefix("step_*") + "*") if p.is_dir()] if run.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LATEST).is_file()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"state.{idx}.{k}": v.detach().contiguous().cpu()
               for idx, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def save_training_checkpoint(run_dir: str | Path, step: int, model: Transformer, opt: torch.optim.Optimizer,
                             tok: Tokenizer, state: dict[str, Any], keep: int = 2) -> Path:
    """Write OUT/step_<step> atomically, point `latest` at it, and delete all but the newest `keep`."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=_tmp_prefix(final.name)))
    try:
        save_checkpoint(model, tmp)
        save_tokenizer(tok, tmp)
        tensors, groups = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / OPTIM_FILE, metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=2) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp made tmp 0700; safetensors creates its files 0600
            apply_umask(path)
        if final.exists():  # a re-run of the same step after a kill: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(run / LATEST, lambda tmp: Path(tmp).write_text(final.name + "\n"))
    for old in sorted(run.glob("step_*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt} is a model checkpoint, not a training checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_training_state(ckpt: str | Path, model: Transformer, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights, optimizer moments and the RNG state from a step directory into existing objects."""
    d = Path(ckpt)
    state = read_trainer_state(d)
    weights = load_state(d)
    check_state(model, weights, str(d))
    model.load_state_dict(weights, strict=not model.cfg.tie_embeddings)
    try:
        tensors = load_file(d / OPTIM_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / OPTIM_FILE} is missing, corrupt or truncated ({e})") from None
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return state
