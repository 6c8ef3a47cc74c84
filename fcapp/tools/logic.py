"""First-order logic tools: parse FOLIO-style formulas, decide entailment with z3, and bind the
decision procedure to one problem's premises as functions a small model can call.

Notation (unicode and ASCII are interchangeable):
    ∀x / forall x / all x      ∃x / exists x        ¬ ~ ! not        ∧ & && ^ and
    ∨ | || or                  ⊕ xor                → -> => implies   ↔ <-> <=> iff      = ≠ !=
Precedence, tightest first: ¬, ∧, ∨ and ⊕, →, ↔ (→ and ↔ group to the right). A quantifier whose
body starts with "(" scopes over that parenthesised group; otherwise as far right as possible.
`^` is a conjunction (the ∧ lookalike FOLIO's annotators use), not an exclusive or.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Union

import z3

from fcapp.tools.base import Registry, ToolError, tool_from_function

MAX_FORMULA_CHARS = 2000
MAX_DEPTH = 60
DEFAULT_TIMEOUT_MS = 2000

# ---- syntax tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """A variable (bound by a quantifier), a constant, or a function applied to terms."""

    name: str
    args: tuple["Term", ...] = ()
    variable: bool = False


@dataclass(frozen=True)
class Atom:
    predicate: str
    args: tuple[Term, ...]


@dataclass(frozen=True)
class Equal:
    left: Term
    right: Term


@dataclass(frozen=True)
class Not:
    body: "Formula"


@dataclass(frozen=True)
class Binary:
    op: str  # and, or, xor, implies, iff
    left: "Formula"
    right: "Formula"


@dataclass(frozen=True)
class Quantified:
    kind: str  # forall, exists
    variable: str
    body: "Formula"


Formula = Union[Atom, Equal, Not, Binary, Quantified]


class FormulaError(ToolError):
    """A malformed formula; `position` is the character offset where parsing stopped."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.position = position
        shown = text if len(text) <= 160 else text[:160] + "..."
        pointer = f"{shown[:position]}⟨here⟩{shown[position:]}" if position <= len(shown) else shown
        super().__init__(f"{message} at position {position}: {pointer}")


class SolverUndecided(ToolError):
    """z3 gave no verdict within the time limit (or the formulas are outside what it decides)."""


# ---- tokenizer --------------------------------------------------------------------------------

_SYMBOLS = {
    "<->": "iff", "<=>": "iff", "↔": "iff", "⇔": "iff", "->": "implies", "=>": "implies", "→": "implies",
    "⇒": "implies", "&&": "and", "&": "and", "^": "and", "∧": "and", "||": "or", "|": "or", "∨": "or",
    "⊕": "xor", "¬": "not", "~": "not", "!=": "neq", "≠": "neq", "!": "not", "=": "eq", "∀": "forall",
    "∃": "exists", "(": "(", ")": ")", ",": ",",
}
_WORDS = {"and": "and", "or": "or", "xor": "xor", "not": "not", "implies": "implies", "iff": "iff",
          "forall": "forall", "all": "forall", "exists": "exists"}
# Names: word characters, with inner "-" or "." (l-2021, mr.smith) and trailing "+" (a+, c++).
_NAME = re.compile(r"\w+(?:[-.]\w+)*\+*")
_SYMBOL = re.compile("|".join(re.escape(s) for s in sorted(_SYMBOLS, key=len, reverse=True)))


@dataclass(frozen=True)
class Token:
    kind: str  # an operator kind from _SYMBOLS, "name", or "end"
    text: str
    position: int


def tokenize(text: str) -> list[Token]:
    """Split a formula into tokens; a trailing full stop is ignored."""
    tokens: list[Token] = []
    stripped = text.rstrip()
    end = len(stripped) - 1 if stripped.endswith(".") else len(stripped)
    i = 0
    while i < end:
        if text[i].isspace():
            i += 1
            continue
        name = _NAME.match(text, i, end)
        symbol = _SYMBOL.match(text, i, end)
        if name:
            word = name.group()
            tokens.append(Token(_WORDS.get(word.lower(), "name"), word, i))
            i = name.end()
        elif symbol:
            tokens.append(Token(_SYMBOLS[symbol.group()], symbol.group(), i))
            i = symbol.end()
        else:
            raise FormulaError(f"unexpected character {text[i]!r}", text, i)
    tokens.append(Token("end", "", end))
    return tokens


