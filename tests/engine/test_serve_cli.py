"""`foe serve` refuses impossible launches with a clear message before starting anything (no model is
built, no banner printed), prints its banner only once it is serving (with the real port for --port 0),
and stops cleanly (exit code 0) on SIGTERM or SIGINT."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import foe.engine.launch
from foe.cli.main import main


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a launch gets as far as starting the engine core."""
    def refuse(*_a, **_k):
        raise AssertionError("the engine core started before the launch was refused")
    monkeypatch.setattr(foe.engine.launch, "CoreProcess", refuse)


@pytest.mark.parametrize("argv,message", [
    (["--arch", "moe", "--strategy", "gp", "--nproc", "2"], "MOE"),
    (["--arch", "foe", "--strategy", "none", "--nproc", "2"], "one process"),
    (["--arch", "moe", "--strategy", "ep", "--nproc", "3"], "divisible"),
    # several nodes: world = nnodes x nproc, and a node holds --nproc ranks
    (["--arch", "foe", "--strategy", "gp", "--nnodes", "2", "--nproc", "2"], "gp over 4 ranks"),
    (["--arch", "foe", "--strategy", "gp", "--nnodes", "2", "--node-rank", "2"], "node rank must be in 0..1"),
    (["--arch", "foe", "--strategy", "gp", "--nnodes", "2", "--ranks-per-node", "2"], "drop --ranks-per-node"),
])
def test_impossible_launch_is_a_clear_error(argv: list[str], message: str, capsys, no_model) -> None:
    assert main(["serve", "--preset", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--block-size", "0", "must be >= 1, got 0"),
    ("--block-size", "-4", "must be >= 1, got -4"),
    ("--num-blocks", "0", "must be >= 1"),
    ("--max-num-seqs", "0", "must be >= 1"),
    ("--max-num-batched-tokens", "-1", "must be >= 1"),
    ("--nproc", "0", "must be >= 1"),
    ("--port", "99999", "must be in 0..65535"),
    ("--port", "-1", "must be in 0..65535"),
    ("--node-rank", "-1", "must be >= 0"),
    ("--master-port", "70000", "must be in 0..65535"),
])
def test_bad_sizes_are_argparse_errors(flag: str, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--preset", "tiny", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err


def test_bad_chat_template_fails_before_the_model_loads(tmp_path: Path, capsys, no_model) -> None:
    assert main(["serve", "--preset", "tiny", "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    out = capsys.readouterr()
    assert "no such file" in out.err and "missing.jinja" in out.err and len(out.err.splitlines()) == 1
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    assert main(["serve", "--preset", "tiny", "--chat-template", str(bad)]) == 2
    out = capsys.readouterr()
    assert "syntax error on line 1" in out.err and len(out.err.splitlines()) == 1 and not out.out


def test_port_in_use_fails_before_the_model_loads(capsys, no_model) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--preset", "tiny", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in out.err and "http://" not in out.out


@contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`foe serve --preset tiny --port 0 ARGS` in a subprocess: (process, url) once its banner is out."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "foe.cli.main", "serve", "--preset", "tiny", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        line = proc.stdout.readline()  # the banner comes only once uvicorn listens: no retry loop needed
        m = re.search(r"on http://127\.0\.0\.1:(\d+)\s", line)
        assert m and int(m.group(1)) != 0, line
        yield proc, f"http://127.0.0.1:{m.group(1)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_port_0_prints_the_bound_port_once_serving_and_a_signal_stops_it(sig: signal.Signals) -> None:
    with serve("--num-blocks", "16", "--block-size", "4") as (proc, url):
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0  # not -15 or 130: uvicorn would re-raise the signal
        assert "Traceback" not in proc.stdout.read()


def test_after_the_drain_timeout_requests_in_flight_are_aborted_not_cut_off() -> None:
    with serve("--drain-timeout", "0.05") as (proc, url), ThreadPoolExecutor(1) as pool:
        body = {"prompt": "Hi", "max_tokens": 250, "n": 16, "ignore_eos": True}  # 250 steps: well over 0.05 s
        pending = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        deadline = time.monotonic() + 10
        while "foe_num_requests_running 16" not in httpx.get(url + "/metrics", timeout=5).text:
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        r = pending.result()
        assert r.status_code == 200 and {c["finish_reason"] for c in r.json()["choices"]} == {"abort"}
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "aborting 1 request(s) in flight" in out and "Traceback" not in out, out
