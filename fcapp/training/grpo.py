"""GRPO with the task's verifier as the reward, on TRL's GRPOTrainer.

Rollouts are fcapp's own agent chains (`rollout_func`): the policy being trained decodes through
`LocalModel` with the same prompt (injected functions), call parser, tools, step limit and verifier
as evaluation, several chains of a group in one continuous batch. A chain becomes one completion: the
model's replies and the tool results between them, with TRL's `env_mask` marking the replies, so tool
results are context, never trained tokens.

Rewards (each logged as rewards/<name>/mean; a weight of 0 switches a shaping term off):
- correct: 1 when the verifier accepts the final answer, else 0 (weight 1: the objective);
- valid_calls: the chain's valid-call rate (calls that parsed, validated and ran);
- well_formed: 1 minus the share of replies that held no parseable call;
- brevity: minus steps / step limit (shorter chains; off by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fcapp.records import Chain
from fcapp.solve import SolveConfig, build_agent
from fcapp.training.common import checkpointing, lora, run_stage, trainer_args
from fcapp.training.config import TrainConfig
from fcapp.training.folder import RunFolder
from fcapp.training.tokens import tokenize_chain


def format_errors(chain: Chain) -> int:
    """Replies with no parseable call (prose, broken syntax): errors before any call was made."""
    return sum(1 for step in chain.steps if step.call is None and step.error is not None)


# Reward functions, as TRL calls them: the rollout's extra fields arrive as keyword lists, one value per
# completion. TRL logs each as rewards/<function name>/mean.
def correct(completions: list, verdict: list[bool], **_: Any) -> list[float]:
    return [1.0 if v else 0.0 for v in verdict]


def valid_calls(completions: list, valid_call_rate: list[float], **_: Any) -> list[float]:
    return list(valid_call_rate)


def well_formed(completions: list, format_error_rate: list[float], **_: Any) -> list[float]:
    return [1.0 - rate for rate in format_error_rate]


def brevity(completions: list, step_fraction: list[float], **_: Any) -> list[float]:
    return [-fraction for fraction in step_fraction]


def rewards(config: TrainConfig) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The reward functions with a non-zero weight, and their weights (the verdict always counts)."""
    terms = [(correct, 1.0), (valid_calls, config.reward_valid_calls), (well_formed, config.reward_format),
             (brevity, config.reward_steps)]
    kept = [(fn, weight) for fn, weight in terms if weight]
    return [fn for fn, _ in kept], [weight for _, weight in kept]


class Rollouts:
    """TRL's rollout_func: each prompt (one per completion wanted; TRL repeats a problem's prompt for its
    group) is solved by the agent with the policy as it is now."""

    def __init__(self, config: TrainConfig, task: Any, problems: dict[str, Any], tokenizer: Any) -> None:
        self.config, self.task, self.problems, self.tokenizer = config, task, problems, tokenizer
        self.policy: Any = None
        self.calls = 0

    def solve_config(self, index: int) -> SolveConfig:
        seed = self.config.seed * 1_000_003 + self.calls * 10_007 + index  # every completion its own stream
        return SolveConfig(max_steps=self.config.chain_steps, temperature=self.config.temperature,
                           top_p=self.config.top_p, max_new_tokens=self.config.max_new_tokens, seed=seed,
                           demo=self.config.demo)

    def __call__(self, prompts: list[list[dict[str, Any]]], trainer: Any) -> dict[str, Any]:
        from fcapp.batching import solve_batch
        from fcapp.models.local import LocalModel

        module = trainer.accelerator.unwrap_model(trainer.model)
        if self.policy is None:
            self.policy = LocalModel.around(module, self.tokenizer, self.config.name)
        self.policy.clear_cache()  # the weights changed since the last rollout
        was_training = module.training
        module.eval()
        try:
            jobs = [(self.problems[prompt[-1]["content"]], self.solve_config(i)) for i, prompt in enumerate(prompts)]
            chains = solve_batch(self.task, jobs, self.policy, batch_size=max(1, self.config.num_generations))
        finally:
            module.train(was_training)
        self.calls += 1
        out: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "env_mask": [], "logprobs": None,
                               "verdict": [], "valid_call_rate": [], "format_error_rate": [], "step_fraction": []}
        for chain in chains:
            tokens = tokenize_chain(self.tokenizer, chain.prompt, chain.completion_messages())
            steps = max(1, len(chain.steps))
            out["prompt_ids"].append(tokens.prompt_ids)
            out["completion_ids"].append(tokens.completion_ids or [self.tokenizer.eos_token_id])
            out["env_mask"].append(tokens.completion_mask or [0])
            out["verdict"].append(bool(chain.verdict))
            out["valid_call_rate"].append(chain.valid_calls / steps)
            out["format_error_rate"].append(format_errors(chain) / steps)
            out["step_fraction"].append(len(chain.steps) / self.config.chain_steps)
        return out


def prompts(config: TrainConfig, task: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The GRPO dataset (prompt + problem id per training problem, first `limit`) and the problems by
    question text (how a rollout finds a prompt's problem). Held-out problems never get here."""
    from fcapp.trainsets import heldout_guard

    problems = task.split("train")[: config.limit] if config.limit else task.split("train")
    guard = heldout_guard()
    problems = [p for p in problems if not guard.refuses(task.name, p.id, p.question)]
    rows, by_question = [], {}
    settings = SolveConfig(config.chain_steps, demo=config.demo)
    for problem in problems:
        prompt = build_agent(task, problem, settings).prompt(problem.question)
        by_question.setdefault(prompt[-1]["content"], problem)
        rows.append({"prompt": prompt, "problem_id": problem.id})
    return rows, by_question


def run(config: TrainConfig, folder: RunFolder, card: dict[str, Any], base_path: str, tokenizer: Any
        ) -> tuple[int, dict[str, Any]]:
    """GRPO as the method: each optimizer step trains on `grad_accum` problems x `num_generations` chains."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fcapp.tasks import get_task

    task = get_task(config.tasks[0])
    rows, by_question = prompts(config, task)
    if not rows:
        raise ValueError(f"task {task.name} has no training problems")
    card["data"] = {"task": task.name, "split": "train", "problems": len(rows)}
    if config.warmup_steps > 0:
        from fcapp.training import sft
        from fcapp.trainsets import read_training_file

        base_path = sft.warm_up(config, folder, card, base_path, tokenizer,
                                read_training_file(str(config.warmup_data), "sft"))
        if folder.stopped:
            return 0, dict(folder.last)
    functions, weights = rewards(config)
    card["rewards"] = {fn.__name__: w for fn, w in zip(functions, weights)}
    group = config.num_generations

    def make_trainer(model: Any, output_dir: Path, callbacks: list[Any]) -> Any:
        args = GRPOConfig(**trainer_args(config, output_dir, per_device_train_batch_size=group,
                                         include_num_input_tokens_seen="no",  # GRPO counts its tokens itself
                                         **checkpointing(config)),
                          num_generations=group, steps_per_generation=config.grad_accum, beta=config.kl_beta,
                          reward_weights=weights, max_completion_length=config.max_length,
                          temperature=config.temperature, top_p=config.top_p, remove_unused_columns=False,
                          log_completions=False)
        return GRPOTrainer(model=model, reward_funcs=functions, args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=tokenizer, callbacks=callbacks, peft_config=lora(config),
                           rollout_func=Rollouts(config, task, by_question, tokenizer))

    return run_stage(config, folder, "grpo", base_path, tokenizer, folder.out / "model", make_trainer,
                     checkpoints=folder.out / "checkpoints", card=card)
