"""Fuzzing what a model may write. The call parser, argument validation and every built-in tool
take random, huge, deeply nested, malicious and unicode-tricked text, and near-valid calls built to
reach the parser's deeper paths. Specified behaviour:

* nothing executes: no process starts, no file is opened or removed, no sensitive attribute is
  read (an audit hook watches every call), a sentinel file never appears, and parsed arguments
  are plain data (str, int, float, bool, None, lists, dicts), never objects an evaluation made;
* nothing escapes `Agent.execute` / `Agent.advance`: each reply becomes a Step whose error is a
  non-empty message for the model, or whose call validated and has a result;
* a tool returns text or raises ToolError, nothing else, and every call ends by its time limit
  (a call past it is reported as a ToolError; only generous wall-clock bounds are asserted).

Seeds are fixed (`derandomize=True`) and example counts bounded; `pytest --slow` runs SLOW_FACTOR
times as many. The counts tried are printed at the end of the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcapp.agent import Agent
from fcapp.calls import CallParseError, ParsedCall, call_end, parse_call
from fcapp.records import FINAL_ANSWER, Step
from fcapp.tools.base import CALL_TIMEOUT_S, MAX_RESULT_CHARS, Registry, Tool, ToolError
from fcapp.tools.logic import logic_toolkit
from fcapp.tools.math import math_toolkit

SLOW_FACTOR = 20
GENEROUS_S = 60.0  # slack on top of a tool's own time limit: the machine may be very busy

# ---- what an executed payload would leave behind ----------------------------------------------
SENTINEL = Path(tempfile.gettempdir()) / "fcapp-fuzz-pwned"  # a fixed name keeps test ids stable
_S = str(SENTINEL)
MALICIOUS = [
    f"__import__('os').system('touch {_S}')",
    f'__import__("os").system("touch {_S}")',
    f"__import__('subprocess').run(['touch', '{_S}'])",
    f"open('{_S}', 'w').write('x')",
    "open('/etc/passwd').read()",
    "().__class__.__bases__",
    "().__class__.__bases__[0].__subclasses__()",
    "[].__class__.__mro__[-1].__subclasses__()",
    "(lambda: 0).__globals__",
    "(lambda: 0).__code__",
    "lambda: 0",
    "(lambda: 0)()",
    f"eval(\"__import__('os').system('touch {_S}')\")",
    f"exec(\"open('{_S}', 'w')\")",
    "globals()",
    "__builtins__",
    "getattr(0, '__class__')",
    "breakpoint()",
    "exit()",
    "9**9**9",
    "10**10**10",
    "1e308**2",
    "2**-9**9",
    "(-1)**0.5",
    "1/0",
    "0**-1",
    "1e999",
    "-1e999",
    "nan",
    "inf",
    "sqrt(-1)",
    "10**4000",
]
UNICODE = ["１２３", "٣", "𝟗", "⁹", "½", "\u202e", "\u202d", "\u200d", "\u200b", "\ufeff", "\x00", "\ud800", "\udfff",
           "\u2028", "\x85", "−", "×", "÷", "∞", "ℕ", "∀", "¬", "→", "⊕", "ｃａｌｃｕｌａｔｏｒ", "ⅻ", "é", "é"]
SYNTAX = ["(", ")", "[", "]", "{", "}", '"', "'", '"""', "\\", "\\u", "<tool_call>", "</tool_call>", ",", "=", ":",
          "**", "*", ".", "#", "\n", "\t", " ", "@", "%", "$", "`", "```", "{{", "}}", "//", "->", "<->", "&", "|"]

# ---- the agents and tools under test ----------------------------------------------------------
PREMISES = ["∀x (Cat(x) → Furry(x))", "Cat(tom)", "¬Happy(anna)", "Owns(anna, tom) ∧ f(tom) = bob",
            "∀x ∃y (Likes(x, y) ∨ x = y)"]


def in_process(tools: Registry) -> Registry:
    """The tools run in this process (not in tool workers), so that the audit hook sees everything
    their code does; the worker path is tested at the end of the module."""
    return Registry([dataclasses.replace(t, isolated=False) for t in tools])


MATH_AGENT = Agent(in_process(math_toolkit()))
# A short solver limit keeps every example bounded (the tool's own limit follows from it).
LOGIC_AGENT = Agent(in_process(logic_toolkit(PREMISES, timeout_ms=300)))
AGENTS = {"math": MATH_AGENT, "logic": LOGIC_AGENT}
TOOL_NAMES = sorted({t.name for agent in AGENTS.values() for t in agent.tools})
PARAMS = {t.name: list(t.parameters["properties"]) for agent in AGENTS.values() for t in agent.tools}
ARG_NAMES = sorted({arg for names in PARAMS.values() for arg in names})
NAMES = TOOL_NAMES + ["Calculator", "SOLVE_EQUATION", "final_Answer", "finalanswer", "unknown_tool", "eval", "exec",
                      "__import__", "open", "print", "getattr", "x"]
FRAGMENTS = MALICIOUS + UNICODE + SYNTAX + [f"{n}(" for n in NAMES] + ARG_NAMES + ["12", "3.5", "-7", "1,000", "15%"]


