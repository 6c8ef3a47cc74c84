"""Compare tab: two models on the same problem side by side, both streaming at once (Stop ends both cleanly);
and an evaluation over N held-out problems, run as a server job (fcapp.jobs) that a reloaded page follows
again, with charts and the problems where the two differ."""

from __future__ import annotations

import queue
import threading

import gradio as gr

from fcapp import jobs
from fcapp.models import teachers
from fcapp.solve import SolveConfig
from fcapp.ui.common import (EMBEDDED, STOPS, ChainView, Context, chatbot, default_task, get_model, get_problem,
                             job_html, model_choices, problem_choices, short, stop_words, task_choices, verdict_text,
                             wait_for_slot, who)
from fcapp.ui.solve import problem_text, problem_update, stream_chain

SUMMARY_HEADERS = ["model", "accuracy", "95% CI", "valid-call rate", "mean steps", "mean tokens", "latency s",
                   "p vs first"]


def tuned_default(choices: list[str]) -> str:
    """The newest tuned model among `choices` (as `model_choices` lists them), else the embedded one (base vs
    base)."""
    tuned = (c for c in choices if c.split("@")[0] != EMBEDDED and not c.startswith(teachers.PREFIX))
    return next(tuned, EMBEDDED)


def side_by_side(task_obj, problem, models: dict[str, object], config: SolveConfig, views: dict[str, ChainView],
                 stop: threading.Event):
    """Run both chains in threads at once; yields each time either view changed. Setting `stop` ends both,
    each view marked stopped with what it had."""
    events: queue.Queue = queue.Queue()

    def worker(side: str) -> None:
        try:
            for _ in stream_chain(task_obj, problem, models[side], config, views[side], stop):
                events.put(side)
        except Exception as exc:  # noqa: BLE001 - shown in that side's chat
            views[side].stop(f"Stopped by an error ({exc})")
        finally:
            events.put(None)

    threads = [threading.Thread(target=worker, args=(side,), daemon=True, name=f"compare-{side}") for side in views]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            try:
                item = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                running -= 1
            yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def answer_md(view: ChainView, spec: str) -> str:
    if view.stopped:
        n = len(view.steps)
        return f"**{spec}** · **stopped** after {n} step{'' if n == 1 else 's'}, before a final answer"
    chain = view.chain
    if chain is None:
        return f"**{spec}**: …"
    if chain.stop_reason == "answer":
        outcome = verdict_text(chain.verdict, chain.answer, view.expected)
    else:
        outcome = f"No final answer ({stop_words(chain.stop_reason)})"
    n = len(chain.steps)
    return f"**{spec}** · {outcome} · {n} step{'' if n == 1 else 's'} · {chain.elapsed_s:.1f} s"


def eval_html(job: jobs.Job | None) -> str:
    return job_html(job, "cmp-eval-progress-inner", "")


