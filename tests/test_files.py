"""Files read while they are written: the atomic writer never shows half a file and cleans up
after killed writers; the JSONL reader names file and line; the log reader skips what is unfinished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcapp.files import DataFileError, atomic_write, atomic_write_json, atomic_write_text, read_jsonl, read_log


def test_an_atomic_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "card.json"
    atomic_write_json(target, {"name": "x", "path": tmp_path})
    assert json.loads(target.read_text()) == {"name": "x", "path": str(tmp_path)}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "pairs.jsonl", "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


def test_the_next_write_removes_a_killed_writers_temporary_file_but_not_a_living_ones(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".out.json.{int(dead.stdout)}.abc.tmp"
    in_progress = tmp_path / f".out.json.{os.getpid()}.def.tmp"
    orphan.write_text("left by a killed writer")
    in_progress.write_text("another thread of this process, still writing")
    atomic_write_json(tmp_path / "out.json", [1])
    assert not orphan.exists() and in_progress.exists()


def test_read_jsonl_gives_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": "x\u2028y"}\n', encoding="utf-8")  # U+2028 is not a line break in JSON
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": "x\u2028y"})]
    path.write_text("\n")
    assert read_jsonl(path) == []


@pytest.mark.parametrize("line, message", [
    ('{"a": 1', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_read_jsonl_names_the_file_and_the_first_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": true}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"^{path}:2: .*{message}"):
        read_jsonl(path)


def test_read_jsonl_says_when_a_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="missing.jsonl: cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(DataFileError, match="latin1.jsonl: cannot read"):
        read_jsonl(tmp_path / "latin1.jsonl")


def test_read_log_skips_the_line_still_being_written_and_damaged_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    assert read_log(log) == []
    log.write_bytes(b'{"step": 1}\nnot json\n[3]\n{"step": 2, "note": "caf' + "é".encode()[:1])  # cut mid-character
    assert read_log(log) == [{"step": 1}]
    with log.open("ab") as handle:
        handle.write("é".encode()[1:] + b'"}\n')
    assert read_log(log) == [{"step": 1}, {"step": 2, "note": "café"}]
