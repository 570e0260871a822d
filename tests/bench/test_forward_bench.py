"""`foe bench forward` end to end on the tiny preset: runs, reports what each strategy really does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foe.bench.forward import ForwardBenchConfig
from foe.cli.main import main


def test_cli_runs_and_reports_collectives(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bf"
    rc = main(["bench", "forward", "--preset", "tiny", "--batch-sizes", "2,5", "--repeats", "2", "--warmup", "1",
               "--seq-len", "8", "--context-len", "16", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    rows = {(r["strategy"], r["mode"], r["batch"]): r for r in result["results"]}
    assert len(rows) == 3 * 2 * 2
    nl = result["config"]["model"]["n_layers"]
    for (s, mode, B), r in rows.items():
        calls = r["collective_calls_per_layer"]
        if s == "gp":  # one all-reduce per layer, plus the final sum spread over the layers
            assert calls == {"all_reduce": pytest.approx(1 + 1 / nl)}
        elif s == "tp":
            assert calls == {"all_reduce": 2}
        else:
            assert calls == {"all_to_all": 2, "all_to_all_counts": 1}
        assert r["bytes_per_token_per_layer_inter"] == 0  # one node
        assert r["latency_ms_p10"] <= r["latency_ms_median"] <= r["latency_ms_p90"]
    # All-reduce bytes per token per layer are fixed by the shapes: ring over 2 ranks moves D fp32 per rank.
    D = result["config"]["model"]["d_model"]
    assert rows[("tp", "prefill", 2)]["bytes_per_token_per_layer_intra"] == pytest.approx(2 * 2 * D * 4)
    assert rows[("gp", "decode", 5)]["bytes_per_token_per_layer_intra"] == pytest.approx((1 + 1 / nl) * 2 * D * 4)
    assert {r["moe_strategy"] for r in result["ratios"]} == {"ep", "tp"}
    assert "MoE time / FoE (gp) time" in capsys.readouterr().out


def test_float64_run_moves_float64_bytes(tmp_path: Path) -> None:
    out = tmp_path / "bf64"
    assert main(["bench", "forward", "--preset", "tiny", "--strategies", "tp,gp", "--batch-sizes", "2", "--repeats",
                 "1", "--warmup", "1", "--seq-len", "4", "--context-len", "4", "--dtype", "float64",
                 "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["config"]["dtype"] == "float64"
    rows = {(r["strategy"], r["mode"]): r for r in result["results"]}
    D = result["config"]["model"]["d_model"]
    assert rows[("tp", "prefill")]["bytes_per_token_per_layer_intra"] == pytest.approx(2 * 2 * D * 8)


@pytest.mark.parametrize("kw,msg", [
    (dict(nproc=3), "divisible"),
    (dict(strategies=("xp",)), "unknown strategy"),
    (dict(strategies=("gp",), nproc=4, ranks_per_group=2, ranks_per_node=1), "ranks_per_node 1 must be a multiple of ranks_per_group"),
    (dict(strategies=("gp",), nproc=2, ranks_per_group=2), "world_size = groups x R"),
])
def test_wrong_launch_fails_before_starting(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ForwardBenchConfig(preset="tiny", **kw).validate()


def test_cli_reports_bad_launch_cleanly(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "forward", "--preset", "tiny", "--nproc", "3"]) == 2
    assert "divisible" in capsys.readouterr().err
