"""DPO training of a small model on curated preference pairs, run in a worker process.

The app (or CLI) calls `start_training(config)`: the pairs file is validated in the caller (a broken
file fails at once, naming file and line), then `python -m fcapp.train --config <out>/config.json`
runs in its own process group so a crash or an OOM kill never takes the app down. The worker
(`train()`) writes, under `<out>` (default `models_dir()/<name>`):

- `log.jsonl`: one line per optimizer step (loss, rewards/*, learning rate, epoch, elapsed, ETA);
- `status.json`: starting / running / finished / stopped / failed (with the error);
- `checkpoints/`: the last two checkpoints, for `resume=True`;
- `model/`: the tuned model as a plain transformers folder (LoRA merged in), loadable by
  `fcapp.models.local.LocalModel(name)`, and `card.json` describing the run.

A `STOP` file in `<out>` (what `TrainingJob.stop()` writes) or SIGTERM ends the run after the
current step, saving a checkpoint and the model trained so far (`start_training` removes a leftover
STOP file; delete it yourself before relaunching a worker by hand). `attach(name)` reconnects to a
run (after a page reload) from its folder.

DPO here has no assistant-only masking: tool results inside `chosen` / `rejected` are scored too,
and the shared prefix (system prompt with the functions, the demo, the question) stays in `prompt`.

Multi-GPU (DDP): the worker is a plain HF Trainer script, so the same config (a JSON object of
TrainConfig fields, e.g. the `config.json` a run leaves in its folder) runs unchanged with
    accelerate launch --num_processes 4 -m fcapp.train --config run.json
Only rank 0 writes log, status, card and model; a STOP file stops every rank at the same step; on
a GPU bf16 autocast is on by default. `batch_size` is per device.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

from fcapp.paths import models_dir, safe_name

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# TRL's 1e-6 barely moves a 135M model in the few dozen steps a CPU run affords. Adam moves LoRA's
# zero-initialised B matrices only as fast as the learning rate, so LoRA takes ~10x the full rate.
# Measured on SmolLM2-135M (batch 2 x 2): LoRA 5e-5 took the loss 0.693 -> 0.41 in 3 steps on
# ~490-token pairs; full 5e-6 took it 0.693 -> 0.054 in 10 steps (DESIGN.md).
DEFAULT_LR = {"lora": 5e-5, "full": 5e-6}
TERMINAL = ("finished", "stopped", "failed")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class PairsError(ValueError):
    """The preference-pairs file cannot be trained on; the message names the file and the line."""


class StopSignal(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class TrainConfig:
    """One DPO run, in short names mapped onto TRL's DPOConfig (batch_size ->
    per_device_train_batch_size, grad_accum -> gradient_accumulation_steps, epochs ->
    num_train_epochs). Defaults suit a few hundred curated pairs on a CPU: 2 x 2 = 4 pairs per
    update averages the preference signal while a step stays short; 3 epochs."""

    pairs: str  # JSONL or Parquet with prompt / chosen / rejected message lists
    name: str  # folder-safe model name; the run lives in models_dir()/<name> unless out_dir is set
    base: str = "smollm2"  # model spec for resolve_model_path: embedded, a tuned name, a folder, a hub id
    method: Literal["lora", "full"] = "lora"
    epochs: float = 3.0
    learning_rate: float | None = None  # None: DEFAULT_LR[method]
    beta: float = 0.1
    batch_size: int = 2  # per device
    grad_accum: int = 2
    max_length: int = 1024  # prompts with the functions and a demo take ~400-700 tokens
    drop_too_long: bool = False  # False: a pair longer than max_length is an error (it would be truncated)
    max_steps: int = -1  # > 0 overrides epochs
    save_steps: int = 50  # checkpoint interval (the last 2 are kept)
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05  # acts in the SFT warm-up; DPO zeroes every dropout (TRL's disable_dropout)
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    sft_warmup_steps: int = 0  # SFT steps on prompt + chosen before DPO; DPO's reference is then that model
    bf16: bool | None = None  # None: bf16 on a CUDA GPU that supports it, fp32 on CPU
    resume: bool = False  # continue from the last checkpoint in <out>/checkpoints
    out_dir: str | None = None

    def __post_init__(self) -> None:
        safe_name(self.name, "model name")
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', not {self.method!r}")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.method]
        for key in ("batch_size", "grad_accum", "max_length", "save_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        self.pairs = str(self.pairs)
        self.out_dir = str(self.out_dir or models_dir() / self.name)

    @property
    def out(self) -> Path:
        return Path(str(self.out_dir))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "TrainConfig":
        if not isinstance(record, dict):
            raise ValueError(f"a training config is an object of TrainConfig fields, not {type(record).__name__}")
        unknown = set(record) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**record)


@dataclass
class TrainResult:
    status: str  # finished | stopped | failed
    out_dir: Path
    model_dir: Path | None  # None when nothing was saved (stopped before the first step)
    global_step: int
    metrics: dict[str, float]
    train_seconds: float
    card: dict[str, Any]


# ---- pairs ---------------------------------------------------------------------------------------
def _check_messages(value: Any, column: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise PairsError(f"{where}: column {column!r} must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise PairsError(f"{where}: {column}[{i}] must be a message {{'role': str, 'content': str}}")


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL / Parquet preference file, checked; a PairsError names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{path}: pairs file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = [(f"{path}: row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise PairsError(f"{path}: not a readable Parquet file: {exc}") from None
    else:
        records = []
        try:
            lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON keeps U+2028, U+0085 raw
        except (OSError, UnicodeDecodeError) as exc:
            raise PairsError(f"{path}: cannot read: {exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PairsError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # nested too deeply, an integer over 4300 digits
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
                raise PairsError(f"{where}: invalid JSON ({reason})") from None
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise PairsError(f"{where}: expected a JSON object with {', '.join(PAIR_COLUMNS)}")
        missing = [c for c in PAIR_COLUMNS if c not in record]
        if missing:
            raise PairsError(f"{where}: missing column(s) {', '.join(missing)}")
        for column in PAIR_COLUMNS:
            _check_messages(record[column], column, where)
        # Only the TRL columns are trained on. `tools` is dropped on purpose: the functions are
        # already rendered into the system prompt, and SmolLM2's chat template ignores `tools`.
        rows.append({c: record[c] for c in PAIR_COLUMNS} | {"_where": where})
    if not rows:
        raise PairsError(f"{path}: no preference pairs in the file")
    return rows


def fit_length(rows: list[dict[str, Any]], tokenizer: Any, max_length: int, drop: bool) -> list[dict[str, Any]]:
    """Rows whose prompt + chosen / rejected fit max_length tokens (TRL would cut the completion off).

    Too long rows are an error naming them, or dropped when `drop` (then at least one must remain)."""
    def length(messages: list[dict[str, Any]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    fitting, too_long = [], []
    for row in rows:
        longest = max(length(row["prompt"] + row["chosen"]), length(row["prompt"] + row["rejected"]))
        (too_long if longest > max_length else fitting).append((row, longest))
    if too_long and (not drop or not fitting):
        shown = "; ".join(f"{row['_where']} ({n} tokens)" for row, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        longest = max(n for _, n in too_long)
        raise PairsError(f"{len(too_long)} pair(s) exceed max_length={max_length} tokens: {shown}{more}. "
                         f"Set max_length >= {longest}" + ("" if drop else " or drop_too_long=True"))
    return [row for row, _ in fitting]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    from fcapp.models.local import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(base))


def validate(config: TrainConfig) -> dict[str, Any]:
    """Check the pairs file against the config before any process starts; returns a summary."""
    rows = read_pairs(config.pairs)
    kept = fit_length(rows, load_tokenizer(config.base), config.max_length, config.drop_too_long)
    return {"path": config.pairs, "rows": len(rows), "used": len(kept), "sha256": file_sha256(config.pairs)}


# ---- files shared by worker and caller ----------------------------------------------------------
def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log; a partial (still being written) last line is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except OSError:
        return []
    records = []
    for line in lines:
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Run:
    """The worker's view of its folder: log, status, stop requests (only rank 0 writes)."""

    def __init__(self, config: TrainConfig, stop_event: StopSignal | None, on_log: Callable[[dict], None] | None,
                 main: bool) -> None:
        self.config, self.out, self.main = config, config.out, main
        self.stop_event, self.on_log = stop_event, on_log
        self.log_path, self.status_path, self.stop_path = self.out / "log.jsonl", self.out / "status.json", self.out / "STOP"
        self.stopped = False
        self.last: dict[str, Any] = {}

    def stop_requested(self) -> bool:
        return bool(self.stop_event is not None and self.stop_event.is_set()) or self.stop_path.exists()

    def status(self, status: str, **extra: Any) -> None:
        if self.main:
            _write_json(self.status_path, {"status": status, "pid": os.getpid(), "name": self.config.name,
                                           "updated": _now(), **extra})

    def keep_log(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite log.jsonl with the records `keep` accepts (a resumed run redoes the rest)."""
        if self.main:
            records = [r for r in read_log(self.log_path) if keep(r)]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(self, record: dict[str, Any]) -> None:
        self.last = record
        if self.main:
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            self.status("running", stage=record["stage"], step=record["step"], max_steps=record["max_steps"],
                        eta_s=record["eta_s"])
        if self.on_log is not None:
            self.on_log(record)


def _callback(run: _Run, stage: str, elapsed_offset: float = 0.0) -> Any:
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """One log.jsonl line per logging step; stops every rank at the same step on request."""

        accelerator: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.first_step = time.monotonic(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # the end-of-training summary goes to the card instead
                return
            elapsed = time.monotonic() - self.began
            per_step = elapsed / max(state.global_step - self.first_step, 1)
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            run.log({"stage": stage, "step": state.global_step, "max_steps": state.max_steps, **numbers,
                     "elapsed_s": round(elapsed_offset + elapsed, 2),
                     "eta_s": round(per_step * (state.max_steps - state.global_step), 1), "time": time.time()})

        def on_step_end(self, args, state, control, **kwargs):
            if run.stop_requested():
                self.accelerator.set_trigger()
            if self.accelerator.check_trigger():
                run.stopped = True
                control.should_training_stop = True
                control.should_save = stage == "dpo"  # a stopped run can be resumed from here
            return control

    return RunCallback()


# ---- the worker ----------------------------------------------------------------------------------
def _use_bf16(config: TrainConfig) -> bool:
    import torch

    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _trainer_args(config: TrainConfig) -> dict[str, Any]:
    """Settings shared by the SFT and DPO stages; TRL's defaults (bf16, checkpointing, lr 1e-6,
    logging every 10 steps) are overridden explicitly."""
    import torch

    return dict(
        learning_rate=config.learning_rate, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length, seed=config.seed,
        bf16=_use_bf16(config), activation_checkpointing=False, logging_steps=1, report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True,
        eval_strategy="no",
    )


def _lora(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets, task_type="CAUSAL_LM")


def _load_model(path: str, config: TrainConfig) -> Any:
    """fp32 weights, except a frozen LoRA base under bf16: bf16=True means autocast, and AdamW on bf16
    weights would round away updates as small as a DPO learning rate."""
    import torch
    from transformers import AutoModelForCausalLM

    frozen_bf16 = _use_bf16(config) and config.method == "lora"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)


def _save_model(trainer: Any, tokenizer: Any, target: Path, method: str) -> None:
    """Save a plain transformers folder (LoRA merged), atomically replacing `target`."""
    staging = target.with_name(f".{target.name}.saving")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    if method == "lora":
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # gathers sharded weights under DeepSpeed / FSDP
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def _last_checkpoint(folder: Path, main: bool) -> Path | None:
    """The newest complete checkpoint; ones cut short by a kill (no readable trainer_state.json,
    which the Trainer writes last) are removed."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        if not re.fullmatch(r"checkpoint-\d+", path.name):
            continue
        if _read_json(path / "trainer_state.json") is not None:
            complete.append(path)
        elif main:
            shutil.rmtree(path, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]), default=None)


