"""The load generator: arrival process statistics (fixed seeds), and the streaming client timed
against a scripted SSE server whose token times are known, plus failures that must be counted.

`ScriptedServer` is a tiny OpenAI-style completions server run in a thread of the test process, so
its clock (time.perf_counter) is the client's: it emits the first token after `ttft_s` and the rest
every `itl_s`, and records when each request arrived and each event was sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from foe.bench.datasets import SampleRequest
from foe.bench.load_gen import RequestOutput, arrival_offsets, completion_payload, send_all, stream_completion
from foe.engine.launch import AppThread


# ---- arrival process ----------------------------------------------------------------------------
def _ks_exponential(gaps: np.ndarray, rate: float) -> float:
    """Kolmogorov-Smirnov distance between the gaps' empirical CDF and Exp(rate)."""
    x = np.sort(gaps)
    cdf = 1 - np.exp(-rate * x)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


@pytest.mark.parametrize("rate", [0.5, 4.0])
def test_poisson_arrivals_have_the_requested_rate(rate: float) -> None:
    n = 20_000
    t = arrival_offsets(n, rate, burstiness=1.0, seed=3)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert t[-1] == pytest.approx(n / rate)  # vLLM's rescaling: the last request at n / rate
    assert gaps.mean() == pytest.approx(1 / rate, rel=1e-9)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: CV = 1
    assert _ks_exponential(gaps, rate) < 1.36 / math.sqrt(n)  # KS test at the 5 % level
    # Counts per unit window of a Poisson process: variance = mean = rate.
    counts = np.bincount(np.floor(t * rate / 10).astype(int))[:-1]  # windows of 10 expected arrivals
    assert counts.mean() == pytest.approx(10, rel=0.02)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_burstiness_is_the_gamma_shape() -> None:
    for shape in (0.25, 4.0):
        gaps = np.diff(arrival_offsets(20_000, 2.0, burstiness=shape, seed=1), prepend=0.0)
        assert gaps.mean() == pytest.approx(0.5)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.05)  # gamma CV = 1/sqrt(k)
    assert np.allclose(np.diff(arrival_offsets(5, 2.0, burstiness=math.inf), prepend=0.0), 0.5)
    assert np.array_equal(arrival_offsets(7, math.inf), np.zeros(7))


def test_arrivals_are_seeded_and_validated() -> None:
    assert np.array_equal(arrival_offsets(50, 1.0, seed=9), arrival_offsets(50, 1.0, seed=9))
    assert not np.array_equal(arrival_offsets(50, 1.0, seed=9), arrival_offsets(50, 1.0, seed=10))
    for bad in (dict(n=0, request_rate=1.0), dict(n=3, request_rate=0.0), dict(n=3, request_rate=1.0, burstiness=0.0)):
        with pytest.raises(ValueError):
            arrival_offsets(**bad)


# ---- a scripted server --------------------------------------------------------------------------
class ScriptedServer:
    """Prompt "http-error" -> 503; "no-tokens" -> a stream with no token; else `max_tokens` events."""

    def __init__(self, ttft_s: float = 0.05, itl_s: float = 0.02, send_usage: bool = True) -> None:
        self.ttft_s, self.itl_s, self.send_usage = ttft_s, itl_s, send_usage
        self.arrivals: list[float] = []
        self.sent: dict[int, list[float]] = {}  # request number -> event send times
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):  # noqa: ANN202
            body = await request.json()
            i = len(self.arrivals)
            self.arrivals.append(time.perf_counter())
            if body["prompt"] == "http-error":
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            n = 0 if body["prompt"] == "no-tokens" else body["max_tokens"]
            return StreamingResponse(self._events(i, n, body.get("model")), media_type="text/event-stream")

        self._http = AppThread(app)

    async def _events(self, i: int, n: int, model: str):  # noqa: ANN202
        self.sent[i] = []
        for k in range(n):
            await asyncio.sleep(self.ttft_s if k == 0 else self.itl_s)
            self.sent[i].append(time.perf_counter())
            yield "data: " + json.dumps({"model": model, "choices": [{"index": 0, "text": "ab",
                                         "finish_reason": "length" if k == n - 1 else None}]}) + "\n\n"
        if self.send_usage:
            yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}}) + "\n\n"
        yield "data: [DONE]\n\n"

    @property
    def url(self) -> str:
        return self._http.url

    def __enter__(self) -> "ScriptedServer":
        self._http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.stop()


