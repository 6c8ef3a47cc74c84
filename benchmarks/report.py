"""What every benchmark script shares: progress lines, the machine's description, and publishing the
report (printed, and kept in its markdown file). Light imports only: the DPO benchmark's launcher
processes import it and their own memory is measured."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    """One line of a results table: what was compared, the measurements, their ratio, the target."""

    name: str
    measured: str
    value: str
    target: str = ""
    met: bool | None = None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, str]:
    """CPU model and flags (from lscpu), cores, and the load average now."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu": fields.get("Model name", "unknown").strip(),
        "cores": str(os.cpu_count()),
        "avx512_bf16": "yes" if "avx512_bf16" in fields.get("Flags", "") else "no",
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def table(title: str, intro: str, info: dict[str, str], rows: list[Row]) -> str:
    """A results file: title, what produced it, the machine, the table."""
    lines = [f"# {title}", "", intro, ""] + [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| benchmark | measured | ratio | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.name} | {row.measured} | {row.value} | {row.target} | {met} |")
    return "\n".join(lines) + "\n"


def arguments(prog: str, description: str, path: Path) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the option every benchmark takes, --no-write; add its own to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {path.name} as it is")
    return parser


def command(prog: str, description: str, path: Path, run: Callable[[], tuple[dict[str, str], list[Row]]],
            render: Callable[[dict[str, str], list[Row]], str]) -> None:
    """The command line of a benchmark whose only option is --no-write: run it, then publish."""
    args = arguments(prog, description, path).parse_args()
    began = time.time()
    info, rows = run()
    publish(began, info, lambda info: render(info, rows), path, not args.no_write)


def publish(began: float, info: dict[str, str], render: Callable[[dict[str, str]], str], path: Path,
            write: bool) -> None:
    """Add the run's wall time to `info`, print the rendered report and, if `write`, keep it in `path`."""
    info["benchmark wall time"] = f"{time.time() - began:.0f} s"
    report = render(info)
    print(report)
    if write:
        path.write_text(report)
        log(f"written to {path}")
