"""DPO on preference pairs with TRL's DPOTrainer, optionally after an SFT warm-up on the chosen chains.

DPO has no assistant-only masking: tool results inside `chosen` / `rejected` are scored too, and the
shared prefix (system prompt with the functions, the question) stays in `prompt`. With LoRA the
reference is the same weights with the adapter off, so no second copy is held; when the run covers
its data more than once, the reference log-probs are computed once up front instead of every step.
With `pack` (the default) each pair's prompt is computed once for both completions.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from fcapp.training import sft
from fcapp.training.common import checkpointing, fit_length, lora, run_stage, trainer_args, training_prompt
from fcapp.training.config import TrainConfig
from fcapp.training.folder import RunFolder
from fcapp.training.packing import PairCollator, SharedPromptForward

COLUMNS = ("prompt", "chosen", "rejected")


def pair_lengths(rows: list[dict[str, Any]], tokenizer: Any, config: TrainConfig) -> tuple[list[dict[str, Any]], list[int]]:
    """The pairs as trained (prompt with or without the demo), and the tokens of each one's longer side."""
    def length(messages: list[dict[str, Any]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    pairs = [{"prompt": training_prompt(r["prompt"], config.demo), "chosen": r["chosen"], "rejected": r["rejected"],
              "_where": r["_where"]} for r in rows]
    return pairs, [max(length(p["prompt"] + p["chosen"]), length(p["prompt"] + p["rejected"])) for p in pairs]


def fitting_pairs(rows: list[dict[str, Any]], tokenizer: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """The pairs as trained whose longer side fits max_length."""
    pairs, lengths = pair_lengths(rows, tokenizer, config)
    kept = fit_length([p["_where"] for p in pairs], lengths, config.max_length, config.drop_too_long, "pair(s)")
    return [pairs[i] for i in kept]


def precompute_reference(config: TrainConfig, pairs: int) -> bool:
    """Compute the reference log-probs once when the run passes over its pairs more than once. In one pass
    or less each pair's reference is needed once anyway (computing it up front saves nothing, and for pairs
    a short run never reaches it costs more; measured slower in benchmarks/training_results.md)."""
    steps_per_epoch = math.ceil(pairs / (config.batch_size * config.grad_accum))
    steps = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * steps_per_epoch)
    return steps > steps_per_epoch


def warmup_rows(config: TrainConfig, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SFT rows of the warm-up: --warmup-data, else each pair's prompt -> chosen."""
    if config.warmup_data:
        from fcapp.trainsets import read_training_file

        return read_training_file(config.warmup_data, "sft")
    return [{"prompt": p["prompt"], "completion": p["chosen"], "_where": p["_where"]} for p in pairs]


def run(config: TrainConfig, folder: RunFolder, card: dict[str, Any], base_path: str, tokenizer: Any,
        rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """DPO as the method (warm-up first when asked): checkpointed and resumable, the model in <out>/model."""
    pairs = fitting_pairs(rows, tokenizer, config)
    card["data"]["used"] = len(pairs)
    if config.warmup_steps > 0:
        base_path = sft.warm_up(config, folder, card, base_path, tokenizer, warmup_rows(config, pairs))
        if folder.stopped:  # stopped during the warm-up: the warmed-up model is what there is
            if folder.main:
                shutil.copytree(base_path, folder.out / "model", dirs_exist_ok=True)
            return 0, dict(folder.last)
    return train_stage(config, folder, base_path, pairs, tokenizer, folder.out / "model", "dpo",
                       checkpoints=folder.out / "checkpoints", card=card)


def train_stage(config: TrainConfig, folder: RunFolder, base_path: str, pairs: list[dict[str, Any]], tokenizer: Any,
                target: Path, stage: str, checkpoints: Path | None = None, card: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """DPO on `pairs` (already fitted) from `base_path`, the model saved to `target` (see common.run_stage)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    precompute = config.precompute_ref if config.precompute_ref is not None else precompute_reference(config, len(pairs))
    if card is not None:
        card["precomputed_reference"] = precompute
    folder.status("running", stage="reference log-probs" if precompute else "loading")

    def make_trainer(model: Any, output_dir: Path, callbacks: list[Any]) -> Any:
        args = DPOConfig(**trainer_args(config, output_dir, **(checkpointing(config) if checkpoints else {})),
                         beta=config.beta, max_length=config.max_length, precompute_ref_log_probs=precompute)
        trainer, collator = ((_shared_prompt_trainer(), PairCollator(tokenizer.pad_token_id or 0)) if config.pack
                             else (DPOTrainer, None))
        return trainer(model=model, args=args, train_dataset=Dataset.from_list([{c: p[c] for c in COLUMNS}
                                                                                for p in pairs]),
                       processing_class=tokenizer, callbacks=callbacks, peft_config=lora(config),
                       data_collator=collator)

    return run_stage(config, folder, stage, base_path, tokenizer, target, make_trainer, checkpoints, card, extra)


def _shared_prompt_trainer() -> type:
    """TRL's DPOTrainer with each pair's prompt computed once for both completions (see training.packing):
    the policy's and the reference's forward passes run on the packed pairs; TRL's loss is untouched. The
    reference goes the same packed way as the policy, so at step 1 the two agree exactly (a padded reference
    beside a packed policy differs by bf16 rounding: a loss of 0.689 instead of log 2)."""
    from trl import DPOTrainer

    class SharedPromptDPO(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.precompute_ref_logps = True  # TRL's loss then reads each batch's reference from the batch

        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            packed = inputs.pop("packed")
            if "ref_chosen_logps" not in inputs:  # not precomputed up front: this batch's, now
                inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = super().compute_ref_log_probs(
                    SharedPromptForward(self.ref_model or self.model, packed), inputs)
            return super()._compute_loss(SharedPromptForward(model, packed), inputs, return_outputs)

        def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
            packed = inputs.pop("packed")
            return super().compute_ref_log_probs(SharedPromptForward(model, packed), inputs)

    return SharedPromptDPO
