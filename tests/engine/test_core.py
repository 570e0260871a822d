"""EngineCore over a raw connection, as the API process sees it: Ready first, an Accepted or Refused per
request in order, one StepOutputs per step carrying every running sequence's token ids (the same as
one-at-a-time `generate`), aborts that stop a sequence, a failed step reported as CoreDead, and Shutdown
or the API's EOF ending the loop cleanly. Also the engine's share of the cores."""

from __future__ import annotations

import os
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest

from foe.engine.core import EngineCore
from foe.engine.core_process import engine_threads
from foe.engine.engine import LLMEngine
from foe.engine.ipc import Abort, Accepted, AddRequest, CoreDead, Ready, Refused, Shutdown, StepOutputs
from foe.engine.request import RequestParams
from foe.engine.scheduler import SchedulerConfig
from foe.tokenizer import byte_level_tokenizer
from tests.conftest import build, tiny

PROMPTS = [list(b"Hello"), list(b"The federation")]
PARAMS = RequestParams(max_tokens=6, ignore_eos=True, stop=("never",))


@pytest.fixture(scope="module")
def model():
    return build(tiny("foe"))


def engine(model) -> LLMEngine:
    return LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), byte_level_tokenizer())


def start(model) -> tuple[Connection, threading.Thread, dict[str, bool]]:
    api, core_end = Pipe(duplex=True)
    result: dict[str, bool] = {}
    core = EngineCore(engine(model), core_end)
    thread = threading.Thread(target=lambda: result.setdefault("clean", core.run()), daemon=True)
    thread.start()
    assert isinstance(api.recv(), Ready)
    return api, thread, result


def recv(api: Connection, timeout_s: float = 30.0):  # noqa: ANN201
    assert api.poll(timeout_s), "the core sent nothing"
    return api.recv()


def reply(api: Connection):  # noqa: ANN201
    """The next message that is not a StepOutputs (the core also sends its stats after taking a message)."""
    while isinstance(msg := recv(api), StepOutputs):
        pass
    return msg


def test_one_message_per_step_with_every_sequences_tokens(model) -> None:
    want = engine(model).generate(PROMPTS, PARAMS)
    api, thread, result = start(model)
    for rid, p in enumerate(PROMPTS):
        api.send(AddRequest(rid, p, PARAMS, 1))
    got: dict[int, list[int]] = {}
    accepted: list[Accepted] = []
    steps: list[StepOutputs] = []
    while len(accepted) < 2 or any(len(got.get(s, ())) < 6 for a in accepted for s in a.seq_ids):
        msg = recv(api)
        if isinstance(msg, Accepted):
            accepted.append(msg)
            continue
        assert isinstance(msg, StepOutputs)
        steps.append(msg)
        assert len({d.seq_id for d in msg.deltas}) == len(msg.deltas)  # a step adds one token per sequence
        for d in msg.deltas:
            got.setdefault(d.seq_id, []).extend(d.token_ids)
            assert d.finish_reason in (None, "length")  # stop strings are the API process's
    assert any(len(m.deltas) == 2 for m in steps)  # both decoding: one message holds both
    assert [a.rid for a in accepted] == [0, 1]
    assert [got[a.seq_ids[0]] for a in accepted] == want
    api.send(Shutdown())
    thread.join(timeout=10)
    assert result == {"clean": True}


def test_refusal_abort_and_eof(model) -> None:
    api, thread, result = start(model)
    api.send(AddRequest(0, [1] * 300, PARAMS, 1))  # longer than the context
    refused = reply(api)
    assert isinstance(refused, Refused) and refused.rid == 0 and "context" in refused.message
    api.send(AddRequest(1, PROMPTS[0], RequestParams(max_tokens=200, ignore_eos=True), 2))
    accepted = reply(api)
    assert isinstance(accepted, Accepted) and len(accepted.seq_ids) == 2
    api.send(Abort(accepted.seq_ids))
    while True:  # after the abort is taken, the core goes idle: no more deltas
        msg = recv(api)
        if isinstance(msg, StepOutputs) and msg.stats.running == 0 and msg.stats.waiting == 0:
            break
    assert not api.poll(0.3)
    api.close()  # the API process went away
    thread.join(timeout=10)
    assert result == {"clean": True}


def test_a_failed_step_is_reported_as_core_dead(model) -> None:
    api, core_end = Pipe(duplex=True)
    e = engine(model)

    def boom(plan):  # noqa: ANN001, ANN202
        raise RuntimeError("boom")
    e.executor.execute = boom
    core = EngineCore(e, core_end)
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    assert isinstance(recv(api), Ready)
    api.send(AddRequest(0, PROMPTS[0], PARAMS, 1))
    assert isinstance(reply(api), Accepted)
    dead = reply(api)
    assert isinstance(dead, CoreDead) and dead.reason.startswith("engine failed: RuntimeError: boom")
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_engine_threads_leave_a_core_to_the_api_process(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [engine_threads(n) for n in (1, 2, 7, 8)] == [7, 3, 1, 1]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert engine_threads(1) == 1  # the other core is the API process's
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as torchrun sets it: taken as given
    assert engine_threads(1) == 2
