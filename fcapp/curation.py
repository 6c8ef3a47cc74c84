"""Curation: people's labels on stored chains. A label that goes against the verifier says so, an edited
answer is checked by the task and re-verified, a labelling queue walks a filter's chains one by one, bulk
labels go to a filter's chains at once, every label can be undone by the person who gave it, and when two
people labelled the same chains their agreement is measured. The Curate tab and `fcapp label` call these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from fcapp.store import Store

QUEUE_LIMIT = 500  # chains in one labelling queue
BULK = {  # bulk action -> (label given, the verifier's verdict of the chains it applies to)
    "accept-verified": ("accept", True),
    "reject-failed": ("reject", False),
}


@dataclass
class ChainFilter:
    """Which chains: the Curate tab's filters and `fcapp label`'s flags (None: any)."""

    task: str | None = None
    verdict: bool | None = None  # the verdict that counts (a person's label over the verifier's)
    label: str | None = None  # accept, reject, edited or unlabelled
    model_id: str | None = None
    problem_id: str | None = None

    def chains(self, store: Store, limit: int = QUEUE_LIMIT) -> list[dict[str, Any]]:
        """Chain summaries, newest first (the order of the Curate table)."""
        return store.list_chains(task=self.task, verdict=self.verdict, label=self.label, model_id=self.model_id,
                                 problem_id=self.problem_id, limit=limit)


@dataclass
class Labelled:
    """What one labelling did: the label ids (for undo), and the message to show."""

    label_ids: list[int]
    chain_ids: list[int]
    message: str
    overrides_verifier: bool = False


def _mark(verdict: bool | None) -> str:
    return {True: "✓", False: "✗", None: "–"}[verdict]


def _chain(store: Store, chain_id: int) -> dict[str, Any]:
    chain = store.get_chain(int(chain_id))
    if chain is None:
        raise KeyError(f"no chain {chain_id}")
    return chain


def expected_answer(store: Store, chain: dict[str, Any]) -> str | None:
    """The ground truth of the chain's problem (stored, else from its task), None for a typed-in problem."""
    problem = store.get_problem(chain["problem_id"], chain["task"])
    if problem is None:
        from fcapp.tasks import get_task

        try:
            problem = get_task(chain["task"]).get(chain["problem_id"])
        except KeyError:
            return None
    return problem.answer


def label(store: Store, chain_id: int, value: str, who: str) -> Labelled:
    """Accept or reject one chain as `who`. When that goes against the verifier's verdict the message warns:
    the label wins (the chain counts as the person says), and undo takes it back."""
    if value not in ("accept", "reject"):
        raise ValueError(f"label a chain accept or reject, not {value!r} (an edit goes through edit_answer)")
    chain = _chain(store, chain_id)
    label_id = store.label_chain(chain["id"], value, who)
    message = f"Chain {chain['id']} {'accepted ✓' if value == 'accept' else 'rejected ✗'}."
    overrides = chain["verdict"] is not None and chain["verdict"] != (value == "accept")
    if overrides:
        found = "correct" if chain["verdict"] else "incorrect"
        message += (f" ⚠ The verifier found this chain {found} (answer {chain['answer']!r}, expected "
                    f"{expected_answer(store, chain)!r}); your label overrides it, so it now counts as "
                    f"{'correct' if value == 'accept' else 'incorrect'}. Undo takes the label back.")
    return Labelled([label_id], [chain["id"]], message, overrides)


def edit_answer(store: Store, chain_id: int, answer: str, who: str) -> Labelled:
    """Correct a chain's final answer as `who`: the task checks its form first (ValueError: nothing is stored),
    then the verifier re-verifies it and the edited chain is what counts and trains."""
    from fcapp.solve import edit_final_answer

    chain = _chain(store, chain_id)
    edited = edit_final_answer(chain["record"], answer or "")
    label_id = store.label_chain(chain["id"], "edited", who, edited_record=edited, edited_verdict=edited.verdict)
    return Labelled([label_id], [chain["id"]],
                    f"Chain {chain['id']} edited: answer {edited.answer!r} re-verified {_mark(edited.verdict)}.")


def undo(store: Store, done: Labelled | list[int], who: str) -> list[int]:
    """Take back labels `who` gave (a Labelled, or label ids); returns the chains they were on."""
    return store.remove_labels(done.label_ids if isinstance(done, Labelled) else done, who)


