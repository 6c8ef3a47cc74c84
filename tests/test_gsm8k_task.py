"""GSM8K task: loading, splits, answer extraction, verification and reference chains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fcapp.agent import Agent, demonstration
from fcapp.files import DataFileError
from fcapp.records import FINAL_ANSWER, Call
from fcapp.tasks.base import Problem, split_of
from fcapp.tasks.gsm8k import (
    DEMONSTRATION_ID,
    Gsm8kTask,
    annotation_expressions,
    canonical_number,
    extract_number,
    normalise_expression,
)

REPLAYED = 200


@pytest.fixture(scope="module")
def task() -> Gsm8kTask:
    return Gsm8kTask()


def replay(task: Gsm8kTask, problem, calls: list[Call]):
    agent = Agent(task.tools(problem), [])
    chain = agent.start(task.name, problem.id, problem.question, "reference")
    return agent.replay(chain, calls)


def annotated_results(solution: str) -> dict[str, float]:
    """Expression (as reference_calls normalises it) -> the result the annotator wrote."""
    results = {}
    for annotation in re.findall(r"<<(.*?)>>", solution):
        *_, expr, result = annotation.split("=")
        normalised = normalise_expression(expr)
        if normalised is not None:
            results[normalised] = float(result.replace(",", ""))
    return results


# ---- loading ------------------------------------------------------------------------------------
def test_shipped_file_loads_once_with_clean_ground_truth(task: Gsm8kTask) -> None:
    problems = task.problems()
    assert len(problems) == 7473
    first = problems[0]
    assert (first.id, first.task, first.answer) == ("gsm8k-0", "gsm8k", "72")
    assert first.question.startswith("Natalia sold clips")
    assert first.meta["solution"].endswith("#### 72")
    assert Gsm8kTask().problems()[5] is problems[5]  # parsed once per process, shared by instances
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)
    assert len({p.id for p in problems}) == len(problems)


def test_ground_truth_commas_are_removed(task: Gsm8kTask) -> None:
    with_comma = next(p for p in task.problems() if re.search(r"####\s*\d{1,3},\d{3}", p.meta["solution"]))
    assert "," not in with_comma.answer
    assert with_comma.answer == with_comma.meta["solution"].rsplit("####", 1)[1].strip().replace(",", "")


def test_get_by_id_and_by_index(task: Gsm8kTask) -> None:
    assert task.get("gsm8k-17") is task.problems()[17]
    assert task.get("17") is task.problems()[17]
    with pytest.raises(KeyError, match="no problem"):
        task.get("gsm8k-99999")
    with pytest.raises(KeyError):
        task.get("7473")


def test_split_is_deterministic_and_about_a_fifth_heldout(task: Gsm8kTask) -> None:
    problems = task.problems()
    assert [p.split for p in problems[:100]] == [split_of(f"gsm8k-{i}") for i in range(100)]
    heldout = task.split("heldout")
    train = task.split("train")
    assert len(heldout) + len(train) == len(problems) == len(task.split("all"))
    assert not {p.id for p in heldout} & {p.id for p in train}
    assert 0.18 < len(heldout) / len(problems) < 0.22


def test_tools_offer_the_calculator(task: Gsm8kTask) -> None:
    tools = task.tools(task.problems()[0])
    assert "calculator" in tools.names()
    assert extract_number(tools.get("calculator").call({"expression": "48/2"})) == 24


# ---- answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", 72.0),
        ("$1,234.00", 1234.0),
        ("18 dollars", 18.0),
        ("The answer is 72.", 72.0),
        ("-3", -3.0),
        ("2.50", 2.5),
        ("\u22123", -3.0),
        (".5", 0.5),
        ("3/4", 0.75),
        ("50%", 50.0),
        ("1,000,000 people", 1000000.0),
        ("48 + 24 = 72", 72.0),
        ("x = -7", -7.0),
        ("10-3", 3.0),  # a dash between numbers is subtraction, not a sign
        ("**72**", 72.0),
        ("\\boxed{72}", 72.0),
        (72, 72.0),
        (2.5, 2.5),
    ],
)
def test_extract_number(text: object, expected: float) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "text", [None, "", "   ", "no idea", "NaN", "inf", "seventy-two", "1/0", "9" * 2000, True, [72], {"a": 1}]
)
def test_extract_number_refuses_garbage(text: object) -> None:
    assert extract_number(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("72", "72"), ("1,200", "1200"), ("2.50", "2.5"), ("-3", "-3"), ("4.0", "4"), (" 109,200,000 ", "109200000")],
)
def test_canonical_number(text: str, expected: str) -> None:
    assert canonical_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1,20", "$5", "1e5", "3 apples"])
def test_canonical_number_refuses_non_numbers(text: str) -> None:
    with pytest.raises(ValueError):
        canonical_number(text)


def test_verify_known_answers(task: Gsm8kTask) -> None:
    natalia = task.get("gsm8k-0")
    for answer in ("72", "72 clips", "The answer is 72.", "$72.00", "72.0000001", " 72 "):
        assert task.verify(natalia, answer), answer
    for answer in ("73", "71.99", "-72", "7.2", "720", "24", "72 or 73 or 74"):
        assert not task.verify(natalia, answer), answer
    big = task.parse_record({"question": "q?", "answer": "#### 1,234,567"}, 1)
    assert task.verify(big, "$1,234,567") and not task.verify(big, "1234568")
    typed = Problem("custom", "gsm8k", "q?", "$1,200")  # `solve --question ... --expected '$1,200'`
    assert task.verify(typed, "1200") and not task.verify(typed, "1201")
    assert not task.verify(Problem("custom", "gsm8k", "q?", "unknown"), "1200")


@pytest.mark.parametrize("answer", [None, "", "I don't know", "NaN", "__import__('os').system('x')", "<<48+24>>"])
def test_verify_garbage_is_false(task: Gsm8kTask, answer: str | None) -> None:
    assert task.verify(task.get("gsm8k-0"), answer) is False


# ---- reference chains ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("48/2", "48/2"),
        (" 2 * .5 ", "2*.5"),
        ("$1,200 * 2", "1200*2"),
        ("3 x 4", "3*4"),
        ("3×4÷2", "3*4/2"),
        ("2^3", "2**3"),
        ("20% * 50", "(20/100)*50"),
        ("5 hours * 3", "5*3"),
        ("2(3+4)", "2*(3+4)"),
        ("(1+2)(3+4)", "(1+2)*(3+4)"),
        ("05+3", "5+3"),
        ("0.5+100", "0.5+100"),
        ("-14+-8+1", "-14+-8+1"),
    ],
)
def test_normalise_expression(expression: str, expected: str) -> None:
    assert normalise_expression(expression) == expected


@pytest.mark.parametrize("expression", ["", "hours", "import os", "a[0]", "x; y", "'7'"])
def test_normalise_expression_refuses_non_arithmetic(expression: str) -> None:
    assert normalise_expression(expression) is None


def test_annotation_expressions() -> None:
    solution = "A <<48/2=24>>24, again <<48/2=24>>24, then <<24+24=48=48>>, <<junk>> and <<2 x $1,000=2000>>.\n#### 2000"
    assert annotation_expressions(solution) == ["48/2", "48", "2*1000"]


def test_reference_calls_of_the_first_problem(task: Gsm8kTask) -> None:
    calls = task.reference_calls(task.get("gsm8k-0"))
    assert calls == [
        Call("calculator", {"expression": "48/2"}),
        Call("calculator", {"expression": "48+24"}),
        Call(FINAL_ANSWER, {"answer": "72"}),
    ]


def test_reference_calls_none_without_annotations(task: Gsm8kTask) -> None:
    bare = next(p for p in task.problems() if "<<" not in p.meta["solution"])
    assert task.reference_calls(bare) is None


def test_reference_chains_replay_correctly(task: Gsm8kTask) -> None:
    """Replay the first problems' reference calls through the real agent and calculator."""
    chains = correct = calls_total = calls_agreeing = 0
    failures = []
    for problem in task.problems()[:REPLAYED]:
        calls = task.reference_calls(problem)
        if calls is None:
            continue
        chains += 1
        chain = replay(task, problem, calls)
        if chain.stop_reason == "answer" and task.verify(problem, chain.answer) and chain.reference:
            correct += 1
        else:
            failures.append((problem.id, chain.stop_reason, chain.answer))
        expected = annotated_results(problem.meta["solution"])
        for step in chain.steps[:-1]:
            calls_total += 1
            assert step.error is None, (problem.id, step.text, step.error)
            want = expected[step.call.arguments["expression"]]
            calls_agreeing += abs(extract_number(step.result) - want) <= 1e-6 * max(1.0, abs(want))
    rate = correct / chains
    print(f"\nreference chains: {correct}/{chains} verified ({rate:.1%}); "
          f"calculator agrees with the annotations on {calls_agreeing}/{calls_total} calls")
    assert chains >= 0.95 * REPLAYED
    assert rate >= 0.95, failures[:10]
    assert calls_agreeing >= 0.99 * calls_total


