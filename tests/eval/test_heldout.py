"""Held-out scoring: the split is by whole documents, the tokenizer never sees them, the loss's standard
error is over windows, and `foe eval` scores a run on its own held-out documents (refusing or warning
when asked to score otherwise)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from foe.eval.harness import heldout_settings
from foe.eval.heldout import mean_stderr, score_windows
from foe.model import Transformer
from foe.tokenizer import load_tokenizer, train_bpe
from foe.train.data import SPLIT_SCHEME, PackedData, split_documents
from foe.train.run import run_training
from tests.conftest import tiny
from tests.train.conftest import small_corpus, tiny_train_config  # noqa: F401  (small_corpus is a fixture)


def test_split_holds_out_whole_documents() -> None:
    docs = [f"doc {i} " + "x" * (10 * i + 5) for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    held = sum(map(len, val))
    assert held >= 0.1 * sum(map(len, docs)) > held - max(map(len, val))  # the fewest whole documents
    assert split_documents(docs, 0.1) == (train, val)  # fixed, whatever the run's seed
    with pytest.raises(ValueError, match="two"):
        split_documents(["only one"], 0.5)


def test_tokenizer_is_trained_on_training_documents_only(tmp_path: Path, small_corpus: Path) -> None:
    from foe.train.data import read_documents
    run_training(tiny_train_config(tmp_path / "run", small_corpus, steps=1, eval_every=1, ckpt_every=1),
                 tiny("foe"))
    train_docs, _ = split_documents(read_documents([str(small_corpus)]), 0.02)
    saved = load_tokenizer(tmp_path / "run" / "step_00000001").to_str()
    assert saved == train_bpe(train_docs, tiny("foe").vocab_size).to_str()
    state = json.loads((tmp_path / "run" / "step_00000001" / "trainer_state.json").read_text())
    assert state["split_scheme"] == SPLIT_SCHEME


def test_window_losses_and_standard_error() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny("moe")).eval()
    stream = torch.randint(0, 320, (16 * 9 + 1,))
    data = PackedData(stream[:0], stream, 16, 0)
    score = score_windows(model, data.val_batches(4, 10_000))
    assert len(score.window_losses) == 9 and score.tokens == 9 * 16
    with torch.no_grad():  # reference: each window on its own
        ref = torch.tensor([float(F.cross_entropy(model(stream[j * 16:(j + 1) * 16][None]).logits[0],
                                                  stream[j * 16 + 1:(j + 1) * 16 + 1])) for j in range(9)],
                           dtype=torch.float64)
    torch.testing.assert_close(score.window_losses, ref, rtol=1e-5, atol=1e-6)
    var = sum((x - ref.mean()) ** 2 for x in ref.tolist()) / 8
    assert score.stderr == pytest.approx(math.sqrt(var / 9), rel=1e-5)
    assert score.expert_counts.sum() == 9 * 16 * tiny("moe").top_k * tiny("moe").n_layers
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0


def _state(**tc) -> dict:
    return {"train_config": {"out_dir": "x", "data": ["corpus.jsonl"], "val_fraction": 0.05, "seq_len": 64, **tc},
            "split_scheme": SPLIT_SCHEME}


def test_eval_uses_the_runs_settings_and_refuses_training_text() -> None:
    s, warns = heldout_settings(_state(), None, None, None)
    assert (s.data, s.val_fraction, s.seq_len, warns) == (("corpus.jsonl",), 0.05, 64, [])
    s, warns = heldout_settings(_state(), None, 0.02, 32)  # a subset of the held-out documents: fine
    assert (s.val_fraction, s.seq_len, warns) == (0.02, 32, [])
    with pytest.raises(ValueError, match="larger than the run's"):
        heldout_settings(_state(), None, 0.1, None)
    _, warns = heldout_settings(_state(), ["builtin"], None, None)
    assert len(warns) == 1 and "trained on ['corpus.jsonl']" in warns[0]
    _, warns = heldout_settings({**_state(), "split_scheme": None}, None, None, None)
    assert len(warns) == 1 and "older foe" in warns[0]
    _, warns = heldout_settings(None, None, None, None)
    assert "no training record" in warns[0]


def test_eval_cli_scores_the_runs_own_held_out_text(tmp_path: Path, small_corpus: Path) -> None:
    run = tmp_path / "run"
    run_training(tiny_train_config(run, small_corpus, steps=1, eval_every=1, ckpt_every=1, val_fraction=0.1),
                 tiny("foe"))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "foe.cli.main", "eval", "--checkpoint", str(run), "--task", "copa",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.read_text())
    ppl = res["perplexity"]
    assert (ppl["data"], ppl["val_fraction"], ppl["seq_len"], ppl["warnings"]) == ([str(small_corpus)], 0.1, 32, [])
    assert ppl["val_loss_stderr"] > 0 and "±" in proc.stdout
    assert {"acc_stderr", "acc_norm_stderr"} <= set(res["tasks"]["copa"])
    bad = subprocess.run(cmd + ["--val-fraction", "0.2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "larger than the run's" in bad.stderr
    other = subprocess.run(cmd + ["--data", "builtin", "--val-tokens", "512"], capture_output=True, text=True)
    assert other.returncode == 0 and "warning: the run trained on" in other.stderr
