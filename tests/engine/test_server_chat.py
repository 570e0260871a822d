"""/v1/chat/completions over real sockets with the `openai` client: logprobs against the model's own
log-softmax (streaming and not), stream usage, max_completion_tokens, content parts, n samples, and
Hugging Face-style templates (bos_token, eos_token, raise_exception; render errors as OpenAI 400s, syntax
errors at configuration)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from foe.engine.chat import ChatTemplate
from foe.engine.engine import LLMEngine
from foe.engine.launch import ServerHandle
from foe.engine.request import RequestParams
from foe.engine.scheduler import SchedulerConfig
from foe.engine.server import ServerConfig
from foe.tokenizer import EOS_TOKEN, byte_level_tokenizer
from tests.conftest import build, tiny
from tests.engine.servers import tiny_server

# HF-style: bos/eos variables, raise_exception, whitespace control that relies on trim_blocks/lstrip_blocks
TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m.role) }}
    {% endif %}
<{{ m.role }}>{{ m.content }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
# what transformers' apply_chat_template gives (checked in test_template_renders_as_transformers_does)
RENDERED = f"<s>\n<system>Be brief.{EOS_TOKEN}\n<user>Hi{EOS_TOKEN}\n<assistant>"


@pytest.fixture(scope="module")
def model():
    return build(tiny("foe"))


@pytest.fixture(scope="module")
def server(model):
    with tiny_server(model, chat_template=TEMPLATE, bos_token="<s>") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), byte_level_tokenizer())
    return engine.generate([prompt_ids], RequestParams(max_tokens=n, ignore_eos=True))[0]


def test_template_gets_bos_eos_and_hf_whitespace(model, client) -> None:
    tok = byte_level_tokenizer()
    prompt_ids = tok.encode(RENDERED).ids
    r = client.chat.completions.create(model="tiny-foe", messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.choices[0].message.content == tok.decode(greedy_ids(model, prompt_ids, 5))


def test_chat_logprobs_match_the_models_log_softmax(model, client) -> None:
    tok = byte_level_tokenizer()
    prompt_ids = tok.encode(RENDERED).ids
    kw = dict(model="tiny-foe", messages=MESSAGES, max_completion_tokens=6, temperature=0, logprobs=True,
              top_logprobs=3, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    gen = greedy_ids(model, prompt_ids, 6)
    assert len(content) == len(gen) == 6
    with torch.no_grad():
        full = model(torch.tensor([prompt_ids + gen])).logits[0].log_softmax(-1)
    rows = full[len(prompt_ids) - 1:-1]
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]),
                               rows[torch.arange(6), torch.tensor(gen)], atol=1e-5, rtol=1e-5)
    for c, t, row in zip(content, gen, rows):
        assert c.token == tok.decode([t], skip_special_tokens=False) and c.bytes == list(c.token.encode())
        top_vals, top_ids = row.topk(3)
        assert len(c.top_logprobs) == 3
        torch.testing.assert_close(torch.tensor([x.logprob for x in c.top_logprobs]), top_vals, atol=1e-5, rtol=1e-5)
        assert [x.token for x in c.top_logprobs] == [tok.decode([i], skip_special_tokens=False)
                                                    for i in top_ids.tolist()]
    # the completions endpoint scores the same tokens identically
    cr = client.completions.create(model="tiny-foe", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3,
                                   extra_body={"ignore_eos": True})
    assert cr.choices[0].logprobs.token_logprobs == [c.logprob for c in content]

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content


def test_logprobs_without_top_and_off(client) -> None:
    r = client.chat.completions.create(model="tiny-foe", messages=MESSAGES, max_tokens=3, temperature=0,
                                       logprobs=True, extra_body={"ignore_eos": True})
    assert [c.top_logprobs for c in r.choices[0].logprobs.content] == [[], [], []]
    r = client.chat.completions.create(model="tiny-foe", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model="tiny-foe", messages=MESSAGES, max_tokens=3, stream=True))
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)


def test_max_completion_tokens(client) -> None:
    kw = dict(model="tiny-foe", messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw, max_completion_tokens=2, max_tokens=7)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    for field in ("max_completion_tokens", "max_tokens"):
        with pytest.raises(openai.BadRequestError, match="at least 1") as e:
            client.chat.completions.create(**kw, **{field: 0})
        assert e.value.body["param"] == field


def chat_post(server, body: dict) -> httpx.Response:
    # json.dumps escapes to ASCII, so a lone surrogate travels as JSON's "\ud800"
    return httpx.post(server.url + "/v1/chat/completions", content=json.dumps({"model": "tiny-foe", **body}),
                      headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("body,param,message", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "unknown role tool"),  # raise_exception
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"messages": MESSAGES, "logit_bias": {"65": 5.0}}, "logit_bias", "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "only text parts are supported, not 'image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "needs a `text` string"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages", "lone surrogate"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format", "not supported"),
])
def test_chat_bad_input_is_openai_400(server, body: dict, param: str, message: str) -> None:
    r = chat_post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


def test_content_parts_read_as_their_text_joined_by_newlines(server, client) -> None:
    kw = dict(model="tiny-foe", max_completion_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.chat.completions.create(messages=parts, **kw)
    want = client.chat.completions.create(messages=[{"role": "system", "content": "Be\nbrief."}, MESSAGES[1]], **kw)
    assert r.usage.model_dump() == want.usage.model_dump()
    assert r.choices[0].message.content == want.choices[0].message.content
    for extra in ({"tools": []}, {"tools": None}, {"response_format": {"type": "text"}}):  # they ask for nothing
        assert chat_post(server, {"messages": MESSAGES, "max_tokens": 1, **extra}).status_code == 200


def test_chat_n_samples(client) -> None:
    kw = dict(model="tiny-foe", messages=MESSAGES, max_completion_tokens=5, temperature=1, seed=3,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw, n=2)
    alone = [client.chat.completions.create(**{**kw, "seed": 3 + i}).choices[0].message.content for i in range(2)]
    assert [c.index for c in r.choices] == [0, 1] and [c.message.content for c in r.choices] == alone
    prompt_tokens = len(byte_level_tokenizer().encode(RENDERED).ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 10)
    chunks = list(client.chat.completions.create(**kw, n=2, stream=True, stream_options={"include_usage": True}))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    texts = ["", ""]
    for c in (c for ch in chunks[2:] for c in ch.choices):
        texts[c.index] += c.delta.content or ""
    assert texts == alone and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_template_render_error_is_400(model) -> None:
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=16, block_size=4), byte_level_tokenizer())
    cfg = ServerConfig(chat_template="{{ messages[0].content }}{{ undefined_thing }}")
    with ServerHandle(engine, cfg) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 400 and "undefined_thing" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}


def test_template_renders_as_transformers_does() -> None:
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), bos_token="<s>", eos_token=EOS_TOKEN,
                                 chat_template=TEMPLATE)
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    assert ChatTemplate(TEMPLATE, "<s>", EOS_TOKEN).render(MESSAGES) == RENDERED


def test_template_syntax_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="syntax error on line 2"):
        ChatTemplate("{{ bos_token }}\n{% for m in messages %}")
