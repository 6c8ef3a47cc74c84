"""Functions people write in the app, persisted next to the data, and the per-task on/off switches.

Layout under `data_home()/user_tools/` (every file written atomically: temp file + rename):

- `<name>.json`: one user function: {"name", "source", "examples", "created", "updated"};
- `enabled.json`: {task: {function name: true | false}}, the switches of the Functions tab.

Built-in functions are on unless switched off; a user function is off for a task until switched on
(saving one from a task's view switches it on there). `tools_for(task, problem)` is what every
chain uses (the CLI, generation, evaluation and the app all go through `fcapp.solve.build_agent`):
the task's built-in tools plus its enabled user functions, each running in the sandbox.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fcapp.files import atomic_write_json
from fcapp.paths import data_home
from fcapp.records import FINAL_ANSWER
from fcapp.tasks.base import Problem, Task
from fcapp.tools import namespaces
from fcapp.tools.base import Registry, SchemaError, Tool
from fcapp.tools.sandbox import define_user_tool

ENABLED_FILE = "enabled.json"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_lock = threading.Lock()  # serialises read-modify-write of enabled.json within this process


@dataclass
class UserFunction:
    name: str
    source: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0

    def tool(self) -> Tool:
        """The sandboxed Tool (validated again: a hand-edited file fails with a clear SchemaError)."""
        return _build(self.source, json.dumps(self.examples, sort_keys=True), self.name)


@lru_cache(maxsize=256)
def _build(source: str, examples_json: str, name: str | None) -> Tool:
    return define_user_tool(source, json.loads(examples_json), name=name)


def folder() -> Path:
    path = data_home() / "user_tools"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _task_name(task: Task | str) -> str:
    return task if isinstance(task, str) else task.name


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{path}: unreadable ({exc}); fix or delete the file") from None


def _path(name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise SchemaError(f"invalid function name {name!r}")
    return folder() / f"{name}.json"


# ---- user functions ---------------------------------------------------------------------------------
def parse_examples(text: str | list | None) -> list[dict[str, Any]]:
    """Examples typed as JSON: a list of argument objects (or one object). Raises SchemaError."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"examples are not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                              'write a list of argument objects, e.g. [{"x": 2}]') from None
    else:
        value = text
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SchemaError('examples must be a list of argument objects, e.g. [{"x": 2}]')
    return value


def builtin_names(task: Task | str) -> list[str]:
    """The task's built-in function names (read from its demonstration problem's toolkit)."""
    from fcapp.tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    problem, _ = task.demonstration()
    return [t.name for t in task.tools(problem)]


def save_function(source: str, examples: list[dict[str, Any]] | str | None = None, name: str | None = None,
                  enable_for: list[str] | None = None) -> UserFunction:
    """Validate (without running it) and store a user function; returns it. Raises SchemaError.

    `name` picks the function to expose when the source defines several. `enable_for`: tasks to
    switch it on for (a built-in of one of them with the same name is refused).
    """
    tool = define_user_tool(source, parse_examples(examples), name=name)
    reserved = {FINAL_ANSWER}
    for task in enable_for or []:
        reserved |= set(builtin_names(task))
    if tool.name in reserved:
        raise SchemaError(f"{tool.name!r} is already a built-in function; give yours another name")
    path = _path(tool.name)
    now = time.time()
    previous = _read_json(path, None)
    function = UserFunction(tool.name, source, tool.examples, (previous or {}).get("created", now), now)
    atomic_write_json(path, asdict(function))
    for task in enable_for or []:
        set_enabled(task, tool.name, True)
    return function


def list_functions() -> list[UserFunction]:
    """Every stored user function, by name."""
    functions = []
    for path in sorted(folder().glob("*.json")):
        if path.name == ENABLED_FILE:
            continue
        record = _read_json(path, None)
        if isinstance(record, dict) and {"name", "source"} <= set(record):
            functions.append(UserFunction(**{k: record[k] for k in UserFunction.__dataclass_fields__ if k in record}))
    return functions


