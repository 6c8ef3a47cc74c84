"""Tools: a Python callable + a JSON schema (derived from its type hints and docstring) + call examples.

The schema follows the OpenAI / Hugging Face function format so the same object can be sent to an
HTTP teacher, rendered into a small model's prompt, and stored in a TRL `tools` column.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from fcapp.tools.worker import EXPECTED_FAILURES, POOL, WorkerError

# Every argument string a model sends is capped: tools never see megabyte inputs.
MAX_ARGUMENT_CHARS = 4000
# Longest a built-in tool may run before the call becomes an error step.
CALL_TIMEOUT_S = 5.0
# Longest result text fed back to the model.
MAX_RESULT_CHARS = 2000

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolError(Exception):
    """A failure the model should see as a clear error message (bad arguments, bad input, timeout)."""


class SchemaError(ValueError):
    """A function cannot be turned into a tool (missing hints, unsupported types, no docstring)."""


@dataclass
class Tool:
    """A callable the agent may invoke, with its schema and example calls (argument dicts)."""

    name: str
    fn: Callable[..., Any]
    description: str
    parameters: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    timeout_s: float = CALL_TIMEOUT_S
    isolated: bool = False  # run in a killable worker process (a module-level function that may run long)

    def schema(self) -> dict[str, Any]:
        """The OpenAI / HF `tools` entry for this function."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def signature(self) -> str:
        """`Name(a: float, b: str)`: the form the prompt shows."""
        props = self.parameters.get("properties", {})
        args = ", ".join(f"{arg}: {spec.get('type', 'any')}" for arg, spec in props.items())
        return f"{self.name}({args})"

    def render_call(self, arguments: dict[str, Any]) -> str:
        return render_call(self.name, arguments)

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check arguments against the schema; return them coerced (e.g. "3" -> 3 for an integer)."""
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name} expects named arguments, got {type(arguments).__name__}")
        props = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolError(f"{self.name} has no argument(s) {', '.join(unknown)}; signature: {self.signature()}")
        missing = [a for a in self.parameters.get("required", []) if a not in arguments]
        if missing:
            raise ToolError(f"{self.name} is missing argument(s) {', '.join(missing)}; signature: {self.signature()}")
        return {name: _coerce(self.name, name, value, props[name]) for name, value in arguments.items()}

    def call(self, arguments: Any) -> str:
        """Validate, run with a time limit, and return the result as text. Raises ToolError."""
        args = self.validate(arguments)
        try:
            result = self._run_isolated(args) if self.isolated else self._run_in_thread(args)
        except TimeoutError:
            raise ToolError(f"{self.name} took longer than {self.timeout_s:g} s and was stopped") from None
        except ToolError:
            raise
        except WorkerError as exc:
            raise ToolError(str(exc) if exc.tool_error else f"{self.name} failed: {exc}") from None
        except EXPECTED_FAILURES as exc:
            raise ToolError(f"{self.name} failed: {str(exc) or type(exc).__name__}") from None  # some have no message
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + " ...[truncated]"
        return text

    def _run_isolated(self, args: dict[str, Any]) -> Any:
        """In a worker process, killed if it runs past the limit (see fcapp.tools.worker)."""
        return POOL.call(self.fn, args, self.timeout_s)

    def _run_in_thread(self, args: dict[str, Any]) -> Any:
        """In a daemon thread, not an executor's: a call past its limit cannot be killed and runs on,
        but it must not hold up the process's exit, as executor threads do (they are joined at exit)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(self.fn(**args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                future.set_exception(exc)

        threading.Thread(target=run, name=f"tool-{self.name}", daemon=True).start()
        return future.result(timeout=self.timeout_s)


def render_call(name: str, arguments: dict[str, Any]) -> str:
    """Python-call syntax with literal arguments: `name(a=2, b="x")` (what the prompt teaches)."""
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in arguments.items())
    return f"{name}({args})"


