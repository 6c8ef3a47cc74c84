"""Benchmarks, one module each, each printing a table and keeping its latest run in a markdown file here:

- `python -m benchmarks.decode`: the local backend and the agent loop (results.md);
- `python -m benchmarks.teacher`: teacher generation over HTTP, concurrency 4 vs 1 (teacher_results.md);
- `python -m benchmarks.training`: seconds per pair / example / step of DPO, SFT and GRPO, each speed lever on
  and off, and peak memory (training_results.md).

`python -m benchmarks` (and `make bench`) runs them all, `python -m benchmarks NAME` one. Every
comparison is a ratio of two things measured in the same run on the same machine, so the numbers
stay meaningful on a shared, noisy 2-core box.
"""