# ---- watching for execution -------------------------------------------------------------------
_ARMED = threading.Event()
_VIOLATIONS: list[str] = []
_FORBIDDEN_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "socket.connect", "socket.bind", "os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "shutil.copyfile",
    "os.chmod", "os.truncate", "builtins.input", "builtins.breakpoint", "object.__getattr__", "ctypes.dlopen",
    "webbrowser.open",
}
# Attribute reads that lead from any object to globals and builtins: the classic sandbox escapes.
_ESCAPE_ATTRIBUTES = {"__globals__", "__builtins__", "f_globals", "f_builtins", "f_locals", "f_back", "tb_frame",
                      "gi_frame", "cr_frame", "ag_frame", "__subclasses__"}


def _audit(event: str, args: tuple[Any, ...], _armed: threading.Event = _ARMED) -> None:
    """Process-wide audit hook (tool threads included); records forbidden events while armed.
    (`_armed` is bound at definition: at interpreter exit module globals are already None.)"""
    if not _armed.is_set():
        return
    if event == "object.__getattr__" and args[1] not in _ESCAPE_ATTRIBUTES:
        return  # e.g. inspect.signature reading __code__ (sympy's dispatch), a line tracer reading f_code
    if event in _FORBIDDEN_EVENTS or (event == "open" and args and any(
            mark in str(args[0]) for mark in ("passwd", SENTINEL.name))):
        _VIOLATIONS.append(f"{event} {args!r:.200}")


sys.addaudithook(_audit)  # hooks cannot be removed; disarmed it only returns


@contextmanager
def nothing_executes() -> Iterator[None]:
    """Run the block under the audit hook; afterwards no forbidden event happened, no sentinel exists."""
    _VIOLATIONS.clear()
    _ARMED.set()
    try:
        yield
    finally:
        _ARMED.clear()
    assert not _VIOLATIONS, f"forbidden operations while handling untrusted text: {_VIOLATIONS}"
    assert not SENTINEL.exists(), "a payload executed: the sentinel file exists"


def assert_plain(value: Any, depth: int = 0) -> None:
    """Parsed arguments are plain data: nothing an evaluation could have produced (types, functions...)."""
    assert depth < 200
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item, depth + 1)
    else:
        assert value is None or type(value) in (str, int, float, bool), f"not plain data: {type(value)}"
    for text in ([value] if isinstance(value, str) else list(value) if isinstance(value, dict) else []):
        text.encode("utf-8")  # storable: no lone surrogates


# ---- example counts ---------------------------------------------------------------------------
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (tool or "agent", "result" | "error"): how deep examples got


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start without a sentinel; at the end of the module, print how many examples each property
    was tried on and how far they got."""
    SENTINEL.unlink(missing_ok=True)
    yield
    mode = "--slow" if request.config.getoption("--slow") else "default"
    lines = [f"  {name}: {n}" for name, n in sorted(COUNTS.items())]
    names = sorted({name for name, _ in OUTCOMES})
    lines += ["outcomes (result / clear error):"]
    lines += [f"  {name}: {OUTCOMES[name, 'result']} / {OUTCOMES[name, 'error']}" for name in names]
    text = f"\nfuzz examples tried ({mode} mode): {sum(COUNTS.values())} in total\n" + "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # shown even though output is captured
            print(text)
    else:
        print(text)


@pytest.fixture
def fuzz(request: pytest.FixtureRequest) -> Callable[[int], Callable]:
    """`@fuzz(n)`: hypothesis settings with a fixed seed and n examples (SLOW_FACTOR * n with --slow);
    also counts the examples tried under the test's name."""
    slow = request.config.getoption("--slow")
    name = request.node.name

    def decorate(n: int) -> Callable:
        def wrap(test: Callable) -> Callable:  # `test` is the @given-wrapped function
            inner = test.hypothesis.inner_test  # type: ignore[attr-defined]

            def counted(*args: Any, **kwargs: Any) -> None:
                COUNTS[name] += 1
                inner(*args, **kwargs)

            test.hypothesis.inner_test = counted  # type: ignore[attr-defined]
            return settings(max_examples=n * SLOW_FACTOR if slow else n, derandomize=True, database=None,
                            deadline=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                   HealthCheck.large_base_example, HealthCheck.filter_too_much])(test)
        return wrap

    return decorate


# ---- strategies -------------------------------------------------------------------------------
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]),  # Cs: lone surrogates
                     st.sampled_from([c for c in UNICODE + SYNTAX if len(c) == 1]))
random_text = st.lists(st.one_of(any_char, st.sampled_from(UNICODE + SYNTAX)), max_size=300).map("".join)
soup = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=any_char, max_size=6)), max_size=40).map("".join)
huge = st.builds(lambda unit, n, tail: unit * n + tail,
                 st.sampled_from(["(", "[", "{", "calculator(", 'calculator("', '{"name": ', '{"a":', "[1,", "9", '"',
                                  "\\", "<tool_call>", "¬", "∀x ", "x(", "a" * 64, " ", "\u200d", "１", "((1)+", "-"]),
                 st.integers(1, 30_000), st.sampled_from(["", ")", "]", "}", '")', 'calculator(expression="1+1")']))
