"""The OpenAI-compatible HTTP API (mode=serve): FastAPI over one engine.

    GET  /v1/models                 the served model(s): several with mode=serve run=[dirA,dirB] (`model` picks one)
    POST /v1/chat/completions       messages -> answer (stream=true: Server-Sent Events); `tools` -> OpenAI `tool_calls`
                                    (medgpt.serving.tools; 400 when the template has no tool format)
    POST /v1/completions            raw prompt(s) -> continuation
    POST /v1/rewards                texts -> scores, on a reward-model run only (medgpt.serving.rewards)
    GET  /health                    {"status": "ok", ...} (no key needed)
    GET  /metrics                   Prometheus text (no key needed)

Streams are `data: {json}\\n\\n` chunks ending with `data: [DONE]\\n\\n`. With `api_key` set, /v1/* needs
`Authorization: Bearer <key>` (401 otherwise). Bad requests get a 400 with a JSON error body naming
the field; a body above `max_body_kb` gets a 413 before it is parsed. A client that disconnects, mid-stream
or while waiting for a non-streamed answer, cancels its generation, which frees its batch slot. Prompts
are tokenised in a worker thread, so a long one never holds up the event loop (/health answers meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgpt.data.templates import ROLES
from medgpt.errors import DataError
from medgpt.serving.engine import Delta, Handle, sampling_params
from medgpt.serving.metrics import Metrics
from medgpt.serving.protocol import ChatRequest, CompletionRequest, RequestError, error_response, first_validation_error
from medgpt.serving.tools import answer, request_messages, stream_delta, uses_tools

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` is answered 413 before anything parses it.

    A declared Content-Length above the limit is refused without reading the body; a chunked body is read up to
    the limit (and refused once it passes it), then handed to the app whole.
    """

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, f"{int(declared) / 1024:.0f} KB")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, f"more than {self.max_bytes // 1024} KB")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str):
        self.metrics.observe(scope["path"], 413)
        kb = self.max_bytes // 1024
        response = error_response(413, f"the request body ({size}) is above this server's limit of {kb} KB (serve.max_body_kb); "
                                  "send a shorter prompt.", None, code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body has been read: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that repeats empty body messages: do not spin


def create_app(loaded, generation, api_key: str | None = None, max_tokens_limit: int = 1024, max_body_kb: int = 1024) -> FastAPI:
    """`loaded`: medgpt.serving.loading.Loaded; `generation`: the config's sampling defaults."""
    app = FastAPI(title="medgpt", version="1", docs_url="/docs", redoc_url=None)
    metrics = Metrics()
    app.add_middleware(BodyLimit, max_bytes=max_body_kb * 1024, metrics=metrics)
    model_id = loaded.artefacts.name
    created = int(time.time())
    app.state.loaded, app.state.metrics = loaded, metrics

    # --- errors: always {"error": {...}}, never a bare 422 or a stack trace ---
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        param, message = first_validation_error(exc.errors())
        metrics.observe(request.url.path, 400)
        return error_response(400, message, param, code="invalid_value")

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        metrics.observe(request.url.path, exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        metrics.observe(request.url.path, exc.status_code)
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), None, kind, headers=getattr(exc, "headers", None))

    def require_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise StarletteHTTPException(401, "a valid API key is required: send the header 'Authorization: Bearer <serve.api_key>'",
                                         headers={"WWW-Authenticate": "Bearer"})

    # --- open endpoints ---
    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "engine": loaded.engine.name, **loaded.engine.stats()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(metrics.render(loaded.engine.stats()), media_type="text/plain; version=0.0.4")

    # --- the OpenAI API ---
    @app.get("/v1/models", dependencies=[Depends(require_key)])
    def models():
        a = loaded.artefacts
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "medgpt", "root": a.model_path,
                                            "adapter": a.adapters.get(name, a.adapter_path), "template": a.template.name,
                                            "max_model_len": loaded.context_length} for name in loaded.model_ids()]}

    if getattr(loaded.artefacts, "reward_model", False):  # a method=rm run: POST /v1/rewards; generation routes answer 400
        from medgpt.serving.rewards import mount_rewards

        mount_rewards(app, loaded, require_key, metrics)  # before the routes below: the first match answers

    def params_for(body, prompt_len: int, prompt_param: str):
        if body.model not in (None, "", *loaded.model_ids()):
            raise RequestError("model", f"model {body.model!r} is not served here (available: {', '.join(loaded.model_ids())}).", 404,
                               code="model_not_found")
        room = loaded.context_length - prompt_len
        if room <= 0:
            raise RequestError(prompt_param, f"{prompt_param}: the prompt has {prompt_len} tokens, more than the model's context of "
                               f"{loaded.context_length} tokens allows; shorten it.", code="context_length_exceeded")
        wanted = body.wanted_tokens()
        if wanted is not None and wanted > max_tokens_limit:
            raise RequestError("max_tokens", f"max_tokens: {wanted} is above this server's limit of {max_tokens_limit}.")
        if wanted is not None and wanted > room:
            raise RequestError("max_tokens", f"max_tokens: the prompt ({prompt_len} tokens) plus max_tokens ({wanted}) exceeds the "
                               f"model's context of {loaded.context_length} tokens.", code="context_length_exceeded")
        default = min(generation.max_new_tokens, max_tokens_limit, room)
        return sampling_params(generation, max_tokens=wanted or default, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, repetition_penalty=body.repetition_penalty, stop=body.stop, seed=body.seed)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        messages, tools = request_messages(body, loaded.template), body.offered_tools()
        try:
            if uses_tools(body):  # the template renders the tool list, the calls and their results (medgpt.serving.tools)
                tok = loaded.tokenizer
                ids = await run_in_threadpool(lambda: loaded.text_ids(loaded.template.render(
                    messages, tok.bos_token or "", tok.eos_token or "", True, tools)))
            else:
                ids = await run_in_threadpool(loaded.chat_ids, messages)  # a long prompt takes seconds: not on the event loop
        except DataError as e:
            raise RequestError("messages", f"messages: {e} (roles: {', '.join(ROLES)}; a system message may only come first).") from None
        params = params_for(body, len(ids), "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handle = loaded.engine.submit(ids, params, loop=asyncio.get_running_loop(), adapter=loaded.adapter_for(body.model))
        return await respond(request, body, handle, rid, "chat.completion", time.monotonic(), tools)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        prompts = body.prompts()
        if body.stream and len(prompts) > 1:
            raise RequestError("prompt", "prompt: streaming takes a single prompt.")
        encoded = await run_in_threadpool(lambda: [loaded.text_ids(p) for p in prompts])
        params = [params_for(body, len(ids), "prompt") for ids in encoded]
        loop = asyncio.get_running_loop()
        handles = [loaded.engine.submit(ids, p, loop=loop, adapter=loaded.adapter_for(body.model)) for ids, p in zip(encoded, params)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await respond(request, body, handles[0] if body.stream else handles, rid, "text_completion", time.monotonic())

    async def respond(request: Request, body, handles, rid: str, kind: str, started: float, tools: list[dict] | None = None):
        endpoint = request.url.path
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(handles, rid, kind, include_usage, endpoint, started, tools), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        handles = handles if isinstance(handles, list) else [handles]
        # Starlette does not cancel a handler whose client went away: watch for the disconnect ourselves
        collecting = asyncio.ensure_future(asyncio.gather(*(collect(h) for h in handles)))
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():  # the client is gone: nobody will read the answer
                collecting.cancel()
                metrics.observe(endpoint, 499)  # nginx's "client closed request"
                return Response(status_code=499)
            results = collecting.result()
        finally:
            watching.cancel()
            for h in handles:
                h.cancel()  # no-op for finished requests; stops the rest when the client is gone (or this task was cancelled)
        failed = next((d for d in results if d.finish_reason == "error"), None)
        if failed:
            metrics.observe(endpoint, 500)
            return error_response(500, f"generation failed: {failed.error}", None, "server_error")
        usage = {"prompt_tokens": sum(d.prompt_tokens for d in results), "completion_tokens": sum(d.completion_tokens for d in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        metrics.observe(endpoint, 200, time.monotonic() - started, usage["prompt_tokens"], usage["completion_tokens"])
        if kind == "chat.completion":
            message, finish = answer(results[0].text, results[0].finish_reason, loaded.template, tools)
            choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason} for i, d in enumerate(results)]
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_id, "choices": choices, "usage": usage}

    async def collect(handle: Handle) -> Delta:
        parts, last = [], None
        async for last in handle:
            parts.append(last.text)
        return Delta("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error)

    async def sse(handle: Handle, rid: str, kind: str, include_usage: bool, endpoint: str, started: float,
                  tools: list[dict] | None = None):
        chat = kind == "chat.completion"
        obj, now = ("chat.completion.chunk" if chat else "text_completion"), int(time.time())
        held: list[str] = []  # tools offered: the answer is held until complete (medgpt.serving.tools)

        def chunk(text: str | None, finish: str | None, first: bool = False, delta: dict | None = None) -> str:
            if chat:
                if delta is None:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice]}) + "\n\n"

        last, done = None, False
        try:
            if chat:
                yield chunk(None, None, first=True)
            async for last in handle:
                if last.finish_reason == "error":
                    metrics.observe(endpoint, 500)
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {last.error}", "type": "server_error"}}) + "\n\n"
                    break
                if tools:
                    held.append(last.text)
                    if last.finish_reason:
                        message, finish = answer("".join(held), last.finish_reason, loaded.template, tools)
                        if stream_delta(message):
                            yield chunk(None, None, delta=stream_delta(message))
                        yield chunk(None, finish)
                elif last.text and not last.finish_reason:
                    yield chunk(last.text, None)
                elif last.finish_reason:
                    if last.text:
                        yield chunk(last.text, None)
                    yield chunk(None, last.finish_reason)
            if last is not None and last.finish_reason != "error":
                if include_usage:
                    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                             "total_tokens": last.prompt_tokens + last.completion_tokens}
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": now, "model": model_id, "choices": [],
                                                 "usage": usage}) + "\n\n"
                metrics.observe(endpoint, 200, time.monotonic() - started, last.prompt_tokens, last.completion_tokens)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                metrics.observe(endpoint, 499)  # nginx's "client closed request"
            handle.cancel()  # the client went away (or we are done): stop generating, free the slot

    metrics.endpoints = frozenset(route.path for route in app.routes)  # any other path is counted as "other"
    return app
