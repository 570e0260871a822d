"""`foe bench step`: the rows it times, its figures and report, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foe.bench.engine_step import StepBenchConfig, run_step_bench, step_rows
from foe.cli.main import main


def test_step_rows_are_decodes_on_scattered_blocks_plus_one_fresh_prompt() -> None:
    cfg = StepBenchConfig(batch=3, context=20, chunk=9, block_size=4)
    decode, mixed, num_blocks = step_rows(cfg, vocab=50)
    assert [len(r.token_ids) for r in decode] == [1, 1, 1] and all(r.start == 20 for r in decode)
    used = sorted(b for r in decode for b in r.block_ids)
    assert used == list(range(18)) and [b for r in decode for b in r.block_ids] != used  # 6 blocks each, shuffled
    chunk = mixed[-1]
    assert mixed[:3] == decode and len(chunk.token_ids) == 9 and chunk.start == 0 and chunk.num_logits == 1
    assert chunk.block_ids == [18, 19, 20] and num_blocks == 21


def test_the_step_bench_times_every_variant_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "step.json"
    rc = main(["bench", "step", "--preset", "tiny", "--batch", "4", "--context", "20", "--chunk", "16",
               "--repeats", "2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["runner_ms"]) == {"decode kernel", "decode torch", "decode dense", "mixed kernel", "mixed torch"}
    assert all(v > 0 for v in res["runner_ms"].values())
    r = res["runner_ms"]
    assert res["paging_overhead"]["torch"] == pytest.approx(r["decode torch"] / r["decode dense"] - 1)
    e = res["engine_step_ms"]
    assert e["step"] == pytest.approx(e["schedule"] + e["model"] + e["sample + outputs"])
    assert "Self CPU" in res["profiles"]["decode"] and "Self CPU" in res["profiles"]["mixed"]
    assert "paging overhead vs the dense cache" in capsys.readouterr().out


def test_impossible_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="needs threads=1"):
        StepBenchConfig(clock="cpu", threads=2)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        StepBenchConfig(batch=0)
    with pytest.raises(ValueError, match="exceeds the tiny preset's 256 positions"):
        run_step_bench(StepBenchConfig(preset="tiny", context=250, repeats=5), log=lambda _: None)
