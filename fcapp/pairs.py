"""Verified (and human-labelled) chains -> TRL preference rows, exported as JSONL / Parquet.

A row is `{"prompt": [system with injected functions, demo, question], "chosen": [assistant/tool
turns of a correct chain], "rejected": [... of an incorrect chain], "tools": [schemas], "task",
"problem_id"}`: conversational preference data that `datasets.load_dataset` reads and TRL's
DPOTrainer takes unchanged. The shared prefix stays in `prompt` (DPO masks nothing else).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fcapp.files import DataFileError, atomic_write, atomic_write_text, read_jsonl
from fcapp.records import Chain
from fcapp.store import Store

ROW_KEYS = ("prompt", "chosen", "rejected", "tools", "task", "problem_id")


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


def build_pairs(store: Store, task: str, policy: PairPolicy | None = None) -> list[dict[str, Any]]:
    """Pair correct with incorrect chains of the same problem and the same prompt.

    The effective verdict counts: a person's accept / reject / edit overrides the verifier.
    Pairs cycle through both sides so one chain is not reused while others wait.
    """
    policy = policy or PairPolicy()
    rows: list[dict[str, Any]] = []
    for problem_id, chains in store.chains_for_pairs(task).items():
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


def export_pairs(rows: list[dict[str, Any]], out: str | Path, card: dict[str, Any] | None = None) -> list[Path]:
    """Write rows as JSONL (and Parquet when `out` ends in .parquet, or both with `.jsonl`+parquet=True).

    Returns the written paths; a dataset card `<out>.card.md` goes next to them.
    """
    out = Path(out)
    clean = [{k: row.get(k) for k in ROW_KEYS} for row in rows]
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([_for_parquet(r) for r in clean])
        atomic_write(out, lambda p: pq.write_table(table, p))
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
    card_path = out.with_name(out.name + ".card.md")
    atomic_write_text(card_path, render_card(card or {}, clean))
    return [out, card_path]


def _for_parquet(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet wants one type per column: tools schemas (free-form JSON) are stored as a JSON string."""
    return row | {"tools": json.dumps(row["tools"], ensure_ascii=False)}


def load_pair_file(path: str | Path) -> list[dict[str, Any]]:
    """Read an exported (or hand-made) preference file; a clear error names the file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = list(enumerate(pq.read_table(path).to_pylist(), start=1))
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from None
        for line, record in records:
            if isinstance(record.get("tools"), str):
                try:
                    record["tools"] = json.loads(record["tools"])
                except (ValueError, RecursionError):
                    raise DataFileError(f"{path}:{line}: 'tools' is not valid JSON") from None
    else:
        records = read_jsonl(path)
    rows = []
    for line, record in records:
        for key in ("prompt", "chosen", "rejected"):
            value = record.get(key)
            if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
                raise DataFileError(f"{path}:{line}: '{key}' must be a list of {{role, content}} messages")
        rows.append({k: record.get(k) for k in ROW_KEYS})
    if not rows:
        raise DataFileError(f"{path}: no preference pairs in the file")
    return rows


def import_pairs(path: str | Path, store: Store, policy: str = "imported") -> int:
    """Store a preference file's rows as a pair set (all rows validated first: a bad file changes nothing)."""
    rows = load_pair_file(path)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row.get("task") or "unknown", []).append(row | {"problem_id": row.get("problem_id") or ""})
    for task, task_rows in by_task.items():
        store.save_pairs(task, policy, task_rows)
    return len(rows)


def render_card(card: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A short dataset card: what the pairs are, where they came from, how they were built."""
    per_task: dict[str, int] = {}
    for row in rows:
        per_task[row.get("task") or "?"] = per_task.get(row.get("task") or "?", 0) + 1
    lines = ["# fcapp preference dataset", "", f"Created {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(rows)} pairs.", "",
             "| task | pairs |", "|---|---|"]
    lines += [f"| {task} | {n} |" for task, n in sorted(per_task.items())]
    lines += ["", "Format: TRL conversational preference rows (prompt / chosen / rejected message lists, tools).",
              "", "```json", json.dumps(card, indent=2, ensure_ascii=False, default=str), "```", ""]
    return "\n".join(lines)


def make_pairs(store: Store, task: str, out: str | Path, policy: PairPolicy | None = None) -> dict[str, Any]:
    """Build, store and export the pair set of `task`; returns the card's facts."""
    policy = policy or PairPolicy()
    rows = build_pairs(store, task, policy)
    store.save_pairs(task, policy.name, rows)
    counts = store.counts(task)
    teachers = sorted({c["model_id"] for c in store.list_chains(task=task, limit=100000)})
    sampling = sorted({json.dumps(c.get("sampling"), sort_keys=True) for c in store.list_chains(task=task, limit=200)
                       if c.get("sampling")})
    card = {"task": task, "pairs": len(rows), "policy": asdict(policy) | {"name": policy.name},
            "chains": counts["chains"], "correct": counts["correct"], "incorrect": counts["incorrect"],
            "correct_rate": round(counts["correct"] / counts["chains"], 3) if counts["chains"] else None,
            "labelled": counts["labelled"], "teachers": teachers,
            "sampling": [json.loads(s) for s in sampling][:5]}
    paths = export_pairs(rows, out, card)
    return card | {"files": [str(p) for p in paths]}