nested = st.builds(lambda head, opener, closer, n, m, inner: head + opener * n + inner + closer * m,
                   st.sampled_from(["", "calculator(expression=", 'check(conclusion="', "final_answer(",
                                    '{"name": "calculator", "arguments": ']),
                   st.sampled_from(["(", "[", "{", '{"a":', "[[", "(-"]), st.sampled_from([")", "]", "}", "]]"]),
                   st.integers(0, 5_000), st.integers(0, 5_000), st.sampled_from(["1", '"x"', "", "9**9**9", "1e999"]))
json_bombs = st.one_of(
    st.builds(lambda n: '{"name": "calculator", "arguments": ' + '{"a": ' * n + "1" + "}" * n + "}",
              st.integers(1, 5_000)),
    st.builds(lambda n: '{"name": "percentage", "arguments": {"part": ' + "9" * n + ', "whole": 1}}',
              st.integers(1, 20_000)),
    st.builds(lambda e: '{"name": "percentage", "arguments": {"part": 1e%d, "whole": 3}}' % e,
              st.integers(-1_000, 1_000)),
    st.builds(lambda n: '{"name": "calculator", "arguments": "' + "[" * n + '"}', st.integers(1, 10_000)),
    st.builds(lambda n: '{"name": "calculator", "arguments": ' + json.dumps(json.dumps({"expression": "1" + "0" * n}))
              + "}", st.integers(1, 10_000)),
    st.sampled_from(['{"name": "percentage", "arguments": {"part": NaN, "whole": Infinity}}',
                     '{"name": "calculator", "arguments": {"expression": "10**10**10"}}',
                     '{"name": ["calculator"], "arguments": {}}', '{"name": null}', "[]", "[{}]", '[{"name": 1}]',
                     '{"name": "calculator", "arguments": [1, 2]}', '{"name": "calculator", "arguments": "[1]"}']),
)
# Number literals of thousands of digits, in every spelling a call allows: past 4,300 decimal digits
# Python refuses to turn an int into text (a 3,600-digit hex literal is such a number).
huge_literals = st.builds(
    lambda name, arg, spell, n: f"{name}({arg}={spell(n)})",
    st.sampled_from(TOOL_NAMES), st.sampled_from(ARG_NAMES),
    st.sampled_from([lambda n: "0x" + "f" * n, lambda n: "-0x" + "9" * n, lambda n: "0o" + "7" * n,
                     lambda n: "9" * n, lambda n: "[" + "9" * n + "]", lambda n: "0b" + "1" * n,
                     lambda n: "1" + "0" * n + ".5", lambda n: "1" + "_0" * (n // 2)]),
    st.one_of(st.integers(90, 3_990), st.sampled_from([101, 3_600, 3_990])))
huge_json_literals = st.builds(
    lambda name, arg, digits: json.dumps({"name": name, "arguments": {arg: 0}}).replace(": 0}", f": {digits}}}"),
    st.sampled_from(TOOL_NAMES), st.sampled_from(ARG_NAMES),
    st.one_of(st.integers(90, 20_000).map(lambda n: "9" * n), st.integers(90, 5_000).map(lambda n: "-1" + "0" * n)))
untrusted = st.one_of(random_text, soup, huge, nested, json_bombs, huge_literals, huge_json_literals)

# Python literals (rendered with repr: surrogates, NUL, huge numbers, nan / inf become names ...).
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10**4100), 10**4100),
                    st.integers(-(16**3_000), 16**3_000).map(hex), st.floats(),
                    st.text(alphabet=any_char, max_size=40), soup, st.sampled_from(MALICIOUS + UNICODE))
literals = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.sets(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), inner, max_size=3), st.dictionaries(st.integers(), inner, max_size=2)),
    max_leaves=8)
raw_arguments = st.sampled_from(MALICIOUS + ["x", "1+1", "f(x)", "a.b", "**{}", "*[]", "...", "b'x'", "1j", "{1, 2}",
                                              "f'{1}'", "[i for i in ()]", "(yield)", "await x", ":=", "x := 1"])


@st.composite
def python_calls(draw: st.DrawFn) -> str:
    """`name(arg=<literal>, ...)`: near-valid calls in the syntax the prompt teaches (mostly the
    tool's own argument names, with formulas the tools can work on among the values)."""
    name = draw(st.sampled_from(NAMES))
    own = PARAMS.get(name) or ARG_NAMES
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        value = draw(st.one_of(literals.map(repr), raw_arguments, well_formed.map(repr), formulas.map(repr)))
        if draw(st.integers(0, 3)):
            arg = draw(st.sampled_from(own)) if draw(st.integers(0, 3)) else draw(st.sampled_from(
                ARG_NAMES + ["__class__", "self", "x"]))
            parts.append(f"{arg}={value}")
        else:
            parts.append(value)
    prefix = draw(st.sampled_from(["", "Let me compute. ", "<tool_call>", "```python\n", "Step 1 (a+b): ", "[", "{"]))
    suffix = draw(st.sampled_from(["", " then more", "</tool_call>", "\n```", ")", "(", "]", '"', ' final_answer(']))
    return f"{prefix}{name}({', '.join(parts)}){suffix}"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(alphabet=any_char, max_size=40), soup,
              st.sampled_from(MALICIOUS)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


