"""First-order logic tasks: FOLIO (human-written stories) and a seeded generator of small rule
problems. Both label a conclusion True / False / Unknown and give the model the same tools
(`logic_toolkit`), whose `check` decides any formula from the problem's premises with z3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

from fcapp.files import atomic_write_json, read_jsonl
from fcapp.paths import cache_dir, shipped
from fcapp.records import FINAL_ANSWER, Call
from fcapp.tasks.base import Problem, Task, split_of
from fcapp.tools import logic as logic_module
from fcapp.tools.base import Registry, ToolError
from fcapp.tools.logic import FormulaError, constants, consistent, decide_parsed, logic_toolkit, parse, predicates

_LABELS = {"true": "True", "yes": "True", "false": "False", "no": "False",
           "unknown": "Unknown", "uncertain": "Unknown", "undetermined": "Unknown"}


def normalise_label(text: Any) -> str | None:
    """"True" / "False" / "Unknown" from answer text, forgiving case, quotes, markup and a trailing
    full stop ("**true**." -> "True"); None for anything else (no guessing inside sentences)."""
    if isinstance(text, bool):
        return str(text)
    if not isinstance(text, str):
        return None
    return _LABELS.get(re.sub(r"^[\W_]+|[\W_]+$", "", text).lower())


def render_question(premises: list[str], premises_fol: list[str], conclusion: str, conclusion_fol: str | None) -> str:
    """Compact question: each premise in words and in FOL, the conclusion, the three labels."""
    lines = ["Premises:"]
    for number, (words, formula) in enumerate(itertools.zip_longest(premises, premises_fol, fillvalue=""), start=1):
        lines.append(f"{number}. {' '.join(part for part in (words.strip(), formula.strip()) if part)}")
    if conclusion_fol:
        lines.append(f"Conclusion: {' '.join(part for part in (conclusion.strip(), conclusion_fol.strip()) if part)}")
        lines.append("Is the conclusion True, False or Unknown?")
    else:
        lines.append(f"Conclusion: {conclusion.strip()}")
        lines.append("Write the conclusion as a formula with the premises' predicates and check it. "
                     "Is the conclusion True, False or Unknown?")
    return "\n".join(lines)


def story_group(story_id: str | int) -> str:
    """The split group of a FOLIO story: every problem about the story is in the same split, so no
    held-out story's premises are ever trained on under another conclusion."""
    return f"folio-story-{story_id}"


def _text_list(record: dict[str, Any], key: str, required: bool) -> list[str]:
    """A list of strings, or one newline-joined string, from a record field."""
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return []
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field {key!r} must be a list of strings or a newline-separated string")
    return value


