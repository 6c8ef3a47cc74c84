"""What the tabs share: the context (store, tabs, live versions, model pickers), the model cache, the
one model slot and each page's stop switch, chain -> chat messages, choice lists. No tab logic lives here
beyond formatting; every action is a library call."""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from fcapp.jobs import SLOT
from fcapp.models import teachers
from fcapp.models.registry import EMBEDDED, PRECISIONS, list_models, model_id, tuned_model_dir
from fcapp.paths import data_dir
from fcapp.records import FINAL_ANSWER, Chain, Event, Step, fmt_seconds, stop_words  # noqa: F401 - shared by tabs
from fcapp.store import Store
from fcapp.tools.base import render_call


@dataclass
class Context:
    """Handed to every tab's `build`: the store, the tabs (to switch to one), two versions a poll keeps
    current (the store's and the model list's: views redraw when they change, whoever changed them), every
    model picker, and what to run on page load."""

    store: Store
    tabs: gr.Tabs
    store_version: gr.State
    models_version: gr.State
    loaders: list[tuple[Any, list, Any]] = field(default_factory=list)  # (fn, inputs, outputs) for app.load
    model_pickers: list[gr.Dropdown] = field(default_factory=list)
    task_pickers: dict[str, gr.Dropdown] = field(default_factory=dict)  # tab id -> its task dropdown
    wiring: list[Callable[[], None]] = field(default_factory=list)  # listeners that need every tab built

    def go(self, tab: str, task: str | None = None) -> dict:
        """The update that shows the tab `tab`, on `task` when given."""
        return {self.tabs: gr.Tabs(selected=tab)} | ({self.task_pickers[tab]: task} if task else {})

    def navigation(self) -> set:
        """The outputs of a handler returning `go(...)`."""
        return {self.tabs, *self.task_pickers.values()}


def who(request: gr.Request | None) -> str:
    """The person behind a request: the --auth user, else "browser"."""
    return (request.username if request is not None and request.username else None) or "browser"


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


def model_choices(quantised: bool = True) -> list[str]:
    """The embedded model, every registered tuned model (newest first), the embedded model decoding with
    int8 and int4 weights (unless not `quantised`: training takes fp32 weights), then the configured
    teachers."""
    names = [EMBEDDED]
    try:
        names += [m["name"] for m in list_models()]
    except OSError:  # an unreadable models folder leaves the embedded model to choose
        pass
    names += [f"{EMBEDDED}@{precision}" for precision in PRECISIONS if quantised and precision != "fp32"]
    return list(dict.fromkeys(names + [t.spec for t in teachers.configured()]))


# ---- the model slot and each page's stop switch ------------------------------------------------------------
class StopSwitches:
    """One stop switch per page and kind of live run (Solve, Compare): Stop sets it and the run ends at its
    next event, drawing what it had as stopped (a cancelled event would leave its last frame, spinners and
    all)."""

    def __init__(self) -> None:
        self._switches: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request: gr.Request | None, kind: str) -> tuple[str, str]:
        return (getattr(request, "session_hash", None) or "no-session", kind)

    def begin(self, request: gr.Request | None, kind: str) -> threading.Event:
        switch = threading.Event()
        with self._lock:
            self._switches[self._key(request, kind)] = switch
        return switch

    def stop(self, request: gr.Request | None, kind: str) -> bool:
        """Set the page's switch; False when it has no run of that kind going."""
        with self._lock:
            switch = self._switches.get(self._key(request, kind))
        if switch is None or switch.is_set():
            return False
        switch.set()
        return True

    def end(self, request: gr.Request | None, kind: str, switch: threading.Event) -> None:
        with self._lock:
            if self._switches.get(self._key(request, kind)) is switch:
                del self._switches[self._key(request, kind)]


STOPS = StopSwitches()


