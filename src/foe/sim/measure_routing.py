"""Measure expert routing statistics on our models; writes src/foe/sim/data/routing_stats.json.

Runs MoE and FoE models on random token ids and on text, reads ModelOutput.expert_counts
([layers, E]), and stores per-expert counts, the persistent popularity skew (cv, sampling noise
removed) and the measured max/mean per rank for each placement that fits.

Models: a preset with random weights (`--preset`), or trained checkpoints (`--checkpoint-moe/-foe`).
A checkpoint is measured twice: with its trained weights and with random weights of the same config
(seed `--seed`), on the same ids, so the JSON shows what training did to the skew.

Text goes through the model's own tokenizer: a checkpoint's tokenizer.json, the byte-level one for a
preset (it has no trained tokenizer). Without `--text-file` the text is the validation split of the
checkpoint's training data (its trainer_state.json names the sources, val_fraction and seq_len; the
split is foe.train.data's, so it is the text training did not see); a preset uses the same split of
the built-in corpus under the default TrainConfig. This is the one sim file besides measure_cpu.py
that imports the model (and torch); the cost model only reads the JSON.

    python -m foe.sim.measure_routing --checkpoint-moe runs/cq-default/moe/step_00000600 \
        --checkpoint-foe runs/cq-default/foe/step_00000600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from foe.config import ModelConfig
from foe.model import Transformer
from foe.model.checkpoint import CheckpointError, load_checkpoint, load_config
from foe.sim.imbalance import STATS_FILE, popularity_cv, rank_imbalance
from foe.sim.measurement import write_measurement
from foe.tokenizer import TOKENIZER_FILE, byte_level_tokenizer, check_vocab_fits, load_tokenizer
from foe.train.checkpointing import read_trainer_state
from foe.train.config import TrainConfig
from foe.train.data import held_out_stream


def train_config_of(ckpt: Path | None) -> TrainConfig:
    """The training config whose validation split is the held-out text: the checkpoint's own, or the
    defaults (built-in corpus) for a random-init preset."""
    if ckpt is None:
        return TrainConfig(out_dir="")
    try:
        state = read_trainer_state(ckpt)
    except CheckpointError as e:
        raise ValueError(f"{e}; its held-out text is unknown, so pass --text-file") from None
    return TrainConfig.from_dict(state["train_config"])


def text_stream(tok: Tokenizer, text_file: Path | None, tcfg: TrainConfig) -> tuple[torch.Tensor, str]:
    """Token ids of the text input under `tok`, and a description of where they come from."""
    if text_file is not None:
        if not text_file.is_file():
            raise ValueError(f"--text-file {text_file} does not exist")
        ids = tok.encode(text_file.read_text(encoding="utf-8"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int64), str(text_file)
    val = held_out_stream(tcfg.data, tok, tcfg.val_fraction)
    return val, f"held-out split of {list(tcfg.data)} (held-out documents, {tcfg.val_fraction:g} of the text)"


def input_ids(kind: str, vocab_size: int, stream: torch.Tensor, rows: int, seq_len: int,
              gen: torch.Generator) -> torch.Tensor:
    """[rows, seq_len] ids: uniform random ids, or the first rows*seq_len tokens of the text stream
    (never repeated: repeats would make picks correlated and bias the noise correction of the cv)."""
    if kind == "random":
        return torch.randint(0, vocab_size, (rows, seq_len), generator=gen)
    need = rows * seq_len
    if len(stream) < need:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than the {need} asked for; "
                         f"lower --tokens or give a longer --text-file")
    return stream[:need].reshape(rows, seq_len)


def routing_counts(model: Transformer, ids: torch.Tensor) -> np.ndarray:
    """Per-layer, per-expert routed rows [layers, E] of one forward pass (logits of one row only)."""
    with torch.no_grad():
        out = model(ids, logits_at=torch.zeros(1, dtype=torch.long))
    return out.expert_counts.numpy().astype(float)


def placements(counts: np.ndarray, cfg: ModelConfig) -> dict[str, float]:
    """Measured max/mean per rank, averaged over layers, for each rank count whose placement fits."""
    domains = cfg.num_groups
    out = {}
    for ranks in (2, 4, 8, 16):
        if ranks % domains == 0 or (domains % ranks == 0 and ranks >= domains):
            r = max(ranks // domains, 1)
            if cfg.experts_per_group % r == 0:
                out[str(ranks)] = float(np.mean([rank_imbalance(c, domains, r) for c in counts]))
    return out


def measure_arch(arch: str, args: argparse.Namespace, streams: dict[str, tuple[torch.Tensor, str]]
                 ) -> dict[str, dict[str, Any]]:
    """All runs of one architecture: {weights}-{input} for weights in (trained, init), input in
    (random, text). `streams` caches tokenized text across architectures sharing a tokenizer."""
    ckpt = getattr(args, f"checkpoint_{arch}")
    ckpt = Path(ckpt) if ckpt else None
    cfg = load_config(ckpt) if ckpt else ModelConfig.from_preset(args.preset, arch=arch)
    tok = load_tokenizer(ckpt) if ckpt else byte_level_tokenizer()
    tok_name = str(ckpt / TOKENIZER_FILE) if ckpt and (ckpt / TOKENIZER_FILE).is_file() else "byte-level"
    check_vocab_fits(tok, cfg.vocab_size, f"the {tok_name} tokenizer")
    tcfg = train_config_of(ckpt) if args.text_file is None else TrainConfig(out_dir="")
    key = f"{tok.to_str()}|{tcfg.data}|{tcfg.seq_len}|{tcfg.val_fraction}|{args.text_file}"
    if key not in streams:
        streams[key] = text_stream(tok, args.text_file, tcfg)
    stream, text_source = streams[key]
    seq_len = min(args.seq_len or tcfg.seq_len, cfg.max_seq_len)
    rows = max(args.tokens // seq_len, 1)
    models = {"trained": (str(ckpt), lambda: load_checkpoint(ckpt))} if ckpt else {}
    name = f"{ckpt.parent.name}/{ckpt.name} config" if ckpt else args.preset
    models["init"] = (f"{name} (random init, seed {args.seed})", lambda: _seeded(cfg, args.seed))

    runs = {}
    for weights, (label, build) in models.items():
        model = build()
        for kind in ("random", "text"):
            ids = input_ids(kind, cfg.vocab_size, stream, rows, seq_len, torch.Generator().manual_seed(args.seed))
            t0 = time.perf_counter()
            counts = routing_counts(model, ids)
            picks = ids.numel() * cfg.top_k / cfg.num_groups
            run = dict(arch=arch, weights=weights, input=kind, model=label,
                       text=text_source if kind == "text" else "uniform random ids",
                       tokenizer=tok_name if kind == "text" else None, tokens=ids.numel(), seq_len=seq_len,
                       experts=cfg.n_experts, top_k=cfg.top_k, domains=cfg.num_groups, counts=counts.tolist(),
                       cv=popularity_cv(counts, cfg.num_groups, picks), imbalance_by_ranks=placements(counts, cfg),
                       seconds=round(time.perf_counter() - t0, 2))
            runs[f"{arch}-{weights}-{kind}"] = run
            print(f"{arch:3s} {weights:7s} {kind:6s}: cv {run['cv']:.3f}  max/mean by ranks "
                  + " ".join(f"{r}:{v:.2f}" for r, v in run["imbalance_by_ranks"].items()))
    return runs


def _seeded(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="random-init model for an arch without a checkpoint")
    p.add_argument("--checkpoint-moe", help="trained MoE checkpoint directory (measured trained and at random init)")
    p.add_argument("--checkpoint-foe", help="trained FoE checkpoint directory")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the training seq_len, capped at the model's max_seq_len)")
    p.add_argument("--text-file", type=Path, default=None,
                   help="UTF-8 text instead of the held-out split of the training data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=STATS_FILE)
    args = p.parse_args(argv)
    if args.tokens <= 0 or (args.seq_len is not None and args.seq_len <= 0):
        raise ValueError("--tokens and --seq-len must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine; counts do not depend on speed
    streams: dict[str, tuple[torch.Tensor, str]] = {}
    runs: dict[str, dict[str, Any]] = {}
    try:
        for arch in ("moe", "foe"):
            runs |= measure_arch(arch, args, streams)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting

    # The cost model uses the text-input skew (real prompts are not uniform random ids) of the
    # trained weights where a checkpoint was given: a trained router with a balancing loss is what serves.
    best = {arch: runs.get(f"{arch}-trained-text", runs[f"{arch}-init-text"]) for arch in ("moe", "foe")}
    source = "; ".join(f"{arch}: {r['model']}, {r['text']}, {r['tokens']} tokens" for arch, r in best.items())
    rec = dict(cv_moe=best["moe"]["cv"], cv_foe=best["foe"]["cv"], source=f"measured: {source}")
    write_measurement(args.out, "foe.sim.measure_routing", argv, recommended=rec, runs=runs)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # bad input: a message, not a traceback
        sys.exit(f"error: {e}")
