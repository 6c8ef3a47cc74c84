"""Base vs tuned models on the same held-out problems with the same seeds (stage 5 of the paper).

Reports accuracy with a 95% Wilson interval, valid-call rate, mean steps / tokens / latency per
model, and an exact McNemar test of each model against base on the paired outcomes.

Chains are greedy, so a local model solves several problems in one continuous batch (the same chains
as one at a time: tests/test_perf_equivalence.py). Several step limits come from one run at the
largest: a chain's first L steps do not depend on the limit (the prompt does not state it), so under
limit L a chain is the same when it ended within L steps, and unanswered otherwise.
"""

from __future__ import annotations

import dataclasses
import html
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from fcapp.flags import option
from fcapp.models import QUANTISED, get_model
from fcapp.models.base import ChatModel
from fcapp.models.registry import is_embedded
from fcapp.solve import SolveConfig, solve
from fcapp.tasks import get_task
from fcapp.tasks.base import Problem

BATCH = 8  # chains decoded together on a local model


@dataclass
class EvalConfig:
    task: str = option(dataclasses.MISSING, "the task whose problems are solved")
    models: list[str] = option(["base"], "comma-separated: base (embedded), tuned names, folders, URLs; "
                                         f"{QUANTISED} after a local one decodes it with quantised weights")
    split: Literal["train", "heldout", "all"] = option("heldout", "which problems")
    limit: int | None = option(50, "first N problems of the split")
    problems_file: str | None = option(None, "your own problems: a JSONL file in the task's format",
                                       flag="--problems")
    max_steps: int = 10  # chains run at the largest step limit
    seed: int = option(0, "seed given to every chain (evaluation decodes greedily)")
    max_new_tokens: int = option(160, "tokens per model reply")
    step_limits: list[int] | None = None  # also report these (<= max_steps) limits, derived from the same chains
    strict: bool = option(False, "a malformed row of --problems is an error, not skipped and reported")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(base: list[bool], other: list[bool]) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the problems where exactly one model is right."""
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load_problems(config: EvalConfig) -> tuple[list[Problem], list[str]]:
    """The problems to evaluate (first `limit`), and the rows of problems_file that were skipped."""
    task = get_task(config.task)
    if config.problems_file:
        loaded = task.load_file(config.problems_file, config.strict)
        problems, skipped = loaded.problems, loaded.skipped
    else:
        problems, skipped = task.split(config.split), []
    return (problems[: config.limit] if config.limit else problems), skipped


def outcome(problem: Problem, chain: Any) -> dict[str, Any]:
    """What evaluation keeps of a chain: the verdict and answer, and per step its validity, tokens and time
    (so a smaller step limit can be read off the same chain)."""
    return {
        "problem_id": problem.id, "correct": bool(chain.verdict), "answer": chain.answer, "expected": problem.answer,
        "steps": len(chain.steps), "valid_calls": chain.valid_calls, "tokens": chain.completion_tokens,
        "latency_s": round(chain.elapsed_s, 3), "stop_reason": chain.stop_reason,
        "valid_by_step": [s.call is not None and s.error is None for s in chain.steps],
        "tokens_by_step": [s.completion_tokens for s in chain.steps],
        "seconds_by_step": [round(s.elapsed_s + s.tool_elapsed_s, 3) for s in chain.steps],
    }


def at_step_limit(o: dict[str, Any], limit: int) -> dict[str, Any]:
    """The outcome the chain would have had under a smaller step limit (exact, see the module docstring)."""
    if o["steps"] <= limit:
        return o
    return o | {"correct": False, "answer": None, "steps": limit, "valid_calls": sum(o["valid_by_step"][:limit]),
                "tokens": sum(o["tokens_by_step"][:limit]), "latency_s": round(sum(o["seconds_by_step"][:limit]), 3),
                "stop_reason": "max_steps"}


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(outcomes)
    correct = sum(o["correct"] for o in outcomes)
    steps = sum(o["steps"] for o in outcomes)
    low, high = wilson_interval(correct, n)
    return {
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci": [round(low, 4), round(high, 4)],
        "valid_call_rate": sum(o["valid_calls"] for o in outcomes) / steps if steps else 0.0,
        "answered_rate": sum(o["answer"] is not None for o in outcomes) / n if n else 0.0,
        "mean_steps": steps / n if n else 0.0,
        "mean_tokens": sum(o["tokens"] for o in outcomes) / n if n else 0.0,
        "mean_latency_s": sum(o["latency_s"] for o in outcomes) / n if n else 0.0,
        "correct": correct,
    }


def evaluate(
    config: EvalConfig,
    store=None,
    on_progress: Callable[[int, int, str], None] | None = None,
    stop: threading.Event | None = None,
    models: dict[str, ChatModel] | None = None,
) -> dict[str, Any]:
    """Run every model on the same problems; returns the result object (and stores it when given a store)."""
    task = get_task(config.task)
    problems, skipped = load_problems(config)
    if not problems:
        raise ValueError(f"no problems to evaluate for task {config.task} ({config.split})")
    solve_config = SolveConfig(config.max_steps, 0.0, 1.0, config.max_new_tokens, config.seed)
    per_problem: dict[str, list[dict[str, Any]]] = {}
    total, done = len(problems) * len(config.models), 0
    for name in config.models:
        model = (models or {}).get(name) or get_model(name)
        chains: dict[int, Any] = {}
        for index, chain in _solve_all(task, problems, model, solve_config, stop):
            chains[index] = chain
            done += 1
            if on_progress:
                on_progress(done, total, name)
        if len(chains) < len(problems):
            raise InterruptedError("evaluation stopped")
        per_problem[name] = [outcome(problem, chains[i]) for i, problem in enumerate(problems)]
    results: dict[str, Any] = {"task": task.name, "n": len(problems), "max_steps": config.max_steps}
    limits = sorted({limit for limit in (config.step_limits or []) if limit < config.max_steps} | {config.max_steps})
    results["by_step_limit"] = {str(limit): _compare(config.models, {
        name: [at_step_limit(o, limit) for o in outcomes] for name, outcomes in per_problem.items()})
        for limit in limits}
    results["models"] = results["by_step_limit"][str(config.max_steps)]
    results["per_problem"] = per_problem
    results["config"] = asdict(config)
    results["skipped_rows"] = skipped
    if store is not None:
        results["eval_id"] = store.add_eval(task.name, config.models, asdict(config), results)
    return results


def _compare(names: list[str], per_problem: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each model's summary, with its exact McNemar p-value against base (or the first model)."""
    reference = next((name for name in names if is_embedded(name)), names[0])
    compared = {}
    for name in names:
        summary = summarize(per_problem[name])
        summary["p_value_vs_base"] = None if name == reference else mcnemar_exact(
            [o["correct"] for o in per_problem[reference]], [o["correct"] for o in per_problem[name]])
        compared[name] = summary
    return compared