def _req(prompt: str = "hello", out: int = 5) -> SampleRequest:
    return SampleRequest(prompt, len(prompt), out)


async def _one(url: str, req: SampleRequest) -> RequestOutput:
    async with httpx.AsyncClient(timeout=10) as client:
        out = RequestOutput(req.prompt_len, req.expected_output_len)
        return await stream_completion(client, url + "/v1/completions", completion_payload("m", req, True), out)


def test_stream_timings_match_the_servers_send_times() -> None:
    with ScriptedServer(ttft_s=0.1, itl_s=0.05) as srv:
        out = asyncio.run(_one(srv.url, _req(out=6)))
    assert out.success, out.error
    sent = srv.sent[0]
    assert len(out.itl) == 5 and out.output_tokens == 6 and out.prompt_len == 7 and out.generated_text == "ab" * 6
    # Each client-side time is the server's send time plus a small delivery delay (loose bounds: the
    # CPU is shared; a client that timed anything else, e.g. the [DONE] event, is off by >= 50 ms).
    assert 0 <= out.start_time + out.ttft - sent[0] < 0.04
    assert 0.1 <= out.ttft < 0.1 + 0.06
    for k, gap in enumerate(out.itl):
        assert gap == pytest.approx(sent[k + 1] - sent[k], abs=0.03)
    assert out.latency == pytest.approx(out.ttft + sum(out.itl))
    assert 0 <= out.start_time + out.latency - sent[-1] < 0.04


def test_failures_are_recorded_not_raised() -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = asyncio.run(_one(dead, _req()))
    assert not out.success and "ConnectError" in out.error
    with ScriptedServer() as srv:
        http_err = asyncio.run(_one(srv.url, _req("http-error")))
        empty = asyncio.run(_one(srv.url, _req("no-tokens")))
    assert not http_err.success and http_err.error.startswith("HTTP 503")
    assert not empty.success and "without a token" in empty.error


def test_send_all_follows_the_schedule_and_counts_failures() -> None:
    reqs = [_req("http-error" if i % 4 == 3 else f"p{i}", out=3) for i in range(12)]
    offsets = arrival_offsets(len(reqs), request_rate=10.0, seed=5)
    with ScriptedServer(ttft_s=0.01, itl_s=0.01, send_usage=False) as srv:
        async def go() -> list[RequestOutput]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await send_all(client, srv.url + "/v1/completions", "m", reqs, offsets)
        outs = asyncio.run(go())
    assert [o.success for o in outs] == [i % 4 != 3 for i in range(12)]
    starts = np.array([o.start_time for o in outs])
    # Sent on schedule (relative to the first send; mean gap 100 ms), within scheduler jitter.
    assert np.abs((starts - starts[0]) - (offsets - offsets[0])).max() < 0.04
    assert sorted(srv.arrivals) == pytest.approx(sorted(starts), abs=0.04)


def test_max_concurrency_caps_requests_in_flight() -> None:
    reqs = [_req(out=4) for _ in range(6)]
    with ScriptedServer(ttft_s=0.03, itl_s=0.03) as srv:
        async def go() -> list[RequestOutput]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await send_all(client, srv.url + "/v1/completions", "m", reqs, np.zeros(6), max_concurrency=2)
        outs = asyncio.run(go())
    spans = [(o.start_time, o.start_time + o.latency) for o in outs]
    for t, _ in spans:
        assert sum(s <= t < e for s, e in spans) <= 2
    assert sorted(o.queue_time > 0.05 for o in outs).count(True) == 4  # four waited for a slot
