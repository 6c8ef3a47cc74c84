"""`fcapp serve` over the real embedded model, spoken to over real HTTP on 127.0.0.1 by the official
openai client and by httpx: chat (streamed and not), sampling settings, stop strings, errors,
API keys, generation stopping when the client goes away, concurrent requests decoded in one
batch, a request joining a running batch, and hostile requests (out-of-range values, prompts past
the context, huge bodies) each refused alone, with the server answering the next one normally."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from fcapp.models.base import Chunk, SamplingParams
from fcapp.serve import _DOOR, MAX_BODY_BYTES, Reply, ServerThread, build_app, check_exposure, serve

HI = [{"role": "user", "content": "Say hello to Ada."}]


@pytest.fixture(scope="module")
def served(small_model) -> Iterator[ServerThread]:
    with ServerThread(build_app(small_model)) as server:
        yield server


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, small_model):
    assert [m.id for m in client.models.list()] == [small_model.model_id]


def test_chat_streamed_and_not_gives_the_same_greedy_text(client, small_model):
    kw: dict[str, Any] = {"model": small_model.model_id, "messages": HI, "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_max_completion_tokens_limits_the_reply(client, small_model):
    reply = client.chat.completions.create(model=small_model.model_id, messages=HI, temperature=0,
                                           max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_a_seed_makes_sampling_repeatable(client, small_model):
    kw: dict[str, Any] = {"model": small_model.model_id, "messages": HI, "temperature": 1.0, "top_p": 0.9,
                          "max_tokens": 8, "seed": 11}
    first, second = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert first == second


def test_stop_strings_are_cut_from_the_reply(client, small_model):
    kw: dict[str, Any] = {"model": small_model.model_id, "messages": HI, "temperature": 0, "max_tokens": 12}
    full = client.chat.completions.create(**kw).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]  # a multi-character stop string in the middle of the reply
    expected = full[:full.index(stop)]
    whole = client.chat.completions.create(**kw, stop=[stop, "never appears"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_reply_holds_back_only_what_could_start_a_stop_string():
    reply = Reply(SamplingParams(max_new_tokens=10, stop=["END"]))
    assert reply.feed(Chunk("abc E", 5, 1)) == "abc "  # "E" might begin "END"
    assert reply.feed(Chunk("x", 5, 2)) == "Ex"
    assert reply.feed(Chunk("yEN", 5, 3)) == "y"
    assert reply.feed(Chunk("Dzz", 5, 4)) == "" and reply.stopped
    assert reply.content == "abc Exy" and reply.finish_reason == "stop"


def assert_still_answers(served, model_id: str) -> None:
    """After any refusal, the next request is answered normally."""
    response = httpx.post(f"{served.url}/chat/completions", timeout=120,
                          json={"model": model_id, "messages": HI, "temperature": 0, "max_tokens": 3})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "temperature": -0.1}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 5_000}, "max_completion_tokens"),
    ({"messages": HI, "seed": 2**64}, "seed"),  # before the fix: a 500 from torch's manual_seed
    ({"messages": HI, "seed": -(2**63) - 1}, "seed"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "n": 2}, "n"),
], ids=["no-messages", "temperature-high", "temperature-negative", "top-p-zero", "top-p-high", "bad-role",
        "max-tokens-zero", "max-tokens-huge", "max-completion-tokens-huge", "seed-past-64-bits",
        "seed-below-64-bits", "five-stops", "n"])
def test_invalid_requests_get_400_with_an_openai_error(served, small_model, body, param):
    response = httpx.post(f"{served.url}/chat/completions", json={"model": small_model.model_id, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert_still_answers(served, small_model.model_id)


def test_a_number_json_cannot_hold_is_an_unreadable_body(served, small_model):
    content = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": 1%s}' % (
        small_model.model_id, "0" * 5_000)  # Python reads no JSON integer past 4,300 digits
    response = httpx.post(f"{served.url}/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert_still_answers(served, small_model.model_id)


LONG = [{"role": "user", "content": "hello " * 9_000}]  # ~9,000 tokens: more than SmolLM2's 8,192


@pytest.mark.parametrize("messages, max_tokens", [(LONG, None), (LONG, 10), ([HI[0], *LONG], 4096),
                                                  ([{"role": "user", "content": "hello " * 7_900}], 400)],
                         ids=["prompt-alone", "prompt-and-reply", "both-long", "reply-past-the-room"])
def test_a_prompt_past_the_context_is_refused_before_it_is_decoded(served, small_model, messages, max_tokens):
    """Before the fix a 9,031-token prompt ran for 192 s and held 3.3 GB before it failed."""
    body = {"model": small_model.model_id, "messages": messages, "max_tokens": max_tokens}
    response = httpx.post(f"{served.url}/chat/completions", json=body, timeout=120)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("context_length_exceeded", "messages",
                                                              "invalid_request_error")
    assert_still_answers(served, small_model.model_id)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_gets_413_without_being_parsed(served, small_model, chunked):
    """Before the fix a 200 MB body was read and parsed."""
    text = json.dumps({"model": small_model.model_id, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
    content = iter([text[i:i + 65536].encode() for i in range(0, len(text), 65536)]) if chunked else text.encode()
    response = httpx.post(f"{served.url}/chat/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert_still_answers(served, small_model.model_id)


def test_bad_json_and_unknown_models_are_refused(served, client):
    response = httpx.post(f"{served.url}/chat/completions", content=b"{oops",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-9", messages=HI)


class Recorder:
    """The real model as a plain ChatModel (served one request per thread), with a record of how its
    stream ended."""

    def __init__(self, model: Any) -> None:
        self.model, self.model_id = model, model.model_id
        self.ended = threading.Event()
        self.stopped_early = False
        self.tokens = 0

    def stream(self, messages, tools=None, params=None) -> Iterator[Chunk]:
        self.stopped_early = True
        try:
            for chunk in self.model.stream(messages, tools, params):
                self.tokens = chunk.completion_tokens or self.tokens
                yield chunk
            self.stopped_early = False
        finally:
            self.ended.set()


class BatchRecorder(Recorder):
    """The same record of a model with generate_continuous (served by the batcher): how the
    request's row ended."""

    def generate_continuous(self, requests, slots, stop_when=None) -> Iterator[None]:
        def recorded(slot, reply):
            if reply is not None and reply.stop_reason and not self.ended.is_set():
                self.tokens, self.stopped_early = reply.completion_tokens, reply.stop_reason == "stop"
                self.ended.set()
            return requests(slot, reply)

        yield from self.model.generate_continuous(recorded, slots, stop_when)


COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


@pytest.mark.parametrize("wrapper", [Recorder, BatchRecorder])
@pytest.mark.parametrize("stream", [True, False])
def test_generation_stops_when_the_client_goes_away(small_model, stream, wrapper):
    recorder = wrapper(small_model)
    body = {"model": small_model.model_id, "messages": COUNT, "temperature": 0, "max_tokens": 400, "stream": stream}
    with ServerThread(build_app(recorder)) as server:
        if stream:
            with httpx.stream("POST", f"{server.url}/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                        break  # the first text arrived: hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        assert recorder.ended.wait(30)
    assert recorder.stopped_early and recorder.tokens < 400


def test_a_model_without_stream_batch_is_served_one_request_per_thread(client, small_model):
    app = build_app(Recorder(small_model))
    assert app.state.batcher is None
    kw: dict[str, Any] = {"model": small_model.model_id, "messages": HI, "temperature": 0, "max_tokens": 12}
    with ServerThread(app) as server:
        alone = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert alone.chat.completions.create(**kw).model_dump(include={"choices", "usage"}) == \
            client.chat.completions.create(**kw).model_dump(include={"choices", "usage"})


# ---- concurrent requests, decoded in one batch ---------------------------------------------------
class Gated:
    """The real model, its `generate_continuous` recording each decode: the most requests
    decoding at once, and each request's reply as its row ends (the door's rows left out). While
    `gate` is clear a decode waits before it starts, so that requests pile up behind it; `fail`
    makes a decode raise after its first token; `idle` is set between decodes."""

    def __init__(self, model: Any) -> None:
        self.local = model
        self.peak = 0
        self.ends: list[Any] = []
        self.gate, self.at_gate, self.idle = threading.Event(), threading.Event(), threading.Event()
        self.gate.set()
        self.idle.set()
        self.fail = False

    def __getattr__(self, name: str) -> Any:  # the model's own encode, model_id, config ...
        return getattr(self.local, name)

    def generate_continuous(self, requests, slots, stop_when=None) -> Iterator[None]:
        self.idle.clear()
        try:
            yield from self._decode(requests, slots, stop_when)
        finally:
            self.idle.set()

    def _decode(self, requests, slots, stop_when) -> Iterator[None]:
        self.at_gate.set()
        self.gate.wait()
        decoding: set[int] = set()

        def counted(slot, reply):
            if reply is not None and slot in decoding:
                decoding.discard(slot)
                self.ends.append(reply)
            conversation = requests(slot, reply)
            if conversation is not None and conversation is not _DOOR:
                decoding.add(slot)
                self.peak = max(self.peak, len(decoding))
            return conversation

        for step in self.local.generate_continuous(counted, slots, stop_when):
            yield step
            if self.fail:
                raise RuntimeError("the model broke down")


class Rig:
    """A server (batches of 4 at most) over a Gated model."""

    def __init__(self, model: Gated, server: ServerThread, waiting: Any) -> None:
        self.model, self.server, self.waiting = model, server, waiting
        self.url = f"{server.url}/chat/completions"

    def body(self, messages: list, **kw: Any) -> dict[str, Any]:
        return {"model": self.model.model_id, "messages": messages, "temperature": 0, "max_tokens": 16, **kw}

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url, json=body, timeout=60)

    def together(self, calls: list[Callable[[], Any]], reaching: int | None = None) -> list[Any]:
        """Run `calls` at once while a first request holds the batcher at the gate, then open it:
        the `reaching` of them that reach the batcher (all, unless some are refused before) start
        decoding with the holder. Their results, in order."""
        assert self.model.idle.wait(30), "the last decode never ended"  # else the holder would join it
        self.model.gate.clear()
        self.model.at_gate.clear()
        self.model.peak = 0
        with ThreadPoolExecutor(len(calls) + 1) as pool:
            holder = pool.submit(self.post, self.body(HI, max_tokens=1))
            assert self.model.at_gate.wait(30)
            futures = [pool.submit(call) for call in calls]
            deadline = time.monotonic() + 30
            while self.waiting.qsize() < (len(calls) if reaching is None else reaching):
                assert time.monotonic() < deadline, "the requests never reached the batcher"
                time.sleep(0.01)
            self.model.gate.set()
            holder.result()
            return [future.result() for future in futures]


