"""User-written tools: Python source typed in the browser, turned into a Tool that runs in a child process.

`define_user_tool(source)` never executes the source in the app process: it parses and compiles it,
reads the schema from the function's annotations and docstring in the syntax tree, and checks the
examples against that schema. Each call then starts `python -I _sandbox_worker.py`

- inside the OS sandbox of fcapp.tools.namespaces (bubblewrap: own PID, network and mount
  namespaces, a read-only view of the interpreter and libraries, an empty private /tmp as its
  working folder, no network, an unprivileged uid, nothing of the app's files or environment),
- with a CPU-time limit (RLIMIT_CPU), an address-space limit (RLIMIT_AS), a file-size limit
  (RLIMIT_FSIZE), a process limit (RLIMIT_NPROC) and no core dumps,
- under a wall-time limit: the sandbox is killed when it runs out, and every process in it with it,
- with no inherited file descriptors besides its three pipes and a scrubbed environment,
- with capped output: prints beyond `output_bytes` or a reply beyond `result_bytes` kill the child, so
  a runaway print cannot fill the app's memory.

Every failure (exception, crash, exit, limit) becomes a ToolError naming the cause and the user's
line, and the app process is unaffected. Where the machine has no namespaces, calls are refused
unless the operator opted in; then the child runs with the limits above but outside any sandbox
(as the app's user, in a temporary folder): that protects the app from mistakes, not from hostile
code. POSIX only (resource limits, process groups).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from fcapp.tools import namespaces
from fcapp.tools.base import SchemaError, Tool, ToolError, tool_from_function

_USER_FILE = "user_function.py"  # the file the worker writes the source to, in its own temp folder
MAX_SOURCE_CHARS = 100_000
# Added to the wall limit for Tool.timeout_s, so the sandbox's own, clearer message wins the race.
_TIMEOUT_MARGIN_S = 2.0
# faulthandler's dump after a crash or a CPU-limit kill: names the user line, not shown verbatim.
_FAULT_DUMP = re.compile(r"^(Fatal Python error:|Current thread 0x|Thread 0x|Stack \(most recent call first\))", re.M)
_FAULT_LINE = re.compile(rf'File "[^"]*/{re.escape(_USER_FILE)}", line (\d+)')
# What an annotation's (dotted) name evaluates to; anything else is refused before tool_from_function sees it.
_HINT_NAMES: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "list": list, "List": typing.List, "typing.List": typing.List,
}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits of a sandboxed function. The defaults suit small reasoning-step functions."""

    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU takes whole seconds)
    wall_s: float = 10.0  # elapsed seconds, Python startup included
    memory_bytes: int = 512 * 2**20  # address space; imports such as numpy fit comfortably
    output_bytes: int = 64 * 1024  # what the function prints (stdout + stderr)
    result_bytes: int = 64 * 1024  # the JSON-encoded return value
    file_bytes: int = 16 * 2**20  # largest file it may write; in the OS sandbox, all its files together
    processes: int = 16  # RLIMIT_NPROC: processes and threads of the sandbox's user

    def __post_init__(self) -> None:
        if not isinstance(self.cpu_s, int) or self.cpu_s < 1:
            raise ValueError("cpu_s must be a whole number of seconds >= 1")
        if min(self.wall_s, self.memory_bytes, self.output_bytes, self.result_bytes, self.file_bytes,
               self.processes) <= 0:
            raise ValueError("sandbox limits must be positive")