# ---- parser -----------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the token list; `bound` holds the variables in scope."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.bound: list[str] = []
        self.depth = 0

    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def take(self, kind: str, what: str) -> Token:
        token = self.peek()
        if token.kind != kind:
            found = "the end of the formula" if token.kind == "end" else repr(token.text)
            raise FormulaError(f"expected {what}, found {found}", self.text, token.position)
        self.i += 1
        return token

    def parse(self) -> Formula:
        formula = self.iff()
        token = self.peek()
        if token.kind != "end":
            hint = " (unbalanced parentheses?)" if token.kind == ")" else " (missing operator?)"
            raise FormulaError(f"unexpected {token.text!r}{hint}", self.text, token.position)
        return formula

    def iff(self) -> Formula:
        left = self.implies()
        if self.peek().kind == "iff":
            self.i += 1
            return Binary("iff", left, self.iff())
        return left

    def implies(self) -> Formula:
        left = self.disjunction()
        if self.peek().kind == "implies":
            self.i += 1
            return Binary("implies", left, self.implies())
        return left

    def disjunction(self) -> Formula:
        left = self.conjunction()
        while self.peek().kind in ("or", "xor"):
            op = self.peek().kind
            self.i += 1
            left = Binary(op, left, self.conjunction())
        return left

    def conjunction(self) -> Formula:
        left = self.unary()
        while self.peek().kind == "and":
            self.i += 1
            left = Binary("and", left, self.unary())
        return left

    def unary(self) -> Formula:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaError("formula nested too deeply", self.text, self.peek().position)
        try:
            token = self.peek()
            if token.kind == "not":
                self.i += 1
                return Not(self.unary())
            if token.kind in ("forall", "exists"):
                return self.quantified()
            if token.kind == "(":
                self.i += 1
                inner = self.iff()
                self.take(")", "')'")
                return inner
            return self.atom()
        finally:
            self.depth -= 1

    def quantified(self) -> Formula:
        kind = self.peek().kind
        self.i += 1
        names = [self.take("name", "a variable after the quantifier").text]
        while self.peek().kind == "," and self.peek(1).kind == "name":
            self.i += 1
            names.append(self.take("name", "a variable").text)
        self.bound.extend(names)
        try:
            body = self.unary() if self.peek().kind == "(" else self.iff()
        finally:
            del self.bound[-len(names):]
        for name in reversed(names):
            body = Quantified(kind, name, body)
        return body

    def atom(self) -> Formula:
        token = self.peek()
        if token.kind != "name":
            found = "the end of the formula" if token.kind == "end" else repr(token.text)
            raise FormulaError(f"expected a predicate such as P(x), found {found}", self.text, token.position)
        start = self.i
        left = self.term()  # look ahead: a term followed by = or ≠ is an equation
        if self.peek().kind in ("eq", "neq"):
            negated = self.peek().kind == "neq"
            self.i += 1
            equal = Equal(left, self.term())
            return Not(equal) if negated else equal
        self.i = start + 1
        args = self.arguments() if self.peek().kind == "(" else ()
        return Atom(token.text, args)

    def arguments(self) -> tuple[Term, ...]:
        self.take("(", "'('")
        args = [self.term()]
        while self.peek().kind == ",":
            self.i += 1
            args.append(self.term())
        self.take(")", "')' or ',' after an argument")
        return tuple(args)

    def term(self) -> Term:
        name = self.take("name", "a constant or variable").text
        while self.peek().kind == "name":  # a multi-word constant (captain america) becomes captain_america
            name += "_" + self.take("name", "a name").text
        if self.peek().kind == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FormulaError("formula nested too deeply", self.text, self.peek().position)
            try:
                return Term(name, self.arguments())
            finally:
                self.depth -= 1
        return Term(name, variable=name in self.bound)


