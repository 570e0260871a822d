"""`foe bench vs-vllm`: the ratio table, the settings' checks, the vLLM command and probe, the run's
orchestration with `foe serve` standing in for vLLM (servers stopped also on Ctrl-C), and the real thing
end to end when vLLM is importable in FOE_VLLM_PYTHON (or this interpreter)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from foe.bench import serving_vs_vllm as vs
from foe.bench.serving_server import _LIVE
from foe.bench.serving_vllm import probe_vllm, vllm_server
from foe.bench.vs_vllm_config import VsVllmConfig, run_order
from foe.bench.vs_vllm_report import RATIO_METRICS, format_ratio_table, plot_ratios, ratio_rows
from foe.cli.main import main


def _run(engine: str, repeat: int, scenario: str, tput: float, ttft: float, failed: int = 0) -> dict[str, Any]:
    return {"engine": engine, "repeat": repeat, "scenario": scenario, "num_prompts": 8, "request_rate": 4.0,
            "failed": failed, "output_throughput": tput, "median_ttft_ms": ttft, "median_tpot_ms": 10.0,
            "median_e2el_ms": 100.0, "median_itl_ms": 0.0 if engine == "vllm" and scenario == "single" else 5.0}


def test_ratio_rows_pair_repeats_and_give_median_and_range() -> None:
    runs = [_run("foe", 0, "rate", 400, 30), _run("vllm", 0, "rate", 800, 10),
            _run("vllm", 1, "rate", 1000, 20), _run("foe", 1, "rate", 600, 20, failed=1)]
    rows = ratio_rows(runs, ["rate"])
    assert [r["metric"] for r in rows] == [k for k, _, _ in RATIO_METRICS]
    tput, ttft = rows[0], rows[1]
    assert tput["ratios"] == [0.5, 0.6] and tput["ratio_median"] == pytest.approx(0.55)
    assert (tput["ratio_min"], tput["ratio_max"]) == (0.5, 0.6)
    assert (tput["foe_median"], tput["vllm_median"]) == (500, 900)
    assert ttft["ratios"] == [3.0, 1.0] and ttft["ratio_median"] == 2.0
    assert rows[2]["ratios"] == [1.0, 1.0]
    table = format_ratio_table(rows)
    assert "fixed rate 4/s, 8 req" in table and "0.55" in table and "0.50-0.60" in table
    assert "1 foe / 0 vLLM requests failed" in table and "range (2 repeats)" in table
    assert rows[0]["bursty"] == [] and "bursts" not in table


def test_ratio_rows_need_both_engines_and_survive_a_zero() -> None:
    with pytest.raises(ValueError, match="no repeat was run on both"):
        ratio_rows([_run("foe", 0, "single", 1, 1)], ["single"])
    rows = ratio_rows([_run("foe", 0, "single", 5, 1), _run("vllm", 0, "single", 0, 1)], ["single"])
    assert math.isnan(rows[0]["ratio_median"])
    assert rows[0]["bursty"] == ["vllm"] and "vLLM's tokens arrived in bursts" in format_ratio_table(rows)


def test_plot_ratios_writes_a_png(tmp_path: Path) -> None:
    runs = [_run(e, r, s, 100 + r, 10) for e in ("foe", "vllm") for r in (0, 1) for s in ("saturation", "single")]
    path = plot_ratios(ratio_rows(runs, ["saturation", "single"]), tmp_path / "r.png", title="t")
    assert path.stat().st_size > 1000


def test_run_order_alternates() -> None:
    assert run_order(3) == [(0, "vllm"), (0, "foe"), (1, "foe"), (1, "vllm"), (2, "vllm"), (2, "foe")]


@pytest.mark.parametrize("bad, match", [
    (dict(scenarios=("saturation", "burst")), "scenarios must be among"), (dict(scenarios=()), "scenarios"),
    (dict(repeats=0), "--repeats"), (dict(num_prompts=0), "--num-prompts"), (dict(warmup=-1), "--warmup"),
    (dict(request_rate=math.inf), "--request-rate"), (dict(request_rate=0.0), "--request-rate"),
    (dict(arch="dense"), "--arch"), (dict(dtype="float64"), "--dtype"), (dict(kv_cache_gib=0), "--kv-cache-gib"),
    (dict(foe_threads=0), "--foe-threads")])
def test_config_refuses_bad_settings(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VsVllmConfig(**bad)


def test_scenarios() -> None:
    cfg = VsVllmConfig(num_prompts=10, single_prompts=3, request_rate=2.0)
    assert cfg.scenario("saturation") == dict(request_rate=math.inf, max_concurrency=None, n=10)
    assert cfg.scenario("rate") == dict(request_rate=2.0, max_concurrency=None, n=10)
    assert cfg.scenario("single") == dict(request_rate=math.inf, max_concurrency=1, n=3)


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "vs-vllm", "--scenarios", "saturation,burst", "--out", str(tmp_path)]) == 2
    assert "scenarios must be among" in capsys.readouterr().err
    assert main(["bench", "vs-vllm", "--repeats", "0", "--out", str(tmp_path)]) == 2
    bad_python = str(tmp_path / "no-python")
    assert main(["bench", "vs-vllm", "--vllm-python", bad_python, "--out", str(tmp_path)]) == 2
    assert "cannot run --vllm-python" in capsys.readouterr().err


def test_probe_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot run"):
        probe_vllm(str(tmp_path / "missing"))
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="vLLM is not importable in this interpreter: install vLLM"):
            probe_vllm(None)


def test_vllm_command_binds_localhost_and_sets_its_environment(tmp_path: Path) -> None:
    srv = vllm_server("/venv/bin/python", tmp_path, tmp_path / "log", dtype="bfloat16", max_num_seqs=16,
                      max_num_batched_tokens=256, tensor_parallel_size=2, kv_cache_gib=2, threads_bind="0|1",
                      extra_args=("--no-enable-prefix-caching",))
    cmd = srv.cmd
    assert cmd[:5] == ["env", "-uOMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE=2", "VLLM_CPU_OMP_THREADS_BIND=0|1",
                       "/venv/bin/python"]
    assert cmd[5:7] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in cmd
    for flag, value in (("--dtype", "bfloat16"), ("--max-num-seqs", "16"), ("--max-num-batched-tokens", "256"),
                        ("--tensor-parallel-size", "2"), ("--host", "127.0.0.1"), ("--port", str(srv.port))):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-enable-prefix-caching" in cmd and srv.proc is None  # built, not started
    with pytest.raises(ValueError, match="tensor parallel"):
        vllm_server("python", tmp_path, tmp_path / "log", tensor_parallel_size=0)


def test_foe_command_matches_the_settings(tmp_path: Path) -> None:
    cfg = VsVllmConfig(dtype="bfloat16", max_num_seqs=16, max_num_batched_tokens=256, serve_args=("--block-size=32",))
    cmd = vs.make_server(cfg, "foe", tmp_path, "unused", tmp_path / "log").cmd
    assert cmd[:2] == ["env", "-uOMP_NUM_THREADS"]  # foe's own thread choice, not the caller's shell's
    for flag, value in (("--checkpoint", str(tmp_path)), ("--dtype", "bfloat16"), ("--max-num-seqs", "16"),
                        ("--max-num-batched-tokens", "256"), ("--host", "127.0.0.1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--block-size=32" in cmd
    cmd = vs.make_server(VsVllmConfig(foe_threads=2), "foe", tmp_path, "unused", tmp_path / "log").cmd
    assert cmd[:2] == ["env", "OMP_NUM_THREADS=2"]


TINY = dict(preset="tiny", num_prompts=4, single_prompts=2, input_len=24, output_len=6, warmup=1,
            request_rate=20.0, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture
def foe_as_vllm(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Both 'engines' are `foe serve`; returns the servers made, in order."""
    made: list[Any] = []
    real = vs.make_server

    def make(cfg: VsVllmConfig, engine: str, ckpt: Path, python: str, log: Path) -> Any:
        made.append(real(cfg, "foe", ckpt, python, log))
        return made[-1]

    monkeypatch.setattr(vs, "probe_vllm", lambda python: "stand-in")
    monkeypatch.setattr(vs, "make_server", make)
    return made