@st.composite
def json_calls(draw: st.DrawFn) -> str:
    """JSON objects {"name", "arguments"} with random argument values, in the wrappers models use."""
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8), json_values))
    own = PARAMS.get(name) if isinstance(name, str) else None
    values = st.one_of(json_values, well_formed, formulas)
    arguments = draw(st.one_of(
        st.dictionaries(st.sampled_from(own or ARG_NAMES), values, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=6)), values, max_size=3),
        json_values))
    key = draw(st.sampled_from(["arguments", "parameters", "args", "argument"]))
    if draw(st.booleans()):
        arguments = json.dumps(arguments)  # OpenAI sends the arguments as a JSON string
    text = json.dumps({"name": name, key: arguments}, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = f"[{text}]"
    wrapper = draw(st.sampled_from(["{}", "<tool_call>{}</tool_call>", "<tool_call>\n{}", "Sure! {} Done.", "```json\n{}\n```",
                                    "{} {}", "({}"]))
    return wrapper.replace("{}", text)


# Arithmetic: well-formed expressions in the spellings models use (so the tools compute), and
# the same grammar with hostile pieces mixed in.
def arithmetic(leaf: st.SearchStrategy[str], operators: list[str], functions: list[str],
               max_args: int = 3) -> st.SearchStrategy[str]:
    return st.recursive(leaf, lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(operators), inner).map(" ".join),
        st.tuples(st.sampled_from(functions), st.lists(inner, min_size=1, max_size=max_args)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
        inner.map(lambda s: f"({s})"), inner.map(lambda s: f"-{s}")), max_leaves=8)


OPERATORS = ["+", "-", "*", "/", "**", "%", "//"]
FUNCTIONS = ["sqrt", "abs", "round", "min", "max", "floor", "ceil"]
plain_numbers = st.one_of(st.integers(0, 10**6).map(str), st.floats(0, 1e6).map(repr),
                          st.sampled_from(["pi", "0", "0.1", "1,000", "15%", "15% of 80", "3.5e-7", "2", "3", "$5"]))
hostile_numbers = st.one_of(plain_numbers, st.sampled_from(
    ["1e308", "1e999", "9**9**9", "10**10**10", "1e308**2", "１２", "٣", "__class__", "10**4000", "2x", "x", "y",
     "0.000001", "-0", "5€", "n"] + MALICIOUS))
well_formed = arithmetic(plain_numbers, OPERATORS + ["×", "÷", "^"], FUNCTIONS)
with_variables = arithmetic(st.one_of(plain_numbers, st.sampled_from(["x", "x", "y", "n", "2x", "x**2"])),
                            ["+", "-", "*", "/"], ["sqrt", "abs"])
hostile = arithmetic(hostile_numbers, OPERATORS + ["^", "×", "÷", "−", "·", "@", "<<", "and", "if", "."],
                     FUNCTIONS + ["open", "__import__", "exp", "log", "x", "eval", "getattr"])
math_text = st.one_of(well_formed, with_variables, hostile, soup, random_text, st.sampled_from(MALICIOUS),
                      huge.map(lambda s: s[:600]))
one_unknown = arithmetic(st.one_of(st.integers(0, 1000).map(str), st.sampled_from(["x", "x", "2x", "0.5", "pi"])),
                         ["+", "-", "*", "/"], ["sqrt", "abs", "floor", "ceil", "round", "min", "max"], max_args=1)
equations = st.one_of(
    st.tuples(one_unknown, one_unknown).filter(lambda t: "x" in t[0] + t[1]).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(one_unknown, plain_numbers).filter(lambda t: "x" in t[0]).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(with_variables, with_variables).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(hostile, hostile).map(lambda t: f"{t[0]} = {t[1]}"), math_text,
    st.tuples(hostile, hostile, hostile).map(lambda t: f"{t[0]} = {t[1]} == {t[2]}"))
numbers_or_junk = st.one_of(st.integers(), st.integers(-(10**4000), 10**4000), st.floats(), st.booleans(), st.none(),
                            st.text(alphabet=any_char, max_size=30), st.sampled_from(["1e999", "１２", "12", " 3.5 "]),
                            st.lists(st.integers(), max_size=2))

# First-order logic, in both notations, with hostile pieces.
terms = st.sampled_from(["tom", "anna", "bob", "x", "y", "f(x)", "f(tom)", "captain america", "l-2021", "__class__",
                         "ｔｏｍ", "g(f(x), y)"])
atoms = st.one_of(
    st.tuples(st.sampled_from(["Cat", "Furry", "Happy", "Owns", "Likes", "P", "Q", "R", "__import__", "Ⅻ"]),
              st.lists(terms, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})" if t[1] else t[0]),
    st.tuples(terms, st.sampled_from(["=", "≠", "!="]), terms).map(" ".join),
    st.sampled_from(MALICIOUS + UNICODE + ["", "(", ")", ",", "P(", "P(x", "∀", "∀x", "."]))
