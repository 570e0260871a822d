"""Killing `foe train` with SIGKILL and resuming gives the losses of an uninterrupted run, and the
checkpoint layout is what other tools read (atomic `latest`, safetensors + json only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foe.train.checkpointing import resolve_checkpoint
from foe.train.run import read_log

STEPS = 40


def _cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "foe.cli.main", "train", "--preset", "tiny", "--arch", "foe", "--data", str(data),
            "--out", str(out), "--steps", str(STEPS), "--seq-len", "32", "--micro-batch", "4", "--warmup", "2",
            "--log-every", "1", "--eval-every", "5", "--ckpt-every", "5", "--val-tokens", "256", "--no-progress",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["ce"]) for r in read_log(run) if r["kind"] == "train"}


def test_kill_and_resume_is_exact(tmp_path: Path, small_corpus: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref, small_corpus), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cmd(run, small_corpus), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert not (run / f"step_{STEPS:08d}").exists()

    with pytest.raises(subprocess.CalledProcessError) as e:  # refuses to overwrite a run silently
        subprocess.run(_cmd(run, small_corpus), check=True, env=_env(), capture_output=True, text=True)
    assert "--resume" in e.value.stderr

    subprocess.run(_cmd(run, small_corpus, "--resume"), check=True, env=_env(), capture_output=True)
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)  # no step lost or repeated
    assert a == b  # bit-identical losses
    vals = [r for r in read_log(run) if r["kind"] == "val"]
    assert vals == [r for r in read_log(ref) if r["kind"] == "val"]

    final = resolve_checkpoint(run)
    assert final.name == f"step_{STEPS:08d}"
    assert (ref / f"step_{STEPS:08d}" / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    names = {p.name for p in final.iterdir()}
    assert names == {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
                     "tokenizer.json", "tokenizer_config.json"}
    assert len(list(run.glob("step_*"))) == 2  # keep_ckpts
    assert not list(run.glob(".*tmp*"))


# Runs `foe train` with the optimizer-state write patched to SIGKILL the process at its Nth call: the
# checkpoint's temporary directory then holds the model and tokenizer but is never renamed into place.
_KILLER = """
import os, signal, sys
import foe.train.checkpointing as ck
calls = [0]
def save_file(*a, **k):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_WRITE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return ck.__dict__["_real_save_file"](*a, **k)
ck._real_save_file, ck.save_file = ck.save_file, save_file
from foe.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_killed_checkpoint_write_is_cleaned_up(tmp_path: Path, small_corpus: Path, kill_at: int) -> None:
    run = tmp_path / "run"
    args = _cmd(run, small_corpus)[3:]  # drop python -m foe.cli.main
    args[args.index("--steps") + 1] = "10"
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args], env={**_env(), "KILL_AT_WRITE": str(kill_at)},
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(run.glob(".step_*.tmp-*"))
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # the killed write's leftovers
    assert (run / "latest").is_file() == (kill_at == 2)
    # Kill at the first write: no checkpoint, so the run starts afresh; at the second: it resumes.
    extra = ("--resume",) if kill_at == 2 else ()
    subprocess.run([sys.executable, "-m", "foe.cli.main", *args, *extra], check=True, env=_env(),
                   capture_output=True)
    assert not list(run.glob(".*tmp*")), list(run.iterdir())
    assert resolve_checkpoint(run).name == "step_00000010"
