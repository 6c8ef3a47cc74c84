"""Overview tab (the first): the pipeline of one task, problems -> chains -> pairs -> tuned models ->
evaluations, with each stage's counts and the next step as a button that opens the tab to take it in."""

from __future__ import annotations

import html

import gradio as gr

from fcapp.pipeline import overview
from fcapp.ui.common import Context, default_task, task_choices

# next step -> (button label, the tab that takes it)
ACTIONS = {"generate": ("Generate chains →", "generate"), "label": ("Label chains →", "curate"),
           "train": ("Train a model →", "train"), "wait": ("Follow the training →", "train"),
           "evaluate": ("Evaluate base vs tuned →", "compare"), "improve": ("Label more chains →", "curate")}


def stages_html(facts: dict) -> str:
    """The five stages as boxes with their counts; an empty stage is drawn dashed."""
    p, c, pairs, m, e = (facts[k] for k in ("problems", "chains", "pairs", "models", "evaluations"))
    sets = sum(pairs["sets"].values())
    latest = e["latest"]
    boxes = [
        ("problems", p["train"], f"training problems · {p['heldout']} held out for evaluation, never trained on"),
        ("chains", c["total"], f"chains · ✓ {c['correct']} correct · ✗ {c['incorrect']} incorrect · "
                               f"{c['labelled']} labelled by a person"),
        ("pairs", pairs["problems"], "problems with a correct and an incorrect chain"
                                     + (f" · {sets} pairs stored in {len(pairs['sets'])} pair sets" if sets else "")),
        ("models", len(m["names"]), "tuned models" + (f" · training {', '.join(m['training'])}" if m["training"] else "")
                                    + (f" · newest {m['names'][0]}" if m["names"] else "")),
        ("evaluations", e["total"], "evaluations" + ("" if not latest else " · latest: " + ", ".join(
            f"{name} {acc:.0%}" for name, acc in latest["accuracy"].items()))),
    ]
    parts = []
    for stage, n, words in boxes:
        parts.append(f"<div class='fc-stage{' empty' if not n else ''}' id='ov-{stage}' data-n='{n}'>"
                     f"<b class='n'>{n}</b>{html.escape(words)}</div>")
    return "<div class='fc-stages'>" + "<span class='fc-arrow'>→</span>".join(parts) + "</div>"


def tasks_table(store) -> list[list]:
    rows = []
    for task in task_choices():
        facts = overview(store, task)
        c = facts["chains"]
        rows.append([task, facts["problems"]["train"], c["total"], c["correct"], c["incorrect"], c["labelled"],
                     facts["pairs"]["problems"], len(facts["models"]["names"]), facts["evaluations"]["total"]])
    return rows


def build(ctx: Context) -> None:
    store = ctx.store

    def drawn(task: str | None) -> tuple[str, str, str, list[list]]:
        """The stages, the next step in words, its button's label, the table of every task."""
        if not task:
            return "", "No task is available in this installation.", "Generate chains →", []
        facts = overview(store, task)
        step = facts["next"]
        return stages_html(facts), f"**Next step:** {step['text']}", ACTIONS[step["action"]][0], tasks_table(store)

    def show(task: str | None) -> dict:
        html_text, words, label, rows = drawn(task)
        return {stages: html_text, next_md: words, next_btn: label, table: rows}

    def go(task: str | None) -> dict:
        """Open the tab of the next step (worked out again: the data may have moved since it was drawn)."""
        if not task:
            return gr.skip()
        _, tab = ACTIONS[overview(store, task)["next"]["action"]]
        return ctx.go(tab, task)

    with gr.Tab("Overview", id="overview", elem_id="tab-overview"):
        gr.Markdown("What fcapp does with a task, stage by stage: a teacher model solves training problems in "
                    "**chains** of function calls, the verifier checks each one and you label them; a correct and "
                    "an incorrect chain of the same problem make a preference **pair**; the small model is "
                    "**trained** on the pairs and **evaluated** against the base model on held-out problems.")
        html_text, words, label, rows = drawn(default_task())  # drawn now: the first page need not wait
        task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task", elem_id="ov-task")
        stages = gr.HTML(html_text, elem_id="ov-stages")
        with gr.Row(equal_height=True):
            next_md = gr.Markdown(words, elem_id="ov-next-text")
            next_btn = gr.Button(label, variant="primary", elem_id="ov-next", scale=0, min_width=220)
        table = gr.Dataframe(rows, headers=["task", "training problems", "chains", "✓", "✗", "labelled",
                                            "pair problems", "tuned models", "evaluations"], interactive=False,
                             elem_id="ov-tasks", label="Every task")

    outputs = {stages, next_md, next_btn, table}
    task.change(show, task, outputs, show_progress="hidden")
    ctx.store_version.change(show, task, outputs, show_progress="hidden")
    ctx.models_version.change(show, task, outputs, show_progress="hidden")
    ctx.wiring.append(lambda: next_btn.click(go, task, ctx.navigation()))
    ctx.loaders.append((show, [task], outputs))