def _coerce(tool: str, arg: str, value: Any, spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    where = f"{tool}: argument {arg}"
    if kind == "string":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ToolError(f"{where} must be a string, got {type(value).__name__}")
        if len(value) > MAX_ARGUMENT_CHARS:
            raise ToolError(f"{where} is too long ({len(value)} characters, limit {MAX_ARGUMENT_CHARS})")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"{where} must be one of {spec['enum']}, got {value!r}")
        return value
    if kind in ("integer", "number"):
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}(\.\d{1,30})?\s*", value):
            value = float(value) if "." in value else int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            article = "an" if kind == "integer" else "a"
            raise ToolError(f"{where} must be {article} {kind}, got {type(value).__name__}")
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                raise ToolError(f"{where} must be an integer, got {value}")
            return int(value)
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ToolError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "array":
        if not isinstance(value, list):
            raise ToolError(f"{where} must be a list, got {type(value).__name__}")
        if len(value) > 100:
            raise ToolError(f"{where} has too many items ({len(value)}, limit 100)")
        item = spec.get("items", {})
        return [_coerce(tool, f"{arg}[{i}]", v, item) for i, v in enumerate(value)] if item else value
    return value


def _json_type(hint: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return {"type": "array", "items": _json_type(item, where)}
    if origin is typing.Literal:
        values = list(typing.get_args(hint))
        return {"type": "string", "enum": [str(v) for v in values]}
    raise SchemaError(f"{where}: unsupported type {hint!r} (use str, int, float, bool, list[...] or Literal)")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {argument: description})."""
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    args: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for line in lines:
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args and stripped.lower() in ("returns:", "raises:", "examples:", "example:"):
            in_args = False
            current = None
            continue
        if in_args:
            m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m:
                current = m.group(1)
                args[current] = m.group(3).strip()
            elif current and stripped:
                args[current] += " " + stripped
        elif not args and current is None and stripped and not stripped.lower().startswith(("returns:", "raises:")):
            description.append(stripped)
    return " ".join(description).strip(), args


def tool_from_function(
    fn: Callable[..., Any],
    examples: list[dict[str, Any]] | None = None,
    name: str | None = None,
    timeout_s: float = CALL_TIMEOUT_S,
    isolated: bool = False,
) -> Tool:
    """Build a Tool from a typed, documented function. Raises SchemaError with a clear message."""
    tool_name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", tool_name):
        raise SchemaError(f"invalid function name {tool_name!r}")
    if not fn.__doc__ or not fn.__doc__.strip():
        raise SchemaError(f"{tool_name}: add a docstring; it becomes the description the model reads")
    description, arg_docs = parse_docstring(fn.__doc__)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a hint that does not resolve is a user error, shown as such
        raise SchemaError(f"{tool_name}: cannot read type hints: {exc}") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise SchemaError(f"{tool_name}: *args/**kwargs are not supported; name every argument")
        if param.name not in hints:
            raise SchemaError(f"{tool_name}: argument {param.name!r} needs a type hint")
        spec = _json_type(hints[param.name], f"{tool_name}({param.name})")
        if param.name in arg_docs:
            spec["description"] = arg_docs[param.name]
        properties[param.name] = spec
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    built = Tool(tool_name, fn, description, parameters, list(examples or []), timeout_s, isolated)
    for example in built.examples:
        try:
            built.validate(example)
        except ToolError as exc:
            raise SchemaError(f"{tool_name}: example {example!r} does not fit the signature: {exc}") from None
    return built


class Registry:
    """The functions one task exposes, in prompt order, each enabled or disabled."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        self._disabled: set[str] = set()
        for t in tools or []:
            self.add(t)

    def add(self, new: Tool) -> None:
        self._tools[new.name] = new

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.get(name)
        (self._disabled.discard if enabled else self._disabled.add)(name)

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            raise ToolError(f"unknown function {name!r}; available: {', '.join(self.names())}")
        return self._tools[name]

    def enabled(self) -> list[Tool]:
        return [t for n, t in self._tools.items() if n not in self._disabled]

    def names(self) -> list[str]:
        return [t.name for t in self.enabled()]

    def lookup(self, name: str) -> Tool:
        """Find an enabled tool, forgiving case and underscores (small models drift on both)."""
        if name in self._tools and name not in self._disabled:
            return self._tools[name]
        folded = {t.name.lower().replace("_", ""): t for t in self.enabled()}
        hit = folded.get(name.lower().replace("_", ""))
        if hit is None:
            raise ToolError(f"unknown function {name!r}; available: {', '.join(self.names())}")
        return hit

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.enabled()]

    def __iter__(self):
        return iter(self.enabled())

    def __len__(self) -> int:
        return len(self.enabled())
