"""Train tab: one click runs DPO on the current pairs in a worker process; live charts; stop; reattach.

The run belongs to its worker process, not to the page: closing the tab changes nothing, and a page
load looks for a run still going (the store's runs, then the model folders) and follows it again.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fcapp import train as training
from fcapp.pairs import PairPolicy, make_pairs
from fcapp.paths import data_dir, models_dir
from fcapp.ui.common import EMBEDDED, Context, default_task, fmt_seconds, model_choices, task_choices

HISTORY_HEADERS = ["run", "name", "status", "steps", "pairs", "final loss", "margin", "started", "seconds"]


# ---- charts ---------------------------------------------------------------------------------------------
def charts(log: list[dict[str, Any]]) -> tuple[go.Figure, go.Figure]:
    loss = go.Figure()
    rewards = make_subplots(specs=[[{"secondary_y": True}]])
    for stage in ("sft", "dpo"):
        rows = [r for r in log if r.get("stage", "dpo") == stage and "loss" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        loss.add_trace(go.Scatter(x=steps, y=[r["loss"] for r in rows], mode="lines+markers", name=f"{stage} loss"))
        if stage == "dpo":
            rewards.add_trace(go.Scatter(x=steps, y=[r.get("rewards/margins") for r in rows], mode="lines+markers",
                                         name="reward margin"), secondary_y=False)
            rewards.add_trace(go.Scatter(x=steps, y=[r.get("rewards/accuracies") for r in rows],
                                         mode="lines+markers", name="reward accuracy"), secondary_y=True)
    last_step = max((r.get("step", 0) for r in log), default=0)
    for figure in (loss, rewards):  # whole steps on the x axis
        figure.update_xaxes(tick0=0, dtick=max(1, -(-last_step // 10)))
    loss.update_layout(title="Loss", xaxis_title="step", height=300, margin=dict(l=40, r=20, t=40, b=40))
    rewards.update_layout(title="DPO rewards", xaxis_title="step", height=300, margin=dict(l=40, r=40, t=40, b=40))
    rewards.update_yaxes(title_text="margin", secondary_y=False)
    rewards.update_yaxes(title_text="accuracy", range=[0, 1.05], secondary_y=True)
    return loss, rewards


def progress_html(name: str, info: dict[str, Any], log: list[dict[str, Any]]) -> str:
    status = info.get("status", "starting")
    last = log[-1] if log else {}
    step, total = last.get("step", info.get("step", 0)) or 0, last.get("max_steps", info.get("max_steps")) or 0
    fraction = step / total if total else (1.0 if status == "finished" else 0.0)
    parts = [f"<b>{name}</b>", f"status <b id='train-status-word'>{status}</b>"]
    if total:
        parts.append(f"step {step}/{total}")
    if status in ("starting", "running") and last.get("eta_s") is not None:
        parts.append(f"ETA {fmt_seconds(last['eta_s'])}")
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if info.get("stage") == "loading" and not log:
        parts.append("loading the model…")
    if info.get("error"):
        parts.append(f"<span style='color:#c00'>{info['error']}</span>")
    bar = (f"<div class='fc-bar'><div style='width:{100 * min(fraction, 1):.0f}%'></div></div>")
    return f"<div id='train-progress-inner' data-step='{step}' data-status='{status}'>{bar}{' · '.join(parts)}</div>"


# ---- runs -----------------------------------------------------------------------------------------------
def _card(out: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(out) / "card.json").read_text())
    except (OSError, ValueError):
        return {}


def build(ctx: Context) -> None:
    store = ctx.store

    def job_of(run: dict[str, Any]) -> training.TrainingJob:
        return training.attach(run["out"])

    def settle(run: dict[str, Any], info: dict[str, Any]) -> None:
        """Record a finished run's outcome in the store (once)."""
        if run.get("id") is None or info.get("status") not in training.TERMINAL:
            return
        stored = store.get_run(run["id"])
        if stored and stored["status"] in training.TERMINAL:
            return
        card = _card(run["out"])
        store.update_run(run["id"], status=info["status"], metrics=card.get("metrics") or {},
                         finished_at=time.time())

    def history() -> list[list]:
        rows = []
        for r in store.list_runs(limit=50):
            card = _card(r["out_dir"] or "")
            metrics = card.get("metrics") or r.get("metrics") or {}
            rows.append([r["id"], r["name"], r["status"], card.get("global_step", ""),
                         (card.get("data") or {}).get("rows", ""),
                         f"{metrics['loss']:.4f}" if isinstance(metrics.get("loss"), (int, float)) else "",
                         f"{metrics['rewards/margins']:.3f}" if isinstance(metrics.get("rewards/margins"), (int, float))
                         else "", time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
                         card.get("train_seconds", "")])
        return rows

    def view(run: dict[str, Any] | None):
        """Charts, progress, card and whether to keep polling, for one run."""
        if not run:
            loss, rewards = charts([])
            return loss, rewards, "<div id='train-progress-inner' data-status='none'>No run yet.</div>", {}, False, 0
        job = job_of(run)
        info = job.poll()
        log = job.read_log()
        settle(run, info)
        loss, rewards = charts(log)
        active = info.get("status") not in training.TERMINAL
        return loss, rewards, progress_html(run["name"], info, log), _card(run["out"]), active, len(log)

    def start(task, base, name, method, epochs, max_steps, lr, beta, batch, accum, max_length, sft_steps, max_per):
        if not task:
            raise gr.Error("Pick a task.")
        name = (name or "").strip() or f"dpo-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        pairs_file = data_dir("exports") / f"train-{name}.jsonl"
        try:
            card = make_pairs(store, task, pairs_file, PairPolicy(int(max_per)))
            if not card["pairs"]:
                raise ValueError("no preference pairs yet: curate chains (or generate some) so that some problems "
                                 "have a correct and an incorrect chain")
            config = training.TrainConfig(
                pairs=str(pairs_file), name=name, base=(base or EMBEDDED).strip(), method=method,
                epochs=float(epochs), learning_rate=float(lr) if lr else None, beta=float(beta),
                batch_size=int(batch), grad_accum=int(accum), max_length=int(max_length),
                max_steps=int(max_steps) if max_steps else -1, sft_warmup_steps=int(sft_steps or 0),
                drop_too_long=True)
            job = training.start_training(config)
        except (ValueError, RuntimeError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        run_id = store.add_run(name, "dpo", config.to_dict(), out_dir=str(job.out), status="running")
        run = {"id": run_id, "name": name, "out": str(job.out)}
        note = f"Started **{name}** on {card['pairs']} pairs (worker pid {job.pid}). Closing this tab does not stop it."
        return (run, note, *view(run)[:4], gr.Timer(active=True), history())

    def tick(run, seen):
        if not run:
            return (gr.update(),) * 4 + (gr.Timer(active=False), seen) + (gr.update(),) * 3
        loss, rewards, progress, card, active, log_len = view(run)
        key = f"{run['name']}:{log_len}:{active}"
        charts_out = (loss, rewards) if key != seen else (gr.update(), gr.update())
        if active:
            return (*charts_out, progress, gr.update(), gr.Timer(active=True), key, gr.update(), gr.update(),
                    gr.update())
        status = card.get("status") or "ended"
        return (*charts_out, progress, card, gr.Timer(active=False), key, history(),
                gr.update(choices=model_choices()), f"Run **{run['name']}** {status}.")

    def stop(run):
        if not run:
            return "No run to stop."
        job = job_of(run)
        threading.Thread(target=job.stop, daemon=True, name=f"stop-{run['name']}").start()
        return f"Stopping **{run['name']}** after its current step (it saves what it has)…"

    def reattach():
        """On page load: follow a run still going (store first, then model folders), else the latest run."""
        candidates = [{"id": r["id"], "name": r["name"], "out": r["out_dir"] or str(models_dir() / r["name"])}
                      for r in store.list_runs(limit=20) if r["out_dir"] or r["name"]]
        known = {Path(c["out"]).resolve() for c in candidates}
        folders = sorted(models_dir().glob("*/status.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += [{"id": None, "name": p.parent.name, "out": str(p.parent)} for p in folders
                       if p.parent.resolve() not in known]
        latest = None
        for run in candidates:
            if not (Path(run["out"]) / "status.json").exists():
                continue
            info = job_of(run).poll()
            settle(run, info)
            latest = latest or run
            if info.get("status") not in training.TERMINAL:
                note = f"Reattached to **{run['name']}**, still running."
                return (run, note, *view(run)[:4], gr.Timer(active=True), history(),
                        gr.update(choices=model_choices()))
        loss, rewards, progress, card, _, _ = view(latest)
        return (latest, "", loss, rewards, progress, card, gr.Timer(active=False), history(),
                gr.update(choices=model_choices()))

    def open_run(evt: gr.SelectData):
        row = evt.row_value
        stored = store.get_run(int(row[0])) if row else None
        if stored is None:
            return (gr.update(),) * 6
        run = {"id": stored["id"], "name": stored["name"], "out": stored["out_dir"]}
        loss, rewards, progress, card, active, _ = view(run)
        return run, loss, rewards, progress, card or stored, gr.Timer(active=active)

    with gr.Tab("Train", id="train", elem_id="tab-train"):
        gr.Markdown("DPO on the pairs built from the curated chains. Training runs in its own process: it keeps "
                    "going when you close the tab, and this page picks it up again when you come back.")
        run_state, seen = gr.State(None), gr.State("")
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task (pairs)", elem_id="train-task")
            base = gr.Dropdown(model_choices(), value=EMBEDDED, allow_custom_value=True, label="Base model",
                               elem_id="train-base")
            name = gr.Textbox(label="Name of the tuned model (empty: automatic)", elem_id="train-name")
        with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
            with gr.Row():
                method = gr.Radio(["lora", "full"], value="lora", label="Method", elem_id="train-method")
                epochs = gr.Number(3, label="Epochs", elem_id="train-epochs")
                max_steps = gr.Number(0, precision=0, label="Max steps (0: by epochs)", elem_id="train-max-steps")
                lr = gr.Number(0, label="Learning rate (0: default for the method)", elem_id="train-lr")
                beta = gr.Number(0.1, label="DPO beta", elem_id="train-beta")
            with gr.Row():
                batch = gr.Number(2, precision=0, label="Batch size", elem_id="train-batch")
                accum = gr.Number(2, precision=0, label="Gradient accumulation", elem_id="train-accum")
                max_length = gr.Number(1024, precision=0, label="Max length (tokens)", elem_id="train-max-length")
                sft_steps = gr.Number(0, precision=0, label="SFT warm-up steps", elem_id="train-sft")
                max_per = gr.Number(4, precision=0, label="Max pairs per problem", elem_id="train-max-per")
        with gr.Row():
            start_btn = gr.Button("Train", variant="primary", elem_id="train-start")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        note = gr.Markdown(elem_id="train-note")
        progress = gr.HTML(elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.Plot(elem_id="train-loss", show_label=False)
            rewards_plot = gr.Plot(elem_id="train-rewards", show_label=False)
        with gr.Accordion("Run card", open=False):
            card = gr.JSON(elem_id="train-card")
        runs = gr.Dataframe(headers=HISTORY_HEADERS, value=history(), interactive=False, elem_id="train-history",
                            label="Runs (click one to see its charts and card)")
        timer = gr.Timer(1.0, active=False)

        start_btn.click(start, [task, base, name, method, epochs, max_steps, lr, beta, batch, accum, max_length,
                                sft_steps, max_per],
                        [run_state, note, loss_plot, rewards_plot, progress, card, timer, runs])
        timer.tick(tick, [run_state, seen], [loss_plot, rewards_plot, progress, card, timer, seen, runs, base, note],
                   show_progress="hidden")
        stop_btn.click(stop, run_state, note)
        runs.select(open_run, None, [run_state, loss_plot, rewards_plot, progress, card, timer])
        ctx.loaders.append((reattach, [], [run_state, note, loss_plot, rewards_plot, progress, card, timer, runs,
                                            base]))