def get_function(name: str) -> UserFunction | None:
    record = _read_json(_path(name), None)
    return UserFunction(**{k: record[k] for k in UserFunction.__dataclass_fields__ if k in record}) if record else None


def delete_function(name: str) -> bool:
    """Remove a user function (and its switches); False when there was none."""
    path = _path(name)
    if not path.exists():
        return False
    path.unlink()
    with _lock:
        flags = _read_json(folder() / ENABLED_FILE, {})
        for task_flags in flags.values():
            task_flags.pop(name, None)
        atomic_write_json(folder() / ENABLED_FILE, flags)
    return True


# ---- per-task switches --------------------------------------------------------------------------------
def enabled_flags(task: Task | str) -> dict[str, bool]:
    """The explicit switches of a task (names not listed take their default)."""
    flags = _read_json(folder() / ENABLED_FILE, {})
    return dict(flags.get(_task_name(task), {}))


def set_enabled(task: Task | str, name: str, enabled: bool) -> None:
    with _lock:
        path = folder() / ENABLED_FILE
        flags = _read_json(path, {})
        flags.setdefault(_task_name(task), {})[name] = bool(enabled)
        atomic_write_json(path, flags)


def function_rows(task: Task | str, problem: Problem | None = None) -> list[dict[str, Any]]:
    """What the Functions view lists: every built-in and user function with its state.

    Each row: name, kind (built-in / user), enabled, signature, description, examples (rendered
    calls), schema; a user function whose source no longer validates has `error` and no schema.
    """
    from fcapp.tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    problem = problem or task.demonstration()[0]
    flags = enabled_flags(task)
    rows: list[dict[str, Any]] = []
    builtins = list(task.tools(problem))
    for t in builtins:
        rows.append(_row(t, "built-in", flags.get(t.name, True)))
    taken = {t.name for t in builtins} | {FINAL_ANSWER}
    for function in list_functions():
        if function.name in taken:
            continue
        try:
            rows.append(_row(function.tool(), "user", flags.get(function.name, False)))
        except SchemaError as exc:
            rows.append({"name": function.name, "kind": "user", "enabled": False, "signature": function.name,
                         "description": "", "examples": [], "schema": None, "error": str(exc)})
    return rows


def _row(tool: Tool, kind: str, enabled: bool) -> dict[str, Any]:
    return {"name": tool.name, "kind": kind, "enabled": enabled, "signature": tool.signature(),
            "description": tool.description, "examples": [tool.render_call(e) for e in tool.examples],
            "schema": tool.schema(), "error": None}


def tools_for(task: Task | str, problem: Problem) -> Registry:
    """The task's built-in tools plus its enabled user functions, with switched-off ones disabled.

    A user function whose stored source no longer validates is left out (the Functions view shows
    why); one named like a built-in is left out (the built-in wins); all are left out while user
    functions are refused (no OS sandbox, and the operator did not opt in)."""
    from fcapp.tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    registry = Registry(list(task.tools(problem)))  # a copy: a task may share its toolkit object
    flags = enabled_flags(task)
    taken = set(registry.names()) | {FINAL_ANSWER}
    for function in [] if namespaces.refusal() else list_functions():
        if function.name in taken or not flags.get(function.name, False):
            continue
        try:
            registry.add(function.tool())
        except SchemaError:
            continue
    for name, enabled in flags.items():
        if not enabled and name in registry.names():
            registry.set_enabled(name, False)
    return registry


def find_tool(task: Task | str, name: str, problem: Problem | None = None) -> Tool:
    """A built-in or user function by name, enabled or not (for the try-call box)."""
    from fcapp.tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    problem = problem or task.demonstration()[0]
    for t in task.tools(problem):
        if t.name == name:
            return t
    function = get_function(name)
    if function is None:
        raise SchemaError(f"no function named {name!r}")
    return function.tool()
