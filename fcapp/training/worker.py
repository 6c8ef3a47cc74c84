"""The training worker: `python -m fcapp.training.worker --config RUN/config.json` runs one TrainConfig
in its own process (started by `fcapp.training.job.start_training`), writing the run folder
(`fcapp.training.folder`) as it goes. A crash or an OOM kill never takes the app down; SIGTERM or a
STOP file ends the run after the current step, saving a checkpoint and the model trained so far.

Several processes (DDP): the worker is a plain HF Trainer script, so the same config runs unchanged with
    accelerate launch --multi_gpu --num_processes 4 -m fcapp.training.worker --config run.json
on 4 GPUs, or on CPU cores of a machine without a GPU (gloo; tested with 2). Only rank 0 writes log,
status, card and model; a STOP file stops every rank at the same step. `batch_size` is per process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fcapp.training.config import TrainConfig
from fcapp.training.folder import RunFolder, StopSignal, TrainResult, now


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ranks() -> tuple[int, int]:
    """(this process's rank, the number of processes), as the launcher (accelerate launch, torchrun) set them:
    read from the environment, so they are right before the Trainer sets up the process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train(config: TrainConfig, stop_event: StopSignal | None = None,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Run `config` in this process; writes log, status, checkpoints, model, card.

    Raises on failure after recording status "failed" (the worker turns that into its exit code)."""
    rank, processes = ranks()
    main = rank == 0
    folder = RunFolder(config.out, config.name, stop_event, on_log, main)
    if main:
        folder.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    card: dict[str, Any] = {"name": config.name, "base": config.base, "method": config.method,
                            "adapter": config.adapter, "prompt": {"demo": config.demo}, "config": config.to_dict(),
                            "processes": processes, "started": now()}
    folder.status("running", stage="loading")
    try:
        step, metrics = _run(config, folder, card)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        card |= {"status": "failed", "error": message, "finished": now(),
                 "train_seconds": round(time.monotonic() - began, 1)}
        folder.write_card(card)
        folder.status("failed", error=message)
        raise
    status = "stopped" if folder.stopped else "finished"
    card |= {"status": status, "global_step": step, "metrics": metrics, "finished": now(),
             "train_seconds": round(time.monotonic() - began, 1)}
    folder.write_card(card)
    model_dir = folder.out / "model"
    folder.status(status, step=step, model=str(model_dir) if model_dir.exists() else None)
    return TrainResult(status, folder.out, model_dir if model_dir.exists() else None, step, metrics,
                       card["train_seconds"], card)


def _run(config: TrainConfig, folder: RunFolder, card: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    from fcapp.models.registry import resolve_model_path
    from fcapp.training import dpo, grpo, rounds, sft
    from fcapp.training.common import load_tokenizer, score_trained_positions_only
    from fcapp.trainsets import read_training_file

    if config.score_trained_only:
        score_trained_positions_only()
    tokenizer = load_tokenizer(config.base)
    base_path = card["base_path"] = resolve_model_path(config.base)
    if config.method == "grpo":
        return grpo.run(config, folder, card, base_path, tokenizer)
    if config.method == "rounds":
        return rounds.run(config, folder, card, base_path)
    rows = read_training_file(str(config.data), "sft" if config.method == "sft" else "pairs")
    card["data"] = {"path": config.data, "sha256": file_sha256(str(config.data)), "rows": len(rows)}
    return (sft if config.method == "sft" else dpo).run(config, folder, card, base_path, tokenizer, rows)


def main(argv: list[str] | None = None) -> int:
    """Worker entry: `python -m fcapp.training.worker --config run.json` (also under `accelerate launch`)."""

    parser = argparse.ArgumentParser(prog="python -m fcapp.training.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
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
    rank, processes = ranks()
    print(f"{result.status}: step {result.global_step}, model in {result.model_dir} (rank {rank} of {processes})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
