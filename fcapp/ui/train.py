"""Train tab: pick a method (SFT, DPO, GRPO, rounds), one click trains in a worker process; live charts for
the method; stop; reattach after a reload; every run (from the app or the CLI) in the history.

The form is generated from TrainConfig: one component per option, shown for the methods it applies to,
with the method's defaults. A run belongs to its worker process, not to the page: closing the tab
changes nothing, and a page load finds a run still going in the run folders and follows it again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import typing
from pathlib import Path
from typing import Any

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fcapp import training
from fcapp.pipeline import overview
from fcapp.training.config import METHODS, TrainConfig, defaults
from fcapp.training.job import preview, render_preview
from fcapp.trainsets import SFT_SOURCES, import_pairs
from fcapp.ui.common import EMBEDDED, Context, default_task, fmt_seconds, model_choices, safe_upload, task_choices

HISTORY_HEADERS = ["name", "method", "task", "status", "steps", "rows", "result", "started", "seconds"]
FROM_CHAINS = "built from the store's chains"
# Chosen in the header of the tab, or not options of a run started from the app.
NOT_IN_FORM = ("name", "method", "data", "pair_set", "sources", "task", "base", "out_dir", "resume", "db", "warmup_data",
               "lora_targets")
METHOD_NOTES = {
    "sft": "Supervised fine-tuning on correct chains (reference, verifier-accepted, accepted by a person); the loss "
           "covers the model's calls only. The first step for a small model.",
    "dpo": "Preference pairs: a correct and an incorrect chain of the same problem (the paper's method).",
    "grpo": "Online RL: the model solves training problems in groups of chains; the verifier's verdict is the reward.",
    "rounds": "Self-improvement: sample chains with the current model, verify, train on them, evaluate; repeat.",
}


# ---- the form, from TrainConfig --------------------------------------------------------------------------
def form_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_IN_FORM]


def _component(f: dataclasses.Field, method: str) -> gr.components.Component:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    label = f.name.replace("_", " ")
    common = dict(label=label, info=f.metadata["help"], elem_id=f"train-{f.name.replace('_', '-')}",
                  visible=method in f.metadata["methods"])
    value = defaults(method).get(f.name, f.default)
    if typing.get_origin(base) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(base)), value=value, **common)
    if base is bool:
        if optional:
            return gr.Dropdown(["auto", "on", "off"], value=_tri(value), **common)
        return gr.Checkbox(bool(value), **common)
    if base is int:
        return gr.Number(value, precision=0, **common)
    return gr.Number(value, **common)


def _tri(value: bool | None) -> str:
    return {None: "auto", True: "on", False: "off"}[value]


def _shown(f: dataclasses.Field, value: Any) -> Any:
    """A config value as its form component shows it: an optional yes / no as auto, on or off."""
    return _tri(value) if set(typing.get_args(typing.get_type_hints(TrainConfig)[f.name])) == {bool, type(None)} \
        else value


def _from_form(f: dataclasses.Field, value: Any) -> Any:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if value in ("auto", "on", "off"):
        return {"auto": None, "on": True, "off": False}[value]
    if value is None or value == "":
        return None if type(None) in typing.get_args(hint) else f.default
    if hint is int or int in typing.get_args(hint):
        return int(value)
    if hint is float or float in typing.get_args(hint):
        return float(value)
    return value


# ---- charts --------------------------------------------------------------------------------------------
def _series(log: list[dict[str, Any]], stage: str, key: str) -> tuple[list, list]:
    rows = [r for r in log if r.get("stage") == stage and isinstance(r.get(key), (int, float))]
    return [r["step"] for r in rows], [r[key] for r in rows]


def charts(method: str, log: list[dict[str, Any]]) -> tuple[go.Figure, go.Figure]:
    """The two live charts of a run: what its method optimises, and how its output looks."""
    main, side = go.Figure(), make_subplots(specs=[[{"secondary_y": True}]])
    if method == "rounds":
        rounds = [r for r in log if r.get("stage") == "round"]
        x, acc = [r["round"] for r in rounds], [r["accuracy"] for r in rounds]
        error = dict(type="data", symmetric=False, array=[r["accuracy_ci"][1] - r["accuracy"] for r in rounds],
                     arrayminus=[r["accuracy"] - r["accuracy_ci"][0] for r in rounds])
        main.add_trace(go.Scatter(x=x, y=acc, error_y=error, mode="lines+markers", name="held-out accuracy"))
        main.add_trace(go.Scatter(x=x, y=[r["valid_call_rate"] for r in rounds], mode="lines+markers",
                                  name="valid-call rate"))
        main.update_layout(title="Held-out accuracy per round (95% interval)", xaxis_title="round")
        main.update_yaxes(range=[0, 1.05])
        for k in sorted({r["round"] for r in log if r.get("stage") in ("sft", "dpo")}):
            rows = [r for r in log if r.get("round") == k and "loss" in r]
            side.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r["loss"] for r in rows], mode="lines+markers",
                                      name=f"round {k} loss"))
        side.update_layout(title="Training loss in each round")
    elif method == "grpo":
        for key, name in (("reward", "mean reward"), ("rewards/correct/mean", "accuracy of the sampled chains")):
            x, y = _series(log, "grpo", key)
            main.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
        main.update_layout(title="Reward and accuracy of the sampled groups")
        x, y = _series(log, "grpo", "kl")
        side.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="KL to the start"), secondary_y=False)
        x, y = _series(log, "grpo", "completions/mean_length")
        side.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="completion tokens"), secondary_y=True)
        side.update_layout(title="KL (kl_beta > 0) and completion length")
        side.update_yaxes(title_text="KL", secondary_y=False)
        side.update_yaxes(title_text="tokens", secondary_y=True)
    else:
        for stage in ("warmup", method):
            x, y = _series(log, stage, "loss")
            if y:
                main.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{stage} loss"))
        main.update_layout(title="Loss")
        if method == "dpo":
            x, y = _series(log, "dpo", "rewards/margins")
            side.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="reward margin"), secondary_y=False)
            x, y = _series(log, "dpo", "rewards/accuracies")
            side.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="reward accuracy"), secondary_y=True)
            side.update_layout(title="DPO rewards")
            side.update_yaxes(title_text="accuracy", range=[0, 1.05], secondary_y=True)
        else:
            x, y = _series(log, method, "mean_token_accuracy")
            side.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="token accuracy"))
            side.update_layout(title="Token accuracy on the model's calls")
    for figure in (main, side):
        figure.update_layout(xaxis_title=figure.layout.xaxis.title.text or "step", height=300,
                             margin=dict(l=40, r=40, t=40, b=40))
    return main, side


def progress_html(name: str, method: str, info: dict[str, Any], log: list[dict[str, Any]]) -> str:
    status = info.get("status", "starting")
    last = log[-1] if log else {}
    if method == "rounds":
        step, total = info.get("round") or 0, info.get("max_steps") or 0
        step = max([r["round"] for r in log if r.get("stage") == "round"], default=0)
    else:
        step, total = last.get("step", info.get("step", 0)) or 0, last.get("max_steps", info.get("max_steps")) or 0
    fraction = step / total if total else (1.0 if status == "finished" else 0.0)
    parts = [f"<b>{name}</b> ({method})", f"status <b id='train-status-word'>{status}</b>"]
    if total:
        parts.append(f"{'round' if method == 'rounds' else 'step'} {step} of {total}")
    if info.get("stage") and status == "running":
        parts.append(f"stage {info['stage']}")
    if status in ("starting", "running") and last.get("eta_s") is not None and method != "rounds":
        parts.append(f"ETA {fmt_seconds(last['eta_s'])}")
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if info.get("error"):
        parts.append(f"<span style='color:#c00'>{info['error']}</span>")
    bar = f"<div class='fc-bar'><div style='width:{100 * min(fraction, 1):.0f}%'></div></div>"
    return (f"<div id='train-progress-inner' data-step='{step}' data-status='{status}' data-method='{method}'>"
            f"{bar}{' · '.join(parts)}</div>")


def _result(run: dict[str, Any]) -> str:
    metrics = run.get("metrics") or {}
    for key, label in (("accuracy", "held-out acc"), ("reward", "reward"), ("rewards/margins", "margin"),
                       ("loss", "loss")):
        if isinstance(metrics.get(key), (int, float)):
            return f"{label} {metrics[key]:.3f}"
    return ""


def history() -> list[list]:
    return [[r["name"], r["method"] or "", r["task"] or "", r["status"], r["step"] or "", r["rows"] or "",
             _result(r), (r["started"] or "")[:16].replace("T", " "), r["train_seconds"] or ""]
            for r in training.list_runs()[:50]]


def preview_chart(facts: dict[str, Any] | None) -> go.Figure:
    """The token lengths of the rows a run would train on, against max_length."""
    figure = go.Figure()
    if facts and facts["lengths"]:
        figure.add_trace(go.Histogram(x=facts["lengths"], nbinsx=30, name="rows"))
        figure.add_vline(x=facts["max_length"], line_dash="dash", line_color="#c00",
                         annotation_text=f"max_length {facts['max_length']}")
    figure.update_layout(title="Tokens per row (prompt + completion, the longer side of a pair)", height=260,
                         xaxis_title="tokens", yaxis_title="rows", margin=dict(l=40, r=40, t=40, b=40))
    return figure


# ---- the tab -------------------------------------------------------------------------------------------
def build(ctx: Context) -> None:
    store = ctx.store
    fields = form_fields()

    def pair_set_choices(task: str | None) -> list[tuple[str, str]]:
        """Pairs built now from the chains, then every stored pair set of the task (imports included)."""
        sets = store.pair_sets(task) | store.pair_sets("unknown")
        return [(FROM_CHAINS, FROM_CHAINS), *[(f"{name} ({n} pairs)", name) for name, n in sorted(sets.items())]]

    def config_of(method, task, base, name, pair_set, chosen_sources, values) -> TrainConfig:
        """The run the form describes (ValueError with the reason when it cannot be one)."""
        if not task:
            raise ValueError("pick a task")
        name = (name or "").strip() or f"{method}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        options = {f.name: _from_form(f, v) for f, v in zip(fields, values) if method in f.metadata["methods"]}
        if method == "dpo" and pair_set and pair_set != FROM_CHAINS:
            options["pair_set"] = pair_set
        if method == "sft":
            options["sources"] = list(chosen_sources or SFT_SOURCES)
        return TrainConfig(name=name, method=method, task=task, base=(base or EMBEDDED).strip(), db=str(store.path),
                           **options)

    def form(config: dict[str, Any], locked: bool) -> dict:
        """The form showing `config` (a run's settings), locked while that run goes."""
        method_name = config.get("method", "dpo")
        updates = {method: gr.update(value=method_name, interactive=not locked),
                   task: gr.update(value=config.get("task"), interactive=not locked),
                   base_model: gr.update(value=config.get("base"), interactive=not locked),
                   name: gr.update(value=config.get("name"), interactive=not locked),
                   pairs: gr.update(choices=pair_set_choices(config.get("task")), value=config.get("pair_set") or FROM_CHAINS,
                                    visible=method_name == "dpo", interactive=not locked),
                   sources: gr.update(value=config.get("sources") or list(SFT_SOURCES), visible=method_name == "sft",
                                      interactive=not locked),
                   start_btn: gr.update(interactive=not locked), preview_btn: gr.update(interactive=not locked),
                   uploaded: gr.update(interactive=not locked), method_note: METHOD_NOTES[method_name]}
        if locked:  # the running run's settings in sight
            updates[advanced] = gr.Accordion(open=True)
        for f in fields:
            value = config.get(f.name, f.default)
            updates[components[f.name]] = gr.update(value=_shown(f, value),
                                                    visible=method_name in f.metadata["methods"],
                                                    interactive=not locked)
        return updates

    def unlock() -> dict:
        return {c: gr.update(interactive=True) for c in (method, task, base_model, name, pairs, sources, start_btn,
                                                         preview_btn, uploaded, *components.values())}

    def view(run: dict[str, Any] | None) -> dict:
        """Charts, progress, card, settings, worker output and whether to keep polling, for one run."""
        if not run:
            main, side = charts("dpo", [])
            return {chart_main: main, chart_side: side, settings: {}, card: {}, worker_log: "",
                    timer: gr.Timer(active=False),
                    progress: "<div id='train-progress-inner' data-status='none'>No run yet: pick a method, check "
                              "what it would train on with <b>Preview</b>, and press <b>Train</b>.</div>"}
        job = training.attach(run["out"])
        info, log = job.poll(), job.read_log()
        run_method = job.config.get("method", "dpo")
        main, side = charts(run_method, log)
        active = info.get("status") not in training.TERMINAL
        return {chart_main: main, chart_side: side, progress: progress_html(job.name, run_method, info, log),
                card: job.card, settings: job.config, worker_log: job.worker_output(60), timer: gr.Timer(active=active)}

    def on_method(method_name: str, adapter: str) -> dict:
        values = defaults(method_name) | {"adapter": adapter} if method_name != "rounds" else defaults(method_name)
        values["learning_rate"] = TrainConfig(name="x", method=method_name, task="fol", adapter=adapter).learning_rate
        updates = {components[f.name]: gr.update(visible=method_name in f.metadata["methods"],
                                                 value=_shown(f, values[f.name]))
                   for f in fields if f.name in values}
        updates |= {components[f.name]: gr.update(visible=False) for f in fields if f.name not in values}
        return updates | {method_note: METHOD_NOTES[method_name], pairs: gr.update(visible=method_name == "dpo"),
                          sources: gr.update(visible=method_name == "sft")}

    def show_preview(method_name, task_name, base, run_name, pair_set, chosen_sources, *values) -> dict:
        try:
            facts = preview(config_of(method_name, task_name, base, run_name or "preview", pair_set, chosen_sources,
                                      values), store)
        except (ValueError, RuntimeError, OSError) as exc:  # TrainingDataError is a ValueError: said, not raised
            return {preview_md: f"✗ Nothing to train on: {exc}", preview_plot: preview_chart(None),
                    preview_row: gr.update(visible=True)}
        warning = ""
        if facts["too_long"] and not facts["drop_too_long"]:
            warning = (f"\n\n⚠ {facts['too_long']} rows are longer than max_length {facts['max_length']}: the run "
                       f"would refuse them. Raise max_length to {max(facts['lengths'])} or switch on drop too long.")
        text = render_preview(facts).replace("\n", "  \n")
        return {preview_md: text + warning, preview_plot: preview_chart(facts), preview_row: gr.update(visible=True)}

    def start(method_name, task_name, base, run_name, pair_set, chosen_sources, *values) -> dict:
        try:
            config = config_of(method_name, task_name, base, run_name, pair_set, chosen_sources, values)
            job = training.start_training(config, store)
        except (ValueError, RuntimeError, OSError) as exc:  # a taken name, no data, a bad option: a message
            return {status_note: f"✗ Not started: {exc}"}
        run = {"name": config.name, "out": str(job.out)}
        return {run_state: run, status_note: f"Started **{config.name}** ({method_name}, worker pid {job.pid}). "
                                             "Closing this tab does not stop it.",
                runs: history(), **view(run), **form(config.to_dict(), locked=True)}

    def tick(run, seen) -> dict:
        if not run:
            return {timer: gr.Timer(active=False)}
        updates = view(run)
        job = training.attach(run["out"])
        key = f"{run['name']}:{len(job.read_log())}:{updates[timer].active}"
        if key == seen:  # nothing new: leave the charts alone (no flicker)
            updates.pop(chart_main), updates.pop(chart_side)
        updates[seen_state] = key
        if not updates[timer].active:
            status = job.poll().get("status", "ended")
            updates |= {runs: history(), status_note: f"Run **{run['name']}** {status}.", **unlock()}
        return updates

    def stop(run) -> dict:
        if not run:
            return {status_note: "No run to stop."}
        job = training.attach(run["out"])
        threading.Thread(target=job.stop, daemon=True, name=f"stop-{run['name']}").start()
        return {status_note: f"Stopping **{run['name']}** after its current step (it saves what it has)…"}

    def reattach() -> dict:
        """On page load: follow a run still going, its settings in the locked form; else show the latest run."""
        all_runs = training.list_runs()
        going = next((r for r in all_runs if r["status"] not in training.TERMINAL), None)
        run = going or (all_runs[0] if all_runs else None)
        run = {"name": run["name"], "out": run["out"]} if run else None
        updates = {run_state: run, runs: history(), **data_state(default_task()), **view(run)}
        if going:
            updates |= form(training.attach(going["out"]).config, locked=True)
            updates[status_note] = f"Reattached to **{going['name']}**, still running: its settings are shown."
        return updates

    def open_run(evt: gr.SelectData) -> dict:
        row = evt.row_value
        match = next((r for r in training.list_runs() if row and r["name"] == row[0]), None)
        if match is None:
            return gr.skip()
        run = {"name": match["name"], "out": match["out"]}
        return {run_state: run, **view(run)}

    def data_state(task_name: str | None) -> dict:
        """The pair sets to choose from, and the empty state when the task has nothing to train on yet."""
        facts = overview(store, task_name) if task_name else None
        nothing = facts is not None and not facts["pairs"]["problems"] and not facts["pairs"]["sets"]
        text = "" if not nothing else (
            f"**Nothing to train on yet for {task_name}.** DPO needs a training problem with a correct and an "
            f"incorrect chain, SFT needs correct chains; the store has {facts['chains']['total']} chains of it. "
            "Generate chains, or label the ones there (GRPO and rounds need none: they sample their own).")
        return {pairs: gr.update(choices=pair_set_choices(task_name)), empty_md: text,
                empty: gr.update(visible=nothing)}

    def upload(file, task_name) -> dict:
        if file is None:
            return {import_note: "Choose a JSONL or Parquet preference file."}
        original = getattr(file, "orig_name", None) or str(file)
        path = safe_upload(file, original)
        try:
            imported = import_pairs(path, store, file_name=Path(original).name)
        except ValueError as exc:  # a broken file or held-out problems: nothing is stored
            return {import_note: f"✗ Not imported: {exc}"}
        return {import_note: f"Imported {imported['pairs']} pairs from {Path(original).name} as pair set "
                             f"**{imported['policy']}** ({', '.join(imported['tasks'])}); it is selected for DPO. "
                             "Another import never replaces it.",
                pairs: gr.update(choices=pair_set_choices(task_name), value=imported["policy"])}

    with gr.Tab("Train", id="train", elem_id="tab-train") as tab:
        gr.Markdown("Train the small model on what the store holds. Training runs in its own process: it keeps "
                    "going when you close the tab, and this page picks it up again when you come back. Held-out "
                    "problems are never trained on.")
        run_state, seen_state = gr.State(None), gr.State("")
        with gr.Row():
            method = gr.Radio(list(METHODS), value="dpo", label="Method", elem_id="train-method-choice")
            task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task", elem_id="train-task")
            base_model = gr.Dropdown(model_choices(quantised=False), value=EMBEDDED, allow_custom_value=True, label="Base model",
                                     elem_id="train-base")
            name = gr.Textbox(label="Name of the tuned model (empty: automatic)", elem_id="train-name")
        method_note = gr.Markdown(METHOD_NOTES["dpo"], elem_id="train-method-note")
        with gr.Row(visible=False, elem_id="train-empty", elem_classes="fc-empty", equal_height=True) as empty:
            empty_md = gr.Markdown()
            generate_go = gr.Button("Generate chains →", variant="primary", elem_id="train-empty-generate", scale=0,
                                    min_width=180)
            label_go = gr.Button("Label chains →", elem_id="train-empty-label", scale=0, min_width=160)
        with gr.Row(equal_height=True):
            pairs = gr.Dropdown(pair_set_choices(default_task()), value=FROM_CHAINS, label="Pairs",
                                elem_id="train-pairs", scale=2,
                                info="pairs built now from the curated chains, or a stored pair set (an import)")
            uploaded = gr.File(label="Import a preference file (JSONL / Parquet) as a pair set",
                               file_types=[".jsonl", ".parquet"], elem_id="train-import", scale=1, height=90)
            sources = gr.CheckboxGroup(list(SFT_SOURCES), value=list(SFT_SOURCES), label="Correct chains from",
                                       visible=False, elem_id="train-sources")
        import_note = gr.Markdown(elem_id="train-import-note")
        with gr.Accordion("Settings", open=False, elem_id="train-advanced") as advanced:
            components = {}
            for group in range(0, len(fields), 4):
                with gr.Row():
                    for f in fields[group:group + 4]:
                        components[f.name] = _component(f, "dpo")
        with gr.Row():
            preview_btn = gr.Button("Preview the data", elem_id="train-preview-btn")
            start_btn = gr.Button("Train", variant="primary", elem_id="train-start")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Row(equal_height=False, visible=False) as preview_row:
            preview_md = gr.Markdown(elem_id="train-preview")
            preview_plot = gr.Plot(elem_id="train-preview-chart", show_label=False)
        status_note = gr.Markdown(elem_id="train-note")
        progress = gr.HTML(elem_id="train-progress")
        with gr.Row():
            chart_main = gr.Plot(elem_id="train-chart-main", show_label=False)
            chart_side = gr.Plot(elem_id="train-chart-side", show_label=False)
        with gr.Accordion("Worker output (the training process's log, live)", open=False, elem_id="train-log"):
            worker_log = gr.Textbox(lines=12, max_lines=12, show_label=False, elem_id="train-worker-log")
        with gr.Accordion("Settings of this run", open=False):
            settings = gr.JSON(elem_id="train-settings")
        with gr.Accordion("Run card", open=False):
            card = gr.JSON(elem_id="train-card")
        runs = gr.Dataframe(headers=HISTORY_HEADERS, value=history(), interactive=False, elem_id="train-history",
                            label="Runs from the app and the CLI (click one to see its charts and card)")
        timer = gr.Timer(1.0, active=False)

    ctx.model_pickers.append(base_model)
    form_inputs = [method, task, base_model, name, pairs, sources, *components.values()]
    form_outputs = set(form_inputs) | {start_btn, preview_btn, uploaded, method_note, advanced}
    view_outputs = {chart_main, chart_side, progress, card, settings, worker_log, timer}
    adapter = components["adapter"]
    method.input(on_method, [method, adapter], set(components.values()) | {pairs, sources, method_note})
    adapter.input(lambda a, m: {components["learning_rate"]: TrainConfig(name="x", method=m, task="fol",
                                                                          adapter=a).learning_rate},
                  [adapter, method], {components["learning_rate"]})
    preview_btn.click(show_preview, form_inputs, {preview_md, preview_plot, preview_row})
    start_btn.click(start, form_inputs, view_outputs | form_outputs | {run_state, status_note, runs})
    timer.tick(tick, [run_state, seen_state], view_outputs | form_outputs | {seen_state, runs, status_note},
               show_progress="hidden")
    stop_btn.click(stop, run_state, {status_note})
    task.input(lambda t: data_state(t) | {pairs: gr.update(choices=pair_set_choices(t), value=FROM_CHAINS)}, task,
               {pairs, empty, empty_md})
    for trigger in (ctx.store_version.change, tab.select):
        trigger(data_state, task, {pairs, empty, empty_md}, show_progress="hidden")
    ctx.task_pickers["train"] = task
    ctx.wiring.append(lambda: generate_go.click(lambda t: ctx.go("generate", t), task, ctx.navigation()))
    ctx.wiring.append(lambda: label_go.click(lambda t: ctx.go("curate", t), task, ctx.navigation()))
    uploaded.upload(upload, [uploaded, task], {import_note, pairs})
    runs.select(open_run, None, view_outputs | {run_state})
    ctx.loaders.append((reattach, [], view_outputs | form_outputs | {run_state, status_note, runs, empty, empty_md}))
