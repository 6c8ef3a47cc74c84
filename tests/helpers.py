"""Builders shared by tests: real chains from real tasks and tools (no model needed), readers of what a
store holds, and a real HTTP server that scripts an OpenAI-compatible teacher's answers."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fcapp.models.openai_compat import OpenAICompatModel
from fcapp.records import Call, Chain
from fcapp.solve import finish, reference_chain, start_chain
from fcapp.store import Store
from fcapp.tasks import get_task
from fcapp.tasks.base import Problem


def correct_chain(task_name: str, problem_id: str) -> Chain:
    """The problem's reference chain (verified correct)."""
    task = get_task(task_name)
    chain = reference_chain(task, task.get(problem_id))
    assert chain is not None and chain.verdict
    return chain


def wrong_chain(task_name: str, problem_id: str, answer: str = "-1", model_id: str = "teacher", seed: int = 0) -> Chain:
    """A chain that calls the right kind of function but ends on a wrong answer (verified incorrect)."""
    task = get_task(task_name)
    problem = task.get(problem_id)
    agent, chain = start_chain(task, problem, model_id)
    chain.seed = seed
    calls = list(task.reference_calls(problem) or [])[:1] + [Call("final_answer", {"answer": answer})]
    agent.replay(chain, calls)
    chain.reference = False
    finish(task, problem, chain)
    assert chain.verdict is False
    return chain


def gsm8k_store(path, problems: list[str], wrong_answers: tuple[str, ...] = ("-1",)) -> Store:
    """A store holding, for each GSM8K problem, its reference chain and one wrong chain per answer in
    `wrong_answers` (seeded 0, 1, ...): every problem gives preference pairs."""
    store = Store(path)
    for pid in problems:
        store.add_chain(correct_chain("gsm8k", pid), True, role="reference")
        for seed, answer in enumerate(wrong_answers):
            chain = wrong_chain("gsm8k", pid, answer, seed=seed)
            store.add_chain(chain, chain.verdict)
    return store


# ---- what the store holds, read with plain SQL (the app itself never needs these queries) ----------
def _rows(store: Store, sql: str, *params: Any) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()


def schema_version(store: Store) -> int:
    return _rows(store, "PRAGMA user_version")[0][0]


def has_chain(store: Store, key: str) -> bool:
    return bool(_rows(store, "SELECT 1 FROM chains WHERE key = ?", key))


def label_history(store: Store, chain_id: int) -> list[dict[str, Any]]:
    """Every label given to the chain, oldest first (the last one is current)."""
    rows = _rows(store, "SELECT id, label, who, at, edited_record, edited_verdict FROM labels WHERE chain_id = ? "
                        "ORDER BY id", chain_id)
    return [dict(row) | {"edited_record": None if row["edited_record"] is None else json.loads(row["edited_record"]),
                         "edited_verdict": None if row["edited_verdict"] is None else bool(row["edited_verdict"])}
            for row in rows]


def stored_problems(store: Store, task: str | None = None, split: str | None = None) -> list[Problem]:
    rows = _rows(store, "SELECT * FROM problems WHERE (?1 IS NULL OR task = ?1) AND (?2 IS NULL OR split = ?2) "
                        "ORDER BY task, rowid", task, split)
    return [Problem(row["id"], row["task"], row["question"], row["answer"], json.loads(row["meta"])) for row in rows]


# ---- a scripted OpenAI-compatible server -------------------------------------------------------
def sse(*events: dict | str, done: bool = True) -> list[bytes]:
    """SSE body pieces: each event a `data:` line (dicts as JSON), then [DONE]."""
    pieces = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]
    return pieces + ([b"data: [DONE]\n\n"] if done else [])


def delta(text: str | None = None, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


GOOD = sse(delta("Hel"), delta("lo"), delta(finish="stop"),
           {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})


class Scripted:
    """A real HTTP server answering each POST with the next scripted (status, pieces, headers[, delay_s]),
    the last one repeating; records every request and whether a client hung up mid-body."""

    def __init__(self, *responses: tuple, piece_delay_s: float = 0.0) -> None:
        self.responses = list(responses)
        self.requests: list[dict[str, Any]] = []
        self.hung_up = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                queue = outer.responses
                status, pieces, headers, *delay = queue.pop(0) if len(queue) > 1 else queue[0]
                time.sleep(delay[0] if delay else 0)
                self.send_response(status)
                for key, value in {"Content-Type": "text/event-stream", **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    for piece in pieces:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(piece_delay_s)
                except (BrokenPipeError, ConnectionResetError):
                    outer.hung_up.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def model(self, **kw: Any) -> OpenAICompatModel:
        return OpenAICompatModel(self.url, "teacher", **{"backoff_s": 0.01, "timeout_s": 10, **kw})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, list[bytes], dict[str, str]]:
    body = json.dumps({"error": {"message": message, "type": "x"}}).encode()
    return status, [body], {"Content-Type": "application/json", **(headers or {})}