formulas = st.recursive(atoms, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["∧", "∨", "→", "↔", "⊕", "&", "|", "->", "<->", "^", "and", "or", "xor",
                                      "implies", "iff", "&&", "||", "=>"]), inner).map(" ".join),
    inner.map(lambda s: "¬" + s), inner.map(lambda s: "~" + s), inner.map(lambda s: f"({s})"),
    st.tuples(st.sampled_from(["∀", "∃", "forall ", "exists ", "all ", "∀x, "]), st.sampled_from(["x", "y", "z"]),
              inner).map(lambda t: f"{t[0]}{t[1]} {t[2]}")), max_leaves=10)
logic_text = st.one_of(formulas, soup, random_text, huge.map(lambda s: s[:2_500]))


# ---- checks -----------------------------------------------------------------------------------
def check_step(agent: Agent, step: Step) -> None:
    """A Step is either a clear error for the model or a validated call with a result."""
    assert isinstance(step, Step)
    OUTCOMES["agent steps", "error" if step.error is not None else "result"] += 1
    if step.call is not None:
        assert_plain(step.call.arguments)
    if step.error is not None:
        assert isinstance(step.error, str) and step.error.strip()
        assert step.feedback() == f"Error: {step.error}"
    else:
        assert step.call is not None, "no error and no call"
        tool = agent.tools.get(step.call.name)
        tool.validate(step.call.arguments)  # the arguments it ran with validate
        assert isinstance(step.result, str)
        assert len(step.result) <= MAX_RESULT_CHARS + len(" ...[truncated]")
    tool_limit = max(t.timeout_s for t in agent.tools)
    assert step.tool_elapsed_s < tool_limit + GENEROUS_S


def run_agent(agent: Agent, text: str) -> None:
    """`execute` on the raw text, and `advance` (which first cuts the reply at its first call)."""
    with nothing_executes():
        check_step(agent, agent.execute(text))
        chain = agent.start("fuzz", "p", "question?", "fuzzer")
        events = agent.advance(chain, text)
    assert len(chain.steps) == 1 and events
    assert {e.kind for e in events} <= {"call", "error", "result", "answer"}
    check_step(agent, chain.steps[0])
    json.dumps(chain.to_dict(), ensure_ascii=False).encode("utf-8")  # what the store writes: any step can be stored
    if chain.steps[0].error is None and chain.steps[0].call.name == FINAL_ANSWER:
        assert chain.stop_reason == "answer"


def call_tool(tool: Tool, arguments: Any) -> str | None:
    """Call a tool directly: it returns text or raises ToolError (a clear message), within its limit."""
    began = time.monotonic()
    with nothing_executes():
        try:
            result = tool.call(arguments)
        except ToolError as exc:
            assert str(exc).strip()
            result = None
    assert time.monotonic() - began < tool.timeout_s + GENEROUS_S
    OUTCOMES[tool.name, "error" if result is None else "result"] += 1
    if result is not None:
        assert isinstance(result, str) and len(result) <= MAX_RESULT_CHARS + len(" ...[truncated]")
    return result


# ---- the parser -------------------------------------------------------------------------------
def test_the_parser_returns_a_call_or_raises_CallParseError_on_any_text(fuzz) -> None:
    """parse_call and call_end, with and without the known names, on random and hostile text."""

    @fuzz(400)
    @given(text=st.one_of(untrusted, python_calls(), json_calls()))
    def run(text: str) -> None:
        for names in (TOOL_NAMES, None):
            with nothing_executes():
                try:
                    parsed = parse_call(text, names)
                except CallParseError as exc:
                    assert str(exc).strip()
                    assert exc.end is None or 0 < exc.end <= len(text)
                else:
                    assert isinstance(parsed, ParsedCall) and isinstance(parsed.name, str)
                    assert_plain(parsed.arguments)
                    assert_plain(parsed.positional)
                    assert 0 < parsed.end <= len(text)
                end = call_end(text, names)
            assert end is None or 0 < end <= len(text)

    run()


def test_huge_replies_are_parsed_in_bounded_time() -> None:
    """Text full of call openings or brackets is not parsed in time quadratic in its length
    (before the fix, 'calculator(' * 20000 took minutes)."""
    for text in ("calculator(" * 20_000, 'calculator("' * 20_000, "[" * 100_000, "{" * 100_000, "([{" * 30_000,
                 "<tool_call>" + "[" * 100_000, "calculator(expression=" + "[" * 50_000 + "]" * 50_000 + ")"):
        began = time.monotonic()
        step = MATH_AGENT.execute(text)
        assert step.error and step.call is None
        assert time.monotonic() - began < GENEROUS_S


def test_a_call_still_open_past_the_length_limit_ends_the_reply_with_a_clear_error() -> None:
    """Streaming stops where an unclosed call passes MAX_CALL_CHARS, and the step says why."""
    from fcapp.calls import MAX_CALL_CHARS

    text = 'Sure. calculator(expression="' + "1+" * 5_000
    assert call_end(text[:100], TOOL_NAMES) is None  # still being written: generation goes on
    assert call_end(text, TOOL_NAMES) == len("Sure. ") + MAX_CALL_CHARS
    chain = MATH_AGENT.start("fuzz", "p", "question?", "fuzzer")
    MATH_AGENT.advance(chain, text)
    assert chain.steps[0].text == text[:len("Sure. ") + MAX_CALL_CHARS]
    assert chain.steps[0].error.startswith("the call is too long")


