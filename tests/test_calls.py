"""The call parser reads untrusted model text: well-formed calls in three spellings, clear errors otherwise."""

import pytest

from fcapp.calls import CallParseError, call_end, parse_call

NAMES = ["calculator", "final_answer"]


@pytest.mark.parametrize(
    "text, name, arguments",
    [
        ('calculator(expression="48/2")', "calculator", {"expression": "48/2"}),
        ("calculator(expression='3 * (4 + 1)')", "calculator", {"expression": "3 * (4 + 1)"}),
        ('Let me compute. calculator(expression="1+1") and more', "calculator", {"expression": "1+1"}),
        ('{"name": "calculator", "arguments": {"expression": "2*3"}}', "calculator", {"expression": "2*3"}),
        ('{"name": "calculator", "arguments": "{\\"expression\\": \\"5\\"}"}', "calculator", {"expression": "5"}),
        ('<tool_call>\n{"name": "final_answer", "parameters": {"answer": "7"}}\n</tool_call>', "final_answer", {"answer": "7"}),
        ('<tool_call>[{"name": "final_answer", "arguments": {"answer": "7"}}]</tool_call>', "final_answer", {"answer": "7"}),
        ("final_answer(answer=-3.5)", "final_answer", {"answer": -3.5}),
        ('Final_Answer(answer="x")', "Final_Answer", {"answer": "x"}),
        ("final_answer(answer=[1, 2])", "final_answer", {"answer": [1, 2]}),
    ],
)
def test_well_formed_calls(text, name, arguments):
    parsed = parse_call(text, NAMES)
    assert (parsed.name, parsed.arguments) == (name, arguments)


def test_positional_arguments_are_kept_in_order():
    assert parse_call('calculator("1+2")', NAMES).positional == ["1+2"]


def test_prose_with_parentheses_is_not_a_call_when_names_are_known():
    parsed = parse_call('The total (before tax) is: calculator(expression="3+4")', NAMES)
    assert parsed.arguments == {"expression": "3+4"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("The answer is 42.", "no function call"),
        ("calculator(expression=48/2)", "in quotes"),
        ("calculator(expression=__import__('os').system('echo hi'))", "not a function call"),
        ("calculator(expression=open)", "bare name"),
        ("calculator(expression=lambda: 1)", "lambda"),
        ("calculator(expression=().__class__)", "attribute"),
        ('calculator(expression="1", **{"a": 1})', r"\*\*"),
        ('calculator(expression="x" "y" ', "no function call"),
    ],
)
def test_broken_or_malicious_calls_raise_clear_errors(text, message):
    with pytest.raises(CallParseError, match=message):
        parse_call(text, NAMES)


def test_huge_and_deeply_nested_inputs_fail_cleanly():
    with pytest.raises(CallParseError):
        parse_call("calculator(expression=" + "[" * 50000 + "]" * 50000 + ")", NAMES)
    with pytest.raises(CallParseError):
        parse_call('calculator(expression="' + "9" * 100000 + '")', NAMES)
    with pytest.raises(CallParseError):
        parse_call("{" * 100000, NAMES)


def test_call_end_marks_where_streaming_can_stop():
    assert call_end('calculator(expression="1+', NAMES) is None
    text = 'calculator(expression="1+1") trailing'
    assert call_end(text, NAMES) == len('calculator(expression="1+1")')
    # a finished but malformed call also ends the reply, so the error comes back at once
    assert call_end("calculator(expression=1+1) more", NAMES) == len("calculator(expression=1+1)")
