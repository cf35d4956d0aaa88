"""OpenAI-compatible HTTP server over the slot engine (engine.py): completions and chat completions (plain, or
streamed as server-sent events), the model list, health, and Prometheus metrics.

    python -m anllm_jax.serve --checkpoint PATH [--host 127.0.0.1] [--port 8000] [--cache POLICY]
        [--slots N] [--cache-memory MiB] [--max-queue N] [--prefill-chunk N] [--anchor-mode ep|ac|full]

Bad requests get an OpenAI-style error body {"error": {"message", "type", "param", "code"}} with HTTP 400 (404 for
an unknown model or path, 429 with Retry-After when the queue is full); nothing a client sends stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from anllm_jax import anchors, cli_args, generate, kvcache
from anllm_jax import engine as engine_lib
from anllm_jax.engine import Engine, Event
from anllm_jax.tokenizer import Tokenizer

_RETRY_AFTER_S = 1
_DISCONNECT_CHECK_S = 0.25
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(e: ApiError) -> JSONResponse:
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(e.status, "invalid_request_error")
    if e.status >= 500:
        kind = "server_error"
    headers = {"Retry-After": str(_RETRY_AFTER_S)} if e.status == 429 else None
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# Request bodies. Strict: a string where a number belongs is an error, not a conversion.


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=engine_lib.TOP_LOGPROBS)


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str = ""


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[_TextPart] | None = None


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=engine_lib.TOP_LOGPROBS)


def _parse(cls: type[BaseModel], raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send one JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # Drop pydantic's union-member tags ("str", "list[int]", ...) from the location: keep field names, indices.
        path = [str(p) for p in first["loc"] if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or p[0] == "_")]
        param = ".".join(path) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


# ----------------------------------------------------------------------------------------------------------------
# Chat template


def chat_renderer(template: str, tokenizer: Tokenizer) -> Callable[[list[dict[str, str]]], str]:
    """A function rendering messages with the model's Jinja chat template, as transformers renders it (sandboxed,
    trim_blocks/lstrip_blocks, raise_exception), with the assistant's turn opened."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda fmt: time.strftime(fmt)}
    compiled = env.from_string(template)
    special = {
        f"{name}_token": tokenizer.decode([i])
        for name, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id))
        if i is not None
    }
    return lambda messages: compiled.render(messages=messages, add_generation_prompt=True, **special)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics in a registry of their own; gauges read the engine when scraped."""

    def __init__(self, engine: Engine):
        disable_created_metrics()  # the *_created series would only repeat the server's start time
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "anllm_requests", "HTTP requests by path and status code", ["path", "status"], registry=r
        )
        self.prompt_tokens = Counter("anllm_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("anllm_generated_tokens", "Tokens sampled by finished generations", registry=r)
        self.latency = Histogram(
            "anllm_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "anllm_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        for key, doc in (
            ("queue_depth", "Requests waiting for a slot"),
            ("active_slots", "Slots holding a request (prefilling or decoding)"),
            ("slots", "Slots of the engine"),
            ("cache_entries", "KV cache entries held by decoding requests"),
            ("cache_bytes", "Bytes of those entries"),
            ("cache_allocated_bytes", "Bytes allocated for the KV cache (every slot plus the prefill row)"),
        ):
            Gauge(f"anllm_{key}", doc, registry=r).set_function(lambda key=key: engine.stats()[key])

    def finished(self, request: engine_lib.Request) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.generated_tokens.inc(request.n_sampled)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted_at)
        self.latency.observe((request.finished_at or time.perf_counter()) - request.submitted_at)


class _CountStatus:
    """ASGI middleware counting responses by path and status (pure ASGI: it leaves streaming alone)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# ----------------------------------------------------------------------------------------------------------------
# The app


class _Generation:
    """One request's events, carried from the engine thread to the event loop."""

    def __init__(
        self, engine: Engine, metrics: Metrics, prompt_ids: list[int], body: _Sampling, max_tokens: int, param: str
    ):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.engine, self.metrics = engine, metrics
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self.request = engine_lib.Request(
            prompt_ids,
            max_tokens,
            self._emit,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_strings=tuple(s for s in stop if s),
        )
        try:
            engine.submit(self.request)
        except engine_lib.QueueFullError as e:
            raise ApiError(429, f"{e}; retry after {_RETRY_AFTER_S} s", code="queue_full") from None
        except engine_lib.ContextTooLongError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None

    def _emit(self, ev: Event) -> None:
        """Called from the engine thread. After shutdown closed the event loop nobody waits for the event."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def events(self, http: Request | None = None) -> AsyncIterator[Event]:
        """The events up to the last. With `http`, a client gone away ends them (checked every quarter second);
        however they end, the request is cancelled, which frees its slot unless it has finished already."""
        checked = time.perf_counter()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=_DISCONNECT_CHECK_S)
                except TimeoutError:
                    ev = None
                if http is not None and time.perf_counter() - checked >= _DISCONNECT_CHECK_S:
                    checked = time.perf_counter()
                    if await http.is_disconnected():
                        return
                if ev is None:
                    continue
                yield ev
                if ev.finish_reason or ev.error:
                    return
        finally:
            self.engine.cancel(self.request)
            self.metrics.finished(self.request)


class _CancellingStream(StreamingResponse):
    """Closes the event stream however the response ends (a client that disconnects mid-stream included), so the
    request's slot is freed at once rather than when the generator is collected."""

    def __init__(self, stream: AsyncIterator[str], **kw: Any):
        super().__init__(stream, media_type="text/event-stream", **kw)
        self._stream = stream

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