def build(ctx: Context) -> None:
    store = ctx.store

    def run(task, problem_id, spec_a, spec_b, max_steps, max_new, request: gr.Request):
        try:
            task_obj, picked = get_problem(task, problem_id, split="heldout")
        except (ValueError, KeyError) as exc:
            yield {chat_a: [], chat_b: [], answer_a: f"✗ {exc.args[0] if exc.args else exc}", answer_b: ""}
            return
        specs = {"a": (spec_a or EMBEDDED).strip(), "b": (spec_b or EMBEDDED).strip()}
        views = {side: ChainView(picked.question, picked.answer) for side in specs}
        stop = STOPS.begin(request, "compare")

        def drawn(note_a: str | None = None, note_b: str | None = None) -> dict:
            return {chat_a: views["a"].messages(), chat_b: views["b"].messages(),
                    answer_a: note_a or answer_md(views["a"], specs["a"]),
                    answer_b: note_b or answer_md(views["b"], specs["b"])}

        yield drawn("starting…", "starting…") | {problem: gr.update(value=picked.id),
                                                 problem_md: problem_text(task, picked.id),
                                                 run_btn: gr.update(interactive=False)}
        held = yield from wait_for_slot(f"Compare: {short(picked.id, 30)}, {specs['a']} vs {specs['b']} for "
                                        f"{who(request)}", stop, lambda words: {answer_a: words, answer_b: ""})
        try:
            if not held:
                yield {answer_a: "Stopped before it started.", answer_b: "", run_btn: gr.update(interactive=True)}
                return
            yield drawn("loading…", "loading…")
            try:
                models = {side: get_model(spec) for side, spec in specs.items()}
            except Exception as exc:  # noqa: BLE001
                yield {answer_a: f"✗ {exc}", answer_b: f"✗ {exc}", run_btn: gr.update(interactive=True)}
                return
            config = SolveConfig(max_steps=int(max_steps), max_new_tokens=int(max_new))  # greedy
            for _ in side_by_side(task_obj, picked, models, config, views, stop):
                yield drawn()
        finally:
            if held:
                jobs.SLOT.release()
            STOPS.end(request, "compare", stop)
        yield drawn() | {run_btn: gr.update(interactive=True)}

    def stop_side_by_side(request: gr.Request) -> dict:
        return gr.skip() if STOPS.stop(request, "compare") else {answer_a: "Nothing is running."}

    # ---- evaluation as a server job ---------------------------------------------------------------------
    def shown(result, specs) -> dict:
        from fcapp.evaluate import differing_problems, figures

        figs = figures(result)
        rows = []
        for spec, s in result["models"].items():
            p = s.get("p_value_vs_base")
            rows.append([spec, f"{s['accuracy']:.3f}", f"{s['accuracy_ci'][0]:.2f}–{s['accuracy_ci'][1]:.2f}",
                         f"{s['valid_call_rate']:.3f}", f"{s['mean_steps']:.2f}", f"{s['mean_tokens']:.1f}",
                         f"{s['mean_latency_s']:.2f}", "" if p is None else f"{p:.4f}"])
        differ = differing_problems(result, specs[0], specs[1])
        diff_rows = [[d["problem_id"], d["expected"], d[f"{specs[0]}_answer"], d[f"{specs[1]}_answer"], d["better"]]
                     for d in differ]
        return {eval_note: f"Evaluated {result['n']} {result['task']} problems; the two differ on {len(diff_rows)} "
                           f"(evaluation #{result.get('eval_id', '')}).",
                acc_plot: figs["accuracy"], valid_plot: figs["valid_call_rate"], steps_plot: figs["mean_steps"],
                latency_plot: figs["mean_latency_s"], summary: rows,
                differ_df: gr.update(value=diff_rows, headers=["problem", "expected", specs[0], specs[1], "right one"])}

    def follow(job: jobs.Job | None) -> dict:
        active = job is not None and job.active
        updates = {eval_job: job.id if job else None, eval_progress: eval_html(job), eval_timer: gr.Timer(active=active),
                   eval_btn: gr.update(interactive=not active), eval_stop: gr.update(interactive=active)}
        if job is not None and job.status == "finished" and job.result:
            updates |= shown(job.result, job.settings["models"])
        return updates

    def evaluation(task, spec_a, spec_b, n, split, max_steps, max_new, request: gr.Request) -> dict:
        from fcapp.evaluate import EvalConfig

        specs = [(spec_a or EMBEDDED).strip(), (spec_b or EMBEDDED).strip()]
        if specs[0] == specs[1]:
            return {eval_note: "✗ Pick two different models to evaluate."}
        try:
            config = EvalConfig(task, specs, split=split, limit=int(n), max_steps=int(max_steps),
                                max_new_tokens=int(max_new))
            job = jobs.start_evaluation(config, store, get_model, who(request))
        except (RuntimeError, ValueError) as exc:
            return {eval_note: f"✗ Not started: {exc}", **follow(jobs.latest("evaluation"))}
        return {eval_note: "Started. It runs in the server: a reload finds it again.", **follow(job)}

    def eval_tick(job_id) -> dict:
        job = jobs.get(job_id)
        updates = follow(job)
        if job is not None and not job.active:
            updates[past] = gr.update(choices=past_choices(job.settings["task"]))
            if job.status != "finished":
                updates[eval_note] = f"Evaluation {job.status}: {job.note}"
        return updates

    def eval_reattach() -> dict:
        job = jobs.latest("evaluation")
        if job is None or not job.active:
            return gr.skip()
        return follow(job) | {eval_note: f"Reattached to the running evaluation ({job.title})."}

    def stop_eval(job_id) -> dict:
        job = jobs.get(job_id) or jobs.latest("evaluation")
        if job is None or not job.active:
            return {eval_note: "No evaluation is running."}
        job.stop()
        return follow(job)

    def past_choices(task):
        return [(f"#{e['id']} · {' vs '.join(map(str, e['models']))} · n={e['results'].get('n')}", e["id"])
                for e in store.list_evals(task=task, limit=30)]

    def load_past(eval_id) -> dict:
        record = store.get_eval(int(eval_id)) if eval_id else None
        if record is None:
            return {eval_note: "Pick an evaluation."}
        specs = list(record["results"]["models"])
        return shown(record["results"], specs[:2] if len(specs) >= 2 else specs * 2)

    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        task0 = default_task()
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=task0, label="Task", elem_id="cmp-task", scale=1)
            initial = problem_choices(task0, "heldout")
            problem = gr.Dropdown(initial, value=initial[0][1] if initial else None, label="Held-out problem",
                                  allow_custom_value=True, elem_id="cmp-problem", scale=3)  # see solve-problem
        problem_md = gr.Markdown(problem_text(task0, initial[0][1] if initial else None), elem_id="cmp-problem-text")
        choices = model_choices()
        with gr.Row():
            model_a = gr.Dropdown(choices, value=EMBEDDED, allow_custom_value=True, label="Model A (base)",
                                  elem_id="cmp-model-a")
            model_b = gr.Dropdown(choices, value=tuned_default(choices), allow_custom_value=True,
                                  label="Model B (tuned)", elem_id="cmp-model-b")
            max_steps = gr.Slider(1, 20, value=10, step=1, label="Step limit", elem_id="cmp-max-steps")
            max_new = gr.Slider(16, 512, value=160, step=8, label="Max new tokens per step", elem_id="cmp-max-new")
        no_tuned = gr.Markdown("No tuned model yet: this compares the base model with itself. Train one in the "
                               "Train tab, then it appears as model B.", elem_id="cmp-empty", elem_classes="fc-empty",
                               visible=tuned_default(choices) == EMBEDDED)
        with gr.Row():
            run_btn = gr.Button("Solve side by side", variant="primary", elem_id="cmp-run")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
        with gr.Row(equal_height=False):
            with gr.Column():
                answer_a = gr.Markdown(elem_id="cmp-answer-a")
                chat_a = chatbot("cmp-chat-a")
            with gr.Column():
                answer_b = gr.Markdown(elem_id="cmp-answer-b")
                chat_b = chatbot("cmp-chat-b")

        with gr.Accordion("Evaluate A vs B on N held-out problems", open=True, elem_id="cmp-eval"):
            eval_job = gr.State(None)
            with gr.Row():
                n = gr.Slider(1, 200, value=20, step=1, label="Problems (N)", elem_id="cmp-eval-n")
                split = gr.Radio(["heldout", "train"], value="heldout", label="Split")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="cmp-eval-run")
                eval_stop = gr.Button("Stop", variant="stop", elem_id="cmp-eval-stop", interactive=False)
                past = gr.Dropdown(past_choices(task0), label="Earlier evaluations", elem_id="cmp-eval-past")
            eval_note = gr.Markdown(elem_id="cmp-eval-note")
            eval_progress = gr.HTML(eval_html(None), elem_id="cmp-eval-progress")
            with gr.Row():
                acc_plot = gr.Plot(elem_id="cmp-plot-accuracy", show_label=False)
                valid_plot = gr.Plot(elem_id="cmp-plot-valid", show_label=False)
            with gr.Row():
                steps_plot = gr.Plot(elem_id="cmp-plot-steps", show_label=False)
                latency_plot = gr.Plot(elem_id="cmp-plot-latency", show_label=False)
            summary = gr.Dataframe(headers=SUMMARY_HEADERS, interactive=False, elem_id="cmp-eval-summary",
                                   label="Summary")
            differ_df = gr.Dataframe(headers=["problem", "expected", "A", "B", "right one"], interactive=False,
                                     elem_id="cmp-diff", label="Problems where the two differ")
            eval_timer = gr.Timer(1.0, active=False)

    ctx.model_pickers += [model_a, model_b]
    ctx.task_pickers["compare"] = task
    task.change(lambda t: problem_update(t, "heldout"), task, problem)
    task.change(lambda t: gr.update(choices=past_choices(t)), task, past)
    problem.change(problem_text, [task, problem], problem_md)
    run_btn.click(run, [task, problem, model_a, model_b, max_steps, max_new],
                  {chat_a, chat_b, answer_a, answer_b, problem, problem_md, run_btn}, show_progress="hidden")
    stop_btn.click(stop_side_by_side, None, {answer_a}, show_progress="hidden")
    eval_shown = {eval_job, eval_progress, eval_timer, eval_btn, eval_stop, eval_note, acc_plot, valid_plot,
                  steps_plot, latency_plot, summary, differ_df}
    eval_btn.click(evaluation, [task, model_a, model_b, n, split, max_steps, max_new], eval_shown)
    eval_timer.tick(eval_tick, eval_job, eval_shown | {past}, show_progress="hidden")
    eval_stop.click(stop_eval, eval_job, eval_shown)
    past.input(load_past, past, eval_shown)

    def refresh_models(current_b) -> dict:
        """A newly registered model becomes model B when B was the base model or no longer exists. Otherwise
        only the choices change: a value sent back would undo a pick made while this ran (opening the tab)."""
        choices = model_choices()
        newest = tuned_default(choices)
        if current_b in (None, "", EMBEDDED) or current_b not in choices:
            b = gr.update(choices=choices, value=newest)
        else:
            b = gr.update(choices=choices)
        return {model_b: b, no_tuned: gr.update(visible=newest == EMBEDDED)}

    tab.select(refresh_models, model_b, {model_b, no_tuned})
    ctx.models_version.change(refresh_models, model_b, {model_b, no_tuned})
    ctx.loaders.append((refresh_models, [model_b], {model_b, no_tuned}))
    ctx.loaders.append((eval_reattach, [], eval_shown))
