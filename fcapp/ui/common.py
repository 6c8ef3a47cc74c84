"""What the tabs share: the model cache and its single slot, busy notes, chain -> chat messages,
choice lists. No tab logic lives here beyond formatting; every action is a library call."""

from __future__ import annotations

import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from fcapp.models import teachers
from fcapp.models.registry import EMBEDDED, list_models, model_id, tuned_model_dir
from fcapp.paths import data_dir
from fcapp.records import FINAL_ANSWER, Chain, Event, Step
from fcapp.store import Store
from fcapp.tools.base import render_call

# Every event that generates text with a model shares this concurrency id (limit 1): a live
# solve, a comparison, a generation job and an evaluation queue for the one slot instead of
# fighting over two CPU cores. Training runs in its own process and does not take the slot.
MODEL_SLOT = "model"


@dataclass
class Context:
    """Handed to every tab's `build`: the store the app works on, and what to run on page load."""

    store: Store
    loaders: list[tuple[Any, list, list]] = field(default_factory=list)  # (fn, inputs, outputs) for app.load


# ---- models -------------------------------------------------------------------------------------
_models: dict[tuple[str, object], Any] = {}
_models_lock = threading.Lock()
MAX_LOCAL_MODELS = 3  # the embedded model stays; tuned ones are dropped oldest first
MODEL_HELP = ("'smollm2' (embedded), a tuned model's name, a teacher the operator configured (teacher:NAME, "
              "with its key), or an OpenAI-compatible server as http://HOST:PORT/v1#MODEL (called without a key)")


def _version(spec: str) -> object:
    """Changes when what `spec` names changes: a tuned model (re)written, a teacher reconfigured;
    so a stale copy is not served."""
    if spec.startswith(teachers.PREFIX):
        return next((t for t in teachers.configured() if t.spec == spec), None)
    folder = tuned_model_dir(spec)
    try:
        return (folder / "config.json").stat().st_mtime if folder else 0.0
    except OSError:
        return 0.0


def get_model(spec: str | None) -> Any:
    """A loaded model for `spec` (see MODEL_HELP), loaded once per app process (the embedded one is
    never dropped). Only a configured teacher is sent a key: a URL typed in the browser gets none."""
    from fcapp.models import get_model as load

    spec = model_id(spec)  # every name of the embedded model shares one loaded copy
    key = (spec, _version(spec))
    with _models_lock:
        if key not in _models:
            local = [k for k in _models if k[0] != EMBEDDED
                     and not k[0].startswith(("http://", "https://", teachers.PREFIX))]
            while len(local) >= MAX_LOCAL_MODELS - 1:
                _models.pop(local.pop(0))
            _models[key] = load(spec)
        return _models[key]


def model_choices() -> list[str]:
    """The embedded model, every registered tuned model (newest first), then the configured teachers."""
    names = [EMBEDDED]
    try:
        names += [m["name"] for m in list_models()]
    except OSError:  # an unreadable models folder leaves the embedded model to choose
        pass
    return list(dict.fromkeys(names + [t.spec for t in teachers.configured()]))


# ---- busy notes ------------------------------------------------------------------------------------
_busy: dict[int, str] = {}
_busy_lock = threading.Lock()


@contextmanager
def busy(what: str) -> Iterator[None]:
    """Note what holds the model slot while the block runs (shown in the header)."""
    token = id(object()) ^ int(time.monotonic() * 1e6)
    with _busy_lock:
        _busy[token] = what
    try:
        yield
    finally:
        with _busy_lock:
            _busy.pop(token, None)


def busy_now() -> list[str]:
    with _busy_lock:
        return list(_busy.values())


# ---- tasks and problems -----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def task_choices() -> tuple[str, ...]:
    """Tasks whose modules load in this installation (a task still being written is left out)."""
    from fcapp.tasks import get_task, task_names

    usable = []
    for name in task_names():
        try:
            get_task(name)
            usable.append(name)
        except Exception:  # noqa: BLE001 - an unavailable task is simply not offered
            continue
    return tuple(usable)


def default_task() -> str | None:
    choices = task_choices()
    return choices[0] if choices else None


