"""Where the engine core runs: `CoreProcess`, its own process (`foe serve`), or `CoreThread`, a thread of the
caller's process over an engine it already built (tests). Both speak to the API side over the same
connection with the same messages, so the server has one code path.

The core process is spawned (not forked: the API process has torch threads), builds the engine there (with
--nproc > 1 it is rank 0 and starts the other ranks as its own children), and answers `Ready` or
`StartupFailed` (the error is re-raised in the API process with its type, so `foe serve` reports a bad
rendezvous as before). It ignores SIGINT and SIGTERM, as the worker ranks do: the API process drains, then
sends Shutdown. It exits when the API process dies, even by SIGKILL (its channel's EOF, or the parent watch
should it be stuck in a step), and the worker ranks exit with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from foe.engine.core import EngineCore
from foe.engine.engine import LLMEngine, LocalExecutor
from foe.engine.ipc import EngineInfo, Ready, Shutdown, StartupFailed
from foe.engine.scheduler import SchedulerConfig
from foe.engine.worker import DistributedExecutor, ModelSpec, exit_with_parent
from foe.parallel import ParallelDims
from foe.parallel.launch import Rendezvous, threads_per_rank
from foe.tokenizer import load_tokenizer

STOP_WAIT_S = 30.0  # for the core to stop its ranks after Shutdown, before it is killed
API_CORES = 1  # left to the API process (HTTP, tokenisation, streaming) when choosing the engine's threads


def engine_threads(local_ranks: int) -> int:
    """Torch threads for each of this host's `local_ranks` model ranks while serving: OMP_NUM_THREADS when
    set, else the cores less API_CORES, shared out. Measured on 2 cores (docs/serving.md): a core on 2
    threads next to a busy API process ran 4-8x slower than on 1, as its threads wait for each other."""
    if os.environ.get("OMP_NUM_THREADS"):
        return threads_per_rank(local_ranks)
    return max(1, ((os.cpu_count() or 1) - API_CORES) // local_ranks)


def build_engine(spec: ModelSpec, dims: ParallelDims, cfg: SchedulerConfig, rdzv: Rendezvous | None = None,
                 threads: int | None = None) -> LLMEngine:
    """rdzv: where the ranks meet (default: dims.world_size local ranks); threads: torch threads of each
    local rank (default: this process's setting with one rank, the executor's choice with several)."""
    model_cfg = spec.model_config
    dims.validate(model_cfg)
    if cfg.dp_size != dims.dp_size:
        raise ValueError(f"scheduler dp_size {cfg.dp_size} != the layout's {dims.dp_size}")
    if dims.world_size == 1:
        if threads:
            torch.set_num_threads(threads)
        executor = LocalExecutor(spec.build(), cfg.num_blocks, cfg.block_size)
    else:
        executor = DistributedExecutor(spec, dims, cfg.num_blocks, cfg.block_size, rdzv, threads)
    return LLMEngine(executor, cfg, model_cfg, load_tokenizer(spec.checkpoint))


def _core_main(conn: Connection, spec: ModelSpec, dims: ParallelDims, cfg: SchedulerConfig,
               rdzv: Rendezvous | None, threads: int | None) -> None:
    exit_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API process decides when to stop (Shutdown)
        signal.signal(sig, signal.SIG_IGN)
    try:
        engine = build_engine(spec, dims, cfg, rdzv, threads)
    except BaseException as e:  # noqa: BLE001 (every failure goes back to the API process)
        conn.send(StartupFailed(_picklable(e)))
        sys.exit(1)
    if EngineCore(engine, conn).run():
        engine.close()  # stops the worker ranks
        sys.exit(0)
    sys.stderr.flush()
    os._exit(1)  # dead: the ranks exit with us (a rank may be blocked in a collective, so no join)


def _picklable(e: BaseException) -> BaseException:
    """e itself when it pickles with its message (ValueError, ConnectionError), else a RuntimeError saying it."""
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _wait_ready(conn: Connection, exited: Callable[[], str]) -> EngineInfo:
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        raise RuntimeError(f"{exited()} while starting") from None
    if isinstance(msg, StartupFailed):
        raise msg.error
    assert isinstance(msg, Ready), msg
    return msg.info


class CoreProcess:
    """The engine core in a spawned process; `info` once it is ready to serve."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, cfg: SchedulerConfig, rdzv: Rendezvous | None = None,
                 threads: int | None = None) -> None:
        """threads: torch threads of each local rank (default `engine_threads`)."""
        ctx = mp.get_context("spawn")
        self.conn, core_end = ctx.Pipe(duplex=True)
        # not a daemon: it starts the worker ranks as its own children
        threads = threads or engine_threads((rdzv or Rendezvous(nproc=dims.world_size)).nproc)
        self.proc = ctx.Process(target=_core_main, name="foe-engine-core",
                                args=(core_end, spec, dims, cfg, rdzv, threads))
        self.proc.start()
        core_end.close()
        try:
            self.info = _wait_ready(self.conn, self.exit_reason)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def exit_reason(self) -> str:
        self.proc.join(timeout=0.5)  # the channel's EOF can come just before the exit
        code = self.proc.exitcode
        return f"the engine core (pid {self.pid}) " + ("exited" if code is None else f"exited with code {code}")

    def stop(self, timeout_s: float = STOP_WAIT_S) -> int | None:
        """Ask the core to stop (it stops its ranks), kill it if it has not within timeout_s; its exit code."""
        try:
            self.conn.send(Shutdown())
        except OSError:  # it has gone already
            pass
        self.proc.join(timeout=timeout_s)
        code = self.proc.exitcode
        self.kill()
        return code

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class CoreThread:
    """An engine already built in this process, driven by an `EngineCore` in a daemon thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.conn, core_end = mp.Pipe(duplex=True)
        self.core = EngineCore(engine, core_end)
        self.thread = threading.Thread(target=self.core.run, name="foe-engine-core", daemon=True)
        self.thread.start()
        self.info = _wait_ready(self.conn, self.exit_reason)

    def exit_reason(self) -> str:
        return "the engine core thread ended"

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            self.conn.send(Shutdown())
        except OSError:
            pass
        self.thread.join(timeout=timeout_s)
        self.conn.close()
