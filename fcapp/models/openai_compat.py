"""Any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp, OpenAI, our own `fcapp serve`) as a
ChatModel: the usual way to bring a large teacher model in.

Streams `POST {base_url}/chat/completions` (SSE `data: {...}` lines up to `data: [DONE]`) with httpx.
Conventions, chosen so chains stay comparable with local ones:

- `model_id` is the model name exactly as sent to the server (e.g. "llama3:70b").
- `tools` are not forwarded: the agent injects the functions into the prompt and parses calls from
  the text; sending them would make servers answer with structured `tool_calls` and no text.
- Messages with role "tool" (function results) go out as user messages `"Result: <content>"` when
  `tool_role="user"` (the default; every server accepts it, OpenAI included, which rejects a tool
  message without a tool_call_id); with `tool_role="tool"` they are sent unchanged (vLLM, Ollama
  and `fcapp serve` accept them, and the prompt then matches a local run token for token).
- Token counts come from the server's usage report (requested with `stream_options`); a server that
  sends none leaves them None: nothing is guessed.
- Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter, but
  only before any text has been streamed, so text is never duplicated.
- A server is not trusted to stop: a reply ends after MAX_CHARS_PER_TOKEN characters per token of
  `max_tokens`, or `max_reply_s` seconds, whichever comes first (the reply is cut there, as a
  length stop would cut it); an SSE line longer than MAX_LINE_CHARS is a malformed stream.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Iterator

import httpx

from fcapp.models.base import Chunk, Message, ModelError, SamplingParams

TOOL_RESULT_PREFIX = "Result: "
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 30.0
MAX_CHARS_PER_TOKEN = 32  # far above any tokenizer's average: only a server ignoring max_tokens reaches it
MAX_LINE_CHARS = 1 << 20


class _Retryable(Exception):
    """A failure worth another attempt (transient server or network trouble)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAICompatModel:
    """ChatModel over an OpenAI-compatible `/chat/completions` endpoint. Safe to share between threads."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 3, tool_role: str = "user",
                 backoff_s: float = 0.5, max_reply_s: float = 300.0) -> None:
        """`api_key`, else the value of the environment variable named `api_key_env` (if set);
        `timeout_s`: the longest wait for any one read; `max_reply_s`: the longest one reply may
        stream; `max_retries`: extra attempts after the first; `backoff_s`: the first retry's mean delay."""
        if tool_role not in ("user", "tool"):
            raise ValueError(f"tool_role must be 'user' or 'tool', not {tool_role!r}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = self.model_id = model
        self.api_key_env = api_key_env
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env) or None
        self.max_retries = max_retries
        self.tool_role = tool_role
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.max_reply_s = max_reply_s
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._has_key = bool(api_key)
        # never follow a redirect: the key in the headers belongs to this URL's host alone
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAICompatModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- request ------------------------------------------------------------------------------
    def convert(self, messages: list[Message]) -> list[dict[str, str]]:
        """The messages as the server gets them (tool results re-roled per `tool_role`)."""
        out = []
        for m in messages:
            role, content = m["role"], str(m.get("content") or "")
            if role == "tool" and self.tool_role == "user":
                role, content = "user", TOOL_RESULT_PREFIX + content
            out.append({"role": role, "content": content})
        return out

    def request_body(self, messages: list[Message], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "messages": self.convert(messages), "stream": True,
            "stream_options": {"include_usage": True}, "temperature": params.temperature,
            "top_p": params.top_p, "max_tokens": params.max_new_tokens, "seed": params.seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    # ---- streaming ----------------------------------------------------------------------------
    def stream(self, messages: list[Message], tools: list[dict] | None = None,
               params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Stream the reply; closing the iterator closes the HTTP response (the server stops)."""
        params = params or SamplingParams()
        body = self.request_body(messages, params)
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            streamed = False
            try:
                with self._client.stream("POST", self.url, json=body) as response:
                    self._check_status(response)
                    for chunk in self._parse(response, MAX_CHARS_PER_TOKEN * max(1, params.max_new_tokens)):
                        streamed = streamed or bool(chunk.text)
                        yield chunk
                    return
            except (httpx.TransportError, _Retryable) as exc:
                if streamed:
                    raise ModelError(f"the stream from {self.url} broke after text had arrived ({_describe(exc)}); "
                                     "not retried, as that would repeat text") from None
                if attempt + 1 == attempts:
                    raise ModelError(self._give_up(exc, attempts)) from None
                time.sleep(self._delay(attempt, exc))

    def _give_up(self, exc: Exception, attempts: int) -> str:
        if isinstance(exc, _Retryable):
            return f"{self.url} failed after {attempts} attempt(s): {exc}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return (f"{self.url} did not answer within {self.timeout_s:g} s ({attempts} attempt(s)); "
                    "raise timeout_s or check the server's load")
        return (f"cannot reach {self.url} after {attempts} attempt(s) ({_describe(exc)}); "
                "is the server running and the URL right?")

    def _delay(self, attempt: int, exc: Exception) -> float:
        """Exponential backoff with jitter; a server's Retry-After (capped) wins when longer."""
        delay = min(self.backoff_s * 2 ** attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.5)
        retry_after = getattr(exc, "retry_after", None)
        return max(delay, min(retry_after, MAX_RETRY_AFTER_S)) if retry_after else delay

    def _check_status(self, response: httpx.Response) -> None:
        """Raise ModelError (or _Retryable) with the server's own message for any non-2xx status."""
        status = response.status_code
        if status < 300:
            return
        response.read()
        detail = _error_message(response)
        if status in (401, 403):
            if self.api_key_env:
                where = f"${self.api_key_env} " + ("is set but was refused" if self._has_key else "is not set")
            else:
                where = "an API key was given but refused" if self._has_key else "no API key was given"
            raise ModelError(f"{self.url} rejected the request (HTTP {status}: {detail}); check the API key "
                             f"({where})")
        if status == 404:
            raise ModelError(f"{self.url}: not found (HTTP 404: {detail}); check the base URL (usually ending "
                             f"in /v1) and the model name {self.model!r}")
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {detail}", _retry_after(response))
        raise ModelError(f"{self.url} rejected the request (HTTP {status}: {detail})")

    def _parse(self, response: httpx.Response, max_chars: int) -> Iterator[Chunk]:
        """Turn SSE lines into Chunks, the reply cut after `max_chars` characters or `max_reply_s`
        seconds; the finished chunk carries the final usage counts."""
        prompt_tokens = completion_tokens = None
        finish_reason = None
        left = max_chars
        for line in self._lines(response, time.monotonic() + self.max_reply_s):
            if line is None or left <= 0:  # the time or the length is up: the reply ends here
                yield Chunk(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finished=True)
                return
            if not line or line.startswith(":") or line.startswith(("event:", "id:", "retry:")):
                continue
            if not line.startswith("data:"):
                raise ModelError(f"malformed stream from {self.url}: expected 'data:' lines, got {line[:200]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                yield Chunk(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finished=True)
                return
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise ModelError(f"malformed stream from {self.url}: not JSON: {data[:200]!r}") from None
            if not isinstance(event, dict) or not isinstance(event.get("choices", []), list):
                raise ModelError(f"malformed stream from {self.url}: unexpected event {data[:200]!r}")
            if event.get("error"):
                raise ModelError(f"{self.url} reported an error mid-stream: {_message_of(event)}")
            usage = event.get("usage")
            if isinstance(usage, dict):
                prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                completion_tokens = usage.get("completion_tokens", completion_tokens)
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                text = str((choice.get("delta") or {}).get("content") or "")[:left]
                if text:
                    left -= len(text)
                    yield Chunk(text, prompt_tokens, completion_tokens)
                finish_reason = choice.get("finish_reason") or finish_reason
        if finish_reason is None:
            raise _Retryable("the stream ended before [DONE]")
        yield Chunk(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finished=True)

    def _lines(self, response: httpx.Response, deadline: float) -> Iterator[str | None]:
        """The stream's lines (without their line ending), then None if `deadline` passes first.
        Checked at every read, so a server trickling bytes without a line break is cut off too."""
        pending = ""
        for text in response.iter_text():
            if time.monotonic() > deadline:
                yield None
                return
            *lines, pending = (pending + text).split("\n")
            yield from (line.removesuffix("\r") for line in lines)
            if len(pending) > MAX_LINE_CHARS:
                raise ModelError(f"malformed stream from {self.url}: a line of more than {MAX_LINE_CHARS} characters")
        if pending:
            yield pending.removesuffix("\r")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _message_of(body: Any) -> str:
    """The human part of an OpenAI-style (or FastAPI-style) error body."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return str(body)


def _error_message(response: httpx.Response) -> str:
    try:
        return _message_of(response.json())[:500]
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