def job_html(job: Any, elem_id: str, idle: str) -> str:
    """A server job's bar and state in words (fcapp.jobs.Job; `idle` when there is none); data-status,
    data-done and data-total are for tests and scripts."""
    import html

    if job is None:
        return f"<div id='{elem_id}' data-status='none' data-done='0' data-total='0'>{idle}</div>"
    fraction = job.done / job.total if job.total else (1.0 if job.status == "finished" else 0.0)
    words = {"waiting": f"Waiting for the model: it is busy with {SLOT.holder() or 'another run'}.",
             "stopping": f"Stopping after the chains being written ({job.note})."}.get(job.status, job.note)
    return (f"<div id='{elem_id}' data-status='{job.status}' data-done='{job.done}' data-total='{job.total}'>"
            f"<div class='fc-bar'><div style='width:{100 * min(fraction, 1):.0f}%'></div></div>"
            f"<b>{html.escape(job.title)}</b> · {job.status} · {fmt_seconds(job.elapsed_s())}<br>{html.escape(words)}"
            "</div>")


def wait_for_slot(what: str, stop: threading.Event, shown: Callable[[str], dict]) -> Iterator[dict]:
    """Take the model slot for `what`, yielding `shown(words)` while another run holds it; returns True once
    it is held (the caller releases it), False when `stop` was set first. Use as
    `held = yield from wait_for_slot(...)`."""
    while not SLOT.take(what):
        if stop.is_set():
            return False
        yield shown(f"Waiting for the model: it is busy with {SLOT.holder() or 'another run'}. It starts as soon "
                    "as that ends; Stop gives up.")
    if stop.is_set():
        SLOT.release()
        return False
    return True


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


def get_problem(task: str, problem_id: str | None, question: str = "", expected: str = "", split: str | None = None):
    """The problem to solve: a typed question (with an optional expected answer), else the one picked. A
    picked id that is not the task's (the problem list still catching up with a task just switched) means
    the first problem of the task's list, the one the list is about to show."""
    from fcapp.tasks import get_task
    from fcapp.tasks.base import Problem

    task_obj = get_task(task)
    if question and question.strip():
        return task_obj, Problem("custom", task_obj.name, question.strip(), (expected or "").strip())
    choices = problem_choices(task, split) if split else []
    if split and problem_id not in [value for _, value in choices]:
        problem_id = choices[0][1] if choices else None
    if not problem_id:
        raise ValueError("pick a problem or type one")
    return task_obj, task_obj.get(problem_id)


def question_md(text: str) -> str:
    """Problem text as Markdown that keeps its lines: each premise, the conclusion and the question on its
    own line (a numbered premise would otherwise swallow the next line into its list item)."""
    lines = []
    for line in str(text).splitlines():
        line = re.sub(r"([\\`*_#<>\[\]])", r"\\\1", line)
        lines.append(re.sub(r"^(\s*)(\d+)([.)])", r"\1\2\\\3", line) or "&nbsp;")
    return "  \n".join(lines)


# ---- chains as chat messages ---------------------------------------------------------------------------
def _fence(text: str) -> str:
    text = text.strip() or "(empty reply)"
    return "```\n" + text.replace("```", "ˋˋˋ") + "\n```"


def step_messages(index: int, text: str, call: dict[str, Any] | None = None, result: str | None = None,
                  error: str | None = None, duration: float | None = None, tokens: int | None = None,
                  state: str = "done") -> list[dict[str, Any]]:
    """One agent step as chat messages: a collapsible one with the call in its title and the raw reply inside,
    then, in plain sight, what the call gave (or its error). `state`: writing, stopped or done."""
    if call is not None:
        title = f"Step {index + 1} · {render_call(call['name'], call.get('arguments', {}))}"
    else:
        title = {"writing": f"Step {index + 1} · writing…", "stopped": f"Step {index + 1} · stopped while writing"
                 }.get(state, f"Step {index + 1} · no valid call")
    if error is not None:
        title = "⚠ " + title
    metadata: dict[str, Any] = {"title": title, "status": "pending" if state == "writing" else "done"}
    if duration is not None:
        metadata["duration"] = round(duration, 2)
    if tokens:
        metadata["log"] = f"{tokens} tokens"
    messages = [{"role": "assistant", "content": _fence(text), "metadata": metadata}]
    if error is not None:
        messages.append({"role": "assistant", "content": f"⚠ **Not carried out:** {error}"})
    elif result is not None and not (call and call["name"] == FINAL_ANSWER):
        messages.append({"role": "assistant", "content": f"**{call['name'] if call else 'result'} →** {result}"})
    return messages


