"""OpenAI-compatible HTTP server over an `AsyncEngine`: /v1/completions (SSE streaming, logprobs, echo),
/v1/chat/completions (only when a chat template is configured; logprobs, streaming), /v1/models,
/health, /metrics.

Text in, text out with the checkpoint's tokenizer; prompts may also be token ids (as lm-eval's
local-completions sends them). Every error is an OpenAI-style body with a 4xx/5xx status. A dead engine
answers 503. The HTTP layer knows nothing of scheduling or of how many processes run the model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from foe.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from foe.engine.chat import ChatTemplate, chat_logprobs, default_eos
from foe.engine.engine import RequestOutput
from foe.engine.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body,
                                 logprobs_block, usage)
from foe.engine.request import RequestParams


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "foe"
    host: str = "127.0.0.1"
    port: int = 8000
    chat_template: str | None = None  # a Hugging Face-style Jinja2 chat template (see chat.py)
    bos_token: str = ""  # what the template's {{ bos_token }} / {{ eos_token }} print;
    eos_token: str | None = None  # None: the tokenizer's EOS token if it has one, else ""


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, cfg: ServerConfig) -> FastAPI:
    """The app; ValueError for a chat template that does not compile."""
    app = FastAPI(title="foe", docs_url=None, redoc_url=None)
    max_len = engine.engine.max_seq_len
    chat = None
    if cfg.chat_template is not None:
        chat = ChatTemplate(cfg.chat_template, cfg.bos_token,
                            default_eos(tokenizer) if cfg.eos_token is None else cfg.eos_token)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        # Starlette's own errors (a body that is not UTF-8, an unknown path, a wrong method) in OpenAI's shape
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            loc = []
        elif not loc:  # the body as a whole: missing, not an object, or not sent as JSON
            msg = (f"the request body must be a JSON object (Content-Type: application/json): "
                   f"{first.get('msg', 'invalid')}")
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in er['loc'] if x != 'body')}: {er['msg']}" for er in errs)
        # param names the request field (pydantic adds union-member tags after it: "prompt.str")
        return JSONResponse(error_body(msg, param=loc[0] if loc else None), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.dead:
            return JSONResponse(error_body(engine.dead, "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "foe", "max_model_len": max_len}]}

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.model_name:
            raise APIError(f"the model `{name}` does not exist; this server serves `{cfg.model_name}`",
                           status=404, param="model", code="model_not_found")

    def encode_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("prompt is empty", param="prompt")
        ids = [tokenizer.encode(p).ids if isinstance(p, str) else list(p) for p in prompts]
        vocab = engine.engine.vocab_size
        for p in ids:
            if not p:
                raise APIError("prompt is empty", param="prompt")
            if len(p) > max_len:
                raise APIError(f"the prompt has {len(p)} tokens; the model's context is {max_len} tokens",
                               param="prompt", code="context_length_exceeded")
            if any(not 0 <= t < vocab for t in p):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def params_for(req: CompletionRequest | ChatCompletionRequest, n_prompt: int, max_tokens: int | None,
                   logprobs: int | None, prompt_logprobs: int | None, limit_name: str = "max_tokens"
                   ) -> RequestParams:
        if max_tokens is None:
            max_tokens = max_len - n_prompt
            if max_tokens < 1 and prompt_logprobs is None:  # a full-context prompt leaves nothing to generate
                raise APIError(f"the prompt has {n_prompt} tokens and fills the model's context ({max_len})",
                               param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                               code="context_length_exceeded")
        if n_prompt + max_tokens > max_len:
            raise APIError(f"the model's context is {max_len} tokens, but {n_prompt + max_tokens} were "
                           f"requested ({n_prompt} in the prompt, {max_tokens} to generate)",
                           param=limit_name, code="context_length_exceeded")
        try:
            return req.request_params(max_tokens, logprobs, prompt_logprobs)
        except ValueError as e:
            raise APIError(str(e)) from None

    async def start(prompt_ids: list[int], params: RequestParams) -> RequestStream:
        """Submit and wait for acceptance, so a refused request fails before any streaming starts."""
        try:
            return await engine.submit(prompt_ids, params)
        except ValueError as e:
            raise APIError(str(e)) from None
        except EngineDeadError as e:
            raise APIError(str(e), status=503, type="server_error") from None

    async def start_all(prompts: list[list[int]], plist: list[RequestParams]) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for p, params in zip(prompts, plist):
                streams.append(await start(p, params))
        except BaseException:
            for st in streams:
                await st.aclose()
            raise
        return streams

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model)
        req.check_supported()
        prompts = encode_prompts(req.prompt)
        plist = [params_for(req, len(p), req.max_tokens, req.logprobs, req.logprobs if req.echo else None)
                 for p in prompts]
        streams = await start_all(prompts, plist)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
        if req.stream:
            return sse(stream_completions(head, prompts, streams, req))
        return await collect_completions(head, prompts, streams, req)

    def prompt_part(prompt: list[int], out: RequestOutput, req: CompletionRequest) -> tuple[str, dict | None]:
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        lp = None
        if req.logprobs is not None:
            lp = logprobs_block(tokenizer, out.seq.prompt_logprobs, prompt)
        return text, lp

    def gen_logprobs(out: RequestOutput, offset: int) -> dict | None:
        if not out.new_logprobs:
            return None
        return logprobs_block(tokenizer, out.new_logprobs, out.new_token_ids, offset)

    async def collect_completions(head: dict, prompts: list[list[int]], streams: list, req: CompletionRequest
                                  ) -> dict[str, Any]:
        async def one(i: int) -> tuple[dict[str, Any], int]:
            text, lps, last = "", [], None
            ids: list[int] = []
            async for o in streams[i]:  # noqa: B007 (last is used below)
                text += o.new_text
                ids += o.new_token_ids
                lps += o.new_logprobs
                last = o
            choice: dict[str, Any] = {"index": i, "text": text, "logprobs": None,
                                      "finish_reason": last.seq.finish_reason}
            if req.logprobs is not None:
                choice["logprobs"] = logprobs_block(tokenizer, lps, ids)
            if req.echo:
                ptext, plp = prompt_part(prompts[i], last, req)
                choice["text"] = ptext + text
                if plp is not None:
                    gen = choice["logprobs"]
                    shifted = [x + len(ptext) for x in gen["text_offset"]]
                    choice["logprobs"] = {k: plp[k] + (shifted if k == "text_offset" else gen[k]) for k in plp}
            return choice, len(ids)
        try:
            results = await asyncio.gather(*(one(i) for i in range(len(streams))))
        except EngineDeadError as e:
            raise APIError(str(e), status=503, type="server_error") from None
        finally:
            for st in streams:
                await st.aclose()
        n_prompt, n_gen = sum(map(len, prompts)), sum(n for _, n in results)
        return {**head, "choices": [c for c, _ in results],
                "usage": usage(n_prompt, n_gen)}

    async def stream_completions(head: dict, prompts: list[list[int]], streams: list, req: CompletionRequest
                                 ) -> AsyncIterator[dict[str, Any]]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for o in streams[i]:
                    await merged.put((i, o))
            except Exception as e:  # noqa: BLE001 (forwarded to the consumer)
                await merged.put((i, e))
            finally:
                await merged.put((i, None))
        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        n_gen, live, offsets = 0, len(streams), [0] * len(streams)
        first = [True] * len(streams)
        try:
            while live:
                i, o = await merged.get()
                if o is None:
                    live -= 1
                    continue
                if isinstance(o, BaseException):
                    raise o
                text, lp = o.new_text, None
                if first[i] and req.echo:
                    ptext, plp = prompt_part(prompts[i], o, req)
                    text, lp, offsets[i] = ptext + text, plp, len(ptext)
                first[i] = False
                glp = gen_logprobs(o, offsets[i])  # offsets[i]: where this delta's text starts
                if glp is not None:
                    lp = glp if lp is None else {k: lp[k] + glp[k] for k in lp}
                    # offsets follow the tokens' own strings, as in the non-streaming response
                    offsets[i] = glp["text_offset"][-1] + len(glp["tokens"][-1])
                else:
                    offsets[i] += len(o.new_text)
                n_gen += len(o.new_token_ids)
                # An event per step with new tokens, even when their text is empty (incomplete UTF-8, ids
                # outside the tokenizer), as vLLM does: streaming clients time tokens by events.
                if not text and lp is None and not o.finished and not o.new_token_ids:
                    continue
                yield {**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                            "finish_reason": o.seq.finish_reason if o.finished else None}]}
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage(sum(map(len, prompts)), n_gen)}
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        if chat is None:
            raise APIError("this server has no chat template; start it with --chat-template FILE",
                           status=404, code="chat_not_supported")
        check_model(req.model)
        req.check_supported()
        max_tokens, limit_name = req.generation_limit()
        (ids,) = encode_prompts(chat.render([m.model_dump() for m in req.messages]))
        top = (req.top_logprobs or 0) if req.logprobs else None
        stream = await start(ids, params_for(req, len(ids), max_tokens, top, None, limit_name))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name}

        def lp(entries: list) -> dict[str, Any] | None:
            return chat_logprobs(tokenizer, entries, top) if top is not None else None
        if req.stream:
            return sse(stream_chat({**head, "object": "chat.completion.chunk"}, stream, lp,
                                   len(ids) if req.include_usage else None))
        text, n, lps, last = "", 0, [], None
        try:
            async for o in stream:
                text, n, last = text + o.new_text, n + len(o.new_token_ids), o
                lps += o.new_logprobs
        except EngineDeadError as e:
            raise APIError(str(e), status=503, type="server_error") from None
        finally:
            await stream.aclose()
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": lp(lps), "finish_reason": last.seq.finish_reason}],
                "usage": usage(len(ids), n)}

    async def stream_chat(head: dict, stream: RequestStream, lp: Any, usage_prompt_tokens: int | None
                          ) -> AsyncIterator[dict[str, Any]]:
        """Chunks as OpenAI sends them: the role first, then one per step with new tokens (content delta
        and their logprobs), the finish_reason on the last, then the usage chunk when usage_prompt_tokens is given (stream_options.include_usage)."""
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
        n = 0
        try:
            async for o in stream:
                n += len(o.new_token_ids)
                yield {**head, "choices": [{"index": 0, "delta": {"content": o.new_text} if o.new_text else {},
                                            "logprobs": lp(o.new_logprobs) if o.new_logprobs else None,
                                            "finish_reason": o.seq.finish_reason if o.finished else None}]}
        finally:
            await stream.aclose()
        if usage_prompt_tokens is not None:
            yield {**head, "choices": [], "usage": usage(usage_prompt_tokens, n)}

    def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
                yield "data: [DONE]\n\n"
            except EngineDeadError as e:  # headers are sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            finally:  # also on client disconnect (cancellation): aborts unfinished requests
                await chunks.aclose()
        return StreamingResponse(body(), media_type="text/event-stream")

    return app
