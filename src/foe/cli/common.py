"""Argument helpers shared by subcommands: choosing a model by preset or checkpoint, numeric option types
that reject impossible values at parse time, output paths checked before the work starts, and a record of
which options the user typed (so that `train --resume` can tell a chosen value from a default).

A `--checkpoint` may name a checkpoint directory or a `foe train --out` run directory (its `latest`
checkpoint is used); every command resolves it the same way through `checkpoint_from_args`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from foe.config import ModelConfig
    from foe.model import Transformer

GIVEN = "given_options"  # Namespace attribute: the dests of the options present on the command line


def _remembering(base: type[argparse.Action]) -> type[argparse.Action]:
    class Remembering(base):  # type: ignore[valid-type,misc]
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, frozenset(getattr(namespace, GIVEN, frozenset())) | {self.dest})
    return Remembering


def remember_given(p: argparse.ArgumentParser) -> None:
    """Make the options added to `p` from now on record their dest in `args.given_options` when typed."""
    # None is the registry key of add_argument without action=, i.e. "store".
    for name, base in ((None, argparse._StoreAction), ("store", argparse._StoreAction),
                       ("store_true", argparse._StoreTrueAction), ("append", argparse._AppendAction)):
        p.register("action", name, _remembering(base))
    p.set_defaults(**{GIVEN: frozenset()})


def at_least(lo: int, hi: int | None = None, hint: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= lo (and <= hi when given; `hint` explains the range in the error)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if hi is not None and not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}{hint}, got {v}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def number_list(conv: Callable[[str], float], what: str = "numbers", positive: bool = False
                ) -> Callable[[str], tuple]:
    """argparse type: comma- (or space-) separated values, e.g. "1,4,16", as a non-empty tuple."""
    def parse(s: str) -> tuple:
        try:
            values = tuple(conv(v) for v in s.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        if positive and min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive {what}, got {s!r}")
        return values
    parse.__name__ = what
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a float in the interval lo..hi (math.inf for no upper bound)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}"
                                             f"{')' if hi_open else ']'}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


def check_output(path: str | Path, what: str, is_dir: bool | None = False) -> None:
    """Fail now, not after an hour of work, if `path` cannot be written: its nearest existing ancestor must
    be a directory in which a file can really be created (a probe file, because os.access says yes to
    root on a read-only file system), and the path itself must not be a directory where a file is wanted
    (is_dir=False) or a file where a directory is (is_dir=True; None: either). Missing parent directories
    are fine: writers create them."""
    p = Path(path)
    if is_dir is not None and p.exists() and p.is_dir() != is_dir:
        raise ValueError(f"{what} {p} is {'a file' if is_dir else 'a directory'}; expected "
                         f"{'a directory' if is_dir else 'a file path'}")
    parent = p if is_dir or (is_dir is None and p.is_dir()) else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {p} cannot be created: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{what} {p} is not writable ({e.strerror}: {parent})") from None


def add_model_args(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="checkpoint directory (config.json + model.safetensors) or a `foe train` run directory "
                        "(its latest checkpoint)")
    from foe.config import PRESETS
    g.add_argument("--preset", default=default_preset,
                   help=f"size preset when no checkpoint is given: {', '.join(PRESETS)} (default {default_preset})")
    g.add_argument("--arch", choices=("moe", "foe"), default="foe", help="architecture (default foe)")
    g.add_argument("--sync", choices=("attention", "moe", "both"), default="attention",
                   help="FoE: where the cross-group sum sits (default attention)")
    g.add_argument("--seed", type=int, default=0, help="seed for random initialisation (default 0)")


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float64")  # foe.model.precision.DTYPES and "auto"


def add_dtype_arg(p: argparse.ArgumentParser,
                  auto: str = "the checkpoint's stored dtype, float32 for random weights from --preset") -> None:
    """--dtype: the dtype of the weights, activations and KV cache; `auto` says what "auto" means."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help=f"weights, activations and KV cache; norms, rotary and routing run in at least float32. "
                        f"auto (default): {auto}")


def dtype_from_args(args: argparse.Namespace) -> "torch.dtype":
    """The dtype --dtype names, with auto resolved (the checkpoint's stored dtype, else float32); float32
    for a command without the option."""
    import torch

    from foe.model.checkpoint import checkpoint_dtype
    from foe.model.precision import dtype_named
    name = getattr(args, "dtype", "auto")
    if name != "auto":
        return dtype_named(name)
    ckpt = checkpoint_from_args(args)
    return checkpoint_dtype(ckpt) if ckpt is not None else torch.float32


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device: where the model, its KV cache and its compute live."""
    from foe.device import DEVICE_CHOICES
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto (default): cuda when torch sees a GPU, else cpu. Each rank of a multi-rank job on "
                        "cuda takes the GPU of its local rank and talks over NCCL (gloo on cpu)")


def device_name(args: argparse.Namespace) -> str:
    """--device with auto resolved (cuda when torch sees a GPU, else cpu): the name every rank resolves
    again for its own local rank; "cpu" for a command without the option. ValueError for cuda without one."""
    from foe.device import resolve_device
    return resolve_device(getattr(args, "device", "cpu")).type


def random_weights_dtype(args: argparse.Namespace) -> str:
    """--dtype of a command that runs random weights only (the benchmarks), by name: auto is float32."""
    return "float32" if args.dtype == "auto" else args.dtype


def checkpoint_from_args(args: argparse.Namespace) -> Path | None:
    """The checkpoint directory `--checkpoint` names (a run directory resolves to its `latest`), or None.

    The resolved path is written back to `args.checkpoint`, so code that reads it later (the server's
    chat template, the worker processes) sees the checkpoint directory, not the run directory."""
    if not getattr(args, "checkpoint", None):
        return None
    from foe.train.checkpointing import resolve_checkpoint
    path = resolve_checkpoint(args.checkpoint)
    args.checkpoint = str(path)
    return path


def config_from_args(args: argparse.Namespace) -> "ModelConfig":
    from foe.config import ModelConfig
    from foe.model.checkpoint import load_config
    ckpt = checkpoint_from_args(args)
    if ckpt is not None:
        return load_config(ckpt)  # checks the config and that the checkpoint's tokenizer fits it
    return ModelConfig.from_preset(args.preset, arch=args.arch, sync=args.sync)


def model_from_args(args: argparse.Namespace, device: "str | torch.device | None" = None) -> "Transformer":
    """The --checkpoint's model, or random weights for --preset seeded by --seed (drawn on the CPU, so a
    seed is the same model on every device); in --dtype, eval mode, on `device` (None: --device's)."""
    from foe.model.checkpoint import build_model
    ckpt = checkpoint_from_args(args)
    return build_model(ckpt, None if ckpt else config_from_args(args), args.seed, dtype_from_args(args),
                       device=device_name(args) if device is None else device)


def tokenizer_from_args(args: argparse.Namespace) -> "Tokenizer":
    """The checkpoint's tokenizer, or the byte-level fallback for a model built from a preset."""
    from foe.tokenizer import load_tokenizer
    return load_tokenizer(checkpoint_from_args(args))
