"""Putting a server together: listening socket -> the engine core in its own process (which runs rank 0 and
starts the other ranks) -> AsyncEngine -> FastAPI app -> uvicorn in this, the API process. Also
`ServerHandle`, a server on a free port for tests and benchmarks, with the core in a thread of the
caller's process over an engine it built.

The API process runs HTTP, tokenisation, chat templates, detokenisation and streaming; the core runs the
step loop and nothing else, so the two no longer take turns on one interpreter lock (see
docs/serving.md, "Processes and threads"). The API process does no model compute: it keeps one torch thread.

The socket is bound before the model loads, so a port in use (or out of range) fails at once with a
clear error, and the "on http://..." banner is printed only once uvicorn is serving on it (with the
real port when --port 0 asked for any free one).

A dead engine (a worker rank died, a step raised, the core process died) makes the server answer 503 and
exit: uvicorn is asked to stop, and if that has not happened within a few seconds the process exits
anyway; the core and its ranks exit with it.

SIGTERM or SIGINT drains: new requests get 503 while those in flight finish, then uvicorn stops, the core
is told to stop, it tells the worker ranks to stop, and the process exits with code 0. After the
drain timeout, or on a second signal, the requests still in flight are aborted (their responses end with
finish_reason "abort") rather than cut off; should that not empty the server within a few seconds (a
hung engine), it stops anyway. Plain uvicorn would re-raise the signal after its own shutdown, killing
the process before that clean-up (exit code -15, a worker's gloo traceback).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
import uvicorn

from foe.engine.async_engine import AsyncEngine
from foe.engine.core_process import STOP_WAIT_S, CoreProcess, CoreThread
from foe.engine.engine import LLMEngine
from foe.engine.scheduler import SchedulerConfig
from foe.engine.server import DrainGate, ServerConfig, build_app
from foe.engine.worker import ModelSpec
from foe.parallel import ParallelDims
from foe.parallel.launch import Rendezvous
from foe.tokenizer import load_tokenizer

EXIT_GRACE_S = 3.0
DRAIN_TIMEOUT_S = 30.0  # Kubernetes' default grace period before its SIGKILL


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (uvicorn listens on it); port 0 = any free
    port. ValueError with the reason when that is impossible."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebinding after a restart works
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn serving through a `DrainGate`: calls `on_started` once it is accepting connections, and
    drains on SIGTERM/SIGINT (see the module docstring); `abort_all` ends the requests in flight."""

    def __init__(self, config: uvicorn.Config, gate: DrainGate, on_started: Callable[[], None] | None = None,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, abort_all: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.gate, self.on_started, self.abort_all = gate, on_started, abort_all
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None
        self.aborted = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals, which uvicorn would re-raise once it has stopped.
        name = signal.Signals(sig).name
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
            self.gate.close()
            print(f"foe serve: {name}: finishing {self.gate.in_flight} request(s) in flight (new ones get 503), "
                  f"then stopping", file=sys.stderr, flush=True)
        elif not self.aborted:
            self._abort(f"{name} again")

    def _abort(self, why: str) -> None:
        print(f"foe serve: {why}: aborting {self.gate.in_flight} request(s) in flight", file=sys.stderr, flush=True)
        self.aborted, self.drain_deadline = True, time.monotonic()  # they have EXIT_GRACE_S to end
        if self.abort_all is not None:
            self.abort_all()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.gate.in_flight == 0:
                self.should_exit = True
            elif not self.aborted and time.monotonic() > self.drain_deadline:
                self._abort(f"still running after {self.drain_timeout_s:g} s")
            elif self.aborted and time.monotonic() > self.drain_deadline + EXIT_GRACE_S:  # a hung engine
                self.should_exit = self.force_exit = True
        return await super().on_tick(counter)


def _uvicorn(app, sock: socket.socket, on_started: Callable[[], None] | None = None,
             drain_timeout_s: float = DRAIN_TIMEOUT_S, abort_all: Callable[[], None] | None = None) -> _Server:
    host, port = sock.getsockname()[:2]
    gate = DrainGate(app)
    return _Server(uvicorn.Config(gate, host=host, port=port, log_level="warning", lifespan="off"), gate,
                   on_started, drain_timeout_s, abort_all)


def serve_forever(spec: ModelSpec, dims: ParallelDims, cfg: SchedulerConfig, server_cfg: ServerConfig,
                  drain_timeout_s: float = DRAIN_TIMEOUT_S, rdzv: Rendezvous | None = None) -> int:
    sock = bind_socket(server_cfg.host, server_cfg.port)
    torch.set_num_threads(1)  # no model compute here; the cores are the engine's
    try:
        tokenizer = load_tokenizer(spec.checkpoint)
        core = CoreProcess(spec, dims, cfg, rdzv)
    except BaseException:
        sock.close()
        raise
    holder: dict[str, uvicorn.Server] = {}

    def on_dead(reason: str) -> None:
        print(f"foe serve: {reason}\nfoe serve: answering 503 and shutting down", file=sys.stderr, flush=True)
        threading.Timer(1.0, lambda: setattr(holder["server"], "should_exit", True)).start()
        threading.Timer(1.0 + EXIT_GRACE_S, os._exit, (1,)).start()  # in case a thread is stuck

    async_engine = AsyncEngine(core.conn, core.info, tokenizer, on_dead=on_dead, exit_reason=core.exit_reason)
    port = sock.getsockname()[1]

    def banner() -> None:
        print(f"foe serve: {server_cfg.model_name} ({spec.model_config.arch}, {dims.describe(spec.model_config)}) on "
              f"http://{server_cfg.host}:{port}  [KV: {cfg.num_blocks} blocks x {cfg.block_size} tokens"
              f" per shard; engine core pid {core.pid}]", flush=True)
    try:
        app = build_app(async_engine, tokenizer, server_cfg)
        server = holder["server"] = _uvicorn(app, sock, banner, drain_timeout_s, async_engine.abort_all)
        server.run(sockets=[sock])
    finally:
        sock.close()
        async_engine.shutdown()
        code = core.wait(EXIT_GRACE_S if async_engine.dead else STOP_WAIT_S)
    return 1 if async_engine.dead or code != 0 else 0


class AppThread:
    """Any ASGI app served by uvicorn in a daemon thread on a free 127.0.0.1 port (tests, benchmarks).
    The socket is bound here, so the port cannot be taken between choosing it and serving on it."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = _uvicorn(app, self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class ServerHandle:
    """A server on a free 127.0.0.1 port (uvicorn in a thread) over an engine built in this process, driven by
    an `EngineCore` in another thread (the same messages as `foe serve`'s core process): `with ServerHandle(...)
    as s:`. Tests reach the engine as `s.engine`."""

    def __init__(self, engine: LLMEngine, server_cfg: ServerConfig | None = None) -> None:
        if engine.tokenizer is None:
            raise ValueError("a served engine needs its tokenizer")
        self.engine = engine
        self.server_cfg = server_cfg or ServerConfig()
        self.core = CoreThread(engine)
        self.async_engine = AsyncEngine(self.core.conn, self.core.info, engine.tokenizer,
                                        exit_reason=self.core.exit_reason)
        try:
            self.app = build_app(self.async_engine, engine.tokenizer, self.server_cfg)
        except BaseException:
            self.close()
            raise
        self.http = AppThread(self.app)

    @property
    def url(self) -> str:
        return self.http.url

    def __enter__(self) -> ServerHandle:
        self.http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.stop()
        self.close()

    def close(self) -> None:
        self.async_engine.shutdown()
        self.core.wait()
        self.engine.close()
