"""FOLIO and generated FOL tasks: loading, verification, reference chains, generator guarantees."""

from __future__ import annotations

import collections
import itertools
import json
import re
from pathlib import Path

import pytest

from fcapp.agent import Agent
from fcapp.files import DataFileError
from fcapp.paths import cache_dir
from fcapp.tasks.base import Problem, Task, split_of
from fcapp.tasks.fol import FolGenTask, FolioTask, normalise_label
from fcapp.tools.logic import decide

# FOLIO's file here has no conclusion-FOL; these translations were written by hand for the tests
# (example_id -> conclusion-FOL), three per label.
HAND_TRANSLATED = {
    263: "¬Suspended(tiffanyTAlston)",
    434: "N1GermanSingle(hooray)",
    695: "Know(danil, languageA)",
    730: "¬∀x (Bear(x) → Wild(x))",
    225: "∀x (Species(x, ambiortus) → Lived(x, mongolregion))",
    1131: "Jokes(rina) ∨ Unaware(rina)",
    9: "LocatedIn(fortcarillon, europe)",
    718: "∀x (Enzyme(x) → Protein(x))",
    356: "MakeMoney(singhKaur)",
}


@pytest.fixture(scope="module")
def folio() -> FolioTask:
    return FolioTask()


@pytest.fixture(scope="module")
def generated() -> FolGenTask:
    return FolGenTask(n=60, seed=7)


def _folio_records() -> dict[int, dict]:
    task = FolioTask()
    return {r["example_id"]: r for r in map(json.loads, task.path.read_text(encoding="utf-8").splitlines())}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def _replay(task: Task, problem) -> str | None:
    calls = task.reference_calls(problem)
    assert calls is not None, problem.id
    agent = Agent(task.tools(problem), [])
    chain = agent.start(task.name, problem.id, problem.question, "reference")
    agent.replay(chain, calls)
    assert all(step.error is None for step in chain.steps), [s.error for s in chain.steps]
    return chain.answer


# ---- FOLIO ------------------------------------------------------------------------------------

def test_folio_loads_nearly_every_record(folio: FolioTask) -> None:
    problems = folio.problems()
    print(f"FOLIO: {len(problems)} problems loaded, {len(folio.skipped)} skipped for unparseable FOL")
    assert len(problems) + len(folio.skipped) == 1004
    assert len(problems) >= 970
    assert len({p.id for p in problems}) == len(problems)
    assert {p.answer for p in problems} == {"True", "False", "Unknown"}
    first = folio.get("folio-1131")
    assert first.meta["premises_fol"][0] == "∀x (Drinks(x) → Dependent(x))"
    assert "∀x (Drinks(x) → Dependent(x))" in first.question
    assert "All people who regularly drink coffee" in first.question
    assert first.meta["conclusion_fol"] is None  # FOLIO's file here carries no conclusion-FOL
    assert folio.reference_calls(first) is None
    assert folio.tools(first).names() == ["list_premises", "symbols", "facts_about", "check"]


def test_folio_hand_translated_conclusions_agree_with_labels() -> None:
    records = _folio_records()
    agree = sum(decide([f for f in records[i]["premises-FOL"] if f.strip()], fol) == records[i]["label"]
                for i, fol in HAND_TRANSLATED.items())
    print(f"FOLIO decide == label on hand-translated conclusions: {agree}/{len(HAND_TRANSLATED)}")
    assert agree == len(HAND_TRANSLATED)


def test_folio_reference_chains_verify_through_the_agent(tmp_path: Path) -> None:
    records = _folio_records()
    rows = [{**records[i], "conclusion-FOL": fol} for i, fol in HAND_TRANSLATED.items()]
    task = FolioTask()
    problems = task.load_file(_write_jsonl(tmp_path / "folio.jsonl", rows)).problems
    assert len(problems) == len(HAND_TRANSLATED)
    for problem in problems:
        assert problem.meta["conclusion_fol"] in problem.question
        answer = _replay(task, problem)
        assert task.verify(problem, answer), (problem.id, answer)


def test_folio_reference_calls_need_z3_to_agree_with_the_label(tmp_path: Path) -> None:
    record = {**_folio_records()[263], "conclusion-FOL": HAND_TRANSLATED[263], "label": "True"}  # really False
    task = FolioTask()
    (problem,) = task.load_file(_write_jsonl(tmp_path / "wrong.jsonl", [record])).problems
    assert problem.answer == "True"
    assert task.reference_calls(problem) is None