def test_a_call_after_long_prose_is_still_found() -> None:
    """The bound on attempts does not hide a real call written after a paragraph of prose."""
    prose = "Let me think (carefully) about [the numbers] in {this} problem. " * 20
    step = MATH_AGENT.execute(prose + 'calculator(expression="6*7")')
    assert step.error is None and step.result == "42"


# ---- the agent on untrusted replies -------------------------------------------------------------
@pytest.mark.parametrize("agent_name", sorted(AGENTS))
def test_the_agent_turns_any_reply_into_a_step(fuzz, agent_name: str) -> None:
    """Random, huge, nested and hostile replies: an error step or a validated call, never an exception."""
    agent = AGENTS[agent_name]

    @fuzz(250)
    @given(text=untrusted)
    def run(text: str) -> None:
        run_agent(agent, text)

    run()


@pytest.mark.parametrize("agent_name", sorted(AGENTS))
def test_near_valid_python_calls_validate_or_fail_clearly(fuzz, agent_name: str) -> None:
    """`name(arg=<random literal>)`: reaches literal parsing, name lookup, positional naming,
    argument validation and the tools themselves."""
    agent = AGENTS[agent_name]

    @fuzz(250)
    @given(text=python_calls())
    def run(text: str) -> None:
        run_agent(agent, text)

    run()


@pytest.mark.parametrize("agent_name", sorted(AGENTS))
def test_near_valid_json_calls_validate_or_fail_clearly(fuzz, agent_name: str) -> None:
    """JSON objects (plain, tagged, in lists, arguments as a string) with random argument values."""
    agent = AGENTS[agent_name]

    @fuzz(250)
    @given(text=json_calls())
    def run(text: str) -> None:
        run_agent(agent, text)

    run()


@pytest.mark.parametrize("payload", MALICIOUS)
def test_malicious_arguments_never_execute(payload: str) -> None:
    """Every payload, as a bare argument and as quoted text, in Python and JSON form, to every tool:
    a bare expression is refused by the parser; quoted text reaches the tool as inert text."""
    for agent in AGENTS.values():
        for tool in agent.tools:
            arg = next(iter(tool.parameters["properties"]), "x")
            with nothing_executes():
                bare = agent.execute(f"{tool.name}({arg}={payload})")
                for text in (f"{tool.name}({arg}={payload})", f"{tool.name}({payload})",
                             f"{tool.name}({arg}={json.dumps(payload)})",
                             json.dumps({"name": tool.name, "arguments": {arg: payload}}),
                             f"<tool_call>{json.dumps({'name': tool.name, 'arguments': {arg: payload}})}</tool_call>"):
                    check_step(agent, agent.execute(text))
            if not payload.lstrip("-").replace("e", "").isdigit():  # 1e999 is a (float) literal
                assert bare.error and ("literal" in bare.error or "syntax" in bare.error), bare.error


# ---- argument validation ----------------------------------------------------------------------
def test_argument_validation_returns_arguments_or_raises_ToolError(fuzz) -> None:
    """Tool.validate on every built-in tool with random argument objects (and non-objects)."""
    tools = [t for agent in AGENTS.values() for t in agent.tools]

    @fuzz(300)
    @given(index=st.integers(0, len(tools) - 1),
           arguments=st.one_of(st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=6)),
                                               json_values, max_size=4), json_values))
    def run(index: int, arguments: Any) -> None:
        tool = tools[index]
        try:
            valid = tool.validate(arguments)
        except ToolError as exc:
            assert str(exc).strip()
        else:
            assert set(valid) <= set(tool.parameters["properties"])
            assert set(tool.parameters.get("required", [])) <= set(valid)
            assert_plain(valid)

    run()


# ---- every built-in tool ----------------------------------------------------------------------
def test_calculator_returns_text_or_raises_ToolError(fuzz) -> None:
    tool = MATH_AGENT.tools.get("calculator")

    @fuzz(300)
    @given(expression=math_text)
    def run(expression: str) -> None:
        call_tool(tool, {"expression": expression})

    run()


def test_solve_equation_returns_text_or_raises_ToolError(fuzz) -> None:
    tool = MATH_AGENT.tools.get("solve_equation")

    @fuzz(150)
    @given(equation=equations, variable=st.one_of(st.sampled_from(["", "x"]),
                                                  st.sampled_from(["y", "n", "pi", "sqrt", "__class__", " x "]),
                                                  st.text(alphabet=any_char, max_size=8)))
    def run(equation: str, variable: str) -> None:
        call_tool(tool, {"equation": equation, "variable": variable})

    run()


def test_simplify_returns_text_or_raises_ToolError(fuzz) -> None:
    tool = MATH_AGENT.tools.get("simplify")

    @fuzz(200)
    @given(expression=math_text)
    def run(expression: str) -> None:
        call_tool(tool, {"expression": expression})

    run()


