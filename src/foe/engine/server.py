"""OpenAI-compatible HTTP server over an `AsyncEngine`: /v1/completions (SSE streaming, logprobs, echo, n),
/v1/chat/completions (only when a chat template is configured; logprobs, streaming, n), /v1/models,
/health, /metrics.

Text in, text out with the checkpoint's tokenizer; prompts may also be token ids (as lm-eval's
local-completions sends them). Every error is an OpenAI-style body with a 4xx/5xx status, an unexpected
exception included (500). A dead engine answers 503. A client that disconnects aborts its requests,
streaming or not (as vLLM does), which frees their KV blocks. `DrainGate` counts the requests in flight
and, once closed for a graceful shutdown, answers new ones 503. The HTTP layer knows nothing of
scheduling or of how many processes run the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from tokenizers import Tokenizer

from foe.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from foe.engine.chat import ChatTemplate, chat_logprobs, default_eos
from foe.engine.output import RequestDelta
from foe.engine.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body,
                                 logprobs_block, usage)
from foe.engine.request import RequestParams, TokenLogprob

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "foe"
    host: str = "127.0.0.1"
    port: int = 8000
    chat_template: str | None = None  # a Hugging Face-style Jinja2 chat template (see chat.py)
    bos_token: str = ""  # what the template's {{ bos_token }} / {{ eos_token }} print;
    eos_token: str | None = None  # None: the tokenizer's EOS token if it has one, else ""


class ErrorResponse(JSONResponse):
    """An error body, ASCII-escaped: a message quoting the request (a model name) may hold a lone
    surrogate, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode("ascii")


def internal_error(e: BaseException) -> dict[str, Any]:
    return error_body(f"internal server error: {type(e).__name__}: {e}", "server_error")