def test_a_folio_story_is_held_out_whole(folio: FolioTask) -> None:
    """The problems of one story (same premises, other conclusions) are all in the same split."""
    by_story: dict[str, set[str]] = {}
    for problem in folio.problems():
        by_story.setdefault(problem.meta["group"], set()).add(problem.split)
    assert all(len(splits) == 1 for splits in by_story.values())
    held = [s for s, splits in by_story.items() if splits == {"heldout"}]
    assert 0.1 < len(held) / len(by_story) < 0.3


def test_folio_with_formula_is_labelled_by_the_solver_and_shares_folio_splits(folio: FolioTask) -> None:
    from fcapp.tasks import get_task

    task = get_task("folio-fol")
    problems = task.problems()
    assert len(problems) > 600 and {p.answer for p in problems} == {"True", "False", "Unknown"}
    folio_splits = {p.meta["group"]: p.split for p in folio.problems()}
    assert all(folio_splits.get(p.meta["group"], p.split) == p.split for p in problems)
    for problem in problems[::40]:  # the label is z3's verdict, and the reference chain verifies
        assert decide(problem.meta["premises_fol"], problem.meta["conclusion_fol"]) == problem.answer
        assert problem.meta["conclusion_fol"] in problem.question
        assert task.verify(problem, _replay(task, problem))


def test_folio_demonstration(folio: FolioTask) -> None:
    problem, calls = folio.demonstration()
    assert split_of(problem.id) == "train" and problem.task == "folio"
    assert problem.meta["conclusion_fol"] not in problem.question  # shown the way FOLIO shows conclusions
    assert [c.name for c in calls] == ["check", "final_answer"]
    assert folio.verify(problem, _replay(folio, problem))
    assert folio.demonstration() == (problem, calls)


# ---- verification -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, label", [
    ("True", "True"), (" true ", "True"), ("TRUE.", "True"), ('"True"', "True"), ("**True**", "True"),
    ("yes", "True"), ("False!", "False"), ("no", "False"), ("unknown", "Unknown"), ("Uncertain", "Unknown"),
    ("The answer is True", None), ("True or False", None), ("", None), (None, None), ("42", None),
])
def test_normalise_label(text, label) -> None:
    assert normalise_label(text) == label


def test_verify_is_strict_but_forgiving(generated: FolGenTask) -> None:
    problem = generated.problems()[0]
    wrong = next(label for label in ("True", "False", "Unknown") if label != problem.answer)
    assert generated.verify(problem, f" {problem.answer.lower()}. ")
    assert not generated.verify(problem, wrong)
    assert not generated.verify(problem, f"I think it is {problem.answer}")
    assert not generated.verify(problem, None)


# ---- record parsing ---------------------------------------------------------------------------

DROP = object()  # marks a field to remove from GOOD
GOOD = {"premises": ["All cats are furry.", "Tom is a cat."], "premises-FOL": ["∀x (Cat(x) → Furry(x))", "Cat(tom)"],
        "conclusion": "Tom is furry.", "conclusion-FOL": "Furry(tom)", "label": "True"}


@pytest.mark.parametrize("change, message", [
    ({"premises-FOL": DROP}, "missing field 'premises-FOL'"),
    ({"premises-FOL": 3}, "must be a list of strings"),
    ({"premises-FOL": ["", " "]}, "holds no formula"),
    ({"premises-FOL": ["∀x (Cat(x) → Furry(x)", "Cat(tom)"]}, "premises-FOL[0]"),
    ({"conclusion-FOL": "Furry(tom"}, "conclusion-FOL"),
    ({"conclusion-FOL": DROP, "conclusion": DROP}, "missing field 'conclusion'"),
    ({"label": "Maybe"}, "must be True, False or Unknown"),
    ({"label": None}, "must be True, False or Unknown"),
])
def test_folio_parse_record_errors(change: dict, message: str) -> None:
    record = {k: v for k, v in {**GOOD, **change}.items() if v is not DROP}
    with pytest.raises(ValueError, match=re.escape(message)):
        FolioTask().parse_record(record, 1)