@dataclass(frozen=True)
class SandboxedFunction:
    """The `fn` of a user tool: calling it runs `function` from `source` in a fresh child process."""

    source: str
    function: str
    limits: SandboxLimits = SandboxLimits()

    def __call__(self, **arguments: Any) -> Any:
        refusal = namespaces.refusal()
        if refusal:
            raise ToolError(f"{self.function}: {refusal}")
        sandboxed = namespaces.unavailable() is None
        request = {
            "source": self.source,
            "function": self.function,
            "arguments": arguments,
            "cpu_s": self.limits.cpu_s,
            "memory_bytes": self.limits.memory_bytes,
            "file_bytes": self.limits.file_bytes,
            "processes": self.limits.processes,
            "drop_to": namespaces.drop_to() if sandboxed else None,
        }
        folder = nullcontext("/tmp") if sandboxed else tempfile.TemporaryDirectory(prefix="fcapp-sandbox-",
                                                                                 ignore_cleanup_errors=True)
        with folder as cwd:
            if sandboxed:  # /tmp inside the sandbox: its own tmpfs
                argv = [*namespaces.command(self.limits.file_bytes), sys.executable, "-I", namespaces.WORKER_INSIDE]
            else:
                argv = [sys.executable, "-I", namespaces.WORKER]
            try:
                child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd="/" if sandboxed else cwd, env=namespaces.child_env(cwd), close_fds=True,
                                         start_new_session=True)
            except OSError as exc:
                raise ToolError(f"{self.function}: could not start the sandbox: {exc}") from None
            with child:
                try:
                    reply, output, stopped = _exchange(child, json.dumps(request).encode(), self.limits)
                finally:
                    _kill_group(child.pid)
        returncode = child.returncode
        if sandboxed and returncode > 128:  # bwrap exits with 128 + n when its child died of signal n
            returncode = 128 - returncode
        return self._outcome(reply, output, stopped, returncode)

    def _outcome(self, reply: bytes, output: bytes, stopped: str | None, returncode: int) -> Any:
        """The returned value, or a ToolError saying what went wrong and where."""
        name, limits = self.function, self.limits
        if stopped == "wall":
            raise ToolError(f"{name} took longer than {limits.wall_s:g} s and was stopped")
        if stopped == "output":
            raise ToolError(f"{name} printed more than {_size(limits.output_bytes)} of output and was stopped")
        if stopped == "result":
            raise ToolError(f"{name} returned a result larger than {_size(limits.result_bytes)}")
        if reply:
            try:
                answer = json.loads(reply)
            except ValueError:
                raise ToolError(f"{name} sent back an unreadable result") from None
            if answer["ok"]:
                return answer["value"]
            raise ToolError(self._describe_exception(answer))
        printed, dump = _split_fault_dump(output.decode("utf-8", "replace"))
        found = _FAULT_LINE.search(dump)
        where = self._where(int(found.group(1)) if found else None)
        if returncode < 0:
            sig = signal.Signals(-returncode)
            if sig == signal.SIGXCPU:
                message = f"{name} used more than {limits.cpu_s} s of CPU time and was stopped{where}"
            else:
                message = f"{name} crashed with signal {sig.name}{where}"
        elif "MemoryError" in printed:
            message = f"{name} ran out of memory (limit {_size(limits.memory_bytes)})"
        else:
            message = f"{name} exited with status {returncode} before returning"
        printed = printed.strip()
        if printed:
            tail = printed if len(printed) <= 300 else "..." + printed[-300:]
            message += f"; its last output: {tail}"
        raise ToolError(message)

    def _describe_exception(self, answer: dict[str, Any]) -> str:
        kind, text = answer["type"], answer["message"]
        where = self._where(answer["line"])
        if kind == "MemoryError":
            return f"{self.function} ran out of memory (limit {_size(self.limits.memory_bytes)}){where}"
        message = f"{self.function} raised {kind}: {text}{where}" if text else f"{self.function} raised {kind}{where}"
        if kind == "ModuleNotFoundError":
            message += " (only modules installed alongside the app can be imported)"
        return message

    def _where(self, line: int | None) -> str:
        """` at line 3: `return a / b``, or nothing when the line is unknown."""
        lines = self.source.splitlines()
        if line is None or not 1 <= line <= len(lines):
            return ""
        return f" at line {line}: `{lines[line - 1].strip()}`"


