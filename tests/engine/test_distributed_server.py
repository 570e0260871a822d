"""`foe serve --nproc 2` (2 gloo ranks: gp for FoE, ep and tp for MoE) over HTTP gives the same greedy text as
the single-process model; a worker rank or the engine core process that dies makes the server answer 503 and
exit, and no process outlives the server; SIGTERM drains the requests in flight, then stops every rank
cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from foe.generate import generate
from foe.model.checkpoint import save_checkpoint
from foe.tokenizer import byte_level_tokenizer
from foe.parallel.launch import free_port
from tests.conftest import build, tiny

PROMPTS = ["Hello", "The federation of experts", "a", "Once upon a time there was", "xyz 123"]
MAX_TOKENS = [8, 5, 12, 3, 7]


def start_server(log: Path, *model: str, strategy: str = "gp") -> tuple[subprocess.Popen, str]:
    """`foe serve` on 2 ranks; model: the model arguments (--checkpoint DIR, or --preset and --arch)."""
    port = free_port()
    cmd = [sys.executable, "-m", "foe.cli.main", "serve", *model, "--strategy", strategy,
           "--nproc", "2", "--port", str(port), "--num-blocks", "64", "--block-size", "4",
           "--max-num-batched-tokens", "16"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"server did not start: {log.read_text()}")


def children(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """The child processes of pid whose command line holds marker (default: worker ranks)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid")))
            if ppid == pid and marker in cmd:
                out.append(int(d.name))
    return out


def engine_core(server: int) -> int:
    """The engine core process of a `foe serve`."""
    (core,) = children(server, b"foe.engine.core_process")
    return core


def worker_ranks(server: int) -> list[int]:
    """The worker ranks of a `foe serve` on this node: children of its engine core, which is rank 0."""
    return children(engine_core(server))


@pytest.mark.parametrize("arch,strategy", [("foe", "gp"), ("moe", "ep"), ("moe", "tp")])
def test_two_rank_server_matches_single_process_and_dies_cleanly(tmp_path: Path, arch: str, strategy: str) -> None:
    model = build(tiny(arch))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt)
    tok = byte_level_tokenizer()
    want = [tok.decode(generate(model, [list(p.encode())], n, stop_token_ids=(256,))[0])
            for p, n in zip(PROMPTS, MAX_TOKENS)]
    proc, url = start_server(tmp_path / "server.log", "--checkpoint", str(ckpt), strategy=strategy)
    try:
        def complete(i: int) -> str:
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: ep spreads them over both ranks
            got = list(pool.map(complete, range(len(PROMPTS))))
        assert got == want

        # Kill the worker rank mid-stream: the stream ends, /health says 503, the server exits.
        (worker,) = worker_ranks(proc.pid)
        rest = kill_mid_stream(url, worker)
        assert not any("[DONE]" in line for line in rest) or any('"error"' in line for line in rest)
        statuses = health_until_exit(proc, url)
        assert proc.poll() is not None and proc.returncode != 0, "server did not exit"
        assert 200 not in statuses or 503 in statuses
        assert "worker rank 1" in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_mid_stream(url: str, pid: int) -> list[str]:
    """SIGKILL `pid` once a streamed completion has sent its first event; the stream's remaining lines
    (the stream must end, not hang)."""
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        os.kill(pid, signal.SIGKILL)
        return list(lines)


def health_until_exit(proc: subprocess.Popen, url: str, timeout: float = 20) -> set[int]:
    """/health's status codes, polled until the server exits (or `timeout`)."""
    statuses = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            statuses.add(httpx.get(url + "/health", timeout=1).status_code)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return statuses


def _alive(pid: int) -> bool:
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # an exited, unreaped process is not running


def test_workers_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(build(tiny("foe")), ckpt)
    proc, _ = start_server(tmp_path / "server.log", "--checkpoint", str(ckpt))
    core = engine_core(proc.pid)
    (worker,) = children(core)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up code runs in the API process
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (_alive(core) or _alive(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(core) and not _alive(worker), "the engine core or a worker outlived its server"
    finally:
        for pid in (core, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def tiny_two_rank_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, int, int, Path]]:
    """A 2-rank tiny FoE server: (process, url, engine core pid, worker rank pid, log); all killed after."""
    log = tmp_path / "server.log"
    proc, url = start_server(log, "--preset", "tiny", "--arch", "foe")
    core = engine_core(proc.pid)
    (worker,) = children(core)
    try:
        yield proc, url, core, worker, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in (core, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_dead_engine_core_gives_503_and_every_process_exits(tmp_path: Path) -> None:
    with tiny_two_rank_server(tmp_path) as (proc, url, core, worker, log):
        rest = kill_mid_stream(url, core)
        assert any('"error"' in line for line in rest) and not any("[DONE]" in line for line in rest), rest
        statuses = health_until_exit(proc, url)
        assert proc.poll() is not None and proc.returncode != 0, "server did not exit"
        assert 200 not in statuses
        assert f"the engine core (pid {core}) exited with code -9" in log.read_text()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "a worker rank outlived its engine core"


def test_sigterm_drains_then_stops_every_rank_cleanly(tmp_path: Path) -> None:
    with tiny_two_rank_server(tmp_path) as (proc, url, core, worker, log):
        body = {"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            os.killpg(proc.pid, signal.SIGTERM)  # every rank, as systemd or Ctrl-C (SIGINT) signal them
            deadline = time.monotonic() + 10
            while httpx.get(url + "/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "no 503 after SIGTERM"
                time.sleep(0.05)
            refused = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=5)
            assert proc.poll() is None  # still serving the request in flight
            rest = list(lines)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
        events = [json.loads(line[5:]) for line in rest if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and "data: [DONE]" in rest
        assert proc.wait(timeout=30) == 0
        text = log.read_text()
        assert "Traceback" not in text and "Connection closed" not in text, text
        deadline = time.monotonic() + 5
        while (_alive(worker) or _alive(core)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker) and not _alive(core)
