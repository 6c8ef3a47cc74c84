"""A task: problems with ground truth, the functions a model may call on them, and a verifier."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcapp.files import DataFileError, read_jsonl
from fcapp.records import Call
from fcapp.tools.base import Registry

HELDOUT_FRACTION = 0.2


@dataclass
class Problem:
    id: str
    task: str
    question: str
    answer: str  # ground truth, normalised ("72", "True", "False", "Unknown")
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str:
        """train or heldout, from a hash of the problem's group (meta["group"], e.g. a FOLIO story) or id."""
        return split_of(str(self.meta.get("group") or self.id))


def split_of(problem_id: str) -> str:
    """Deterministic train / heldout assignment from a hash of the id (stable across runs and machines)."""
    bucket = int(hashlib.sha256(problem_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


class Task(ABC):
    """Subclasses load problems and define the toolkit, the demonstration and the verifier."""

    name: str
    description: str

    @abstractmethod
    def problems(self) -> list[Problem]:
        """All problems of the task, in a fixed order."""

    @abstractmethod
    def tools(self, problem: Problem) -> Registry:
        """The functions the model may call on this problem (some may be bound to its premises)."""

    @abstractmethod
    def verify(self, problem: Problem, answer: str | None) -> bool:
        """Is `answer` (untrusted model text) the ground truth?"""

    def check_answer(self, answer: str) -> str:
        """A final answer a person typed, checked for the task's form (the text, stripped); ValueError saying
        what the task expects. Whether it is *right* is the verifier's business, not this check's."""
        answer = answer.strip()
        if not answer:
            raise ValueError("type the corrected final answer")
        return answer

    @abstractmethod
    def reference_calls(self, problem: Problem) -> list[Call] | None:
        """A correct chain of calls for this problem, when the data allows building one."""

    @abstractmethod
    def demonstration(self) -> tuple[Problem, list[Call]]:
        """The worked example injected into every prompt (a fixed problem outside the held-out split)."""

    @abstractmethod
    def parse_record(self, record: dict[str, Any], index: int) -> Problem:
        """One JSONL record of this task's file format -> Problem (raise ValueError on bad fields)."""

    def split(self, name: str | None) -> list[Problem]:
        return [p for p in self.problems() if name in (None, "all", p.split)]

    def get(self, problem_id: str) -> Problem:
        """By id, or by position in the task's problem list (`--problem-id 0`)."""
        problems = self.problems()
        for p in problems:
            if p.id == problem_id:
                return p
        if problem_id.isdigit() and int(problem_id) < len(problems):
            return problems[int(problem_id)]
        raise KeyError(f"task {self.name} has no problem {problem_id!r}")

    def load_file(self, path: str | Path, strict: bool = False) -> "LoadedProblems":
        """Problems from a JSONL file in this task's format. A malformed row (bad JSON, a missing field, FOL
        that does not parse) is skipped and reported as "file:line: reason"; with `strict` the first one
        raises DataFileError instead. A file with no usable row is an error either way."""
        loaded = LoadedProblems(str(path), [], [])
        rows = read_jsonl(path, None if strict else loaded.skipped)
        for line, record in rows:
            try:
                loaded.problems.append(self.parse_record(record, line))
            except (ValueError, KeyError, TypeError) as exc:
                if strict:
                    raise DataFileError(f"{path}:{line}: {exc}") from None
                loaded.skipped.append(f"{path}:{line}: {exc}")
        if not loaded.problems and not loaded.skipped:
            raise DataFileError(f"{path}: no problems in the file")
        if not loaded.problems:
            more = f" and {len(loaded.skipped) - 3} more" if len(loaded.skipped) > 3 else ""
            raise DataFileError(f"{path}: no usable problems in the file ({'; '.join(loaded.skipped[:3])}{more})")
        return loaded


@dataclass
class LoadedProblems:
    """What a problem file gave: the problems, and each row left out with its file:line and reason."""

    path: str
    problems: list[Problem]
    skipped: list[str]

    def summary(self) -> str:
        used = f"{self.path}: {len(self.problems)} problems used"
        return used + (f", {len(self.skipped)} malformed rows skipped" if self.skipped else "")
