"""Built-in tools that can run for long (sympy) called in worker processes that can be killed.

A thread cannot be stopped: a sympy call past its time limit would keep a core busy for minutes
(`solve_equation("abs(x)+x**3=1")` does), slowing every chain after it. So `Tool.call` hands an
isolated tool's call to an idle worker (`python -m fcapp.tools.worker`, one JSON line in, one out)
and, when the call runs past its limit, kills that worker; the next call gets a fresh one. Workers
are started on demand, one per concurrent call, and kept for reuse; their memory is capped
(RLIMIT_AS), and one that has grown past RECYCLE_RSS_BYTES after a call is ended, which frees it.

Only trusted, importable functions (`module:qualname`, or a functools.partial of one binding
keyword arguments, such as a problem's premises) run here; model text reaches them only as
validated arguments, exactly as in-process.
"""

from __future__ import annotations

import functools
import importlib
import json
import resource
import subprocess
import sys
import threading
from typing import Any, Callable

MEMORY_LIMIT_BYTES = 2 * 2**30  # address space of a worker: a runaway expansion fails, the app does not
RECYCLE_RSS_BYTES = 512 * 2**20  # a worker resident past this after a call is ended rather than kept
# How a tool fails on bad input besides ToolError, in a worker or not: reported as "<tool> failed: ...".
# A worker reports any other exception too (named), since a built-in tool should not raise it.
EXPECTED_FAILURES = (ValueError, TypeError, ArithmeticError, OverflowError, RecursionError, MemoryError)


class WorkerError(Exception):
    """A call in a worker failed; `tool_error` says whether the tool refused as designed (ToolError)."""

    def __init__(self, message: str, tool_error: bool) -> None:
        super().__init__(message)
        self.tool_error = tool_error


class _Worker:
    """One worker process: send a call, read its reply within a time limit."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fcapp.tools.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", close_fds=True,
        )
        self.reply: dict[str, Any] | None = None

    def call(self, ref: str, arguments: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The reply, or None when it did not come within timeout_s (the caller kills this worker)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"fn": ref, "args": arguments}) + "\n")
        self.process.stdin.flush()
        self.reply = None
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        return None if reader.is_alive() else self.reply

    def _read(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.reply = json.loads(line) if line else {"error": "the worker process died", "tool_error": False}

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def resident_bytes(self) -> int:
        """Its resident memory (Linux /proc; 0 where that cannot be read)."""
        try:
            with open(f"/proc/{self.process.pid}/statm") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize()
        except (OSError, IndexError, ValueError):
            return 0


class WorkerPool:
    """Idle workers, taken one per call (so concurrent calls run side by side) and returned after."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., Any], arguments: dict[str, Any], timeout_s: float) -> Any:
        """fn(**arguments) in a worker. Raises TimeoutError (the worker is killed) or WorkerError."""
        if isinstance(fn, functools.partial):
            fn, arguments = fn.func, {**fn.keywords, **arguments}
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        worker = worker if worker and worker.process.poll() is None else _Worker()
        reply = worker.call(f"{fn.__module__}:{fn.__qualname__}", arguments, timeout_s)  # what the worker imports
        if reply is None or worker.resident_bytes() > RECYCLE_RSS_BYTES:
            worker.kill()
        else:
            with self._lock:
                self._idle.append(worker)
        if reply is None:
            raise TimeoutError
        if "error" in reply:
            raise WorkerError(reply["error"], reply["tool_error"])
        return reply["result"]


POOL = WorkerPool()


# ---- the worker's side ------------------------------------------------------------------------
def _run(request: dict[str, Any]) -> dict[str, Any]:
    from fcapp.tools.base import ToolError

    module, _, name = request["fn"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        return {"result": fn(**request["args"])}
    except ToolError as exc:
        return {"error": str(exc), "tool_error": True}
    except EXPECTED_FAILURES as exc:
        return {"error": str(exc) or type(exc).__name__, "tool_error": False}
    except Exception as exc:  # noqa: BLE001 - reported, the worker lives on
        return {"error": f"{type(exc).__name__}: {exc}", "tool_error": False}


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    replies, sys.stdout = sys.stdout, sys.stderr  # a stray print cannot break the protocol
    for line in sys.stdin:
        replies.write(json.dumps(_run(json.loads(line)), ensure_ascii=False, default=str) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
