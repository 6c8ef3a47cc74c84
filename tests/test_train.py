"""DPO training in a worker process, for real: a tiny pair set, a few steps of SmolLM2-135M + LoRA.

Every run is a separate worker process, as in the app: finish, SIGKILL + resume, STOP file, and a
broken pairs file that must fail in the caller before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from fcapp.train import PairsError, TrainConfig, TrainingJob, attach, list_models, start_training

SYSTEM = 'Call functions to answer. Functions:\nfinal_answer(answer: str)\n    Example: final_answer(answer="42")'


def pair(a: int, b: int) -> dict:
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}],
        "chosen": [{"role": "assistant", "content": f'final_answer(answer="{a + b}")'}],
        "rejected": [{"role": "assistant", "content": f"The answer is {a + b + 1}, I think."}],
        "tools": [{"name": "final_answer", "parameters": {"type": "object"}}],
        "task": "gsm8k",
        "problem_id": f"{a}-{b}",
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def pairs_file(home: Path) -> Path:
    path = home / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair(a, a + 1)) + "\n" for a in range(2, 10)))
    return path


def config(pairs: Path, name: str, **overrides) -> TrainConfig:
    """Test-sized: batch 2 x accumulation 1, short sequences, LoRA."""
    return TrainConfig(pairs=str(pairs), name=name, **{"batch_size": 2, "grad_accum": 1, "max_length": 256,
                                                      "max_steps": 3, "save_steps": 50, **overrides})


def wait_for(predicate, timeout: float, job: TrainingJob) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        status = job.poll()
        assert status["status"] not in ("failed", "finished", "stopped"), status
        assert time.monotonic() < deadline, f"timed out; worker.log:\n{(job.out / 'worker.log').read_text()[-3000:]}"
        time.sleep(0.3)


def test_dpo_run_saves_a_loadable_registered_model(pairs_file: Path) -> None:
    job = start_training(config(pairs_file, "tiny-dpo"))
    status = job.wait(timeout=600)
    assert status["status"] == "finished", (status, (job.out / "worker.log").read_text()[-3000:])
    assert job.returncode == 0

    log = job.read_log()
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        assert record["stage"] == "dpo" and record["max_steps"] == 3
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "learning_rate", "epoch", "elapsed_s", "eta_s"):
            assert isinstance(record[key], (int, float)), key
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert log[-1]["eta_s"] == 0

    card = json.loads((job.out / "card.json").read_text())
    assert card["status"] == "finished" and card["method"] == "lora" and card["global_step"] == 3
    assert card["data"]["rows"] == 8 and len(card["data"]["sha256"]) == 64
    assert card["config"]["learning_rate"] == 5e-5 and card["train_seconds"] > 0
    assert not any((job.out / "model").glob("adapter_*")), "LoRA must be merged into a plain model"

    from fcapp.models.base import SamplingParams, complete
    from fcapp.models.local import LocalModel

    model = LocalModel("tiny-dpo")
    assert model.path == str(job.out / "model")
    reply = complete(model, pair(3, 4)["prompt"], params=SamplingParams(max_new_tokens=8))
    assert reply.text.strip() and reply.completion_tokens > 0

    [listed] = list_models()
    assert listed["name"] == "tiny-dpo" and listed["path"] == str(job.out / "model")
    assert listed["method"] == "lora" and listed["base"] == "smollm2" and "loss" in listed

    again = attach("tiny-dpo")
    assert again.poll()["status"] == "finished" and len(again.read_log()) == 3


def test_killed_worker_fails_clearly_then_resumes_from_its_checkpoint(pairs_file: Path) -> None:
    cfg = config(pairs_file, "killed", max_steps=3, save_steps=1)
    job = start_training(cfg)
    checkpoints = job.out / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), 600, job)
    os.killpg(job.pid, signal.SIGKILL)
    status = job.wait(timeout=30)
    assert status["status"] == "failed"
    assert "SIGKILL" in status["error"] and status["returncode"] == -signal.SIGKILL
    assert attach("killed").poll()["status"] == "failed"  # recorded for a later page reload

    saved = max(int(json.loads(p.read_text())["global_step"]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    cfg.resume = True
    resumed = start_training(cfg)
    status = resumed.wait(timeout=600)
    assert status["status"] == "finished", (status, (resumed.out / "worker.log").read_text()[-3000:])
    steps = [r["step"] for r in resumed.read_log()]
    assert steps == [1, 2, 3], steps  # the log continues where the checkpoint left off
    card = json.loads((resumed.out / "card.json").read_text())
    assert card["resumed_from_step"] == saved >= 1 and card["global_step"] == 3 > card["resumed_from_step"]
    assert (resumed.out / "model" / "config.json").exists()


def test_stop_file_stops_cleanly_and_saves_the_model(pairs_file: Path) -> None:
    job = start_training(config(pairs_file, "stopped", max_steps=200))
    wait_for(lambda: len(job.read_log()) >= 1, 600, job)
    status = job.stop(timeout=300)
    assert status["status"] == "stopped", (status, (job.out / "worker.log").read_text()[-3000:])
    assert job.returncode == 0
    card = json.loads((job.out / "card.json").read_text())
    assert card["status"] == "stopped" and 1 <= card["global_step"] < 200
    assert (job.out / "model" / "config.json").exists()
    assert any((job.out / "checkpoints").glob("checkpoint-*")), "a stopped run can be resumed"


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "line 3: invalid JSON"),
    (json.dumps({"prompt": pair(1, 1)["prompt"], "chosen": pair(1, 1)["chosen"]}), "line 3: missing column(s) rejected"),
    (json.dumps(pair(1, 1) | {"chosen": "final_answer(answer='2')"}), "line 3: column 'chosen' must be a non-empty list"),
], ids=["bad-json", "missing-column", "not-messages"])
def test_broken_pairs_file_fails_in_the_caller(home: Path, line: str, expected: str) -> None:
    path = home / "broken.jsonl"
    path.write_text(json.dumps(pair(1, 2)) + "\n" + json.dumps(pair(2, 3)) + "\n" + line + "\n")
    with pytest.raises(PairsError) as error:
        start_training(config(path, "broken"))
    assert str(path) in str(error.value) and expected in str(error.value)
    assert not (home / "home" / "models" / "broken").exists()  # nothing started


def test_too_long_pairs_are_named_not_truncated(home: Path) -> None:
    path = home / "long.jsonl"
    long = pair(1, 2) | {"rejected": [{"role": "assistant", "content": "no " * 400}]}
    path.write_text(json.dumps(pair(1, 2)) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(PairsError, match=r"1 pair\(s\) exceed max_length=256 tokens: .*line 2 \(\d+ tokens\)"):
        start_training(config(path, "long"))
