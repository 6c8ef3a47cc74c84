"""OpenAICompatModel against real HTTP servers on 127.0.0.1: `fcapp serve` over the real embedded
model (same greedy text and the same agent chain as running the model directly), and a tiny
stdlib server that scripts failures (5xx, 401, 404, malformed SSE, broken streams)."""

from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest
from helpers import GOOD, delta, error, sse

from fcapp.agent import Agent, AgentConfig, demonstration
from fcapp.models import get_model
from fcapp.models.base import ModelError, SamplingParams, complete
from fcapp.models.openai_compat import OpenAICompatModel
from fcapp.records import Call
from fcapp.serve import ServerThread, build_app
from fcapp.tools.base import Registry, tool_from_function


# ---- protocol and failures --------------------------------------------------------------------
def test_a_stream_is_parsed_and_the_request_carries_the_sampling_settings(scripted, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    server = scripted((200, GOOD, {}))
    model = get_model(f"{server.url}#teacher", api_key_env="TEACHER_KEY")
    assert model.model_id == "teacher"
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=33, seed=5, stop=["\n"])
    chunks = list(model.stream([{"role": "user", "content": "hi"}], None, params))
    assert "".join(c.text for c in chunks) == "Hello"
    assert chunks[-1].finished and (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (7, 2)
    sent = server.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-test"
    assert sent["body"] | {"messages": None} == {
        "model": "teacher", "messages": None, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 33, "seed": 5, "stop": ["\n"]}


def test_tool_results_go_out_as_user_messages_unless_tool_role_is_tool(scripted):
    server = scripted((200, GOOD, {}))
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "add(a=2, b=3)"},
                {"role": "tool", "content": "5"}]
    complete(server.model(), messages)
    complete(server.model(tool_role="tool"), messages)
    assert server.requests[0]["body"]["messages"][2] == {"role": "user", "content": "Result: 5"}
    assert server.requests[1]["body"]["messages"][2] == {"role": "tool", "content": "5"}


def test_without_usage_the_counts_stay_unknown(scripted):
    server = scripted((200, sse(delta("ok"), delta(finish="stop")), {}))
    chunks = list(server.model().stream([{"role": "user", "content": "hi"}]))
    assert [c.text for c in chunks] == ["ok", ""] and chunks[-1].finished
    assert chunks[-1].prompt_tokens is None and chunks[-1].completion_tokens is None


def test_5xx_and_429_are_retried_before_any_text(scripted):
    server = scripted(error(500, "busy"), error(429, "slow down", {"Retry-After": "0"}), (200, GOOD, {}))
    assert complete(server.model(max_retries=3), [{"role": "user", "content": "hi"}]).text == "Hello"
    assert len(server.requests) == 3


