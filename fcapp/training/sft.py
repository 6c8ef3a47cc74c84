"""SFT on verified chains with TRL's SFTTrainer: the loss covers the model's own turns only (its calls
and the end-of-turn token after each); tool results, the prompt and chat scaffolding are masked. Used
as a method of its own, as the warm-up stage before DPO or GRPO, and in each round of `rounds`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fcapp.training.common import checkpointing, fit_length, lora, run_stage, trainer_args, training_prompt
from fcapp.training.config import TrainConfig
from fcapp.training.folder import RunFolder
from fcapp.training.packing import PackedCollator, pack, register_packed_attention
from fcapp.training.tokens import tokenize_chain


def example_tokens(rows: list[dict[str, Any]], tokenizer: Any, config: TrainConfig) -> list[Any]:
    """Each row (prompt, completion) tokenized as trained (prompt with or without the demo)."""
    return [tokenize_chain(tokenizer, training_prompt(row["prompt"], config.demo), row["completion"]) for row in rows]


def tokenized_examples(rows: list[dict[str, Any]], tokenizer: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """Rows (prompt, completion) as SFTTrainer's pre-tokenized rows: input_ids and assistant_masks.
    Rows over max_length are refused (or dropped with drop_too_long), never truncated."""
    tokens = example_tokens(rows, tokenizer, config)
    kept = fit_length([row["_where"] for row in rows], [t.length for t in tokens], config.max_length,
                      config.drop_too_long, "SFT examples")
    return [{"input_ids": tokens[i].prompt_ids + tokens[i].completion_ids, "assistant_masks": tokens[i].assistant_masks}
            for i in kept]


def run(config: TrainConfig, folder: RunFolder, card: dict[str, Any], base_path: str, tokenizer: Any,
        rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """SFT as the method: checkpointed and resumable, the model saved as <out>/model."""
    examples = tokenized_examples(rows, tokenizer, config)
    card["data"]["used"] = len(examples)
    return train_stage(config, folder, base_path, examples, tokenizer, folder.out / "model", "sft",
                       checkpoints=folder.out / "checkpoints", card=card)


def warm_up(config: TrainConfig, folder: RunFolder, card: dict[str, Any], base_path: str, tokenizer: Any,
            rows: list[dict[str, Any]]) -> str:
    """The SFT warm-up before DPO or GRPO (`warmup_steps` steps on `rows`, saved as <out>/warmup); returns
    the path the next stage starts from. A resumed run keeps a finished warm-up; a killed one is redone."""
    warm = folder.out / "warmup"
    if not (config.resume and (warm / "config.json").exists()):
        folder.keep_log(lambda r: r.get("stage") != "warmup")
        examples = tokenized_examples(rows, tokenizer, config)
        train_stage(dataclasses.replace(config, max_steps=config.warmup_steps), folder, base_path, examples,
                    tokenizer, warm, "warmup")
    card["warmup_path"] = str(warm)
    return str(warm)


def train_stage(config: TrainConfig, folder: RunFolder, base_path: str, examples: list[dict[str, Any]],
                tokenizer: Any, target: Path, stage: str, checkpoints: Path | None = None,
                card: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """SFT on tokenized `examples` from `base_path`, the model saved to `target` (see common.run_stage)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # One pack a batch, so no padding: its tokens are all its input_ids (counted from the 4D attention mask,
    # the Trainer's "non_padding" count would be the pack's length squared, and the thread chooser times
    # steps per token).
    packed = dict(per_device_train_batch_size=1, max_length=None, remove_unused_columns=False,
                  include_num_input_tokens_seen="all") if config.pack else {}
    rows = pack(examples, config.batch_size, config.seed) if config.pack else examples

    def make_trainer(model: Any, output_dir: Path, callbacks: list[Any]) -> Any:
        args = SFTConfig(**trainer_args(config, output_dir, max_length=config.max_length,
                                        **(checkpointing(config) if checkpoints else {})) | packed)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          data_collator=PackedCollator(tokenizer.pad_token_id or 0) if config.pack else None,
                          callbacks=callbacks, peft_config=lora(config))

    attention = register_packed_attention() if config.pack and config.attend_by_piece else None
    return run_stage(config, folder, stage, base_path, tokenizer, target, make_trainer, checkpoints, card, extra,
                     attention)
