"""Child-process entry point of the sandbox (see fcapp/tools/sandbox.py for the whole picture).

Run as a script with `python -I` (stdlib only, nothing from fcapp, so startup stays ~20 ms). Reads one
JSON request from stdin: {"source", "function", "arguments", "cpu_s", "memory_bytes", "file_bytes",
"processes", "drop_to"}. First switches to the unprivileged uid/gid `drop_to` when given (a root
app's sandbox), then sets its own resource limits (doing it here rather than in a `preexec_fn`
keeps the parent fork-safe when it has threads), then runs the user's function. Fd 1 is re-pointed at the output pipe
(fd 2) so that user prints cannot corrupt the reply; the one JSON reply line goes to a private copy
of the original fd 1:
    {"ok": true, "value": ...}   or   {"ok": false, "type": "...", "message": "...", "line": N|null}
A crash (signal) or an early exit sends no reply; the parent reads the exit status instead, and
faulthandler's dump on stderr tells it which user line was running.
"""

import faulthandler
import json
import os
import resource
import runpy
import signal
import sys

USER_FILE = os.path.abspath("user_function.py")  # in the child's own empty temp folder (sandbox._USER_FILE)
MAX_MESSAGE_CHARS = 500
# Sent when even describing a failure runs out of memory.
_OUT_OF_MEMORY = b'{"ok": false, "type": "MemoryError", "message": "", "line": null}\n'


def _set_limit(kind: int, soft: int, hard: int) -> None:
    """Lower a limit, never above the hard limit this process inherited (raising it would fail)."""
    _, inherited = resource.getrlimit(kind)
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(kind, (soft, hard))


def _user_line(tb) -> int | None:
    """The deepest traceback line inside the user's source."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == USER_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _run(request: dict) -> bytes:
    """Execute the source, call the function, and encode the reply (value or exception)."""
    try:
        with open(USER_FILE, "w", encoding="utf-8") as source:
            source.write(request["source"])
        namespace = runpy.run_path(USER_FILE, run_name="__user__")  # run the user's file as a module
        value = namespace[request["function"]](**request["arguments"])
        try:
            text = json.dumps({"ok": True, "value": value}, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):  # not JSON-serialisable: the model reads str()
            text = json.dumps({"ok": True, "value": str(value)}, ensure_ascii=False)
    except Exception as exc:
        line = _user_line(exc.__traceback__)
        exc.__traceback__ = None  # free the user's frames (a memory bomb's data) before describing
        try:
            message = str(exc)[:MAX_MESSAGE_CHARS]
        except Exception:
            message = "(the exception's message could not be shown)"
        text = json.dumps({"ok": False, "type": type(exc).__name__, "message": message, "line": line})
    return text.encode("utf-8", "replace") + b"\n"


def _drop_privileges(uid: int, gid: int) -> None:
    """Become `uid` for good: no supplementary groups, and (leaving uid 0) no capabilities."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    if request["drop_to"]:
        _drop_privileges(*request["drop_to"])
    _set_limit(resource.RLIMIT_NPROC, request["processes"], request["processes"])
    _set_limit(resource.RLIMIT_CPU, request["cpu_s"], request["cpu_s"] + 1)
    _set_limit(resource.RLIMIT_AS, request["memory_bytes"], request["memory_bytes"])
    _set_limit(resource.RLIMIT_FSIZE, request["file_bytes"], request["file_bytes"])
    _set_limit(resource.RLIMIT_CORE, 0, 0)
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # keep what was printed before a crash
    faulthandler.enable()
    faulthandler.register(signal.SIGXCPU, chain=True)  # name the looping line, then die of SIGXCPU
    try:
        reply = _run(request)
    except MemoryError:
        reply = _OUT_OF_MEMORY
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the user may have closed or replaced it; the reply matters more
            pass
    view = memoryview(reply)
    while view:
        view = view[os.write(reply_fd, view) :]
    os._exit(0)  # skip atexit hooks and non-daemon threads the user may have left behind


if __name__ == "__main__":
    main()