def test_demonstration_is_a_short_fixed_train_problem(task: Gsm8kTask) -> None:
    problem, calls = task.demonstration()
    assert problem.id == DEMONSTRATION_ID and problem.split == "train"
    assert 2 <= sum(c.name == "calculator" for c in calls) <= 3
    assert task.demonstration() == (problem, calls)
    chain = replay(task, problem, calls)
    assert chain.stop_reason == "answer" and task.verify(problem, chain.answer)
    messages = demonstration(task.tools(problem), problem.question, calls)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[2]["content"] == "24"


# ---- user files ---------------------------------------------------------------------------------
def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_unseen_user_file_loads_and_its_references_verify(task: Gsm8kTask, tmp_path: Path) -> None:
    records = [
        {"question": "A farm has 1,250 hens; each lays 2 eggs a day. How many eggs in 3 days?",
         "answer": "Per day: 1,250 x 2 = <<1,250 x 2=2,500>>2,500 eggs.\nIn 3 days: <<2500*3=7500>>7,500.\n#### 7,500"},
        {"question": "A shirt costs $20 and is 15% off. What is the price?",
         "answer": "Discount: <<15%*20=3>>3 dollars.\nPrice: 20-3 = $<<20-3=17>>17.\n#### 17"},
        {"id": "mine-3", "question": "It is 4 degrees and falls by 7. What is the temperature?",
         "answer": "4 - 7 = <<4-7=-3>>-3\n#### -3"},
        {"question": "Split $5 between 2 kids.", "answer": "5/2 = <<5/2=2.5>>2.50 each\n#### 2.50"},
        {"question": "What is six times seven?", "answer": "Six times seven is forty-two.\n#### 42"},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", [json.dumps(r) for r in records[:2]] + ["", "  "]
                       + [json.dumps(r) for r in records[2:]])
    problems = task.load_file(path).problems
    assert [p.answer for p in problems] == ["7500", "17", "-3", "2.5", "42"]
    assert problems[2].id == "mine-3"
    ids = [p.id for p in problems]
    assert len(set(ids)) == 5 and not set(ids) & {p.id for p in task.problems()}
    assert task.load_file(path).problems[0].id == ids[0]  # stable across loads
    assert task.reference_calls(problems[4]) is None
    expressions = [c.arguments["expression"] for c in task.reference_calls(problems[0])[:-1]]
    assert expressions == ["1250*2", "2500*3"]
    for problem in problems[:4]:
        chain = replay(task, problem, task.reference_calls(problem))
        assert all(step.error is None for step in chain.steps), [s.error for s in chain.steps]
        assert chain.stop_reason == "answer" and task.verify(problem, chain.answer)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"answer": "#### 3"}', "missing field 'question'"),
        ('{"question": "q?"}', "missing field 'answer'"),
        ('{"question": "q?", "answer": "it is 3"}', "no '#### N'"),
        ('{"question": "q?", "answer": "#### three"}', "not a number: 'three'"),
        ('{"question": "", "answer": "#### 3"}', "'question' must be non-empty text"),
        ('{"question": "q?", "answer": 3}', "'answer' must be non-empty text"),
        ('{"question": "q?", "answer": "#### 3", "id": " "}', "'id' is empty"),
        ('{"question": "q?", "answer": "#### 3"', "not valid JSON"),
        ('["q?", "#### 3"]', "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(task: Gsm8kTask, tmp_path: Path, bad: str, message: str) -> None:
    good = json.dumps({"question": "What is 1+1?", "answer": "<<1+1=2>>2\n#### 2"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad, good])
    with pytest.raises(DataFileError) as info:
        task.load_file(path, strict=True)
    assert str(info.value).startswith(f"{path}:3:")
    assert message in str(info.value)


def test_empty_file_is_an_error(task: Gsm8kTask, tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no problems"):
        task.load_file(write_jsonl(tmp_path / "empty.jsonl", ["", " "]))
