"""Generate tab: a teacher model solves training problems K times each, every chain verified and stored the
moment it ends. The job runs in the server (fcapp.jobs), not in the page: a reloaded or second page follows
it again, with its progress and its latest chains."""

from __future__ import annotations

import gradio as gr

from fcapp import jobs
from fcapp.generate import GenerateConfig
from fcapp.ui.common import (EMBEDDED, MODEL_HELP, Context, default_task, get_model, job_html, model_choices,
                             task_choices, who)

HEADERS = ["problem", "verifier", "steps", "answer", "ended"]


def progress_html(job: jobs.Job | None) -> str:
    return job_html(job, "gen-progress-inner", "No generation has run since the app started. Pick a task and a "
                                               "teacher and press <b>Start generation</b>.")


def build(ctx: Context) -> None:
    store = ctx.store

    def follow(job: jobs.Job | None) -> dict:
        """Everything the tab shows of a job, and whether to keep following it."""
        active = job is not None and job.active
        rows = [[r["problem"], r["verifier"], r["steps"], r["answer"], r["ended"]] for r in (job.recent if job else [])]
        return {job_state: job.id if job else None, progress: progress_html(job), table: rows,
                timer: gr.Timer(active=active), start_btn: gr.update(interactive=not active),
                stop_btn: gr.update(interactive=active),
                curate_btn: gr.update(visible=bool(job and job.done and not active))}

    def start(task, teacher, samples, limit, temperature, reference, max_steps, max_new, request: gr.Request):
        if not task:
            return {note: "Pick a task first."}
        try:
            config = GenerateConfig(task, teacher=(teacher or EMBEDDED).strip(), samples=int(samples),
                                    limit=int(limit or 0) or None, temperature=float(temperature),
                                    max_steps=int(max_steps), max_new_tokens=int(max_new), reference=bool(reference))
            job = jobs.start_generation(config, store, get_model, who(request))
        except (RuntimeError, ValueError, TypeError) as exc:
            return {note: f"✗ Not started: {exc}", **follow(jobs.latest("generation"))}
        return {note: "Started. The job belongs to the server: closing or reloading this page does not stop it.",
                **follow(job)}

    def tick(job_id) -> dict:
        job = jobs.get(job_id)
        updates = follow(job)
        if job is not None and not job.active:
            updates[note] = f"Generation {job.status}. The Curate tab has the new chains."
        return updates

    def stop(job_id) -> dict:
        job = jobs.get(job_id) or jobs.latest("generation")
        if job is None or not job.active:
            return {note: "No generation is running."}
        job.stop()
        return {note: "Stopping: the chains being written are finished and stored, no new ones start.",
                **follow(job)}

    def reattach() -> dict:
        """On page load: follow the running job (its settings in the form), else show the last one."""
        job = jobs.latest("generation")
        updates = follow(job)
        if job is not None and job.active:
            s = job.settings
            updates |= {note: f"Reattached to the running generation ({job.title}).", task: s["task"],
                        teacher: s["teacher"], samples: s["samples"], limit: s["limit"] or 0,
                        temperature: s["temperature"], max_steps: s["max_steps"], max_new: s["max_new_tokens"],
                        reference: s["reference"]}
        return updates

    with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
        gr.Markdown("A teacher model solves each training problem several times (K samples); the verifier checks "
                    "every chain against the ground truth and it is stored at once, so stopping loses nothing "
                    "finished and running the same settings again resumes. Held-out problems are kept for "
                    "evaluation and never generated on. Start small: the embedded model writes a few chains a "
                    "minute on GSM8K and a few hundred on fol.")
        job_state = gr.State(None)
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task", elem_id="gen-task")
            teacher = gr.Dropdown(model_choices(), value=EMBEDDED, allow_custom_value=True, label="Teacher",
                                  info=MODEL_HELP, elem_id="gen-teacher", scale=2)
            samples = gr.Slider(1, 16, value=4, step=1, label="Samples per problem (K)", elem_id="gen-samples")
            limit = gr.Number(5, precision=0, label="First N training problems (0 = all)", elem_id="gen-limit")
        with gr.Row():
            temperature = gr.Slider(0, 1.5, value=0.8, step=0.05, label="Temperature", elem_id="gen-temperature")
            max_steps = gr.Slider(1, 20, value=10, step=1, label="Step limit", elem_id="gen-max-steps")
            max_new = gr.Slider(16, 512, value=160, step=8, label="Max new tokens per step", elem_id="gen-max-new")
            reference = gr.Checkbox(True, label="Also store reference chains (known-correct, from the data)",
                                    elem_id="gen-reference")
        with gr.Row():
            start_btn = gr.Button("Start generation", variant="primary", elem_id="gen-start")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="gen-stop", interactive=False)
        note = gr.Markdown(elem_id="gen-status")
        progress = gr.HTML(progress_html(None), elem_id="gen-progress")
        table = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="gen-table", max_height=320,
                             label="Chains of this job as they end, newest first")
        curate_btn = gr.Button("Curate the new chains →", elem_id="gen-curate", visible=False)
        timer = gr.Timer(1.0, active=False)

    ctx.model_pickers.append(teacher)
    shown = {job_state, progress, table, timer, start_btn, stop_btn, curate_btn}
    start_btn.click(start, [task, teacher, samples, limit, temperature, reference, max_steps, max_new],
                    shown | {note})
    stop_btn.click(stop, job_state, shown | {note})
    timer.tick(tick, job_state, shown | {note}, show_progress="hidden")
    ctx.task_pickers["generate"] = task
    ctx.wiring.append(lambda: curate_btn.click(lambda t: ctx.go("curate", t), task, ctx.navigation()))
    ctx.loaders.append((reattach, [], shown | {note, task, teacher, samples, limit, temperature, max_steps, max_new,
                                               reference}))