def _sft_warmup(config: TrainConfig, run: _Run, base_path: str, rows: list[dict], tokenizer: Any) -> Path:
    """Supervised steps on prompt -> chosen, saved as <out>/sft, which DPO then starts from and uses
    as its reference (standard SFT-then-DPO). Not checkpointed: a killed warm-up is redone."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    target = run.out / "sft"
    args = SFTConfig(output_dir=str(run.out / ".sft-run"), max_steps=config.sft_warmup_steps,
                     save_strategy="no", **_trainer_args(config))
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    callback = _callback(run, "sft")
    trainer = SFTTrainer(model=_load_model(base_path, config), args=args, train_dataset=data,
                         processing_class=tokenizer, callbacks=[callback],
                         peft_config=_lora(config) if config.method == "lora" else None)
    callback.accelerator = trainer.accelerator
    trainer.train()
    _save_model(trainer, tokenizer, target, config.method)
    shutil.rmtree(run.out / ".sft-run", ignore_errors=True)
    return target


def train(config: TrainConfig, stop_event: StopSignal | None = None,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Run SFT warm-up (optional) and DPO in this process; writes log, status, checkpoints, model, card.

    Raises on failure after recording status "failed" (the worker turns that into its exit code)."""
    from accelerate import PartialState

    main = PartialState().is_main_process
    run = _Run(config, stop_event, on_log, main)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
    started, began = _now(), time.monotonic()
    card: dict[str, Any] = {"name": config.name, "base": config.base, "method": config.method,
                            "config": config.to_dict(), "started": started}
    run.status("running", stage="loading")
    try:
        result = _train(config, run, card)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        card |= {"status": "failed", "error": message, "finished": _now(),
                 "train_seconds": round(time.monotonic() - began, 1)}
        if main:
            _write_json(run.out / "card.json", card)
        run.status("failed", error=message)
        raise
    result.train_seconds = card["train_seconds"] = round(time.monotonic() - began, 1)
    card["finished"] = _now()
    if main:
        _write_json(run.out / "card.json", card)
    run.status(result.status, step=result.global_step, model=str(result.model_dir) if result.model_dir else None)
    result.card = card
    return result


