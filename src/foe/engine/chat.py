"""Chat completions' own pieces: Hugging Face-style chat templates and OpenAI's chat `logprobs` layout.

A template is compiled once, when the server is configured (a syntax error is a ValueError before any
model loads), and rendered per request the way `transformers`' `apply_chat_template` does: a sandboxed
Jinja2 environment with trim_blocks/lstrip_blocks and loop controls, the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools`/`documents` (None), and the helpers
`raise_exception` and `strftime_now`. Undefined variables are errors, not empty strings, so a mistake in a
template is reported instead of silently changing the prompt. A render error is the client's 400.

Not here: the HTTP endpoint itself (server.py) and tool calling.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from foe.engine.protocol import APIError, token_text
from foe.engine.request import TokenLogprob
from foe.tokenizer import EOS_TOKEN

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps chat logprobs to the same floor


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON (as in HF)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template has a syntax error on line {e.lineno}: {e.message}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for these messages, ending with the assistant's turn; APIError 400 when the
        template refuses them (raise_exception) or fails on them."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token, tools=None, documents=None)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None


def read_chat_template(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--chat-template: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template: cannot read {path}: {e}") from None


def _token_string(v: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, null, or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def chat_settings(checkpoint: str | None, template_path: str | None) -> tuple[str | None, str, str | None]:
    """(template source, bos_token, eos_token) for a checkpoint directory: the template from
    --chat-template, else the one in the checkpoint's tokenizer_config.json (as Hugging Face checkpoints
    carry it); bos/eos from that config, else "" and None (None: the tokenizer's, see `default_eos`)."""
    tok_cfg: dict[str, Any] = {}
    path = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if path is not None and path.is_file():
        try:
            tok_cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
    source = read_chat_template(template_path) if template_path else tok_cfg.get("chat_template")
    eos = _token_string(tok_cfg["eos_token"]) if "eos_token" in tok_cfg else None
    return source, _token_string(tok_cfg.get("bos_token")), eos


def default_eos(tok: Tokenizer) -> str:
    """The EOS token's text when the tokenizer has our EOS token, else ""."""
    return EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else ""


def _entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    s = token_text(tok, token_id)
    # bytes of the token's text as vLLM gives them (a token that is part of a UTF-8 character reads U+FFFD)
    return {"token": s, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object for consecutive generated tokens: {"content": [{token, logprob,
    bytes, top_logprobs: the top_n most likely tokens at that position, best first}]}."""
    return {"content": [{**_entry(tok, e.token_id, e.logprob),
                         "top_logprobs": [_entry(tok, i, lp) for i, lp in e.top[:top_n]]} for e in entries]}
