"""Keys of HTTP teachers, as a specification: the operator configures teachers (URL, model, key
variable) at launch or in a file; the browser picks one by name or types a URL, never an environment
variable; a key goes only to the host it was configured for. Real HTTP servers on 127.0.0.1 stand in
for the teachers and record what reached them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pytest
from helpers import delta, sse

from fcapp.models import get_model, teachers
from fcapp.models.base import ModelError, complete
from fcapp.models.teachers import Teacher, parse_teacher, read_teachers
from fcapp.store import Store
from fcapp.ui import common, compare, solve

KEY = "sk-canary-0b5e"
ANSWER = (200, sse(delta('final_answer(answer="72")'), delta(finish="stop")), {})


@pytest.fixture
def keyed(scripted, monkeypatch) -> Iterator[Any]:
    """A teacher server configured with a key (TEACHER_KEY), while the app's environment also
    holds OPENAI_API_KEY (what the Solve tab used to send to any URL)."""
    monkeypatch.setenv("TEACHER_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = scripted(ANSWER)
    teachers.configure(flags=[f"keyed={server.url}#big-model,TEACHER_KEY"])
    yield server
    teachers.configure()


def authorization(server) -> list[str | None]:
    """The Authorization header of each request the server received."""
    return [request["headers"].get("Authorization") for request in server.requests]


def solve_tab_run(db: Path) -> Any:
    """The Solve tab's run handler, as the browser's click calls it (the tab has no field that
    names an environment variable)."""
    with gr.Blocks() as demo:
        with gr.Tabs() as tabs:
            solve.build(common.Context(Store(db), tabs, gr.State(0), gr.State(0)))
    (run,) = [f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "run"]
    labels = [str(getattr(block, "label", "") or "") for block in demo.blocks.values()]
    assert not [label for label in labels if "environment" in label.lower()], labels
    (verdict,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "solve-verdict"]
    return lambda *args: [update[verdict] for update in run(*args, None) if verdict in update]


def solve_with(run: Any, spec: str) -> str:
    """Solve gsm8k-0 with `spec` through the tab; the last verdict note."""
    return run("gsm8k", "train", "gsm8k-0", "", "", spec, 2, 0.0, 1.0, 32, 0, False)[-1]


def test_the_solve_tab_cannot_send_a_key_to_an_unconfigured_host(keyed, scripted, tmp_path) -> None:
    """Before the fix the tab took a URL and a variable name from the browser and sent that
    variable's value, as a bearer token, to that URL."""
    elsewhere = scripted(ANSWER)
    run = solve_tab_run(tmp_path / "app.db")
    assert "Answer: **72**" in solve_with(run, f"{elsewhere.url}#any-model")
    assert "Answer: **72**" in solve_with(run, f"{keyed.url}#big-model")  # the right host, typed: still no key
    assert authorization(elsewhere) == [None] and authorization(keyed) == [None]
    assert "Answer: **72**" in solve_with(run, "teacher:keyed")  # picked by name: its key, to its host
    assert authorization(keyed) == [None, f"Bearer {KEY}"] and authorization(elsewhere) == [None]
    assert "no configured teacher 'other'" in solve_with(run, "teacher:other")


def test_configured_teachers_are_offered_by_name(keyed) -> None:
    assert common.model_choices()[-1] == "teacher:keyed"
    model = common.get_model("teacher:keyed")
    assert (model.url, model.model_id) == (f"{keyed.url}/chat/completions", "big-model")


def test_compare_s_model_b_is_the_newest_tuned_model_never_a_teacher_or_a_quantised_base(keyed) -> None:
    embedded = common.EMBEDDED
    assert compare.tuned_default(common.model_choices()) == embedded  # only the teacher besides the base
    listed = [embedded, "fol-2", "fol-1", f"{embedded}@int8", f"{embedded}@int4", "teacher:keyed"]
    assert compare.tuned_default(listed) == "fol-2"


def test_a_key_does_not_follow_a_redirect(scripted, monkeypatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", KEY)
    other = scripted(ANSWER)
    redirecting = scripted((307, [b""], {"Location": f"{other.url}/chat/completions"}))
    teachers.configure(flags=[f"moved={redirecting.url}#m,TEACHER_KEY"])
    model = get_model("teacher:moved")
    try:
        with pytest.raises(ModelError, match="HTTP 307"):
            complete(model, [{"role": "user", "content": "hi"}])
    finally:
        teachers.configure()
    assert authorization(redirecting) == [f"Bearer {KEY}"] and other.requests == []


def test_a_url_without_a_configured_teacher_gets_no_key_in_the_library_either(scripted, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = scripted(ANSWER)
    complete(get_model(f"{server.url}#m"), [{"role": "user", "content": "hi"}])
    complete(get_model(f"{server.url}#m", api_key_env="OPENAI_API_KEY"), [{"role": "user", "content": "hi"}])
    assert authorization(server) == [None, f"Bearer {KEY}"]  # the CLI names the variable: --api-key-env


# ---- configuration --------------------------------------------------------------------------------
def test_teachers_come_from_the_data_folder_a_file_and_flags(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "teachers.json").write_text(json.dumps({"teachers": [
        {"name": "gpt", "url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "key_env": "OPENAI_API_KEY"},
        {"name": "box", "url": "http://gpu-box:8000/v1", "model": "llama"}]}))
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps({"teachers": [{"name": "box", "url": "http://other:8000/v1", "model": "qwen"}]}))
    try:
        configured = teachers.configure([extra], ["local=http://127.0.0.1:8000/v1#smollm2"])
        assert configured == [Teacher("gpt", "https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY"),
                              Teacher("box", "http://other:8000/v1", "qwen"),
                              Teacher("local", "http://127.0.0.1:8000/v1", "smollm2")]
        assert [t.spec for t in teachers.configured()] == ["teacher:gpt", "teacher:box", "teacher:local"]
    finally:
        monkeypatch.undo()
        teachers.configure()


@pytest.mark.parametrize("flag, message", [
    ("gpt", "write NAME=URL#MODEL"),
    ("gpt=https://api.openai.com/v1", "write NAME=URL#MODEL"),
    ("gpt=ftp://x/v1#m", "must start with http"),
    ("../x=http://h/v1#m", "teacher name"),
    ("gpt=http://h/v1#m,NOT-A-VAR", "not an environment variable name"),
    ("gpt=http://h/v1#", "no model name"),
])
def test_a_bad_teacher_flag_is_refused_clearly(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_teacher(flag)


@pytest.mark.parametrize("text, message", [
    ("{oops", "cannot read the teachers file"),
    ('[{"name": "a"}]', "expected"),
    ('{"teachers": [{"name": "a", "url": "http://h/v1", "model": "m", "key": "sk-inline"}]}', "unknown field"),
    ('{"teachers": [{"name": "a", "url": "h/v1", "model": "m"}]}', "teacher 1: .*http"),
])
def test_a_bad_teachers_file_names_the_file_and_changes_nothing(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "teachers.json"
    path.write_text(text)
    before = teachers.configured()
    with pytest.raises(ValueError, match=message) as raised:
        teachers.configure([path])
    assert str(path) in str(raised.value) and teachers.configured() == before
    with pytest.raises(ValueError, match=message):
        read_teachers(path)
