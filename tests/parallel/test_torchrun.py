"""The launcher under torchrun: every multi-process command accepts ranks that torchrun started (its RANK,
WORLD_SIZE, MASTER_ADDR... and its agent's store) as well as its own. Real `torchrun --standalone` runs on 2
local CPU ranks: `foe serve` (global rank 0 serves the API; greedy text equals the single-process model;
SIGTERM stops every rank), `foe bench forward` and `foe train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from foe.parallel.launch import free_port
from tests.engine.test_distributed_server import MAX_TOKENS, PROMPTS
from tests.engine.test_multinode import expected

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "foe.cli.main", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def complete(url: str, prompt: str, max_tokens: int) -> str:
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_serve_under_torchrun_answers_with_the_single_process_text(tmp_path: Path) -> None:
    want = expected("foe", tmp_path / "ckpt")
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen(torchrun("serve", "--checkpoint", str(tmp_path / "ckpt"), "--strategy", "gp",
                                     "--port", str(port), "--num-blocks", "64", "--block-size", "4",
                                     "--max-num-batched-tokens", "16"),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert "gp on 2 rank(s)" in log.read_text()
        assert [complete(url, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)] == want
        # As Ctrl-C or systemd: the whole group. torchrun itself then exits 1 by design (SignalException);
        # what is ours: the API drains and every rank exits, none is left behind.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        assert _group_gone(proc.pid), log.read_text()
        assert "finishing 0 request(s) in flight" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _group_gone(pgid: int, wait_s: float = 15.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_bench_forward_and_train_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "bf"
    r = subprocess.run(torchrun("bench", "forward", "--preset", "tiny", "--strategies", "tp,gp", "--batch-sizes",
                                "2", "--repeats", "1", "--warmup", "1", "--seq-len", "4", "--context-len", "4",
                                "--out", str(out)), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["config"]["nproc"] == 2 and len(result["machine"]["hosts"]) == 2
    assert {row["strategy"] for row in result["results"]} == {"tp", "gp"}

    r = subprocess.run(torchrun("train", "--preset", "tiny", "--steps", "2", "--seq-len", "32", "--micro-batch", "2",
                                "--out", str(tmp_path / "dp")), env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "dp" / "log.jsonl").read_text().splitlines()[0])
    assert meta["world"] == 2
