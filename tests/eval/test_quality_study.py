"""`foe compare-quality`: the statistics against hand computation, the verdict rule, and a whole --quick study
run end to end from the command line (then continued with --resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from foe.eval.quality_study import verdict
from foe.eval.stats import t975, t_interval
from tests.train.conftest import small_corpus  # noqa: F401  (a fixture)


def test_t_interval_by_hand() -> None:
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1
    assert iv.mean == 2.0 and iv.stderr == pytest.approx(1 / math.sqrt(3))
    assert (iv.lo, iv.hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000, abs=2e-3) and t975(120) == pytest.approx(1.980, abs=2e-3)
    assert math.isnan(t_interval([1.0]).lo)


def test_verdict_against_the_margin() -> None:
    assert verdict({"lo": -0.01, "hi": 0.02}, 0.03)["comparable"]
    worse = verdict({"lo": 0.04, "hi": 0.06}, 0.03)
    assert not worse["comparable"] and "worse than MoE by more than 3%" in worse["why"]
    wide = verdict({"lo": -0.05, "hi": 0.05}, 0.03)
    assert not wide["comparable"] and "more seeds" in wide["why"]
    assert not verdict({"lo": float("nan"), "hi": float("nan")}, 0.03)["comparable"]


def test_quick_study_end_to_end(tmp_path: Path, small_corpus: Path) -> None:  # noqa: F811
    out = tmp_path / "cq"
    cmd = [sys.executable, "-m", "foe.cli.main", "compare-quality", "--quick", "--data", str(small_corpus),
           "--steps", "12", "--eval-every", "4", "--val-tokens", "256", "--seq-len", "32", "--val-fraction", "0.2",
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "compare_quality.json").read_text())
    assert r["seeds"] == [0, 1] and r["aux_coefs"] == [0.01, 0.1]
    assert len(r["sweep"]) == 4
    for arch in ("moe", "foe"):
        dev = {s["aux_coef"]: s["dev_loss"] for s in r["sweep"] if s["arch"] == arch}
        assert r["best_aux_coef"][arch] == min(dev, key=dev.get)  # each at its own best
        m = r["models"][arch]
        assert [t["seed"] for t in m["test"]] == [0, 1]
        assert all(t["aux_coef"] == m["aux_coef"] and f"aux{m['aux_coef']:g}" in t["checkpoint"] for t in m["test"])
        for t in m["test"]:  # each run trained with its own seed and the chosen coefficient
            state = json.loads((Path(t["checkpoint"]) / "trainer_state.json").read_text())["train_config"]
            assert (state["seed"], state["aux_coef"]) == (t["seed"], m["aux_coef"])
            assert t["val_loss_stderr"] > 0 and t["val_tokens"] == r["test_tokens"]
            assert set(t["load_own"]) == {"load_cv", "load_max_over_mean"} and "acc_stderr" in t["mc"]["copa"]
    from foe.train.checkpointing import resolve_checkpoint
    for arch in ("moe", "foe"):  # OUT/<arch> resolves to the chosen coefficient's first-seed checkpoint
        assert str(resolve_checkpoint(out / arch)) == r["models"][arch]["test"][0]["checkpoint"]
    assert r["models"]["foe"]["test"][0]["load_own"] == r["models"]["foe"]["test"][0]["load_in_foe_groups"]
    moe = [t["val_loss"] for t in r["models"]["moe"]["test"]]
    foe = [t["val_loss"] for t in r["models"]["foe"]["test"]]
    diffs = [f - m for m, f in zip(moe, foe)]
    assert r["paired"]["diff"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert r["paired"]["diff"]["hi"] - r["paired"]["diff"]["mean"] == pytest.approx(12.706 * abs(diffs[0] - diffs[1]) / 2)
    assert r["dev_tokens"] == 256 and r["test_tokens"] > 0
    assert (out / "compare_quality.png").stat().st_size > 10_000
    assert "Verdict" in proc.stdout and ("NOT COMPARABLE" in proc.stdout or "COMPARABLE" in proc.stdout)

    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)  # finished runs are reused
    assert again.returncode == 0, again.stderr
    r2 = json.loads((out / "compare_quality.json").read_text())
    assert r2["paired"] == r["paired"] and r2["best_aux_coef"] == r["best_aux_coef"]
    refused = subprocess.run(cmd, capture_output=True, text=True)  # without --resume: never overwritten
    assert refused.returncode != 0 and "--resume" in refused.stderr
