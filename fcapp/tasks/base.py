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
        return split_of(self.id)


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

    def load_file(self, path: str | Path) -> list[Problem]:
        """Problems from a user JSONL file in this task's format; a DataFileError names the file and line."""
        problems = []
        for line, record in read_jsonl(path):
            try:
                problems.append(self.parse_record(record, line))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataFileError(f"{path}:{line}: {exc}") from None
        if not problems:
            raise DataFileError(f"{path}: no problems in the file")
        return problems
