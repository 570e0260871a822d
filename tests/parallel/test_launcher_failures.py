"""The launcher's failure paths: a rank raising under torchrun ends the job at once (not after the collective
timeout) with that rank's error, and a `run_ranks` launcher stopped by SIGTERM, or killed, takes its ranks
with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engine.test_distributed_server import children

ROOT = Path(__file__).resolve().parents[2]
RAISING_JOB = """
from foe.parallel import run_ranks
from foe.parallel.rendezvous import Rendezvous
from tests.parallel.workers import raising_worker
run_ranks(raising_worker, Rendezvous.from_env(timeout_s=60))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def test_a_rank_raising_under_torchrun_ends_the_job_at_once() -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--no-python", sys.executable, "-c", RAISING_JOB],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank 1 says no" in r.stderr, r.stderr[-2000:]
    assert took < 30, f"{took:.0f} s: waited for the 60 s collective timeout"


def test_stopping_the_launcher_stops_its_ranks(tmp_path: Path) -> None:
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-m", "foe.cli.main", "bench", "forward", "--preset", "tiny",
                                 "--repeats", "100000", "--batch-sizes", "1", "--strategies", "gp", "--modes",
                                 "prefill", "--seq-len", "8", "--out", str(tmp_path / "bf")], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(ranks := children(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        time.sleep(2.0)  # into the timed repeats
        proc.send_signal(how)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in ranks if Path(f"/proc/{pid}").exists()
                        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]:
            assert time.monotonic() < deadline, f"{signal.Signals(how).name}: ranks {alive} outlived the launcher"
            time.sleep(0.2)
