"""Tokenizers travel with checkpoints as `tokenizer.json` (the HF `tokenizers` format), so a checkpoint
directory is usable from `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer` alike.

A model built from a preset, with no trained tokenizer, gets the byte-level fallback: 256 byte tokens
plus `<|endoftext|>`, which fits any vocab_size >= 257 (ids past the tokenizer's range are never
produced by it; a model may still sample them, and decoding skips them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


def byte_level_tokenizer() -> Tokenizer:
    """Lossless byte-level tokenizer without merges: every UTF-8 byte is one token; id 256 is EOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) with `<|endoftext|>` as id 0.

    All 256 byte tokens are in the vocabulary, so any text round-trips exactly; merges fill the rest
    up to `vocab_size` (fewer if the text has too few distinct pairs).
    """
    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE vocabulary needs at least 257 entries, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode, so that token id == byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write tokenizer.json plus the small tokenizer_config.json that transformers.AutoTokenizer reads."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / TOKENIZER_FILE))
    eos = EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else None
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
         "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def load_tokenizer(directory: str | Path | None) -> Tokenizer:
    """The checkpoint's tokenizer.json if it has one, else the byte-level fallback."""
    if directory is not None and (Path(directory) / TOKENIZER_FILE).is_file():
        return Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))
    return byte_level_tokenizer()


def check_vocab_fits(tok: Tokenizer, vocab_size: int, where: str = "the tokenizer") -> None:
    """A model can only embed ids below its vocab_size; a larger tokenizer would index past the table."""
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"{where} has {tok.get_vocab_size()} tokens but the model's vocab_size is only "
                         f"{vocab_size}: the tokenizer does not belong to this model")


def eos_id(tok: Tokenizer) -> int | None:
    return tok.token_to_id(EOS_TOKEN)
