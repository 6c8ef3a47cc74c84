"""Where one task stands in the pipeline, problems -> chains -> pairs -> tuned models -> evaluations, and
the next step to take (the app's Overview tab and `fcapp status`)."""

from __future__ import annotations

from typing import Any

from fcapp.store import Store

STAGES = ("problems", "chains", "pairs", "models", "evaluations")


def _runs_of(task: str) -> list[dict[str, Any]]:
    from fcapp.models.registry import tuned_model_dir
    from fcapp.training import TERMINAL, list_runs

    runs = []
    for run in list_runs():
        if task in [t.strip() for t in str(run.get("task") or "").split(",")]:
            runs.append(run | {"going": run["status"] not in TERMINAL, "has_model": tuned_model_dir(run["name"]) is not None})
    return runs


def next_step(facts: dict[str, Any]) -> dict[str, str]:
    """The one thing to do next, from an overview's facts: {action, text}. Actions: generate, label, train,
    wait, evaluate, improve."""
    chains, pairs, models = facts["chains"], facts["pairs"], facts["models"]
    if not chains["total"]:
        return {"action": "generate", "text": "No chains yet. Let a teacher model solve a few training problems: "
                                              "every chain is checked by the verifier and stored."}
    if not pairs["problems"] and not pairs["sets"]:
        if chains["unlabelled"]:
            return {"action": "label", "text": "No training problem has both a correct and an incorrect chain "
                                               "yet, which a preference pair needs. Label chains (accept a good one, "
                                               "reject a bad one), or generate more samples per problem."}
        return {"action": "generate", "text": "No training problem has both a correct and an incorrect chain yet: "
                                              "generate more samples per problem (a higher temperature varies them)."}
    if models["training"]:
        return {"action": "wait", "text": f"Training {', '.join(models['training'])}: follow it in the Train tab."}
    if not models["names"]:
        return {"action": "train", "text": f"{pairs['problems']} problems can give preference pairs: train the small "
                                           "model on them (DPO), or on the correct chains alone (SFT)."}
    if not facts["evaluations"]["total"]:
        return {"action": "evaluate", "text": f"Tuned model {models['names'][0]} is ready: evaluate it against the "
                                              "base model on held-out problems."}
    return {"action": "improve", "text": "Every stage has data. Label more chains or generate more, train again, "
                                         "and compare the new model with the last one."}


def overview(store: Store, task: str) -> dict[str, Any]:
    """The counts of every stage of `task` and the next step."""
    from fcapp.tasks import get_task

    problems = get_task(task).problems()
    heldout = sum(p.split == "heldout" for p in problems)
    counts = store.counts(task)
    runs = _runs_of(task)
    latest = store.list_evals(task=task, limit=1)
    facts: dict[str, Any] = {
        "task": task,
        "problems": {"train": len(problems) - heldout, "heldout": heldout},
        "chains": {"total": counts["chains"], "correct": counts["correct"], "incorrect": counts["incorrect"],
                   "unverified": counts["unverified"], "labelled": counts["labelled"],
                   "unlabelled": counts["chains"] - counts["labelled"]},
        "pairs": {"problems": counts["pair_problems"], "sets": store.pair_sets(task)},
        "models": {"names": [r["name"] for r in runs if r["has_model"] and not r["going"]],
                   "training": [r["name"] for r in runs if r["going"]]},
        "evaluations": {"total": store.count_evals(task),
                        "latest": None if not latest else {
                            "id": latest[0]["id"], "accuracy": {name: s["accuracy"] for name, s in
                                                                latest[0]["results"]["models"].items()}}},
    }
    return facts | {"next": next_step(facts)}


def render(facts: dict[str, Any]) -> str:
    """The overview as lines of text (`fcapp status`)."""
    p, c, pairs, m, e = (facts[k] for k in STAGES)
    sets = ", ".join(f"{name} ({n})" for name, n in pairs["sets"].items()) or "none stored"
    latest = e["latest"]
    lines = [
        f"task {facts['task']}",
        f"  problems     {p['train']} train, {p['heldout']} held out (never trained on)",
        f"  chains       {c['total']}: {c['correct']} correct, {c['incorrect']} incorrect, {c['unverified']} unverified; "
        f"{c['labelled']} labelled by a person",
        f"  pairs        {pairs['problems']} problems with a correct and an incorrect chain; pair sets: {sets}",
        f"  models       {', '.join(m['names']) or 'none tuned yet'}"
        + (f"; training: {', '.join(m['training'])}" if m["training"] else ""),
        f"  evaluations  {e['total']}" + ("" if not latest else "; latest: " + ", ".join(
            f"{name} {acc:.3f}" for name, acc in latest["accuracy"].items())),
        f"next: {facts['next']['text']}",
    ]
    return "\n".join(lines)