def verdict_text(verdict: bool | None, answer: str | None, expected: str | None, blind: bool = False) -> str:
    """The chain's answer and the verifier's verdict on it (only the answer when `blind`)."""
    shown = f"**{answer}**" if answer not in (None, "") else "no answer"
    if blind:
        return f"Answer: {shown}"
    if verdict is None:
        return f"Answer: {shown} (no ground truth to check)"
    mark = "✓ correct" if verdict else "✗ incorrect"
    return f"Answer: {shown} · {mark} (expected {expected})"


def closing_text(stop_reason: str, answer: str | None, verdict: bool | None, expected: str | None,
                 blind: bool = False) -> str:
    if stop_reason == "answer":
        return verdict_text(verdict, answer, expected, blind)
    text = f"No final answer: {stop_words(stop_reason)}."
    if verdict is not None and not blind:
        text += f" ✗ incorrect (expected {expected})"
    return text


def chain_messages(chain: Chain | dict[str, Any], expected: str | None = None, verdict: Any = "chain",
                   blind: bool = False) -> list[dict]:
    """A finished chain (or its stored record) as chat messages: question, steps with their results, answer.
    `blind` leaves the verifier's verdict and the expected answer out (a person choosing between chains)."""
    if isinstance(chain, dict):
        chain = Chain.from_dict(chain)
    verdict = chain.verdict if verdict == "chain" else verdict
    messages: list[dict[str, Any]] = [{"role": "user", "content": question_md(chain.question)}]
    for step in chain.steps:
        call = {"name": step.call.name, "arguments": step.call.arguments} if step.call else None
        messages += step_messages(step.index, step.text, call, step.result, step.error,
                                  step.elapsed_s or step.tool_elapsed_s or None, step.completion_tokens)
    messages.append({"role": "assistant", "content": closing_text(chain.stop_reason, chain.answer, verdict, expected,
                                                                  blind)})
    return messages


def chatbot(elem_id: str, height: int = 480, label: str | None = None, **kwargs: Any) -> gr.Chatbot:
    """A chain viewer: one copy-all button (no share button: nothing leaves this machine), no likes."""
    return gr.Chatbot(height=height, label=label, show_label=label is not None, elem_id=elem_id,
                      group_consecutive_messages=False, buttons=["copy_all"], feedback_options=None, **kwargs)


class ChainView:
    """Turns a live stream of agent Events into chat messages, token by token; a stopped run keeps what it had."""

    def __init__(self, question: str, expected: str | None = None, header: str | None = None) -> None:
        self.expected = expected
        self.head: list[dict[str, Any]] = ([{"role": "assistant", "content": header}] if header else [])
        self.head.append({"role": "user", "content": question_md(question)})
        self.steps: list[dict[str, Any]] = []
        self.tail: list[dict[str, Any]] = []
        self.chain: Chain | None = None
        self.stopped = False

    def feed(self, event: Event) -> None:
        if event.kind == "step":
            self.steps.append({"index": event.step, "text": "", "call": None, "result": None, "error": None,
                               "duration": None, "began": time.perf_counter(), "state": "writing"})
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
            current["state"] = "done"
            current["duration"] = time.perf_counter() - current["began"]
            if event.kind == "result":
                current["result"] = event.text
            elif event.kind == "error":
                current["error"] = event.text
        elif event.kind == "done" and event.chain is not None:
            self.chain = event.chain
            for state, step in zip(self.steps, event.chain.steps):
                state.update(text=step.text, state="done", duration=step.elapsed_s, tokens=step.completion_tokens)
            self.tail = [{"role": "assistant", "content": closing_text(
                event.chain.stop_reason, event.chain.answer, event.chain.verdict, self.expected)}]

    def stop(self, why: str = "Stopped") -> str:
        """Mark the run stopped: a step still being written keeps its text as stopped; returns the words said."""
        self.stopped = True
        for state in self.steps:
            if state["state"] == "writing":
                state["state"] = "stopped"
        n = len(self.steps)
        note = f"{why} after {n} step{'' if n == 1 else 's'}, before a final answer; what the model wrote is kept above."
        self.tail = [{"role": "assistant", "content": f"**{note}**"}]
        return note

    def messages(self) -> list[dict[str, Any]]:
        rendered = [m for s in self.steps for m in step_messages(s["index"], s["text"], s["call"], s["result"],
                                                                 s["error"], s["duration"], s.get("tokens"), s["state"])]
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
