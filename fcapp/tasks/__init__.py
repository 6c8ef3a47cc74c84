"""The task registry: task names -> Task instances, and user problem files loaded by task.

Every task module is imported only when its task is first asked for, so importing this package
stays cheap (no sympy / z3) and works while a task module is missing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from fcapp.tasks.base import LoadedProblems, Task


def _gsm8k() -> Task:
    from fcapp.tasks.gsm8k import Gsm8kTask

    return Gsm8kTask()


def _fol() -> Task:
    from fcapp.tasks.fol import FolGenTask

    return FolGenTask()


def _folio() -> Task:
    from fcapp.tasks.fol import FolioTask

    return FolioTask()


def _folio_fol() -> Task:
    from fcapp.tasks.fol import FolioFormulaTask

    return FolioFormulaTask()


def _folio_nl() -> Task:
    from fcapp.tasks.fol import FolioWordsTask

    return FolioWordsTask()


TASKS: dict[str, Callable[[], Task]] = {"gsm8k": _gsm8k, "fol": _fol, "folio": _folio, "folio-fol": _folio_fol,
                                        "folio-nl": _folio_nl}


def task_names() -> list[str]:
    """Every registered task name, in registry order."""
    return list(TASKS)


@functools.cache
def get_task(name: str) -> Task:
    """The one shared instance of a task. Raises KeyError listing the valid names."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    return TASKS[name]()


def load_problems(task_name: str, path: str | Path, strict: bool = False) -> LoadedProblems:
    """Problems from a user JSONL file in `task_name`'s format: malformed rows are skipped and reported
    (file:line: reason); `strict` makes the first one a DataFileError instead."""
    return get_task(task_name).load_file(path, strict)