@pytest.fixture
def rig(small_model) -> Iterator[Rig]:
    model = Gated(small_model)
    app = build_app(model, max_batch=4)
    with ServerThread(app) as server:
        yield Rig(model, server, app.state.batcher.waiting)


def answer(response: httpx.Response) -> tuple[str, dict | None]:
    """(text, usage) of a chat completion, streamed or not."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        data = response.json()
        return data["choices"][0]["message"]["content"], data["usage"]
    events = [json.loads(line[5:]) for line in response.text.splitlines()
              if line.startswith("data:") and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    return text, next((e["usage"] for e in events if e.get("usage")), None)


ASKS = [HI, [{"role": "user", "content": "Name three colours."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Write a haiku about rain."}], COUNT]


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(rig):
    bodies = [rig.body(ASKS[0]), rig.body(ASKS[1], stream=True, stream_options={"include_usage": True}),
              rig.body(ASKS[2], temperature=0.9, top_p=0.95, seed=7), rig.body(ASKS[3], max_tokens=9),
              rig.body(ASKS[4], temperature=0.7, seed=1)]
    alone = [answer(rig.post(body)) for body in bodies]
    assert rig.model.peak == 1 and all(text for text, _ in alone)
    together = rig.together([lambda body=body: answer(rig.post(body)) for body in bodies])
    assert rig.model.peak == 4  # the holder and three, the others taking the slots that free up
    assert together == alone


def test_a_bad_request_among_concurrent_ones_fails_alone(rig):
    """Before the fix a seed past 64 bits joined the batch and failed every request in it."""
    good = [rig.body(ASKS[0]), rig.body(ASKS[2], temperature=0.9, seed=3)]
    alone = [answer(rig.post(body)) for body in good]
    bad = [rig.body(HI, seed=2**64), rig.body(LONG), rig.body(HI, temperature=7)]
    first, *refused, second = rig.together([lambda body=body: rig.post(body) for body in [good[0], *bad, good[1]]],
                                           reaching=2)
    assert [answer(first), answer(second)] == alone
    assert [r.status_code for r in refused] == [400, 400, 400]


def test_a_short_request_joins_a_long_one_instead_of_waiting_for_it(served, small_model):
    """Before the fix a request waited for the whole running batch: a 600-token reply held a small
    one for 34 s. Now it takes a slot in the running decode and is answered while the long one
    still streams (and answers exactly as alone)."""
    short = {"model": small_model.model_id, "messages": HI, "temperature": 0, "max_tokens": 4}
    alone = answer(httpx.post(f"{served.url}/chat/completions", json=short, timeout=120))
    long = {"model": small_model.model_id, "messages": COUNT, "temperature": 0, "max_tokens": 300, "stream": True}
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", f"{served.url}/chat/completions", json=long,
                                                     timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                break  # the long reply is decoding
        joined = pool.submit(lambda: httpx.post(f"{served.url}/chat/completions", json=short, timeout=120))
        long_finished = False
        for line in lines:
            long_finished = '"finish_reason":"' in line.replace(" ", "") or line == "data: [DONE]"
            if joined.done() or long_finished:
                break
        assert not long_finished, "the short request waited for the long one"
        assert answer(joined.result()) == alone
    assert_still_answers(served, small_model.model_id)


def test_a_client_leaving_a_batch_does_not_disturb_the_others(rig):
    stayers = [rig.body(COUNT, max_tokens=40), rig.body([{"role": "user", "content": "List the numbers from 100 "
                                                                                       "to 200."}], max_tokens=40)]
    alone = [answer(rig.post(body)) for body in stayers]

    def leave() -> None:
        with httpx.stream("POST", rig.url, json=rig.body(COUNT, max_tokens=400, stream=True), timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                    return  # the first text arrived: hang up

    rig.model.ends.clear()
    *stayed, _ = rig.together([lambda body=body: answer(rig.post(body)) for body in stayers] + [leave])
    assert stayed == alone and rig.model.peak == 4
    deadline = time.monotonic() + 30
    while len(rig.model.ends) < 4:  # the holder's, the stayers' and the leaver's rows
        assert time.monotonic() < deadline, "the leaver's row never ended"
        time.sleep(0.01)
    holder, leaver, *stayers_tokens = sorted(reply.completion_tokens for reply in rig.model.ends)
    assert holder == 1 and leaver < 40 and stayers_tokens == [usage["completion_tokens"] for _, usage in alone] == [40, 40]


def test_a_model_error_fails_its_batch_and_the_server_goes_on(rig):
    rig.model.fail = True
    whole, streamed = rig.together([lambda: rig.post(rig.body(HI)), lambda: rig.post(rig.body(ASKS[1], stream=True))])
    assert rig.model.peak == 3
    assert whole.status_code == 500
    assert whole.json()["error"] == {"message": "generation failed: the model broke down", "type": "server_error",
                                     "param": None, "code": None}
    lines = [line for line in streamed.text.splitlines() if line.startswith("data:")]
    assert json.loads(lines[-2][5:])["error"]["message"] == "generation failed: the model broke down"
    assert lines[-1] == "data: [DONE]"
    rig.model.fail = False
    text, usage = answer(rig.post(rig.body(HI)))
    assert text and usage["completion_tokens"] > 0


def test_an_api_key_is_required_when_set(small_model):
    with ServerThread(build_app(small_model, api_key="s3cret")) as server:
        assert httpx.get(f"{server.url}/models").status_code == 401
        wrong = httpx.get(f"{server.url}/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [small_model.model_id]
        for route in ("/docs", "/openapi.json", "/redoc", "/no-such-route"):  # before the fix: /docs was open
            root = server.url.removesuffix("/v1")
            assert httpx.get(root + route).status_code == 401, route
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{root}/openapi.json", headers=key).json()["info"]["title"]
        assert httpx.get(f"{root}/docs", headers=key).status_code == 200


def test_a_public_host_needs_an_api_key():
    with pytest.raises(ValueError, match="without an API key.*--api-key-env NAME"):  # a flag that exists
        serve("smollm2", "0.0.0.0", 0)  # refused before any model loads
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        serve("smollm2", "127.0.0.1", 0, max_batch=0)  # also before the model loads
    with pytest.raises(ValueError, match="without an API key"):
        check_exposure("192.168.1.10", None)
    check_exposure("0.0.0.0", "key")
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        check_exposure(host, None)
