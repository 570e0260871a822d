"""AsyncEngine: drives `LLMEngine.step()` in a background thread and serves asyncio callers.

Callers (HTTP handlers) put requests and aborts on a thread-safe queue; the engine thread takes them
between steps, runs steps while there is work (and blocks on the queue when idle), and hands each
request's deltas to its own asyncio.Queue with `call_soon_threadsafe`. A request whose caller stops
reading (client disconnect) is aborted, which frees its KV blocks at the next step boundary. If a step
raises (e.g. a worker rank died), the engine is marked dead, every caller gets `EngineDeadError`, and
`on_dead` is called (the server uses it to exit). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from foe.engine.engine import LLMEngine, RequestOutput
from foe.engine.metrics import ServingMetrics
from foe.engine.request import RequestParams


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Add:
    prompt_ids: list[int]
    params: RequestParams
    outs: list[asyncio.Queue]  # one per sample
    loop: asyncio.AbstractEventLoop
    accepted: concurrent.futures.Future  # -> the samples' seq ids


@dataclass
class _Track:
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    last: float | None = None


def _send(t: _Track, item: RequestOutput | BaseException) -> None:
    """Hand an item to a caller's event loop. A closed loop (the server stopped without waiting for its
    requests) has no one left to read it."""
    with contextlib.suppress(RuntimeError):  # call_soon_threadsafe on a closed loop
        t.loop.call_soon_threadsafe(t.out.put_nowait, item)


class RequestStream:
    """The deltas of one request, as an async iterator. `aclose()` before the end aborts the request
    (frees its KV blocks); a dead engine raises EngineDeadError from the iterator."""

    def __init__(self, engine: AsyncEngine, seq_id: int, out: asyncio.Queue) -> None:
        self.engine, self.seq_id, self._out = engine, seq_id, out
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
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
    def __init__(self, engine: LLMEngine, metrics: ServingMetrics | None = None,
                 on_dead: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ServingMetrics()
        self.on_dead = on_dead
        self.dead: str | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._tracks: dict[int, _Track] = {}
        self._stop = threading.Event()
        self._die_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="foe-engine", daemon=True)
        self._thread.start()

    # ---- caller side (asyncio) --------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], params: RequestParams, n: int = 1) -> list[RequestStream]:
        """Queue n samples of a prompt (`LLMEngine.add_samples`) and wait until the engine accepts them.
        Raises ValueError for a request the engine refuses, EngineDeadError when the engine is dead."""
        if self.dead:
            raise EngineDeadError(self.dead)
        loop = asyncio.get_running_loop()
        outs: list[asyncio.Queue] = [asyncio.Queue() for _ in range(n)]
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Add(prompt_ids, params, outs, loop, accepted))
        if self.dead and not accepted.done():  # died between the check above and the put
            accepted.set_exception(EngineDeadError(self.dead))
        try:
            seq_ids = await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the caller went away; if the engine took the request anyway, drop it
            accepted.add_done_callback(self._abort_accepted)
            raise
        return [RequestStream(self, i, out) for i, out in zip(seq_ids, outs)]

    def abort(self, seq_id: int) -> None:
        self._inbox.put(("abort", seq_id))

    def _abort_accepted(self, accepted: concurrent.futures.Future) -> None:
        if not accepted.cancelled() and accepted.exception() is None:
            for seq_id in accepted.result():
                self.abort(seq_id)

    def abort_all(self) -> None:
        """End every request now, as finished with reason "abort" (a server that must stop)."""
        self._inbox.put(("abort_all", None))

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    # ---- engine thread ----------------------------------------------------------------------------
    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Add):
                self._add(item)
            elif item[0] == "abort":
                self.engine.abort(item[1])
                t = self._tracks.pop(item[1], None)
                if t is not None:
                    self.metrics.on_finish("abort", 0, time.monotonic() - t.arrival)
            elif item[0] == "abort_all":
                self._abort_all()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, item: _Add) -> None:
        if not item.accepted.set_running_or_notify_cancel():  # its caller went away before we got here
            return
        try:
            seqs = self.engine.add_samples(item.prompt_ids, item.params, len(item.outs))
        except ValueError as e:
            item.accepted.set_exception(e)
            return
        for seq, out in zip(seqs, item.outs):
            self._tracks[seq.seq_id] = _Track(out, item.loop, seq.arrival)
        item.accepted.set_result([seq.seq_id for seq in seqs])
        # nothing to compute (max_tokens=0, no echo): finished already
        self._deliver([RequestOutput(seq, finished=True) for seq in seqs if seq.is_finished])

    def _abort_all(self) -> None:
        seqs = [self.engine.seqs[i] for i in self._tracks if i in self.engine.seqs]
        for seq in seqs:
            self.engine.abort(seq.seq_id)
        self._deliver([RequestOutput(seq, finished=True) for seq in seqs])  # their callers see the end

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for o in outputs:
            t = self._tracks.get(o.seq_id)
            if t is None:
                continue
            if o.new_token_ids:
                self.metrics.on_tokens(len(o.new_token_ids), now - t.arrival, None if t.last is None else now - t.last)
                t.last = now
            if o.finished:
                self.metrics.on_finish(o.seq.finish_reason or "", len(o.seq.prompt_ids), now - t.arrival)
                del self._tracks[o.seq_id]
            _send(t, o)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and not self.dead:
                self._take_inbox(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._deliver(self.engine.step())
                else:
                    self.engine.executor.idle()
                s = self.engine.scheduler
                self.metrics.set_state(len(s.running), len(s.waiting), s.usage(), s.num_preemptions)
        except Exception as e:  # a dead worker, a bug: fail every caller, never hang them
            self._die(f"engine failed: {type(e).__name__}: {e}", traceback.format_exc())

    def fail(self, reason: str) -> None:
        """Called from another thread (a dead worker rank): fail everything now, even if the engine
        thread is blocked in a collective."""
        self._die(reason)

    def _die(self, reason: str, detail: str = "") -> None:
        with self._die_lock:
            if self.dead:
                return
            self.dead = reason
        err = EngineDeadError(reason)
        for t in list(self._tracks.values()):
            _send(t, err)
        self._tracks.clear()
        while True:  # refuse whatever is still queued
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Add) and not item.accepted.done():  # done: cancelled by its caller
                item.accepted.set_exception(err)
        if self.on_dead is not None:
            self.on_dead(reason + ("\n" + detail if detail else ""))
