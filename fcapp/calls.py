"""Parse one function call out of untrusted model text.

Three spellings are accepted, because models drift between them:
  * Python-call syntax `name(a=1, b="x")` (the form the prompt teaches; parsed with `ast`, literal
    arguments only, never executed),
  * a JSON object `{"name": ..., "arguments": {...}}` (also "parameters"/"args"),
  * either of those wrapped in `<tool_call>...</tool_call>` tags.
Everything that goes wrong raises CallParseError with a message the model can act on.
"""

from __future__ import annotations

import ast
import heapq
import json
import re
from dataclasses import dataclass
from typing import Any

MAX_CALL_CHARS = 4000
# Call-shaped spans tried per reply (a known name followed by "(", or "[" / "{"): text full of
# brackets costs at most this many bounded attempts, instead of time quadratic in its length.
MAX_CANDIDATES = 100
# Lists / objects inside arguments nest at most this deep (JSON allows ~1000 levels, which chains
# then cannot be copied or stored with: dataclasses.asdict recurses).
MAX_NESTING = 20
# Integers in arguments have at most this many digits. A longer literal is no reasoning step, and
# past 4,300 digits Python refuses to turn it into text, so the chain could be neither shown nor
# stored (`0x` + 3,600 hex digits fits in one call and is such a number).
MAX_INT_DIGITS = 100
_INT_LIMIT = 10**MAX_INT_DIGITS
# Lone UTF-16 surrogates, as "\ud800" escapes decode: UTF-8 (and so the store) cannot hold them.
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAME_CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]{0,63})\s*\(")
_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


class CallParseError(ValueError):
    """The text holds no well-formed call. `end` is set when a call-shaped span was found."""

    def __init__(self, message: str, end: int | None = None) -> None:
        super().__init__(message)
        self.end = end


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]
    positional: list[Any]
    end: int  # index in the text just after the call


def _literal(node: ast.AST) -> Any:
    """A Python literal node to a value; anything else (names, calls, operators) is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[union-attr]
    what = {ast.Call: "a function call", ast.Name: "a bare name", ast.BinOp: "an arithmetic expression",
            ast.Attribute: "an attribute access", ast.Lambda: "a lambda"}.get(type(node), "an expression")
    raise CallParseError(
        f"arguments must be literal values (text in quotes, numbers, true/false, lists), not {what}; "
        'write text and formulas in quotes, e.g. expression="3*4"'
    )


def _refusal(value: Any) -> str | None:
    """Why parsed arguments cannot be used (nested deeper than MAX_NESTING, an integer longer than
    MAX_INT_DIGITS), or None. Checked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _INT_LIMIT:
            return (f"a number in the arguments has more than {MAX_INT_DIGITS} digits; "
                    "write it in quotes as text if you need it")
        if isinstance(item, (list, dict)):
            if depth > MAX_NESTING:
                return "the arguments are nested too deeply"
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return None


def scrub_surrogates(text: str) -> str:
    """`text` with U+FFFD in place of each lone surrogate (same length, so positions still hold)."""
    return _SURROGATE.sub("\ufffd", text)


def _clean(value: Any) -> Any:
    """`value` with U+FFFD for every lone surrogate in its strings (keys included). Call only on
    values already checked by _refusal: it recurses."""
    if isinstance(value, str):
        return scrub_surrogates(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _scan_call_end(text: str, open_paren: int, stop: int) -> int | None:
    """Index just after the parenthesis that closes `open_paren`, skipping quoted strings; None
    when it is not closed before index `stop`."""
    depth = 0
    quote: str | None = None
    i = open_paren
    while i < min(len(text), stop):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _parse_python_call(text: str, start: int, open_paren: int) -> ParsedCall | None:
    end = _scan_call_end(text, open_paren, start + MAX_CALL_CHARS)
    if end is None:
        if len(text) < start + MAX_CALL_CHARS:
            return None  # not closed yet (still streaming) or never closed
        # Not closed within the limit: too long whatever follows (and scanning on would make
        # text with thousands of open calls quadratic). The error ends the reply there.
        raise CallParseError(f"the call is too long (over {MAX_CALL_CHARS} characters)", start + MAX_CALL_CHARS)
    source = text[start:end]
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        msg = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise CallParseError(f"the call `{source[:120]}` is not valid syntax ({msg})", end) from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise CallParseError(f"`{source[:120]}` is not a plain function call", end)
    try:
        positional = [_literal(a) for a in call.args]
        arguments: dict[str, Any] = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise CallParseError("`**` arguments are not allowed; name each argument", end)
            arguments[kw.arg] = _literal(kw.value)
    except CallParseError as exc:
        raise CallParseError(str(exc), end) from None
    except RecursionError:
        raise CallParseError("the call's arguments are nested too deeply", end) from None
    refusal = _refusal([positional, arguments])
    if refusal:
        raise CallParseError(f"{call.func.id}: {refusal}", end)
    return ParsedCall(call.func.id, _clean(arguments), _clean(positional), end)


def _parse_json_call(text: str, start: int) -> ParsedCall | None:
    if len(text) - start > MAX_CALL_CHARS * 4:
        text = text[: start + MAX_CALL_CHARS * 4]
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):  # ValueError: also integers over Python's 4300-digit limit
        return None
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    name = _clean(obj["name"])
    arguments = next((obj[k] for k in ("arguments", "parameters", "args") if k in obj), {})
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            raise CallParseError(f"the arguments of {name} are not valid JSON", end) from None
    if not isinstance(arguments, dict):
        raise CallParseError(f"the arguments of {name} must be an object of named values", end)
    refusal = _refusal(arguments)
    if refusal:
        raise CallParseError(f"{name}: {refusal}", end)
    return ParsedCall(name, _clean(arguments), [], end)


def parse_call(text: str, known_names: list[str] | None = None) -> ParsedCall:
    """The first call in `text`. With `known_names`, a Python-style call must use one of them
    (prose such as "the sum (a+b)" then is not mistaken for a call)."""
    tagged = _TAG.search(text)
    offset = 0
    if tagged:
        offset = tagged.start(1)
        text_part = tagged.group(1)
    else:
        text_part = text
    folded = {n.lower().replace("_", "") for n in known_names or []}
    candidates = heapq.merge(  # lazily, in text order: a huge reply never becomes a huge list
        ((m.start(), "py") for m in _NAME_CALL.finditer(text_part)),
        ((m.start(), "json") for m in re.finditer(r"[\[{]", text_part)),
    )
    first_error: CallParseError | None = None
    attempts = 0
    for start, kind in candidates:
        if kind == "py":
            match = _NAME_CALL.match(text_part, start)
            assert match is not None
            if known_names is not None and match.group(1).lower().replace("_", "") not in folded:
                continue
        attempts += 1
        if attempts > MAX_CANDIDATES:
            break
        try:
            if kind == "py":
                parsed = _parse_python_call(text_part, start, match.end() - 1)
            else:
                parsed = _parse_json_call(text_part, start)
        except CallParseError as exc:
            if exc.end is not None:
                exc.end += offset
            first_error = first_error or exc
            continue
        if parsed is not None:
            parsed.end += offset
            return parsed
    if first_error:
        raise first_error
    raise CallParseError("no function call found in the reply")


def call_end(text: str, known_names: list[str] | None = None) -> int | None:
    """Where a finished call, well-formed or not, ends in streamed text (so generation can stop
    there and the error can be reported at once), else None."""
    try:
        return parse_call(text, known_names).end
    except CallParseError as exc:
        return exc.end
