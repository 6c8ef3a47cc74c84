"""Math tools: exact results, clean formatting, and clear ToolErrors for malformed or hostile input."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fcapp.tools.base import ToolError
from fcapp.tools.math import calculator, format_number, math_toolkit, percentage, simplify, solve_equation

FCAPP = Path(__file__).resolve().parents[1] / "fcapp"


@pytest.mark.parametrize("expression, expected", [
    ("2 + 2", "4"),
    ("(12 + 8) * 3", "60"),
    ("10 / 4", "2.5"),
    ("1 / 3", "1/3 ≈ 0.3333333333"),
    ("2 / 3 * 3", "2"),
    ("0.1 + 0.2", "0.3"),
    ("1,500 / 4", "375"),
    ("1,000,000 - 1", "999999"),
    ("15% of 80", "12"),
    ("50%", "0.5"),
    ("2 / 12.5%", "16"),
    ("17 % 5", "2"),
    ("7 // 2", "3"),
    ("-7 // 2", "-4"),
    ("2 ** 10", "1024"),
    ("2^10", "1024"),
    ("3 × 4 ÷ 6", "2"),
    ("$5 * 3", "15"),
    ("2(3 + 4)", "14"),
    ("(1 + 2)(3 + 4)", "21"),
    ("-0.25 * 4", "-1"),
    ("1.5e3", "1500"),
    ("sqrt(16)", "4"),
    ("sqrt(2)", "sqrt(2) ≈ 1.414213562"),
    ("pi**1000 % 7", "≈ 3.967908744"),  # cancellation of ~500 digits: the decimal is computed precisely enough
    ("round(2.5)", "3"),
    ("round(3.14159, 2)", "3.14"),
    ("abs(-3) + min(4, 5) + max(1, 2, 3)", "10"),
    ("floor(7 / 2) + ceil(7 / 2)", "7"),
    ("1 / 1024", "0.0009765625"),
])
def test_calculator_known_values(expression: str, expected: str) -> None:
    assert calculator(expression) == expected


def test_calculator_large_but_allowed_results_are_summarised() -> None:
    assert calculator("1e308 ** 2") == "≈ 1.000000e+616 (617 digits)"
    assert calculator("10 ** 20") == "100000000000000000000"


@pytest.mark.parametrize("expression, message", [
    ("10**10**10", "digits"),
    ("9**9**9", "digits"),
    ("9**9**9**9", "digits"),
    ("(2**1000)**1000", "digits"),
    ("2**0.5**100000", "digits"),
    ("10**3000 * 10**3000", "digits"),
    ("sqrt(2**2100 + 1)", "roots"),
    ("1e999", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("5 // (2 - 2)", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("sqrt(-1)", "not a real number"),
    ("x + 1", "unknown name"),
    ("__import__('os').system('true')", "not allowed"),
    ("__import__('os')", "unknown function"),
    ("open('/etc/passwd')", "unknown function"),
    ("(1).__class__", "not allowed"),
    ("[1, 2]", "not allowed"),
    ("'a' * 3", "not a number"),
    ("True + 1", "not a number"),
    ("lambda: 1", "not allowed"),
    ("1 if 2 else 3", "not allowed"),
    ("abs(1, 2)", "argument"),
    ("round(x=1)", "not allowed"),
    ("1 +", "cannot read"),
    ("", "empty"),
    ("1" * 501, "too long"),
    ("-" * 300 + "1", "nested"),
    ("+".join(["1"] * 240), "too large"),
])
def test_calculator_refuses_bad_and_huge_input(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        calculator(expression)


@st.composite
def _arithmetic(draw: st.DrawFn, depth: int = 3) -> tuple[str, Fraction | None]:
    """A random expression and its exact value (None when it divides by zero)."""
    if depth == 0 or draw(st.booleans()):
        n = draw(st.integers(-1000, 1000))
        return (f"({n})" if n < 0 else str(n)), Fraction(n)
    left, lv = draw(_arithmetic(depth - 1))
    right, rv = draw(_arithmetic(depth - 1))
    op = draw(st.sampled_from("+-*/"))
    if lv is None or rv is None:
        return f"({left} {op} {right})", None
    if op == "/":
        return f"({left} / {right})", (lv / rv if rv else None)
    return f"({left} {op} {right})", {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]


@settings(max_examples=150, deadline=None)
@given(_arithmetic())
@example(("(((0 + (-236)) / 335) + ((1 / 636) / (671 * 993)))", Fraction(-100009414753, 141962517180)))
def test_calculator_matches_exact_fractions(case: tuple[str, Fraction | None]) -> None:
    expression, value = case
    if value is None:
        with pytest.raises(ToolError, match="division by zero"):
            calculator(expression)
        return
    shown = calculator(expression)
    if shown.startswith("≈ "):  # a fraction longer than format_number shows exactly: its decimal alone
        assert len(f"{value.numerator}/{value.denominator}") > 25
        assert float(shown[2:].split(" ")[0]) == pytest.approx(float(value), rel=1e-9)
    else:
        assert Fraction(shown.split(" ≈ ")[0]) == value


def test_format_number_styles() -> None:
    import sympy

    assert format_number(sympy.Integer(24)) == "24"
    assert format_number(sympy.Rational(-5, 2)) == "-2.5"
    assert format_number(sympy.Rational(10, 3)) == "10/3 ≈ 3.333333333"
    assert format_number(sympy.Rational(1, 8)) == "0.125"


@pytest.mark.parametrize("equation, variable, expected", [
    ("2*x + 3 = 11", "x", "x = 4"),
    ("3*n - 5 = 16", "", "n = 7"),
    ("2x + 3 = 11", "x", "x = 4"),
    ("x/3 = 7", "x", "x = 21"),
    ("0.5*x = 3", "x", "x = 6"),
    ("1/x = 4", "x", "x = 0.25"),
    ("x**2 - 5*x + 6 = 0", "x", "x = 2 or x = 3"),
    ("x**2 = -4", "x", "no real solution found for x"),
    ("x = x + 1", "x", "no real solution found for x"),
    ("2*(x + 1) = 2*x + 2", "x", "every value of x is a solution"),
    ("a*x + b = c", "x", "x = (-b + c)/a"),
    ("3*x - 9", "x", "x = 3"),
])
def test_solve_equation(equation: str, variable: str, expected: str) -> None:
    assert solve_equation(equation, variable) == expected


@pytest.mark.parametrize("equation, variable, message", [
    ("x + y = 3", "", "say which variable"),
    ("y = 2", "x", "does not appear"),
    ("x = 1 = 2", "x", "single '='"),
    ("x**12 + x + 1 = 0", "x", "too big"),
    ("x**100 = 2", "x", "limited to exponent"),
    ("x**x = 2", "x", "variable exponent"),
    ("exec('1') = 2", "x", "unknown function"),
])
def test_solve_equation_errors(equation: str, variable: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        solve_equation(equation, variable)


def test_simplify() -> None:
    assert simplify("2*x + 3*x - x") == "4*x"
    assert simplify("(x**2 - 1)/(x - 1)") == "x + 1"
    assert simplify("2**n * 2") == "2**(n + 1)"
    assert simplify("3 * 4") == "12"
    with pytest.raises(ToolError, match="too big"):
        simplify("(a + b + c + x + y + z)**12")
    with pytest.raises(ToolError, match="too big"):
        simplify("((x + 1)**12)**12")
    with pytest.raises(ToolError, match="unknown function"):
        simplify("sin(x)")


def test_percentage() -> None:
    assert percentage(15, 60) == "25%"
    assert percentage(0.5, 2) == "25%"
    assert percentage(1, 3) == "100/3 ≈ 33.33333333%"
    with pytest.raises(ToolError, match="zero"):
        percentage(1, 0)
    with pytest.raises(ToolError, match="finite"):
        percentage(float("inf"), 2)


def test_toolkit_schemas_examples_and_calls() -> None:
    registry = math_toolkit()
    assert registry.names() == ["calculator", "solve_equation", "simplify", "percentage"]
    for tool in registry:
        assert 1 <= len(tool.examples) <= 2
        assert tool.description
        for example in tool.examples:
            tool.call(example)  # every example runs
    assert registry.get("calculator").call({"expression": "(12 + 8) * 3"}) == "60"
    assert registry.get("percentage").call({"part": "15", "whole": 60}) == "25%"
    with pytest.raises(ToolError, match="too long"):
        registry.get("calculator").call({"expression": "1+" * 2500})


_FORBIDDEN = {"eval", "exec", "sympify", "parse_expr"}


def test_no_eval_exec_or_sympy_parser_in_fcapp() -> None:
    """Model text must never reach a code evaluator: no such call anywhere in the package.
    (`model.eval()` of torch is an attribute call on a model, not the builtin, and is allowed. A user's
    own function runs as a file in the sandbox's child process, see fcapp/tools/sandbox.py.)"""
    offenders = []
    for path in sorted(FCAPP.rglob("*.py")):
        where = path.relative_to(FCAPP.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in _FORBIDDEN:
                offenders.append(f"{where}:{node.lineno} {func.id}()")
            elif isinstance(func, ast.Attribute) and func.attr in {"sympify", "parse_expr"}:
                offenders.append(f"{where}:{node.lineno} .{func.attr}()")
    assert not offenders, offenders