def _solve_all(task: Any, problems: list[Problem], model: ChatModel, config: SolveConfig,
               stop: threading.Event | None) -> Any:
    """(index, verified chain) for each problem as it finishes: in one continuous batch on a local model,
    one after another otherwise. Stops early (yielding fewer) once `stop` is set; a model error raises."""
    if hasattr(model, "generate_continuous"):
        from fcapp.batching import iter_solve_batch

        for index, result in iter_solve_batch(task, [(p, config) for p in problems], model, BATCH, stop):
            if isinstance(result, Exception):
                raise result
            yield index, result
        return
    for index, problem in enumerate(problems):
        if stop is not None and stop.is_set():
            return
        yield index, solve(task, problem, model, config)


def differing_problems(result: dict[str, Any], first: str, second: str) -> list[dict[str, Any]]:
    """Problems where exactly one of the two models is right (the interesting rows of a comparison)."""
    rows = []
    for a, b in zip(result["per_problem"][first], result["per_problem"][second]):
        if a["correct"] != b["correct"]:
            rows.append({"problem_id": a["problem_id"], "expected": a["expected"],
                         f"{first}_answer": a["answer"], f"{second}_answer": b["answer"],
                         "better": first if a["correct"] else second})
    return rows


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Plotly bar charts: accuracy with its interval, valid-call rate, mean steps, mean latency."""
    import plotly.graph_objects as go

    names = list(result["models"])
    stats = [result["models"][n] for n in names]
    acc = [s["accuracy"] for s in stats]
    error = dict(type="data", symmetric=False, array=[s["accuracy_ci"][1] - a for s, a in zip(stats, acc)],
                 arrayminus=[a - s["accuracy_ci"][0] for s, a in zip(stats, acc)])
    charts = {
        "accuracy": go.Figure(go.Bar(x=names, y=acc, error_y=error)),
        "valid_call_rate": go.Figure(go.Bar(x=names, y=[s["valid_call_rate"] for s in stats])),
        "mean_steps": go.Figure(go.Bar(x=names, y=[s["mean_steps"] for s in stats])),
        "mean_latency_s": go.Figure(go.Bar(x=names, y=[s["mean_latency_s"] for s in stats])),
    }
    for title, fig in charts.items():
        fig.update_layout(title=f"{result['task']}: {title.replace('_', ' ')} (n={result['n']})", height=320,
                          margin=dict(l=40, r=20, t=50, b=40))
    charts["accuracy"].update_yaxes(range=[0, 1])
    charts["valid_call_rate"].update_yaxes(range=[0, 1])
    return charts


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """One self-contained HTML file with the charts and the summary table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>fcapp evaluation: {result['task']} (n={result['n']})</h1>", "<table border=1 cellpadding=4>",
             "<tr><th>model</th><th>accuracy</th><th>95% CI</th><th>valid calls</th><th>steps</th>"
             "<th>tokens</th><th>latency s</th><th>p vs base</th></tr>"]
    for name, s in result["models"].items():
        name = html.escape(name)
        p = "-" if s["p_value_vs_base"] is None else f"{s['p_value_vs_base']:.4f}"
        parts.append(f"<tr><td>{name}</td><td>{s['accuracy']:.3f}</td><td>{s['accuracy_ci']}</td>"
                     f"<td>{s['valid_call_rate']:.3f}</td><td>{s['mean_steps']:.2f}</td><td>{s['mean_tokens']:.1f}</td>"
                     f"<td>{s['mean_latency_s']:.2f}</td><td>{p}</td></tr>")
    parts.append("</table>")
    for i, fig in enumerate(figures(result).values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    path.write_text("<html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>",
                    encoding="utf-8")
    return path