def test_parse_record_accepts_newline_joined_strings_and_ids() -> None:
    record = {**GOOD, "premises": "\n".join(GOOD["premises"]), "premises-FOL": "\n".join(GOOD["premises-FOL"]),
              "id": "mine-1"}
    problem = FolioTask().parse_record(record, 5)
    assert problem.id == "mine-1" and problem.meta["premises_fol"] == GOOD["premises-FOL"]
    assert FolioTask().parse_record(GOOD, 5).id == "folio-5"
    assert FolGenTask(n=0).parse_record(GOOD, 5).id == "fol-5"


def test_a_file_with_malformed_rows_loads_the_good_ones_and_names_the_bad(tmp_path: Path) -> None:
    """As real FOLIO files have a few broken annotations: the rest of the file is used, each bad row is
    reported with file:line and why; strict mode refuses the file at the first one."""
    unbalanced = {**GOOD, "premises-FOL": ["(Cat(tom) ∧ Furry(tom)))"]}
    stray = {**GOOD, "premises-FOL": ["Cat’s(tom)"]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, unbalanced, GOOD, stray])
    for task in (FolioTask(), FolGenTask(n=0)):
        loaded = task.load_file(path)
        assert len(loaded.problems) == 2 and len(loaded.skipped) == 2
        assert loaded.skipped[0].startswith(f"{path}:2: premises-FOL[0]: unexpected ')'")
        assert loaded.skipped[1].startswith(f"{path}:4: premises-FOL[0]")
        assert loaded.summary() == f"{path}: 2 problems used, 2 malformed rows skipped"
        with pytest.raises(DataFileError, match=r"bad\.jsonl:2: premises-FOL\[0\]"):
            task.load_file(path, strict=True)


def test_generated_task_labels_user_files_with_the_solver(tmp_path: Path) -> None:
    unlabeled = {k: v for k, v in GOOD.items() if k != "label"}
    task = FolGenTask(n=0)
    negated = {**GOOD, "conclusion-FOL": "¬Furry(tom)", "label": "False"}
    path = _write_jsonl(tmp_path / "mine.jsonl", [unlabeled, negated])
    assert [p.answer for p in task.load_file(path).problems] == ["True", "False"]
    _write_jsonl(path, [GOOD, {**GOOD, "label": "Unknown"}])
    with pytest.raises(DataFileError, match="mine.jsonl:2: label 'Unknown' disagrees with the solver, which finds Tr"):
        task.load_file(path, strict=True)
    _write_jsonl(path, [{k: v for k, v in GOOD.items() if k != "conclusion-FOL"}])
    with pytest.raises(DataFileError, match="missing field 'conclusion-FOL'"):
        task.load_file(path)


# ---- generator --------------------------------------------------------------------------------

def test_generator_is_deterministic(generated: FolGenTask) -> None:
    again = FolGenTask(n=60, seed=7).problems()
    assert again == generated.problems()
    assert FolGenTask(n=10, seed=7).problems() == generated.problems()[:10]  # problem i does not depend on n
    assert FolGenTask(n=10, seed=8).problems() != generated.problems()[:10]
    assert [p.id for p in generated.problems()[:3]] == ["fol-7-0", "fol-7-1", "fol-7-2"]


def test_generated_problems_are_cached_and_a_damaged_cache_is_rebuilt() -> None:
    built = FolGenTask(n=12, seed=11).problems()
    cached = list(cache_dir().glob("fol-12-11-*.json"))
    assert len(cached) == 1
    assert FolGenTask(n=12, seed=11).problems() == built  # read back exactly
    cached[0].write_text('[{"id": "fol-11-0", "broken')
    assert FolGenTask(n=12, seed=11).problems() == built
    assert [Problem(**r) for r in json.loads(cached[0].read_text())] == built


def test_generator_labels_are_balanced(generated: FolGenTask) -> None:
    counts = collections.Counter(p.answer for p in generated.problems())
    assert counts == {"True": 20, "False": 20, "Unknown": 20}
    assert {p.meta["depth"] for p in generated.problems()} == {1, 2, 3}


