"""An OpenAI-compatible HTTP endpoint for any local model (the embedded one, tuned ones), so that any
OpenAI client, or another fcapp as a teacher (`http://HOST:PORT/v1#MODEL`), can use it.

`GET /v1/models` and `POST /v1/chat/completions`, streaming (SSE) or not. Honoured: temperature,
top_p, max_tokens / max_completion_tokens (default 512, at most MAX_TOKENS), seed (random when
absent), stop (at most 4, cut from the text, as OpenAI does), stream_options.include_usage. `tools`,
`tool_choice` and other fields are accepted and ignored: functions belong in the prompt (see
fcapp.agent). Messages with role "tool" are passed to the chat template as they are.

Every request is checked before it reaches the model, so a bad one fails alone with an
OpenAI-style error: 400 for a value out of range (seed outside 64 bits, temperature, top_p,
max_tokens), 400 `context_length_exceeded` when the prompt plus max_tokens passes the model's
context, 413 for a body over MAX_BODY_BYTES, 401 without the key when one is set (on every route,
/docs and /openapi.json included).

Concurrent requests are decoded together, as vLLM does: a model with `generate_continuous`
(LocalModel) is owned by one batcher thread, up to `max_batch` requests decode in one batch, and a
request that arrives while others decode joins them at the next token instead of waiting for the
batch to end, so a short request is not stuck behind a long one. Sampling is seeded per row, so a
reply does not depend on what else shared its batch. A client that goes away has its row stopped;
a model error fails the requests decoding at that moment, and the batcher goes on with the next.
Any other ChatModel generates each request in a thread of its own. Either way the event loop keeps
serving. A host other than loopback is refused unless an API key (`Authorization: Bearer KEY`) is
required.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import queue
import random
import socket
import sys
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fcapp.models.base import ChatModel, Chunk, Message, SamplingParams
from fcapp.models.base import Request as Conversation

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS = 4096  # the most a request may ask for (and never past the context)
MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused with 413 before it is parsed
MAX_STOPS = 4
DISCONNECT_POLL_S = 0.25


# ---- request shapes ---------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def plain(self) -> Message:
        """The message as the chat template takes it ("developer" is the newer name of "system")."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    n: int = Field(1, ge=1, le=1)

    def sampling(self, room: int | None) -> SamplingParams:
        """The sampling settings; `room`: the tokens the context leaves after the prompt (None:
        unknown). Raises APIError 400 context_length_exceeded when the reply cannot fit."""
        asked = self.max_completion_tokens or self.max_tokens
        if room is not None and (room < 1 or (asked or 0) > room):
            raise APIError(400, f"the prompt leaves room for {max(room, 0)} tokens of this model's context, "
                                f"and {asked or 1} were asked for; shorten the messages or lower max_tokens",
                           code="context_length_exceeded", param="messages")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, room or DEFAULT_MAX_TOKENS),
            seed=random.randrange(2**31) if self.seed is None else self.seed,
            stop=[s for s in stops if s],
        )


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def validation_error(errors: Sequence[Any]) -> APIError:
    """One 400 error for pydantic's list; `param` is the path all the errors share."""
    locs = [[str(p) for p in e.get("loc", ())[1:]] for e in errors]  # [0] is "body"
    messages = []
    for e, loc in zip(errors, locs):
        if e.get("type") == "json_invalid":
            messages.append(f"invalid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        else:
            messages.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    invalid_json = any(e.get("type") == "json_invalid" for e in errors)
    param = "" if invalid_json or not locs else ".".join(os.path.commonprefix(locs))
    return APIError(400, "; ".join(messages) or "invalid request", param=param or None)


# ---- one reply ----------------------------------------------------------------------------------
class Reply:
    """Accumulates a reply: stop strings are cut (never sent, as with OpenAI), counts are kept."""

    def __init__(self, params: SamplingParams) -> None:
        self.stops = params.stop
        self.max_tokens = params.max_new_tokens
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.prompt_tokens = self.completion_tokens = 0

    def feed(self, chunk: Chunk) -> str:
        """Take a chunk; return the text that is now safe to send."""
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens = chunk.completion_tokens or self.completion_tokens
        if self.stopped:
            return ""
        self.text += chunk.text
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._send_to(min(hits))
        held = next((k for k in range(min(len(self.text), max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        return self._send_to(len(self.text) - held)

    def flush(self) -> str:
        """The held-back tail once the model has finished (it did not become a stop string)."""
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    @property
    def content(self) -> str:
        return self.text[:self.sent]

    @property
    def finish_reason(self) -> str:
        return "length" if not self.stopped and self.completion_tokens >= self.max_tokens else "stop"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


_END = object()
# The row an idle slot decodes while others run, so that a request arriving mid-batch has a slot to
# join at the next token (LocalModel offers a slot anew only when its row ends); its text is thrown away.
_DOOR: Conversation = ([{"role": "user", "content": "Count from 1 to 1000."}], SamplingParams(max_new_tokens=64))


@dataclass
class Pending:
    """One request on its way through the model: `put` sends an item (a Chunk, an exception, _END)
    to the request's queue from any thread; `cancel` is set once its client has gone."""

    messages: list[Message]
    params: SamplingParams
    put: Callable[[Any], None]
    cancel: threading.Event


def generate_alone(model: ChatModel, pending: Pending) -> None:
    """Run one request through `model.stream`, in a thread of its own. The stream is closed in the
    thread that ran it (LocalModel's lock and inference mode belong to that thread)."""
    stream = model.stream(pending.messages, None, pending.params)
    try:
        for chunk in stream:
            if pending.cancel.is_set():
                break
            pending.put(chunk)
    except Exception as exc:  # reported to the client, not raised in a thread nobody watches
        pending.put(exc)
    finally:
        getattr(stream, "close", lambda: None)()
        pending.put(_END)


class Batcher:
    """The one thread that runs a model with `generate_continuous`: the requests waiting start
    decoding together (`max_batch` at most), and each later one takes a slot in the running decode
    the moment one is free. While fewer than `max_batch` requests decode, one idle slot holds the
    _DOOR row, which ends at once when a request arrives, so that request joins at the next token;
    one that finds the door taken joins when the next row ends. The door costs one extra row per
    decode step (measured on the 2-core box: a reply decoding alone, 15-40% slower per token)."""

    def __init__(self, model: Any, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.waiting: queue.Queue[Pending | None] = queue.Queue()
        self.closing = False
        threading.Thread(target=self._serve, name="fcapp-serve-batcher", daemon=True).start()

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)

    def close(self) -> None:
        """Stop once the requests already decoding are answered."""
        self.waiting.put(None)

    def _serve(self) -> None:
        while not self.closing:
            first = self.waiting.get()
            if first is None:
                return
            if not first.cancel.is_set():
                self.decode(first)

    def _next(self) -> Pending | None:
        """The next waiting request whose client is still there, without waiting for one."""
        while not self.closing:
            try:
                pending = self.waiting.get_nowait()
            except queue.Empty:
                return None
            if pending is None:
                self.closing = True
            elif not pending.cancel.is_set():
                return pending
        return None

    def decode(self, first: Pending) -> None:
        """Decode `first` and every request that comes while it runs; each request gets its row's
        text as Chunks, then a finished Chunk with the counts and _END (or the model's error)."""
        rows: dict[int, Pending | None] = {}  # slot -> its request; None: the door
        sent: dict[int, int] = {}  # slot -> characters of its text already sent

        def take(slot: int, pending: Pending | None) -> Conversation | None:
            """Give `slot` a request, the door (while requests decode and no slot holds it), or nothing."""
            decoding = sum(p is not None for p in rows.values())
            if pending is None and not (0 < decoding < self.max_batch and None not in rows.values()):
                return None
            rows[slot], sent[slot] = pending, 0
            return _DOOR if pending is None else (pending.messages, pending.params)

        def requests(slot: int, reply: Any) -> Conversation | None:
            if reply is None:  # the decode starts: `first`, then whatever else is waiting
                return take(slot, first if slot == 0 else self._next())
            pending = rows.pop(slot)
            if pending is not None:
                pending.put(Chunk(reply.text[sent[slot]:], reply.prompt_tokens, reply.completion_tokens, True))
                pending.put(_END)
            if not any(rows.values()):  # nobody decodes any more: let this decode end, the next starts afresh
                return None
            return take(slot, self._next())

        def stop_when(slot: int, text: str) -> bool:
            pending = rows[slot]
            if pending is None:  # the door opens for a waiting request, and closes once nobody decodes
                return not self.waiting.empty() or not any(rows.values())
            pending.put(Chunk(text[sent[slot]:]))
            sent[slot] = len(text)
            return pending.cancel.is_set()

        try:
            for _ in self.model.generate_continuous(requests, self.max_batch, stop_when):
                pass
        except Exception as exc:  # the decode failed: every request in it hears why
            for pending in rows.values():
                if pending is not None:
                    pending.put(exc)


async def generate(submit: Callable[[Pending], None], messages: list[Message], params: SamplingParams,
                   request: Request) -> AsyncIterator[Chunk]:
    """The model's chunks for one request, produced in another thread (the loop stays free):
    `submit` hands the request over (to the batcher, or to a thread of its own). Generation stops
    when this iterator is closed or the client disconnects."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone
            cancel.set()

    submit(Pending(messages, params, put, cancel))
    last_check = loop.time()
    try:
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                item = None
            if loop.time() - last_check >= DISCONNECT_POLL_S:
                last_check = loop.time()
                if await request.is_disconnected():
                    return
            if item is None:
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the streaming ends (a vanished client included)."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# ---- the app --------------------------------------------------------------------------------------
class Guard:
    """ASGI middleware in front of every route, /docs and /openapi.json included: the API key (when
    one is set), then the body size. A refused request never reaches the app."""

    def __init__(self, app: Any, api_key: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                                f"Bearer {self.api_key}".encode()):
            error = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        too_big = APIError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
        refusal = JSONResponse(too_big.body(), status_code=too_big.status)
        if int(headers.get("content-length") or 0) > self.max_body:
            return await refusal(scope, receive, send)
        body, more = b"", True
        while more:  # read it all here (at most max_body bytes), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await refusal(scope, receive, send)
        handed = False

        async def replay() -> dict[str, Any]:
            nonlocal handed
            if handed:
                return await receive()  # after the body: the client's disconnect, when it comes
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def context_window(model: Any) -> int | None:
    """The most tokens (prompt and reply) `model` takes, where it says (a transformers model's config)."""
    return getattr(getattr(getattr(model, "model", None), "config", None), "max_position_embeddings", None)


def build_app(model: ChatModel, api_key: str | None = None, max_batch: int = 8) -> FastAPI:
    """The OpenAI-compatible app over `model` (a LocalModel, or any ChatModel); `api_key`, when
    given, is required as `Authorization: Bearer KEY` on every route; `max_batch`: the most
    requests decoded together (a model with `generate_continuous`)."""
    batcher = Batcher(model, max_batch) if hasattr(model, "generate_continuous") else None
    window = context_window(model)
    encode = getattr(model, "encode", None)

    def submit(pending: Pending) -> None:
        if batcher is not None:
            batcher.submit(pending)
        else:
            threading.Thread(target=generate_alone, args=(model, pending), name="fcapp-serve-generate",
                             daemon=True).start()

    def prompt_room(messages: list[Message]) -> int | None:
        """The tokens the context leaves after the prompt (None: the model does not say)."""
        if window is None or encode is None:
            return None
        try:
            return window - len(encode(messages))
        except Exception as exc:  # noqa: BLE001 - the chat template refused these messages: this request's fault
            raise APIError(400, f"the messages cannot be put in the chat template: {exc}", param="messages") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:
            batcher.close()

    app = FastAPI(title="fcapp OpenAI-compatible endpoint", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key)
    app.state.batcher = batcher
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors()).body(), status_code=400)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model.model_id, "object": "model", "created": started, "owned_by": "fcapp"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> JSONResponse | StreamingResponse:
        if body.model != model.model_id:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                                f"{model.model_id!r}", code="model_not_found", param="model")
        messages = [m.plain() for m in body.messages]
        params = body.sampling(await asyncio.to_thread(prompt_room, messages))  # checked before it meets the model
        reply = Reply(params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.model_id}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(generate(submit, messages, params, request), reply, head, usage)
            return ClosingStreamingResponse(events, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache"})
        try:
            async with aclosing(generate(submit, messages, params, request)) as chunks:
                async for chunk in chunks:
                    reply.feed(chunk)
                    if reply.stopped:
                        break
        except Exception as exc:
            raise APIError(500, f"generation failed: {exc}", kind="server_error") from None
        reply.flush()
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason, "logprobs": None}],
            "usage": reply.usage(),
        })

    return app


