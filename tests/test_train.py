"""Training in a worker process, for real: tiny data sets, a few steps of SmolLM2-135M + LoRA with TRL,
for every method (DPO, SFT, GRPO, rounds).

Every run is a separate worker process, as in the app: finish, SIGKILL + resume, STOP file, and bad
input (a broken file, a bad option) that must fail in the caller before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from fcapp.files import read_log
from fcapp.models.registry import list_models
from fcapp.tasks.base import split_of
from fcapp.training import TrainConfig, TrainingJob, attach, list_runs, start_training
from fcapp.trainsets import TrainingDataError

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
    return TrainConfig(data=str(pairs), name=name, **{"batch_size": 2, "grad_accum": 1, "max_length": 256,
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
    assert card["status"] == "finished" and card["method"] == "dpo" and card["adapter"] == "lora"
    assert card["global_step"] == 3
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
    assert listed["method"] == "dpo" and listed["base"] == "smollm2" and "loss" in listed
    [run] = list_runs()
    assert run["name"] == "tiny-dpo" and run["method"] == "dpo" and run["status"] == "finished" and run["step"] == 3

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
    assert card["precomputed_reference"]  # 200 steps pass over the 8 pairs many times: the reference once, up front
    assert (job.out / "model" / "config.json").exists()
    assert any((job.out / "checkpoints").glob("checkpoint-*")), "a stopped run can be resumed"


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", ":3: not valid JSON"),
    (json.dumps({"prompt": pair(1, 1)["prompt"], "chosen": pair(1, 1)["chosen"]}), ":3: 'rejected' must be a list"),
    (json.dumps(pair(1, 1) | {"chosen": "final_answer(answer='2')"}), ":3: 'chosen' must be a list"),
    (json.dumps(pair(1, 1) | {"chosen": []}), ":3: 'chosen' is empty"),
], ids=["bad-json", "missing-column", "not-messages", "empty"])
def test_broken_pairs_file_fails_in_the_caller(home: Path, line: str, expected: str) -> None:
    path = home / "broken.jsonl"
    path.write_text(json.dumps(pair(1, 2)) + "\n" + json.dumps(pair(2, 3)) + "\n" + line + "\n")
    with pytest.raises(TrainingDataError) as error:
        start_training(config(path, "broken"))
    assert str(path) in str(error.value) and expected in str(error.value)
    assert not (home / "home" / "models" / "broken").exists()  # nothing started


def test_too_long_pairs_are_named_not_truncated(home: Path) -> None:
    path = home / "long.jsonl"
    long = pair(1, 2) | {"rejected": [{"role": "assistant", "content": "no " * 400}]}
    path.write_text(json.dumps(pair(1, 2)) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(TrainingDataError, match=r"1 pair\(s\) exceed max_length=256 tokens: .*:2 \(\d+ tokens\)"):
        start_training(config(path, "long"))


def test_bad_options_are_refused_before_a_worker_starts(home: Path, pairs_file: Path) -> None:
    for bad, message in [({"learning_rate": -1.0}, "learning_rate must be a number between 0 and 1"),
                         ({"batch_size": 0}, "batch_size must be at least 1"),
                         ({"method": "grpo", "task": None}, "needs a task"),
                         ({"method": "grpo", "task": "fol", "num_generations": 1}, "at least 2")]:
        with pytest.raises(ValueError, match=message):
            config(pairs_file, "bad", **bad)
    with pytest.raises(ValueError, match="base model '/nonexistent'"):
        start_training(config(pairs_file, "bad", base="/nonexistent"))
    with pytest.raises(ValueError, match="training takes the fp32 weights; int8 is a decoding precision"):
        start_training(config(pairs_file, "bad", base="smollm2@int8"))
    assert not (home / "home" / "models" / "bad").exists()


# ---- SFT ------------------------------------------------------------------------------------------------
@pytest.fixture
def sft_file(home: Path) -> Path:
    """Reference chains of four training problems of `fol`, as `fcapp examples` writes them."""
    from fcapp.trainsets import export_rows
    from helpers import correct_chain

    rows = []
    for pid in ("fol-0-0", "fol-0-1", "fol-0-2", "fol-0-3"):
        chain = correct_chain("fol", pid)
        rows.append({"prompt": chain.prompt, "completion": chain.completion_messages(), "tools": chain.tools,
                     "task": "fol", "problem_id": pid, "source": "reference"})
    path = home / "sft.jsonl"
    export_rows(rows, path, "sft")
    return path


def test_sft_run_trains_on_verified_chains_and_its_model_is_prompted_as_trained(sft_file: Path) -> None:
    job = start_training(config(sft_file, "tiny-sft", method="sft", max_length=1024))
    status = job.wait(timeout=600)
    assert status["status"] == "finished", (status, job.worker_output())
    log = job.read_log()
    assert [r["stage"] for r in log] == ["sft"] * 3 and all(r["loss"] > 0 for r in log)
    card = json.loads((job.out / "card.json").read_text())
    assert card["method"] == "sft" and card["data"]["used"] == 4
    # tokens seen (what the thread chooser divides by) are the packs' tokens, not their masks' entries
    assert 0 < log[-1]["num_input_tokens_seen"] < 3 * 4 * 1024  # 3 epochs of 4 rows under max_length
    assert card["prompt"] == {"demo": False}  # SFT teaches the call format: the demo is left out

    from fcapp.models.local import LocalModel
    from fcapp.solve import SolveConfig, solve
    from fcapp.tasks import get_task

    task = get_task("fol")
    chain = solve(task, task.get("fol-0-13"), LocalModel("tiny-sft"), SolveConfig(max_steps=2, max_new_tokens=48))
    assert [m["role"] for m in chain.prompt] == ["system", "user"]  # no worked example: as it was trained


# ---- GRPO ----------------------------------------------------------------------------------------------
def grpo_config(name: str, **overrides) -> TrainConfig:
    """Test-sized GRPO on `fol`: groups of 2 chains of at most 2 steps on the first training problems."""
    return TrainConfig(name=name, method="grpo", task="fol", **{
        "num_generations": 2, "grad_accum": 1, "limit": 4, "chain_steps": 2, "max_new_tokens": 40, "max_steps": 2,
        "save_steps": 50, **overrides})


def test_grpo_steps_log_reward_and_loss_and_save_a_loadable_model(home: Path) -> None:
    job = start_training(grpo_config("tiny-grpo"))
    status = job.wait(timeout=900)
    assert status["status"] == "finished", (status, job.worker_output())
    log = job.read_log()
    assert [r["step"] for r in log] == [1, 2] and all(r["stage"] == "grpo" for r in log)
    for record in log:
        for key in ("loss", "reward", "rewards/correct/mean", "rewards/valid_calls/mean", "rewards/well_formed/mean",
                    "completions/mean_length"):
            assert isinstance(record[key], (int, float)), key
        assert 0 <= record["rewards/correct/mean"] <= 1
        assert record["completions/mean_length"] > 0  # the model's own tokens, tool results masked
    card = json.loads((job.out / "card.json").read_text())
    assert card["rewards"] == {"correct": 1.0, "valid_calls": 0.2, "well_formed": 0.2}  # brevity is off by default
    assert card["data"] == {"task": "fol", "split": "train", "problems": 4}

    from fcapp.models.base import complete
    from fcapp.models.local import LocalModel

    reply = complete(LocalModel("tiny-grpo"), pair(3, 4)["prompt"])
    assert reply.completion_tokens > 0


def test_a_killed_grpo_worker_is_reported_and_resumes(home: Path) -> None:
    cfg = grpo_config("killed-grpo", max_steps=2, save_steps=1)
    job = start_training(cfg)
    checkpoints = job.out / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), 900, job)
    os.killpg(job.pid, signal.SIGKILL)
    status = job.wait(timeout=30)
    assert status["status"] == "failed" and "SIGKILL" in status["error"]
    cfg.resume = True
    resumed = start_training(cfg)
    status = resumed.wait(timeout=900)
    assert status["status"] == "finished", (status, resumed.worker_output())
    assert [r["step"] for r in resumed.read_log()] == [1, 2]
    card = json.loads((resumed.out / "card.json").read_text())
    assert card["resumed_from_step"] >= 1 and card["global_step"] == 2


# ---- rounds ---------------------------------------------------------------------------------------------
def test_two_rounds_store_one_evaluation_per_round(home: Path) -> None:
    from fcapp.store import Store

    db = home / "rounds.db"
    cfg = TrainConfig(name="tiny-rounds", method="rounds", task="fol", rounds=2, limit=3, num_generations=2,
                      eval_limit=3, chain_steps=2, max_new_tokens=40, max_steps=1, batch_size=2, grad_accum=1,
                      db=str(db))
    job = start_training(cfg)
    status = job.wait(timeout=1200)
    assert status["status"] == "finished", (status, job.worker_output())
    rounds = [r for r in job.read_log() if r["stage"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # the starting model, then each round's model
    for r in rounds:
        assert 0 <= r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] <= 1 and r["eval_n"] == 3
    assert all(r["sampled"] == 6 for r in rounds[1:])  # 3 training problems x 2 samples
    with Store(db) as store:
        evals = store.list_evals(task="fol")
        assert sorted(e["id"] for e in evals) == sorted(r["eval_id"] for r in rounds)
        models = {c["model_id"] for c in store.list_chains(task="fol", limit=1000)}
        assert models == {"smollm2", "tiny-rounds-r1"}  # round 1 samples with the base, round 2 with round 1's model
        problems = {c["problem_id"] for c in store.list_chains(task="fol", limit=1000)}
        assert all(split_of(p) == "train" for p in problems)
    assert (job.out / "round-2" / "model" / "config.json").exists() and (job.out / "model" / "config.json").exists()


@pytest.mark.parametrize("round_method", ["sft", "dpo"])
def test_a_round_drops_and_counts_its_own_chains_too_long_to_train_on(tmp_path: Path, round_method: str) -> None:
    """A round trains on its model's own samples: those longer than max_length are dropped and counted
    (the round's table shows how many), never a reason to throw the round's sampling away (a training
    file holding such rows is refused instead, unless drop_too_long)."""
    from helpers import correct_chain, wrong_chain

    from fcapp.store import Store
    from fcapp.training import dpo
    from fcapp.training.common import load_tokenizer
    from fcapp.training.rounds import training_set

    store = Store(tmp_path / "round.db")
    for pid in ("gsm8k-1", "gsm8k-2", "gsm8k-4"):
        right = correct_chain("gsm8k", pid)
        right.model_id, right.reference = "run-r1", False  # the round's model solved it
        store.add_chain(right, True)
        store.add_chain(wrong_chain("gsm8k", pid, "-1", model_id="run-r1", seed=1), False)  # another sample
    store.add_chain(wrong_chain("gsm8k", "gsm8k-1", "-1", model_id="someone-else"), False)  # not this run's
    tokenizer = load_tokenizer("smollm2")

    def config(max_length: int) -> TrainConfig:
        return TrainConfig(name="run", method="rounds", task="gsm8k", round_method=round_method, max_length=max_length)

    def lengths(rows: list[dict]) -> list[int]:
        if round_method == "sft":
            return [len(r["input_ids"]) for r in rows]
        return dpo.pair_lengths(rows, tokenizer, config(4096))[1]

    every, none_dropped = training_set(config(4096), store, tokenizer, {"run-r1"})
    assert len(every) == 3 and none_dropped == 0  # one example or pair a problem, from this run's chains only
    longest = max(lengths(every))
    kept, too_long = training_set(config(longest - 1), store, tokenizer, {"run-r1"})
    assert too_long == lengths(every).count(longest) >= 1
    assert len(kept) == 3 - too_long and max(lengths(kept)) < longest


def test_reference_log_probs_are_computed_up_front_only_for_more_than_one_pass() -> None:
    """Up front, each pair's reference is computed once for the whole run; in one pass it is needed once
    anyway, so precomputing only pays from the second pass over the pairs."""
    from fcapp.training.dpo import precompute_reference

    def config(**options) -> TrainConfig:
        return TrainConfig(name="x", data="pairs.jsonl", batch_size=2, grad_accum=2, **options)  # 3 steps a pass of 12

    assert precompute_reference(config(epochs=3.0), pairs=12)
    assert precompute_reference(config(max_steps=4), pairs=12)
    assert not precompute_reference(config(epochs=1.0), pairs=12)
    assert not precompute_reference(config(max_steps=3), pairs=12)
    assert not precompute_reference(config(max_steps=1), pairs=12)


# ---- the CLI and the app see the same runs --------------------------------------------------------------
def test_cli_flags_are_the_config_fields() -> None:
    import dataclasses

    from fcapp.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {option for action in train._actions for option in action.option_strings}
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["methods"] != ("rounds",):
            assert (field.metadata["flag"] or "--" + field.name.replace("_", "-")) in flags, field.name


def test_the_worker_trains_on_two_processes_under_accelerate(sft_file: Path, home: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU runs two CPU ranks (gloo):
    both train the same steps, and rank 0 alone writes the run folder's log, status, card and model. On GPUs
    the command is the same (README: training at scale)."""
    import subprocess
    import sys

    from fcapp.training.job import prepare_training

    cfg = config(sft_file, "two-ranks", method="sft", max_length=1024, max_steps=2, batch_size=1)
    config_path = prepare_training(cfg)  # `fcapp train --prepare-only`: checked and written, not started
    assert config_path == cfg.out / "config.json" and not (cfg.out / "status.json").exists()
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "fcapp.training.worker", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, FCAPP_HOME=str(home / "home"), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # both ranks took the same two steps
        assert re.search(rf"^finished: step 2, model in .* \(rank {rank} of 2\)$", done.stdout, re.M), done.stdout[-2000:]
    card = json.loads((cfg.out / "card.json").read_text())
    assert card["processes"] == 2 and card["global_step"] == 2
    status = json.loads((cfg.out / "status.json").read_text())
    assert status["status"] == "finished"
    assert [r["step"] for r in read_log(cfg.out / "log.jsonl")] == [1, 2]  # one line per step: rank 0's only
    assert (cfg.out / "model" / "config.json").exists()
    written = {p.name for p in cfg.out.iterdir()}
    assert written <= {"card.json", "config.json", "log.jsonl", "model", "status.json", "checkpoints"}, written
