"""EngineCore: the step loop of an `LLMEngine`, fed by the API process over a connection (see ipc.py).

A reader thread puts the API's messages on a queue; the loop takes them between steps (blocking when
there is nothing to run), runs a step while there is work, and sends each step's deltas as one
`StepOutputs` message: token ids and logprobs, no text (the API process detokenises and applies stop
strings, then aborts a sequence that hit one). The API's EOF (its process died) stops the core like a
Shutdown. If a step raises or a worker rank dies, the core sends `CoreDead` and stops running steps;
the API answers 503 and exits. Knows nothing of HTTP or of processes: `core_process.py` hosts it in
its own process (`foe serve`) or in a thread (tests).
"""

from __future__ import annotations

import queue
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

from foe.engine.engine import LLMEngine, RequestOutput
from foe.engine.ipc import (Abort, AbortAll, Accepted, AddRequest, CoreDead, CoreDelta, EngineInfo, EngineStats,
                            Ready, Refused, Shutdown, StepOutputs)
from foe.engine.worker import DistributedExecutor

IDLE_POLL_S = 0.5  # an idle core wakes this often to let the executor send its heartbeat
REPORT_WAIT_S = 5.0  # for CoreDead to be sent before `run` returns (its host then exits at once)


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        engine.detok = None  # text and stop strings are the API process's (output.py)
        self.engine, self.conn = engine, conn
        self.dead = False
        self._inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._die_lock = threading.Lock()
        self._reported = threading.Event()  # CoreDead is sent
        self._want_prompt_lp: set[int] = set()  # sequences whose prompt logprobs are not sent yet
        if isinstance(engine.executor, DistributedExecutor):
            engine.executor.on_failure = self.fail

    def run(self) -> bool:
        """Serve until Shutdown or the API's EOF (True), or until the engine fails (False)."""
        self._send(Ready(EngineInfo(self.engine.max_seq_len, self.engine.vocab_size)))
        threading.Thread(target=self._read, name="foe-core-inbox", daemon=True).start()
        try:
            while not self.dead:
                busy = self.engine.has_unfinished
                took, deltas, stop = self._take_inbox(block=not busy)
                if stop:
                    return True
                if self.engine.has_unfinished:
                    deltas += self._deltas(self.engine.step())
                elif not took:
                    self.engine.executor.idle()
                if (busy or took) and not self.dead:
                    self._send(StepOutputs(deltas, self._stats()))
        except Exception as e:  # a dead worker, a bug: the API fails every request, never hangs them
            self.fail(f"engine failed: {type(e).__name__}: {e}", traceback.format_exc())
        self._reported.wait(timeout=REPORT_WAIT_S)  # the monitor thread may still be sending it: let it finish
        return False

    def fail(self, reason: str, detail: str = "") -> None:
        """Tell the API process the engine is dead. Also called from the executor's monitor thread (a dead
        worker rank) while the loop may be blocked in a collective."""
        with self._die_lock:
            if self.dead:
                return
            self.dead = True
        self._inbox.put(None)  # wake an idle loop, which then returns
        try:
            self._send(CoreDead(reason + ("\n" + detail if detail else "")))
        except OSError:  # the API process has gone too
            pass
        finally:
            self._reported.set()

    # ---- messages ---------------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _read(self) -> None:
        try:
            while True:
                self._inbox.put(self.conn.recv())
        except (EOFError, OSError):  # the API process has gone: stop as if told to
            self._inbox.put(Shutdown())

    def _take_inbox(self, block: bool) -> tuple[bool, list[CoreDelta], bool]:
        """Handle every queued message: (took any, deltas they produced, Shutdown received)."""
        deltas: list[CoreDelta] = []
        try:
            msg = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False, deltas, False
        while True:
            if isinstance(msg, Shutdown):
                return True, deltas, True
            if isinstance(msg, AddRequest):
                self._add(msg, deltas)
            elif isinstance(msg, Abort):
                for seq_id in msg.seq_ids:
                    self.engine.abort(seq_id)
                    self._want_prompt_lp.discard(seq_id)
            elif isinstance(msg, AbortAll):
                self._abort_all(deltas)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True, deltas, False

    def _add(self, msg: AddRequest, deltas: list[CoreDelta]) -> None:
        try:
            seqs = self.engine.add_samples(msg.prompt_ids, msg.params, msg.n)
        except ValueError as e:
            self._send(Refused(msg.rid, str(e)))
            return
        self._send(Accepted(msg.rid, tuple(s.seq_id for s in seqs)))
        if msg.params.prompt_logprobs is not None:
            self._want_prompt_lp.update(s.seq_id for s in seqs)
        # nothing to compute (max_tokens=0, no echo): finished already
        deltas += self._deltas([RequestOutput(s, finished=True) for s in seqs if s.is_finished])

    def _abort_all(self, deltas: list[CoreDelta]) -> None:
        seqs = list(self.engine.seqs.values())
        for seq in seqs:
            self.engine.abort(seq.seq_id)
        deltas += self._deltas([RequestOutput(seq, finished=True) for seq in seqs])  # their callers see the end

    def _deltas(self, outputs: list[RequestOutput]) -> list[CoreDelta]:
        return [self._delta(o) for o in outputs]

    def _delta(self, o: RequestOutput) -> CoreDelta:
        prompt_lp = None
        if o.seq_id in self._want_prompt_lp:  # the first delta of a sequence that wants them: scored by now
            self._want_prompt_lp.discard(o.seq_id)
            prompt_lp = o.seq.prompt_logprobs
        return CoreDelta(o.seq_id, o.new_token_ids, o.new_logprobs, o.seq.finish_reason if o.finished else None,
                         prompt_lp)

    def _stats(self) -> EngineStats:
        s = self.engine.scheduler
        return EngineStats(len(s.running), len(s.waiting), s.usage(), s.num_preemptions)