async def sse_events(chunks: AsyncIterator[Chunk], reply: Reply, head: dict[str, Any],
                     include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming shape: a role chunk, content deltas, a finish chunk, usage, [DONE]."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def delta(content: dict[str, Any], finish: str | None = None) -> str:
        return event([{"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}])

    yield delta({"role": "assistant", "content": ""})
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                text = reply.feed(chunk)
                if text:
                    yield delta({"content": text})
                if reply.stopped:
                    break
    except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
        yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}', kind='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    tail = reply.flush()
    if tail:
        yield delta({"content": tail})
    yield delta({}, reply.finish_reason)
    if include_usage:
        yield event([], usage=reply.usage())
    yield "data: [DONE]\n\n"


# ---- running it -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to open a model to the network without a key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach it could use "
                         "the model; require one with --api-key-env NAME (the variable holding it), or use host "
                         "127.0.0.1")


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8) -> None:
    """Load a local model and serve it until interrupted (the host is checked before the model loads);
    up to `max_batch` concurrent requests are decoded together."""
    from fcapp.models.local import load_model

    host = host.strip("[]")  # "[::1]" as in a URL
    check_exposure(host, api_key)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    model = load_model(model_spec)
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"serving {model.model_id} at http://{shown}:{port}/v1 "
                     f"(as a teacher: --model http://{shown}:{port}/v1#{model.model_id})\n")
    uvicorn.run(build_app(model, api_key=api_key, max_batch=max_batch), host=host, port=port, log_level="info")


class ServerThread:
    """Serve an app from a background thread on a free port (or a given one): for tests, and for
    the app to expose a model in-process. Use as a context manager; `url` is the API base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fcapp-serve", daemon=True)

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