def _train(config: TrainConfig, run: _Run, card: dict[str, Any]) -> TrainResult:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fcapp.models.local import resolve_model_path

    tokenizer = load_tokenizer(config.base)
    base_path = resolve_model_path(config.base)
    all_rows = read_pairs(config.pairs)
    rows = fit_length(all_rows, tokenizer, config.max_length, config.drop_too_long)
    card["base_path"] = base_path
    card["data"] = {"path": config.pairs, "sha256": file_sha256(config.pairs), "rows": len(all_rows),
                    "used": len(rows)}

    checkpoints = run.out / "checkpoints"
    checkpoint = _last_checkpoint(checkpoints, run.main) if config.resume else None
    sft_done = config.sft_warmup_steps > 0 and (run.out / "sft" / "config.json").exists() and config.resume
    resumed_step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
    run.keep_log(lambda r: (r.get("stage") == "sft" and sft_done) or (r.get("stage") == "dpo" and r["step"] <= resumed_step))
    previous = [r for r in read_log(run.log_path) if r.get("stage") == "dpo"]
    card["resumed_from_step"] = resumed_step if config.resume else None

    if config.sft_warmup_steps > 0:
        if not sft_done:
            _sft_warmup(config, run, base_path, rows, tokenizer)
        base_path = card["sft_path"] = str(run.out / "sft")
        if run.stopped:  # stopped during the warm-up: the SFT model is what there is
            if run.main:
                shutil.copytree(base_path, run.out / "model", dirs_exist_ok=True)
            return _result(run, card, 0, dict(run.last))

    args = DPOConfig(output_dir=str(checkpoints), num_train_epochs=config.epochs, max_steps=config.max_steps,
                     beta=config.beta, save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
                     **_trainer_args(config))
    data = Dataset.from_list([{c: r[c] for c in PAIR_COLUMNS} for r in rows])
    callback = _callback(run, "dpo", previous[-1]["elapsed_s"] if previous else 0.0)
    # LoRA: the reference is the same weights with the adapter disabled, so no second copy is held.
    trainer = DPOTrainer(model=_load_model(base_path, config), args=args, train_dataset=data,
                         processing_class=tokenizer, callbacks=[callback],
                         peft_config=_lora(config) if config.method == "lora" else None)
    callback.accelerator = trainer.accelerator
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _save_model(trainer, tokenizer, run.out / "model", config.method)
    last = {k: v for k, v in run.last.items() if k not in ("stage", "step", "max_steps", "time")}
    return _result(run, card, trainer.state.global_step, last | dict(output.metrics))


