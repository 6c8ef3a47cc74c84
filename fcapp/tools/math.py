"""Math tools backed by sympy, for GSM8K-style word problems.

Model text is never handed to eval, exec or sympy's own parser: `ast.parse(mode="eval")` reads it and
a whitelist walker builds sympy objects node by node, refusing anything else. Sizes are checked
*before* each power is computed, so inputs such as 9**9**9 fail at once instead of hanging.
"""

from __future__ import annotations

import ast
import decimal
import math as pymath
import re
from typing import Callable

import sympy

from fcapp.tools.base import Registry, ToolError, tool_from_function

MAX_TEXT_CHARS = 500
MAX_NODES = 200
MAX_DEPTH = 40
MAX_DIGITS = 4000  # Python refuses int <-> str conversions above 4300 digits anyway
MAX_BITS = int(MAX_DIGITS * 3.32)
MAX_ROOT_BITS = 2000  # sympy factors the radicand of a root; beyond ~600 digits that gets slow
MAX_DEGREE = 24
MAX_SOLVE_DEGREE = 6
MAX_TERMS = 1000
MAX_SYMBOLS = 6
MAX_EXACT_DECIMALS = 10
SHOWN_DIGITS = 10

_HINT = "use numbers, + - * / ** % ( ) and sqrt, abs, round, min, max, floor, ceil"
_OPERATORS: dict[type, Callable[[sympy.Expr, sympy.Expr], sympy.Expr]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}


def _round(value: sympy.Expr, digits: sympy.Expr = sympy.Integer(0)) -> sympy.Expr:
    """Round half away from zero (what people expect of 2.5), to `digits` decimal places."""
    if not value.is_Rational or not digits.is_Integer or not 0 <= int(digits) <= 20:
        raise ToolError("round(x, digits) needs a number x and a whole number of digits from 0 to 20")
    scale = sympy.Integer(10) ** int(digits)
    sign = -1 if value < 0 else 1
    return sign * sympy.floor(abs(value) * scale + sympy.Rational(1, 2)) / scale


