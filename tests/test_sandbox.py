"""User-written tools: schema from source without running it, and every failure mode of the child."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fcapp.tools import namespaces, sandbox
from fcapp.tools.base import SchemaError, Tool, ToolError, tool_from_function
from fcapp.tools.sandbox import SandboxedFunction, SandboxLimits, define_user_tool, try_call

# Small limits keep the suite fast; the timeout tests take about 1 s each. The wall limit leaves a
# busy machine room to reach the CPU limit first.
LIMITS = SandboxLimits(cpu_s=1, wall_s=5.0, memory_bytes=256 * 2**20, output_bytes=8 * 1024, result_bytes=8 * 1024)

DOUBLE = '''
def double(x: int) -> int:
    """Double a number.

    Args:
        x: the number
    """
    return 2 * x
'''


def user_tool(body: str, signature: str = "x: int = 1", limits: SandboxLimits = LIMITS) -> Tool:
    """A one-function user tool named f whose body is `body` (indented by four spaces)."""
    source = f'def f({signature}):\n    """Try something."""\n' + body
    return define_user_tool(source, limits=limits)


@pytest.fixture(scope="module")
def double():
    return define_user_tool(DOUBLE, examples=[{"x": 2}], limits=LIMITS)


def assert_still_works(double) -> None:
    """After any failure, the app process keeps calling sandboxed tools normally."""
    assert double.call({"x": 21}) == "42"


# --- schema from source ---------------------------------------------------------------------------

TYPED = '''
from typing import List, Literal
import typing


def describe(name: str, count: int, ratio: float, flag: bool, values: list[float],
             tags: List[str], mode: Literal["fast", "exact"] = "fast", quoted: "list[int]" = (),
             *, verbose: bool = False, level: typing.Literal[1, 2] = 1) -> str:
    """Describe some values.

    A second paragraph line.

    Args:
        name: who is asking
        count (int): how many
            of them, continued on a second line.
        mode: how hard to try

    Returns:
        A sentence.
    """
    return name
'''


def test_schema_matches_tool_from_function_on_the_live_function() -> None:
    namespace: dict = {}
    exec(TYPED, namespace)  # the test's own code; the sandbox never does this in the app process
    live = tool_from_function(namespace["describe"])
    user = define_user_tool(TYPED)
    assert user.schema() == live.schema()
    params = user.parameters
    assert params["required"] == ["name", "count", "ratio", "flag", "values", "tags"]
    assert params["properties"]["count"] == {"type": "integer", "description": "how many of them, continued on a second line."}
    assert params["properties"]["values"] == {"type": "array", "items": {"type": "number"}}
    assert params["properties"]["tags"]["items"] == {"type": "string"}
    assert params["properties"]["mode"]["enum"] == ["fast", "exact"]
    assert params["properties"]["quoted"] == {"type": "array", "items": {"type": "integer"}}
    assert params["properties"]["verbose"] == {"type": "boolean"}
    assert user.description == "Describe some values. A second paragraph line."
    assert user.name == "describe"
    assert user.signature().startswith("describe(name: string, count: integer")


def test_defining_a_tool_does_not_run_its_source(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = f'open({str(marker)!r}, "w").close()\nraise SystemExit(1)\n' + DOUBLE
    built = define_user_tool(source, limits=LIMITS)
    assert not marker.exists()
    assert isinstance(built.fn, SandboxedFunction) and built.fn.source == source


def test_tool_timeout_is_above_the_sandbox_wall_limit(double) -> None:
    assert double.timeout_s > LIMITS.wall_s


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(SchemaError, match=r"syntax error on line 3: .*`return x \+`"):
        define_user_tool('def f(x: int) -> int:\n    """Doc."""\n    return x +\n')


def test_compile_time_error_names_the_line() -> None:
    with pytest.raises(SchemaError, match="syntax error on line 9: 'return' outside function: `return 1`"):
        define_user_tool(DOUBLE + "return 1\n")


def test_source_without_a_function_is_rejected() -> None:
    with pytest.raises(SchemaError, match="defines no function"):
        define_user_tool("x = 1\n")


def test_two_functions_need_a_name_to_pick_one() -> None:
    source = DOUBLE + '\ndef helper(y: int) -> int:\n    """Help."""\n    return y\n'
    with pytest.raises(SchemaError, match=r"defines 2 top-level functions \(double, helper\)"):
        define_user_tool(source)
    assert define_user_tool(source, name="helper").name == "helper"
    with pytest.raises(SchemaError, match="no top-level function named 'triple'; found: double, helper"):
        define_user_tool(source, name="triple")


def test_helpers_defined_beside_the_chosen_function_are_usable() -> None:
    source = DOUBLE + '\ndef quadruple(y: int) -> int:\n    """Four times."""\n    return double(double(y))\n'
    assert define_user_tool(source, name="quadruple", limits=LIMITS).call({"y": 5}) == "20"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('def f(x):\n    """Doc."""\n', "argument 'x' needs a type hint"),
        ('def f(x: dict):\n    """Doc."""\n', r"f\(x\): unsupported type 'dict'"),
        ('def f(x: list):\n    """Doc."""\n', "unsupported type"),
        ('def f(x: Literal[a]):\n    """Doc."""\n', r"Literal\[...\] takes plain strings or numbers"),
        ('def f(*xs: int):\n    """Doc."""\n', r"\*args/\*\*kwargs are not supported"),
        ('def f(x: int, /):\n    """Doc."""\n', "positional-only arguments are not supported"),
        ("def f(x: int):\n    return x\n", "add a docstring"),
        ('@cache\ndef f(x: int):\n    """Doc."""\n', "decorators are not supported"),
        ('async def f(x: int):\n    """Doc."""\n', "async functions are not supported"),
    ],
    ids=["no-hint", "dict", "bare-list", "literal-name", "varargs", "posonly", "no-docstring", "decorator", "async"],
)
def test_unsupported_definitions_are_rejected_clearly(source: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        define_user_tool(source)


def test_examples_that_do_not_fit_the_signature_are_rejected() -> None:
    with pytest.raises(SchemaError, match=r"example \{'x': 'two'\} does not fit the signature: .*must be an? integer"):
        define_user_tool(DOUBLE, examples=[{"x": 2}, {"x": "two"}])
    with pytest.raises(SchemaError, match="has no argument"):
        define_user_tool(DOUBLE, examples=[{"y": 2}])
    with pytest.raises(SchemaError, match="missing argument"):
        define_user_tool(DOUBLE, examples=[{}])


def test_oversized_source_is_rejected() -> None:
    with pytest.raises(SchemaError, match="too long"):
        define_user_tool(DOUBLE + "#" * sandbox.MAX_SOURCE_CHARS)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="cpu_s"):
        SandboxLimits(cpu_s=0)
    with pytest.raises(ValueError, match="positive"):
        SandboxLimits(wall_s=0)


# --- running in the child -------------------------------------------------------------------------


def test_a_call_runs_in_the_child_and_returns_json_values() -> None:
    tool = user_tool('    import os\n    return {"pid": os.getpid(), "items": [x, 2.5, None, "é"]}\n')
    value = tool.fn(x=3)
    assert value["pid"] != os.getpid()
    assert value["items"] == [3, 2.5, None, "é"]
    assert tool.call({"x": 3}).endswith('"items": [3, 2.5, null, "é"]}')


def test_defaults_apply_in_the_child() -> None:
    assert user_tool("    return x\n", signature="x: int = 7").call({}) == "7"


def test_prints_do_not_corrupt_the_result() -> None:
    assert user_tool("    print('noise', x)\n    return x\n").call({"x": 5}) == "5"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    while True:\n        pass\n", r"^f used more than 1 s of CPU time and was stopped at line [34]: `(while True:|pass)`$"),
        ("    import ctypes\n    return ctypes.string_at(0)\n", r"^f crashed with signal SIGSEGV at line 4: `return ctypes.string_at\(0\)`$"),
        ("    import sys\n    sys.exit(3)\n", r"^f exited with status 3 before returning$"),
        ("    print('almost done')\n    import os\n    os._exit(0)\n", r"^f exited with status 0 before returning; its last output: almost done$"),
        ("    while True:\n        print('spam' * 100)\n", r"^f printed more than 8 KB of output and was stopped$"),
        ("    return 'x' * 100_000\n", r"^f returned a result larger than 8 KB$"),
        ("    return x / 0\n", r"^f raised ZeroDivisionError: division by zero at line 3: `return x / 0`$"),
        ("    raise ValueError\n", r"^f raised ValueError at line 3: `raise ValueError`$"),
        ("    import no_such_module_here\n", r"^f raised ModuleNotFoundError: No module named 'no_such_module_here' at line 3: .*installed"),
        ("    x = bytearray(10**10)\n", r"^f ran out of memory \(limit 256 MB\) at line 3: `x = bytearray\(10\*\*10\)`$"),
        ("    keep = []\n    while True:\n        keep.append(' ' * 10**6)\n", r"^f ran out of memory \(limit 256 MB\) at line 5"),
        ("    return f(x)\n", r"^f raised RecursionError: maximum recursion depth exceeded at line 3"),
    ],
    ids=["cpu-loop", "segfault", "sys-exit", "early-exit-with-output", "huge-print", "huge-result",
         "exception", "bare-exception", "missing-import", "memory-bomb", "memory-growth", "recursion"],
)
def test_each_failure_is_a_clear_tool_error_and_the_app_keeps_working(double, body: str, message: str) -> None:
    # Only the CPU case may meet the 1 s CPU limit: on a busy machine the worker's start-up and a growing list
    # can use 1 s of CPU before they reach 256 MB, and the error would then name the other limit.
    tool = user_tool(body, limits=LIMITS if "CPU" in message else dataclasses.replace(LIMITS, cpu_s=10))
    with pytest.raises(ToolError, match=message):
        tool.call({"x": 1})
    assert_still_works(double)


def test_wall_time_limit_stops_a_sleeping_call(double) -> None:
    tool = user_tool("    import time\n    time.sleep(30)\n", limits=dataclasses.replace(LIMITS, wall_s=1.0))
    with pytest.raises(ToolError, match=r"^f took longer than 1 s and was stopped$"):
        tool.call({})
    assert_still_works(double)


def test_the_deepest_user_line_is_named() -> None:
    source = DOUBLE.replace("return 2 * x", "return helper(x)") + "\n\ndef helper(y):\n    return {}[y]\n"
    with pytest.raises(ToolError, match=r"raised KeyError: 3 at line 12: `return \{\}\[y\]`"):
        define_user_tool(source, name="double", limits=LIMITS).call({"x": 3})


def test_errors_in_top_level_code_are_reported_too(double) -> None:
    tool = define_user_tool("import not_installed_anywhere\n" + DOUBLE, limits=LIMITS)
    with pytest.raises(ToolError, match="ModuleNotFoundError: No module named 'not_installed_anywhere' at line 1"):
        tool.call({"x": 1})
    assert_still_works(double)


def test_non_json_results_are_converted_with_str() -> None:
    assert user_tool("    return {3, 1}\n").call({}) == "{1, 3}"
    assert user_tool("    from fractions import Fraction\n    return [Fraction(1, 3)]\n").call({}) == "[Fraction(1, 3)]"


def test_a_str_that_fails_is_reported() -> None:
    body = "    class Odd:\n        def __str__(self):\n            raise RuntimeError('no text')\n    return Odd()\n"
    with pytest.raises(ToolError, match="raised RuntimeError: no text at line 5"):
        user_tool(body).call({})


def test_wrong_argument_types_are_rejected_before_a_child_starts(double, monkeypatch) -> None:
    def no_child(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_child)
    with pytest.raises(ToolError, match="argument x must be an? integer, got str"):
        double.call({"x": "many"})
    with pytest.raises(ToolError, match="has no argument"):
        double.call({"y": 1})


def test_the_child_does_not_see_the_app_environment(monkeypatch) -> None:
    monkeypatch.setenv("FCAPP_SECRET", "hunter2")
    assert user_tool('    import os\n    return "FCAPP_SECRET" in os.environ\n').fn() is False
    env = user_tool("    import os\n    return dict(os.environ)\n").fn()
    assert "hunter2" not in str(env)
    assert env["HOME"] == env["TMPDIR"]


def test_the_child_works_in_an_empty_private_tmp_of_its_own_each_call() -> None:
    tool = user_tool("    import os\n    listing = os.listdir()\n    open('scratch.txt', 'w').write('x')\n"
                     "    return [os.getcwd(), listing]\n")
    assert tool.fn() == ["/tmp", ["user_function.py"]]
    assert tool.fn() == ["/tmp", ["user_function.py"]]  # the last call's scratch file is gone


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_child_inherits_no_handle_on_the_database(tmp_path: Path) -> None:
    db_path = tmp_path / "app.sqlite3"
    connection = sqlite3.connect(db_path)
    connection.execute("create table t (x)")
    connection.commit()
    db_fds = [int(fd) for fd in os.listdir("/proc/self/fd") if _fd_target(fd) == str(db_path)]
    assert db_fds
    for fd in db_fds:  # even a handle marked inheritable must not reach the child
        os.set_inheritable(fd, True)
    body = (
        "    import os\n    targets = {}\n    for fd in os.listdir('/proc/self/fd'):\n        try:\n"
        "            targets[fd] = os.readlink('/proc/self/fd/' + fd)\n        except OSError:\n"
        "            pass  # the listing's own, already closed\n    return targets\n"
    )
    try:
        targets = user_tool(body).fn()
    finally:
        connection.close()
    assert str(db_path) not in targets.values()
    assert all(t.startswith(("pipe:", "/proc/")) for t in targets.values()), targets


def _fd_target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_concurrent_calls_are_independent(double) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda i=i: results.append(double.call({"x": i}))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=int) == ["0", "2", "4", "6"]


def test_try_call_reports_success_and_failure(double) -> None:
    ok, text, elapsed = try_call(double, {"x": 4})
    assert (ok, text) == (True, "8") and elapsed > 0
    ok, text, _ = try_call(double, {"x": "four"})
    assert not ok and "argument x must be" in text
    ok, text, _ = try_call(user_tool("    return 1 / 0\n"), {})
    assert not ok and text.startswith("f raised ZeroDivisionError")


# --- the OS sandbox: what a hostile function tried, and failed to do ------------------------------
# Each attack below worked before the sandbox had namespaces (issue #13). The "app" is a real process
# of its own where the attack aims at the app itself (its environment, its life).
REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-canary-7f3a9c"


@pytest.fixture(scope="module", autouse=True)
def os_sandbox() -> None:
    """These tests are the sandbox's specification: without namespaces they fail, they do not skip."""
    reason = namespaces.unavailable()
    assert reason is None, f"no OS sandbox on this machine: {reason} (`make test` installs bubblewrap)"


