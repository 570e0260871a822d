"""`foe bench compare --engine vllm`: rank binding, refusals, the collective count read from the log, and
the run end to end when vLLM is importable in FOE_VLLM_PYTHON (or this interpreter)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from foe.bench.serving_compare import CompareConfig
from foe.bench.serving_compare_vllm import logged_collectives, rank_binding, run_compare_vllm
from foe.bench.serving_server import _LIVE
from foe.bench.serving_vllm import probe_vllm
from foe.cli.main import main


def test_rank_binding() -> None:
    assert rank_binding(1, 2) is None  # vLLM's auto: one core computes, one for the API process
    assert rank_binding(2, 2) == "0|1"
    assert rank_binding(2, 8) == "0-3|4-7"
    with pytest.raises(ValueError, match="need at least 4 cores"):
        rank_binding(4, 2)


def test_refusals_come_before_vllm_is_needed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="segmentation fault"):
        run_compare_vllm(CompareConfig(out_dir=str(tmp_path), moe_strategy="ep"))
    with pytest.raises(ValueError, match="--vllm-arg"):
        run_compare_vllm(CompareConfig(out_dir=str(tmp_path), moe_strategy="tp", serve_args=("--block-size=8",)))
    assert main(["bench", "compare", "--engine", "vllm", "--moe-strategy", "ep", "--out", str(tmp_path)]) == 2
    assert "segmentation fault" in capsys.readouterr().err
    assert main(["bench", "compare", "--vllm-arg=--seed=1", "--out", str(tmp_path)]) == 2
    assert "need --engine vllm" in capsys.readouterr().err


def test_logged_collectives(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("\n".join(f"(Worker_TP{r} pid=1) INFO [model.py:104] foe: rank {r}, forward {f}: 5 all-reduces "
                             f"per forward over 4 layers ({{'layer': 4, 'final': 1}}), no all-to-all"
                             for f in (0, 1) for r in (0, 1)) + "\nother line\n")
    assert logged_collectives(log) == [f"rank {r}: 5 all-reduces per forward over 4 layers ({{'layer': 4, 'final': 1}}),"
                                       f" no all-to-all" for r in (0, 1)]
    assert logged_collectives(tmp_path / "missing.log") == []


def test_end_to_end_inside_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tiny MoE and FoE on one vLLM rank each (tiny's head size 16 keeps its MoE off vLLM's Mixtral, which
    tensor parallel would need); two vLLM starts, ~2 min."""
    py = os.environ.get("FOE_VLLM_PYTHON") or sys.executable
    try:
        probe_vllm(py)
    except ValueError as e:
        pytest.skip(f"vLLM with foe's plugin is not importable in {py} (set FOE_VLLM_PYTHON; docs/vllm.md): {e}")
    rc = main(["bench", "compare", "--engine", "vllm", "--vllm-python", py, "--preset", "tiny", "--nproc", "1",
               "--num-prompts", "3", "--scales", "0.5", "--time-scale", "0.1", "--warmup", "1",
               "--longbench-scale", "0.01", "--longbench-output-scale", "0.05", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    assert "MoE time / FoE time" in capsys.readouterr().out
    res = json.loads((tmp_path / "compare.json").read_text())
    row = res["rows"][0]
    assert res["engine"] == "vllm" and row["moe"]["completed"] == row["foe"]["completed"] == 3
    assert set(row["ratios"]) == {"ttft", "itl", "e2el"} and (tmp_path / "latency_cdfs.png").is_file()
    assert res["foe_collectives"] == []  # one rank: no collectives
    assert not _LIVE
