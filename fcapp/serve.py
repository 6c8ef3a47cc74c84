"""An OpenAI-compatible HTTP endpoint for any local model (the embedded one, tuned ones), so that any
OpenAI client, or another fcapp as a teacher (`http://HOST:PORT/v1#MODEL`), can use it.

`GET /v1/models` and `POST /v1/chat/completions`, streaming (SSE) or not. Honoured: temperature,
top_p, max_tokens / max_completion_tokens (default 512), seed (random when absent), stop (cut from
the text, as OpenAI does), stream_options.include_usage. `tools`, `tool_choice` and other fields
are accepted and ignored: functions belong in the prompt (see fcapp.agent). Messages with role
"tool" are passed to the chat template as they are.

Concurrent requests are decoded together, as vLLM does: a model with `stream_batch` (LocalModel)
is owned by one batcher thread; requests that arrive while a batch runs wait, and go together (up
to `max_batch`) into the next one. Sampling is seeded per row, so a reply does not depend on what
else shared its batch. A client that goes away has its row stopped and ignored (the batch stops
when every row is gone); a model error fails every request of its batch, and the batcher goes on
with the next. Any other ChatModel generates each request in a thread of its own. Either way the
event loop keeps serving. A host other than loopback is refused unless an API key
(`Authorization: Bearer KEY`) is required.
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
from contextlib import aclosing, asynccontextmanager, closing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal, Sequence

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fcapp.models.base import ChatModel, Chunk, Message, SamplingParams

DEFAULT_MAX_TOKENS = 512
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
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)

    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
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
BATCH_WINDOW_S = 0.01  # after a batch's first request, how long the batcher waits for more


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
    """The one thread that runs a model with `stream_batch`: it takes the requests waiting (those
    that come within BATCH_WINDOW_S of the first too, `max_batch` at most) and decodes them
    together, each row's chunks going to its own request."""

    def __init__(self, model: Any, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.waiting: queue.Queue[Pending | None] = queue.Queue()
        threading.Thread(target=self._serve, name="fcapp-serve-batcher", daemon=True).start()

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)

    def close(self) -> None:
        """Stop once the requests already waiting are answered."""
        self.waiting.put(None)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            batch = [self.waiting.get()]
            deadline = time.monotonic() + BATCH_WINDOW_S
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            stopping = None in batch
            live = [p for p in batch if p is not None and not p.cancel.is_set()]
            if live:
                self.decode(live)

    def decode(self, batch: list[Pending]) -> None:
        """Decode `batch` in one stream: each request gets its row's chunks and _END, or the error.
        A gone client's row is stopped (stop_when) and ignored; once every row has finished or
        lost its client, the stream is closed."""
        ended = [False] * len(batch)
        try:
            with closing(self.model.stream_batch([p.messages for p in batch], [p.params for p in batch],
                                                 stop_when=lambda i, _: batch[i].cancel.is_set())) as stream:
                for chunks in stream:
                    for i, (pending, chunk) in enumerate(zip(batch, chunks)):
                        if ended[i] or pending.cancel.is_set():
                            continue
                        if chunk.text or chunk.finished:
                            pending.put(chunk)
                        if chunk.finished:
                            pending.put(_END)
                            ended[i] = True
                    if all(done or p.cancel.is_set() for done, p in zip(ended, batch)):
                        break
        except Exception as exc:  # the whole batch failed: every request still waiting hears why
            for done, pending in zip(ended, batch):
                if not done:
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
def build_app(model: ChatModel, api_key: str | None = None, max_batch: int = 8) -> FastAPI:
    """The OpenAI-compatible app over `model` (a LocalModel, or any ChatModel); `api_key`, when
    given, is required as `Authorization: Bearer KEY` on every route; `max_batch`: the most
    requests decoded together (a model with `stream_batch`)."""
    batcher = Batcher(model, max_batch) if hasattr(model, "stream_batch") else None

    def submit(pending: Pending) -> None:
        if batcher is not None:
            batcher.submit(pending)
        else:
            threading.Thread(target=generate_alone, args=(model, pending), name="fcapp-serve-generate",
                             daemon=True).start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:
            batcher.close()

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    app = FastAPI(title="fcapp OpenAI-compatible endpoint", dependencies=[Depends(check_key)], lifespan=lifespan)
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
        params = body.sampling()
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
                         "the model; set an API key (--api-key), or use host 127.0.0.1")


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
