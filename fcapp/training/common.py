"""What every training method shares inside the worker: the tokenizer and model, LoRA, TRL settings,
saving, checkpoints, the callback that writes the run folder's log and honours STOP, and the CPU
thread choice."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from fcapp.records import Message
from fcapp.training.config import TrainConfig
from fcapp.training.folder import RunFolder, read_json, read_log


def score_trained_positions_only() -> None:
    """Make TRL's fused LM head project only the positions it trains on, on every device. TRL 1.16 does so
    where Triton runs and scores every position elsewhere (a choice made for Neuron, which recompiles per
    shape); on a CPU that dense pass over the whole vocabulary was 40% of an SFT step and most of a DPO
    step. The log-probs are the same (tests/test_packing.py checks it against TRL's own path)."""
    import trl.trainer.utils as trl_utils

    trl_utils._use_triton = lambda device: True  # read only where the fused head picks compact scoring


def load_tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    from fcapp.models.registry import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(base))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX): then bf16 autocast runs a
    training step of SmolLM2-135M about 2x faster than fp32 (benchmarks/README.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def use_bf16(config: TrainConfig) -> bool:
    import torch

    if config.bf16 is not None:
        return config.bf16
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def trainer_args(config: TrainConfig, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Settings every stage shares; TRL's defaults (bf16 everywhere, checkpointing, lr 1e-6, logging every
    10 steps, reporting to trackers) are overridden explicitly."""
    import torch

    args = dict(
        output_dir=str(output_dir), learning_rate=config.learning_rate, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, num_train_epochs=config.epochs, max_steps=config.max_steps,
        seed=config.seed, bf16=use_bf16(config), use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False, logging_steps=1, report_to="none", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True, eval_strategy="no",
        include_num_input_tokens_seen="non_padding", save_strategy="no",
    )
    return args | overrides


def checkpointing(config: TrainConfig) -> dict[str, Any]:
    """Checkpoint every `save_steps`, keeping the last two (a resumed run starts from the newest)."""
    return dict(save_strategy="steps", save_steps=config.save_steps, save_total_limit=2)


def lora(config: TrainConfig) -> Any:
    if config.adapter != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets, task_type="CAUSAL_LM")


def load_model(path: str, config: TrainConfig, attention: str | None = None) -> Any:
    """fp32 weights (bf16=True is autocast: AdamW on bf16 weights would round away updates as small as a
    preference-tuning learning rate), except a frozen LoRA base on a GPU, which bf16 halves. `attention`: an
    attention implementation registered by name (SFT's packs: packing.packed_attention), else transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    frozen_bf16 = torch.cuda.is_available() and use_bf16(config) and config.adapter == "lora"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if frozen_bf16 else torch.float32,
                                                attn_implementation=attention)


def save_model(trainer: Any, tokenizer: Any, target: Path, adapter: str) -> None:
    """Save a plain transformers folder (LoRA merged), atomically replacing `target`."""
    staging = target.with_name(f".{target.name}.saving")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    if adapter == "lora":
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        merged = unwrapped.merge_and_unload() if hasattr(unwrapped, "merge_and_unload") else unwrapped
        if trainer.is_world_process_zero():
            merged.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # gathers sharded weights under DeepSpeed / FSDP
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def last_checkpoint(folder: Path, main: bool) -> Path | None:
    """The newest complete checkpoint; ones cut short by a kill (no readable trainer_state.json,
    which the Trainer writes last) are removed."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        if not re.fullmatch(r"checkpoint-\d+", path.name):
            continue
        if read_json(path / "trainer_state.json") is not None:
            complete.append(path)
        elif main:
            shutil.rmtree(path, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]), default=None)


def training_prompt(prompt: list[Message], demo: bool) -> list[Message]:
    """The prompt a row is trained with: as stored, or without the worked demonstration (the messages
    between the system prompt and the question), which a tuned model no longer needs."""
    if demo or len(prompt) <= 2:
        return list(prompt)
    system = [m for m in prompt[:1] if m.get("role") == "system"]
    return system + prompt[-1:]


def fit_length(wheres: list[str], lengths: list[int], max_length: int, drop: bool, what: str) -> list[int]:
    """The indices of the rows (named by `wheres`, file:line) whose token length fits `max_length` (TRL
    would cut the rest off). Too long rows are an error naming them, or dropped when `drop` (then at
    least one must remain)."""
    from fcapp.trainsets import TrainingDataError

    too_long = [(where, n) for where, n in zip(wheres, lengths) if n > max_length]
    if too_long and (not drop or len(too_long) == len(lengths)):
        shown = "; ".join(f"{where} ({n} tokens)" for where, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        longest = max(n for _, n in too_long)
        raise TrainingDataError(f"{len(too_long)} {what} exceed max_length={max_length} tokens: {shown}{more}. "
                                f"Set max_length >= {longest}" + ("" if drop else " or drop_too_long=True"))
    return [i for i, n in enumerate(lengths) if n <= max_length]


def run_callback(folder: RunFolder, stage: str, elapsed_offset: float = 0.0, checkpoint_on_stop: bool = True,
                 extra: dict[str, Any] | None = None) -> Any:
    """A TrainerCallback writing one log.jsonl line per logged step (`stage`, step, max_steps, every number
    TRL logs, elapsed and ETA, plus `extra`), and stopping every rank at the same step when STOP appears."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        accelerator: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.first_step = time.monotonic(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # the end-of-training summary goes to the card instead
                return
            elapsed = time.monotonic() - self.began
            per_step = elapsed / max(state.global_step - self.first_step, 1)
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            folder.log({"stage": stage, "step": state.global_step, "max_steps": state.max_steps, **(extra or {}),
                        **numbers, "elapsed_s": round(elapsed_offset + elapsed, 2),
                        "eta_s": round(per_step * (state.max_steps - state.global_step), 1), "time": time.time()})

        def on_step_end(self, args, state, control, **kwargs):
            if folder.stop_requested():
                self.accelerator.set_trigger()
            if self.accelerator.check_trigger():
                folder.stopped = True
                control.should_training_stop = True
                control.should_save = checkpoint_on_stop  # a stopped run can be resumed from here
            return control

    return RunCallback()


def thread_callback(config: TrainConfig) -> Any:
    """On a CPU without a fixed `threads`: time each optimizer step per token seen and keep the thread count
    that is cheaper (two threads that wait for each other while another job holds a core are several
    times slower than one; on an idle machine both cores help). Same chooser as decoding."""
    import torch
    from transformers import TrainerCallback

    from fcapp.models.cpu import ThreadChooser

    if torch.cuda.is_available():
        return None
    if config.threads:
        torch.set_num_threads(config.threads)
        return None

    class ThreadCallback(TrainerCallback):
        def __init__(self) -> None:
            self.chooser = ThreadChooser(torch.get_num_threads())
            self.chooser.current = self.chooser.choices[-1]  # all cores first: a step is long, probing one is cheap
            self.began, self.tokens, self.threads = 0.0, 0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.threads = self.chooser.next()
            torch.set_num_threads(self.threads)
            self.began, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            tokens = max(1, state.num_input_tokens_seen - self.tokens)
            self.chooser.record(self.threads, (time.perf_counter() - self.began) / tokens)

    return ThreadCallback()


def run_stage(config: TrainConfig, folder: RunFolder, stage: str, base_path: str, tokenizer: Any, target: Path,
              make_trainer: Callable[[Any, Path, list[Any]], Any], checkpoints: Path | None = None,
              card: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
              attention: str | None = None) -> tuple[int, dict[str, Any]]:
    """Run one trainer (`make_trainer(model, output_dir, callbacks)`) from `base_path` and save its model to
    `target`; returns (global step, the last logged metrics plus `train_loop_s`, the trainer's set-up and steps
    without model loading and saving). With a `checkpoints` folder the stage checkpoints there and resumes from
    it (config.resume), its log lines after the checkpoint dropped; without one (a warm-up, a round) a killed
    stage is redone. Log lines carry `stage` and `extra`; the model loads with `attention` (see load_model)."""
    run_dir = checkpoints or folder.out / f".{stage}-run"
    checkpoint = last_checkpoint(checkpoints, folder.main) if checkpoints and config.resume else None
    resumed = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
    if checkpoints:
        folder.keep_log(lambda r: r.get("stage") != stage or r["step"] <= resumed)
        if card is not None:
            card["resumed_from_step"] = resumed if config.resume else None
    previous = [r for r in read_log(folder.log_path) if r.get("stage") == stage]
    callback = run_callback(folder, stage, previous[-1]["elapsed_s"] if previous else 0.0,
                            checkpoint_on_stop=checkpoints is not None, extra=extra)
    model = load_model(base_path, config, attention)
    began = time.monotonic()
    trainer = make_trainer(model, run_dir, [c for c in (callback, thread_callback(config)) if c is not None])
    callback.accelerator = trainer.accelerator
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    loop_seconds = round(time.monotonic() - began, 2)
    save_model(trainer, tokenizer, target, config.adapter)
    if checkpoints is None and folder.main:
        shutil.rmtree(run_dir, ignore_errors=True)
    last = {k: v for k, v in folder.last.items() if k not in ("stage", "step", "max_steps", "time", "round")}
    return trainer.state.global_step, last | dict(output.metrics) | {"train_loop_s": loop_seconds}
