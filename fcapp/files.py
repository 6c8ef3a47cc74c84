"""Files that other processes read while they are written: one atomic writer, one strict JSON Lines
reader for user data (errors name the file and the line) and one tolerant reader for logs that a
running process still appends to."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class DataFileError(ValueError):
    """A data file (problems, preference pairs) is unreadable or malformed; the message names the
    file and, where there is one, the line."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it over `path`: a reader sees the
    old file or the new one, never half of one. The temporary file is named after its writer's PID,
    so one left by a killed writer is removed by the next write to the same target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, record: Any, indent: int | None = 1) -> Path:
    """Write a JSON document atomically; values JSON lacks (paths, dates) are written as strings."""
    return atomic_write_text(path, json.dumps(record, indent=indent, ensure_ascii=False, default=str))


def _remove_orphans(path: Path) -> None:
    """Delete the temporary files of `path` whose writing process no longer exists."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = leftover.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _encodable(record: Any) -> bool:
    """Whether every string in a parsed JSON value can be written as UTF-8 (no lone surrogates)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record(line: str) -> dict[str, Any]:
    """One JSON Lines line as an object; ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # nested too deeply, or an integer over 4300 digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise ValueError(f"not valid JSON ({reason})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "\\u" in line and not _encodable(record):  # refused here, not by SQLite when it is stored
        raise ValueError("invalid text: a lone UTF-16 surrogate escape such as \\ud800")
    return record


def read_jsonl(path: str | Path, skipped: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON Lines file (an empty file gives []).
    The first bad line raises DataFileError naming the file and the line; nothing is half-read. With a
    `skipped` list, bad lines are left out instead and reported there as "file:line: reason"."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON keeps U+2028, U+0085 raw
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path}: cannot read: {exc}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, _record(line)))
        except ValueError as exc:
            if skipped is None:
                raise DataFileError(f"{path}:{number}: {exc}") from None
            skipped.append(f"{path}:{number}: {exc}")
    return rows


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines log that another process may be appending to: a missing file
    gives [], a partial (still being written) last line and undecodable lines are skipped."""
    try:
        data = Path(path).read_bytes()  # bytes: a character still half-written cannot fail the whole read
    except OSError:
        return []
    *complete, _partial = data.split(b"\n")  # what follows the last newline is still being written
    records = []
    for line in complete:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
