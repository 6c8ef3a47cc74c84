"""Builders shared by tests (real chains from real tasks and tools, no model needed) and readers of
what a store holds."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any

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
