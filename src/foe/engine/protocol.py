"""The OpenAI wire format: request models (validated strictly: a wrong type is an error, not a coercion),
conversion to engine `RequestParams`, the legacy completions `logprobs` block, and error bodies.

Unknown fields are ignored (clients send many optional ones); fields we know but do not implement
(best_of, penalties, suffix, logit_bias, response_format, tools, non-text content parts) are refused
with a clear message rather than silently ignored. Floats must be finite (JSON bodies may carry NaN).
The chat `logprobs` layout lives in `chat.py`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from foe.engine.request import RequestParams, TokenLogprob
from foe.engine.sampler import SamplingParams


class APIError(Exception):
    """An error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Strict(BaseModel):
    # no coercion; NaN/inf (Python's json accepts them) are refused as such, not as out of range
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM convention: -1 or 0 = off
    # torch.Generator.manual_seed takes a 64-bit integer; vLLM accepts exactly torch.long's range
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)  # samples per prompt (OpenAI's limit)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(f"{name} is not supported (use 0)", param=name)
        if self.logit_bias:  # {} and null change nothing, so they are accepted
            raise APIError("logit_bias is not supported", param="logit_bias")
        if self.response_format not in (None, {"type": "text"}):  # "text" is the default: nothing to do
            raise APIError("response_format is not supported (no structured output); omit it or use "
                           '{"type": "text"}', param="response_format")

    def request_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> RequestParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stop):
            raise APIError("stop strings must be non-empty", param="stop")
        sampling = SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                                  top_p=1.0 if self.top_p is None else self.top_p,
                                  top_k=max(self.top_k or 0, 0), seed=self.seed)
        return RequestParams(sampling, max_tokens, stop, tuple(self.stop_token_ids or ()), self.ignore_eos,
                             logprobs, prompt_logprobs)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise APIError("best_of is not supported", param="best_of")
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.max_tokens == 0 and not self.echo:  # as vLLM: generating nothing only makes sense to score
            raise APIError("max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                           param="max_tokens")


class ContentPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: str
    content: str | list[ContentPart]

    def text(self, i: int) -> str:
        """The content as one string: text parts joined by newlines (as vLLM joins them); any other part
        (an image, audio, a file) is a 400, since the model reads text only. i: the message's index."""
        if isinstance(self.content, str):
            return self.content
        for p in self.content:
            if p.type != "text":
                raise APIError(f"messages[{i}].content: only text parts are supported, not {p.type!r}",
                               param="messages")
            if p.text is None:
                raise APIError(f"messages[{i}].content: a text part needs a `text` string", param="messages")
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None  # the deprecated form of tools

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:  # as OpenAI and vLLM
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        for name in ("tools", "functions"):  # [] and null ask for nothing, so they are accepted
            if getattr(self, name):
                raise APIError(f"{name} (function calling) is not supported", param=name)

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template sees them: role and content strings."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def generation_limit(self) -> tuple[int | None, str]:
        """The requested number of tokens to generate and the field it came from. max_completion_tokens
        wins over the deprecated max_tokens; 0 is refused, since a chat completion has nothing to echo."""
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        n = getattr(self, name)
        if n == 0:
            raise APIError(f"{name} must be at least 1, got 0", param=name)
        return n, name


def usage(n_prompt: int, n_generated: int) -> dict[str, int]:
    """The `usage` object of every response."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def logprobs_block(tok: Tokenizer, entries: list[TokenLogprob | None], token_ids: list[int],
                   offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object for consecutive tokens (entries[i] None: no score,
    as for the first prompt token). offset: character offset of the first token in the text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, e in zip(token_ids, entries):
        s = token_text(tok, t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_lps.append(None if e is None else e.logprob)
        if e is None:
            tops.append(None)
        else:
            top: dict[str, float] = {}
            # The scored token is always listed (as vLLM does). Tokens with the same text share a key:
            # the best one counts, so a greedy token's logprob is the maximum (lm-eval's is_greedy).
            for i, lp in (*e.top, (t, e.logprob)):
                key = token_text(tok, i)
                top[key] = max(lp, top.get(key, lp))
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