def run_in_an_app(body: str, arguments: dict, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A separate app process that calls f from `body` with `arguments` in the sandbox; it prints the
    call's result (or its error) as JSON, then 'app alive'."""
    source = 'def f(**kw):\n    """Try."""\n' + body
    script = (
        "import json\n"
        "from fcapp.tools.base import ToolError\n"
        "from fcapp.tools.sandbox import SandboxedFunction\n"
        "try:\n"
        f"    print(json.dumps(SandboxedFunction({source!r}, 'f')(**{arguments!r})))\n"
        "except ToolError as exc:\n"
        "    print(json.dumps('error: ' + str(exc)))\n"
        "print('app alive')\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def run(body: str, **arguments) -> object:
    """f(**arguments) in the sandbox, from this process."""
    source = 'def f(**kw):\n    """Try."""\n' + body
    return SandboxedFunction(source, "f", LIMITS)(**arguments)


READ_ENVIRONS = """\
    import os
    found = {}
    for pid in {kw['app'], os.getppid(), 1, *[int(p) for p in os.listdir('/proc') if p.isdigit()]}:
        try:
            found[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')
        except OSError as exc:
            found[pid] = type(exc).__name__
    return {'found': found, 'mine': dict(os.environ)}
"""


def test_a_user_function_cannot_read_the_apps_environment() -> None:
    """Before: /proc/<parent>/environ held the app's OPENAI_API_KEY."""
    app = run_in_an_app("    import os\n    return os.getpid()\n", {})
    reply = run_in_an_app(READ_ENVIRONS.replace("kw['app']", "os.getppid()"), {}, {"OPENAI_API_KEY": CANARY})
    assert reply.returncode == 0, reply.stderr
    assert CANARY not in reply.stdout and "app alive" in reply.stdout
    assert json.loads(app.stdout.splitlines()[0]) != os.getpid()
    seen = run(READ_ENVIRONS, app=os.getpid())
    assert str(os.getpid()) not in seen["found"] or seen["found"][str(os.getpid())] == "FileNotFoundError"
    assert CANARY not in json.dumps(seen)


def test_a_user_function_cannot_open_the_store(tmp_path: Path) -> None:
    """Before: the function opened the app's SQLite file by its path and could read or change it."""
    from helpers import correct_chain

    from fcapp.store import Store

    db = tmp_path / "app.db"
    with Store(db) as store:
        store.add_chain(correct_chain("gsm8k", "gsm8k-0"), True, role="reference")
        before = store.counts()
    body = ("    import os, sqlite3\n    tried = {}\n    for how in ('read', 'write', 'sqlite', 'remove'):\n"
            "        try:\n"
            "            if how == 'read': tried[how] = len(open(kw['db'], 'rb').read())\n"
            "            if how == 'write': open(kw['db'], 'ab').write(b'x' * 4096); tried[how] = 'wrote'\n"
            "            if how == 'sqlite': tried[how] = sqlite3.connect(f\"file:{kw['db']}?mode=rw\", uri=True)"
            ".execute('delete from chains').rowcount\n"
            "            if how == 'remove': os.remove(kw['db']); tried[how] = 'removed'\n"
            "        except Exception as exc:\n"
            "            tried[how] = type(exc).__name__\n"
            "    return [tried, os.path.exists(kw['db']), os.path.exists(os.path.dirname(kw['db']))]\n")
    tried, exists, folder = run(body, db=str(db))
    assert (exists, folder) == (False, False), tried
    assert set(tried.values()) <= {"FileNotFoundError", "OperationalError"}, tried
    with Store(db) as store:
        assert store.check() == "ok" and store.counts() == before


def test_a_user_function_cannot_reach_the_apps_loopback() -> None:
    """Before: the function could call any service on 127.0.0.1 (fcapp serve, the app itself)."""
    import http.server

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = ("    import socket\n    try:\n"
            "        with socket.create_connection(('127.0.0.1', kw['port']), timeout=3) as s:\n"
            "            s.sendall(b'GET /from-the-sandbox HTTP/1.0\\r\\n\\r\\n')\n"
            "            return 'connected: ' + s.recv(100).decode()\n"
            "    except OSError as exc:\n"
            "        return type(exc).__name__\n")
    try:
        outcome = run(body, port=server.server_address[1])
    finally:
        server.shutdown()
    assert outcome == "ConnectionRefusedError" and hits == []


LEAVE_A_PROCESS = """\
    import os, sys, time
    if os.fork() == 0:
        os.setsid()  # out of the process group the app kills
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', kw['marker']])
    time.sleep(0.5)
    return 'forked'
"""


def test_a_user_function_leaves_no_process_behind() -> None:
    """Before: a fork + setsid child outlived the process-group kill."""
    marker = f"fcapp-left-behind-{os.getpid()}-{time.monotonic_ns()}"
    assert run(LEAVE_A_PROCESS, marker=marker) == "forked"
    deadline = time.monotonic() + 10
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # never leave one running, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert left == []


def _processes_with(marker: str) -> list[int]:
    """Running processes (not zombies) whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            running = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if running and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_the_app_survives_a_user_functions_attempt_to_kill_it() -> None:
    """Before: os.kill(os.getppid(), 9) killed the app."""
    body = ("    import os, signal\n    tried = []\n"
            "    for target in (os.getppid(), kw['app'], 1, -1):\n"
            "        try:\n            os.kill(target, signal.SIGKILL)\n            tried.append('sent')\n"
            "        except OSError as exc:\n            tried.append(type(exc).__name__)\n"
            "    return tried\n")
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reply = run_in_an_app(body.replace("kw['app']", "os.getpid()"), {})  # the app calling f aims at itself
        assert reply.returncode == 0 and reply.stdout.rstrip().endswith("app alive"), (reply.returncode, reply.stderr)
        run(body, app=app.pid)  # and at another process of the app's user
        assert app.poll() is None
    finally:
        app.kill()
        app.wait()


def test_a_fork_bomb_stops_at_the_process_limit() -> None:
    body = ("    import os, time\n    started = 0\n    while started < 200:\n        try:\n"
            "            pid = os.fork()\n        except OSError:\n            break\n"
            "        if pid == 0:\n            time.sleep(30)\n            os._exit(0)\n"
            "        started += 1\n    return started\n")
    started = run(body)
    assert 0 < started < LIMITS.processes


def test_the_sandbox_shows_the_interpreter_read_only_and_nothing_of_the_app(tmp_path: Path) -> None:
    from fcapp.paths import data_home

    body = ("    import math, os\n    try:\n        open(kw['plant'], 'w')\n        wrote = True\n"
            "    except OSError:\n        wrote = False\n"
            "    return {'wrote': wrote, 'uid': os.getuid(), 'visible': [p for p in kw['paths'] if os.path.exists(p)],"
            " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), 'pi': math.pi}\n")
    def beside_the_interpreter(folder: Path) -> list[str]:  # a virtual environment may live in the checkout
        return [str(p) for p in folder.iterdir() if not any(prefix.startswith(str(p))
                                                            for prefix in (sys.base_prefix, sys.prefix))]

    paths = [*beside_the_interpreter(REPO), str(REPO / "fcapp"), str(data_home()), str(tmp_path),
             *beside_the_interpreter(Path.home()), "/etc/passwd", "/etc/hostname", "/var", "/home",
             "/bin/sh", "/usr/bin"]
    plant = Path(sys.prefix, f"planted-by-test-{os.getpid()}")
    try:
        seen = run(body, paths=paths, plant=str(plant))
        assert not plant.exists()
    finally:
        plant.unlink(missing_ok=True)
    assert seen["visible"] == [] and seen["wrote"] is False and seen["pi"] > 3
    assert seen["uid"] != 0 and len(seen["pids"]) <= 3  # bubblewrap's init, the worker (and its listing)


def test_without_namespaces_user_functions_are_refused_unless_the_operator_opts_in(monkeypatch) -> None:
    namespaces.unavailable.cache_clear()
    try:
        monkeypatch.setenv("PATH", "/nonexistent")  # as on a machine without bubblewrap
        assert namespaces.unavailable() == "bubblewrap is not installed (apt-get install bubblewrap)"
        assert "user functions are refused" in namespaces.status()
        with pytest.raises(ToolError, match="f: user functions are switched off: bubblewrap is not installed.*"
                                            "--allow-unsandboxed-functions"):
            run("    return 1\n")
        namespaces.allow_unsandboxed()
        assert "resource limits only" in namespaces.status()
        assert run("    import os\n    return os.getcwd().startswith('/tmp/fcapp-sandbox-')\n") is True
    finally:
        monkeypatch.undo()
        namespaces.allow_unsandboxed(False)
        namespaces.unavailable.cache_clear()
    assert namespaces.unavailable() is None and "OS sandbox" in namespaces.status()
