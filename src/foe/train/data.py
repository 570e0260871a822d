"""Training data: read documents, tokenize them into one stream, split off validation, pack windows.

Documents come from the built-in corpus (`builtin`: public-domain English shipped in the package,
see scripts/build_corpus.py) or from a user's .txt (one document per file) and .jsonl files (one
{"text": ...} object per line; .xz/.gz compressed variants too). They are shuffled with a fixed seed,
and the last documents, at least `val_fraction` of the characters, are held out for validation: whole
documents, so the tokenizer can be trained on the training documents alone (it never sees held-out text)
and no document straddles the split. Each side is joined into one stream with EOS after each document.

Packing: the training stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and
shifted targets). Sample i of the run is window perm_e[i mod n] of epoch e = i // n, where perm_e is a
permutation seeded by (seed, e). The data position is therefore one integer (samples consumed), which
makes resuming exact and data-parallel sharding a matter of index arithmetic. This module does no
tokenizer training and knows nothing about models or processes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import torch
from tokenizers import Tokenizer

from foe.tokenizer import eos_id

BUILTIN = "builtin"
BUILTIN_FILE = "english.jsonl.xz"
SPLIT_SEED = 0  # document order for the train/val split: fixed, so every run sees the same split
# How the held-out set is chosen; saved with training runs, so that a run made under another rule (the
# token-level split before it, whose tokenizer saw the held-out text) is recognised, not mis-scored.
SPLIT_SCHEME = "documents-v1"


def _open_text(path: Path) -> IO[str]:
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_jsonl(path: Path, where: str) -> list[str]:
    docs = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{where}:{n}: each line must be a JSON object with a string field 'text'")
            docs.append(obj["text"])
    return docs


def read_documents(sources: list[str] | tuple[str, ...]) -> list[str]:
    """The documents of every source, in order. A source is `builtin` or a path to a .txt/.jsonl file."""
    if not sources:
        raise ValueError("no data sources given")
    docs: list[str] = []
    for src in sources:
        if src == BUILTIN:
            ref = resources.files("foe.data") / BUILTIN_FILE
            with resources.as_file(ref) as path:
                if not path.is_file():
                    raise ValueError(f"the built-in corpus {path} is missing; rebuild it with scripts/build_corpus.py")
                docs += _read_jsonl(path, f"built-in corpus {path}")
            continue
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"data file {src} does not exist (expected 'builtin', a .txt or a .jsonl file)")
        stem = path.name.removesuffix(".xz").removesuffix(".gz")
        try:
            if stem.endswith(".jsonl"):
                docs += _read_jsonl(path, src)
            elif stem.endswith(".txt"):
                with _open_text(path) as f:
                    docs.append(f.read())
            else:
                raise ValueError(f"data file {src}: unsupported type; use .txt or .jsonl (optionally .gz/.xz)")
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {src} is not UTF-8 text ({e.reason})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"the corpus is empty: no non-blank text in {list(sources)}")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the documents shuffled with the fixed split seed, the last
    ones, covering at least `val_fraction` of all characters, held out. Both sides get at least one."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError("the corpus has one document: a held-out split needs at least two (one per side); "
                         "split the text into several documents (jsonl lines or files)")
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    want, held, cut = val_fraction * sum(len(d) for d in docs), 0, len(order)
    while cut > 1 and held < want:
        cut -= 1
        held += len(docs[order[cut]])
    return [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]


def tokenize_documents(docs: list[str], tok: Tokenizer) -> torch.Tensor:
    """Encode documents, in the order given, into one int64 stream with EOS after each."""
    eos = eos_id(tok)
    if eos is None:
        raise ValueError("the tokenizer has no <|endoftext|> token")
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def held_out_stream(sources: list[str] | tuple[str, ...], tok: Tokenizer, val_fraction: float) -> torch.Tensor:
    """The token stream of the held-out documents of `sources` under `val_fraction`, as training splits it."""
    return tokenize_documents(split_documents(read_documents(sources), val_fraction)[1], tok)


def fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of a token stream: resuming checks that the data did not change underneath."""
    return hashlib.sha256(tokens.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


@dataclass
class PackedData:
    """Train/val token streams cut into windows of `seq_len + 1` tokens."""

    train: torch.Tensor  # [N_train] int64
    val: torch.Tensor  # [N_val] int64
    seq_len: int
    seed: int

    @classmethod
    def from_streams(cls, train: torch.Tensor, val: torch.Tensor, seq_len: int, seed: int) -> "PackedData":
        """Training and held-out streams (see split_documents), checked to hold at least the windows needed."""
        if len(val) < seq_len + 1:
            raise ValueError(f"the held-out documents have {len(val)} tokens, fewer than one window of "
                             f"seq_len {seq_len} + 1; raise --val-fraction or lower --seq-len")
        if len(train) < 2 * (seq_len + 1):
            raise ValueError(f"the training documents have {len(train)} tokens: too few for seq_len {seq_len}; "
                             f"add text or lower --seq-len")
        return cls(train, val, seq_len, seed)

    @classmethod
    def split(cls, tokens: torch.Tensor, seq_len: int, val_fraction: float, seed: int) -> "PackedData":
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
        if len(tokens) - n_val < 2 * (seq_len + 1):
            raise ValueError(f"the corpus has {len(tokens)} tokens: too few for seq_len {seq_len} with a "
                             f"validation split of {n_val} tokens; add text or lower --seq-len")
        return cls(tokens[:-n_val], tokens[-n_val:], seq_len, seed)

    @property
    def num_windows(self) -> int:
        return (len(self.train) - 1) // self.seq_len

    def _window(self, stream: torch.Tensor, j: int) -> torch.Tensor:
        return stream[j * self.seq_len: (j + 1) * self.seq_len + 1]

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=g)

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples start .. start+size-1 of the run as (inputs_BL, targets_BL)."""
        n = self.num_windows
        perms: dict[int, torch.Tensor] = {}
        rows = []
        for i in range(start, start + size):
            e = i // n
            if e not in perms:
                perms[e] = self._perm(e)
            rows.append(self._window(self.train, int(perms[e][i % n])))
        w = torch.stack(rows)
        return w[:, :-1], w[:, 1:]

    @property
    def num_val_windows(self) -> int:
        return (len(self.val) - 1) // self.seq_len

    def val_batches(self, batch_size: int, max_tokens: int, first_window: int = 0
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Windows of the validation stream from `first_window` on (the same ones every time), up to
        `max_tokens` tokens; empty when the stream has no window past `first_window`."""
        n = max(0, min(self.num_val_windows - first_window, max(1, max_tokens // self.seq_len)))
        rows = [self._window(self.val, first_window + j) for j in range(n)]
        out = []
        for i in range(0, n, batch_size):
            w = torch.stack(rows[i:i + batch_size])
            out.append((w[:, :-1], w[:, 1:]))
        return out


def unigram_loss(data: PackedData, vocab_size: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Cross-entropy (nats/token) of the targets of `batches` (the very tokens a model's loss is measured
    on) under the training unigram distribution, add-one smoothed: the loss of a model that learned token
    frequencies and nothing else."""
    counts = torch.bincount(data.train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([y.flatten() for _, y in batches])
    return float(-logp[targets].mean())