_FUNCTIONS: dict[str, tuple[Callable[..., sympy.Expr], int, int]] = {  # name -> (function, min args, max args)
    "sqrt": (lambda x: _power(x, sympy.Rational(1, 2)), 1, 1),
    "abs": (sympy.Abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (sympy.Min, 1, 20),
    "max": (sympy.Max, 1, 20),
    "floor": (sympy.floor, 1, 1),
    "ceil": (sympy.ceiling, 1, 1),
}
_CONSTANTS = {"pi": sympy.pi}


# ---- reading text -----------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Common human / model spellings -> Python syntax: 1,000 -> 1000, 15% -> (15/100), 2x -> 2*x, ^ -> **."""
    if not isinstance(text, str) or not text.strip():
        raise ToolError(f"the expression is empty; {_HINT}")
    if len(text) > MAX_TEXT_CHARS:
        raise ToolError(f"the expression is too long ({len(text)} characters, limit {MAX_TEXT_CHARS})")
    for old, new in (("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"), ("^", "**"), ("$", ""), ("€", ""), ("£", "")):
        text = text.replace(old, new)
    if not re.search(r"[A-Za-z_]\w*\s*\(", text):  # thousands separators, unless commas may separate arguments
        text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    number = r"(?<![\w.])(\d+(?:\.\d+)?)\s*%"
    text = re.sub(number + r"\s*of\b", r"(\1/100)*", text)
    text = re.sub(number + r"(?=\s*(?:$|[)+\-*/,]))", r"(\1/100)", text)
    text = re.sub(r"(\d)(?![eE][+-]?\d)(?=[A-Za-z_(])", r"\1*", text)
    text = re.sub(r"\)\s*(?=[\w(])", ")*", text)
    return text.strip()


class _Builder:
    """Walks a whitelisted Python expression tree and builds the sympy expression it denotes."""

    def __init__(self, allow_symbols: bool) -> None:
        self.allow_symbols = allow_symbols
        self.symbols: dict[str, sympy.Symbol] = {}
        self.nodes = 0

    def build(self, text: str) -> sympy.Expr:
        source = _normalise(text)
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise ToolError(f"cannot read {text.strip()!r} ({exc.msg}); {_HINT}") from None
        except (ValueError, RecursionError, MemoryError):
            raise ToolError(f"cannot read {text.strip()!r}; {_HINT}") from None
        return self.node(tree.body, 0)

    def node(self, node: ast.AST, depth: int) -> sympy.Expr:
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            raise ToolError("the expression is too large or too deeply nested; split it into smaller steps")
        if isinstance(node, ast.Constant):
            return self.constant(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.node(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return self.binary(node.op, self.node(node.left, depth + 1), self.node(node.right, depth + 1))
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in _FUNCTIONS:
                raise ToolError(f"unknown function {node.func.id!r}; available: {', '.join(_FUNCTIONS)} "
                                "(write 2*(x+1), not x(x+1))")
            return self.call(node.func.id, [self.node(a, depth + 1) for a in node.args])
        raise ToolError(f"{ast.unparse(node)[:60]!r} is not allowed; {_HINT}")

    @staticmethod
    def constant(value: object) -> sympy.Expr:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ToolError(f"{value!r} is not a number; {_HINT}")
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ToolError("a number in the expression is too large")
            return sympy.Rational(repr(value))  # 0.1 stays exactly 1/10
        return _checked(sympy.Integer(value))

    def name(self, name: str) -> sympy.Expr:
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in _FUNCTIONS:
            raise ToolError(f"{name} is a function; call it like {name}(...)")
        if not self.allow_symbols:
            raise ToolError(f"unknown name {name!r}: the calculator takes numbers only; {_HINT}")
        if len(name) > 20:
            raise ToolError(f"variable name {name[:20]!r}... is too long")
        if name not in self.symbols:
            if len(self.symbols) >= MAX_SYMBOLS:
                raise ToolError(f"too many variables (limit {MAX_SYMBOLS})")
            self.symbols[name] = sympy.Symbol(name, real=True)
        return self.symbols[name]

    @staticmethod
    def call(name: str, args: list[sympy.Expr]) -> sympy.Expr:
        function, least, most = _FUNCTIONS[name]
        if not least <= len(args) <= most:
            count = least if least == most else f"{least} to {most}"
            raise ToolError(f"{name} takes {count} argument(s), got {len(args)}")
        return _checked(function(*args))

    def binary(self, op: ast.operator, left: sympy.Expr, right: sympy.Expr) -> sympy.Expr:
        if type(op) in _OPERATORS:
            return _checked(_OPERATORS[type(op)](left, right))
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)):
            if right.is_zero:
                raise ToolError("division by zero")
            if isinstance(op, ast.Div):
                return _checked(left / right)
            return _checked(sympy.floor(left / right) if isinstance(op, ast.FloorDiv) else sympy.Mod(left, right))
        if isinstance(op, ast.Pow):
            return _checked(_power(left, right))
        raise ToolError(f"operator {type(op).__name__} is not allowed; {_HINT}")


def _bits(value: sympy.Expr) -> float:
    """Size in bits of a rational's numerator or denominator, whichever is larger (0 for others)."""
    return max(pymath.log2(abs(int(value.p)) or 1), pymath.log2(int(value.q))) if value.is_Rational else 0.0


def _checked(value: sympy.Expr) -> sympy.Expr:
    if value.has(sympy.zoo, sympy.oo, sympy.nan):
        raise ToolError("division by zero")
    if _bits(value) > MAX_BITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits; no word problem needs that")
    return value


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """base ** exponent, refused before computing when the result would be huge."""
    if exponent.is_number:
        if not exponent.is_Rational:
            raise ToolError("exponents must be rational numbers such as 2 or 1/2")
        if base.is_zero and exponent < 0:
            raise ToolError("division by zero (0 to a negative power)")
        if base.is_number:
            size = _bits(base) if base.is_Rational else abs(float(sympy.log(abs(base), 2).evalf(15))) + 1
            if size * abs(exponent) > MAX_BITS and abs(base) != 1:
                raise ToolError(f"the result would have more than {MAX_DIGITS} digits; no word problem needs that")
            if not exponent.is_Integer and size > MAX_ROOT_BITS:
                raise ToolError("roots are limited to numbers of at most 600 digits")
        elif abs(exponent) > MAX_DEGREE:
            raise ToolError(f"powers of variables are limited to exponent {MAX_DEGREE}")
    elif not base.is_number or _bits(base) > 64:
        raise ToolError("a variable exponent needs a small number as its base, e.g. 2**n")
    return base**exponent


def _degree(expr: sympy.Expr) -> int:
    """An upper bound on the polynomial degree of an expression (how big expanding it could get)."""
    if expr.is_Symbol:
        return 1
    if expr.is_number:
        return 0
    if expr.is_Pow and expr.exp.is_Integer:
        return _degree(expr.base) * abs(int(expr.exp))
    if expr.is_Mul or expr.is_Pow:
        return sum(_degree(a) for a in expr.args)
    return max((_degree(a) for a in expr.args), default=0)


def _bounded(expr: sympy.Expr, max_degree: int) -> sympy.Expr:
    """Refuse expressions whose expansion sympy could spend seconds on."""
    degree, count = _degree(expr), len(expr.free_symbols)
    if degree > max_degree or pymath.comb(degree + count, count) > MAX_TERMS:
        raise ToolError(f"the expression is too big to work with (degree {degree} in {count} variable(s), "
                        f"limit degree {max_degree}); split it into smaller steps")
    return expr


# ---- writing results --------------------------------------------------------------------------


def _decimal(value: sympy.Expr) -> str:
    """A ~10-significant-digit decimal of a real number."""
    with decimal.localcontext() as context:
        context.prec = SHOWN_DIGITS
        if value.is_Rational:
            number = decimal.Decimal(int(value.p)) / decimal.Decimal(int(value.q))
        else:
            # enough working digits for any cancellation between terms of up to MAX_DIGITS digits
            # (pi**1000 % 7 is pi**1000 - 7*floor(...): the default 100 extra digits gave 0)
            number = +decimal.Decimal(str(sympy.N(value, SHOWN_DIGITS + 5, maxn=MAX_DIGITS + 100)))
    if number != 0 and not decimal.Decimal("1e-6") <= abs(number) < decimal.Decimal("1e15"):
        return f"{number:.6e}"
    text = f"{number:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_number(value: sympy.Expr) -> str:
    """Integers in full ("24"), terminating decimals exactly ("2.5"), other rationals as
    "1/3 ≈ 0.3333333333", irrationals as "sqrt(2) ≈ 1.414213562"."""
    if value.is_Integer:
        text = str(int(value))
        return text if len(text.lstrip("-")) <= 100 else f"≈ {_decimal(value)} ({len(text.lstrip('-'))} digits)"
    if value.is_Rational:
        q = int(value.q)
        for places in range(1, MAX_EXACT_DECIMALS + 1):
            if 10**places % q == 0:
                digits = str(abs(int(value.p)) * (10**places // q)).rjust(places + 1, "0")
                sign = "-" if value < 0 else ""
                return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0")
        exact = f"{value.p}/{value.q}"
        return f"{exact} ≈ {_decimal(value)}" if len(exact) <= 25 else f"≈ {_decimal(value)}"
    if not value.is_number or not value.is_real:
        raise ToolError("the result is not a real number (e.g. the square root of a negative number)")
    exact = sympy.sstr(value)
    return f"{exact} ≈ {_decimal(value)}" if len(exact) <= 40 else f"≈ {_decimal(value)}"


def _format_any(value: sympy.Expr) -> str:
    return format_number(value) if value.is_number else sympy.sstr(value)


def _number(value: float, name: str) -> sympy.Rational:
    if value != value or value in (float("inf"), float("-inf")):
        raise ToolError(f"{name} must be a finite number")
    return sympy.Rational(repr(value)) if isinstance(value, float) else sympy.Integer(value)


# ---- tools ------------------------------------------------------------------------------------


def calculator(expression: str) -> str:
    """Compute an arithmetic expression exactly, e.g. 12*3 + 4 or (1,200 - 300) / 4 or 15% of 80.

    Args:
        expression: numbers with + - * / ** % and parentheses; sqrt, abs, round, min, max, floor, ceil are allowed
    """
    return format_number(_Builder(allow_symbols=False).build(expression))


def solve_equation(equation: str, variable: str = "") -> str:
    """Solve an equation for one unknown, e.g. 2*x + 3 = 11 gives x = 4.

    Args:
        equation: an equation with one "=", e.g. 3*n - 5 = 16
        variable: the unknown to solve for, e.g. n (may be left empty when there is only one)
    """
    parts = equation.replace("==", "=").split("=")
    if len(parts) > 2:
        raise ToolError("write exactly one equation with a single '=', e.g. 2*x + 3 = 11")
    builder = _Builder(allow_symbols=True)
    left = builder.build(parts[0])
    right = builder.build(parts[1]) if len(parts) == 2 else sympy.Integer(0)
    name = variable.strip()
    if not name:
        if len(builder.symbols) != 1:
            found = ", ".join(builder.symbols) or "none"
            raise ToolError(f"say which variable to solve for (variables found: {found})")
        name = next(iter(builder.symbols))
    if name not in builder.symbols:
        found = ", ".join(builder.symbols) or "none"
        raise ToolError(f"{name!r} does not appear in the equation (variables found: {found})")
    symbol = builder.symbols[name]
    _bounded(left - right, MAX_SOLVE_DEGREE)
    if sympy.simplify(left - right) == 0:
        return f"every value of {name} is a solution"
    try:
        solutions = sympy.solve(sympy.Eq(left, right), symbol)
    except NotImplementedError:  # e.g. floor(x) = 2, x % 3 = 1, min(x, 2) = 1: sympy has no method
        raise ToolError(f"cannot solve this equation for {name} exactly (floor, ceil, %, min, max and round "
                        "usually make that impossible); rewrite it without them, or try values with "
                        "calculator") from None
    if not solutions:
        return f"no real solution found for {name}"
    return " or ".join(f"{name} = {_format_any(s)}" for s in solutions)


def simplify(expression: str) -> str:
    """Simplify an expression with variables, e.g. 2*x + 3*x - x gives 4*x.

    Args:
        expression: a formula with numbers, variables and + - * / ** ( )
    """
    return _format_any(sympy.simplify(_bounded(_Builder(allow_symbols=True).build(expression), MAX_DEGREE)))


def percentage(part: float, whole: float) -> str:
    """What percent `part` is of `whole`, e.g. part=15, whole=60 gives 25%.

    Args:
        part: the amount that is a share of the whole
        whole: the total amount (not zero)
    """
    part_value, whole_value = _number(part, "part"), _number(whole, "whole")
    if whole_value == 0:
        raise ToolError("whole must not be zero")
    return f"{format_number(part_value / whole_value * 100)}%"


def math_toolkit() -> Registry:
    """The math task's functions, with call examples for the prompt."""
    return Registry([  # sympy can run for minutes on some input: each call in a killable worker
        tool_from_function(calculator, examples=[{"expression": "(12 + 8) * 3"}, {"expression": "1,500 / 4"}],
                           isolated=True),
        tool_from_function(solve_equation, examples=[{"equation": "2*x + 3 = 11", "variable": "x"}], isolated=True),
        tool_from_function(simplify, examples=[{"expression": "2*x + 3*x - x"}], isolated=True),
        tool_from_function(percentage, examples=[{"part": 15, "whole": 60}], isolated=True),
    ])
