"""The HTTP server over real sockets with the official `openai` client: completions (streaming and not),
echo + logprobs against the model's own log-softmax, n samples, OpenAI-style errors (internal ones too),
disconnects (streaming or not), metrics, chat."""

from __future__ import annotations

import json
import re
import socket
import time
from collections import defaultdict
from dataclasses import replace

import httpx
import openai
import pytest
import torch

import foe.engine.server
from foe.engine.engine import LLMEngine
from foe.engine.launch import ServerHandle
from foe.engine.request import RequestParams
from foe.engine.scheduler import SchedulerConfig
from foe.tokenizer import byte_level_tokenizer
from tests.conftest import build, tiny
from tests.engine.servers import tiny_server

CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def model():
    return build(tiny("foe"))


@pytest.fixture(scope="module")
def server(model):
    with tiny_server(model, chat_template=CHAT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference_text(model, prompt: str, n: int) -> str:
    tok = byte_level_tokenizer()
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), tok)
    ids = engine.generate([tok.encode(prompt).ids], RequestParams(max_tokens=n))[0]
    return tok.decode(ids)


def test_completion_and_stream_give_the_engines_text(model, client) -> None:
    ref = reference_text(model, "Once upon a time", 12)
    r = client.completions.create(model="tiny-foe", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref and r.usage.prompt_tokens == 16
    assert r.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="tiny-foe", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_batched_token_id_prompts(model, client) -> None:
    r = client.completions.create(model="tiny-foe", prompt=[[72, 105], [79, 107, 33]], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == reference_text(model, "Ok!", 5)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_match_full_forward(model, client, max_tokens: int) -> None:
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny-foe", prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    ids = list(prompt.encode())
    assert r.choices[0].text.startswith(prompt) and len(lp.token_logprobs) == len(prompt) + max_tokens
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = full[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want, atol=1e-5, rtol=1e-5)
    if max_tokens:  # the greedy continuation's logprob is the row's maximum
        assert lp.token_logprobs[-1] == pytest.approx(float(full[-1].max()), abs=1e-5)
    # top_logprobs holds the argmax (logprobs=1) and the scored token: lm-eval's is_greedy check
    for pos, top in enumerate(lp.top_logprobs[1:]):
        assert max(top.values()) == pytest.approx(float(full[pos].max()), abs=1e-5)
    assert lp.text_offset[:3] == [0, 1, 2]


def test_stream_with_echo_and_logprobs_equals_non_stream(client) -> None:
    kw = dict(model="tiny-foe", prompt="abcd", max_tokens=5, echo=True, logprobs=2, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].text.startswith("abcd")
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    for field in ("tokens", "token_logprobs", "text_offset"):
        streamed = [x for c in chunks if c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, field)]
        assert streamed == getattr(whole.choices[0].logprobs, field), field


def post(server, body: bytes | str | dict, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("body,status,param", [
    ('{"prompt": "a", ', 400, None),  # malformed JSON
    ("", 400, None),  # no body
    ("[1, 2]", 400, None),  # not an object
    ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),  # wrong type
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x" * 300}, 400, "prompt"),  # longer than the context (256)
    ({"prompt": "x" * 200, "max_tokens": 100}, 400, "max_tokens"),  # prompt + max_tokens > context
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_k": -2}, 400, "top_k"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "n": 129}, 400, "n"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1, 5000]}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),  # missing field
    (b'{"prompt": "\xff\xfe"}', 400, None),  # not UTF-8
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo (as vLLM)
    ({"prompt": "a", "logit_bias": {"65": 10}}, 400, "logit_bias"),
    ({"prompt": "a", "logit_bias": [1]}, 400, "logit_bias"),
    ({"prompt": "a", "seed": 99999999999999999999999}, 400, "seed"),
    ({"prompt": "a", "seed": 1 << 63}, 400, "seed"),
    ({"prompt": "a", "seed": -(1 << 63) - 1}, 400, "seed"),
])
def test_bad_input_gets_openai_error(server, body, status: int, param: str | None) -> None:
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body,status,param,message", [
    ('{"prompt": "a\\ud800b"}', 400, "prompt", "lone surrogate (U+D800)"),  # JSON allows it; Unicode does not
    ('{"prompt": ["ok", "\\udfff"]}', 400, "prompt", "lone surrogate (U+DFFF)"),
    ('{"prompt": "a", "model": "\\ud800"}', 404, "model", "does not exist"),  # the message quotes it
    ('{"prompt": "a", "temperature": NaN}', 400, "temperature", "finite number"),
    ('{"prompt": "a", "top_p": Infinity}', 400, "top_p", "finite number"),
    ('{"prompt": "a", "presence_penalty": -Infinity}', 400, "presence_penalty", "finite number"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
])
def test_bad_text_numbers_and_unsupported_fields_are_explained(server, body, status: int, param: str,
                                                               message: str) -> None:
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_an_unexpected_error_is_a_500_in_openai_shape(server, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("boom")
    monkeypatch.setattr(foe.engine.server, "usage", boom)
    r = post(server, {"prompt": "a", "max_tokens": 2})
    assert r.status_code == 500 and r.json() == {"error": {"message": "internal server error: RuntimeError: boom",
                                                           "type": "server_error", "param": None, "code": None}}
    # streaming: the headers are out, so the error comes in-band (as OpenAI sends it), not a cut connection
    monkeypatch.setattr(foe.engine.server, "logprobs_block", boom)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": "a", "max_tokens": 2, "logprobs": 1, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert r.status_code == 200 and json.loads(lines[-1][5:])["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert post(server, {"prompt": "a", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("extra", [{"logit_bias": {}}, {"logit_bias": None}, {"seed": (1 << 63) - 1},
                                   {"seed": -(1 << 63)}, {"response_format": {"type": "text"}},
                                   {"response_format": None}])
def test_harmless_values_are_accepted(server, extra: dict) -> None:
    r = post(server, {"prompt": "a", "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


def test_starlette_errors_have_the_openai_shape(server) -> None:
    for r in (httpx.get(server.url + "/v1/nothing"), httpx.get(server.url + "/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_raises_on_bad_request(client) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-foe", prompt="y" * 300, max_tokens=1)


def test_disconnect_mid_stream_frees_blocks(server) -> None:
    sched = server.engine.scheduler
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": "Hello", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                break
        assert sched.running and sched.blocks[0].num_free < sched.blocks[0].num_blocks
    deadline = time.monotonic() + 10
    while (sched.running or sched.blocks[0].num_free != sched.blocks[0].num_blocks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sched.running and sched.blocks[0].num_free == sched.blocks[0].num_blocks
    assert 'request_success_total{finished_reason="abort"}' in httpx.get(server.url + "/metrics").text


def finished(server, reason: str) -> int:
    """The metrics' count of requests finished for `reason`."""
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf'request_success_total{{finished_reason="{reason}"}} (\d+)', text)
    return int(m.group(1)) if m else 0


def wait_until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hello"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_disconnect_aborts_a_non_streaming_request(server, monkeypatch, path: str, body: dict) -> None:
    sched, executor = server.engine.scheduler, server.engine.executor
    execute = executor.execute

    def slow(plan):  # 200 steps take over 2 s: the client leaves long before the end
        time.sleep(0.01)
        return execute(plan)
    monkeypatch.setattr(executor, "execute", slow)
    aborted, length = finished(server, "abort"), finished(server, "length")
    payload = json.dumps({**body, "max_tokens": 200, "ignore_eos": True}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.http.port)) as sock:
        sock.sendall(head.encode() + payload)
        wait_until(lambda: sched.running)
    wait_until(lambda: not sched.running)
    assert sched.blocks[0].num_free == sched.blocks[0].num_blocks
    assert (finished(server, "abort"), finished(server, "length")) == (aborted + 1, length)


def engine_text(model, prompt: str, params: RequestParams) -> tuple[str, str | None, int]:
    """What the engine's own in-process detokeniser makes of a request: (text, finish reason, tokens)."""
    tok = byte_level_tokenizer()
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), tok)
    seq = engine.add_request(tok.encode(prompt).ids, params)
    text = ""
    while engine.has_unfinished:
        text += "".join(o.new_text for o in engine.step())
    return text, seq.finish_reason, len(seq.output_ids)


def test_stop_strings_cut_the_text_in_the_api_process_as_the_engine_did(model, server, client) -> None:
    """The API process finds stop strings (the core sends token ids only) and aborts the sequence in the core,
    which may have run a step further: the response is the engine's in-process one, and nothing keeps running."""
    prompt, params = "Once upon a time", RequestParams(max_tokens=40, ignore_eos=True)
    full = engine_text(model, prompt, params)[0]
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    want, reason, n = engine_text(model, prompt, replace(params, stop=(stop,)))
    assert reason == "stop" and len(want) < len(full)
    kw = dict(model="tiny-foe", prompt=prompt, max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, "stop", n)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    sched = server.engine.scheduler
    wait_until(lambda: not sched.running and sched.blocks[0].num_free == sched.blocks[0].num_blocks)


def test_top_logprobs_keep_the_best_of_tokens_with_the_same_text(client) -> None:
    """Byte-level tokens >= 0x80 all read U+FFFD alone: each text keeps its best logprob, so the greedy
    token's logprob is the maximum of top_logprobs (lm-eval's is_greedy)."""
    r = client.completions.create(model="tiny-foe", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  logprobs=20, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert any(len(top) < 20 for top in lp.top_logprobs)  # texts did collide
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == chosen == max(top.values())


def test_n_samples_of_one_prompt(client) -> None:
    kw = dict(model="tiny-foe", prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kw, n=3, temperature=0)
    one = client.completions.create(**kw, temperature=0).choices[0].text
    assert [c.index for c in greedy.choices] == [0, 1, 2] and [c.text for c in greedy.choices] == [one] * 3
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (16, 24)  # the prompt counts once
    # sampled: sample i is the request seeded with seed + i (as in vLLM)
    sampled = client.completions.create(**kw, n=3, temperature=1, seed=5)
    alone = [client.completions.create(**kw, temperature=1, seed=5 + i).choices[0].text for i in range(3)]
    assert [c.text for c in sampled.choices] == alone and len(set(alone)) == 3
    texts, reasons = defaultdict(str), {}
    chunks = list(client.completions.create(**kw, n=3, temperature=1, seed=5, stream=True,
                                            stream_options={"include_usage": True}))
    for c in (c for chunk in chunks for c in chunk.choices):
        texts[c.index] += c.text
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == alone and reasons == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.model_dump() == sampled.usage.model_dump()
    # several prompts: n choices each, prompt by prompt
    r = client.completions.create(model="tiny-foe", prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.prompt_tokens == 4
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text


def test_models_health_metrics(server, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-foe"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny-foe", prompt="hi", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("foe_time_to_first_token_seconds_count", "foe_inter_token_latency_seconds_bucket",
                 "foe_e2e_request_latency_seconds_sum", "foe_num_requests_running", "foe_num_requests_waiting",
                 "foe_kv_cache_usage_ratio"):
        assert name in text
    count = [ln for ln in text.splitlines() if ln.startswith("foe_time_to_first_token_seconds_count")][0]
    assert float(count.split()[1]) >= 1


def test_chat_completions_with_template(model, client) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny-foe", messages=messages, max_tokens=6, temperature=0)
    prompt = "<user>Hi\n<assistant>"
    assert r.choices[0].message.content == reference_text(model, prompt, 6)
    chunks = list(client.chat.completions.create(model="tiny-foe", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_chat_without_template_is_404(model) -> None:
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=16, block_size=4), byte_level_tokenizer())
    with ServerHandle(engine) as s:
        r = post(s, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
        assert r.status_code == 404 and r.json()["error"]["code"] == "chat_not_supported"