def parse(text: str) -> Formula:
    """Parse one formula; raises FormulaError naming the position of the first problem."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("empty formula", "", 0)
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"formula too long ({len(text)} characters, limit {MAX_FORMULA_CHARS})", "", 0)
    return _Parser(text).parse()


# ---- inspection and printing ------------------------------------------------------------------


def _terms(formula: Formula) -> Iterator[Term]:
    """Every term in the formula, nested function arguments included."""
    stack: list[Term] = []
    if isinstance(formula, Atom):
        stack = list(formula.args)
    elif isinstance(formula, Equal):
        stack = [formula.left, formula.right]
    elif isinstance(formula, Not):
        yield from _terms(formula.body)
    elif isinstance(formula, Binary):
        yield from _terms(formula.left)
        yield from _terms(formula.right)
    elif isinstance(formula, Quantified):
        yield from _terms(formula.body)
    while stack:
        term = stack.pop()
        yield term
        stack.extend(term.args)


def constants(formula: Formula) -> set[str]:
    """Names of the individuals a formula mentions."""
    return {t.name for t in _terms(formula) if not t.variable and not t.args}


def predicates(formula: Formula) -> set[tuple[str, int]]:
    """(name, arity) of every predicate in the formula."""
    if isinstance(formula, Atom):
        return {(formula.predicate, len(formula.args))}
    if isinstance(formula, Not):
        return predicates(formula.body)
    if isinstance(formula, Binary):
        return predicates(formula.left) | predicates(formula.right)
    if isinstance(formula, Quantified):
        return predicates(formula.body)
    return set()


_SHOW = {"and": "∧", "or": "∨", "xor": "⊕", "implies": "→", "iff": "↔", "forall": "∀", "exists": "∃"}


def _show_term(term: Term) -> str:
    return f"{term.name}({', '.join(_show_term(a) for a in term.args)})" if term.args else term.name


def to_text(formula: Formula) -> str:
    """Unicode rendering with explicit parentheses (shows how a formula was read)."""
    if isinstance(formula, Atom):
        return _show_term(Term(formula.predicate, formula.args))
    if isinstance(formula, Equal):
        return f"{_show_term(formula.left)} = {_show_term(formula.right)}"
    if isinstance(formula, Not):
        inner = to_text(formula.body)
        return f"¬{inner}" if isinstance(formula.body, (Atom, Not)) else f"¬({inner})"
    if isinstance(formula, Binary):
        return f"({to_text(formula.left)} {_SHOW[formula.op]} {to_text(formula.right)})"
    return f"{_SHOW[formula.kind]}{formula.variable} {to_text(formula.body)}"


# ---- z3 translation and decision --------------------------------------------------------------


class _Z3:
    """One translation into a z3 context (a thread's own: concurrent calls never share state)."""

    def __init__(self, ctx: z3.Context) -> None:
        self.ctx = ctx
        self.sort = z3.DeclareSort("Entity", self.ctx)
        self.decls: dict[tuple[str, str, int], z3.FuncDeclRef] = {}

    def decl(self, kind: str, name: str, arity: int) -> z3.FuncDeclRef:
        key = (kind, name, arity)
        if key not in self.decls:
            result = z3.BoolSort(self.ctx) if kind == "P" else self.sort
            self.decls[key] = z3.Function(f"{kind}:{name}/{arity}", *([self.sort] * arity), result)
        return self.decls[key]

    def term(self, term: Term, scope: dict[str, z3.ExprRef]) -> z3.ExprRef:
        if term.variable and not term.args:
            return scope[term.name]
        if not term.args:
            return z3.Const(f"c:{term.name}", self.sort)
        return self.decl("f", term.name, len(term.args))(*(self.term(a, scope) for a in term.args))

    def formula(self, formula: Formula, scope: dict[str, z3.ExprRef] | None = None) -> z3.BoolRef:
        scope = scope or {}
        if isinstance(formula, Atom):
            if not formula.args:
                return z3.Bool(f"p:{formula.predicate}", self.ctx)
            return self.decl("P", formula.predicate, len(formula.args))(*(self.term(a, scope) for a in formula.args))
        if isinstance(formula, Equal):
            return self.term(formula.left, scope) == self.term(formula.right, scope)
        if isinstance(formula, Not):
            return z3.Not(self.formula(formula.body, scope))
        if isinstance(formula, Binary):
            left, right = self.formula(formula.left, scope), self.formula(formula.right, scope)
            return {"and": z3.And, "or": z3.Or, "xor": z3.Xor, "implies": z3.Implies,
                    "iff": lambda a, b: a == b}[formula.op](left, right)
        variable = z3.Const(f"v:{formula.variable}:{len(scope)}", self.sort)
        body = self.formula(formula.body, {**scope, formula.variable: variable})
        return (z3.ForAll if formula.kind == "forall" else z3.Exists)([variable], body)


_LOCAL = threading.local()


def _translator() -> _Z3:
    """A fresh translation into this thread's z3 context. z3 contexts must not be shared across
    threads, and each one costs ~10 ms and tens of MB after a hard check, so a thread keeps its
    own for good: a tool worker (one thread, see `logic_toolkit`) holds one however many calls it
    answers, where a context per call thread grew the app by ~20 MB a call."""
    if not hasattr(_LOCAL, "ctx"):
        _LOCAL.ctx = z3.Context()
    return _Z3(_LOCAL.ctx)


def _parse_all(formulas: list[str], what: str) -> list[Formula]:
    parsed = []
    for number, text in enumerate(formulas, start=1):
        try:
            parsed.append(parse(text))
        except FormulaError as exc:
            raise FormulaError(f"{what} {number}: {exc.args[0]}", "", 0) from None
    return parsed


def _solver(z: _Z3, premises: list[Formula], timeout_ms: int) -> z3.Solver:
    solver = z3.Solver(ctx=z.ctx)
    solver.set("timeout", int(timeout_ms))
    for premise in premises:
        solver.add(z.formula(premise))
    return solver


def consistent(premises: list[Formula], timeout_ms: int = DEFAULT_TIMEOUT_MS) -> bool:
    """Do the premises have a model? (Inconsistent premises prove anything.)"""
    result = _solver(_translator(), premises, timeout_ms).check()
    if result == z3.unknown:
        raise SolverUndecided(f"the solver could not decide within {timeout_ms} ms")
    return result == z3.sat


def decide_parsed(premises: list[Formula], conclusion: Formula, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> str:
    """"True" if the premises entail the conclusion, "False" if they entail its negation, else
    "Unknown". Inconsistent premises entail everything and give "True" (as in FOLIO's Prover9 labels)."""
    z = _translator()
    solver = _solver(z, premises, timeout_ms)
    goal = z.formula(conclusion)
    refuted = solver.check(z3.Not(goal))
    if refuted == z3.unsat:
        return "True"
    proved_negation = solver.check(goal)
    if proved_negation == z3.unsat:
        return "False"
    if z3.unknown in (refuted, proved_negation):
        raise SolverUndecided(f"the solver could not decide within {timeout_ms} ms; try a simpler formula")
    return "Unknown"


def decide(premises: list[str], conclusion: str, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> str:
    """Parse the formulas and decide: "True", "False" or "Unknown" (see decide_parsed)."""
    parsed = _parse_all(premises, "premise")
    return decide_parsed(parsed, parse(conclusion), timeout_ms)


# ---- tools bound to one problem ---------------------------------------------------------------


def _signature(name: str, arity: int) -> str:
    return f"{name}({', '.join('xyzuvw'[i % 6] for i in range(arity))})" if arity else name


def logic_toolkit(premises: list[str], timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Registry:
    """Tools bound to one problem's FOL premises. Schemas and examples are the same for every
    problem, so prompts differ only in the question."""
    parsed = _parse_all(list(premises), "premise")
    numbered = [f"{i}. {text.strip()}" for i, text in enumerate(premises, start=1)]

    def list_premises() -> str:
        """List the problem's premises as numbered first-order logic formulas."""
        return "\n".join(numbered)

    def symbols() -> str:
        """List the predicates and constants the premises use (write new formulas with these names)."""
        preds = sorted({p for f in parsed for p in predicates(f)})
        names = sorted({c for f in parsed for c in constants(f)})
        return (f"Predicates: {', '.join(_signature(n, a) for n, a in preds) or 'none'}\n"
                f"Constants: {', '.join(names) or 'none'}")

    def facts_about(entity: str) -> str:
        """List the premises that mention one individual (a constant such as tom).

        Args:
            entity: the constant's name, as written in the formulas
        """
        wanted = entity.strip().lower()
        hits = [line for line, f in zip(numbered, parsed) if wanted in {c.lower() for c in constants(f)}]
        if hits:
            return "\n".join(hits)
        known = sorted({c for f in parsed for c in constants(f)})
        return f"No premise mentions {entity!r}. Constants: {', '.join(known) or 'none'}"

    def check(conclusion: str) -> str:
        """Decide a formula from the premises: True (they prove it), False (they prove its negation) or Unknown.

        Args:
            conclusion: a first-order logic formula, e.g. Furry(tom) or ∀x (Cat(x) → Furry(x));
                ASCII forall, exists, ~, &, |, ->, <-> also work
        """
        raise AssertionError("only the schema of check is used; decide() runs in a tool worker")

    # z3 runs in a tool worker: its memory is capped there, and its one context is reused call after call
    checker = tool_from_function(check, examples=[{"conclusion": "Furry(tom)"}, {"conclusion": "¬Happy(anna)"}],
                                 timeout_s=3 * timeout_ms / 1000 + 1, isolated=True)
    checker.fn = functools.partial(decide, premises=list(premises), timeout_ms=timeout_ms)
    return Registry([
        tool_from_function(list_premises, examples=[{}]),
        tool_from_function(symbols, examples=[{}]),
        tool_from_function(facts_about, examples=[{"entity": "tom"}]),
        checker,
    ])