def _text(record: dict[str, Any], key: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _checked_formula(text: str, where: str) -> str:
    try:
        parse(text)
    except FormulaError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return text.strip()


class _FolTask(Task):
    """What FOLIO and the generator share: the record format, tools, verifier and reference chain."""

    require_conclusion_fol: bool

    def tools(self, problem: Problem) -> Registry:
        return logic_toolkit(problem.meta["premises_fol"])

    def verify(self, problem: Problem, answer: str | None) -> bool:
        return normalise_label(answer) == problem.answer

    def check_answer(self, answer: str) -> str:
        """A logic answer is one of True, False, Unknown (any case); returned in its normal form."""
        label = normalise_label(super().check_answer(answer))
        if label is None:
            raise ValueError(f"a {self.name} answer is True, False or Unknown, not {answer.strip()[:40]!r}")
        return label

    def reference_calls(self, problem: Problem) -> list[Call] | None:
        """check(conclusion) then the label, when the conclusion's FOL exists and z3 agrees with the label."""
        conclusion_fol = problem.meta.get("conclusion_fol")
        if not conclusion_fol:
            return None
        try:
            verdict = decide_parsed([parse(f) for f in problem.meta["premises_fol"]], parse(conclusion_fol))
        except ToolError:
            return None
        if verdict != problem.answer:
            return None
        return [Call("check", {"conclusion": conclusion_fol}), Call(FINAL_ANSWER, {"answer": problem.answer})]

    def parse_record(self, record: dict[str, Any], index: int) -> Problem:
        """A FOLIO-format record: premises, premises-FOL, conclusion, conclusion-FOL, label."""
        premises = _text_list(record, "premises", required=False)
        raw_fol = _text_list(record, "premises-FOL", required=True)
        premises_fol = [_checked_formula(f, f"premises-FOL[{i}]") for i, f in enumerate(raw_fol) if f.strip()]
        if not premises_fol:
            raise ValueError("field 'premises-FOL' holds no formula")
        conclusion_fol = _text(record, "conclusion-FOL", required=self.require_conclusion_fol)
        if conclusion_fol:
            conclusion_fol = _checked_formula(conclusion_fol, "conclusion-FOL")
        conclusion = _text(record, "conclusion", required=not conclusion_fol) or ""
        label = self.record_label(record, premises_fol, conclusion_fol)
        meta = {"premises": premises, "premises_fol": premises_fol, "conclusion": conclusion,
                "conclusion_fol": conclusion_fol}
        if isinstance(record.get("story_id"), (str, int)):  # a story's conclusions share its split
            meta["group"] = story_group(record["story_id"])
        return Problem(
            id=self.record_id(record, index),
            task=self.name,
            question=render_question(premises, raw_fol if premises else premises_fol, conclusion, conclusion_fol),
            answer=label,
            meta=meta,
        )

    def record_id(self, record: dict[str, Any], index: int) -> str:
        if isinstance(record.get("id"), (str, int)) and str(record["id"]).strip():
            return str(record["id"]).strip()
        if isinstance(record.get("example_id"), (str, int)):
            return f"{self.name}-{record['example_id']}"
        return f"{self.name}-{index}"

    def record_label(self, record: dict[str, Any], premises_fol: list[str], conclusion_fol: str | None) -> str:
        if "label" not in record:
            raise ValueError("missing field 'label' (True, False or Unknown)")
        label = normalise_label(record["label"])
        if label is None:
            raise ValueError(f"field 'label' must be True, False or Unknown, got {record['label']!r}")
        return label


class FolioTask(_FolTask):
    """FOLIO: stories with FOL premises and a natural-language conclusion to label."""

    name = "folio"
    description = "FOLIO first-order logic stories: is the conclusion True, False or Unknown?"
    require_conclusion_fol = False

    def __init__(self, path: str | Path | None = None) -> None:
        """`path`: a JSONL file in FOLIO's format; the shipped FOLIO training set by default."""
        self.path = Path(path) if path else shipped("folio/train.jsonl")
        self._problems: list[Problem] | None = None
        self.skipped: list[str] = []  # records whose FOL does not parse (annotation errors in the data)

    def problems(self) -> list[Problem]:
        if self._problems is None:
            loaded = self.load_file(self.path)
            self._problems, self.skipped = loaded.problems, loaded.skipped
        return self._problems

    def demonstration(self) -> tuple[Problem, list[Call]]:
        """A short generated problem, shown as FOLIO shows its problems (conclusion in words only)."""
        demo, calls = _demonstration(self.name)
        meta = demo.meta
        demo.question = render_question(meta["premises"], meta["premises_fol"], meta["conclusion"], None)
        return demo, calls


def _cached(key: str, build: Callable[[], list[Problem]], data: bytes = b"") -> list[Problem]:
    """Problems built by z3 (~10 ms a decision), read from a cache file after the first build. The file's
    name holds `key` and a hash of this module's and the solver's source (and of `data`, the input file),
    so any change to them builds afresh."""
    source = hashlib.sha256(Path(__file__).read_bytes() + Path(logic_module.__file__).read_bytes() + data).hexdigest()
    path = cache_dir() / f"{key}-{source[:16]}.json"
    try:
        return [Problem(**record) for record in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):  # absent or damaged: build it
        pass
    problems = build()
    atomic_write_json(path, [dataclasses.asdict(p) for p in problems], indent=None)  # racing builders: same bytes
    return problems


class FolioFormulaTask(_FolTask):
    """FOLIO-format problems that give the conclusion's formula, built from the shipped FOLIO stories (whose
    file has no conclusion formulas): per story, conclusions drawn from its own vocabulary (a fact about
    one of its individuals, a negated fact, two facts combined, or one of its premises taken out of the
    premises) and labelled by z3, at most one per label. The labels are the solver's, so a model that
    copies the conclusion into `check` and answers with its verdict scores 1.0 (FOLIO's own
    conclusion-FOL agrees with its human labels on ~96% of validation problems). A story's problems share
    the FOLIO story's split, so held-out FOLIO stories stay held out here too."""

    name = "folio-fol"
    description = "FOLIO stories with the conclusion given as a formula: is it True, False or Unknown?"
    require_conclusion_fol = True
    CANDIDATES = 24  # conclusions tried per story

    def __init__(self, path: str | Path | None = None) -> None:
        """`path`: the FOLIO-format file whose stories the problems come from (default: the shipped one)."""
        self.path = Path(path) if path else shipped("folio/train.jsonl")
        self._problems: list[Problem] | None = None

    def problems(self) -> list[Problem]:
        if self._problems is None:
            self._problems = _cached(self.name, self._build, self.path.read_bytes())
        return self._problems

    def _build(self) -> list[Problem]:
        stories: dict[str, dict[str, Any]] = {}
        for _, record in read_jsonl(self.path, skipped=[]):
            if isinstance(record.get("story_id"), (str, int)):
                stories.setdefault(str(record["story_id"]), record)
        return [p for story_id, record in stories.items() for p in self._story(story_id, record)]

    def _story(self, story_id: str, record: dict[str, Any]) -> list[Problem]:
        """Up to one problem per label for one story (none when its premises do not parse or contradict)."""
        words = [w.strip() for w in _text_list(record, "premises", required=False)]
        formulas = [f.strip() for f in _text_list(record, "premises-FOL", required=False)]
        try:
            parsed = [parse(f) for f in formulas]
            if not parsed or len(words) != len(formulas) or not consistent(parsed):
                return []
        except ToolError:
            return []
        rng = random.Random(f"{self.name}:{story_id}")
        found: dict[str, Problem] = {}
        for kind, shown, conclusion, words_of in self._candidates(rng, words, formulas, parsed):
            try:
                label = decide_parsed([parse(f) for f in shown[1]], parse(conclusion))
            except ToolError:
                continue
            if label in found:
                continue
            found[label] = Problem(
                id=f"{self.name}-{story_id}-{len(found)}", task=self.name,
                question=render_question(shown[0], shown[1], words_of, self.shown_formula(conclusion)), answer=label,
                meta={"premises": shown[0], "premises_fol": shown[1], "conclusion": words_of,
                      "conclusion_fol": conclusion, "group": story_group(story_id), "kind": kind})
            if len(found) == 3:
                break
        return sorted(found.values(), key=lambda p: p.id)

    def shown_formula(self, conclusion: str) -> str | None:
        """The conclusion's formula as the question shows it."""
        return conclusion

    def _candidates(self, rng: random.Random, words: list[str], formulas: list[str], parsed: list[Any]):
        """(kind, (premise words, premise formulas), conclusion formula, conclusion words) to try, shuffled."""
        entities = sorted(set().union(*(constants(f) for f in parsed)))
        unary = sorted(name for name, arity in set().union(*(predicates(f) for f in parsed)) if arity == 1)
        everything = (words, formulas)
        facts = [f"{p}({e})" for e in entities for p in unary]
        literals = facts + [f"¬{fact}" for fact in facts]
        out = [("fact", everything, lit, "") for lit in literals]
        for _ in range(min(len(literals), 8)):
            a, b = rng.sample(literals, 2) if len(literals) >= 2 else (None, None)
            if a:
                out.append(("compound", everything, f"{a} {rng.choice(('∧', '∨', '→'))} {b}", ""))
        for k in range(len(formulas)):
            rest = (words[:k] + words[k + 1:], formulas[:k] + formulas[k + 1:])
            out.append(("premise", rest, formulas[k], words[k]))
        rng.shuffle(out)
        return out[: self.CANDIDATES]

    def demonstration(self) -> tuple[Problem, list[Call]]:
        return _demonstration(self.name)


_FUNCTION_WORDS = {"a", "an", "the", "all", "some", "no", "none", "if", "every", "each", "any", "there", "people",
                   "everyone", "everything", "nobody", "nothing", "someone", "something", "either", "neither", "both"}


def _lower_first_word(sentence: str) -> str:
    """"The cat ..." -> "the cat ..." for a sentence put after "that"; names stay capitalised."""
    first, _, rest = sentence.partition(" ")
    return f"{first.lower()} {rest}" if first.lower() in _FUNCTION_WORDS else sentence


class FolioWordsTask(FolioFormulaTask):
    """FOLIO-format practice in writing a conclusion as a formula, built from the shipped FOLIO stories: the
    conclusion is one of the story's own premise sentences, kept among the premises or taken out of them,
    as it is or negated ("It is not true that ..."), shown in words only as FOLIO shows its conclusions;
    the formula (the premise's own, or its negation) is known, so every problem has a verified reference
    chain, and z3 labels it. A training set for the translation FOLIO asks for, from training stories only
    (the split is FOLIO's, by story)."""

    name = "folio-nl"
    description = "FOLIO stories with a conclusion in words drawn from the premises: write it as a formula and check it"
    require_conclusion_fol = False

    def shown_formula(self, conclusion: str) -> str | None:
        return None  # in words only: writing the formula is the exercise

    def _candidates(self, rng: random.Random, words: list[str], formulas: list[str], parsed: list[Any]):
        everything = (words, formulas)
        out = []
        for k, (sentence, formula) in enumerate(zip(words, formulas)):
            rest = (words[:k] + words[k + 1:], formulas[:k] + formulas[k + 1:])
            negated = f"It is not true that {_lower_first_word(sentence).rstrip('.')}."
            out += [("premise", everything, formula, sentence), ("premise-removed", rest, formula, sentence),
                    ("negated", everything, f"¬({formula})", negated), ("negated-removed", rest, f"¬({formula})", negated)]
        rng.shuffle(out)
        return out[: self.CANDIDATES]

    def demonstration(self) -> tuple[Problem, list[Call]]:
        demo, calls = _demonstration(self.name)
        meta = demo.meta
        demo.question = render_question(meta["premises"], meta["premises_fol"], meta["conclusion"], None)
        return demo, calls


# ---- generator --------------------------------------------------------------------------------

NAMES = ("tom", "anna", "bob", "lily", "max", "emma", "sam", "mia", "leo", "zoe", "ben", "eva", "dan", "kim")
ADJECTIVES = ("furry", "happy", "kind", "smart", "quiet", "young", "brave", "calm", "clever", "funny", "gentle",
              "honest", "lazy", "loud", "polite", "proud", "rich", "shy", "strong", "tall", "wise", "busy", "cold",
              "green", "red", "round", "rough", "nice")
_ATTEMPTS = 200


def _literal(adjective: str, entity: str, positive: bool) -> tuple[str, str]:
    """("Tom is not furry.", "¬Furry(tom)")"""
    words = f"{entity.capitalize()} is {'' if positive else 'not '}{adjective}."
    return words, f"{'' if positive else '¬'}{adjective.capitalize()}({entity})"


def _rule(body: list[str], head: str, positive: bool) -> tuple[str, str]:
    """("If something is furry and kind, then it is happy.", "∀x (Furry(x) ∧ Kind(x) → Happy(x))")"""
    words = f"If something is {' and '.join(body)}, then it is {'' if positive else 'not '}{head}."
    condition = " ∧ ".join(f"{b.capitalize()}(x)" for b in body)
    return words, f"∀x ({condition} → {'' if positive else '¬'}{head.capitalize()}(x))"


class FolGenTask(_FolTask):
    """Generated rule problems: facts, rules chained `depth` steps deep, distractors, one query.

    Problem i is built from its own seeded random stream (so it does not depend on n), aiming at
    label True / False / Unknown in turn; z3 decides the real label and the candidate is kept only
    when it hits the aim with consistent premises, so labels are exact and balanced.
    """

    name = "fol"
    description = "Generated first-order logic rule problems: is the conclusion True, False or Unknown?"
    require_conclusion_fol = True

    def __init__(self, n: int = 600, seed: int = 0, depth: int = 3, distractors: int = 2,
                 conjunction_rate: float = 0.25) -> None:
        if n < 0 or depth < 1 or distractors < 0 or not 0 <= conjunction_rate <= 1:
            raise ValueError("need n >= 0, depth >= 1, distractors >= 0 and 0 <= conjunction_rate <= 1")
        if 2 * depth + 2 * distractors + 3 > len(ADJECTIVES):
            raise ValueError(f"depth and distractors too large for {len(ADJECTIVES)} predicates")
        self.n, self.seed, self.depth = n, seed, depth
        self.distractors, self.conjunction_rate = distractors, conjunction_rate
        self._problems: list[Problem] | None = None

    def problems(self) -> list[Problem]:
        if self._problems is None:
            self._problems = self._cached_problems()
        return self._problems

    def _cached_problems(self) -> list[Problem]:
        settings = f"{self.n}-{self.seed}-{self.depth}-{self.distractors}-{self.conjunction_rate}"
        return _cached(f"fol-{settings}", lambda: [self.generate(i) for i in range(self.n)])

    def generate(self, index: int) -> Problem:
        """Problem `index` of this generator (the same on every run and machine)."""
        target = ("True", "False", "Unknown")[index % 3]
        for attempt in range(_ATTEMPTS):
            rng = random.Random(f"fol:{self.seed}:{index}:{attempt}")
            premises, conclusion, depth = self._candidate(rng, target)
            parsed = [parse(fol) for _, fol in premises]
            verdict = decide_parsed(parsed, parse(conclusion[1]))
            if verdict == target and (verdict != "True" or consistent(parsed)):  # inconsistent premises prove all
                return Problem(
                    id=f"fol-{self.seed}-{index}",
                    task=self.name,
                    question=render_question([w for w, _ in premises], [f for _, f in premises], *conclusion),
                    answer=target,
                    meta={"premises": [w for w, _ in premises], "premises_fol": [f for _, f in premises],
                          "conclusion": conclusion[0], "conclusion_fol": conclusion[1], "depth": depth},
                )
        raise RuntimeError(f"no {target} problem found for index {index} in {_ATTEMPTS} attempts")

    def _candidate(self, rng: random.Random, target: str) -> tuple[list[tuple[str, str]], tuple[str, str], int]:
        """Premises and query aimed at `target`: a chain subject -> p0 -> ... -> p_depth, broken for Unknown."""
        depth = rng.randint(1, self.depth)
        subject, *others = rng.sample(NAMES, 3)
        chain_length = depth + 1
        adjectives = rng.sample(ADJECTIVES, chain_length + depth + 2 * self.distractors + 2)
        chain, extras, spare = (adjectives[:chain_length], adjectives[chain_length:chain_length + depth],
                                 adjectives[chain_length + depth:])
        head_positive = rng.random() < 0.5
        facts = [(chain[0], subject, True)]
        rules = []
        for step in range(depth):
            body = [chain[step]]
            if rng.random() < self.conjunction_rate:
                body.append(extras[step])
                facts.append((extras[step], subject, True))
            rules.append((body, chain[step + 1], head_positive or step < depth - 1))
        if target == "Unknown":
            self._break_chain(rng, facts, rules, others[0], spare[0])
            query_positive = rng.random() < 0.5
        else:
            query_positive = head_positive == (target == "True")
        premises = [_literal(a, e, p) for a, e, p in facts] + [_rule(b, h, p) for b, h, p in rules]
        premises += [self._distractor(rng, spare, chain, others) for _ in range(self.distractors)]
        rng.shuffle(premises)
        return premises, _literal(chain[-1], subject, query_positive), depth

    @staticmethod
    def _break_chain(rng: random.Random, facts: list, rules: list, other: str, detour: str) -> None:
        """Make the query underivable: the first fact about someone else or negated, a missing
        condition of a conjunction, or one link starting from an unrelated property."""
        way = rng.choice(("other", "negated", "detour", "drop_fact"))
        adjective, subject, _ = facts[0]
        if way == "other":
            facts[0] = (adjective, other, True)
        elif way == "negated":
            facts[0] = (adjective, subject, False)
        elif way == "drop_fact" and len(facts) > 1:
            del facts[rng.randrange(1, len(facts))]
        else:
            step = rng.randrange(len(rules))
            body, head, positive = rules[step]
            rules[step] = ([detour, *body[1:]], head, positive)

    @staticmethod
    def _distractor(rng: random.Random, spare: list[str], chain: list[str], others: list[str]) -> tuple[str, str]:
        """A fact about another entity, or a rule that leads away from the query's predicate."""
        kind = rng.choice(("fact", "rule", "branch"))
        if kind == "fact":
            return _literal(rng.choice(spare + chain[:-1]), rng.choice(others), rng.random() < 0.7)
        body = rng.choice(chain[:-1]) if kind == "branch" else rng.choice(spare)
        head = rng.choice([s for s in spare if s != body])
        return _rule([body], head, rng.random() < 0.7)

    def record_label(self, record: dict[str, Any], premises_fol: list[str], conclusion_fol: str | None) -> str:
        """The solver's verdict; a label in the record must agree with it."""
        try:
            verdict = decide_parsed([parse(f) for f in premises_fol], parse(conclusion_fol or ""))
        except ToolError as exc:
            raise ValueError(f"cannot decide the problem: {exc}") from None
        if "label" in record and normalise_label(record["label"]) != verdict:
            raise ValueError(f"label {record['label']!r} disagrees with the solver, which finds {verdict}")
        return verdict

    def demonstration(self) -> tuple[Problem, list[Call]]:
        return _demonstration(self.name)


def _demonstration(task: str) -> tuple[Problem, list[Call]]:
    """A fixed two-step problem (chain depth 2, one distractor) whose id is in the train split."""
    generator = FolGenTask(n=0, seed=0, depth=2, distractors=1, conjunction_rate=0.0)
    for index in itertools.count():
        problem = generator.generate(index)
        demo_id = f"{task}-demo-{index}"
        if problem.answer == "False" and problem.meta["depth"] == 2 and split_of(demo_id) == "train":
            problem.id, problem.task = demo_id, task
            calls = generator.reference_calls(problem)
            assert calls is not None
            return problem, calls
    raise AssertionError("unreachable")
