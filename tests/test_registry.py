"""The model registry: the embedded model answers to all of its names with one model id (so a
generation resumed under another name redoes nothing), tuned models are found by name in their run
folders, and nothing outside models/ is reached by a name."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from fcapp.generate import GenerateConfig, generate
from fcapp.models.local import LocalModel
from fcapp.models.registry import (EMBEDDED, EMBEDDED_NAMES, embedded_model_dir, is_embedded, list_models, model_id,
                                   resolve_model_path, tuned_model_dir)
from fcapp.paths import models_dir
from fcapp.store import Store

ALL_NAMES = [*sorted(EMBEDDED_NAMES), None, "", "  smollm2 "]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_of_the_embedded_model_is_one_model(name: str | None) -> None:
    assert is_embedded(name)
    assert model_id(name) == EMBEDDED
    assert resolve_model_path(name) == str(embedded_model_dir())


def test_other_specs_keep_their_own_id() -> None:
    for spec in ("my-tuned", "/some/folder", "org/hub-model", "Base", "smollm2-dpo"):
        assert not is_embedded(spec) and model_id(spec) == spec


def test_a_generation_resumed_under_any_name_of_the_embedded_model_redoes_no_chain(small_model, tmp_path: Path) -> None:
    store = Store(tmp_path / "resume.db")
    config = GenerateConfig("gsm8k", samples=2, limit=1, temperature=0.9, max_steps=1, max_new_tokens=12)
    first = generate(config, store, small_model)
    assert (first.planned, first.done, first.failed) == (2, 2, 0)
    keys = store.stored_verdicts()
    for name in ALL_NAMES:
        model = LocalModel(name)
        again = generate(config, store, model)
        assert (model.model_id, again.planned, again.skipped, again.done) == (EMBEDDED, 0, 2, 0), name
        del model
        gc.collect()
    assert store.stored_verdicts() == keys


def _run_folder(name: str, card: dict | None, model: bool = True) -> Path:
    """A run folder as training leaves it: card.json beside model/config.json."""
    run = models_dir() / name
    if model:
        (run / "model").mkdir(parents=True)
        (run / "model" / "config.json").write_text("{}")
    else:
        run.mkdir(parents=True)
    if card is not None:
        (run / "card.json").write_text(json.dumps(card))
    return run


def test_list_models_reads_the_run_folders_newest_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path))  # a data folder of its own: no other test's models
    _run_folder("older", {"base": "smollm2", "method": "lora", "started": "2026-01-01T00:00:00", "global_step": 3,
                          "data": {"used": 8}, "metrics": {"loss": 0.5}})
    _run_folder("newer", {"base": "older", "method": "full", "finished": "2026-02-01T00:00:00"})
    _run_folder("no-model-yet", {"base": "smollm2", "started": "2026-03-01T00:00:00"}, model=False)
    _run_folder("no-card", None)
    (_run_folder("bad-card", None) / "card.json").write_text("{not json")
    listed = list_models()
    assert [m["name"] for m in listed] == ["newer", "older"]
    older = listed[1]
    assert older["path"] == str(models_dir() / "older" / "model") and older["base"] == "smollm2"
    assert (older["method"], older["steps"], older["pairs"], older["loss"]) == ("lora", 3, 8, 0.5)
    assert tuned_model_dir("older") == models_dir() / "older" / "model"
    assert resolve_model_path("newer") == str(models_dir() / "newer" / "model")
    assert tuned_model_dir("no-model-yet") is None and tuned_model_dir("missing") is None


@pytest.mark.parametrize("spec", ["..", ".", "../x", "a/b", "x\x00y", "", "-rf"])
def test_a_name_that_is_not_one_folder_name_is_never_a_tuned_model(spec: str) -> None:
    assert tuned_model_dir(spec) is None


def test_the_app_loads_the_embedded_model_once_whatever_it_is_called() -> None:
    from fcapp.ui.common import get_model, model_choices

    first = get_model("base")
    assert all(get_model(name) is first for name in ALL_NAMES) and first.model_id == EMBEDDED
    assert model_choices()[0] == EMBEDDED