def define_user_tool(
    source: str,
    examples: list[dict[str, Any]] | None = None,
    name: str | None = None,
    limits: SandboxLimits | None = None,
) -> Tool:
    """Turn user source into a sandboxed Tool without running it here. Raises SchemaError.

    The source must define exactly one top-level function, or several with `name` picking the one
    to expose (the others are helpers). Its annotations (str, int, float, bool, list[...],
    Literal[...]) and Google-style docstring give the schema, exactly as `tool_from_function`
    would from the live function; the examples must fit it.
    """
    limits = limits or SandboxLimits()
    if len(source) > MAX_SOURCE_CHARS:
        raise SchemaError(f"the source is too long ({len(source)} characters, limit {MAX_SOURCE_CHARS})")
    try:
        tree = ast.parse(source, _USER_FILE)
        compile(tree, _USER_FILE, "exec")  # catches what only the compiler sees ('return' outside function)
    except SyntaxError as exc:
        lines = source.splitlines()
        text = (exc.text or (lines[exc.lineno - 1] if exc.lineno and exc.lineno <= len(lines) else "")).strip()
        code = f": `{text}`" if text else ""
        line = exc.lineno or (source[:source.find("\x00")].count("\n") + 1 if "\x00" in source else None)
        where = f" on line {line}" if line else ""  # a NUL byte comes without a line number
        raise SchemaError(f"syntax error{where}: {exc.msg}{code}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise SchemaError(f"the source cannot be parsed: {exc}") from None
    node = _pick_function(tree, name)
    stub = _signature_stub(node)
    built = tool_from_function(stub, examples, timeout_s=limits.wall_s + _TIMEOUT_MARGIN_S)
    return dataclasses.replace(built, fn=SandboxedFunction(source, node.name, limits))


def try_call(tool: Tool, arguments: Any) -> tuple[bool, str, float]:
    """Call any tool the way the agent would, for the UI's try-call button: (ok, text, seconds)."""
    start = time.perf_counter()
    try:
        ok, text = True, tool.call(arguments)
    except ToolError as exc:
        ok, text = False, str(exc)
    return ok, text, time.perf_counter() - start


def _pick_function(tree: ast.Module, name: str | None) -> ast.FunctionDef:
    """The top-level function to expose: the only one, or the one called `name`."""
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = ", ".join(d.name for d in defs)
    if name is not None:
        chosen = [d for d in defs if d.name == name]
        if not chosen:
            raise SchemaError(f"no top-level function named {name!r}" + (f"; found: {found}" if defs else ""))
        node = chosen[-1]  # a redefinition wins, as it does when the module runs
    elif not defs:
        raise SchemaError("the source defines no function; write one with `def name(arg: type) -> type:`")
    elif len(defs) > 1:
        raise SchemaError(f"the source defines {len(defs)} top-level functions ({found}); say which one to expose")
    else:
        node = defs[0]
    if isinstance(node, ast.AsyncFunctionDef):
        raise SchemaError(f"{node.name}: async functions are not supported; use a plain def")
    if node.decorator_list:
        raise SchemaError(f"{node.name}: decorators are not supported (the schema is read from the plain def)")
    if node.args.posonlyargs:
        raise SchemaError(f"{node.name}: positional-only arguments are not supported; arguments are passed by name")
    return node


def _signature_stub(node: ast.FunctionDef) -> Any:
    """A never-called function with the user's name, docstring, signature and type hints.

    Handing it to `tool_from_function` keeps one implementation of the schema rules, the checks and
    their error messages. Default values are not evaluated: only their presence matters.
    """
    args = node.args
    P = inspect.Parameter
    params: list[inspect.Parameter] = []
    annotations: dict[str, Any] = {}
    plain_defaults = [P.empty] * (len(args.args) - len(args.defaults)) + [...] * len(args.defaults)
    for arg, default in zip(args.args, plain_defaults):
        params.append(P(arg.arg, P.POSITIONAL_OR_KEYWORD, default=default))
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(P(arg.arg, P.KEYWORD_ONLY, default=P.empty if default is None else ...))
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    for arg in args.args + args.kwonlyargs:
        if arg.annotation is not None:
            annotations[arg.arg] = _hint(arg.annotation, f"{node.name}({arg.arg})")

    def stub(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the signature stub of a user tool is never called")

    stub.__name__ = stub.__qualname__ = node.name
    stub.__doc__ = ast.get_docstring(node)
    stub.__annotations__ = annotations
    stub.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return stub


def _hint(node: ast.expr, where: str) -> Any:
    """The typing object an annotation would evaluate to, read from the syntax tree alone."""
    unsupported = SchemaError(
        f"{where}: unsupported type {ast.unparse(node)!r} (use str, int, float, bool, list[...] or Literal)"
    )
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        try:
            return _hint(ast.parse(node.value, mode="eval").body, where)
        except SyntaxError:
            raise unsupported from None
    if _dotted(node) in _HINT_NAMES:
        return _HINT_NAMES[_dotted(node)]
    if isinstance(node, ast.Subscript):
        head = _dotted(node.value)
        if head in ("list", "List", "typing.List"):
            return list[_hint(node.slice, where)]  # type: ignore[misc]
        if head in ("Literal", "typing.Literal"):
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if not all(isinstance(i, ast.Constant) and isinstance(i.value, (str, int, bool)) for i in items):
                raise SchemaError(f"{where}: Literal[...] takes plain strings or numbers, got {ast.unparse(node)!r}")
            return typing.Literal[tuple(i.value for i in items)]  # type: ignore[misc]
    raise unsupported


def _dotted(node: ast.expr) -> str:
    """`typing.List` -> "typing.List"; anything that is not a dotted name -> ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def _exchange(child: subprocess.Popen, request: bytes, limits: SandboxLimits) -> tuple[bytes, bytes, str | None]:
    """Send the request, collect reply and output under caps and the wall limit.

    Returns (reply, output, stopped) where stopped is None, "wall", "output" or "result"; on a stop
    the child is still running and the caller kills it.
    """
    assert child.stdin and child.stdout and child.stderr
    deadline = time.monotonic() + limits.wall_s
    stdin, stdout, stderr = child.stdin.fileno(), child.stdout.fileno(), child.stderr.fileno()
    caps = {stdout: (limits.result_bytes, "result"), stderr: (limits.output_bytes, "output")}
    received = {stdout: bytearray(), stderr: bytearray()}
    pending = memoryview(request)
    os.set_blocking(stdin, False)
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        selector.register(stdout, selectors.EVENT_READ)
        selector.register(stderr, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(received[stdout]), bytes(received[stderr]), "wall"
            events = selector.select(min(remaining, 0.1))
            if not events and _has_exited(child.pid):
                _kill_group(child.pid)  # leftover grandchildren hold the pipes open; end them
            for key, _ in events:
                if key.fd == stdin:
                    try:
                        pending = pending[os.write(stdin, pending[:65536]) :]
                    except BrokenPipeError:  # the child died early; its exit status tells why
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stdin)
                        child.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                received[key.fd] += data
                cap, what = caps[key.fd]
                if len(received[key.fd]) > cap:
                    return bytes(received[stdout]), bytes(received[stderr]), what
    return bytes(received[stdout]), bytes(received[stderr]), None


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its process group id stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    """SIGKILL the child's whole process group (it leads a session of its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _split_fault_dump(output: str) -> tuple[str, str]:
    """(what the function printed, faulthandler's dump after a crash)."""
    found = _FAULT_DUMP.search(output)
    return (output[: found.start()], output[found.start() :]) if found else (output, "")


def _size(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n / 1024:g} KB" if n >= 1024 else f"{n} bytes"