def short(text: str, n: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def problem_choices(task: str | None, split: str = "heldout", limit: int = 300) -> list[tuple[str, str]]:
    """(label, id) pairs for a problem dropdown."""
    if not task:
        return []
    from fcapp.tasks import get_task

    problems = get_task(task).split(split)[:limit]
    return [(f"{p.id} · {short(p.question, 60)}", p.id) for p in problems]


def get_problem(task: str, problem_id: str | None, question: str = "", expected: str = ""):
    """The problem to solve: a typed question (with an optional expected answer) or one by id."""
    from fcapp.tasks import get_task
    from fcapp.tasks.base import Problem

    task_obj = get_task(task)
    if question and question.strip():
        return task_obj, Problem("custom", task_obj.name, question.strip(), (expected or "").strip())
    if not problem_id:
        raise ValueError("pick a problem or type one")
    return task_obj, task_obj.get(problem_id)


# ---- chains as chat messages ---------------------------------------------------------------------------
def _fence(text: str) -> str:
    text = text.strip() or "(empty reply)"
    return "```\n" + text.replace("```", "ˋˋˋ") + "\n```"


def step_message(index: int, text: str, call: dict[str, Any] | None = None, result: str | None = None,
                 error: str | None = None, duration: float | None = None, tokens: int | None = None,
                 pending: bool = False) -> dict[str, Any]:
    """One agent step as a collapsible chat message: the call in the title, reply + result inside."""
    if call is not None:
        title = f"Step {index + 1} · {render_call(call['name'], call.get('arguments', {}))}"
    elif pending:
        title = f"Step {index + 1} · writing…"
    else:
        title = f"Step {index + 1} · no valid call"
    if error is not None:
        title = "⚠ " + title
    body = [_fence(text)]
    if result is not None and not (call and call["name"] == FINAL_ANSWER):
        body.append(f"**Result:** {result}")
    if error is not None:
        body.append(f"**Error:** {error}")
    metadata: dict[str, Any] = {"title": title, "status": "pending" if pending else "done"}
    if duration is not None:
        metadata["duration"] = round(duration, 2)
    if tokens:
        metadata["log"] = f"{tokens} tokens"
    return {"role": "assistant", "content": "\n\n".join(body), "metadata": metadata}


def verdict_text(verdict: bool | None, answer: str | None, expected: str | None) -> str:
    shown = f"**{answer}**" if answer not in (None, "") else "no answer"
    if verdict is None:
        return f"Answer: {shown} (no ground truth to check)"
    mark = "✓ correct" if verdict else "✗ incorrect"
    return f"Answer: {shown} · {mark} (expected {expected})"


def chain_messages(chain: Chain | dict[str, Any], expected: str | None = None, verdict: Any = "chain") -> list[dict]:
    """A finished chain (or its stored record) as chat messages: question, steps, answer."""
    if isinstance(chain, dict):
        chain = Chain.from_dict(chain)
    verdict = chain.verdict if verdict == "chain" else verdict
    messages: list[dict[str, Any]] = [{"role": "user", "content": chain.question}]
    for step in chain.steps:
        messages.append(_finished_step(step))
    messages.append(_closing(chain.stop_reason, chain.answer, verdict, expected))
    return messages


def _finished_step(step: Step) -> dict[str, Any]:
    call = {"name": step.call.name, "arguments": step.call.arguments} if step.call else None
    return step_message(step.index, step.text, call, step.result, step.error,
                        step.elapsed_s or step.tool_elapsed_s or None, step.completion_tokens)


def _closing(stop_reason: str, answer: str | None, verdict: bool | None, expected: str | None) -> dict[str, Any]:
    if stop_reason == "answer":
        text = verdict_text(verdict, answer, expected)
    else:
        reasons = {"max_steps": "the step limit was reached", "errors": "too many invalid replies in a row",
                   "running": "stopped"}
        text = f"No final answer: {reasons.get(stop_reason, stop_reason)}."
        if verdict is not None:
            text += f" ✗ incorrect (expected {expected})"
    return {"role": "assistant", "content": text}


def chatbot(elem_id: str, height: int = 480, label: str | None = None, **kwargs: Any) -> gr.Chatbot:
    """A chain viewer: one copy-all button (no share button: nothing leaves this machine), no likes."""
    return gr.Chatbot(height=height, label=label, show_label=label is not None, elem_id=elem_id,
                      group_consecutive_messages=False, buttons=["copy_all"], feedback_options=None, **kwargs)


class ChainView:
    """Turns a live stream of agent Events into chat messages, token by token."""

    def __init__(self, question: str, expected: str | None = None, header: str | None = None) -> None:
        self.expected = expected
        self.head: list[dict[str, Any]] = ([{"role": "assistant", "content": header}] if header else [])
        self.head.append({"role": "user", "content": question})
        self.steps: list[dict[str, Any]] = []
        self.tail: list[dict[str, Any]] = []
        self.chain: Chain | None = None

    def feed(self, event: Event) -> None:
        if event.kind == "step":
            self.steps.append({"index": event.step, "text": "", "call": None, "result": None, "error": None,
                               "duration": None, "began": time.perf_counter(), "pending": True})
            return
        if not self.steps:
            return
        current = self.steps[-1]
        if event.kind == "token":
            current["text"] += event.text
        elif event.kind == "call":
            current["call"] = event.data
            current["text"] = event.text or current["text"]
        elif event.kind in ("result", "error", "answer"):
            current["pending"] = False
            current["duration"] = time.perf_counter() - current["began"]
            if event.kind == "result":
                current["result"] = event.text
            elif event.kind == "error":
                current["error"] = event.text
        elif event.kind == "done" and event.chain is not None:
            self.chain = event.chain
            for state, step in zip(self.steps, event.chain.steps):
                state.update(text=step.text, pending=False, duration=step.elapsed_s, tokens=step.completion_tokens)
            self.tail = [_closing(event.chain.stop_reason, event.chain.answer, event.chain.verdict, self.expected)]

    def stop(self, note: str = "Stopped.") -> None:
        for state in self.steps:
            state["pending"] = False
        self.tail = [{"role": "assistant", "content": note}]

    def messages(self) -> list[dict[str, Any]]:
        rendered = [step_message(s["index"], s["text"], s["call"], s["result"], s["error"], s["duration"],
                                 s.get("tokens"), s["pending"]) for s in self.steps]
        return self.head + rendered + self.tail


# ---- files ----------------------------------------------------------------------------------------------
def safe_upload(temp_path: str | Path, original_name: str | None = None) -> Path:
    """Copy an uploaded file into uploads/ under a cleaned name that cannot leave that folder."""
    name = Path(str(original_name or temp_path).replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "upload"
    folder = data_dir("uploads").resolve()
    target = (folder / f"{int(time.time())}-{name[:100]}").resolve()
    if target.parent != folder:
        raise ValueError(f"refusing the upload name {original_name!r}")
    shutil.copyfile(temp_path, target)
    return target