def test_retries_give_up_with_the_last_status(scripted):
    server = scripted(error(503, "overloaded"))
    with pytest.raises(ModelError, match=r"after 3 attempt\(s\): HTTP 503: overloaded"):
        complete(server.model(max_retries=2), [{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3


def test_a_timeout_is_retried_and_then_reported(scripted):
    server = scripted((200, GOOD, {}, 1.5), (200, GOOD, {}))
    assert complete(server.model(timeout_s=0.5, max_retries=1), [{"role": "user", "content": "hi"}]).text == "Hello"
    slow = scripted((200, GOOD, {}, 1.5))
    with pytest.raises(ModelError, match=r"did not answer within 0.5 s \(1 attempt"):
        complete(slow.model(timeout_s=0.5, max_retries=0), [{"role": "user", "content": "hi"}])


def test_a_stream_that_breaks_after_text_is_not_retried(scripted):
    server = scripted((200, sse(delta("partial"), done=False), {}), (200, GOOD, {}))
    seen: list[str] = []
    with pytest.raises(ModelError, match="broke after text"):
        for chunk in server.model().stream([{"role": "user", "content": "hi"}]):
            seen.append(chunk.text)
    assert seen == ["partial"] and len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_names_the_env_var(scripted, monkeypatch, status):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    server = scripted(error(status, "Incorrect API key provided"))
    expected = r"Incorrect API key provided.*check the API key \(\$NO_SUCH_KEY_VAR is not set\)"
    with pytest.raises(ModelError, match=expected):
        complete(server.model(api_key_env="NO_SUCH_KEY_VAR"), [{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_not_found_shows_the_servers_message(scripted):
    server = scripted(error(404, "model 'teacher' not found"))
    with pytest.raises(ModelError, match=r"HTTP 404: model 'teacher' not found.*base URL"):
        complete(server.model(), [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("pieces, match", [
    (sse("{not json"), "not JSON"),
    ([b'{"choices": []}\n'], "expected 'data:' lines"),
    (sse('["a list"]'), "unexpected event"),
    (sse(delta("x"), {"error": {"message": "out of memory"}}), "error mid-stream: out of memory"),
])
def test_malformed_streams_raise_clear_errors(scripted, pieces, match):
    server = scripted((200, pieces, {}))
    with pytest.raises(ModelError, match=match):
        complete(server.model(), [{"role": "user", "content": "hi"}])


def test_an_unreachable_server_fails_fast_naming_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAICompatModel(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2, max_retries=1, backoff_s=0.05)
    began = time.perf_counter()
    with pytest.raises(ModelError, match=rf"cannot reach http://127.0.0.1:{port}/v1/chat/completions after 2"):
        complete(model, [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - began < 5


def test_closing_the_stream_early_closes_the_response(scripted):
    pieces = sse(*[delta(f"t{i} ") for i in range(200)], delta(finish="stop"))
    server = scripted((200, pieces, {}), piece_delay_s=0.02)
    stream = server.model().stream([{"role": "user", "content": "hi"}])
    assert next(stream).text == "t0 "
    stream.close()
    assert server.hung_up.wait(10), "the server kept streaming to a closed generator"


def test_a_server_that_ignores_max_tokens_is_cut_off(scripted):
    """Before the fix such a reply was read for as long as the server kept sending."""
    from fcapp.models.openai_compat import MAX_CHARS_PER_TOKEN

    server = scripted((200, sse(*[delta("word ") for _ in range(20_000)], delta(finish="length")), {}))
    reply = complete(server.model(), [{"role": "user", "content": "hi"}], None, SamplingParams(max_new_tokens=4))
    assert reply.text == ("word " * 100)[:4 * MAX_CHARS_PER_TOKEN]
    assert server.hung_up.wait(10), "the client kept reading"


def test_a_reply_that_trickles_past_its_time_limit_is_cut_off(scripted):
    server = scripted((200, sse(*[delta("x") for _ in range(1_000)], delta(finish="stop")), {}), piece_delay_s=0.05)
    reply = complete(server.model(max_reply_s=1.0), [{"role": "user", "content": "hi"}])
    assert 0 < len(reply.text) < 1_000  # the whole reply would take 50 s
    assert server.hung_up.wait(10), "the client kept reading"


def test_a_line_that_never_ends_is_a_malformed_stream(scripted):
    from fcapp.models.openai_compat import MAX_LINE_CHARS

    server = scripted((200, [b"data: " + b"x" * (MAX_LINE_CHARS + 1)], {}))
    with pytest.raises(ModelError, match="malformed stream .* a line of more than"):
        complete(server.model(), [{"role": "user", "content": "hi"}])


def test_http_specs_need_a_model_name():
    with pytest.raises(ValueError, match="model name after '#'"):
        get_model("http://127.0.0.1:8000/v1")


# ---- against `fcapp serve` with the real model --------------------------------------------------
@pytest.fixture(scope="module")
def served(small_model) -> Iterator[ServerThread]:
    with ServerThread(build_app(small_model)) as server:
        yield server


def test_http_greedy_text_equals_the_local_models(served, small_model):
    http = get_model(f"{served.url}#{small_model.model_id}", tool_role="tool")
    messages = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "add(a=2, b=3)"}, {"role": "tool", "content": "5"}]
    params = SamplingParams(max_new_tokens=16, seed=3)
    remote, local = complete(http, messages, None, params), complete(small_model, messages, None, params)
    assert remote.text and remote.text == local.text
    assert (remote.prompt_tokens, remote.completion_tokens) == (local.prompt_tokens, local.completion_tokens)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def test_an_agent_chain_through_http_matches_the_local_one(served, small_model):
    tools = Registry([tool_from_function(add, examples=[{"a": 2, "b": 3}])])
    reference = [Call("add", {"a": 12, "b": 30}), Call("final_answer", {"answer": "42"})]
    demo = demonstration(tools, "What is 12+30?", reference)
    agent = Agent(tools, demo, AgentConfig(max_steps=3, sampling=SamplingParams(max_new_tokens=24)))
    http = get_model(f"{served.url}#{small_model.model_id}", tool_role="tool")
    chains = [agent.solve(model, agent.start("demo", "p", "What is 20+22?", model.model_id, seed=4))
              for model in (http, small_model)]
    remote, local = ([s.text for s in chain.steps] for chain in chains)
    assert remote and remote == local
    assert chains[0].answer == chains[1].answer and chains[0].stop_reason == chains[1].stop_reason