def test_run_with_foe_standing_in_for_vllm(foe_as_vllm: list[Any], tmp_path: Path) -> None:
    cfg = VsVllmConfig(out_dir=str(tmp_path), repeats=2, **TINY)  # type: ignore[arg-type]
    res = vs.run_vs_vllm(cfg, progress=False)
    assert len(foe_as_vllm) == 3  # vllm | foe, foe (one start) | vllm
    assert all(s.proc is None for s in foe_as_vllm) and not _LIVE
    assert [(r["repeat"], r["engine"]) for r in res["runs"][::3]] == run_order(2)
    assert all(r["completed"] == r["num_prompts"] and r["failed"] == 0 for r in res["runs"])
    assert len(res["rows"]) == 3 * len(RATIO_METRICS)
    saved = json.loads((tmp_path / "vs_vllm.json").read_text())
    assert saved["rows"][0]["ratios"] == pytest.approx(res["rows"][0]["ratios"])
    assert (tmp_path / "vs_vllm.png").is_file() and (tmp_path / "checkpoint-tiny-moe-seed0" / "tokenizer.json").is_file()


def test_servers_are_stopped_on_ctrl_c(foe_as_vllm: list[Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pids = []

    def interrupted(cfg: Any, *a: Any, **k: Any) -> None:
        pids.append(foe_as_vllm[-1].proc.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(vs, "run_benchmark", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vs.run_vs_vllm(VsVllmConfig(out_dir=str(tmp_path), repeats=1, **TINY), progress=False)  # type: ignore[arg-type]
    assert len(pids) == 1 and foe_as_vllm[0].proc is None and not _LIVE
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def _vllm_python() -> str:
    py = os.environ.get("FOE_VLLM_PYTHON") or sys.executable
    try:
        probe_vllm(py)
    except ValueError as e:
        pytest.skip(f"vLLM with foe's plugin is not importable in {py} (set FOE_VLLM_PYTHON to a venv's python "
                    f"that has it; docs/vllm.md): {e}")
    return py


def test_end_to_end_against_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real thing: vLLM (~35-60 s to start) and foe serve on the tiny preset, one repeat."""
    py = _vllm_python()
    rc = main(["bench", "vs-vllm", "--vllm-python", py, "--preset", "tiny", "--num-prompts", "4",
               "--single-prompts", "2", "--random-input-len", "24", "--random-output-len", "6", "--repeats", "1",
               "--request-rate", "20", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "foe serve / vLLM" in out and "one at a time, 2 req" in out
    res = json.loads((tmp_path / "vs_vllm.json").read_text())
    assert {r["engine"] for r in res["runs"]} == {"vllm", "foe"}
    assert all(r["completed"] == r["num_prompts"] and r["total_output_tokens"] == 6 * r["num_prompts"]
               for r in res["runs"])
    assert "Application startup complete" in (tmp_path / "server-vllm-r1.log").read_text()
    assert not _LIVE