def _usage(g: _Generation) -> dict[str, int]:
    n, m = len(g.request.prompt_ids), g.request.n_sampled
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def _completion_logprobs(tok: Tokenizer, evs: list[Event], k: int, offset: int) -> dict[str, list]:
    """The completions API's logprobs: token strings, their log-probs, the top k alternatives, text offsets."""
    strs = [tok.decode([i]) for ev in evs for i in ev.token_ids]
    offsets = [offset + sum(len(s) for s in strs[:j]) for j in range(len(strs))]
    return {
        "tokens": strs,
        "token_logprobs": [lp for ev in evs for lp in ev.logprobs],
        "top_logprobs": [{tok.decode([i]): lp for i, lp in top[:k]} for ev in evs for top in ev.top_logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(tok: Tokenizer, evs: list[Event], k: int) -> dict[str, list]:
    """The chat API's logprobs: per token its string, log-prob, UTF-8 bytes and the top k alternatives."""

    def entry(i: int, lp: float) -> dict[str, Any]:
        s = tok.decode([i])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    content = []
    for ev in evs:
        for i, lp, top in zip(ev.token_ids, ev.logprobs, ev.top_logprobs, strict=True):
            content.append(entry(i, lp) | {"top_logprobs": [entry(j, lpj) for j, lpj in top[:k]]})
    return {"content": content}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Api:
    """The routes' logic over one engine; `build_app` mounts it."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, chat_template: str | None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.metrics = Metrics(engine)
        self.render = chat_renderer(chat_template, tokenizer) if chat_template else None
        self.created = int(time.time())

    def _encode(self, text: str) -> list[int]:
        return anchors.encode_prompt(text, self.tokenizer, self.engine.model.cfg.anchor_mode)

    def _check_model(self, body: _Sampling) -> None:
        if body.model is not None and body.model != self.model_name:
            message = f"model {body.model!r} is not served here; use {self.model_name!r}"
            raise ApiError(404, message, "model", "model_not_found")

    async def health(self) -> Any:
        return {"status": "ok", "model": self.model_name, **self.engine.stats()}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> Any:
        entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "anllm-jax"}
        return {"object": "list", "data": [entry]}

    async def completions(self, http: Request) -> Any:
        body = _parse(CompletionBody, await http.body())
        self._check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} strings; send one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        elif all(0 <= i < self.tokenizer.vocab_size for i in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, f"prompt token ids must lie in [0, {self.tokenizer.vocab_size})", "prompt")
        g = _Generation(self.engine, self.metrics, ids, body, body.max_tokens or 16, "prompt")
        k = body.logprobs

        def logprobs(evs: list[Event], offset: int) -> dict | None:
            return None if k is None else _completion_logprobs(self.tokenizer, evs, k, offset)

        return await self._respond(g, body, http, "text_completion", logprobs)

    async def chat(self, http: Request) -> Any:
        body = _parse(ChatBody, await http.body())
        self._check_model(body)
        if self.render is None:
            message = "this model has no chat template; use /v1/completions, or start the server with --chat-template"
            raise ApiError(400, message, "messages")
        messages = []
        for m in body.messages:
            text = (
                m.content
                if isinstance(m.content, str)
                else "".join(p.text for p in m.content or () if p.type == "text")
            )
            messages.append({"role": m.role, "content": text})
        try:
            ids = self._encode(self.render(messages))
        except Exception as e:  # a template may raise anything on messages it rejects
            raise ApiError(400, f"the chat template rejected the messages: {e}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.engine.room(ids))
        g = _Generation(self.engine, self.metrics, ids, body, max_tokens, "messages")
        k = body.top_logprobs or 0

        def logprobs(evs: list[Event], _: int) -> dict | None:
            return _chat_logprobs(self.tokenizer, evs, k) if body.logprobs else None

        return await self._respond(g, body, http, "chat.completion", logprobs)

    async def _respond(self, g: _Generation, body: _Sampling, http: Request, kind: str, logprobs: Callable) -> Any:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _CancellingStream(self._stream(g, head, kind, logprobs, include_usage))
        evs = [ev async for ev in g.events(http)]
        if not evs or not (evs[-1].finish_reason or evs[-1].error):
            return Response(status_code=499)  # the client went away; nobody reads this
        if evs[-1].error:
            raise ApiError(500, f"generation failed: {evs[-1].error}")
        text = "".join(ev.text for ev in evs)
        choice = {"index": 0, "logprobs": logprobs(evs, 0), "finish_reason": evs[-1].finish_reason}
        choice |= {"message": {"role": "assistant", "content": text}} if kind == "chat.completion" else {"text": text}
        return {**head, "object": kind, "choices": [choice], "usage": _usage(g)}

    async def _stream(
        self, g: _Generation, head: dict, kind: str, logprobs: Callable, include_usage: bool
    ) -> AsyncIterator[str]:
        chat = kind == "chat.completion"
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if chat:
            role = {"role": "assistant", "content": ""}
            yield _sse(head | {"choices": [{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}]})
        sent = 0
        async with contextlib.aclosing(g.events()) as events:  # closed (request cancelled) when the client leaves
            async for ev in events:
                if ev.error:
                    yield _sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                    return
                lp = logprobs([ev], sent)
                if not ev.text and ev.finish_reason is None and lp is None:
                    continue  # text held back (a possible stop string or a partial character): nothing to send
                choice = {"index": 0, "logprobs": lp, "finish_reason": ev.finish_reason}
                choice |= {"delta": {"content": ev.text}} if chat else {"text": ev.text}
                sent += len(ev.text)
                yield _sse(head | {"choices": [choice]})
        if include_usage:
            yield _sse(head | {"choices": [], "usage": _usage(g)})
        yield "data: [DONE]\n\n"


def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str, chat_template: str | None) -> Any:
    """The ASGI app: the routes, OpenAI-style errors for everything that fails, and the status-counting wrapper."""
    api = _Api(engine, tokenizer, model_name, chat_template)
    app = FastAPI(title="anllm-jax", openapi_url=None, docs_url=None, redoc_url=None)
    app.get("/health")(api.health)
    app.get("/metrics")(api.prometheus)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    return _CountStatus(app, api.metrics)


# ----------------------------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"anllm_jax.serve: error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m anllm_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="smollm2", help="native dir, HF dir, GGUF file, or 'smollm2' (packaged)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at startup)")
    p.add_argument(
        "--cache",
        choices=[c for c in kvcache.POLICIES if c != "none"],
        default=None,
        help="KV cache policy of every slot (docs/policies.md); default: the model's own (anchor for ep/ac models)",
    )
    p.add_argument("--anchor-mode", choices=("ep", "ac", "full"), default=None, help="default: the model's own")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--cache-memory", type=float, default=512.0, help="MiB of KV cache for all slots together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--dtype", default=None, help="compute dtype override, e.g. float32 (default: the model's)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the checkpoint's name)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    cli_args.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("slots", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.max_queue < 0 or args.cache_memory <= 0 or not 0 <= args.port < 65536:
        p.error("--max-queue must be >= 0, --cache-memory > 0 and --port in 0..65535")
    return args


def _setup(args: argparse.Namespace) -> tuple[Engine, Tokenizer, str, str | None]:
    """Load the model and build the engine; ValueError/FileNotFoundError name what to fix."""
    from anllm_jax import checkpoints

    template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template) as f:
                template = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --chat-template {args.chat_template} ({e.strerror})") from None
    model, tokenizer = checkpoints.load_for_inference(args.checkpoint, args.dtype, args.anchor_mode)
    policy = cli_args.cache_policy(args.cache, model.cfg, args, tokenizer)
    capacity = engine_lib.capacity_for(model, args.slots, int(args.cache_memory * 2**20))
    if capacity < generate.bucket(1):  # the smallest prefill writes a bucket of slots
        raise ValueError(
            f"--cache-memory {args.cache_memory:g} MiB gives {args.slots} slots only {capacity} entries each "
            f"({kvcache.bytes_per_entry(model.cfg):,} bytes per entry, at least {generate.bucket(1)} needed); raise "
            "--cache-memory or lower --slots"
        )
    engine = Engine(
        model,
        tokenizer,
        policy=policy,
        slots=args.slots,
        capacity=capacity,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        stop_ids=[] if tokenizer.eos_id is None else [tokenizer.eos_id],
    )
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint)).removesuffix(".gguf")
    return engine, tokenizer, name, template or tokenizer.chat_template


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen()
    except OSError as e:
        where = f"{args.host}:{args.port}"
        print(f"anllm_jax.serve: error: cannot listen on {where} ({e.strerror}); pick another --port", file=sys.stderr)
        return 2
    try:
        engine, tokenizer, name, template = _setup(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"anllm_jax.serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    engine.start()
    s = engine.stats()
    host, port = sock.getsockname()[:2]
    print(
        f"anllm_jax.serve: {name} on http://{host}:{port} ({engine.policy} cache, {s['slots']} slots x "
        f"{s['capacity']} entries, {s['cache_allocated_bytes'] / 2**20:.1f} MiB; chat "
        f"{'on' if template else 'off: no chat template'})",
        flush=True,
    )
    app = build_app(engine, tokenizer, name, template)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
