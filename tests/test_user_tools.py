"""User functions persisted under the data folder, per-task switches, and what a chain's agent sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcapp import user_tools
from fcapp.tools.base import SchemaError

TRIPLE = '''
def triple(x: int) -> int:
    """Multiply a whole number by three.

    Args:
        x: the number
    """
    return 3 * x
'''


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def gsm8k():
    from fcapp.tasks import get_task

    return get_task("gsm8k")


def test_save_persists_and_validates_without_running(home, gsm8k):
    saved = user_tools.save_function(TRIPLE, '[{"x": 2}]', enable_for=["gsm8k"])
    assert saved.name == "triple" and saved.examples == [{"x": 2}]
    record = json.loads((home / "user_tools" / "triple.json").read_text())
    assert record["source"] == TRIPLE and record["examples"] == [{"x": 2}]
    assert [f.name for f in user_tools.list_functions()] == ["triple"]
    assert user_tools.get_function("triple").tool().call({"x": 5}) == "15"  # runs in the sandbox
    assert not [p for p in (home / "user_tools").iterdir() if p.name.startswith(".")]  # no temp files left

    first = saved.created
    again = user_tools.save_function(TRIPLE.replace("3 * x", "x * 3"), [{"x": 1}])
    assert again.created == first and again.updated >= first


def test_a_never_executed_source_cannot_touch_the_app(home, tmp_path):
    marker = tmp_path / "ran"
    source = f'open({str(marker)!r}, "w").close()\n' + TRIPLE
    user_tools.save_function(source)
    assert not marker.exists()


@pytest.mark.parametrize("source, examples, message", [
    ("def f(x):\n    '''Doc.'''\n    return x\n", None, "needs a type hint"),
    ("def f(x: int) -> int:\n    return x\n", None, "docstring"),
    ("def f(x: int) -> int\n    return x\n", None, "syntax error on line 1"),
    (TRIPLE, '[{"y": 1}]', "does not fit the signature"),
    (TRIPLE, "[{x: 1}]", "not valid JSON"),
    (TRIPLE, '"x"', "list of argument objects"),
    (TRIPLE.replace("triple", "calculator"), None, "already a built-in"),
    (TRIPLE.replace("triple", "final_answer"), None, "already a built-in"),
])
def test_bad_functions_are_refused_clearly(home, source, examples, message):
    with pytest.raises(SchemaError, match=message):
        user_tools.save_function(source, examples, enable_for=["gsm8k"])
    assert user_tools.list_functions() == []


def test_switches_are_per_task_and_reach_the_agent(home, gsm8k):
    from fcapp.solve import build_agent

    problem = gsm8k.demonstration()[0]
    user_tools.save_function(TRIPLE, [{"x": 2}])  # saved, but on for no task yet
    assert "triple" not in user_tools.tools_for(gsm8k, problem).names()

    user_tools.set_enabled("gsm8k", "triple", True)
    user_tools.set_enabled("gsm8k", "simplify", False)
    names = user_tools.tools_for(gsm8k, problem).names()
    assert "triple" in names and "simplify" not in names and "calculator" in names
    assert user_tools.enabled_flags("folio") == {}  # another task keeps its defaults

    agent = build_agent(gsm8k, problem)  # what CLI, generation, evaluation and the app all use
    system = agent.system_prompt()
    assert "triple(x: integer)" in system and "Example: triple(x=2)" in system
    assert "simplify(" not in system
    step = agent.execute("triple(x=7)")
    assert step.error is None and step.result == "21"

    rows = {r["name"]: r for r in user_tools.function_rows("gsm8k")}
    assert rows["triple"]["kind"] == "user" and rows["triple"]["enabled"]
    assert rows["simplify"]["kind"] == "built-in" and not rows["simplify"]["enabled"]
    assert rows["triple"]["examples"] == ["triple(x=2)"]
    assert gsm8k.tools(problem).names().count("simplify") == 1  # the task's own toolkit is untouched


def test_state_survives_a_restart(home):
    user_tools.save_function(TRIPLE, [{"x": 2}], enable_for=["gsm8k"])
    user_tools.set_enabled("gsm8k", "percentage", False)
    code = ("from fcapp import user_tools; from fcapp.tasks import get_task; t = get_task('gsm8k'); "
            "print(sorted(user_tools.tools_for(t, t.demonstration()[0]).names()))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FCAPP_HOME=str(home)),
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    names = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert "triple" in names and "percentage" not in names


def test_delete_and_a_broken_file(home, gsm8k):
    user_tools.save_function(TRIPLE, enable_for=["gsm8k"])
    (home / "user_tools" / "half.json").write_text(json.dumps({"name": "half", "source": "def half(:"}))
    user_tools.set_enabled("gsm8k", "half", True)
    rows = {r["name"]: r for r in user_tools.function_rows("gsm8k")}
    assert "syntax error" in rows["half"]["error"] and not rows["half"]["enabled"]
    assert "half" not in user_tools.tools_for(gsm8k, gsm8k.demonstration()[0]).names()  # left out, no crash

    assert user_tools.delete_function("triple") and not user_tools.delete_function("triple")
    assert "triple" not in user_tools.enabled_flags("gsm8k")
    with pytest.raises(SchemaError, match="invalid function name"):
        user_tools.get_function("../etc")


def test_find_tool_for_the_try_call_box(home, gsm8k):
    from fcapp.tools.sandbox import try_call

    user_tools.save_function(TRIPLE)
    assert try_call(user_tools.find_tool("gsm8k", "triple"), {"x": 3})[:2] == (True, "9")
    ok, text, _ = try_call(user_tools.find_tool("gsm8k", "calculator"), {"expression": "2*21"})
    assert ok and text.startswith("42")
    ok, text, _ = try_call(user_tools.find_tool("gsm8k", "triple"), {"x": "three"})
    assert not ok and "integer" in text
    with pytest.raises(SchemaError, match="no function"):
        user_tools.find_tool("gsm8k", "nope")


def test_edit_answer_is_re_verified(gsm8k):
    """The Curate tab's edit: the final answer replaced, the verifier run again."""
    from fcapp.solve import edit_final_answer, reference_chain
    from fcapp.ui.common import chain_messages

    problem = next(p for p in gsm8k.split("train") if gsm8k.reference_calls(p))
    record = reference_chain(gsm8k, problem).to_dict()
    wrong = edit_final_answer(record, "-5")
    assert wrong.verdict is False and wrong.answer == "-5" and wrong.steps[-1].call.arguments == {"answer": "-5"}
    right = edit_final_answer(wrong.to_dict(), problem.answer)
    assert right.verdict is True and len(right.steps) == len(record["steps"])
    with pytest.raises(ValueError):
        edit_final_answer(record, "  ")
    messages = chain_messages(right, problem.answer)
    assert messages[0]["role"] == "user" and "final_answer(" in messages[-2]["metadata"]["title"]
    assert "✓ correct" in messages[-1]["content"]
