"""GSM8K: grade-school math word problems with a numeric ground truth.

The shipped file (assets/gsm8k/train.jsonl, MIT) holds solutions whose `<<expr=result>>`
annotations are calculator calls; they become correct reference chains. Model answers are
untrusted text: the verifier extracts a number with regular expressions, never by evaluating.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from fcapp.files import read_jsonl
from fcapp.paths import shipped
from fcapp.records import FINAL_ANSWER, Call
from fcapp.tasks.base import Problem, Task
from fcapp.tools.base import Registry
from fcapp.tools.math import math_toolkit

CALCULATOR = "calculator"
# The worked example every prompt carries: Natalia's clips, two calculator steps (train split).
DEMONSTRATION_ID = "gsm8k-0"
# Model answers longer than this are cut to their tail before the number is looked for.
MAX_ANSWER_CHARS = 1000

_ANNOTATION = re.compile(r"<<(.*?)>>", re.S)
_GROUND_TRUTH = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
# A thousands comma: between a digit and exactly three digits.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number in prose: an optional fraction bar, a minus only where it cannot be subtraction.
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?")
_ARITHMETIC = re.compile(r"[\d.+\-*/()\s]+")


def canonical_number(text: str) -> str:
    """'1,200' -> '1200', '2.50' -> '2.5', '-3.0' -> '-3'. Raises ValueError if not a plain number."""
    cleaned = _THOUSANDS.sub("", text.strip())
    if not _GROUND_TRUTH.fullmatch(cleaned):
        raise ValueError(f"not a number: {text!r}")
    value = Decimal(cleaned)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: object) -> float | None:
    """The number a free-text answer (or a plain int / float) gives, or None.

    Handles currency and units ("$1,234.00", "18 dollars"), prose ("The answer is 72."),
    signs ("-3"), decimals and simple fractions ("3/4"). With several numbers the last one wins,
    as in the usual GSM8K evaluation ("48 + 24 = 72").
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    text = text[-MAX_ANSWER_CHARS:].replace("\u2212", "-")
    text = _THOUSANDS.sub("", text)
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, whole, denominator = matches[-1].groups()
    value = float(whole)
    if denominator is not None:
        if float(denominator) == 0:
            return None
        value /= float(denominator)
    value = -value if sign else value
    return value if math.isfinite(value) else None


def normalise_expression(expression: str) -> str | None:
    """An annotation's expression as plain arithmetic a safe calculator accepts, or None.

    Repairs what hand-written annotations contain: currency signs, thousands commas, units,
    'x' / '×' / '÷' / '^' operators, percentages, leading zeros and implicit products ("2(3+4)").
    """
    expr = expression.replace("\u2212", "-").replace("×", "*").replace("÷", "/").replace("^", "**")
    expr = re.sub(r"[$€£]", "", expr)
    expr = _THOUSANDS.sub("", expr)
    expr = re.sub(r"(?<=[\d)\s])[xX](?=[\s\d(.])", "*", expr)
    expr = re.sub(r"(\d+(?:\.\d+)?|\.\d+)\s*%", r"(\1/100)", expr)
    expr = re.sub(r"[A-Za-z_]+", " ", expr)  # unit words ("5 hours * 3")
    expr = re.sub(r"(?<![\d.])0+(?=\d)", "", expr)
    expr = re.sub(r"(?<=[\d)])\s*\(", "*(", expr)
    expr = re.sub(r"\)\s*(?=[\d.(])", ")*", expr)
    expr = re.sub(r"\s+", "", expr)
    if not expr or not _ARITHMETIC.fullmatch(expr) or not re.search(r"\d", expr):
        return None
    return expr


