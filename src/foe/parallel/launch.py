"""The one launcher: how every multi-process command of foe starts, joins and supervises its ranks.

- `join_group` is the only `init_process_group` in foe. The backend follows the device: NCCL on CUDA (each
  rank on the GPU of its local rank), gloo on the CPU. A rank that cannot reach the others within the
  rendezvous timeout gets a ConnectionError saying what to check.
- `LocalRanks` starts this node's ranks as child processes and tells which have died, naming the host.
- `supervise_node` is node k > 0's side of a multi-node job: watch the local ranks, report a death to rank 0
  through the rendezvous store (so rank 0's error names rank and host), and stop when the job ends.
- `run_ranks` runs a function on every rank of a job (local, several nodes, or under torchrun) and returns
  the results of all ranks on node 0: the benchmarks, the sim's measurements and the tests use it;
  `foe serve` builds its long-running ranks from the same parts (`foe.engine.worker`).

Any rank that dies or raises stops the job with that rank's error instead of leaving the others hanging
in a collective.
"""

from __future__ import annotations

import datetime
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foe.device import backend_for, resolve_device
from foe.parallel.rendezvous import (Rendezvous, connect_store, free_port, host_store, local_address, one_line,
                                     pick_gloo_interface, threads_per_rank)

default_threads = threads_per_rank  # run_ranks has a parameter of that name

DEAD_KEY = "foe/dead"  # in the rendezvous store: the first death of the job, as "<what> on <host>"
EXIT_WAIT_S = 5.0  # a node's ranks, after rank 0 has gone, to exit on their own before being killed
_device: torch.device | None = None  # this rank's device, once it has joined
_joined: Rendezvous | None = None  # the job this rank joined

__all__ = ["DEAD_KEY", "LocalRanks", "Rendezvous", "connect_store", "free_port", "init_distributed",
           "job_hosts", "join_group", "local_address", "ranks_per_host", "rank_device", "report_death", "reported_death", "run_ranks",
           "store_alive", "supervise_node", "threads_per_rank"]


def join_group(rdzv: Rendezvous, rank: int) -> torch.device:
    """Join the job as global `rank`; returns this rank's device (the GPU of its local rank on CUDA).
    ConnectionError saying what to check when the other ranks are not all there within the timeout."""
    global _device, _joined
    device = resolve_device(rdzv.device, rdzv.local_rank(rank))
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        pick_gloo_interface(rdzv)
    # torchrun's agent, or foe's launcher, may host the store; else rank 0 does (tcp://)
    store = connect_store(rdzv) if rdzv.launcher_store else None
    init = None if store else "env://" if rdzv.torchrun else f"tcp://{rdzv.endpoint}"
    try:
        dist.init_process_group(backend, init_method=init, store=store, rank=rank, world_size=rdzv.world_size,
                                timeout=datetime.timedelta(seconds=rdzv.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, TimeoutError) as e:  # DistStoreError, DistNetworkError, gloo's connect timeout
        raise ConnectionError(f"rank {rank} could not join the {rdzv.world_size} ranks at {rdzv.endpoint} within "
                              f"{rdzv.timeout_s:g} s ({one_line(e)}); {rdzv.check_hint()}") from e
    _device, _joined = device, rdzv
    return device


def rank_device() -> torch.device:
    """The device this rank joined with (the CPU before `join_group`)."""
    return _device or torch.device("cpu")


def job_hosts() -> list[str]:
    """Every rank's host, by rank (a collective): its name and its address on the route to the master, which
    tells apart network namespaces sharing one hostname. On one machine over loopback all are equal.
    FOE_HOST_ID, when set, names the host instead: `foe cluster` sets it to the emulated node, whose ranks
    each have a namespace (and so an address) of their own."""
    master = _joined.master_addr if _joined else "127.0.0.1"
    mine = os.environ.get("FOE_HOST_ID") or f"{socket.gethostname()} ({local_address(master) or '?'})"
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, mine)
    return hosts


def ranks_per_host(hosts: list[str]) -> int | None:
    """The ranks per host when `hosts` (by rank) is contiguous equal blocks, as torchrun and foe place
    ranks; None when all ranks share one host. ValueError for another placement."""
    n_hosts = len(set(hosts))
    if n_hosts == 1:
        return None
    n = len(hosts) // n_hosts
    if n * n_hosts != len(hosts) or any(hosts[i] != hosts[i - i % n] for i in range(len(hosts))):
        raise ValueError(f"ranks are not placed in equal contiguous blocks per host: {hosts}")
    return n


def init_distributed(device: str = "cpu", timeout_s: float = 120.0) -> tuple[int, int]:
    """Join the job torchrun started this process in; (rank, world_size). Already joined: as it is."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rdzv = Rendezvous.from_env(timeout_s, device)
    if rdzv is None:
        raise RuntimeError("no RANK in the environment: launch with torchrun, or use foe.parallel.run_ranks")
    rank = Rendezvous.env_rank()
    join_group(rdzv, rank)
    return rank, rdzv.world_size


def exit_with_parent() -> None:
    """A rank (or the engine core) whose parent died, even by SIGKILL, which runs no clean-up, exits at once
    instead of computing on, or waiting for the collective timeout."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="foe-parent-watch", daemon=True).start()


