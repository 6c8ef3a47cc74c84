"""HTTP teachers the operator configured: a name, an OpenAI-compatible base URL, the model, and the
environment variable that holds its key.

A key is sent only with a configured teacher, to the URL it was configured with (redirects are not
followed). The browser picks a teacher by its spec `teacher:NAME` or types a URL, which is called
without any key: nothing the browser sends names an environment variable.

Configured by the operator at launch, later sources winning by name: `teachers.json` in the data
folder, the file of `fcapp app --teachers FILE`, and each `--teacher NAME=URL#MODEL[,KEY_ENV]`.
The file holds {"teachers": [{"name", "url", "model", "key_env"}]} (key_env optional).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from fcapp.paths import data_home

PREFIX = "teacher:"
FILE_NAME = "teachers.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_lock = threading.Lock()
_configured: dict[str, Teacher] | None = None  # None: not configured yet, read the data folder's file


@dataclass(frozen=True)
class Teacher:
    name: str
    url: str  # the base URL, before /chat/completions (usually ending in /v1)
    model: str
    key_env: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"teacher name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher {self.name}: the URL must start with http:// or https://, not {self.url!r}")
        if not self.model.strip():
            raise ValueError(f"teacher {self.name}: no model name")
        if self.key_env is not None and not _ENV.fullmatch(self.key_env):
            raise ValueError(f"teacher {self.name}: {self.key_env!r} is not an environment variable name")

    @property
    def spec(self) -> str:
        """How a model picker names it."""
        return PREFIX + self.name


def parse_teacher(text: str) -> Teacher:
    """A teacher from `NAME=URL#MODEL[,KEY_ENV]` (the --teacher flag). Raises ValueError."""
    name, sep, rest = text.partition("=")
    url, hash_sign, tail = rest.partition("#")
    model, _, key_env = tail.rpartition(",") if "," in tail else (tail, "", "")
    if not sep or not hash_sign:
        raise ValueError(f"--teacher {text!r}: write NAME=URL#MODEL or NAME=URL#MODEL,KEY_ENV")
    return Teacher(name.strip(), url.strip(), model.strip(), key_env.strip() or None)


def read_teachers(path: str | Path) -> list[Teacher]:
    """The teachers of a config file. Raises ValueError naming the file."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the teachers file ({exc})") from None
    entries = record.get("teachers") if isinstance(record, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f'{path}: expected {{"teachers": [{{"name", "url", "model", "key_env"}}, ...]}}')
    teachers = []
    for number, entry in enumerate(entries, start=1):
        unknown = set(entry) - {"name", "url", "model", "key_env"}
        try:
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
            teachers.append(Teacher(str(entry.get("name", "")), str(entry.get("url", "")),
                                    str(entry.get("model", "")), entry.get("key_env")))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: teacher {number}: {exc}") from None
    return teachers


def configure(files: list[str | Path] = (), flags: list[str] = ()) -> list[Teacher]:
    """Set the configured teachers: the data folder's teachers.json (if any), then `files`, then
    the `--teacher` `flags`. Returns them. Raises ValueError, changing nothing, on a bad source."""
    global _configured
    default = data_home() / FILE_NAME
    teachers: dict[str, Teacher] = {}
    for source in ([default] if default.exists() else []) + list(files):
        teachers.update((t.name, t) for t in read_teachers(source))
    teachers.update((t.name, t) for t in map(parse_teacher, flags))
    with _lock:
        _configured = teachers
    return list(teachers.values())


def configured() -> list[Teacher]:
    """The configured teachers (the data folder's file, until `configure` is called)."""
    with _lock:
        known = _configured
    return list((known if known is not None else {t.name: t for t in configure()}).values())


def get_teacher(spec: str) -> Teacher:
    """The configured teacher a `teacher:NAME` spec names. Raises ValueError."""
    name = spec.removeprefix(PREFIX)
    for teacher in configured():
        if teacher.name == name:
            return teacher
    known = ", ".join(t.spec for t in configured()) or "none"
    raise ValueError(f"no configured teacher {name!r} (configured: {known}); the operator adds teachers with "
                     f"--teacher NAME=URL#MODEL[,KEY_ENV] or in {data_home() / FILE_NAME}")