def test_percentage_returns_text_or_raises_ToolError(fuzz) -> None:
    tool = MATH_AGENT.tools.get("percentage")

    @fuzz(200)
    @given(part=numbers_or_junk, whole=numbers_or_junk)
    def run(part: Any, whole: Any) -> None:
        call_tool(tool, {"part": part, "whole": whole})

    run()


def test_final_answer_returns_text_or_raises_ToolError(fuzz) -> None:
    tool = MATH_AGENT.tools.get(FINAL_ANSWER)

    @fuzz(100)
    @given(answer=st.one_of(json_values, untrusted.map(lambda s: s[:5_000])))
    def run(answer: Any) -> None:
        call_tool(tool, {"answer": answer})

    run()


def test_logic_check_returns_a_verdict_or_raises_ToolError(fuzz) -> None:
    tool = LOGIC_AGENT.tools.get("check")

    @fuzz(250)
    @given(conclusion=logic_text)
    def run(conclusion: str) -> None:
        result = call_tool(tool, {"conclusion": conclusion})
        assert result in (None, "True", "False", "Unknown")

    run()


def test_logic_lookups_return_text_or_raise_ToolError(fuzz) -> None:
    tools = [LOGIC_AGENT.tools.get(name) for name in ("facts_about", "list_premises", "symbols")]

    @fuzz(150)
    @given(index=st.integers(0, 2), entity=st.one_of(terms, soup, random_text, huge.map(lambda s: s[:5_000])),
           extra=st.booleans())
    def run(index: int, entity: str, extra: bool) -> None:
        tool = tools[index]
        arguments = {"entity": entity} if tool.name == "facts_about" else ({"entity": entity} if extra else {})
        call_tool(tool, arguments)

    run()


def test_logic_toolkit_rejects_hostile_premises_with_ToolError(fuzz) -> None:
    """Premises come from problem files: binding tools to hostile ones fails with ToolError or works."""

    @fuzz(100)
    @given(premises=st.lists(logic_text, min_size=1, max_size=3))
    def run(premises: list[str]) -> None:
        with nothing_executes():
            try:
                registry = logic_toolkit(premises, timeout_ms=300)
            except ToolError as exc:
                assert str(exc).strip()
                return
        for name in ("list_premises", "symbols"):
            call_tool(registry.get(name), {})

    run()


# ---- time limits ------------------------------------------------------------------------------
def test_every_builtin_tool_has_a_time_limit() -> None:
    for agent in (Agent(math_toolkit()), Agent(logic_toolkit(PREMISES))):
        for tool in agent.tools:
            assert 0 < tool.timeout_s <= 2 * CALL_TIMEOUT_S, tool.name


def test_a_call_past_its_time_limit_becomes_a_ToolError() -> None:
    slow = dataclasses.replace(MATH_AGENT.tools.get("solve_equation"), timeout_s=0.01)
    with pytest.raises(ToolError, match="longer than 0.01 s"):
        slow.call({"equation": "x**6 + 3*x**5 + 7 = 0"})


def _tool_workers() -> set[int]:
    """PIDs of this process's live tool workers (Linux /proc)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{os.getpid()}\n" in status and b"fcapp.tools.worker" in cmdline and "State:\tZ" not in status:
            pids.add(int(proc.name))
    return pids


def test_a_runaway_sympy_call_is_killed_and_the_next_call_is_answered() -> None:
    """sympy needs minutes for this equation: its worker process is killed at the limit, so no core
    stays busy with it, and the next call gets a fresh worker."""
    solve = math_toolkit().get("solve_equation")
    assert solve.isolated
    assert solve.call({"equation": "2*x + 3 = 11"}) == "x = 4"  # a warm worker
    before = _tool_workers()
    with pytest.raises(ToolError, match="took longer than 1 s and was stopped"):
        dataclasses.replace(solve, timeout_s=1).call({"equation": "abs(x) + x**3 = 1"})
    assert len(before - _tool_workers()) == 1  # the worker that ran it is gone
    assert solve.call({"equation": "3*n - 5 = 16"}) == "n = 7"


def test_a_tool_worker_grown_past_its_memory_bound_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a call leaves resident in a worker (z3 after a hard check, sympy caches) is freed by
    ending that worker once it is past RECYCLE_RSS_BYTES; the next call gets a fresh one."""
    from fcapp.tools import worker

    calculator = math_toolkit().get("calculator")
    assert calculator.call({"expression": "2 + 2"}) == "4"  # a warm worker
    before = _tool_workers()
    monkeypatch.setattr(worker, "RECYCLE_RSS_BYTES", 1)  # every worker is past it
    assert calculator.call({"expression": "3 + 3"}) == "6"
    assert len(before - _tool_workers()) == 1
    monkeypatch.undo()
    assert calculator.call({"expression": "4 + 4"}) == "8"


def test_tool_workers_answer_concurrent_calls_side_by_side() -> None:
    calculator = math_toolkit().get("calculator")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: calculator.call({"expression": f"{n} * 3"}), range(12)))
    assert results == [str(3 * n) for n in range(12)]


