"""The OS sandbox of user functions: bubblewrap (`bwrap`) namespaces around each call's child process.

`command(file_bytes)` is the bwrap command line a child starts under (the worker script and its
arguments follow it). Inside, the child has

- its own PID, network, mount, IPC and UTS namespaces (and cgroup namespace where the kernel has
  them): it sees only its own processes, has no network at all (a loopback of its own, so the app's
  127.0.0.1 is out of reach), and dies with the sandbox when its first process exits or the app
  kills it (a PID namespace ends every process in it; `--die-with-parent` ties it to the app);
- a file tree of its own: the interpreter's installation, the virtual environment and the system
  libraries read-only at their usual paths, the worker script, a fresh /proc and a minimal /dev,
  and an empty /tmp (its working folder, a tmpfs capped at `file_bytes`); nothing else of the
  machine (no home folders, no data folder, no database, no /etc beyond the loader's cache);
- no capabilities and an unprivileged uid: an app running as a normal user gives the child a user
  namespace of its own (mapped to that user, nested user namespaces disabled); an app running as
  root gives it uid/gid 65534 (nobody) instead, dropped by the worker before it reads the user's
  code, because a root-mapped user namespace would still count as root for RLIMIT_NPROC;
- the environment `child_env` sets up, and no file descriptor but its three pipes.

Where namespaces are unavailable (not Linux, bwrap missing, user namespaces switched off), user
functions are refused, unless the operator opts in with `--allow-unsandboxed-functions` (or
FCAPP_ALLOW_UNSANDBOXED=1): they then run with resource limits only (see fcapp.tools.sandbox).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

BWRAP = "bwrap"
WORKER = str(Path(__file__).with_name("_sandbox_worker.py"))
WORKER_INSIDE = "/opt/fcapp/_sandbox_worker.py"  # where the worker script appears in the sandbox
NOBODY = 65534  # uid and gid of a root app's children
ALLOW_ENV = "FCAPP_ALLOW_UNSANDBOXED"
_NAMESPACES = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox",
               "--unshare-cgroup-try"]
_LIBRARIES = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"]
_LOADER_CACHE = "/etc/ld.so.cache"
_allowed = os.environ.get(ALLOW_ENV) == "1"


def allow_unsandboxed(allowed: bool = True) -> None:
    """The operator's opt-in: run user functions with resource limits only where namespaces are missing."""
    global _allowed
    _allowed = allowed


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why namespaces cannot isolate user functions on this machine, or None when they can. Probed
    once, by starting the interpreter inside exactly the sandbox a call gets."""
    if not sys.platform.startswith("linux"):
        return "the OS sandbox needs Linux namespaces"
    if shutil.which(BWRAP) is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        probe = subprocess.run([*command(2**20), sys.executable, "-I", "-c", "pass"], env=child_env("/tmp"),
                               cwd="/", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start ({exc})"
    if probe.returncode != 0:
        return f"bubblewrap cannot create the sandbox here ({probe.stderr.strip()[-300:] or probe.returncode})"
    return None


def refusal() -> str | None:
    """Why user functions must not run now (no namespaces, and no opt-in), or None."""
    reason = unavailable()
    if reason is None or _allowed:
        return None
    return (f"user functions are switched off: {reason}; the operator can run them without the OS sandbox "
            "(resource limits only) by starting the app with --allow-unsandboxed-functions")


def status() -> str:
    """One line for the log and the Functions tab: how user functions run here."""
    reason = unavailable()
    if reason is None:
        return ("User functions run in an OS sandbox (bubblewrap: own PID, network and mount namespaces, "
                "read-only interpreter, no network, no access to the app's files or environment).")
    if _allowed:
        return (f"⚠ No OS sandbox here ({reason}): user functions run with resource limits only "
                "(--allow-unsandboxed-functions), as the app's user, and can read what it can read.")
    return f"⚠ No OS sandbox here ({reason}): user functions are refused (see --allow-unsandboxed-functions)."


def command(file_bytes: int) -> list[str]:
    """The bwrap command line a child runs under; the program and its arguments follow it."""
    args = [BWRAP, *_NAMESPACES, "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(file_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    if os.geteuid() == 0:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # for the worker's drop to NOBODY
    else:
        args += ["--unshare-user", "--disable-userns"]
    made: set[str] = set()
    for path in _read_only_paths():
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would make them 0700: unreadable to NOBODY
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        else:
            args += ["--ro-bind", path, path]
    return [*args, "--ro-bind", WORKER, WORKER_INSIDE, "--"]


def drop_to() -> tuple[int, int] | None:
    """The (uid, gid) the worker switches to before running user code: NOBODY in a root app."""
    return (NOBODY, NOBODY) if os.geteuid() == 0 else None


def child_env(home: str) -> dict[str, str]:
    """A fresh environment: nothing from the app's (no tokens, keys or database paths)."""
    return {
        "PATH": os.defpath,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # numeric libraries start one thread per core by default; one is plenty for a tool call
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_only_paths() -> list[str]:
    """The interpreter's installation, the virtual environment and the system libraries: each
    existing path once, none inside another (a symlink, e.g. /lib -> usr/lib, is kept as one)."""
    interpreter = [sys.base_prefix, sys.prefix, str(Path(os.path.realpath(sys.executable)).parent.parent)]
    paths: list[str] = []
    for path in [*_LIBRARIES, *interpreter, _LOADER_CACHE]:
        path = os.path.abspath(path)
        if os.path.lexists(path) and not any(path == p or path.startswith(p + os.sep) for p in paths):
            paths = [p for p in paths if not p.startswith(path + os.sep)] + [path]
    return paths
