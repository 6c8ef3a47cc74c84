"""Teacher generation: K verified chains per problem committed one by one; a killed run loses no
finished chain and a re-run redoes none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from fcapp.generate import GenerateConfig, generate, plan
from fcapp.store import Store

# short chains keep the real model fast on a 2-core CPU
FAST = dict(max_steps=2, max_new_tokens=24)


def test_generation_stores_verified_chains_and_resumes_without_redoing(small_model, tmp_path):
    store = Store(tmp_path / "gen.db")
    config = GenerateConfig("gsm8k", samples=2, limit=2, temperature=0.9, reference=True, **FAST)
    seen = []
    stats = generate(config, store, small_model, on_chain=lambda s, c: seen.append(c))
    assert stats.planned == 4 and stats.done == 4 and stats.failed == 0
    assert len(seen) == 4 and all(c.verdict in (True, False) for c in seen)
    assert stats.references == 2
    counts = store.counts("gsm8k")
    assert counts["chains"] == 6 and counts["correct"] >= 2  # the two reference chains at least
    teacher = store.list_chains(task="gsm8k", model_id=small_model.model_id)
    assert {c["seed"] for c in teacher} == {0, 1}  # K samples differ by seed

    again = generate(config, store, small_model)
    assert (again.planned, again.skipped, again.done) == (0, 4, 0)
    assert store.counts("gsm8k")["chains"] == 6


def _chain_keys(db) -> set[str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM chains")}


def test_sigkill_mid_run_loses_no_finished_chain_and_the_rerun_redoes_none(tmp_path):
    db = tmp_path / "killed.db"
    command = [sys.executable, "-m", "fcapp", "generate", "--task", "gsm8k", "--limit", "3", "--samples", "2",
               "--max-steps", "2", "--max-new-tokens", "24", "--db", str(db)]
    env = os.environ | {"FCAPP_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not db.exists() or len(_chain_keys(db)) < 2):
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = _chain_keys(db)
    assert 2 <= len(before) < 6, "the kill should land mid-run"
    assert Store(db).check() == "ok"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["skipped"] == len(before) and summary["done"] == 6 - len(before)
    after = _chain_keys(db)
    assert before <= after and len(after) == 6


def test_the_plan_is_deterministic_per_settings(tmp_path):
    store = Store(tmp_path / "plan.db")
    a, _ = plan(GenerateConfig("fol", samples=3, limit=4), "m", store)
    b, _ = plan(GenerateConfig("fol", samples=3, limit=4), "m", store)
    c, _ = plan(GenerateConfig("fol", samples=3, limit=4, temperature=0.5), "m", store)
    assert [j.key for j in a] == [j.key for j in b] and len(a) == 12
    assert not {j.key for j in a} & {j.key for j in c}  # other settings, other chains
