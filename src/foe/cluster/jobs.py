"""Running commands on an emulated cluster.

`run_job` starts one process per rank, each in its rank's namespace with torchrun's environment (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR = rank 0's address, MASTER_PORT), so any
`foe` command that runs under torchrun runs here unchanged: `foe bench forward`, `foe serve`. Rank 0 is
the rendezvous (it hosts the store, as without torchrun's agent). FOE_HOST_ID names the emulated node,
so byte accounting splits intra/inter at the emulated node boundary, not at each namespace.

`run_driver` runs one command in rank 0's namespace with FOE_CLUSTER set: a command that starts servers
(`foe bench compare`) then starts each one as a job on the cluster, and reaches its API from there.

The cluster's shape is read from the state file `foe cluster up` wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from foe.cluster.netns import bring_up, exec_argv, namespaces, tear_down
from foe.cluster.topology import ClusterSpec

STATE_DIR = Path(os.environ.get("FOE_CLUSTER_STATE", "/run/foe-cluster"))
_FREE_PORT = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); print(s.getsockname()[1])"
EXIT_WAIT_S = 30.0  # for the other ranks once rank 0 has finished


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def save_spec(spec: ClusterSpec) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_path(spec.name).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def load_spec(name: str) -> ClusterSpec:
    """The spec of the running cluster `name`; ValueError when it is not up."""
    path = state_path(name)
    if not path.exists() or not namespaces(ClusterSpec(name=name).prefix):
        raise ValueError(f"no emulated cluster named {name!r} is up: start one with `foe cluster up --name {name}`")
    return ClusterSpec(**json.loads(path.read_text()))


def forget_spec(name: str) -> None:
    state_path(name).unlink(missing_ok=True)


def free_port_on_rank0(spec: ClusterSpec) -> int:
    """A free port in rank 0's namespace, for the job's rendezvous: several jobs (bench compare's two
    servers) can share a cluster."""
    r = subprocess.run(exec_argv(spec.rank_ns(0), [sys.executable, "-c", _FREE_PORT]), capture_output=True,
                       text=True, timeout=60, check=True)
    return int(r.stdout)


@contextmanager
def cluster_up(spec: ClusterSpec) -> Iterator[ClusterSpec]:
    """The cluster up, with its state file, for the `with` block; torn down and forgotten after it, however
    it ends."""
    bring_up(spec)
    try:
        save_spec(spec)
        yield spec
    finally:
        tear_down(spec.name)
        forget_spec(spec.name)


def rank_env(spec: ClusterSpec, rank: int, threads: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(spec.local_rank(rank)),
            "WORLD_SIZE": str(spec.world_size), "LOCAL_WORLD_SIZE": str(spec.ranks_per_node),
            "GROUP_RANK": str(spec.node_of(rank)), "MASTER_ADDR": spec.address(0), "MASTER_PORT": str(port),
            "FOE_HOST_ID": f"{spec.name} node {spec.node_of(rank)}", "OMP_NUM_THREADS": str(threads)}


def _say(msg: str) -> None:
    print(f"foe cluster: {msg}", file=sys.stderr, flush=True)


def run_job(spec: ClusterSpec, argv: list[str], log_dir: Path, timeout_s: float | None = None) -> int:
    """argv on every rank; rank 0's output here, the others' in log_dir/rank<r>.log. Returns rank 0's exit
    code, or 1 when another rank failed first (the others are then stopped)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    from foe.parallel.rendezvous import threads_per_rank  # (torch: only when a job runs)
    threads, port = threads_per_rank(spec.world_size), free_port_on_rank0(spec)
    procs: dict[int, subprocess.Popen] = {}
    try:
        for r in range(spec.world_size):
            out = None if r == 0 else open(log_dir / f"rank{r}.log", "wb")
            procs[r] = subprocess.Popen(exec_argv(spec.rank_ns(r), argv), env=rank_env(spec, r, threads, port),
                                        stdout=out, stderr=subprocess.STDOUT if out else None,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        return _supervise(spec, procs, log_dir, timeout_s)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _supervise(spec: ClusterSpec, procs: dict[int, subprocess.Popen], log_dir: Path,
               timeout_s: float | None) -> int:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for r, p in procs.items():
            code = p.poll()
            if code not in (None, 0):
                where = "above" if r == 0 else f"in {log_dir / f'rank{r}.log'}"
                _say(f"rank {r} ({spec.rank_ns(r)}) exited with code {code} (its output is {where}); "
                     f"stopping the other ranks")
                if r:
                    _tail(log_dir / f"rank{r}.log")
                return code if r == 0 else 1
        if procs[0].poll() == 0:
            end = time.monotonic() + EXIT_WAIT_S
            while any(p.poll() is None for p in procs.values()) and time.monotonic() < end:
                time.sleep(0.1)
            if late := [r for r, p in procs.items() if p.poll() != 0]:
                _say(f"rank 0 finished but rank(s) {late} did not exit cleanly; see {log_dir}")
                return 1
            return 0
        if deadline is not None and time.monotonic() > deadline:
            _say(f"the job ran past {timeout_s:g} s; stopping it")
            return 124
        time.sleep(0.1)


def _tail(path: Path, lines: int = 15) -> None:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join(f"  | {line}" for line in text), file=sys.stderr, flush=True)


def run_driver(spec: ClusterSpec, argv: list[str], timeout_s: float | None = None) -> int:
    """argv once, in rank 0's namespace, with FOE_CLUSTER set (its output here); its exit code."""
    env = {**os.environ, "FOE_CLUSTER": spec.name}
    proc = subprocess.Popen(exec_argv(spec.rank_ns(0), argv), env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _say(f"the command ran past {timeout_s:g} s; stopping it")
        return 124
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