def _oracle(premises_fol: list[str], conclusion_fol: str) -> str:
    """Independent ground truth for generated problems: each entity's unary properties are
    propositional (the rules hold per element), so enumerate truth assignments for the query's entity."""
    fact = re.compile(r"(¬?)(\w+)\((\w+)\)")
    rule = re.compile(r"∀x \((.+) → (¬?)(\w+)\(x\)\)")
    facts, rules, names = [], [], set()
    for formula in premises_fol:
        if m := rule.fullmatch(formula):
            body = re.findall(r"(\w+)\(x\)", m.group(1))
            rules.append((body, m.group(3), not m.group(2)))
            names.update(body + [m.group(3)])
        else:
            m = fact.fullmatch(formula)
            assert m, formula
            facts.append((m.group(2), m.group(3), not m.group(1)))
            names.add(m.group(2))
    negated, predicate, entity = fact.fullmatch(conclusion_fol).groups()
    names.add(predicate)
    order = sorted(names)
    outcomes = set()
    for values in itertools.product((False, True), repeat=len(order)):
        world = dict(zip(order, values))
        if all(world[p] == v for p, e, v in facts if e == entity) and \
                all(not all(world[b] for b in body) or world[head] == v for body, head, v in rules):
            outcomes.add(world[predicate] != bool(negated))
    assert outcomes, "inconsistent premises"
    return "Unknown" if outcomes == {True, False} else str(outcomes.pop())


def test_generator_ground_truth_matches_an_independent_oracle() -> None:
    task = FolGenTask(n=30, seed=3, depth=3, distractors=2)
    for problem in task.problems():
        assert _oracle(problem.meta["premises_fol"], problem.meta["conclusion_fol"]) == problem.answer, problem.question


def test_generated_questions_and_reference_chains(generated: FolGenTask) -> None:
    for problem in generated.problems()[:12]:
        meta = problem.meta
        assert problem.question.startswith("Premises:\n1. ")
        assert problem.question.endswith(f"Conclusion: {meta['conclusion']} {meta['conclusion_fol']}\n"
                                         "Is the conclusion True, False or Unknown?")
        assert all(f in problem.question for f in meta["premises_fol"])
        assert generated.verify(problem, _replay(generated, problem))


def test_generator_difficulty_controls() -> None:
    easy = FolGenTask(n=9, seed=1, depth=1, distractors=0, conjunction_rate=0.0).problems()
    hard = FolGenTask(n=9, seed=1, depth=5, distractors=4, conjunction_rate=0.5).problems()
    assert all(p.meta["depth"] == 1 and "∧" not in p.question for p in easy)
    assert sum(len(p.meta["premises_fol"]) for p in hard) > 2 * sum(len(p.meta["premises_fol"]) for p in easy)
    with pytest.raises(ValueError):
        FolGenTask(depth=0)
    with pytest.raises(ValueError):
        FolGenTask(depth=20, distractors=10)


def test_generated_demonstration(generated: FolGenTask) -> None:
    problem, calls = generated.demonstration()
    assert split_of(problem.id) == "train" and problem.task == "fol"
    assert calls[0].arguments == {"conclusion": problem.meta["conclusion_fol"]}
    assert generated.verify(problem, _replay(generated, problem))
    assert len(problem.question) < 600  # short enough for a small model's context


def test_folio_in_words_practice_hides_the_formula_its_reference_chain_checks(folio: FolioTask) -> None:
    """folio-nl: a premise sentence (kept, taken out, or negated) as the conclusion, in words only as FOLIO
    shows it; its formula is known, so the reference chain checks it and the verifier accepts it."""
    from fcapp.tasks import get_task

    task = get_task("folio-nl")
    problems = task.problems()
    assert {p.answer for p in problems} == {"True", "False", "Unknown"}
    assert {p.meta["kind"] for p in problems} == {"premise", "premise-removed", "negated", "negated-removed"}
    folio_splits = {p.meta["group"]: p.split for p in folio.problems()}
    assert all(folio_splits.get(p.meta["group"], p.split) == p.split for p in problems)
    for problem in problems[::60]:
        assert problem.meta["conclusion_fol"] not in problem.question.split("Conclusion:")[1]
        assert "Write the conclusion as a formula" in problem.question
        assert decide(problem.meta["premises_fol"], problem.meta["conclusion_fol"]) == problem.answer
        assert task.verify(problem, _replay(task, problem))
    negated = next(p for p in problems if p.meta["kind"] == "negated")
    assert negated.meta["conclusion"].startswith("It is not true that ") and negated.answer == "False"
