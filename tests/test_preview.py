"""The training preview: what a run would train on (rows from the store or a pair set, their token lengths
against max_length, steps, an estimated time), computed the way start_training builds the data, and an
imported pair set as the data of a DPO run (config and CLI)."""

from __future__ import annotations

import json

import pytest

from fcapp.store import Store
from fcapp.training import TrainConfig
from fcapp.training.job import SECONDS_PER_ROW, preview, render_preview
from fcapp.trainsets import TrainingDataError, export_pairs, import_pairs, make_pairs
from helpers import gsm8k_store

PROBLEMS = ["gsm8k-1", "gsm8k-2", "gsm8k-4"]  # training problems


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    return gsm8k_store(tmp_path / "preview.db", PROBLEMS)


def test_a_dpo_preview_counts_the_pairs_measures_them_and_estimates_the_time(store):
    config = TrainConfig(name="p", method="dpo", task="gsm8k", max_steps=2, batch_size=1, grad_accum=1)
    facts = preview(config, store)
    assert facts["rows"] == 3 and facts["used"] == 3 and facts["problems"] == 3 and facts["tasks"] == {"gsm8k": 3}
    assert facts["heldout"] == 0 and len(facts["lengths"]) == 3 and all(n > 100 for n in facts["lengths"])
    assert facts["steps"] == 2 and facts["estimate_s"] == pytest.approx(2 * SECONDS_PER_ROW["dpo"])
    assert config.demo is None  # the caller's config is left as it was
    text = render_preview(facts)
    assert "3 pairs from 3 training problems" in text and "estimate" in text

    short = preview(TrainConfig(name="p", method="dpo", task="gsm8k", max_length=64), store)
    assert short["too_long"] == 3 and short["used"] == 0
    assert "the run would refuse them" in render_preview(short)
    assert not list((store.path.parent / "home").glob("models/*"))  # a preview leaves nothing behind


def test_an_sft_preview_takes_the_chosen_sources(store):
    facts = preview(TrainConfig(name="p", method="sft", task="gsm8k", sources=["reference"]), store)
    assert facts["rows"] == 3 and facts["kind"] == "sft"
    with pytest.raises(TrainingDataError, match="no correct chains"):
        preview(TrainConfig(name="p", method="sft", task="gsm8k", sources=["human"]), store)


def test_an_imported_pair_set_is_what_a_dpo_run_trains_on(store, tmp_path):
    make_pairs(store, "gsm8k", tmp_path / "built.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "built.jsonl").read_text().splitlines()][:2]
    export_pairs(rows, tmp_path / "mine.jsonl")
    first, second = import_pairs(tmp_path / "mine.jsonl", store), import_pairs(tmp_path / "mine.jsonl", store)
    assert (first["policy"], second["policy"]) == ("imported-mine", "imported-mine-2")  # never replaced

    facts = preview(TrainConfig(name="p", method="dpo", task="gsm8k", pair_set="imported-mine"), store)
    assert facts["rows"] == 2 and facts["source"] == "pair set imported-mine"
    with pytest.raises(TrainingDataError, match="pair set 'nope' holds no pairs"):
        preview(TrainConfig(name="p", method="dpo", task="gsm8k", pair_set="nope"), store)
    with pytest.raises(ValueError, match="--pair-set is the data of a dpo run"):
        TrainConfig(name="p", method="sft", task="gsm8k", pair_set="imported-mine")


def test_fcapp_train_preview_prints_without_starting(store, capsys):
    from fcapp.cli import main

    assert main(["train", "--db", str(store.path), "--task", "gsm8k", "--name", "p", "--preview"]) == 0
    out = capsys.readouterr().out
    assert "dpo on pairs built from the gsm8k chains: 3 pairs" in out and "optimizer steps" in out
    assert not (store.path.parent / "home" / "models" / "p").exists()
