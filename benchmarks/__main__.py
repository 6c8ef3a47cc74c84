"""`python -m benchmarks [NAME ...] [--no-write]`: run the benchmarks, all of them by default, each in
a process of its own (one's threads, caches and memory never touch the next). Each prints its
table and keeps it in its results file here; `python -m benchmarks.NAME --help` shows its options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from benchmarks.report import log

BENCHMARKS = {
    "decode": "the local backend and the agent loop (results.md; ~5 min on the 2-core box)",
    "teacher": "teacher generation over HTTP, concurrency 4 vs 1 (teacher_results.md; ~1.5 min)",
    "training": "seconds per pair / example / step of DPO, SFT, GRPO, each lever on and off (training_results.md; ~15 min)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog="benchmarks:\n" + "\n".join(f"  {name:<9} {what}" for name, what in BENCHMARKS.items()))
    parser.add_argument("names", nargs="*", metavar="NAME", help="the benchmarks to run (default: all, in this order)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave the results files")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or list(BENCHMARKS):
        log(f"benchmark {name}: {BENCHMARKS[name]}")
        command = [sys.executable, "-m", f"benchmarks.{name}"] + (["--no-write"] if args.no_write else [])
        if subprocess.run(command, cwd=Path(__file__).resolve().parent.parent).returncode != 0:
            failed.append(name)
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
