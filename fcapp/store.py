"""SQLite store for problems, chains, human labels, preference pairs, training runs and evaluations.

Several writers share one file (app sessions, a CLI generation job, a training worker), so:

- WAL journal: readers never block the writer and the writer never blocks readers.
- `synchronous=NORMAL`: under WAL a commit survives any crash of the *process* (SIGKILL
  included); only a power loss / OS crash may lose the last few commits, never corrupt the file.
  That trade is the usual one for WAL and keeps a generation job's one-commit-per-chain cheap.
- Every write is one short `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so
  it waits (busy timeout, 30 s) instead of failing with "database is locked" halfway through.
- One connection per thread (and per process: a forked child opens its own).
- Schema changes are numbered migrations recorded in `PRAGMA user_version`, applied at open.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcapp.paths import data_home
from fcapp.records import Chain
from fcapp.tasks.base import Problem

DB_NAME = "fcapp.db"
BUSY_TIMEOUT_S = 30.0
LABELS = ("accept", "reject", "edited")
UNLABELLED = "unlabelled"


class StoreError(RuntimeError):
    """The database cannot be used as is (damaged, newer schema, no WAL support, ...), said plainly."""


def damaged(path: str | Path, exc: sqlite3.DatabaseError) -> StoreError:
    """The error for a database file SQLite cannot read, with how to recover from it."""
    return StoreError(
        f"{path} is damaged or is not an fcapp database (SQLite: {exc}); nothing was changed. To save what it "
        f"holds, recover it with the sqlite3 tool (sqlite3 {path} .recover | sqlite3 {path}.recovered) and put "
        f"{path}.recovered in its place; or move the file aside to start with an empty store."
    )


# ---- schema ---------------------------------------------------------------------------------------
# Append new migrations at the end; never edit one that has shipped. Migration n brings the
# database from user_version n to n + 1. Each statement must end at the end of a line.

_V1_CORE = """
CREATE TABLE problems (
    task     TEXT NOT NULL,
    id       TEXT NOT NULL,
    question TEXT NOT NULL,
    answer   TEXT NOT NULL,
    split    TEXT NOT NULL,
    meta     TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (task, id)
);

CREATE TABLE chains (
    id                INTEGER PRIMARY KEY,
    key               TEXT NOT NULL UNIQUE,
    task              TEXT NOT NULL,
    problem_id        TEXT NOT NULL,
    question          TEXT NOT NULL,
    model_id          TEXT NOT NULL,
    role              TEXT NOT NULL,
    seed              INTEGER NOT NULL,
    sample            INTEGER NOT NULL,
    sampling          TEXT NOT NULL,
    record            TEXT NOT NULL,
    answer            TEXT,
    verdict           INTEGER CHECK (verdict IN (0, 1)),
    stop_reason       TEXT NOT NULL,
    steps             INTEGER NOT NULL,
    valid_calls       INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    elapsed_s         REAL NOT NULL,
    reference         INTEGER NOT NULL,
    created_at        REAL NOT NULL
);
CREATE INDEX chains_by_problem ON chains (task, problem_id);
CREATE INDEX chains_by_model ON chains (model_id);

CREATE TABLE labels (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id       INTEGER NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
    label          TEXT NOT NULL CHECK (label IN ('accept', 'reject', 'edited')),
    edited_record  TEXT,
    edited_verdict INTEGER CHECK (edited_verdict IN (0, 1)),
    who            TEXT NOT NULL,
    at             REAL NOT NULL,
    CHECK ((label = 'edited') = (edited_record IS NOT NULL))
);
CREATE INDEX labels_by_chain ON labels (chain_id, id);

-- Each chain with its current (latest) label and the verdict that counts: a person's label
-- overrides the verifier's.
CREATE VIEW chain_state AS
SELECT c.*,
       l.label AS label,
       l.who AS labelled_by,
       l.at AS labelled_at,
       l.edited_record AS edited_record,
       CASE l.label
           WHEN 'accept' THEN 1
           WHEN 'reject' THEN 0
           WHEN 'edited' THEN l.edited_verdict
           ELSE c.verdict
       END AS effective_verdict
