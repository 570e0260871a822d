"""Multi-rank execution: rank 0 (the engine core process) schedules and samples; every rank runs the model.

Each step rank 0 broadcasts the `StepPlan` (broadcast_object_list; plain data), every rank runs the rows
of its data-parallel shard through its `ModelRunner` (an expert-parallel rank with no rows still runs
a B = 0 forward, because every layer's all-to-all needs all ranks), and, when there are several shards
(ep), rank 0 gathers each shard's logits. Rank 0 samples everything with the requests' seeded
generators, so results do not depend on the number of ranks.

Failure handling: workers are child processes watched by a monitor thread; one that exits makes the
executor call `on_failure` (the core reports it; the API process answers 503 and exits). Collectives carry
the process-group timeout, and an idle rank 0 sends a heartbeat so that idle workers never hit it.
Workers ignore SIGINT and SIGTERM (Ctrl-C and systemd signal the whole process group): rank 0 drains,
then stops them; they exit with it if it dies.

Several nodes (`Rendezvous`, torchrun's conventions): node 0 runs rank 0 and its local ranks as above; node
k > 0 runs `serve_node`, a supervisor of its own ranks. It reports a rank that died to rank 0 through the
rendezvous store (so the 503 names the rank and host), and stops its ranks and exits when rank 0's store
goes away (the job ended).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from foe.config import ModelConfig
from foe.engine.request import StepPlan
from foe.engine.runner import ModelRunner
from foe.model.transformer import Transformer
from foe.parallel import ParallelDims, parallelize
from foe.parallel.accounting import CommLedger
from foe.parallel.launch import (LocalRanks, Rendezvous, connect_store, exit_with_parent, join_group, report_death,
                                 reported_death, supervise_node, threads_per_rank)

HEARTBEAT_S = 5.0
_NOOP, _STOP = "noop", "stop"


@dataclass(frozen=True)
class ModelSpec:
    """How every rank builds the same full model: a checkpoint, or a config and a seed; in `dtype` (None:
    the checkpoint's stored dtype, float32 for random weights); on `device` (cpu or cuda: each rank takes
    the GPU of its local rank)."""

    checkpoint: str | None = None
    config: ModelConfig | None = None
    seed: int = 0
    dtype: torch.dtype | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.config is None):
            raise ValueError("a ModelSpec needs exactly one of checkpoint and config")

    def build(self, device: torch.device | None = None) -> Transformer:
        """The model on `device` (default: `self.device` for a process of local rank 0)."""
        from foe.device import resolve_device
        from foe.model.checkpoint import build_model
        return build_model(self.checkpoint, self.config, self.seed, self.dtype, device or resolve_device(self.device))

    @property
    def model_config(self) -> ModelConfig:
        if self.config is not None:
            return self.config
        from foe.model.checkpoint import load_config
        return load_config(self.checkpoint)


def _serving_ledger() -> CommLedger:
    """Off: a server runs for days (the records would grow without end), and on CUDA an accounted
    collective waits for the GPU before and after."""
    return CommLedger(enabled=False)


def _run_shard(runner: ModelRunner, dims: ParallelDims, rank: int, plan: StepPlan) -> torch.Tensor:
    return runner.execute_plan(plan, dims.dp_rank(rank))


def _worker_main(rank: int, dims: ParallelDims, rdzv: Rendezvous, spec: ModelSpec, num_blocks: int,
                 block_size: int, threads: int) -> None:
    exit_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when to stop (a broadcast _STOP)
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        _serve_rank(rank, dims, rdzv, spec, num_blocks, block_size)
    except (RuntimeError, ConnectionError) as e:  # a peer died or never came: the supervisor says which
        print(f"foe rank {rank}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _serve_rank(rank: int, dims: ParallelDims, rdzv: Rendezvous, spec: ModelSpec, num_blocks: int,
                block_size: int) -> None:
    model = spec.build(join_group(rdzv, rank))
    parallelize(model, dims, rank, ledger=_serving_ledger())
    runner = ModelRunner(model, num_blocks, block_size)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] == _STOP:
            break
        if box[0] == _NOOP:
            continue
        logits = _run_shard(runner, dims, rank, box[0])
        if dims.dp_size > 1:  # through the host: a CUDA tensor would unpickle on this rank's GPU
            dist.gather_object(logits.cpu(), None, dst=0)
    dist.destroy_process_group()


class DistributedExecutor:
    """Rank 0's side. Starts this node's other ranks (1..nproc-1) as local processes and joins the job as
    rank 0; on several nodes, their supervisors (`serve_node`) start theirs."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, num_blocks: int, block_size: int,
                 rdzv: Rendezvous | None = None, threads: int | None = None) -> None:
        rdzv = replace(rdzv or Rendezvous(nproc=dims.world_size), device=spec.device).with_port()
        if rdzv.world_size != dims.world_size or rdzv.node_rank != 0:
            raise ValueError(f"rank 0 runs on node 0 of a {dims.world_size}-rank job, got {rdzv}")
        self.dims = dims
        self.on_failure: Callable[[str], None] | None = None
        self.failed: str | None = None
        self._last = time.monotonic()
        self._closed = False
        self._store: dist.TCPStore | None = None
        threads = threads or threads_per_rank(rdzv.nproc)
        # under torchrun every rank is its own torchrun child: none to start here
        self.ranks = LocalRanks(_worker_main, range(0) if rdzv.torchrun else rdzv.local_ranks[1:],
                                (dims, rdzv, spec, num_blocks, block_size, threads), rdzv,
                                "worker rank")
        self._monitor = threading.Thread(target=self._watch, name="foe-rank-monitor", daemon=True)
        self._monitor.start()
        torch.set_num_threads(threads)
        try:
            device = join_group(rdzv, 0)
        except BaseException:
            self._closed = True
            self.ranks.kill()
            raise
        if rdzv.nnodes > 1 and not rdzv.torchrun:  # (torchrun's agents watch their own ranks)
            self._store = connect_store(rdzv)  # the monitor reads the other nodes' reports from it
        model = spec.build(device)
        parallelize(model, dims, 0, ledger=_serving_ledger())
        self.runner = ModelRunner(model, num_blocks, block_size)

    @property
    def worker_pids(self) -> list[int]:
        return self.ranks.pids

    def _death(self) -> str | None:
        return self.ranks.dead(clean_too=True) or reported_death(self._store)

    def _watch(self) -> None:
        while not self._closed:
            if (dead := self._death()) and not self._closed:
                self._fail(dead)
                return
            time.sleep(0.2)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            report_death(self._store, reason)  # the other nodes' supervisors name it
            if self.on_failure is not None:
                self.on_failure(reason)
            else:  # still starting up (rank 0 may be blocked in a collective): do not hang
                print(f"foe: {reason}; exiting", flush=True)
                os._exit(1)

    def _broadcast(self, obj: Any) -> None:
        if self.failed:
            raise RuntimeError(self.failed)
        dist.broadcast_object_list([obj], src=0)
        self._last = time.monotonic()

    def _dead_workers(self, wait_s: float = 2.5) -> str | None:
        """Which ranks have died (waiting a little: a collective often fails before the death is seen)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self._death()
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)

    def execute(self, plan: StepPlan) -> list[torch.Tensor]:
        try:
            return self._execute(plan)
        except Exception as e:  # a collective failed: name the dead rank rather than the socket error
            dead = self._dead_workers()
            raise RuntimeError(f"{dead}" if dead else f"a collective failed: {e}") from e

    def _execute(self, plan: StepPlan) -> list[torch.Tensor]:
        self._broadcast(plan)
        logits = _run_shard(self.runner, self.dims, 0, plan)
        if self.dims.dp_size == 1:
            return [logits]
        gathered: list[Any] = [None] * self.dims.world_size
        dist.gather_object(logits.cpu(), gathered, dst=0)
        # The first rank of each data-parallel shard speaks for it.
        first = {}
        for r in range(self.dims.world_size):
            first.setdefault(self.dims.dp_rank(r), r)
        return [gathered[first[d]].to(logits.device) for d in range(self.dims.dp_size)]

    def idle(self) -> None:
        if time.monotonic() - self._last > HEARTBEAT_S:
            self._broadcast(_NOOP)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.failed:
                self._broadcast(_STOP)
            for p in self.ranks.procs.values():
                p.join(timeout=10)
        except Exception:  # noqa: BLE001 (shutting down anyway)
            traceback.print_exc()
        finally:
            self.ranks.kill()
            if dist.is_initialized():
                dist.destroy_process_group()


def serve_node(spec: ModelSpec, dims: ParallelDims, rdzv: Rendezvous, num_blocks: int, block_size: int,
               threads: int | None = None) -> int:
    """Node k > 0 of a multi-node `foe serve`: start this node's ranks, which join rank 0's job, and
    supervise them (no HTTP here). Returns 0 when the job stopped cleanly, 1 when a rank died or node 0
    went away; a local death is reported to rank 0 through the store, so that its error names the rank."""
    rdzv = replace(rdzv, device=spec.device)
    host = rdzv.host()
    _say(f"node {rdzv.node_rank} of {rdzv.nnodes} on {host}: ranks {rdzv.local_ranks[0]}..{rdzv.local_ranks[-1]} "
         f"of {rdzv.world_size} ({dims.describe(spec.model_config)}); waiting for node 0 at {rdzv.endpoint} (the API is served there)")
    store = connect_store(rdzv)
    threads = threads or threads_per_rank(rdzv.nproc)
    ranks = LocalRanks(_worker_main, rdzv.local_ranks, (dims, rdzv, spec, num_blocks, block_size, threads), rdzv,
                       "worker rank")
    _say(f"reached {rdzv.endpoint}; started " + ", ".join(f"rank {r} (pid {p.pid})" for r, p in ranks.procs.items()))
    try:
        return supervise_node(ranks, store, rdzv, _say)
    finally:
        ranks.kill()


def _say(msg: str) -> None:
    print(f"foe serve: {msg}", file=sys.stderr, flush=True)


def serve_torchrun_rank(spec: ModelSpec, dims: ParallelDims, rdzv: Rendezvous, num_blocks: int, block_size: int
                        ) -> int:
    """A rank other than 0 of a `foe serve` started by torchrun: run the model until rank 0 stops the job
    (torchrun supervises the processes; rank 0 serves the API)."""
    rdzv = replace(rdzv, device=spec.device)
    _worker_main(Rendezvous.env_rank(), dims, rdzv, spec, num_blocks, block_size, threads_per_rank(rdzv.nproc))
    return 0
