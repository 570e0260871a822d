"""Where the engine core runs: `CoreProcess`, its own process (`foe serve`), or `CoreThread`, a thread of the
caller's process over an engine it already built (tests). Both speak to the API side over the same
connection with the same messages, so the server has one code path.

The core process is a fresh interpreter (`python -c "...core_main(FD)"`; not forked, since the API
process has torch threads, and not through multiprocessing's spawn, which would leave a resource-tracker
process behind the server). It reads its arguments from the channel, builds the engine (with --nproc > 1 it
is rank 0 and starts the other ranks as its own children), and answers `Ready` or `StartupFailed` (the
error is re-raised in the API process with its type, so `foe serve` reports a bad rendezvous as before). It
ignores SIGINT and SIGTERM, as the worker ranks do: the API process drains, then sends Shutdown and waits
for it. It exits when the API process dies, even by SIGKILL (its channel's EOF, or the parent watch should
it be stuck in a step), and the worker ranks exit with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from foe.engine.core import EngineCore
from foe.engine.engine import LLMEngine, LocalExecutor
from foe.engine.ipc import EngineInfo, Ready, StartupFailed
from foe.engine.scheduler import SchedulerConfig
from foe.engine.worker import DistributedExecutor, ModelSpec
from foe.parallel import ParallelDims
from foe.parallel.launch import Rendezvous, exit_with_parent, threads_per_rank
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


_CORE_MAIN = "import sys; from foe.engine.core_process import core_main; sys.exit(core_main(int(sys.argv[1])))"


@dataclass(frozen=True)
class CoreArgs:
    """What the core process builds, sent as the channel's first message."""

    spec: ModelSpec
    dims: ParallelDims
    cfg: SchedulerConfig
    rdzv: Rendezvous | None
    threads: int


def core_main(fd: int) -> int:
    """The core process: serve on the channel at file descriptor fd; the exit code."""
    conn = Connection(fd)
    exit_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API process decides when to stop (Shutdown)
        signal.signal(sig, signal.SIG_IGN)
    try:
        a: CoreArgs = conn.recv()
        engine = build_engine(a.spec, a.dims, a.cfg, a.rdzv, a.threads)
    except BaseException as e:  # noqa: BLE001 (every failure goes back to the API process)
        if not isinstance(e, (ValueError, OSError)):  # a bug rather than bad input: keep where it happened
            traceback.print_exc()
        conn.send(StartupFailed(_picklable(e)))
        return 1
    if EngineCore(engine, conn).run():
        engine.close()  # stops the worker ranks
        return 0
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
        # an OSError: `foe serve` says it in one line (the core printed why, e.g. a rank that died)
        raise ChildProcessError(f"{exited()} while starting") from None
    if isinstance(msg, StartupFailed):
        raise msg.error
    assert isinstance(msg, Ready), msg
    return msg.info


class CoreProcess:
    """The engine core in a child process; `info` once it is ready to serve."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, cfg: SchedulerConfig, rdzv: Rendezvous | None = None,
                 threads: int | None = None) -> None:
        """threads: torch threads of each local rank (default `engine_threads`)."""
        threads = threads or engine_threads((rdzv or Rendezvous(nproc=dims.world_size)).nproc)
        ours, theirs = socket.socketpair()
        # this process's import path, so that the child imports the same foe
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", _CORE_MAIN, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self.conn.send(CoreArgs(spec, dims, cfg, rdzv, threads))
            self.info = _wait_ready(self.conn, self.exit_reason)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def exit_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=0.5)  # the channel's EOF can come just before the exit
        except subprocess.TimeoutExpired:
            code = None
        return f"the engine core (pid {self.pid}) " + ("exited" if code is None else f"exited with code {code}")

    def wait(self, timeout_s: float = STOP_WAIT_S) -> int | None:
        """After Shutdown (`AsyncEngine.shutdown`): wait for the core to stop its ranks and exit, kill it if it
        has not within timeout_s. Its exit code (None: it had to be killed)."""
        try:
            code: int | None = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
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

    def wait(self, timeout_s: float = 10.0) -> None:
        """After Shutdown: wait for the loop to end."""
        self.thread.join(timeout=timeout_s)
        self.conn.close()