def annotation_expressions(solution: str) -> list[str]:
    """The calculator expressions of a solution's `<<expr=result>>` annotations, normalised,
    in order, exact repeats dropped; annotations that are not arithmetic are skipped."""
    expressions: list[str] = []
    for annotation in _ANNOTATION.findall(solution):
        parts = annotation.split("=")
        # `<<a=b=c>>`: the part right before the result is what yields it.
        expr = normalise_expression(parts[-2] if len(parts) > 1 else parts[0])
        if expr is not None and expr not in expressions:
            expressions.append(expr)
    return expressions


def problem_from_record(record: dict[str, Any], problem_id: str | None = None) -> Problem:
    """Validate a GSM8K record {question, answer ending in "#### N"} and build its Problem.

    Without an id, the id comes from a hash of the question: it never collides with a shipped
    `gsm8k-<index>` id and survives reordering the file. Raises ValueError naming the fault.
    """
    for key in ("question", "answer"):
        if key not in record:
            raise ValueError(f"missing field {key!r} (a GSM8K record has 'question' and 'answer')")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"field {key!r} must be non-empty text")
    solution: str = record["answer"]
    if "####" not in solution:
        raise ValueError("field 'answer' has no '#### N' line giving the final number")
    final = solution.rsplit("####", 1)[1].strip()
    try:
        answer = canonical_number(final)
    except (ValueError, InvalidOperation):
        raise ValueError(f"the answer after '####' is not a number: {final[:40]!r}") from None
    question = record["question"].strip()
    if problem_id is None:
        problem_id = f"gsm8k-q{hashlib.sha256(question.encode()).hexdigest()[:12]}"
    return Problem(problem_id, Gsm8kTask.name, question, answer, {"solution": solution})


@functools.cache
def _load(path: Path) -> tuple[Problem, ...]:
    """The shipped problems, parsed once per process (the file has 7,473 lines)."""
    return tuple(problem_from_record(record, f"gsm8k-{i}") for i, (_, record) in enumerate(read_jsonl(path)))


class Gsm8kTask(Task):
    """GSM8K word problems solved with a calculator; the answer is a number."""

    name = "gsm8k"
    description = "Grade-school math word problems (GSM8K); the answer is a number."

    def problems(self) -> list[Problem]:
        return list(_load(shipped("gsm8k/train.jsonl")))

    def tools(self, problem: Problem) -> Registry:
        return math_toolkit()

    def verify(self, problem: Problem, answer: str | None) -> bool:
        """True when the answer's number equals the ground truth (tolerance 1e-6). The ground truth
        is read the same way, so a typed one ("$1,200" from `solve --expected`) works too."""
        got, expected = extract_number(answer), extract_number(problem.answer)
        if got is None or expected is None:
            return False
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6)

    def check_answer(self, answer: str) -> str:
        """A GSM8K answer is a number ("72", "$1,200", "3/4"); words alone are refused."""
        answer = super().check_answer(answer)
        if extract_number(answer) is None:
            raise ValueError(f"a {self.name} answer is a number (e.g. 72 or 3.5), not {answer[:40]!r}")
        return answer

    def reference_calls(self, problem: Problem) -> list[Call] | None:
        """The solution's calculations as calculator calls, then the ground truth as final answer."""
        expressions = annotation_expressions(problem.meta.get("solution", ""))
        if not expressions:
            return None
        calls = [Call(CALCULATOR, {"expression": expr}) for expr in expressions]
        return calls + [Call(FINAL_ANSWER, {"answer": problem.answer})]

    def demonstration(self) -> tuple[Problem, list[Call]]:
        problem = self.get(DEMONSTRATION_ID)
        calls = self.reference_calls(problem)
        if calls is None:
            raise RuntimeError(f"demonstration problem {DEMONSTRATION_ID} has no reference calls")
        return problem, calls

    def parse_record(self, record: dict[str, Any], index: int) -> Problem:
        """A user GSM8K record; its optional 'id' field is kept, else the id hashes the question."""
        if "id" not in record:
            return problem_from_record(record)
        problem_id = str(record["id"]).strip()
        if not problem_id:
            raise ValueError("field 'id' is empty")
        return problem_from_record(record, problem_id)
