"""Starting ranks: under torchrun (env vars set), as local processes spawned by `run_ranks`, or as one node
of a multi-node job described by a `Rendezvous` (torchrun's conventions; `foe serve --nnodes`).

`run_ranks` is what the benchmarks and tests use on one machine: it starts P processes with a gloo
rendezvous on 127.0.0.1, returns each rank's result, and if any rank dies or raises, stops the others
and raises with that rank's error, so a dead worker never leaves the rest hanging in a collective.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import queue
import socket
import struct
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one job meet, and this node's place in it, with torchrun's conventions: `nnodes`
    nodes of `nproc` ranks each, global rank = node_rank * nproc + local rank. Rank 0 (on node 0) hosts the
    TCPStore on master_port of every interface; the other nodes reach it at master_addr. `timeout_s` bounds
    every wait for another rank: the rendezvous, and each collective."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: any free port, on one node only
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError("nproc and nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need a fixed master port (the other nodes must know it)")
        if self.timeout_s <= 0:
            raise ValueError(f"the rendezvous timeout must be > 0 s, got {self.timeout_s}")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def local_ranks(self) -> range:
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def with_port(self) -> Rendezvous:
        """This rendezvous with a concrete port (a free one when 0)."""
        return self if self.master_port else replace(self, master_port=free_port())

    def host(self) -> str:
        """This node, for messages: its address facing the master (namespaces share one hostname)."""
        addr = local_address(self.master_addr)
        return f"{socket.gethostname()} ({addr})" if addr else socket.gethostname()

    def check_hint(self) -> str:
        return (f"check that node 0 runs `foe serve ... --nnodes {self.nnodes} --node-rank 0 --master-port "
                f"{self.master_port}`, that every other node runs the same command with its --node-rank and "
                f"--master-addr {self.master_addr}, that {self.endpoint} is "
                f"node 0's address and port as seen from the other nodes, and that no firewall blocks it "
                f"(--dist-timeout sets this wait)")


def threads_per_rank(local_ranks: int) -> int:
    """Threads for each of `local_ranks` processes on this host: OMP_NUM_THREADS when set (as
    torchrun sets it), else the cores shared out. Several ranks spinning on more threads than cores slow
    every collective down."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // local_ranks)


def local_address(peer: str) -> str | None:
    """This host's IPv4 address on the route to `peer` (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(addr: str) -> str | None:
    """The name of the network interface holding the IPv4 address `addr` (Linux), or None."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def _pick_gloo_interface(rdzv: Rendezvous) -> None:
    """Gloo advertises the address its hostname resolves to, else loopback: wrong on a host whose hostname
    is not its address on the job's network. Use the interface that routes to the master instead (unless
    GLOO_SOCKET_IFNAME is set)."""
    if rdzv.nnodes > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_of(local_address(rdzv.master_addr) or "")
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface


def join_group(rdzv: Rendezvous, rank: int) -> None:
    """init_process_group (gloo) for global `rank` of `rdzv`; ConnectionError saying what to check when the
    other ranks are not all there within the timeout."""
    _pick_gloo_interface(rdzv)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{rdzv.endpoint}", rank=rank,
                                world_size=rdzv.world_size, timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    except (RuntimeError, TimeoutError) as e:  # DistStoreError, DistNetworkError, gloo's connect timeout
        raise ConnectionError(f"rank {rank} could not join the {rdzv.world_size} ranks at {rdzv.endpoint} within "
                              f"{rdzv.timeout_s:g} s ({_one_line(e)}); {rdzv.check_hint()}") from e


def connect_store(rdzv: Rendezvous) -> dist.TCPStore:
    """A client of rank 0's TCPStore (a node's supervisor uses it to report and to notice the job ending);
    ConnectionError saying what to check when it cannot be reached within the timeout."""
    try:
        return dist.TCPStore(rdzv.master_addr, rdzv.master_port, is_master=False,
                             timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    except (RuntimeError, TimeoutError, OSError) as e:
        raise ConnectionError(f"cannot reach node 0's rendezvous at {rdzv.endpoint} within {rdzv.timeout_s:g} s "
                              f"({_one_line(e)}); {rdzv.check_hint()}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        raise RuntimeError("no RANK in the environment: launch with torchrun, or use foe.parallel.run_ranks")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any,
            threads: int, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        init_distributed("gloo", timeout_s)
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _died_silently(procs: list, reported: set[int]) -> str | None:
    """Ranks that exited with an error code without reporting (killed, crashed, os._exit)."""
    dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(procs)
            if r not in reported and p.exitcode not in (None, 0)]
    return ", ".join(dead) or None


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0,
              threads_per_rank: int | None = None) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` local gloo processes; return results by rank.

    `fn` must be importable (a module-level function). Results travel back over a multiprocessing
    queue, so keep them small (numbers, lists, small tensors)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, threads, timeout_s),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    reported: set[int] = set()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if died := _died_silently(procs, reported):
                    raise RuntimeError(f"{died}; stopped the other ranks") from None
                if datetime.datetime.now() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s") from None
                continue
            reported.add(rank)
            if status == "error":
                # A peer that crashed makes the others fail in their next collective: name the crash first.
                time.sleep(0.5)
                died = _died_silently(procs, reported)
                raise RuntimeError((f"{died}; then " if died else "") + f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            if p.is_alive() and len(out) < world_size:
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    return [out[r] for r in range(world_size)]
