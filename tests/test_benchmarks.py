"""`python -m benchmarks` runs every benchmark module (one per benchmark) and nothing else; each
module imports (the benchmarks themselves take minutes and are run by `make bench`, not here)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]


def test_the_runner_knows_every_benchmark_module_and_each_imports() -> None:
    modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "__main__", "report"}
    assert set(BENCHMARKS) == modules
    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"benchmarks.{name}").run)


def test_the_runner_lists_the_benchmarks_and_refuses_an_unknown_one() -> None:
    usage = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and all(f"  {name} " in usage.stdout for name in BENCHMARKS)
    wrong = subprocess.run([sys.executable, "-m", "benchmarks", "decod"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown benchmark decod" in wrong.stderr
