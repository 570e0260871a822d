"""Checkpoints as a Hugging Face-style directory: `config.json` + `model.safetensors` (never pickle).

Loading checks everything a user can get wrong and names it: a missing directory or file, a corrupt or
truncated safetensors file, a config that does not parse or validate, a tokenizer.json with more tokens
than the config's vocab_size, and tensors that are missing, unexpected or of the wrong shape for the config.

Files are written to a temporary name and renamed into place. mkstemp/mkdtemp create them owner-only
(0600/0700); `apply_umask` gives them the permissions an ordinary open()/mkdir() would have, so a
checkpoint written by one user can be read by the group as the umask allows.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from foe.config import ModelConfig
from foe.model.transformer import Transformer
from foe.tokenizer import TOKENIZER_FILE, check_vocab_fits, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and what is wrong."""


def config_to_hf(cfg: ModelConfig) -> dict:
    from foe import __version__
    return {"model_type": "foe", "architectures": ["FoEForCausalLM"], "foe_version": __version__,
            **cfg.to_dict()}


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it, and
    setting it briefly would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file made by mkstemp (0600) or a directory made by mkdtemp (0700) the permissions that
    open() or mkdir() would have given it: 0o666 or 0o777 minus the umask."""
    mode = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, mode & ~current_umask())


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename (with
    the umask's permissions); a failure leaves `path` as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: Transformer, directory: str | Path, extra_config: dict | None = None) -> Path:
    """Write config.json and model.safetensors into `directory` (created if needed), each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)  # safetensors stores no aliases; re-tied on load
    atomic_write(d / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": "pt"}))
    cfg = {**config_to_hf(model.cfg), **(extra_config or {})}
    atomic_write(d / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return d


def load_config(directory: str | Path) -> ModelConfig:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if raw.get("model_type", "foe") != "foe":
        raise CheckpointError(f"{path} has model_type {raw['model_type']!r}, expected 'foe'")
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if (d / TOKENIZER_FILE).is_file():  # a tokenizer that can emit ids past the embedding is a broken pair
        try:
            tok = load_tokenizer(d)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise CheckpointError(f"{d / TOKENIZER_FILE} cannot be read: {e}") from None
        try:
            check_vocab_fits(tok, cfg.vocab_size, str(d / TOKENIZER_FILE))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return cfg


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None


def check_state(model: Transformer, state: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append("shape mismatch " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + ", ".join(problems))


def _widest(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype that holds every one of `dtypes` exactly (float32 for none)."""
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (the widest, should they differ)."""
    return _widest({t.dtype for t in state.values() if t.is_floating_point()})


# safetensors' names of the floating-point dtypes a checkpoint may hold
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """`stored_dtype` of a checkpoint, read from the safetensors header without loading the weights."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(path, framework="pt") as f:
            names = {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is missing, corrupt or truncated ({e})") from None
    return _widest({_SAFETENSORS_FLOATS[n] for n in names if n in _SAFETENSORS_FLOATS})


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", expert_impl: str = "grouped_mm") -> Transformer:
    """Build the model from config.json and load model.safetensors into it, exactly: the model is in
    `dtype` (None: the stored dtype) before the weights are copied in, so each stored value is
    converted once, and not at all when the dtypes agree (a float64 checkpoint loads bit for bit)."""
    cfg = load_config(directory)
    state = load_state(directory)
    model = Transformer(cfg, expert_impl=expert_impl).to(dtype=dtype or stored_dtype(state))
    check_state(model, state, str(Path(directory) / WEIGHTS_FILE))
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    model.to(device=device)
    return model.eval()


def build_model(checkpoint: str | Path | None, config: ModelConfig | None = None, seed: int = 0,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """The model of `checkpoint`, or (checkpoint None) `config` with random weights drawn from `seed`; in
    eval mode and in `dtype` (None: the stored dtype; float32 for random weights, which are drawn in
    float32 so that a seed gives the same model in every dtype, up to rounding)."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, dtype=dtype, device=device)
    if config is None:
        raise ValueError("build_model needs a checkpoint or a config")
    torch.manual_seed(seed)
    return Transformer(config).to(device=device, dtype=dtype or torch.float32).eval()