def leave_group() -> None:
    """Leave after a barrier: a rank that tears its group down while a peer is still in a collective
    makes gloo abort that peer."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class LocalRanks:
    """This node's ranks: `target(rank, *args)` in spawned child processes named foe-rank<r>. They are
    daemons, so they end with the process that started them (and `exit_with_parent` covers SIGKILL)."""

    def __init__(self, target: Callable[..., None], ranks: range, args: tuple, rdzv: Rendezvous,
                 label: str = "rank") -> None:
        self.host = rdzv.host() if rdzv.nnodes > 1 else "this host"
        self.label = label
        ctx = mp.get_context("spawn")
        self.procs = {r: ctx.Process(target=target, args=(r, *args), daemon=True, name=f"foe-rank{r}")
                      for r in ranks}
        for proc in self.procs.values():
            proc.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.pid is not None]

    def dead(self, clean_too: bool = False) -> str | None:
        """Which ranks have exited (with an error code, unless clean_too), e.g. "rank 1 (pid 42) on
        h (10.0.0.2) exited with code -9"."""
        return ", ".join(f"{self.label} {r} (pid {p.pid}) on {self.host} exited with code {p.exitcode}"
                         for r, p in self.procs.items()
                         if p.exitcode is not None and (clean_too or p.exitcode != 0)) or None

    def killed(self) -> bool:
        """Whether a rank here was ended by a signal (negative exit code)."""
        return any(p.exitcode is not None and p.exitcode < 0 for p in self.procs.values())

    def all_exited_cleanly(self) -> bool:
        return all(p.exitcode == 0 for p in self.procs.values())

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()  # serving ranks ignore SIGTERM
            proc.join(timeout=5)  # reap, so no zombie outlives us


# --- the rendezvous store as the job's noticeboard (several nodes) ---

def report_death(store: dist.TCPStore | None, reason: str) -> None:
    """Record the first death of the job in the store, for rank 0's error and the other nodes' messages
    (atomically: a second report never overwrites the first)."""
    try:
        if store is not None:
            store.compare_set(DEAD_KEY, "", reason)
    except Exception:  # noqa: BLE001 (the store has gone: the job is ending anyway)
        pass


def reported_death(store: dist.TCPStore | None) -> str | None:
    """A death another node reported in the store."""
    try:
        if store is not None and store.check([DEAD_KEY]):
            return store.get(DEAD_KEY).decode()
    except Exception:  # noqa: BLE001 (the store has gone)
        pass
    return None


def store_alive(store: dist.TCPStore) -> bool:
    """Whether rank 0's store still answers (it goes when rank 0 exits: the job has ended)."""
    try:
        store.check([DEAD_KEY])
        return True
    except Exception:  # noqa: BLE001 (DistNetworkError and kin: the server has gone)
        return False


def _cause(store: dist.TCPStore, gone: str, wait_s: float = 1.0) -> str | None:
    """Why a rank here failed, if not by itself: another rank's death (its peers' collectives fail at once,
    before that death is reported) or the end of the job. Waits a little for the report."""
    deadline = time.monotonic() + wait_s
    while True:
        if reported := reported_death(store):
            return reported
        if not store_alive(store):
            return gone
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def supervise_node(ranks: LocalRanks, store: dist.TCPStore, rdzv: Rendezvous, say: Callable[[str], None],
                   finished: Callable[[], bool] | None = None) -> int:
    """Node k > 0: watch this node's ranks until the job ends. 0 when it ended cleanly (every rank exited 0,
    or `finished()` says this node's work is done), 1 when a rank died (reported to rank 0 when it was the
    first death) or node 0 went away."""
    gone = f"node 0 (rank 0, {rdzv.endpoint}) is gone"
    while True:
        if dead := ranks.dead():
            # killed by a signal: nothing else caused it, so say so at once (rank 0 is waiting to name it)
            cause = None if ranks.killed() else _cause(store, gone)
            if cause is None:  # this node's rank is the first to go: tell rank 0, whose error names it
                report_death(store, dead)
                say(f"{dead}; stopping this node's ranks and the job")
            else:
                say(f"{cause}; so {dead}; stopping this node's ranks")
            return 1
        if ranks.all_exited_cleanly() or (finished is not None and finished()):
            say("the job stopped; this node's ranks exited cleanly")
            return 0
        if not store_alive(store):
            # After a clean stop the ranks exit on their own, possibly just after rank 0: give them a moment.
            deadline = time.monotonic() + EXIT_WAIT_S
            while ranks.dead(clean_too=True) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if ranks.all_exited_cleanly():
                say("the job stopped; this node's ranks exited cleanly")
                return 0
            say(f"{gone}; stopping this node's ranks")
            return 1
        time.sleep(0.2)


