"""Iterative self-improvement: each round samples chains with the current model on training problems,
verifies them, trains on them (SFT on the correct ones, or DPO on correct vs incorrect of the same
problem), and evaluates the new model on the held-out split; round k+1 starts from round k's model.

The starting model is evaluated first (round 0), so the log holds one evaluation per round plus that
baseline; every evaluation is also stored in the store. Only this run's own chains train a round (its
models' samples, accumulated over rounds), never a held-out problem. Round k's model is kept in
<out>/round-k/model; the last one is the run's model. A resumed run continues after its last finished
round (sampling skips chains already stored).
"""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path
from typing import Any

from fcapp.training.config import TrainConfig
from fcapp.files import atomic_write_json
from fcapp.training.folder import RunFolder, read_log


def round_model_id(config: TrainConfig, k: int) -> str:
    """The model id a round's chains are stored under (round 0: the base model)."""
    return config.base if k == 0 else f"{config.name}-r{k}"


def evaluate_round(config: TrainConfig, store: Any, model: Any, k: int, on_progress: Any = None) -> dict[str, Any]:
    """Held-out evaluation of round k's model (greedy, the chain settings of the run), stored."""
    from fcapp.evaluate import EvalConfig, evaluate

    name = round_model_id(config, k)
    result = evaluate(EvalConfig(config.tasks[0], [name], split="heldout", limit=config.eval_limit,
                                 max_steps=config.chain_steps, seed=config.seed, max_new_tokens=config.max_new_tokens),
                      store, models={name: model}, on_progress=on_progress)
    summary = result["models"][name]
    return {"accuracy": summary["accuracy"], "accuracy_ci": summary["accuracy_ci"],
            "valid_call_rate": summary["valid_call_rate"], "mean_steps": summary["mean_steps"],
            "eval_id": result.get("eval_id"), "eval_n": result["n"]}


def training_set(config: TrainConfig, store: Any, tokenizer: Any, model_ids: set[str]) -> tuple[list[dict[str, Any]], int]:
    """A round's training rows as trained, from the chains of `model_ids` (this run's models): SFT
    examples of the correct ones or DPO pairs of correct vs incorrect, and how many were dropped for
    exceeding max_length. They are the model's own samples, not a file to refuse: a round over a few
    hundred problems nearly always samples a chain or two longer than the rest, and refusing it would
    throw the round's sampling away."""
    from fcapp.training import dpo, sft
    from fcapp.trainsets import PairPolicy, build_examples, build_pairs

    fitting = dataclasses.replace(config, drop_too_long=True)
    if config.round_method == "sft":
        rows = [r | {"_where": f"chain {r['chain_id']}"}
                for r in build_examples(store, config.tasks[0], ("teacher", "human"), model_ids=model_ids,
                                        grounded_only=config.grounded_only)]
        kept = sft.tokenized_examples(rows, tokenizer, fitting) if rows else []
    else:
        rows = [r | {"_where": f"chains {r['chosen_chain_id']}/{r['rejected_chain_id']}"}
                for r in build_pairs(store, config.tasks[0], PairPolicy(use_reference=False), model_ids=model_ids)]
        kept = dpo.fitting_pairs(rows, tokenizer, fitting) if rows else []
    return kept, len(rows) - len(kept)


def load_round_model(config: TrainConfig, path: str, k: int) -> Any:
    from fcapp.models.local import LocalModel

    model = LocalModel(path)
    model.model_id = round_model_id(config, k)
    return model


def run(config: TrainConfig, folder: RunFolder, card: dict[str, Any], base_path: str) -> tuple[int, dict[str, Any]]:
    """All rounds; returns (rounds finished, the last round's evaluation)."""
    from fcapp.generate import GenerateConfig, generate
    from fcapp.store import Store
    from fcapp.training import dpo, sft
    from fcapp.training.common import load_tokenizer

    task = config.tasks[0]
    store = Store(config.db)
    tokenizer = load_tokenizer(config.base)
    stop = types.SimpleNamespace(is_set=folder.stop_requested)
    done = {r["round"]: r for r in read_log(folder.log_path) if r.get("stage") == "round"} if config.resume else {}
    done = {k: r for k, r in done.items() if k == 0 or (folder.out / f"round-{k}" / "model" / "config.json").exists()}
    folder.keep_log(lambda r: r.get("round") in done and r.get("stage") == "round")
    start = max(done, default=-1) + 1
    card["resumed_from_round"] = start if config.resume else None
    card["data"] = {"task": task, "split": "train", "problems": config.limit}
    path = base_path if start <= 1 else str(folder.out / f"round-{start - 1}" / "model")
    last: dict[str, Any] = dict(done[max(done)]) if done else {}
    for k in range(start, config.rounds + 1):
        if folder.stop_requested():
            folder.stopped = True
            break
        model = load_round_model(config, path, max(k - 1, 0))
        if k == 0:
            last = {"round": 0, "model": config.base, **evaluate_round(config, store, model, 0)}
            folder.log({"stage": "round", "step": 0, "max_steps": config.rounds, **last})
            continue
        generated = generate(GenerateConfig(task, teacher=model.model_id, samples=config.num_generations,
                                            limit=config.limit, split="train", temperature=config.temperature,
                                            top_p=config.top_p, max_steps=config.chain_steps,
                                            max_new_tokens=config.max_new_tokens, seed=config.seed + 1000 * k),
                             store, model, stop=stop)  # type: ignore[arg-type]
        if folder.stop_requested():
            folder.stopped = True
            break
        own = {round_model_id(config, j) for j in range(k)}
        target = folder.out / f"round-{k}"
        target.mkdir(parents=True, exist_ok=True)
        rows, too_long = training_set(config, store, tokenizer, own)
        if rows:
            method = sft if config.round_method == "sft" else dpo
            method.train_stage(config, folder, path, rows, tokenizer, target / "model", config.round_method,
                               extra={"round": k})
        else:  # nothing to learn from this round: the model goes on unchanged
            shutil.copytree(path, target / "model", dirs_exist_ok=True)
        atomic_write_json(target / "card.json", {"prompt": {"demo": config.demo}, "round": k, "trained_rows": len(rows),
                                                 "too_long": too_long, "base": path})
        if folder.stopped:
            break
        path = str(target / "model")
        model = load_round_model(config, path, k)
        last = {"round": k, "model": path, "sampled": generated.done + generated.skipped,
                "sampled_correct": generated.correct + generated.skipped_correct, "train_rows": len(rows),
                "too_long": too_long,
                **evaluate_round(config, store, model, k)}
        folder.log({"stage": "round", "step": k, "max_steps": config.rounds, **last})
    finished = max([r for r in range(1, config.rounds + 1) if (folder.out / f"round-{r}" / "model").exists()],
                   default=0)
    if finished and folder.main:
        _install(folder.out / f"round-{finished}" / "model", folder.out / "model")
    card["rounds"] = [r for r in read_log(folder.log_path) if r.get("stage") == "round"]
    return finished, {k: v for k, v in last.items() if k not in ("model",)}


def _install(source: Path, target: Path) -> None:
    """Copy round k's model as the run's model (replacing an older copy atomically)."""
    staging = target.with_name(f".{target.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)

