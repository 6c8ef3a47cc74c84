"""Speed benchmarks of the local backend and the agent loop; run them all with `python -m benchmarks`.

Every result is a ratio of two things measured in the same run on the same machine, so the numbers
stay meaningful on a shared, noisy 2-core box; `benchmarks/results.md` keeps the latest run.
"""