# --- run_ranks: a function on every rank, results back on node 0 ---

def _call_and_gather(fn: Callable, rank: int, world: int, args: tuple) -> list[Any] | None:
    """fn(rank, world, *args) on this rank; every rank's result on rank 0 (across nodes too), None elsewhere."""
    out = fn(rank, world, *args)
    every: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(out, every, dst=0)
    return every


def _run_rank(rank: int, rdzv: Rendezvous, fn: Callable, args: tuple, results: Any, threads: int) -> None:
    exit_with_parent()
    torch.set_num_threads(threads)
    try:
        join_group(rdzv, rank)
        results.put((rank, "ok", _call_and_gather(fn, rank, rdzv.world_size, args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], job: int | Rendezvous, *args: Any, timeout_s: float = 600.0,
              threads_per_rank: int | None = None) -> list[Any] | None:
    """Run fn(rank, world_size, *args) on every rank of `job` (an int: that many local ranks); the results by
    rank on node 0, None on the other nodes. Under torchrun (RANK set and `job` a Rendezvous.from_env) this
    process is one rank: fn runs here, and rank 0 gets the results.

    `fn` must be importable (a module-level function); results are pickled to rank 0, so keep them small.
    If any rank dies or raises, the others are stopped and RuntimeError names the rank, its host and error."""
    rdzv = Rendezvous(nproc=job) if isinstance(job, int) else job
    if rdzv.torchrun:
        return _run_here(fn, rdzv, args)
    rdzv = replace(rdzv.with_port(), launcher_store=True)
    _exit_through_finally_on(signal.SIGTERM, signal.SIGHUP)  # the ranks are stopped below
    store = host_store(rdzv) if rdzv.node_rank == 0 else connect_store(rdzv)
    threads = threads_per_rank or default_threads(rdzv.nproc)
    results = mp.get_context("spawn").Queue()
    ranks = LocalRanks(_run_rank, rdzv.local_ranks, (rdzv, fn, args, results, threads), rdzv)
    try:
        return _collect(ranks, results, rdzv, store if rdzv.nnodes > 1 else None, timeout_s)
    finally:
        ranks.join(timeout_s=10)
        ranks.kill()


def _exit_through_finally_on(*sigs: signal.Signals) -> None:
    """These signals raise SystemExit (so `finally` blocks run), unless a handler is already installed."""
    def stop(sig: int, frame: object) -> None:
        raise SystemExit(128 + sig)
    for sig in sigs:
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, stop)


def _run_here(fn: Callable, rdzv: Rendezvous, args: tuple) -> list[Any] | None:
    rank = Rendezvous.env_rank()
    torch.set_num_threads(default_threads(rdzv.nproc))
    join_group(rdzv, rank)
    try:
        every = _call_and_gather(fn, rank, rdzv.world_size, args)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the others are in another collective; the launcher stops them
        raise
    leave_group()
    return every


def _collect(ranks: LocalRanks, results: Any, rdzv: Rendezvous, store: dist.TCPStore | None,
             timeout_s: float) -> list[Any] | None:
    """Wait for this node's ranks to report; stop the job on the first failure anywhere."""
    done: dict[int, Any] = {}
    reported: set[int] = set()
    where = f" on {ranks.host}" if rdzv.nnodes > 1 else ""
    deadline = time.monotonic() + timeout_s
    while len(done) < rdzv.nproc:
        try:
            rank, status, value = results.get(timeout=0.5)
        except queue.Empty:
            if store is not None and not store_alive(store):
                store = None  # node 0's launcher has gone; our ranks' collectives fail and say so
            if died := _died_silently(ranks, reported) or reported_death(store):
                report_death(store, died)
                raise RuntimeError(f"{died}; stopped the other ranks") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s") from None
            continue
        reported.add(rank)
        if status == "error":
            # A peer that crashed makes the others fail in their next collective: name the crash first,
            # here or (reported by its node) on another host.
            time.sleep(0.5)
            died = _died_silently(ranks, reported) or _wait_reported(store, 2.0)
            report_death(store, died or f"rank {rank}{where} failed: {value.strip().splitlines()[-1]}")
            raise RuntimeError((f"{died}; then " if died else "") + f"rank {rank}{where} failed:\n{value}")
        done[rank] = value
    return done[rdzv.local_ranks[0]] if rdzv.node_rank == 0 else None


def _wait_reported(store: dist.TCPStore | None, wait_s: float) -> str | None:
    deadline = time.monotonic() + wait_s
    while store is not None and time.monotonic() < deadline:
        if died := reported_death(store):
            return died
        time.sleep(0.05)
    return None


def _died_silently(ranks: LocalRanks, reported: set[int]) -> str | None:
    """Ranks here that exited with an error code without reporting (killed, crashed, os._exit)."""
    return ", ".join(f"{ranks.label} {r} (pid {p.pid}) on {ranks.host} died (exit code {p.exitcode})"
                     for r, p in ranks.procs.items()
                     if r not in reported and p.exitcode not in (None, 0)) or None