# ---- the labelling queue ------------------------------------------------------------------------------------
def queue(store: Store, flt: ChainFilter) -> list[int]:
    """The chain ids a queue walks: the filter's chains when it starts, newest first. Fixed from then on, so
    progress is measured against what the queue started with, however the filter's matches change."""
    return [row["id"] for row in flt.chains(store, QUEUE_LIMIT)]


def queue_state(store: Store, ids: list[int], who: str, after: int | None = None) -> dict[str, Any]:
    """Where a queue stands for `who`: total, labelled (by them), and the next chain they have not labelled,
    looking from the chain `after` on and wrapping around (None when they labelled every one)."""
    mine = {row["chain_id"] for row in store.annotator_labels(chain_ids=ids) if row["who"] == who}
    start = ids.index(after) + 1 if after in ids else 0
    upcoming = itertools.chain(ids[start:], ids[:start])
    return {"total": len(ids), "labelled": len(mine & set(ids)),
            "next": next((chain_id for chain_id in upcoming if chain_id not in mine), None)}


# ---- bulk labels --------------------------------------------------------------------------------------------
def bulk_targets(store: Store, flt: ChainFilter, action: str) -> list[int]:
    """The chains a bulk action would label: the filter's chains that nobody has labelled yet and that the
    verifier found correct (accept-verified) or incorrect (reject-failed)."""
    if action not in BULK:
        raise ValueError(f"unknown bulk action {action!r}; choose from {', '.join(BULK)}")
    _, verdict = BULK[action]
    return [row["id"] for row in flt.chains(store, limit=100_000) if row["label"] is None and row["verdict"] is verdict]


def bulk_label(store: Store, flt: ChainFilter, action: str, who: str, expected: int | None = None) -> Labelled:
    """Apply a bulk action as `who` in one transaction. `expected` is the count the person confirmed: when
    the filter's matches changed since (someone labelled meanwhile), nothing is labelled and ValueError says
    so, rather than labelling chains nobody saw counted."""
    ids = bulk_targets(store, flt, action)
    if expected is not None and len(ids) != expected:
        raise ValueError(f"the filter now matches {len(ids)} chains, not the {expected} you confirmed "
                         "(chains were added or labelled meanwhile): review the count again")
    if not ids:
        return Labelled([], [], "No chain to label: every chain of this filter is labelled, or none matches.")
    value, _ = BULK[action]
    label_ids = store.label_chains(ids, value, who)
    return Labelled(label_ids, ids, f"{'Accepted' if value == 'accept' else 'Rejected'} {len(ids)} chains as {who}.")


# ---- agreement ------------------------------------------------------------------------------------------------
def chain_labels(store: Store, chain_id: int) -> dict[str, str]:
    """Each person's current label of one chain."""
    return {row["who"]: row["label"] for row in store.annotator_labels(chain_ids=[chain_id])}


def cohen_kappa(first: list[bool], second: list[bool]) -> float | None:
    """Cohen's kappa of two annotators' yes / no verdicts on the same items (None when chance agreement is 1)."""
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    p1, p2 = sum(first) / n, sum(second) / n
    chance = p1 * p2 + (1 - p1) * (1 - p2)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(store: Store, task: str | None = None) -> list[dict[str, Any]]:
    """For each two people who labelled the same chains: how many, on how many they agree (the verdict their
    labels give), and Cohen's kappa."""
    by_person: dict[str, dict[int, bool | None]] = {}
    for row in store.annotator_labels(task=task):
        by_person.setdefault(row["who"], {})[row["chain_id"]] = row["verdict"]
    rows = []
    for a, b in itertools.combinations(sorted(by_person), 2):
        shared = [c for c in by_person[a] if c in by_person[b]
                  and by_person[a][c] is not None and by_person[b][c] is not None]
        if not shared:
            continue
        first, second = [bool(by_person[a][c]) for c in shared], [bool(by_person[b][c]) for c in shared]
        agree = sum(x == y for x, y in zip(first, second))
        rows.append({"annotators": (a, b), "chains": len(shared), "agree": agree,
                     "kappa": cohen_kappa(first, second),
                     "disagree_on": [c for c, x, y in zip(shared, first, second) if x != y]})
    return rows
