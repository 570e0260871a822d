"""AsyncEngine: the API process's handle on the engine core (core.py), for asyncio callers.

Requests and aborts go to the core over its connection; a reader thread receives the core's messages
(one `StepOutputs` per step) and hands them to the event loop in one call each, where every sample's
tokens become text (output.py), the serving metrics are observed, and each delta is put on its request's
asyncio.Queue. A request whose caller stops reading (client disconnect) is aborted in the core, which
frees its KV blocks at its next step boundary; so is one whose text hit a stop string. If the core dies
(its process exited, or it reports a dead worker rank or a failed step), every caller gets
`EngineDeadError` and `on_dead` is called (the server uses it to exit). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from tokenizers import Tokenizer

from foe.engine.detokenizer import Detokenizer, TextState
from foe.engine.ipc import (Abort, AbortAll, Accepted, AddRequest, CoreDead, EngineInfo, Refused, Shutdown,
                            StepOutputs)
from foe.engine.metrics import ServingMetrics
from foe.engine.output import RequestDelta, SampleText
from foe.engine.request import RequestParams


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Pending:
    """A request sent to the core, waiting for its Accepted (or Refused)."""

    accepted: asyncio.Future  # -> list[RequestStream]
    params: RequestParams
    arrival: float
    prompt_len: int


@dataclass
class _Track:
    out: asyncio.Queue
    text: SampleText
    arrival: float
    prompt_len: int
    last: float | None = None


class RequestStream:
    """The deltas of one sample, as an async iterator. `aclose()` before the end aborts it (frees its KV
    blocks); a dead engine raises EngineDeadError from the iterator."""

    def __init__(self, engine: AsyncEngine, seq_id: int, out: asyncio.Queue) -> None:
        self.engine, self.seq_id, self._out = engine, seq_id, out
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self._out.get()
        except BaseException:  # cancelled (client gone): abort
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.seq_id)


class AsyncEngine:
    """conn: the API's end of the core's connection, after its Ready (info); exit_reason: why the core went
    away, for the 503s, when its channel closes without a CoreDead."""

    def __init__(self, conn: Connection, info: EngineInfo, tokenizer: Tokenizer, metrics: ServingMetrics | None = None,
                 on_dead: Callable[[str], None] | None = None,
                 exit_reason: Callable[[], str] = lambda: "the engine core exited") -> None:
        self.conn, self.info = conn, info
        self.max_seq_len, self.vocab_size = info.max_seq_len, info.vocab_size
        self.detok = Detokenizer(tokenizer)
        self.metrics = metrics or ServingMetrics()
        self.on_dead, self.exit_reason = on_dead, exit_reason
        self.dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the callers' loop, set by the first submit
        self._pending: dict[int, _Pending] = {}
        self._tracks: dict[int, _Track] = {}
        self._rids = itertools.count()
        self._send_lock = threading.Lock()
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="foe-core-reader", daemon=True)
        self._reader.start()

    # ---- caller side (the event loop) -------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], params: RequestParams, n: int = 1) -> list[RequestStream]:
        """Queue n samples of a prompt (`LLMEngine.add_samples`) and wait until the core accepts them.
        Raises ValueError for a request the core refuses, EngineDeadError when the engine is dead."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("an AsyncEngine serves the callers of one event loop")
        if self.dead:
            raise EngineDeadError(self.dead)
        rid = next(self._rids)
        pending = _Pending(loop.create_future(), params, time.monotonic(), len(prompt_ids))
        self._pending[rid] = pending
        # stop strings are found here, in the text; the core only sees stop token ids
        self._send(AddRequest(rid, list(prompt_ids), replace(params, stop=()), n))
        try:
            return await pending.accepted  # the core's Accepted resolves it (_accepted), a death fails it
        finally:
            self._pending.pop(rid, None)  # cancelled: an Accepted that comes anyway aborts its samples

    def abort(self, seq_id: int) -> None:
        t = self._tracks.pop(seq_id, None)
        if t is not None:
            self.metrics.on_finish("abort", 0, time.monotonic() - t.arrival)
            self._send(Abort((seq_id,)), quiet=True)

    def abort_all(self) -> None:
        """End every request now, as finished with reason "abort" (a server that must stop)."""
        self._send(AbortAll(), quiet=True)

    def shutdown(self) -> None:
        """Tell the core to stop (its host waits for it); the channel's EOF is then no failure."""
        self._closing = True
        self._send(Shutdown(), quiet=True)

    def _send(self, msg: Any, quiet: bool = False) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except OSError as e:  # the core has gone; the reader reports why
            if not quiet:
                raise EngineDeadError(self.dead or f"the engine core is unreachable: {e}") from None

    # ---- the core's messages ----------------------------------------------------------------------
    def _read(self) -> None:
        reason = None
        try:
            while True:
                msg = self.conn.recv()
                if isinstance(msg, CoreDead):
                    reason = msg.reason
                    break
                self._call(self._on_message, msg)
        except (EOFError, OSError):
            if self._closing:
                return
        self._die(reason or self.exit_reason())

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        """fn(arg) on the callers' loop; here when there is none yet (no request was ever made)."""
        loop = self._loop
        if loop is None:
            fn(arg)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the server stopped, nobody is waiting
            loop.call_soon_threadsafe(fn, arg)

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, StepOutputs):
            self._deliver(msg)
        elif isinstance(msg, Accepted):
            self._accepted(msg)
        elif isinstance(msg, Refused):
            pending = self._pending.get(msg.rid)
            if pending is not None and not pending.accepted.done():
                pending.accepted.set_exception(ValueError(msg.message))

    def _accepted(self, msg: Accepted) -> None:
        pending = self._pending.get(msg.rid)
        if pending is None or pending.accepted.done():  # its caller went away meanwhile: drop the samples
            self._send(Abort(msg.seq_ids), quiet=True)
            return
        streams = []
        for seq_id in msg.seq_ids:
            out: asyncio.Queue = asyncio.Queue()
            text = SampleText(TextState(pending.params.stop))
            self._tracks[seq_id] = _Track(out, text, pending.arrival, pending.prompt_len)
            streams.append(RequestStream(self, seq_id, out))
        pending.accepted.set_result(streams)

    def _deliver(self, msg: StepOutputs) -> None:
        now = time.monotonic()
        stopped: list[int] = []  # hit a stop string here: the core still runs them
        for d in msg.deltas:
            t = self._tracks.get(d.seq_id)
            if t is None:  # aborted, or finished by a stop string, here already
                continue
            o = t.text.apply(d, self.detok)
            if o.new_token_ids:
                self.metrics.on_tokens(len(o.new_token_ids), now - t.arrival, None if t.last is None else now - t.last)
                t.last = now
            if o.finished:
                self.metrics.on_finish(o.finish_reason or "", t.prompt_len, now - t.arrival)
                del self._tracks[d.seq_id]
                if d.finish_reason is None:
                    stopped.append(d.seq_id)
            t.out.put_nowait(o)
        if stopped:
            self._send(Abort(tuple(stopped)), quiet=True)
        s = msg.stats
        self.metrics.set_state(s.running, s.waiting, s.kv_usage, s.preemptions)

    # ---- death ------------------------------------------------------------------------------------
    def _die(self, reason: str) -> None:
        self.dead = reason
        self._call(self._fail_all, EngineDeadError(reason.split("\n")[0]))
        if self.on_dead is not None:
            self.on_dead(reason)

    def _fail_all(self, err: EngineDeadError) -> None:
        for t in self._tracks.values():
            t.out.put_nowait(err)
        self._tracks.clear()
        for p in self._pending.values():
            if not p.accepted.done():
                p.accepted.set_exception(err)
