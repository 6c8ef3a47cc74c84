"""The pipeline overview on a real store: each stage's counts, and a next step that follows the data from an
empty store to a trainable one; `fcapp status` prints the same."""

from __future__ import annotations

import pytest

from fcapp.pipeline import overview
from fcapp.store import Store
from helpers import correct_chain, wrong_chain


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))  # no tuned models, no runs
    return Store(tmp_path / "overview.db")


def test_the_next_step_follows_the_data_from_an_empty_store(store):
    empty = overview(store, "gsm8k")
    assert empty["problems"]["train"] > 0 and empty["problems"]["heldout"] > 0
    assert empty["chains"]["total"] == 0 and empty["next"]["action"] == "generate"

    wrong = wrong_chain("gsm8k", "gsm8k-1", "-1")
    store.add_chain(wrong, wrong.verdict)
    store.add_chain(wrong_chain("gsm8k", "gsm8k-1", "-2", seed=1), False)
    unpaired = overview(store, "gsm8k")
    assert unpaired["chains"] | {"total": 2} == unpaired["chains"] and unpaired["chains"]["incorrect"] == 2
    assert unpaired["next"]["action"] == "label" and "Label chains" in unpaired["next"]["text"]

    store.add_chain(correct_chain("gsm8k", "gsm8k-1"), True, role="reference")
    ready = overview(store, "gsm8k")
    assert ready["pairs"]["problems"] == 1 and ready["next"]["action"] == "train"
    assert overview(store, "fol")["next"]["action"] == "generate"  # another task has nothing yet


def test_fcapp_status_prints_every_stage_and_the_next_step(store, capsys):
    from fcapp.cli import main

    assert main(["status", "--task", "fol", "--db", str(store.path)]) == 0
    out = capsys.readouterr().out
    for stage in ("problems", "chains", "pairs", "models", "evaluations"):
        assert f"  {stage}" in out
    assert "next: No chains yet" in out
