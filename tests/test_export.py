"""`fcapp export NAME --gguf OUT`: a tuned model written as a GGUF file (q8_0) that loads back with
transformers' GGUF loader (llama.cpp's format) and solves a problem with the same greedy chain as
the model it was exported from. q8_0 is tested because it is the lossy type: f16 only rounds less."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch

from fcapp.cli import main
from fcapp.export import export_gguf
from fcapp.models.local import LocalModel
from fcapp.models.registry import embedded_model_dir, gguf_to_folder
from fcapp.paths import models_dir
from fcapp.solve import SolveConfig, solve
from fcapp.tasks import get_task

TUNED = "export-me"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registered tuned model (a run folder as training leaves it) holding the embedded weights,
    in a data folder of its own (other tests count the tuned models of theirs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FCAPP_HOME", str(tmp_path_factory.mktemp("export-home")))
        run = models_dir() / TUNED
        run.mkdir(parents=True)
        (run / "model").symlink_to(embedded_model_dir(), target_is_directory=True)
        (run / "card.json").write_text(json.dumps({"base": "smollm2", "method": "lora", "status": "finished"}))
        yield TUNED


def _chain(model: LocalModel, task_name: str, problem_id: str) -> list[str]:
    task = get_task(task_name)
    chain = solve(task, task.get(problem_id), model, SolveConfig(max_steps=3, max_new_tokens=40))
    return [step.text for step in chain.steps] + [str(chain.answer)]


def test_an_exported_gguf_loads_back_and_gives_the_same_greedy_chain(tuned: str, tmp_path: Path) -> None:
    out = export_gguf(tuned, tmp_path / "tuned.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    template = (embedded_model_dir() / "chat_template.jinja").read_text()
    assert reader.fields["tokenizer.chat_template"].contents() == template
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q8_0"}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}

    original = LocalModel(tuned)
    reloaded = LocalModel(str(gguf_to_folder(out, tmp_path / "reloaded")))
    assert reloaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        original.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    for task, problem in (("fol", "0"), ("gsm8k", "1")):
        assert _chain(reloaded, task, problem) == _chain(original, task, problem), (task, problem)

    ids = torch.tensor([original.encode([{"role": "user", "content": "Is every cat an animal?"}])])
    with torch.inference_mode():
        a, b = original.model(ids).logits[0], reloaded.model(ids).logits[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9  # 8-bit weights: a near tie may flip (measured: 35 of 36 positions agree)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_export_refuses_what_it_cannot_write_and_keeps_existing_files(tuned: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    existing = tmp_path / "mine.gguf"
    existing.write_text("keep me")
    assert main(["export", tuned, "--gguf", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["export", "no-such-model", "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "not a local model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export_gguf(tuned, tmp_path / "y.gguf", "q4_0")
    with pytest.raises(SystemExit):
        main(["export", tuned, "--gguf", str(tmp_path / "z.gguf"), "--type", "q4_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf"]
