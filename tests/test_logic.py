"""FOL parser (unicode, ASCII, precedence, FOLIO quirks), z3 decisions, and the bound toolkit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcapp.agent import Agent
from fcapp.records import Call
from fcapp.tools.base import ToolError
from fcapp.tools.logic import (
    Atom, Binary, FormulaError, Not, Quantified, SolverUndecided, Term, constants, decide, logic_toolkit, parse,
    predicates, to_text,
)

FOLIO = Path(__file__).resolve().parents[1] / "assets" / "folio" / "train.jsonl"


# ---- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ascii_form", [
    "forall x (Dog(x) -> Mammal(x))",
    "all x (Dog(x) => Mammal(x))",
    "∀x(Dog(x)→Mammal(x))",
    "forall x (Dog(x) implies Mammal(x))",
])
def test_ascii_and_unicode_parse_alike(ascii_form: str) -> None:
    assert parse(ascii_form) == parse("∀x (Dog(x) → Mammal(x))")


@pytest.mark.parametrize("a, b", [
    ("¬Likes(bob, alice)", "~Likes(bob, alice)"),
    ("¬Likes(bob, alice)", "!Likes(bob, alice)"),
    ("¬Likes(bob, alice)", "not Likes(bob, alice)"),
    ("Big(a) ⊕ Small(a)", "Big(a) xor Small(a)"),
    ("P(a) ∧ Q(a) ∨ R(a)", "P(a) & Q(a) | R(a)"),
    ("P(a) ∧ Q(a)", "P(a) && Q(a)"),
    ("P(a) ∧ Q(a)", "P(a) and Q(a)"),
    ("P(a) ∧ Q(a)", "P(a) ^ Q(a)"),
    ("P(a) ∨ Q(a)", "P(a) or Q(a)"),
    ("P(a) ↔ Q(a)", "P(a) <-> Q(a)"),
    ("P(a) ↔ Q(a)", "P(a) iff Q(a)"),
    ("∃x P(x)", "exists x P(x)"),
    ("Dog(x) → Mammal(x)", "Dog(x)->Mammal(x)"),
])
def test_operator_spellings(a: str, b: str) -> None:
    assert parse(a) == parse(b)


@pytest.mark.parametrize("formula, reading", [
    ("A(a) ∨ B(a) ∧ C(a)", "(A(a) ∨ (B(a) ∧ C(a)))"),
    ("¬A(a) ∧ B(a)", "(¬A(a) ∧ B(a))"),
    ("¬(A(a) ∧ B(a))", "¬((A(a) ∧ B(a)))"),
    ("A(a) ∧ B(a) → C(a)", "((A(a) ∧ B(a)) → C(a))"),
    ("A(a) → B(a) → C(a)", "(A(a) → (B(a) → C(a)))"),
    ("A(a) ↔ B(a) → C(a)", "(A(a) ↔ (B(a) → C(a)))"),
    ("A(a) ⊕ B(a) ∨ C(a)", "((A(a) ⊕ B(a)) ∨ C(a))"),
    ("A(a) ∨ B(a) → C(a) ∨ D(a)", "((A(a) ∨ B(a)) → (C(a) ∨ D(a)))"),
    # a quantifier without parentheses reaches as far right as possible ...
    ("∀x Dog(x) → Mammal(x)", "∀x (Dog(x) → Mammal(x))"),
    # ... and one with a parenthesised body stops at its closing parenthesis
    ("∀x (Dog(x)) ∧ Cat(tom)", "(∀x Dog(x) ∧ Cat(tom))"),
    ("∀x ∃y (Loves(x, y))", "∀x ∃y Loves(x, y)"),
    ("∀x, y (R(x, y))", "∀x ∀y R(x, y)"),
    ("¬∃x (P(x) ∧ Q(x))", "¬(∃x (P(x) ∧ Q(x)))"),
])
def test_precedence_and_scope(formula: str, reading: str) -> None:
    assert to_text(parse(formula)) == reading


def test_variables_are_bound_and_constants_free() -> None:
    formula = parse("∀x (Owns(x, rex) → ∃y Likes(y, x))")
    assert constants(formula) == {"rex"}
    assert predicates(formula) == {("Owns", 2), ("Likes", 2)}
    assert parse("Dog(x)") == Atom("Dog", (Term("x"),))  # unbound: a constant named x
    assert parse("∀x Dog(x)") == Quantified("forall", "x", Atom("Dog", (Term("x", variable=True),)))


@pytest.mark.parametrize("formula, expected_constants", [
    ("Library(l-2021) ⊕ TypeC(l-2021) ", {"l-2021"}),
    ("CaliforniaCityVisited(mr.smith, two)", {"mr.smith", "two"}),
    ("∀x (GetGrade(x, a+) → GreaterThan95(x))", {"a+"}),
    ("∀x (Project(x) → (WrittenIn(x, python) ⊕ WrittenIn(x, c++)))", {"python", "c++"}),
    (" ∀x (BreastCancer (x) ∨ Non-BreastCancer(x)) ", set()),
    ("(LanguageModel(bert) ∧ Giant(bert)) → (LanguageModel(gpt-3) ∧ Giant(gpt-3)).", {"bert", "gpt-3"}),
    ("¬ComeFrom(captain america, dc universe)", {"captain_america", "dc_universe"}),
    ("GraduateStudent(joe) ⊕  Doctor(joe) → ¬(GraduateStudent(joe) ^ Student(joe))", {"joe"}),
    ("∀x ∀y (Palstave(x) ∧ Mould(y) → CastIn(x, y))", set()),
    ("Rains → Wet(street)", {"street"}),
    ("Father(mother(tom)) ∧ mother(tom) = mary ∧ tom ≠ mary", {"tom", "mary"}),
])
def test_folio_quirks(formula: str, expected_constants: set[str]) -> None:
    assert constants(parse(formula)) == expected_constants


@pytest.mark.parametrize("formula, message, position", [
    ("Dog(x", "expected ')'", 5),
    ("∀ (Dog(x))", "expected a variable", 2),
    ("Dog(x) ∧", "expected a predicate", 8),
    ("Dog(x))", "unbalanced parentheses", 6),
    ("Dog(x) Cat(x)", "missing operator", 7),
    ("Dog(x) # Cat(x)", "unexpected character '#'", 7),
    ("Likes(bob,)", "expected a constant or variable", 10),
    ("", "empty formula", 0),
])
def test_malformed_formulas_name_the_position(formula: str, message: str, position: int) -> None:
    with pytest.raises(FormulaError, match=re.escape(message)) as info:
        parse(formula)
    assert info.value.position == position
    assert isinstance(info.value, ToolError)


def test_hostile_formulas_fail_fast() -> None:
    with pytest.raises(FormulaError, match="nested too deeply"):
        parse("¬" * 500 + "P(a)")
    with pytest.raises(FormulaError, match="nested too deeply"):
        parse("(" * 500 + "P(a)" + ")" * 500)
    with pytest.raises(FormulaError, match="too long"):
        parse("P(a) ∧ " * 1000 + "P(a)")


_ATOMS = st.sampled_from(["P(a)", "Q(b)", "R(a, b)", "S(c)", "T"])


def _formulas() -> st.SearchStrategy:
    return st.recursive(
        _ATOMS.map(parse),
        lambda inner: st.one_of(
            inner.map(Not),
            st.tuples(st.sampled_from(["and", "or", "xor", "implies", "iff"]), inner, inner)
            .map(lambda t: Binary(*t)),
        ),
        max_leaves=12,
    )


@settings(max_examples=200, deadline=None)
@given(_formulas())
def test_printing_then_parsing_round_trips(formula) -> None:
    assert parse(to_text(formula)) == formula


# ---- deciding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("premises, conclusion, label", [
    (["∀x (Man(x) → Mortal(x))", "Man(socrates)"], "Mortal(socrates)", "True"),  # modus ponens
    (["∀x (Man(x) → Mortal(x))", "¬Mortal(zeus)"], "¬Man(zeus)", "True"),  # modus tollens
    (["∀x (Man(x) → Mortal(x))", "Man(socrates)"], "¬Mortal(socrates)", "False"),
    (["∀x (Man(x) → Mortal(x))", "Mortal(zeus)"], "Man(zeus)", "Unknown"),  # affirming the consequent
    (["Big(a) ⊕ Small(a)", "Big(a)"], "Small(a)", "False"),
    (["Big(a) ∨ Small(a)", "¬Big(a)"], "Small(a)", "True"),
    (["∀x (Cat(x) → Furry(x))", "Cat(tom)"], "∃x Furry(x)", "True"),
    (["∃x Cat(x)"], "Cat(tom)", "Unknown"),
    (["∀x (P(x) ↔ Q(x))", "¬Q(a)"], "P(a)", "False"),
    (["∀x ∃y Loves(x, y)"], "∃y Loves(bob, y)", "True"),
    (["Rains → Wet", "Rains"], "Wet", "True"),
    (["tom = cat1", "Black(cat1)"], "Black(tom)", "True"),
    (["P(a)", "¬P(a)"], "Anything(b)", "True"),  # inconsistent premises prove everything
])
def test_decide_textbook_cases(premises: list[str], conclusion: str, label: str) -> None:
    assert decide(premises, conclusion) == label


def test_decide_accepts_ascii_and_unicode_alike() -> None:
    assert decide(["forall x (Man(x) -> Mortal(x))", "Man(socrates)"], "~Mortal(socrates)") == "False"


def test_decide_reports_bad_premises_by_number() -> None:
    with pytest.raises(FormulaError, match="premise 2"):
        decide(["P(a)", "Q(a"], "P(a)")


# Hard for z3's quantifier engine: every element has a successor (no finite model to find fast).
NO_FINITE_MODEL = ["∀x ∃y (Less(x, y))", "∀x ∀y ∀z (Less(x, y) ∧ Less(y, z) → Less(x, z))", "∀x ¬Less(x, x)"]


def test_decide_times_out_cleanly() -> None:
    try:
        verdict = decide(NO_FINITE_MODEL, "Big(a)", timeout_ms=200)
    except SolverUndecided as exc:
        assert "could not decide" in str(exc)
    else:
        assert verdict == "Unknown"


# ---- toolkit ----------------------------------------------------------------------------------

PREMISES = ["∀x (Cat(x) → Furry(x))", "Cat(tom)", "¬Furry(rex)", "Likes(anna, tom)"]


def test_toolkit_tools_and_results() -> None:
    registry = logic_toolkit(PREMISES)
    assert registry.names() == ["list_premises", "symbols", "facts_about", "check"]
    call = {t.name: t.call for t in registry}
    assert call["list_premises"]({}) == "1. ∀x (Cat(x) → Furry(x))\n2. Cat(tom)\n3. ¬Furry(rex)\n4. Likes(anna, tom)"
    assert call["symbols"]({}) == "Predicates: Cat(x), Furry(x), Likes(x, y)\nConstants: anna, rex, tom"
    assert call["facts_about"]({"entity": "Tom"}) == "2. Cat(tom)\n4. Likes(anna, tom)"
    assert "No premise mentions 'bob'" in call["facts_about"]({"entity": "bob"})
    assert call["check"]({"conclusion": "Furry(tom)"}) == "True"
    assert call["check"]({"conclusion": "Furry(tom)."}) == "True"
    assert call["check"]({"conclusion": "~Furry(tom)"}) == "False"
    assert call["check"]({"conclusion": "Cat(rex)"}) == "False"
    assert call["check"]({"conclusion": "exists x (Likes(x, tom) & Furry(tom))"}) == "True"
    assert call["check"]({"conclusion": "Furry(anna)"}) == "Unknown"
    with pytest.raises(ToolError, match="position"):
        call["check"]({"conclusion": "Furry(tom"})


def _resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_of_this_process_and_its_tool_workers() -> float:
    children = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    workers = [pid for pid in children if b"fcapp.tools.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return _resident_mb(os.getpid()) + sum(_resident_mb(pid) for pid in workers)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads memory from Linux /proc")
def test_fifty_undecided_checks_keep_memory_bounded() -> None:
    """Before the fix each check ran in a new thread with a z3 context of its own, and the app grew
    ~20 MB a call (224 MB to 1.8 GB after 18 calls at the default limit); it now runs in a tool
    worker that reuses one context."""
    check = logic_toolkit(NO_FINITE_MODEL, timeout_ms=300).get("check")
    for _ in range(2):  # a warm worker: z3 imported, its context made
        with pytest.raises(ToolError, match="could not decide"):
            check.call({"conclusion": "Big(a)"})
    before = _memory_of_this_process_and_its_tool_workers()
    for _ in range(50):
        with pytest.raises(ToolError, match="could not decide"):
            check.call({"conclusion": "Big(a)"})
    grown = _memory_of_this_process_and_its_tool_workers() - before
    assert grown < 100, f"{grown:.0f} MB more after 50 undecided checks"


def test_toolkit_schemas_do_not_depend_on_the_problem() -> None:
    one, two = logic_toolkit(PREMISES), logic_toolkit(["P(a)"])
    assert [t.schema() for t in one] == [t.schema() for t in two]
    assert [t.examples for t in one] == [t.examples for t in two]
    for tool in one:
        assert 1 <= len(tool.examples) <= 2 and tool.description


def test_toolkit_refuses_unparseable_premises() -> None:
    with pytest.raises(FormulaError, match="premise 1"):
        logic_toolkit(["Cat(tom"])


def test_agent_replays_a_chain_with_the_toolkit() -> None:
    agent = Agent(logic_toolkit(PREMISES), [])
    chain = agent.start("fol", "t-1", "Is Furry(tom) true?", "reference")
    agent.replay(chain, [Call("list_premises", {}), Call("check", {"conclusion": "Furry(tom)"}),
                         Call("final_answer", {"answer": "True"})])
    assert [s.error for s in chain.steps] == [None, None, None]
    assert chain.steps[1].result == "True"
    assert chain.answer == "True" and chain.stop_reason == "answer"


def test_folio_premises_parse_rate() -> None:
    """FOLIO's premise translations parse, apart from a few annotation errors (unbalanced
    parentheses, missing operators); blank translations are not counted."""
    formulas = [f for line in FOLIO.read_text(encoding="utf-8").splitlines()
                for f in json.loads(line)["premises-FOL"] if f.strip()]
    parsed = 0
    for formula in formulas:
        try:
            parse(formula)
            parsed += 1
        except FormulaError:
            pass
    rate = parsed / len(formulas)
    print(f"FOLIO premises parsed: {parsed}/{len(formulas)} = {rate:.1%}")
    assert rate > 0.99