class DrainGate:
    """ASGI wrapper that counts the HTTP requests in flight (a streamed one until its last chunk). Once
    closed, for a graceful shutdown, it answers new requests 503 while those in flight finish."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.in_flight, self.closed = app, 0, False

    def close(self) -> None:
        self.closed = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif self.closed:
            refusal = ErrorResponse(error_body("the server is shutting down", "server_error"), status_code=503,
                                    headers={"connection": "close"})
            await refusal(scope, receive, send)
        else:
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1


async def _disconnect(request: Request) -> None:
    """Returns once the client is gone. The body is read already, so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """Run a handler, cancelling it if its client disconnects first (as vLLM's with_cancellation): its
    engine requests are then aborted instead of running to the end for nobody."""
    task = asyncio.create_task(work)
    watch = asyncio.create_task(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its clean-up (the aborts) runs before we return
    return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed request"


@dataclass
class Result:
    """The whole output of one choice (non-streaming)."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: RequestDelta | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last else None


async def close_all(streams: list[RequestStream]) -> None:
    """Abort whichever of the requests have not finished."""
    for s in streams:
        await s.aclose()


async def collect(stream: RequestStream) -> Result:
    r = Result()
    async for o in stream:
        r.ids += o.new_token_ids
        r.text += o.new_text
        r.logprobs += o.new_logprobs
        r.last = o
    return r


async def collect_all(streams: list[RequestStream]) -> list[Result]:
    try:
        return list(await asyncio.gather(*(collect(s) for s in streams)))
    except EngineDeadError as e:
        raise APIError(str(e), status=503, type="server_error") from None
    finally:
        await close_all(streams)


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """The deltas of several requests as they come, each with its request's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for o in streams[i]:
                await queue.put((i, o))
        except Exception as e:  # noqa: BLE001 (forwarded to the consumer)
            await queue.put((i, e))
        finally:
            await queue.put((i, None))
    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    live = len(streams)
    try:
        while live:
            i, o = await queue.get()
            if o is None:
                live -= 1
            elif isinstance(o, BaseException):
                raise o
            else:
                yield i, o
    finally:
        for t in tasks:
            t.cancel()


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, cfg: ServerConfig) -> FastAPI:
    """The app; ValueError for a chat template that does not compile."""
    app = FastAPI(title="foe", docs_url=None, redoc_url=None)
    max_len = engine.max_seq_len
    chat = None
    if cfg.chat_template is not None:
        chat = ChatTemplate(cfg.chat_template, cfg.bos_token,
                            default_eos(tokenizer) if cfg.eos_token is None else cfg.eos_token)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return ErrorResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        # Starlette's own errors (a body that is not UTF-8, an unknown path, a wrong method) in OpenAI's shape
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return ErrorResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

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
        return ErrorResponse(error_body(msg, param=loc[0] if loc else None), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        # A bug, still in OpenAI's shape. Starlette re-raises it afterwards, so uvicorn logs the traceback.
        return ErrorResponse(internal_error(e), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.dead:
            return ErrorResponse(error_body(engine.dead, "server_error"), status_code=503)
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

    def encode_text(text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry "\ud800"; the tokenizer takes only valid Unicode
            raise APIError(f"{param}: not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X})",
                           param=param) from None
        return tokenizer.encode(text).ids

    def encode_prompts(prompt: Any, param: str = "prompt") -> list[list[int]]:
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("prompt is empty", param=param)
        ids = [encode_text(p, param) if isinstance(p, str) else list(p) for p in prompts]
        vocab = engine.vocab_size
        for p in ids:
            if not p:
                raise APIError("prompt is empty", param=param)
            if len(p) > max_len:
                raise APIError(f"the prompt has {len(p)} tokens; the model's context is {max_len} tokens",
                               param=param, code="context_length_exceeded")
            if any(not 0 <= t < vocab for t in p):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param=param)
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

    async def start(prompt_ids: list[int], params: RequestParams, n: int) -> list[RequestStream]:
        """Submit n samples and wait for acceptance, so a refused request fails before any streaming starts."""
        try:
            return await engine.submit(prompt_ids, params, n)
        except ValueError as e:
            raise APIError(str(e)) from None
        except EngineDeadError as e:
            raise APIError(str(e), status=503, type="server_error") from None

    async def start_all(prompts: list[list[int]], plist: list[RequestParams], n: int) -> list[RequestStream]:
        """Streams of every choice: prompt by prompt, n samples each (choice index = prompt * n + sample)."""
        streams: list[RequestStream] = []
        try:
            for p, params in zip(prompts, plist):
                streams += await start(p, params, n)
        except BaseException:
            await close_all(streams)
            raise
        return streams

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await cancel_on_disconnect(raw, complete(req))

    async def complete(req: CompletionRequest) -> Any:
        check_model(req.model)
        req.check_supported()
        prompts = encode_prompts(req.prompt)
        plist = [params_for(req, len(p), req.max_tokens, req.logprobs, req.logprobs if req.echo else None)
                 for p in prompts]
        streams = await start_all(prompts, plist, req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
        choice_prompts = [p for p in prompts for _ in range(req.n)]
        n_prompt = sum(map(len, prompts))  # usage counts each prompt once, however many samples
        if req.stream:
            return sse(stream_completions(head, choice_prompts, streams, req, n_prompt))
        results = await collect_all(streams)
        return {**head, "choices": [completion_choice(i, p, r, req)
                                    for i, (p, r) in enumerate(zip(choice_prompts, results))],
                "usage": usage(n_prompt, sum(len(r.ids) for r in results))}

    def prompt_part(prompt: list[int], out: RequestDelta, req: CompletionRequest) -> tuple[str, dict | None]:
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        lp = None
        if req.logprobs is not None:
            lp = logprobs_block(tokenizer, out.prompt_logprobs, prompt)
        return text, lp

    def gen_logprobs(out: RequestDelta, offset: int) -> dict | None:
        if not out.new_logprobs:
            return None
        return logprobs_block(tokenizer, out.new_logprobs, out.new_token_ids, offset)

    def completion_choice(i: int, prompt: list[int], r: Result, req: CompletionRequest) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        if req.logprobs is not None:
            choice["logprobs"] = logprobs_block(tokenizer, r.logprobs, r.ids)
        if req.echo:
            ptext, plp = prompt_part(prompt, r.last, req)
            choice["text"] = ptext + r.text
            if plp is not None:
                gen = choice["logprobs"]
                shifted = [x + len(ptext) for x in gen["text_offset"]]
                choice["logprobs"] = {k: plp[k] + (shifted if k == "text_offset" else gen[k]) for k in plp}
        return choice

    async def stream_completions(head: dict, prompts: list[list[int]], streams: list[RequestStream],
                                 req: CompletionRequest, n_prompt: int) -> AsyncIterator[dict[str, Any]]:
        n_gen, offsets = 0, [0] * len(streams)
        first = [True] * len(streams)
        try:
            async with contextlib.aclosing(merged(streams)) as deltas:
                async for i, o in deltas:
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
                                                "finish_reason": o.finish_reason if o.finished else None}]}
        finally:
            await close_all(streams)
        if req.include_usage:
            yield {**head, "choices": [], "usage": usage(n_prompt, n_gen)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return await cancel_on_disconnect(raw, complete_chat(req))

    async def complete_chat(req: ChatCompletionRequest) -> Any:
        if chat is None:
            raise APIError("this server has no chat template; start it with --chat-template FILE",
                           status=404, code="chat_not_supported")
        check_model(req.model)
        req.check_supported()
        max_tokens, limit_name = req.generation_limit()
        (ids,) = encode_prompts(chat.render(req.template_messages()), "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        streams = await start(ids, params_for(req, len(ids), max_tokens, top, None, limit_name), req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name}

        def lp(entries: list[TokenLogprob]) -> dict[str, Any] | None:
            return chat_logprobs(tokenizer, entries, top) if top is not None else None
        if req.stream:
            return sse(stream_chat({**head, "object": "chat.completion.chunk"}, streams, lp,
                                   len(ids) if req.include_usage else None))
        results = await collect_all(streams)
        return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                                     "logprobs": lp(r.logprobs), "finish_reason": r.finish_reason}
                                    for i, r in enumerate(results)],
                "usage": usage(len(ids), sum(len(r.ids) for r in results))}

    async def stream_chat(head: dict, streams: list[RequestStream], lp: Callable[[list[TokenLogprob]], Any],
                          usage_prompt_tokens: int | None) -> AsyncIterator[dict[str, Any]]:
        """Chunks as OpenAI sends them: each choice's role first, then one per step with new tokens (content
        delta and their logprobs), the finish_reason on a choice's last, then the usage chunk when
        usage_prompt_tokens is given (stream_options.include_usage)."""
        n = 0
        try:
            for i in range(len(streams)):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            async with contextlib.aclosing(merged(streams)) as deltas:
                async for i, o in deltas:
                    n += len(o.new_token_ids)
                    yield {**head, "choices": [{"index": i, "delta": {"content": o.new_text} if o.new_text else {},
                                                "logprobs": lp(o.new_logprobs) if o.new_logprobs else None,
                                                "finish_reason": o.finish_reason if o.finished else None}]}
        finally:
            await close_all(streams)
        if usage_prompt_tokens is not None:
            yield {**head, "choices": [], "usage": usage(usage_prompt_tokens, n)}

    def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
                yield "data: [DONE]\n\n"
            # headers are sent: report in-band, as OpenAI does
            except EngineDeadError as e:
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            except Exception as e:  # noqa: BLE001 (a bug: logged here, since nothing re-raises it)
                traceback.print_exc()
                yield f"data: {json.dumps(internal_error(e))}\n\n"
            finally:  # also on client disconnect (cancellation): aborts unfinished requests
                await chunks.aclose()
        return StreamingResponse(body(), media_type="text/event-stream")

    return app