def _result(run: _Run, card: dict[str, Any], step: int, metrics: dict[str, Any]) -> TrainResult:
    status = "stopped" if run.stopped else "finished"
    card |= {"status": status, "global_step": step, "metrics": metrics}
    return TrainResult(status, run.out, run.out / "model", step, metrics, 0.0, card)


# ---- the caller's side ---------------------------------------------------------------------------
_CHILDREN: dict[Path, subprocess.Popen] = {}  # workers this process started, so attach() can reap them


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
            return "\n".join(handle.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by signal {name}" + (" (out of memory, or killed by hand)" if name == "SIGKILL" else "")
    return f"exited with code {code}"


def _pid_state(pid: int) -> tuple[bool, int | None]:
    """(alive, exit code if known) of a worker this process may not have started."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)  # reaps it when it is our child
        return (True, None) if done == 0 else (False, os.waitstatus_to_exitcode(status))
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return (stat.rsplit(")", 1)[1].split()[0] != "Z" and b"fcapp.train" in cmdline), None
    except OSError:
        if not Path("/proc").is_dir():  # no procfs: best effort
            try:
                os.kill(pid, 0)
                return True, None
            except OSError:
                pass
        return False, None


class TrainingJob:
    """A training run seen from outside its worker: status, log, stop. Safe to poll from a UI."""

    def __init__(self, out_dir: str | Path, process: subprocess.Popen | None = None) -> None:
        self.out = Path(out_dir)
        self.process = process
        self.status_path, self.log_path = self.out / "status.json", self.out / "log.jsonl"
        self.worker_log = self.out / "worker.log"

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return (_read_json(self.status_path) or {}).get("pid")

    @property
    def returncode(self) -> int | None:
        if self.process is not None:
            return self.process.poll()
        return (_read_json(self.status_path) or {}).get("returncode")

    def _exit(self) -> tuple[bool, int | None]:
        if self.process is not None:
            code = self.process.poll()
            return code is None, code
        pid = self.pid
        return _pid_state(pid) if pid else (False, None)

    def poll(self) -> dict[str, Any]:
        """The status record: status (starting/running/finished/stopped/failed), error, step, max_steps,
        eta_s, pid ... A worker that died without reporting (SIGKILL, OOM, crash) becomes "failed"
        with the cause and the last lines of worker.log, written back so a later attach sees it."""
        info = _read_json(self.status_path) or {"status": "starting"}
        if info["status"] in TERMINAL:
            if self.process is not None:
                info["returncode"] = self.process.poll()
            return info
        alive, code = self._exit()
        if alive:
            return info
        info = _read_json(self.status_path) or info  # it may have reported just before exiting
        if info["status"] in TERMINAL:
            return info | {"returncode": code}
        cause = _describe_exit(code) if code is not None else "ended without reporting (killed or crashed)"
        tail = _log_tail(self.worker_log)
        info |= {"status": "failed", "returncode": code, "updated": _now(),
                 "error": f"training worker (pid {self.pid}) {cause}", "log_tail": tail}
        _write_json(self.status_path, info)
        return info

    def read_log(self) -> list[dict[str, Any]]:
        """Every logged step so far (SFT warm-up lines have stage "sft", DPO lines stage "dpo")."""
        return read_log(self.log_path)

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the run has ended and its worker exited, or `timeout` seconds pass; returns the
        last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.poll()
            if info["status"] in TERMINAL and not self._exit()[0]:
                return self.poll()
            if deadline is not None and time.monotonic() >= deadline:
                return info
            time.sleep(interval)

    def stop(self, timeout: float = 120.0, grace: float = 15.0) -> dict[str, Any]:
        """Ask the worker to stop after its current step (it saves a checkpoint and the model); after
        `timeout` s send SIGTERM, after `grace` more SIGKILL (then nothing since the last checkpoint is kept)."""
        info = self.poll()
        if info["status"] in TERMINAL:
            return info
        (self.out / "STOP").touch()
        info = self.wait(timeout)
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if info["status"] in TERMINAL or self.pid is None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            info = self.wait(wait_s)
        if info["status"] == "failed" and info.get("returncode") == -signal.SIGKILL:
            info |= {"status": "stopped", "error": f"did not stop within {timeout + grace:.0f} s and was killed; "
                                                   "only the last checkpoint is kept"}
            _write_json(self.status_path, info)
        return info


def start_training(config: TrainConfig) -> TrainingJob:
    """Validate the pairs here (PairsError at once), then run `train` in a worker process."""
    out = config.out
    existing = _read_json(out / "status.json")
    if existing and existing.get("status") not in TERMINAL and TrainingJob(out).poll()["status"] not in TERMINAL:
        raise RuntimeError(f"a training run is already going on in {out} (pid {existing.get('pid')})")
    if not config.resume and ((out / "model").exists() or (out / "checkpoints").exists()):
        raise FileExistsError(f"{out} already holds a model or checkpoints: choose another name, or resume=True")
    validate(config)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("STOP", "card.json") + (() if config.resume else ("log.jsonl",)):
        (out / stale).unlink(missing_ok=True)
    config_path = out / "config.json"
    _write_json(config_path, config.to_dict())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with (out / "worker.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "fcapp.train", "--config", str(config_path)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # own process group: stop() can signal all of it
    _write_json(out / "status.json", {"status": "starting", "pid": process.pid, "name": config.name, "updated": _now()})
    _CHILDREN[out.resolve()] = process
    return TrainingJob(out, process)


def attach(name: str | Path) -> TrainingJob:
    """The job of a run folder (a path) or of a model name under models_dir(), running or not."""
    is_path = isinstance(name, Path) or os.sep in name
    out = Path(name) if is_path else models_dir() / safe_name(str(name), "model name")
    if not (out / "status.json").exists():
        raise FileNotFoundError(f"no training run in {out}")
    return TrainingJob(out, _CHILDREN.get(out.resolve()))


def list_models() -> list[dict[str, Any]]:
    """Registered tuned models (a card.json beside a model folder), newest first."""
    models = []
    for card_path in models_dir().glob("*/card.json"):
        card = _read_json(card_path)
        model = card_path.parent / "model"
        if card is None or not (model / "config.json").exists():
            continue
        models.append({"name": card_path.parent.name, "path": str(model), "base": card.get("base"),
                       "created": card.get("finished") or card.get("started"), "method": card.get("method"),
                       "status": card.get("status"), "steps": card.get("global_step"),
                       "pairs": card.get("data", {}).get("used"), "train_seconds": card.get("train_seconds"),
                       **card.get("metrics", {})})
    return sorted(models, key=lambda m: m["created"] or "", reverse=True)


def main(argv: list[str] | None = None) -> int:
    """Worker entry: `python -m fcapp.train --config run.json` (also under `accelerate launch`)."""
    parser = argparse.ArgumentParser(prog="python -m fcapp.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = TrainConfig.from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:  # a clear one-line error naming file and line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {args.config}:{exc.lineno}: invalid JSON "
                       f"({exc.msg} at column {exc.colno})\n")
    except (OSError, UnicodeDecodeError) as exc:
        parser.exit(2, f"{parser.prog}: error: {args.config}: cannot read: {exc}\n")
    except (ValueError, TypeError, AttributeError) as exc:  # unknown or missing options, wrong types
        parser.exit(2, f"{parser.prog}: error: {args.config}: invalid training config: {exc}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # SIGTERM = stop after this step, saving
    result = train(config, stop_event=stop)  # an exception is recorded as "failed", then exits 1
    print(f"{result.status}: step {result.global_step}, model in {result.model_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
