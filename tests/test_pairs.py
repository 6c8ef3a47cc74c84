"""Verified and labelled chains become TRL preference rows; exports load with `datasets` and
round-trip through the store losslessly; a broken file is refused and changes nothing."""

from __future__ import annotations

import json

import pytest

from fcapp.files import DataFileError
from fcapp.pairs import PairPolicy, build_pairs, export_pairs, import_pairs, load_pair_file, make_pairs
from fcapp.store import Store
from helpers import correct_chain, stored_pairs, wrong_chain

PROBLEMS = ["gsm8k-1", "gsm8k-2", "gsm8k-3"]


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "pairs.db")
    for pid in PROBLEMS:
        store.add_chain(correct_chain("gsm8k", pid), True, role="reference")
        for seed, answer in enumerate(["-1", "12345"]):
            chain = wrong_chain("gsm8k", pid, answer, seed=seed)
            store.add_chain(chain, chain.verdict)
    return store


def test_each_problem_pairs_a_correct_with_an_incorrect_chain(store):
    rows = build_pairs(store, "gsm8k", PairPolicy(max_pairs_per_problem=4))
    assert len(rows) == 3 * 2  # one correct x two incorrect per problem
    row = rows[0]
    assert row["prompt"][0]["role"] == "system" and "calculator(expression: string)" in row["prompt"][0]["content"]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][-1]["content"].startswith("final_answer")
    assert row["rejected"] != row["chosen"]
    assert {t["function"]["name"] for t in row["tools"]} >= {"calculator", "final_answer"}


def test_policy_caps_pairs_and_can_exclude_reference_chains(store):
    assert len(build_pairs(store, "gsm8k", PairPolicy(max_pairs_per_problem=1))) == 3
    assert build_pairs(store, "gsm8k", PairPolicy(use_reference=False)) == []


def test_identical_chains_are_deduplicated(store):
    duplicate = wrong_chain("gsm8k", "gsm8k-1", "-1", seed=99)  # same text as seed 0, another key
    store.add_chain(duplicate, False)
    assert len(build_pairs(store, "gsm8k", PairPolicy(dedup=True))) == 6
    assert len(build_pairs(store, "gsm8k", PairPolicy(dedup=False))) == 7


def test_a_human_label_overrides_the_verifier(store):
    wrong = store.list_chains(task="gsm8k", problem_id="gsm8k-1", verdict=False)
    for chain in wrong:
        store.label_chain(chain["id"], "accept", who="tester")
    rows = build_pairs(store, "gsm8k")
    assert not any(r["problem_id"] == "gsm8k-1" for r in rows)  # no incorrect chain left for it


def test_export_loads_with_datasets_and_round_trips_through_the_store(store, tmp_path):
    import datasets

    card = make_pairs(store, "gsm8k", tmp_path / "out" / "pairs.jsonl")
    jsonl = tmp_path / "out" / "pairs.jsonl"
    assert card["pairs"] == 6 and (tmp_path / "out" / "pairs.jsonl.card.md").exists()
    loaded = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    assert loaded.num_rows == 6 and {"prompt", "chosen", "rejected", "tools"} <= set(loaded.column_names)

    rows = load_pair_file(jsonl)
    export_pairs(rows, tmp_path / "pairs.parquet")
    parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train")
    assert parquet.num_rows == 6
    assert load_pair_file(tmp_path / "pairs.parquet") == rows

    other = Store(tmp_path / "other.db")
    assert import_pairs(jsonl, other) == 6
    stored = stored_pairs(other, task="gsm8k", policy="imported")
    export_pairs([dict(r) for r in stored], tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == jsonl.read_text()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": [], "chosen": "text", "rejected": []}), "'chosen' must be a list"),
        (json.dumps({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}), "'prompt' must be a list"),
    ],
)
def test_a_broken_pair_file_names_the_line_and_changes_nothing(store, tmp_path, line, message):
    good = json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}], "task": "gsm8k"})
    path = tmp_path / "broken.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataFileError, match=rf"broken.jsonl:2: .*{message}"):
        import_pairs(path, store)
    assert stored_pairs(store, policy="imported") == []


def test_an_export_trains_one_real_dpo_step_unchanged(store, tmp_path, monkeypatch):
    """What `fcapp pairs` writes is what the DPO worker (TRL's DPOTrainer) trains on, as it is."""
    from fcapp.train import TrainConfig, start_training

    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    make_pairs(store, "gsm8k", tmp_path / "pairs.jsonl")
    job = start_training(TrainConfig(pairs=str(tmp_path / "pairs.jsonl"), name="from-export", batch_size=2,
                                     grad_accum=1, max_length=1024, max_steps=1))
    status = job.wait(timeout=900)
    assert status["status"] == "finished", (status, (job.out / "worker.log").read_text()[-3000:])
    [step] = job.read_log()
    assert step["stage"] == "dpo" and step["loss"] == pytest.approx(0.6931, abs=1e-3)
