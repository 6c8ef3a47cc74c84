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
    assert again.skipped_correct == stats.correct  # a resumed run still says how many of its chains are right
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


class HugeNumberTeacher:
    """A teacher whose first reply in every chain carries a literal of thousands of digits (in one
    of two spellings, by sample), and whose second gives a final answer. The agent seeds step k of
    sample s with s * 1000 + k."""

    model_id = "huge-numbers"
    FIRST = ["percentage(part=0x" + "f" * 3_600 + ", whole=2)",  # 4,335 decimal digits
             '{"name": "percentage", "arguments": {"part": ' + "9" * 4_000 + ', "whole": 2}}']

    def stream(self, messages, tools=None, params=None):
        from fcapp.models.base import Chunk

        sample, step = divmod(params.seed, 1000)
        text = 'final_answer(answer="72")' if step else self.FIRST[sample % 2]
        yield Chunk(text, prompt_tokens=10, completion_tokens=5, finished=True)


def test_a_reply_with_a_4000_digit_literal_is_an_error_step_and_the_run_finishes(tmp_path):
    """Before the fix the 4,000-digit number was a valid argument, and storing the chain with the
    4,335-digit one raised ValueError (no int-to-text past 4,300 digits), ending the whole run."""
    store = Store(tmp_path / "huge.db")
    config = GenerateConfig("gsm8k", samples=2, limit=2, max_steps=3)
    stats = generate(config, store, HugeNumberTeacher())
    assert (stats.planned, stats.done, stats.failed) == (4, 4, 0), stats.errors
    for row in store.list_chains(task="gsm8k", model_id="huge-numbers"):
        first, second = store.get_chain(row["id"])["record"]["steps"]
        assert "more than 100 digits" in first["error"] and first["call"] is None
        assert second["call"]["name"] == "final_answer"


class FlakyStore(Store):
    """A real store whose first chain write fails the way a full disk would."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.refused = 0

    def add_chain(self, chain, verdict, key=None, sample=0, role=None):
        if role == "teacher" and not self.refused:
            self.refused += 1
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")
        return super().add_chain(chain, verdict, key, sample, role)


def test_a_chain_that_cannot_be_stored_is_counted_as_failed_and_the_run_goes_on(tmp_path):
    store = FlakyStore(tmp_path / "flaky.db")
    stats = generate(GenerateConfig("gsm8k", samples=2, limit=1, max_steps=3), store, HugeNumberTeacher())
    assert (stats.planned, stats.done, stats.failed) == (2, 1, 1)
    assert "not stored: OperationalError: database or disk is full" in stats.errors[0]
    assert len(store.list_chains(task="gsm8k", model_id="huge-numbers")) == 1
