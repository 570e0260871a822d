"""Resuming with changed settings: --steps extends the run (and says so), anything that changes what is
learned is refused with a list, and a finished run says there is nothing to train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from foe.cli.main import main
from foe.config import ModelConfig
from foe.train.run import read_log, run_training
from tests.train.conftest import tiny_train_config


def _cli(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--micro-batch", "4", "--warmup", "2", "--val-tokens", "256", "--eval-every", "2", "--ckpt-every", "2",
            "--no-progress", *extra]


def test_resume_extends_steps_refuses_other_changes(tmp_path: Path, small_corpus: Path) -> None:
    mcfg = ModelConfig.from_preset("tiny", arch="foe")
    tcfg = tiny_train_config(tmp_path / "r", small_corpus, steps=4)
    run_training(tcfg, mcfg)
    with pytest.raises(ValueError, match=r"micro_batch: saved 4, given 2; lr: saved 0.003, given 0.01"):
        run_training(tcfg.replace(lr=0.01, micro_batch=2), mcfg, resume=True)
    with pytest.raises(ValueError, match="model arch: saved 'foe', given 'moe'"):
        run_training(tcfg, mcfg.replace(arch="moe"), resume=True)
    with pytest.raises(ValueError, match="--steps 3, but the saved run is already at step 4"):
        run_training(tcfg.replace(steps=3), mcfg, resume=True)
    summary = run_training(tcfg.replace(steps=6, log_every=2), mcfg, resume=True)
    assert summary["resumed_from"] == 4 and summary["checkpoint"].endswith("step_00000006")
    log = read_log(tmp_path / "r")
    resume = [r for r in log if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "step": 4, "changes": {"steps": [4, 6], "log_every": [1, 2]},
                       "note": resume[0]["note"]}]
    assert "decays over 6 steps instead of 4" in resume[0]["note"]
    assert max(r["step"] for r in log if r["kind"] == "train") == 6


def test_cli_resume_uses_saved_settings_and_typed_steps(tmp_path: Path, small_corpus: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(_cli(out, small_corpus, "--steps", "2")) == 0
    capsys.readouterr()
    # Only what is typed counts: the defaults of --steps (1000) and --lr are not "changes".
    assert main(["train", "--out", str(out), "--resume", "--data", str(small_corpus), "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--data", str(small_corpus), "--no-progress",
                 "--lr", "0.1"]) == 2
    assert "lr: saved 0.003, given 0.1" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--data", str(small_corpus), "--no-progress",
                 "--steps", "4"]) == 0
    assert "steps 2 -> 4" in capsys.readouterr().err
    vals = [r for r in read_log(out) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 2, 4] and all(math.isfinite(r["val_loss"]) for r in vals)
