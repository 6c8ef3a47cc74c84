"""Tools: schemas come from type hints and docstrings; arguments are validated before any call."""

from typing import Literal

import pytest

from fcapp.tools.base import Registry, SchemaError, ToolError, tool_from_function


def convert(amount: float, unit: Literal["kg", "lb"], round_to: int = 2) -> str:
    """Convert a weight.

    Args:
        amount: how much
        unit: the unit to convert from
        round_to: decimals to keep
    """
    factor = 0.4536 if unit == "lb" else 2.2046
    return str(round(amount * factor, round_to))


def test_schema_from_hints_and_docstring():
    tool = tool_from_function(convert, examples=[{"amount": 2, "unit": "kg"}])
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert a weight.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "description": "how much"},
                    "unit": {"type": "string", "enum": ["kg", "lb"], "description": "the unit to convert from"},
                    "round_to": {"type": "integer", "description": "decimals to keep"},
                },
                "required": ["amount", "unit"],
            },
        },
    }
    assert tool.signature() == "convert(amount: number, unit: string, round_to: integer)"
    assert tool.render_call({"amount": 2, "unit": "kg"}) == 'convert(amount=2, unit="kg")'


def test_list_arguments_get_an_items_schema():
    def total(values: list[float]) -> float:
        """Add numbers."""
        return sum(values)

    tool = tool_from_function(total)
    assert tool.parameters["properties"]["values"] == {"type": "array", "items": {"type": "number"}}
    assert tool.call({"values": [1, 2.5]}) == "3.5"


@pytest.mark.parametrize(
    "source_fn, message",
    [
        (lambda: None, "docstring"),
    ],
)
def test_functions_without_docstring_are_refused(source_fn, message):
    with pytest.raises(SchemaError, match=message):
        tool_from_function(source_fn, name="noop")


def test_missing_hint_and_varargs_are_refused():
    def untyped(x):
        """Does things."""

    def star(*xs: int):
        """Does things."""

    with pytest.raises(SchemaError, match="type hint"):
        tool_from_function(untyped)
    with pytest.raises(SchemaError, match=r"\*args"):
        tool_from_function(star)


def test_examples_must_fit_the_signature():
    with pytest.raises(SchemaError, match="example"):
        tool_from_function(convert, examples=[{"amount": "lots", "unit": "kg"}])


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"amount": 1}, "missing argument"),
        ({"amount": 1, "unit": "kg", "colour": "red"}, "no argument"),
        ({"amount": "heavy", "unit": "kg"}, "must be a number"),
        ({"amount": 1, "unit": "stone"}, "must be one of"),
        ({"amount": 1, "unit": "kg", "round_to": 1.5}, "must be an integer"),
        ({"amount": 1, "unit": "x" * 5000}, "too long"),
        (["kg"], "named arguments"),
    ],
)
def test_bad_arguments_become_clear_tool_errors(arguments, message):
    tool = tool_from_function(convert)
    with pytest.raises(ToolError, match=message):
        tool.call(arguments)


def test_numeric_strings_are_coerced():
    tool = tool_from_function(convert)
    assert tool.call({"amount": "10", "unit": "lb"}) == "4.54"


def test_a_slow_tool_is_stopped_at_its_time_limit():
    import time

    def sleepy(seconds: float) -> str:
        """Sleep."""
        time.sleep(seconds)
        return "awake"

    tool = tool_from_function(sleepy, timeout_s=0.2)
    with pytest.raises(ToolError, match="longer than"):
        tool.call({"seconds": 2})


def test_a_failing_tool_reports_its_error():
    def divide(a: float, b: float) -> float:
        """Divide."""
        return a / b

    with pytest.raises(ToolError, match="division by zero"):
        tool_from_function(divide).call({"a": 1, "b": 0})


def test_registry_lookup_forgives_case_and_underscores_and_respects_disabling():
    registry = Registry([tool_from_function(convert)])
    assert registry.lookup("Convert").name == "convert"
    registry.set_enabled("convert", False)
    assert registry.names() == []
    with pytest.raises(ToolError, match="unknown function"):
        registry.lookup("convert")
