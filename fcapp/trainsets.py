"""Verified (and human-labelled) chains -> training sets: DPO preference pairs and SFT examples,
exported as JSONL / Parquet and read back by one validator (import, the Train tab and the training
worker all use `read_training_file`), never holding a held-out problem.

- A pair is `{"prompt": [system with injected functions, demo, question], "chosen": [assistant/tool
  turns of a correct chain], "rejected": [... of an incorrect chain], "tools", "task", "problem_id"}`:
  conversational preference data that `datasets.load_dataset` reads and TRL's DPOTrainer takes.
- An SFT example is `{"prompt": [...], "completion": [assistant/tool turns of a correct chain], "tools",
  "task", "problem_id", "source"}`; the worker trains on the assistant turns only.

Held-out problems (`HeldoutGuard`: the held-out split of every task, by id and by question text) are
left out when sets are built from the store, and a file holding one is refused, wherever it came from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fcapp.files import DataFileError, atomic_write, atomic_write_text, read_jsonl
from fcapp.records import FINAL_ANSWER, Chain, Message
from fcapp.store import Store

Kind = Literal["pairs", "sft"]
COLUMNS: dict[str, tuple[str, ...]] = {"pairs": ("prompt", "chosen", "rejected"), "sft": ("prompt", "completion")}
EXTRA_KEYS = ("tools", "task", "problem_id")
SFT_SOURCES = ("reference", "teacher", "human")


class TrainingDataError(DataFileError):
    """A training file (or set) cannot be used; the message names the file and line, and how to fix it."""


# ---- held-out problems ------------------------------------------------------------------------------
def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def question_of(prompt: list[Message]) -> str:
    """The problem text of a chain prompt: its last user message."""
    return next((str(m.get("content", "")) for m in reversed(prompt) if m.get("role") == "user"), "")


class HeldoutGuard:
    """Knows every held-out problem of the registered tasks, by (task, id) and by question text, so a
    problem reaches no training set under another id, another task or typed in by hand."""

    def __init__(self) -> None:
        from fcapp.tasks import get_task, task_names

        self.ids: set[tuple[str, str]] = set()
        self.questions: set[str] = set()
        for name in task_names():
            for problem in get_task(name).split("heldout"):
                self.ids.add((name, problem.id))
                self.questions.add(_normalised(problem.question))

    def refuses(self, task: str | None, problem_id: str | None, question: str) -> bool:
        return (str(task), str(problem_id)) in self.ids or _normalised(question) in self.questions


@functools.cache
def heldout_guard() -> HeldoutGuard:
    """The guard, built once per process (the tasks' problems do not change while it runs)."""
    return HeldoutGuard()


def refuse_heldout(rows: list[dict[str, Any]], what: str) -> None:
    """Raise TrainingDataError naming every row of a held-out problem (rows carry `_where`)."""
    guard = heldout_guard()
    bad = [row for row in rows if guard.refuses(row.get("task"), row.get("problem_id"), question_of(row["prompt"]))]
    if bad:
        shown = "; ".join(f"{row['_where']} ({row.get('task') or '?'} {row.get('problem_id') or '?'})"
                          for row in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise TrainingDataError(f"{len(bad)} {what} row(s) hold held-out problems, which are never trained on: "
                                f"{shown}{more}. Build the set with `fcapp pairs` / `fcapp examples` (they leave "
                                "held-out problems out) or remove those rows")


# ---- the one reader / validator of training files ------------------------------------------------------
def _check_messages(value: Any, column: str, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise TrainingDataError(f"{where}: '{column}' must be a list of {{role, content}} messages (text)")


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of each row of a JSONL or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise TrainingDataError(f"{path}: not a readable Parquet file ({exc})") from None
        records = []
        for line, record in enumerate(rows, start=1):
            if isinstance(record.get("tools"), str):  # Parquet keeps free-form tool schemas as JSON text
                try:
                    record["tools"] = json.loads(record["tools"])
                except (ValueError, RecursionError):
                    raise TrainingDataError(f"{path}:{line}: 'tools' is not valid JSON") from None
            records.append((f"{path}:{line}", record))
        return records
    if not path.is_file():
        raise TrainingDataError(f"{path}: file not found")
    try:
        return [(f"{path}:{line}", record) for line, record in read_jsonl(path)]
    except DataFileError as exc:  # the same message, as the error of a training file
        raise TrainingDataError(str(exc)) from None


def read_training_file(path: str | Path, kind: Kind) -> list[dict[str, Any]]:
    """Rows of a preference ("pairs") or SFT ("sft") file, every row checked: message lists of text,
    none empty, no held-out problem. Each row keeps its columns plus `_where` (file:line) for messages."""
    path = Path(path)
    columns = COLUMNS[kind]
    rows = []
    for where, record in _records(path):
        for column in columns:  # shapes first, so the message names the column that is not a list
            _check_messages(record.get(column), column, where)
        for column in columns:
            if not record[column]:
                raise TrainingDataError(f"{where}: '{column}' is empty")
        rows.append({k: record[k] for k in record if k in (*columns, *EXTRA_KEYS, "source")} | {"_where": where})
    if not rows:
        raise TrainingDataError(f"{path}: no rows in the file")
    refuse_heldout(rows, "pairs" if kind == "pairs" else "SFT")
    return rows


def detect_kind(path: str | Path) -> Kind:
    """"pairs" or "sft", from the columns of the file's first row."""
    _, first = _records(Path(path))[0]
    return "pairs" if "chosen" in first or "rejected" in first else "sft"


# ---- building sets from the store -----------------------------------------------------------------------
@dataclass
class PairPolicy:
    """How chains become pairs."""

    max_pairs_per_problem: int = 4
    dedup: bool = True  # identical completions count once
    use_reference: bool = True  # reference chains (GSM8K annotations, solver-built FOL) may be `chosen`

    @property
    def name(self) -> str:
        return f"max{self.max_pairs_per_problem}{'-dedup' if self.dedup else ''}{'-ref' if self.use_reference else ''}"


def _completion(record: dict[str, Any]) -> list[dict[str, Any]]:
    return Chain.from_dict(record).completion_messages()


def _fingerprint(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _training_chains(store: Store, task: str, model_ids: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The store's chains of `task` grouped by problem, without held-out problems; only those of
    `model_ids` when given."""
    guard = heldout_guard()
    grouped = {}
    for problem_id, chains in store.chains_for_pairs(task).items():
        if guard.refuses(task, problem_id, chains[0]["question"]):
            continue
        kept = [c for c in chains if model_ids is None or c["model_id"] in model_ids]
        if kept:
            grouped[problem_id] = kept
    return grouped


def build_pairs(store: Store, task: str, policy: PairPolicy | None = None,
                model_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Pair correct with incorrect chains of the same problem and the same prompt (of `model_ids` only,
    when given).

    The effective verdict counts: a person's accept / reject / edit overrides the verifier.
    Pairs cycle through both sides so one chain is not reused while others wait. Held-out problems
    are left out.
    """
    policy = policy or PairPolicy()
    rows: list[dict[str, Any]] = []
    for problem_id, chains in _training_chains(store, task, model_ids).items():
        groups: dict[str, dict[bool, list[dict[str, Any]]]] = {}
        seen: set[tuple[str, str]] = set()
        for chain in chains:
            verdict = chain["effective_verdict"]
            if verdict is None or (chain["reference"] and not policy.use_reference):
                continue
            record = chain["effective_record"]
            completion = _completion(record)
            prompt_key = _fingerprint(record["prompt"])
            if policy.dedup:
                fingerprint = (prompt_key, _fingerprint(completion))
                if fingerprint in seen:
                    continue
                seen.add(fingerprint)
            side = groups.setdefault(prompt_key, {True: [], False: []})[bool(verdict)]
            side.append({"id": chain["id"], "record": record, "completion": completion})
        for sides in groups.values():
            good, bad = sides[True], sides[False]
            count = min(policy.max_pairs_per_problem, len(good) * len(bad))
            for i in range(count):
                chosen, rejected = good[i % len(good)], bad[(i + i // len(good)) % len(bad)]
                rows.append({
                    "prompt": chosen["record"]["prompt"], "chosen": chosen["completion"],
                    "rejected": rejected["completion"], "tools": chosen["record"]["tools"],
                    "task": task, "problem_id": problem_id,
                    "chosen_chain_id": chosen["id"], "rejected_chain_id": rejected["id"],
                })
    return rows


def chain_source(chain: dict[str, Any]) -> str:
    """Why a chain counts as correct: a person said so (human), it is a reference chain, or the
    verifier accepted a model's chain (teacher)."""
    if chain.get("label") in ("accept", "edited"):
        return "human"
    return "reference" if chain["reference"] else "teacher"


def grounded(task: str, record: dict[str, Any]) -> bool:
    """Whether a chain's final answer is what its last tool call returned (by the task's own verifier): an
    answer the chain worked out, not a right guess that its calls contradict (a 1-in-3 chance on FOL)."""
    from fcapp.tasks import get_task
    from fcapp.tasks.base import Problem

    chain = Chain.from_dict(record)
    results = [s.result for s in chain.steps if s.result is not None and s.call and s.call.name != FINAL_ANSWER]
    if not results or chain.answer is None:
        return False
    return get_task(task).verify(Problem("tool-result", task, "", str(results[-1])), chain.answer)


def build_examples(store: Store, task: str, sources: tuple[str, ...] = SFT_SOURCES, max_per_problem: int = 4,
                   model_ids: set[str] | None = None, grounded_only: bool = True) -> list[dict[str, Any]]:
    """SFT examples: the correct chains of `task` (effective verdict), distinct completions, at most
    `max_per_problem` per problem, from the given sources (reference / teacher / human) and, when
    given, `model_ids`. With `grounded_only` (the default) a teacher chain counts only when its answer is
    what its last tool result gives (see `grounded`): a right guess that its own calls contradict is no
    chain to imitate. A person's accept and reference chains count as they are. Held-out problems are
    left out."""
    unknown = set(sources) - set(SFT_SOURCES)
    if unknown:
        raise ValueError(f"unknown SFT source(s) {', '.join(sorted(unknown))}; choose from {', '.join(SFT_SOURCES)}")
    rows = []
    for problem_id, chains in _training_chains(store, task, model_ids).items():
        seen: set[str] = set()
        for chain in chains:
            if not chain["effective_verdict"] or chain_source(chain) not in sources:
                continue
            record = chain["effective_record"]
            if grounded_only and chain_source(chain) == "teacher" and not grounded(task, record):
                continue
            completion = _completion(record)
            fingerprint = _fingerprint(record["prompt"] + completion)
            if fingerprint in seen or len(seen) >= max_per_problem:
                continue
            seen.add(fingerprint)
            rows.append({"prompt": record["prompt"], "completion": completion, "tools": record["tools"],
                         "task": task, "problem_id": problem_id, "source": chain_source(chain),
                         "chain_id": chain["id"]})
    return rows


# ---- files ---------------------------------------------------------------------------------------------
def export_rows(rows: list[dict[str, Any]], out: str | Path, kind: Kind = "pairs",
                card: dict[str, Any] | None = None) -> list[Path]:
    """Write pairs or SFT examples as JSONL (or Parquet when `out` ends in .parquet), with a dataset
    card `<out>.card.md` next to them. Returns the written paths."""
    out = Path(out)
    keys = (*COLUMNS[kind], *EXTRA_KEYS) + (("source",) if kind == "sft" else ())
    clean = [{k: row.get(k) for k in keys} for row in rows]
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([_for_parquet(r) for r in clean])
        atomic_write(out, lambda p: pq.write_table(table, p))
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
    card_path = out.with_name(out.name + ".card.md")
    atomic_write_text(card_path, render_card(card or {}, clean, kind))
    return [out, card_path]


def export_pairs(rows: list[dict[str, Any]], out: str | Path, card: dict[str, Any] | None = None) -> list[Path]:
    return export_rows(rows, out, "pairs", card)


def _for_parquet(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet wants one type per column: tools schemas (free-form JSON) are stored as a JSON string."""
    return row | {"tools": json.dumps(row["tools"], ensure_ascii=False)}


def load_pair_file(path: str | Path) -> list[dict[str, Any]]:
    """Read an exported (or hand-made) preference file: `read_training_file`'s rows, as exported."""
    return [{k: row.get(k) for k in (*COLUMNS["pairs"], *EXTRA_KEYS)} for row in read_training_file(path, "pairs")]


def import_pairs(path: str | Path, store: Store, policy: str | None = None, file_name: str | None = None) -> dict[str, Any]:
    """Store a preference file's rows as a pair set of its own (all rows validated first: a bad file changes
    nothing), named `imported-<file stem>` (of `file_name` when given: an upload's original name) unless
    `policy` is given; an existing set of that name is never replaced (the name gets a number). Returns
    {"pairs", "policy", "tasks"}."""
    rows = load_pair_file(path)
    existing = set(store.pair_sets())
    base = policy or f"imported-{re.sub(r'[^A-Za-z0-9._-]+', '-', Path(file_name or path).stem)[:60]}"
    name, n = base, 2
    while name in existing:
        name, n = f"{base}-{n}", n + 1
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row.get("task") or "unknown", []).append(row | {"problem_id": row.get("problem_id") or ""})
    for task, task_rows in by_task.items():
        store.save_pairs(task, name, task_rows)
    return {"pairs": len(rows), "policy": name, "tasks": sorted(by_task)}


def render_card(card: dict[str, Any], rows: list[dict[str, Any]], kind: Kind = "pairs") -> str:
    """A short dataset card: what the rows are, where they came from, how they were built."""
    per_task: dict[str, int] = {}
    for row in rows:
        per_task[row.get("task") or "?"] = per_task.get(row.get("task") or "?", 0) + 1
    what = "preference pairs" if kind == "pairs" else "SFT examples"
    lines = [f"# fcapp {what}", "", f"Created {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(rows)} {what}.", "",
             f"| task | {what} |", "|---|---|"]
    lines += [f"| {task} | {n} |" for task, n in sorted(per_task.items())]
    layout = ("TRL conversational preference rows (prompt / chosen / rejected message lists, tools)" if kind == "pairs"
              else "prompt / completion message lists (train on the assistant turns of the completion), tools")
    lines += ["", f"Format: {layout}. Held-out problems are never included.",
              "", "```json", json.dumps(card, indent=2, ensure_ascii=False, default=str), "```", ""]
    return "\n".join(lines)


def _card_facts(store: Store, task: str) -> dict[str, Any]:
    counts = store.counts(task)
    teachers = sorted({c["model_id"] for c in store.list_chains(task=task, limit=100000)})
    sampling = sorted({json.dumps(c.get("sampling"), sort_keys=True) for c in store.list_chains(task=task, limit=200)
                       if c.get("sampling")})
    return {"task": task, "chains": counts["chains"], "correct": counts["correct"], "incorrect": counts["incorrect"],
            "correct_rate": round(counts["correct"] / counts["chains"], 3) if counts["chains"] else None,
            "labelled": counts["labelled"], "teachers": teachers, "sampling": [json.loads(s) for s in sampling][:5]}


def make_pairs(store: Store, task: str, out: str | Path, policy: PairPolicy | None = None) -> dict[str, Any]:
    """Build, store and export the pair set of `task`; returns the card's facts. Refuses to write an empty set."""
    policy = policy or PairPolicy()
    rows = build_pairs(store, task, policy)
    if not rows:
        raise TrainingDataError(f"no preference pairs for {task} yet: a pair needs a training problem with a correct "
                                "and an incorrect chain (generate chains, or label some)")
    store.save_pairs(task, policy.name, rows)
    card = _card_facts(store, task) | {"pairs": len(rows), "policy": asdict(policy) | {"name": policy.name}}
    paths = export_rows(rows, out, "pairs", card)
    return card | {"files": [str(p) for p in paths]}


def make_examples(store: Store, tasks: list[str], out: str | Path, sources: tuple[str, ...] = SFT_SOURCES,
                  max_per_problem: int = 4, grounded_only: bool = True) -> dict[str, Any]:
    """Build and export the SFT examples of `tasks` (several tasks make one mixed set); returns the card's
    facts. Refuses to write an empty set."""
    rows = [row for task in tasks
            for row in build_examples(store, task, sources, max_per_problem, grounded_only=grounded_only)]
    if not rows:
        raise TrainingDataError(f"no correct chains of training problems for {', '.join(tasks)} from "
                                f"{', '.join(sources)}: generate chains (`--reference` adds the reference chains)")
    by_source = {s: sum(r["source"] == s for r in rows) for s in sources}
    card = {"tasks": tasks, "examples": len(rows), "by_source": by_source, "max_per_problem": max_per_problem,
            "grounded_only": grounded_only, "per_task": [_card_facts(store, t) for t in tasks]}
    paths = export_rows(rows, out, "sft", card)
    return card | {"files": [str(p) for p in paths]}
