"""The SQLite store on real files: round trips, idempotent generation keys, labels over verdicts,
counts, migrations, and several real processes writing at once (one of them SIGKILLed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcapp.records import Call, Chain, Step
from fcapp.store import (
    SCHEMA_VERSION,
    Store,
    StoreError,
    apply_migrations,
    chain_key,
    default_db_path,
)
from fcapp.tasks.base import Problem
from helpers import has_chain, label_history, schema_version, stored_problems

REPO = Path(__file__).resolve().parents[1]


def make_chain(problem_id: str = "p1", task: str = "gsm8k", model_id: str = "teacher", seed: int = 0,
               answer: str = "3") -> Chain:
    steps = [
        Step(0, "add(a=1, b=2)", Call("add", {"a": 1, "b": 2}), result="3", prompt_tokens=40,
             completion_tokens=8, elapsed_s=0.2, tool_elapsed_s=0.001),
        Step(1, "adx(1)", error="unknown function adx", prompt_tokens=50, completion_tokens=4, elapsed_s=0.1),
        Step(2, f'final_answer(answer="{answer}")', Call("final_answer", {"answer": answer}),
             result=f"Final answer: {answer}", prompt_tokens=60, completion_tokens=9, elapsed_s=0.2),
    ]
    return Chain(
        task=task, problem_id=problem_id, question="What is 1 + 2?", model_id=model_id,
        prompt=[{"role": "system", "content": "You solve problems…"}, {"role": "user", "content": "What is 1 + 2?"}],
        tools=[{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {}}}],
        seed=seed, sampling={"temperature": 0.7, "top_p": 0.95, "seed": seed}, steps=steps, answer=answer,
        stop_reason="answer", started_at=1_700_000_000.0, elapsed_s=0.5,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "fcapp.db") as s:
        yield s


def test_default_db_path_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / "fcapp.db"
    monkeypatch.setenv("FCAPP_HOME", "")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "fcapp" / "fcapp.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_path() == tmp_path / ".local" / "share" / "fcapp" / "fcapp.db"
    Store().close()  # creates the missing folders
    assert default_db_path().exists()


def test_opens_in_wal_with_current_schema(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema_version(store) == SCHEMA_VERSION
    assert store.check() == "ok"


def test_chain_round_trip(store: Store) -> None:
    chain = make_chain()
    chain_id = store.add_chain(chain, verdict=True)
    stored = store.get_chain(chain_id)
    assert stored is not None
    chain.verdict = True
    assert Chain.from_dict(stored["record"]) == chain
    assert stored["effective_record"] == stored["record"] and stored["edited_record"] is None
    assert {k: stored[k] for k in ("task", "problem_id", "model_id", "role", "seed", "answer", "stop_reason")} == {
        "task": "gsm8k", "problem_id": "p1", "model_id": "teacher", "role": "teacher", "seed": 0, "answer": "3",
        "stop_reason": "answer"}
    assert (stored["steps"], stored["valid_calls"], stored["prompt_tokens"], stored["completion_tokens"]) == (3, 2, 150, 21)
    assert stored["verdict"] is True and stored["effective_verdict"] is True and stored["label"] is None
    assert stored["sampling"] == chain.sampling and stored["reference"] is False
    assert store.get_chain(chain_id + 1) is None


def test_add_chain_is_idempotent_on_the_generation_key(store: Store) -> None:
    chain = make_chain()
    first = store.add_chain(chain, verdict=True)
    assert store.add_chain(chain, verdict=False) == first
    assert store.get_chain(first)["verdict"] is True  # the second add changed nothing
    key = chain_key("gsm8k", "p1", "teacher", 0, chain.sampling)
    assert has_chain(store, key) and not has_chain(store, chain_key("gsm8k", "p1", "teacher", 1, chain.sampling))
    other_sample = store.add_chain(chain, verdict=True, sample=1)
    other_seed = store.add_chain(make_chain(seed=1), verdict=True)
    assert len({first, other_sample, other_seed}) == 3
    assert store.stored_verdicts(task="gsm8k", model_id="teacher")[key] is True
    assert len(store.stored_verdicts()) == 3 and store.stored_verdicts(task="folio") == {}
    assert store.add_chain(chain, verdict=None, key="custom") not in (first, other_sample, other_seed)


def test_label_overrides_verdict(store: Store) -> None:
    chain_id = store.add_chain(make_chain(answer="4"), verdict=False)
    store.label_chain(chain_id, "accept", "ann")
    assert store.get_chain(chain_id)["effective_verdict"] is True
    store.label_chain(chain_id, "reject", "bob")
    got = store.get_chain(chain_id)
    assert (got["label"], got["labelled_by"], got["verdict"], got["effective_verdict"]) == ("reject", "bob", False, False)

    edited = make_chain(answer="3")
    store.label_chain(chain_id, "edited", "ann", edited_record=edited, edited_verdict=True)
    got = store.get_chain(chain_id)
    assert got["label"] == "edited" and got["effective_verdict"] is True
    assert got["effective_record"] == got["edited_record"] == edited.to_dict()
    assert got["record"]["answer"] == "4"

    unlabelled = store.add_chain(make_chain(problem_id="p2"), verdict=True)
    assert [c["id"] for c in store.list_chains(label="edited")] == [chain_id]
    assert [c["id"] for c in store.list_chains(label="unlabelled")] == [unlabelled]
    assert [c["id"] for c in store.list_chains(verdict=True)] == [unlabelled, chain_id]  # newest first
    assert store.list_chains(verdict=False) == []


def test_label_history_keeps_every_label(store: Store) -> None:
    chain_id = store.add_chain(make_chain(), verdict=True)
    store.label_chain(chain_id, "reject", "ann")
    store.label_chain(chain_id, "edited", "bob", edited_record=make_chain().to_dict(), edited_verdict=False)
    store.label_chain(chain_id, "accept", "cy")
    history = label_history(store, chain_id)
    assert [(h["label"], h["who"]) for h in history] == [("reject", "ann"), ("edited", "bob"), ("accept", "cy")]
    assert history[1]["edited_record"]["answer"] == "3" and history[1]["edited_verdict"] is False
    assert history[0]["edited_record"] is None
    assert store.get_chain(chain_id)["label"] == "accept"


def test_label_rejects_bad_input(store: Store) -> None:
    chain_id = store.add_chain(make_chain(), verdict=True)
    with pytest.raises(ValueError):
        store.label_chain(chain_id, "maybe", "ann")
    with pytest.raises(ValueError):
        store.label_chain(chain_id, "edited", "ann")
    with pytest.raises(ValueError):
        store.label_chain(chain_id, "accept", "ann", edited_record={"answer": "3"})
    with pytest.raises(KeyError):
        store.label_chain(chain_id + 100, "accept", "ann")
    with pytest.raises(ValueError):
        store.list_chains(label="maybe")
    assert label_history(store, chain_id) == []


def test_counts_and_chains_for_pairs(store: Store) -> None:
    store.add_problems([Problem("p1", "gsm8k", "q1", "3"), Problem("p2", "gsm8k", "q2", "5"),
                        Problem("f1", "folio", "q3", "True")])
    ids = {
        "p1 right": store.add_chain(make_chain("p1", seed=0), verdict=True),
        "p1 wrong": store.add_chain(make_chain("p1", seed=1, answer="4"), verdict=False),
        "p2 wrong": store.add_chain(make_chain("p2", seed=0, answer="4"), verdict=False),
        "p2 unverified": store.add_chain(make_chain("p2", seed=1, answer="?"), verdict=None),
        "f1 right": store.add_chain(make_chain("f1", task="folio"), verdict=True),
    }
    counts = store.counts()
    assert {k: v for k, v in counts.items() if k != "by_task"} == {
        "chains": 5, "correct": 2, "incorrect": 2, "unverified": 1, "labelled": 0, "problems": 3, "pair_problems": 1}
    assert counts["by_task"]["folio"] == {
        "chains": 1, "correct": 1, "incorrect": 0, "unverified": 0, "labelled": 0, "problems": 1, "pair_problems": 0}

    # A person accepts the unverified p2 chain: p2 can now give a pair too.
    store.label_chain(ids["p2 unverified"], "accept", "ann")
    gsm8k = store.counts("gsm8k")
    assert (gsm8k["correct"], gsm8k["unverified"], gsm8k["labelled"], gsm8k["pair_problems"]) == (2, 0, 1, 2)
    assert list(gsm8k["by_task"]) == ["gsm8k"]

    grouped = store.chains_for_pairs("gsm8k")
    assert sorted(grouped) == ["p1", "p2"]
    assert [(c["id"], c["effective_verdict"]) for c in grouped["p2"]] == [(ids["p2 wrong"], False), (ids["p2 unverified"], True)]
    assert grouped["p1"][1]["record"]["answer"] == "4"


def test_problems_upsert(store: Store) -> None:
    store.add_problems([Problem("p1", "gsm8k", "old", "1", {"source": "a"})])
    store.add_problems([Problem("p1", "gsm8k", "new", "2", {"source": "b"}), Problem("p1", "folio", "q", "True")])
    assert store.get_problem("p1", task="gsm8k") == Problem("p1", "gsm8k", "new", "2", {"source": "b"})
    with pytest.raises(ValueError):
        store.get_problem("p1")
    assert store.get_problem("missing") is None
    assert [p.task for p in stored_problems(store)] == ["folio", "gsm8k"]
    assert stored_problems(store, task="gsm8k", split=Problem("p1", "gsm8k", "", "").split)[0].question == "new"


def test_pairs_runs_and_evals(store: Store) -> None:
    good, bad = store.add_chain(make_chain(seed=0), True), store.add_chain(make_chain(seed=1, answer="4"), False)
    row = {"problem_id": "p1", "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}], "tools": [{"type": "function"}],
           "chosen_chain_id": good, "rejected_chain_id": bad}
    store.save_pairs("gsm8k", "all", [row, row | {"tools": None}])
    store.save_pairs("gsm8k", "all", [row])  # rebuilding a set replaces it
    pairs = store.list_pairs(task="gsm8k")
    assert len(pairs) == 1 and pairs[0]["chosen"] == row["chosen"] and pairs[0]["tools"] == row["tools"]
    assert (pairs[0]["policy"], pairs[0]["chosen_chain_id"], pairs[0]["rejected_chain_id"]) == ("all", good, bad)

    eval_id = store.add_eval("gsm8k", ["base", "tuned"], {"max_steps": 10}, {"accuracy": {"base": 0.1, "tuned": 0.3}})
    assert store.get_eval(eval_id)["results"]["accuracy"]["tuned"] == 0.3
    assert [e["models"] for e in store.list_evals(task="gsm8k")] == [["base", "tuned"]]
    assert store.list_evals(task="folio") == []


def test_migrates_a_v1_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert apply_migrations(conn, upto=1) == 1
    conn.execute("INSERT INTO problems (task, id, question, answer, split) VALUES ('gsm8k', 'p1', 'q', '3', 'train')")
    conn.execute(
        """INSERT INTO chains (key, task, problem_id, question, model_id, role, seed, sample, sampling, record,
                               answer, verdict, stop_reason, steps, valid_calls, prompt_tokens, completion_tokens,
                               elapsed_s, reference, created_at)
           VALUES ('k1', 'gsm8k', 'p1', 'q', 'teacher', 'teacher', 0, 0, '{}', ?, '3', 1, 'answer', 3, 2, 150, 21,
                   0.5, 0, 0)""",
        (json.dumps(make_chain().to_dict()),),
    )
    conn.execute("INSERT INTO labels (chain_id, label, who, at) VALUES (1, 'reject', 'ann', 0)")
    conn.close()

    with Store(path) as store:
        assert schema_version(store) == SCHEMA_VERSION
        assert store.get_problem("p1").answer == "3"
        old = store.get_chain(1)
        assert old["label"] == "reject" and old["effective_verdict"] is False and has_chain(store, "k1")
        row = {"problem_id": "p1", "prompt": [], "chosen": [], "rejected": []}
        assert [p["policy"] for p in store.list_pairs()] == [] and store.save_pairs("gsm8k", "s", [row])  # v2 tables
        assert [p["policy"] for p in store.list_pairs()] == ["s"]
        assert store.check() == "ok"


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


@pytest.mark.parametrize("content", [b"not a database at all\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4000],
                         ids=["garbage", "damaged-header"])
def test_a_damaged_file_is_refused_with_how_to_recover_and_left_as_it_was(tmp_path: Path, content: bytes) -> None:
    """Before the fix this was a raw sqlite3 traceback."""
    path = tmp_path / "broken.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=r"broken.db is damaged or is not an fcapp database .*nothing was changed.*"
                                         r"\.recover.*move the file aside"):
        Store(path)
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["broken.db"]


def test_the_cli_reports_a_database_damaged_after_opening_with_how_to_recover(tmp_path: Path, capsys) -> None:
    """A file whose header is intact but whose pages are gone opens, then fails on the first read."""
    from fcapp.cli import main

    path = tmp_path / "cut.db"
    with Store(path) as store:
        for seed in range(200):
            store.add_chain(make_chain(seed=seed), verdict=True)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 3)
    code = main(["pairs", "--task", "demo", "--out", str(tmp_path / "pairs.jsonl"), "--db", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path} is damaged") and ".recover" in err and "Traceback" not in err


def test_threads_share_a_store(store: Store) -> None:
    chain_id = store.add_chain(make_chain(), verdict=True)

    def work(n: int) -> None:
        for i in range(25):
            store.add_chain(make_chain(f"t{n}", seed=i), verdict=bool(i % 2))
            store.label_chain(chain_id, "accept", f"thread{n}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counts()["chains"] == 101
    assert len(label_history(store, chain_id)) == 100


# ---- several processes ------------------------------------------------------------------------------
LABELS_PER_PROCESS = 200


def _label_worker(path: str, chain_ids: list[int], who: str, start: multiprocessing.synchronize.Event) -> None:
    """Child process: label the shared chains LABELS_PER_PROCESS times as fast as it can."""
    store = Store(path)
    start.wait()
    for i in range(LABELS_PER_PROCESS):
        chain_id = chain_ids[i % len(chain_ids)]
        if i % 3 == 2:
            store.label_chain(chain_id, "edited", who, edited_record={"i": i}, edited_verdict=bool(i % 2))
        else:
            store.label_chain(chain_id, "accept" if i % 2 else "reject", who)
    store.close()


def test_processes_labelling_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with Store(path) as store:
        chain_ids = [store.add_chain(make_chain(f"p{i}"), verdict=None) for i in range(5)]
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_label_worker, args=(str(path), chain_ids, f"w{n}", start)) for n in range(3)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]  # a 'database is locked' error would exit 1

    with Store(path) as store:
        histories = [label_history(store, c) for c in chain_ids]
        assert sum(map(len, histories)) == 3 * LABELS_PER_PROCESS
        for n in range(3):
            assert sum(1 for h in histories for row in h if row["who"] == f"w{n}") == LABELS_PER_PROCESS
        assert store.counts()["labelled"] == 5
        assert store.check() == "ok"


_WRITER = """
import sys
from fcapp.store import Store
from test_store import make_chain

store = Store(sys.argv[1])
for i in range(1_000_000):
    chain_id = store.add_chain(make_chain(f"k{i}", seed=i), verdict=bool(i % 2))
    print(chain_id, flush=True)
"""


def test_sigkill_mid_write_loses_no_committed_chain(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    Store(path).close()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    reported = []
    deadline = time.monotonic() + 15
    while len(reported) < 300 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    # read through the same buffered reader: communicate() would skip what readline() buffered
    reported += [int(line) for line in child.stdout.read().split()]
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= 300

    with Store(path) as store:
        assert store.check() == "ok"
        stored = {c["id"] for c in store.list_chains(limit=10_000_000)}
        assert set(reported) <= stored
        assert len(stored) - len(reported) <= 1  # at most the one committed before its id was printed
        assert all(store.get_chain(i)["record"]["problem_id"] == f"k{i - 1}" for i in reported[-5:])
