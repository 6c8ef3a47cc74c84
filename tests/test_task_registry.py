"""The task registry: names, cached instances, clear errors, lazy imports, user files."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fcapp.files import DataFileError
from fcapp.tasks import TASKS, get_task, load_problems, task_names
from fcapp.tasks.base import Problem, Task

ROOT = Path(__file__).resolve().parent.parent
HAS_FOL = importlib.util.find_spec("fcapp.tasks.fol") is not None


def test_task_names() -> None:
    assert task_names() == ["gsm8k", "fol", "folio", "folio-fol", "folio-nl"] == list(TASKS)


def test_get_task_returns_one_cached_instance() -> None:
    task = get_task("gsm8k")
    assert isinstance(task, Task) and task.name == "gsm8k"
    assert get_task("gsm8k") is task


@pytest.mark.parametrize("name", ["", "GSM8K", "math", "gsm8k "])
def test_unknown_task_lists_valid_names(name: str) -> None:
    with pytest.raises(KeyError) as info:
        get_task(name)
    assert f"unknown task {name!r}" in str(info.value)
    assert "gsm8k, fol, folio" in str(info.value)


def test_importing_the_registry_loads_no_task_module() -> None:
    code = "import sys, fcapp.tasks; print(sorted(m for m in sys.modules if m.startswith('fcapp.tasks.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fcapp.tasks.base']"


@pytest.mark.skipif(not HAS_FOL, reason="fcapp/tasks/fol.py is not written yet")
@pytest.mark.parametrize("name", ["fol", "folio"])
def test_fol_tasks_resolve(name: str) -> None:
    task = get_task(name)
    assert task.name == name and get_task(name) is task


def test_load_problems_delegates_to_the_task(tmp_path: Path) -> None:
    path = tmp_path / "user.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4. How many now?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
            {"id": "u2", "question": "Half of 1,000?", "answer": "<<1000/2=500>>500\n#### 500"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = load_problems("gsm8k", path)
    problems = loaded.problems
    assert all(isinstance(p, Problem) and p.task == "gsm8k" for p in problems)
    assert [(p.answer, p.question) for p in problems] == [("7", rows[0]["question"]), ("500", rows[1]["question"])]
    assert problems[1].id == "u2" and loaded.skipped == []
    assert problems == get_task("gsm8k").load_file(path).problems


def test_load_problems_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q?", "answer": "#### 1"}\n{"question": "q?"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:2: missing field 'answer'"):
        load_problems("gsm8k", path, strict=True)
    path.write_text('{"question": "q?"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}: no usable problems .*:1: missing field"):
        load_problems("gsm8k", path)  # nothing usable is an error even when malformed rows are skipped
    with pytest.raises(DataFileError, match="cannot read"):
        load_problems("gsm8k", tmp_path / "absent.jsonl")
    with pytest.raises(KeyError, match="valid tasks"):
        load_problems("nope", path)
