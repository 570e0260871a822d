"""Multi-rank execution: rank 0 (the server process) schedules and samples; every rank runs the model.

Each step rank 0 broadcasts the `StepPlan` (broadcast_object_list; plain data), every rank runs the rows
of its data-parallel shard through its `ModelRunner` (an expert-parallel rank with no rows still runs
a B = 0 forward, because every layer's all-to-all needs all ranks), and, when there are several shards
(ep), rank 0 gathers each shard's logits. Rank 0 samples everything with the requests' seeded
generators, so results do not depend on the number of ranks.

Failure handling: workers are child processes watched by a monitor thread; one that exits makes the
executor call `on_failure` (the server then answers 503 and exits). Collectives carry the process-group
timeout, and an idle rank 0 sends a heartbeat so that idle workers never hit it. Workers ignore SIGINT and
SIGTERM (Ctrl-C and systemd signal the whole process group): rank 0 drains, then stops them; they exit
with it if it dies.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foe.config import ModelConfig
from foe.engine.request import StepPlan
from foe.engine.runner import ModelRunner
from foe.model.transformer import Transformer
from foe.parallel import ParallelDims, parallelize
from foe.parallel.launch import free_port

HEARTBEAT_S = 5.0
_NOOP, _STOP = "noop", "stop"


@dataclass(frozen=True)
class ModelSpec:
    """How every rank builds the same full model: a checkpoint, or a config and a seed; in `dtype` (None:
    the checkpoint's stored dtype, float32 for random weights)."""

    checkpoint: str | None = None
    config: ModelConfig | None = None
    seed: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.config is None):
            raise ValueError("a ModelSpec needs exactly one of checkpoint and config")

    def build(self) -> Transformer:
        from foe.model.checkpoint import build_model
        return build_model(self.checkpoint, self.config, self.seed, self.dtype)

    @property
    def model_config(self) -> ModelConfig:
        if self.config is not None:
            return self.config
        from foe.model.checkpoint import load_config
        return load_config(self.checkpoint)


def _run_shard(runner: ModelRunner, dims: ParallelDims, rank: int, plan: StepPlan) -> torch.Tensor:
    return runner.execute_plan(plan, dims.dp_rank(rank))


def _exit_with_parent() -> None:
    """A worker whose server died (even by SIGKILL, which runs no clean-up) exits at once instead of
    waiting for the collective timeout."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="foe-parent-watch", daemon=True).start()


def _worker_main(rank: int, dims: ParallelDims, port: int, spec: ModelSpec, num_blocks: int, block_size: int,
                 threads: int, timeout_s: float) -> None:
    _exit_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when to stop (a broadcast _STOP)
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=dims.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    model = spec.build()
    parallelize(model, dims, rank)
    runner = ModelRunner(model, num_blocks, block_size)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] == _STOP:
            break
        if box[0] == _NOOP:
            continue
        logits = _run_shard(runner, dims, rank, box[0])
        if dims.dp_size > 1:
            dist.gather_object(logits, None, dst=0)
    dist.destroy_process_group()


class DistributedExecutor:
    """Rank 0's side. Starts ranks 1..P-1 as local processes and joins them as rank 0."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, num_blocks: int, block_size: int,
                 timeout_s: float = 120.0, threads_per_rank: int | None = None) -> None:
        self.dims = dims
        self.on_failure: Callable[[str], None] | None = None
        self.failed: str | None = None
        self._last = time.monotonic()
        self._closed = False
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // dims.world_size)
        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, daemon=True, name=f"foe-rank{r}",
                                  args=(r, dims, port, spec, num_blocks, block_size, threads, timeout_s))
                      for r in range(1, dims.world_size)]
        for p in self.procs:
            p.start()
        self._monitor = threading.Thread(target=self._watch, name="foe-rank-monitor", daemon=True)
        self._monitor.start()
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=dims.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        model = spec.build()
        parallelize(model, dims, 0)
        self.runner = ModelRunner(model, num_blocks, block_size)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _watch(self) -> None:
        while not self._closed:
            for r, p in enumerate(self.procs, start=1):
                if p.exitcode is not None and not self._closed:
                    self._fail(f"worker rank {r} (pid {p.pid}) exited with code {p.exitcode}")
                    return
            time.sleep(0.2)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
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

    def _dead_workers(self, wait_s: float = 1.0) -> str | None:
        """Which workers have exited (waiting a little: a collective often fails before the exit is seen)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [f"worker rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                    for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                return ", ".join(dead) or None
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
        dist.gather_object(logits, gathered, dst=0)
        # The first rank of each data-parallel shard speaks for it.
        first = {}
        for r in range(self.dims.world_size):
            first.setdefault(self.dims.dp_rank(r), r)
        return [gathered[first[d]] for d in range(self.dims.dp_size)]

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
            for p in self.procs:
                p.join(timeout=10)
        except Exception:  # noqa: BLE001 (shutting down anyway)
            traceback.print_exc()
        finally:
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)  # reap, so no zombie outlives the server
            if dist.is_initialized():
                dist.destroy_process_group()
