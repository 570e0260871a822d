"""measure_routing on tiny checkpoints: text goes through the checkpoint's own tokenizer, the default
text is the held-out split named by the checkpoint's trainer_state.json, and the stored counts are
those of the model on exactly those ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from foe.model.checkpoint import load_checkpoint, save_checkpoint
from foe.sim.imbalance import load_routing_stats, popularity_cv
from foe.sim.measure_routing import main
from foe.tokenizer import save_tokenizer, train_bpe
from foe.train.data import read_documents, split_documents, tokenize_documents
from tests.conftest import build, tiny

SEQ = 32
ROWS = 4


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return read_documents(["builtin"])[:6]


@pytest.fixture(scope="module")
def tok(docs: list[str]) -> Tokenizer:
    return train_bpe(docs[:3], vocab_size=320)  # tiny preset's vocab


def _checkpoints(root: Path, tok: Tokenizer, train_config: dict | None = None) -> dict[str, Path]:
    out = {}
    for i, arch in enumerate(("moe", "foe")):
        d = save_checkpoint(build(tiny(arch), seed=i), root / arch)
        save_tokenizer(tok, d)
        if train_config is not None:
            (d / "trainer_state.json").write_text(json.dumps({"train_config": train_config}))
        out[arch] = d
    return out


def _run(ckpts: dict[str, Path], out: Path, *extra: str) -> dict:
    main(["--checkpoint-moe", str(ckpts["moe"]), "--checkpoint-foe", str(ckpts["foe"]),
          "--tokens", str(ROWS * SEQ), "--out", str(out), *extra])
    return json.loads(out.read_text())


def _counts(ckpt: Path, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_checkpoint(ckpt)(ids).expert_counts.numpy().astype(float)


def test_text_goes_through_the_checkpoints_tokenizer(tmp_path: Path, docs: list[str], tok: Tokenizer) -> None:
    ckpts = _checkpoints(tmp_path, tok)
    text = docs[4]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    stats = _run(ckpts, tmp_path / "stats.json", "--text-file", str(tmp_path / "text.txt"), "--seq-len", str(SEQ))

    bpe = torch.tensor(tok.encode(text, add_special_tokens=False).ids[:ROWS * SEQ]).reshape(ROWS, SEQ)
    raw = torch.tensor(list(text.encode("utf-8"))[:ROWS * SEQ]).reshape(ROWS, SEQ)
    assert not torch.equal(bpe, raw)  # the BPE merges, so byte ids would be a different input
    for arch, ckpt in ckpts.items():
        run = stats["runs"][f"{arch}-trained-text"]
        assert run["tokenizer"] == str(ckpt / "tokenizer.json") and run["tokens"] == ROWS * SEQ
        measured = np.array(run["counts"])
        np.testing.assert_array_equal(measured, _counts(ckpt, bpe))
        assert not np.array_equal(measured, _counts(ckpt, raw))
        cfg = tiny(arch)
        cv = popularity_cv(measured, cfg.num_groups, ROWS * SEQ * cfg.top_k / cfg.num_groups)
        assert stats["recommended"][f"cv_{arch}"] == pytest.approx(cv)
    # The random-init twin of each checkpoint sees the same ids, with other weights.
    assert stats["runs"]["moe-init-text"]["counts"] != stats["runs"]["moe-trained-text"]["counts"]
    rs = load_routing_stats(path=tmp_path / "stats.json")
    assert (rs.cv_moe, rs.cv_foe) == (stats["recommended"]["cv_moe"], stats["recommended"]["cv_foe"])


def test_default_text_is_the_held_out_split_of_the_training_data(tmp_path: Path, docs: list[str],
                                                                  tok: Tokenizer) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tcfg = dict(out_dir="x", data=[str(corpus)], seq_len=SEQ, val_fraction=0.25, seed=0)
    ckpts = _checkpoints(tmp_path, tok, tcfg)
    stats = _run(ckpts, tmp_path / "stats.json")  # seq_len from the training config

    train_docs, val_docs = split_documents(read_documents([str(corpus)]), 0.25)
    held_out = tokenize_documents(val_docs, tok)[:ROWS * SEQ].reshape(ROWS, SEQ)
    assert not torch.equal(held_out, tokenize_documents(train_docs, tok)[:ROWS * SEQ].reshape(ROWS, SEQ))
    for arch, ckpt in ckpts.items():
        run = stats["runs"][f"{arch}-trained-text"]
        assert run["seq_len"] == SEQ and "held-out" in run["text"]
        np.testing.assert_array_equal(np.array(run["counts"]), _counts(ckpt, held_out))
        np.testing.assert_array_equal(np.array(stats["runs"][f"{arch}-trained-random"]["counts"]).sum(1),
                                      ROWS * SEQ * tiny(arch).top_k)


def test_bad_inputs_are_named(tmp_path: Path, tok: Tokenizer) -> None:
    ckpts = _checkpoints(tmp_path, tok)  # no trainer_state.json: the held-out text is unknown
    with pytest.raises(ValueError, match="--text-file"):
        _run(ckpts, tmp_path / "s.json")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than"):
        _run(ckpts, tmp_path / "s.json", "--text-file", str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        _run(ckpts, tmp_path / "s.json", "--text-file", str(tmp_path / "missing.txt"))