FROM chains AS c
LEFT JOIN labels AS l ON l.id = (SELECT MAX(id) FROM labels WHERE chain_id = c.id);
"""

_V2_TRAINING = """
CREATE TABLE pairs (
    id                INTEGER PRIMARY KEY,
    task              TEXT NOT NULL,
    problem_id        TEXT NOT NULL,
    policy            TEXT NOT NULL,
    chosen_chain_id   INTEGER REFERENCES chains (id) ON DELETE SET NULL,
    rejected_chain_id INTEGER REFERENCES chains (id) ON DELETE SET NULL,
    prompt            TEXT NOT NULL,
    chosen            TEXT NOT NULL,
    rejected          TEXT NOT NULL,
    tools             TEXT,
    created_at        REAL NOT NULL
);
CREATE INDEX pairs_by_set ON pairs (task, policy);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL,
    out_dir     TEXT,
    metrics     TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    finished_at REAL
);

CREATE TABLE evals (
    id         INTEGER PRIMARY KEY,
    task       TEXT NOT NULL,
    models     TEXT NOT NULL,
    config     TEXT NOT NULL,
    results    TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

MIGRATIONS: list[str] = [_V1_CORE, _V2_TRAINING]
SCHEMA_VERSION = len(MIGRATIONS)

_SUMMARY_COLUMNS = """id, key, task, problem_id, question, model_id, role, seed, sample, sampling, answer,
    COALESCE(json_extract(edited_record, '$.answer'), answer) AS effective_answer,
    verdict, label, labelled_by, labelled_at, effective_verdict, stop_reason, steps, valid_calls,
    prompt_tokens, completion_tokens, elapsed_s, reference, created_at"""
_FULL_COLUMNS = _SUMMARY_COLUMNS + ", record, edited_record"


def default_db_path() -> Path:
    """fcapp.db in the user data folder (see fcapp.paths.data_home)."""
    return data_home() / DB_NAME


def chain_key(task: str, problem_id: str, model_id: str, seed: int, sampling: dict[str, Any], sample: int = 0) -> str:
    """The generation key: the same job settings give the same key, so a resumed job skips done work.

    Readable prefix for people; the hash covers every field, so ids holding ':' cannot collide.
    """
    fields = [task, problem_id, model_id, seed, sample, sampling]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{task}:{problem_id}:{model_id}:{seed}:{sample}:{digest}"


def apply_migrations(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> int:
    """Bring the database to schema version `upto` in one write transaction; returns the version.

    Safe when several processes open a new file at once: the version is re-read under the lock.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"database schema v{version} is newer than this fcapp (v{SCHEMA_VERSION}); upgrade fcapp")
    if version >= upto:
        return version
    with _transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, upto):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
    return max(version, upto)


class Store:
    """The fcapp database. Cheap to create; safe to share between threads and between processes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._reset_connections()
        try:
            apply_migrations(self._conn())
        except sqlite3.DatabaseError as exc:
            self.close()
            raise damaged(self.path, exc) from None

    # ---- connections and transactions ------------------------------------------------------------
    def _reset_connections(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use; a forked child never reuses its parent's)."""
        if self._pid != os.getpid():
            # Keep the parent's connections referenced: closing them here could disturb its WAL.
            self._inherited = self._connections
            self._reset_connections()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction holding the write lock from its first statement."""
        conn = self._conn()
        with _transaction(conn):
            yield conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one consistent snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this Store opened (from any thread)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> str:
        """SQLite's integrity check: 'ok', or the problems it found, one per line."""
        rows = self._conn().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(row[0] for row in rows)

    # ---- problems --------------------------------------------------------------------------------
    def add_problems(self, problems: Iterable[Problem]) -> int:
        """Insert or update problems (keyed by task and id); returns how many were written."""
        rows = [(p.task, p.id, p.question, p.answer, p.split, _dumps(p.meta)) for p in problems]
        with self._write() as conn:
            conn.executemany(
                """INSERT INTO problems (task, id, question, answer, split, meta)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (task, id) DO UPDATE SET
                       question = excluded.question, answer = excluded.answer,
                       split = excluded.split, meta = excluded.meta""",
                rows,
            )
        return len(rows)

    def get_problem(self, problem_id: str, task: str | None = None) -> Problem | None:
        """A problem by id (and task, needed only when two tasks share an id)."""
        rows = self._conn().execute(
            "SELECT * FROM problems WHERE id = ? AND (? IS NULL OR task = ?)", (problem_id, task, task)
        ).fetchall()
        if len(rows) > 1:
            raise ValueError(f"problem id {problem_id!r} exists in several tasks; pass task=")
        return _problem(rows[0]) if rows else None

    # ---- chains ----------------------------------------------------------------------------------
    def add_chain(self, chain: Chain, verdict: bool | None, key: str | None = None, sample: int = 0,
                  role: str | None = None) -> int:
        """Store a chain with the verifier's verdict; returns its id.

        Idempotent on the generation key (default: `chain_key` of the chain's settings): adding
        the same chain again returns the stored id and changes nothing.
        role: who produced it, e.g. teacher / base / tuned (default: reference or teacher).
        """
        key = key or chain_key(chain.task, chain.problem_id, chain.model_id, chain.seed, chain.sampling, sample)
        record = chain.to_dict() | {"verdict": verdict}
        row = {
            "key": key, "task": chain.task, "problem_id": chain.problem_id, "question": chain.question,
            "model_id": chain.model_id, "role": role or ("reference" if chain.reference else "teacher"),
            "seed": chain.seed, "sample": sample, "sampling": _dumps(chain.sampling), "record": _dumps(record),
            "answer": chain.answer, "verdict": _bit(verdict), "stop_reason": chain.stop_reason,
            "steps": len(chain.steps), "valid_calls": chain.valid_calls, "prompt_tokens": chain.prompt_tokens,
            "completion_tokens": chain.completion_tokens, "elapsed_s": chain.elapsed_s,
            "reference": int(chain.reference), "created_at": time.time(),
        }
        with self._write() as conn:
            inserted = conn.execute(
                f"""INSERT INTO chains ({", ".join(row)}) VALUES ({", ".join(":" + k for k in row)})
                    ON CONFLICT (key) DO NOTHING RETURNING id""",
                row,
            ).fetchall()  # fetch all: the statement must finish before COMMIT
            if inserted:
                return inserted[0][0]
            return conn.execute("SELECT id FROM chains WHERE key = ?", (key,)).fetchone()[0]

    def model_ids(self, task: str | None = None) -> list[str]:
        """The models that wrote the chains of `task` (all tasks when None), sorted."""
        rows = self._conn().execute("SELECT DISTINCT model_id FROM chains WHERE ? IS NULL OR task = ? ORDER BY model_id",
                                    (task, task)).fetchall()
        return [row[0] for row in rows]

    def stored_verdicts(self, task: str | None = None, model_id: str | None = None) -> dict[str, bool | None]:
        """Generation key -> verdict of the chains already stored: a resumed job loads them once, skips those
        chains and counts the right ones among them."""
        rows = self._conn().execute(
            "SELECT key, verdict FROM chains "
            "WHERE (:task IS NULL OR task = :task) AND (:model IS NULL OR model_id = :model)",
            {"task": task, "model": model_id},
        ).fetchall()
        return {key: None if verdict is None else bool(verdict) for key, verdict in rows}

    def get_chain(self, chain_id: int) -> dict[str, Any] | None:
        """Summary fields + `record` (the Chain as stored), `edited_record` (when the current label is
        'edited'), `effective_record` (the one to train on), `label`, `effective_verdict` and
        `effective_answer` (the edited answer, else the chain's)."""
        row = self._conn().execute(f"SELECT {_FULL_COLUMNS} FROM chain_state WHERE id = ?", (chain_id,)).fetchone()
        return _full(row) if row else None

    def list_chains(self, task: str | None = None, verdict: bool | None = None, label: str | None = None,
                    model_id: str | None = None, problem_id: str | None = None, limit: int = 100,
                    offset: int = 0) -> list[dict[str, Any]]:
        """Chain summaries (no records), newest first.

        verdict filters on the effective verdict; label is one of LABELS or 'unlabelled'.
        """
        if label is not None and label not in (*LABELS, UNLABELLED):
            raise ValueError(f"label must be one of {', '.join((*LABELS, UNLABELLED))}, not {label!r}")
        rows = self._conn().execute(
            f"""SELECT {_SUMMARY_COLUMNS} FROM chain_state
                WHERE (:task IS NULL OR task = :task)
                  AND (:verdict IS NULL OR effective_verdict = :verdict)
                  AND (:label IS NULL OR label = :label OR (:label = '{UNLABELLED}' AND label IS NULL))
                  AND (:model IS NULL OR model_id = :model)
                  AND (:problem IS NULL OR problem_id = :problem)
                ORDER BY id DESC
                LIMIT :limit OFFSET :offset""",
            {"task": task, "verdict": _bit(verdict), "label": label, "model": model_id,
             "problem": problem_id, "limit": limit, "offset": offset},
        ).fetchall()
        return [_summary(row) for row in rows]

    def chains_for_pairs(self, task: str) -> dict[str, list[dict[str, Any]]]:
        """Every chain of `task` with its full records and effective verdict, grouped by problem."""
        rows = self._conn().execute(
            f"SELECT {_FULL_COLUMNS} FROM chain_state WHERE task = ? ORDER BY problem_id, id", (task,)
        ).fetchall()
        grouped: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            grouped.setdefault(row["problem_id"], []).append(_full(row))
        return grouped

    # ---- labels ----------------------------------------------------------------------------------
    def label_chain(self, chain_id: int, label: str, who: str, edited_record: Chain | dict[str, Any] | None = None,
                    edited_verdict: bool | None = None) -> int:
        """Record a person's judgement; returns the label's id. Labels are never overwritten: the
        latest is the current one and the rest is history.

        'edited' needs the edited chain and the verifier's verdict on it (the caller re-verifies).
        """
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        if (label == "edited") != (edited_record is not None):
            raise ValueError("an edited record goes with label 'edited', and only with it")
        if isinstance(edited_record, Chain):
            edited_record = edited_record.to_dict()
        with self._write() as conn:
            try:
                cursor = conn.execute(
                    """INSERT INTO labels (chain_id, label, edited_record, edited_verdict, who, at)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (chain_id, label, None if edited_record is None else _dumps(edited_record),
                     _bit(edited_verdict), who, time.time()),
                )
            except sqlite3.IntegrityError:
                raise KeyError(f"no chain {chain_id}") from None
            return cursor.lastrowid  # type: ignore[return-value]

    def label_chains(self, chain_ids: Iterable[int], label: str, who: str) -> list[int]:
        """Give every chain of `chain_ids` the same accept / reject label in one transaction (all or none);
        returns the label ids (in the order of `chain_ids`)."""
        if label not in ("accept", "reject"):
            raise ValueError(f"a bulk label is accept or reject, not {label!r}")
        now = time.time()
        with self._write() as conn:
            try:
                return [conn.execute("INSERT INTO labels (chain_id, label, who, at) VALUES (?, ?, ?, ?)",
                                     (chain_id, label, who, now)).lastrowid for chain_id in chain_ids]
            except sqlite3.IntegrityError:
                raise KeyError("a chain to label does not exist (deleted meanwhile?); nothing was labelled") from None

    def remove_labels(self, label_ids: Iterable[int], who: str) -> list[int]:
        """Undo: delete the labels `label_ids` that `who` gave (another person's are left alone), so each chain
        is back to the label it had before; returns the chains whose labels went."""
        ids = list(label_ids)
        if not ids:
            return []
        with self._write() as conn:
            rows = conn.execute(f"DELETE FROM labels WHERE who = ? AND id IN ({', '.join('?' * len(ids))}) "
                                "RETURNING chain_id", (who, *ids)).fetchall()
        return sorted({row[0] for row in rows})

    def annotator_labels(self, task: str | None = None, chain_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Each person's current label of each chain (their latest one): chain_id, who, label, verdict (the
        verdict the label gives: accept 1, reject 0, an edit its re-verified verdict), label_id."""
        ids = None if chain_ids is None else list(chain_ids)
        where = "" if ids is None else f" AND l.chain_id IN ({', '.join('?' * len(ids))})"
        rows = self._conn().execute(
            f"""SELECT l.id AS label_id, l.chain_id, l.who, l.label,
                       CASE l.label WHEN 'accept' THEN 1 WHEN 'reject' THEN 0 ELSE l.edited_verdict END AS verdict
                FROM labels AS l JOIN chains AS c ON c.id = l.chain_id
                WHERE l.id IN (SELECT MAX(id) FROM labels GROUP BY chain_id, who)
                  AND (? IS NULL OR c.task = ?){where}
                ORDER BY l.chain_id, l.who""",
            (task, task, *(ids or [])),
        ).fetchall()
        return [dict(row) | {"verdict": _bool(row["verdict"])} for row in rows]

    def version(self) -> tuple[int, ...]:
        """Changes whenever a chain, label, pair or evaluation is added or removed, by any process: what a
        live view polls to know it must draw again."""
        return tuple(self._conn().execute(
            """SELECT (SELECT COALESCE(MAX(id), 0) FROM chains), (SELECT COUNT(*) FROM chains),
                      (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'labels'),
                      (SELECT COUNT(*) FROM labels),
                      (SELECT COALESCE(MAX(id), 0) FROM pairs), (SELECT COUNT(*) FROM pairs),
                      (SELECT COALESCE(MAX(id), 0) FROM evals), (SELECT COUNT(*) FROM evals)""").fetchone())

    def counts(self, task: str | None = None) -> dict[str, Any]:
        """Totals and a per-task breakdown: chains, correct / incorrect / unverified (effective
        verdicts), labelled, problems, and pair_problems (problems with at least one correct and
        one incorrect chain, i.e. those DPO pairs can come from)."""
        where = {"task": task}
        with self._read() as conn:
            chain_rows = conn.execute(
                """SELECT task, COUNT(*) AS chains,
                          SUM(effective_verdict = 1) AS correct,
                          SUM(effective_verdict = 0) AS incorrect,
                          SUM(effective_verdict IS NULL) AS unverified,
                          SUM(label IS NOT NULL) AS labelled
                   FROM chain_state WHERE :task IS NULL OR task = :task GROUP BY task""",
                where,
            ).fetchall()
            pair_rows = conn.execute(
                """SELECT task, COUNT(*) AS pair_problems FROM (
                       SELECT task, problem_id FROM chain_state
                       WHERE :task IS NULL OR task = :task
                       GROUP BY task, problem_id
                       HAVING SUM(effective_verdict = 1) > 0 AND SUM(effective_verdict = 0) > 0
                   ) GROUP BY task""",
                where,
            ).fetchall()
            problem_rows = conn.execute(
                "SELECT task, COUNT(*) AS problems FROM problems WHERE :task IS NULL OR task = :task GROUP BY task",
                where,
            ).fetchall()
        keys = ("chains", "correct", "incorrect", "unverified", "labelled", "problems", "pair_problems")
        by_task: dict[str, dict[str, int]] = {}
        for row in (*chain_rows, *pair_rows, *problem_rows):
            entry = by_task.setdefault(row["task"], dict.fromkeys(keys, 0))
            entry.update({k: row[k] for k in row.keys() if k != "task"})
        totals = {k: sum(entry[k] for entry in by_task.values()) for k in keys}
        return totals | {"by_task": dict(sorted(by_task.items()))}

    # ---- pairs -----------------------------------------------------------------------------------
    def save_pairs(self, task: str, policy: str, rows: Iterable[dict[str, Any]]) -> list[int]:
        """Replace the pair set (task, policy) with `rows`, atomically; returns the new ids.

        Each row: problem_id, prompt, chosen, rejected (message lists), optional tools,
        chosen_chain_id and rejected_chain_id (provenance).
        """
        now = time.time()
        with self._write() as conn:
            conn.execute("DELETE FROM pairs WHERE task = ? AND policy = ?", (task, policy))
            return [
                conn.execute(
                    """INSERT INTO pairs (task, problem_id, policy, chosen_chain_id, rejected_chain_id,
                                          prompt, chosen, rejected, tools, created_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (task, row["problem_id"], policy, row.get("chosen_chain_id"), row.get("rejected_chain_id"),
                     _dumps(row["prompt"]), _dumps(row["chosen"]), _dumps(row["rejected"]),
                     None if row.get("tools") is None else _dumps(row["tools"]), now),
                ).lastrowid
                for row in rows
            ]

    def list_pairs(self, task: str | None = None, policy: str | None = None) -> list[dict[str, Any]]:
        """Stored pairs (all, or of one task and / or pair set), in the order they were saved."""
        rows = self._conn().execute(
            """SELECT * FROM pairs WHERE (:task IS NULL OR task = :task) AND (:policy IS NULL OR policy = :policy)
               ORDER BY id""",
            {"task": task, "policy": policy},
        ).fetchall()
        return [_decoded(row, "prompt", "chosen", "rejected", "tools") for row in rows]

    def pair_sets(self, task: str | None = None) -> dict[str, int]:
        """Stored pair sets (policy name -> pairs) of `task` (all tasks when None), by name."""
        rows = self._conn().execute(
            "SELECT policy, COUNT(*) FROM pairs WHERE ? IS NULL OR task = ? GROUP BY policy ORDER BY policy",
            (task, task)).fetchall()
        return {row[0]: row[1] for row in rows}

    # ---- evaluations -----------------------------------------------------------------------------
    def add_eval(self, task: str, models: list[Any], config: dict[str, Any], results: dict[str, Any]) -> int:
        with self._write() as conn:
            return conn.execute(
                "INSERT INTO evals (task, models, config, results, created_at) VALUES (?, ?, ?, ?, ?)",
                (task, _dumps(models), _dumps(config), _dumps(results), time.time()),
            ).lastrowid  # type: ignore[return-value]

    def get_eval(self, eval_id: int) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM evals WHERE id = ?", (eval_id,)).fetchone()
        return _decoded(row, "models", "config", "results") if row else None

    def count_evals(self, task: str | None = None) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM evals WHERE ? IS NULL OR task = ?", (task, task)).fetchone()[0]

    def list_evals(self, task: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Evaluations, newest first."""
        rows = self._conn().execute(
            "SELECT * FROM evals WHERE ? IS NULL OR task = ? ORDER BY id DESC LIMIT ?", (task, task, limit)
        ).fetchall()
        return [_decoded(row, "models", "config", "results") for row in rows]


# ---- helpers --------------------------------------------------------------------------------------
def _connect(path: Path) -> sqlite3.Connection:
    """A connection set up for shared use: WAL, busy timeout, foreign keys, explicit transactions.

    check_same_thread=False only so that Store.close() may close it from another thread; each
    connection is otherwise used by the one thread that opened it.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        conn.close()
        raise StoreError(f"{path}: SQLite cannot use WAL here (journal mode {mode!r}); put the database on a local disk")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (sqlite3.complete_statement copes with triggers)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise StoreError(f"incomplete SQL statement in a migration: {buffer.strip()[:80]}")


def _dumps(value: Any) -> str:
    # Arguments parsed from model text may be Python literals JSON lacks (sets, bytes, complex):
    # keep their text rather than fail to store the chain.
    return json.dumps(value, ensure_ascii=False, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _bit(value: bool | None) -> int | None:
    return None if value is None else int(bool(value))


def _bool(value: int | None) -> bool | None:
    return None if value is None else bool(value)


def _decoded(row: sqlite3.Row, *json_columns: str) -> dict[str, Any]:
    return dict(row) | {column: _loads(row[column]) for column in json_columns}


def _problem(row: sqlite3.Row) -> Problem:
    return Problem(id=row["id"], task=row["task"], question=row["question"], answer=row["answer"],
                   meta=json.loads(row["meta"]))


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return _decoded(row, "sampling") | {
        "verdict": _bool(row["verdict"]),
        "effective_verdict": _bool(row["effective_verdict"]),
        "reference": bool(row["reference"]),
    }


def _full(row: sqlite3.Row) -> dict[str, Any]:
    summary = _summary(row)
    record, edited = _loads(summary.pop("record")), _loads(summary.pop("edited_record"))
    return summary | {"record": record, "edited_record": edited, "effective_record": edited or record}