# ---- files a model's text ends up in ---------------------------------------------------------
def test_exported_pairs_read_back_exactly_whatever_the_text(fuzz, tmp_path: Path) -> None:
    """Chain text with any unicode (U+2028, U+0085, NUL, RTL marks ...) survives export + import
    (before the fix, a line separator inside a message split the JSONL line in two). Lone
    surrogates never reach a chain: the agent replaces them (see the next test)."""
    from fcapp.trainsets import export_pairs, load_pair_file

    safe_char = st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\r",
                                                             "\n", "\x00", "\u202e", "\ufeff"]))
    message = st.builds(lambda role, content: {"role": role, "content": content},
                        st.sampled_from(["user", "assistant", "tool"]), st.text(alphabet=safe_char, max_size=60))

    @fuzz(60)
    @given(rows=st.lists(st.fixed_dictionaries({
        "prompt": st.lists(message, min_size=1, max_size=2), "chosen": st.lists(message, min_size=1, max_size=2),
        "rejected": st.lists(message, min_size=1, max_size=2), "tools": st.just([]), "task": st.just("gsm8k"),
        "problem_id": st.text(alphabet=safe_char, max_size=8)}), min_size=1, max_size=3))
    def run(rows: list[dict[str, Any]]) -> None:
        path = tmp_path / "pairs.jsonl"
        export_pairs(rows, path)
        assert load_pair_file(path) == rows

    run()


def test_lone_surrogates_in_a_reply_become_replacement_characters() -> None:
    """A JSON "\\ud800" escape from an HTTP model decodes to a lone surrogate, which UTF-8 (and so
    SQLite) cannot hold: the step keeps U+FFFD in its place, and the chain can be stored."""
    chain = MATH_AGENT.start("fuzz", "p", "question?", "fuzzer")
    MATH_AGENT.advance(chain, 'final_answer(answer="4\ud800\udfff")')
    assert chain.answer == "4\ufffd\ufffd" and chain.steps[0].text == 'final_answer(answer="4\ufffd\ufffd")'
    json.dumps(chain.to_dict(), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("text", [
    "final_answer(answer=0x" + "f" * 3_330 + ")",  # 4,009 decimal digits; before the fix execute raised
    "percentage(part=0x" + "f" * 3_600 + ", whole=2)",  # 4,335 digits: a step whose chain could not be stored
    "calculator(expression=" + "9" * 3_970 + ")",
    '{"name": "percentage", "arguments": {"part": ' + "9" * 4_000 + ', "whole": 2}}',
    '{"name": "final_answer", "arguments": {"answer": [-' + "9" * 200 + "]}}",
], ids=["hex-4009-digits", "hex-in-a-tool-call", "decimal-3970-digits", "json-4000-digits", "json-in-a-list"])
def test_a_number_literal_of_thousands_of_digits_becomes_an_error_step(text: str) -> None:
    from fcapp.calls import MAX_INT_DIGITS

    chain = MATH_AGENT.start("fuzz", "p", "question?", "fuzzer")
    MATH_AGENT.advance(chain, text)
    (step,) = chain.steps
    assert step.call is None and f"more than {MAX_INT_DIGITS} digits" in step.error
    json.dumps(chain.to_dict(), ensure_ascii=False).encode("utf-8")  # the chain can be stored


def test_a_number_at_the_digit_limit_is_still_a_number() -> None:
    from fcapp.calls import MAX_INT_DIGITS

    step = MATH_AGENT.execute(f"final_answer(answer={'9' * MAX_INT_DIGITS})")
    assert step.error is None and step.result == "Final answer: " + "9" * MAX_INT_DIGITS


def test_problem_files_load_or_fail_naming_file_and_line(fuzz, tmp_path: Path) -> None:
    """Random JSONL records for each task: problems, or a DataFileError naming file:line."""
    from fcapp.tasks import get_task
    from fcapp.files import DataFileError

    tasks = [get_task("gsm8k"), get_task("folio")]
    record_values = st.one_of(json_values, logic_text, st.sampled_from(["True", "False", "Unknown", "#### 12",
                                                                        "x\n#### 1e999", "#### １２", "#### 9" * 3]))
    records = st.dictionaries(st.sampled_from(["question", "answer", "id", "premises", "premises-FOL", "conclusion",
                                               "conclusion-FOL", "label", "example_id", "x"]),
                              record_values, max_size=6)

    bombs = st.one_of(st.integers(1, 5_000).map(lambda n: "[" * n + "]" * n),
                      st.integers(1, 5_000).map(lambda n: '{"question": ' + "9" * n + "}"),
                      st.integers(1, 3_000).map(lambda n: '{"a": ' * n + "1" + "}" * n))

    @fuzz(100)
    @given(index=st.integers(0, 1),
           lines=st.lists(st.one_of(records.map(json.dumps), untrusted.map(lambda s: s[:3_000]), bombs),
                          min_size=1, max_size=3))
    def run(index: int, lines: list[str]) -> None:
        path = tmp_path / "problems.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        with nothing_executes():
            try:
                problems = tasks[index].load_file(path).problems
            except DataFileError as exc:
                assert str(exc).startswith(f"{path}:"), str(exc)
            else:
                assert problems and all(p.question and p.answer for p in problems)

    run()
