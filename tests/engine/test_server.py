"""The HTTP server over real sockets with the official `openai` client: completions (streaming and not),
echo + logprobs against the model's own log-softmax, OpenAI-style errors, disconnects, metrics, chat."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

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
    ({"prompt": "a", "n": 2}, 400, "n"),
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


@pytest.mark.parametrize("extra", [{"logit_bias": {}}, {"logit_bias": None}, {"seed": (1 << 63) - 1},
                                   {"seed": -(1 << 63)}])
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
