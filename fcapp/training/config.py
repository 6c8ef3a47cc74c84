"""TrainConfig: one training run of any method, as a documented dataclass.

Every field carries its help text (and the methods it applies to) in its metadata: the CLI builds
`fcapp train` / `fcapp improve` flags from them (`add_arguments`), the Train tab reads its defaults
from them, and the worker gets the whole config as `config.json` in the run folder.

Methods:
- `sft`: supervised fine-tuning on verified chains (loss on the assistant turns only).
- `dpo`: preference pairs (correct vs incorrect chain of the same problem), TRL's DPOTrainer.
- `grpo`: online RL, TRL's GRPOTrainer; rollouts are fcapp agent chains, the reward is the task's verifier.
- `rounds`: iterative self-improvement: sample chains with the current model, verify, train (SFT or DPO),
  evaluate on the held-out split, repeat from the new model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fcapp import flags
from fcapp.paths import models_dir, safe_name

METHODS = ("sft", "dpo", "grpo", "rounds")
ADAPTERS = ("lora", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adam moves LoRA's zero-initialised B matrices only as fast as the learning rate, so LoRA takes ~10x the
# full rate. DPO: measured on SmolLM2-135M (batch 2 x 2), LoRA 5e-5 took the loss 0.693 -> 0.41 in 3 steps,
# full 5e-6 took it 0.693 -> 0.054 in 10 steps. SFT and GRPO: see benchmarks/README.md (training defaults).
DEFAULT_LR = {("dpo", "lora"): 5e-5, ("dpo", "full"): 5e-6, ("sft", "lora"): 2e-4, ("sft", "full"): 2e-5,
              ("grpo", "lora"): 2e-5, ("grpo", "full"): 2e-6}
TERMINAL = ("finished", "stopped", "failed")


def option(default: Any, help: str, methods: tuple[str, ...] = METHODS, flag: str | None = None) -> Any:
    """A TrainConfig field (see fcapp.flags.option) with the methods it applies to (default: all)."""
    return flags.option(default, help, flag, methods=methods)


@dataclass
class TrainConfig:
    """One training run. Fields apply to every method unless their help names some."""

    name: str = option(dataclasses.MISSING, "registered model name (letters, digits, . _ -); the run lives in models/NAME")
    method: Literal["sft", "dpo", "grpo", "rounds"] = option("dpo", "training method")
    data: str | None = option(None, "training file: preference pairs (dpo), SFT examples (sft), prompts (grpo); "
                                    "default: built from the store (dpo, sft) or the task (grpo)",
                              methods=("sft", "dpo", "grpo"))
    pair_set: str | None = option(None, "a pair set stored in the database to train on instead of pairs built from "
                                        "the chains, e.g. one `fcapp pairs --import FILE` made (imported-NAME); the "
                                        "run folder's data.jsonl is written from it", methods=("dpo",))
    sources: list[str] = option(["reference", "teacher", "human"], "the correct chains SFT trains on when built from "
                                "the store: reference, teacher (verifier-accepted), human (accepted by a person)",
                                methods=("sft",))
    task: str | None = option(None, "task(s), comma-separated: what the data is built from when --data is not "
                                    "given; grpo and rounds train on its training split")
    base: str = option("smollm2", "model to start from: smollm2 (embedded), a tuned model's name, a folder")
    adapter: Literal["lora", "full"] = option("lora", "LoRA adapters (merged into the saved model) or all weights")
    demo: bool | None = option(None, "the worked demonstration in the training prompt (the tuned model is then "
                                      "prompted the same way: its card records it); default: off for sft (shorter, "
                                      "faster prompts; SFT teaches the call format), else as the base is prompted")
    # -- optimisation --------------------------------------------------------------------------------------
    epochs: float = option(3.0, "passes over the data (max_steps > 0 overrides)")
    max_steps: int = option(-1, "optimizer steps; > 0 overrides epochs")
    learning_rate: float | None = option(None, "learning rate; default by method and adapter (DEFAULT_LR)",
                                         flag="--lr")
    batch_size: int = option(2, "rows per device per forward pass (grpo: one problem's group per pass)")
    grad_accum: int = option(2, "forward passes per optimizer step (grpo: problems per step)")
    max_length: int = option(1024, "tokens of prompt + completion; longer rows are an error unless dropped")
    drop_too_long: bool = option(False, "drop rows longer than max_length instead of refusing the file")
    score_trained_only: bool = option(True, "TRL's fused LM head projects only the trained positions (off: TRL's own "
                                            "path, which on a CPU scores every position; steps ~1.6x slower)")
    pack: bool = option(True, "compute a shared prompt once: SFT packs each batch into one sequence holding the "
                              "system prompt once, DPO each pair's prompt once for both completions (same loss, "
                              "fewer tokens computed)", methods=("sft", "dpo", "grpo", "rounds"))
    attend_by_piece: bool = option(True, "with pack: attention runs over each piece of an SFT pack (the shared "
                                         "prompt, then each example's own part with it) instead of over the whole "
                                         "pack with a mask; same result, SFT steps ~1.4x faster",
                                   methods=("sft", "rounds"))
    save_steps: int = option(50, "checkpoint interval in steps (the last two are kept)")
    seed: int = option(0, "seed of the data order, dropout and sampling")
    bf16: bool | None = option(None, "bf16 autocast (fp32 master weights); default: on where it is faster "
                                     "(a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX)")
    threads: int | None = option(None, "CPU threads; default: chosen by measuring steps (1 when another job "
                                       "holds a core)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout (sft; DPO and GRPO turn dropout off); on a CPU 0.05 costs "
                                      "a fifth of an SFT step")
    lora_targets: list[str] = option(LORA_TARGETS, "modules LoRA adapts")
    resume: bool = option(False, "continue from the run's last checkpoint")
    out_dir: str | None = option(None, "run folder (default: the data folder's models/NAME)", flag="--out")
    # -- dpo -----------------------------------------------------------------------------------------------
    beta: float = option(0.1, "DPO temperature: how far the tuned model may move from the reference",
                         methods=("dpo", "rounds"))
    precompute_ref: bool | None = option(None, "compute the reference log-probs once before training; default: when "
                                               "the run passes over its pairs more than once", methods=("dpo", "rounds"))
    warmup_steps: int = option(0, "SFT steps before DPO or GRPO (on the chosen chains, or --warmup-data); "
                                  "DPO's reference is then the warmed-up model", methods=("dpo", "grpo"))
    warmup_data: str | None = option(None, "SFT examples for the warm-up (default: the pairs' chosen chains)",
                                     methods=("dpo", "grpo"))
    # -- grpo / rounds: chains sampled with the model being trained ---------------------------------------
    limit: int | None = option(None, "first N training problems (grpo, rounds)", methods=("grpo", "rounds"))
    num_generations: int = option(8, "chains sampled per problem: a GRPO group, or samples per round",
                                  methods=("grpo", "rounds"))
    temperature: float = option(0.8, "sampling temperature of those chains", methods=("grpo", "rounds"))
    top_p: float = option(1.0, "nucleus of those chains", methods=("grpo", "rounds"))
    chain_steps: int = option(10, "step limit of a chain, as in evaluation", methods=("grpo", "rounds"))
    max_new_tokens: int = option(160, "tokens per model reply, as in evaluation", methods=("grpo", "rounds"))
    kl_beta: float = option(0.0, "GRPO KL coefficient against the starting model (0: no reference model)",
                            methods=("grpo",))
    reward_valid_calls: float = option(0.2, "reward weight of the chain's valid-call rate (0: off)",
                                       methods=("grpo",))
    reward_format: float = option(0.2, "reward weight of 'no format errors' (0: off)", methods=("grpo",))
    reward_steps: float = option(0.0, "reward weight of brevity: minus steps / step limit (0: off)",
                                 methods=("grpo",))
    # -- rounds ---------------------------------------------------------------------------------------------
    rounds: int = option(2, "rounds of sample -> verify -> train -> evaluate", methods=("rounds",))
    round_method: Literal["sft", "dpo"] = option("sft", "what each round trains: sft on its correct chains, "
                                                        "or dpo on correct vs incorrect", methods=("rounds",))
    grounded_only: bool = option(True, "learn only from chains whose final answer is what their last tool call "
                                       "returned, not a right guess", methods=("rounds",))
    eval_limit: int = option(60, "held-out problems evaluated after each round", methods=("rounds",))
    db: str | None = option(None, "SQLite store for the rounds' chains and evaluations (default: the data folder's)",
                            methods=("rounds",))

    def __post_init__(self) -> None:
        safe_name(self.name, "model name")
        for key, choices in (("method", METHODS), ("adapter", ADAPTERS), ("round_method", ("sft", "dpo"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, not {getattr(self, key)!r}")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[(self.round_method if self.method == "rounds" else self.method,
                                             self.adapter)]
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and 0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate must be a number between 0 and 1, not {self.learning_rate!r}")
        for key in ("batch_size", "grad_accum", "max_length", "save_steps", "num_generations", "chain_steps",
                    "max_new_tokens", "rounds", "eval_limit", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, not {getattr(self, key)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.method in ("grpo", "rounds") and not self.task:
            raise ValueError(f"method {self.method} needs a task: it trains on the task's training problems")
        if self.method in ("sft", "dpo") and not (self.data or self.task or self.pair_set):
            raise ValueError(f"method {self.method} needs --data FILE or --task TASK (to build it from the store)")
        if self.pair_set and self.method != "dpo":
            raise ValueError("--pair-set is the data of a dpo run (sft trains on --sources)")
        if self.method == "grpo" and self.warmup_steps > 0 and not self.warmup_data:
            raise ValueError("a GRPO warm-up trains on SFT examples: give --warmup-data FILE (fcapp examples)")
        if self.method == "grpo" and self.num_generations < 2:
            raise ValueError("GRPO compares chains within a group: num_generations must be at least 2")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        for key in ("data", "warmup_data", "db"):
            if getattr(self, key) is not None:
                setattr(self, key, str(getattr(self, key)))
        if self.demo is None and self.method == "sft":
            self.demo = False
        self.out_dir = str(self.out_dir or models_dir() / self.name)

    @property
    def out(self) -> Path:
        return Path(str(self.out_dir))

    @property
    def tasks(self) -> list[str]:
        return [t.strip() for t in (self.task or "").split(",") if t.strip()]

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


# ---- CLI flags from the fields --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS,
                  skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field that applies to any of `methods` (see fcapp.flags)."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if set(f.metadata["methods"]) & set(methods)]
    flags.add_arguments(parser, TrainConfig, names, skip)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """A TrainConfig from parsed flags (those not given keep the dataclass defaults) and `fixed` values."""
    return flags.from_args(TrainConfig, args, **fixed)


def defaults(method: str) -> dict[str, Any]:
    """The default of every field that applies to `method` (the Train tab's form), learning rate included."""
    config = TrainConfig(name="defaults", method=method, task="fol", data=None)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
            if method in f.metadata["methods"] and f.name not in ("name", "out_dir", "task", "data")}
