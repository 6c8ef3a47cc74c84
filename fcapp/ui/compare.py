"""Compare tab: two models on the same problem side by side, both streaming at once; and an
evaluation over N held-out problems with charts and the problems where the two differ."""

from __future__ import annotations

import queue
import threading

import gradio as gr

from fcapp.models import teachers
from fcapp.solve import SolveConfig
from fcapp.ui.common import (EMBEDDED, MODEL_SLOT, ChainView, Context, busy, chatbot, default_task, get_model,
                             get_problem, model_choices, problem_choices, short, task_choices, verdict_text)
from fcapp.ui.solve import problem_text, problem_update, stream_chain

SUMMARY_HEADERS = ["model", "accuracy", "95% CI", "valid-call rate", "mean steps", "mean tokens", "latency s",
                   "p vs first"]
_running: dict[str, threading.Event] = {}  # the evaluation's stop switch (one at a time: the model slot)


def tuned_default() -> str:
    """The newest tuned model, else the embedded one (base vs base)."""
    return next((c for c in model_choices()[1:] if not c.startswith(teachers.PREFIX)), EMBEDDED)


def side_by_side(task_obj, problem, models: dict[str, object], config: SolveConfig, views: dict[str, ChainView],
                 stop: threading.Event):
    """Run both chains in threads at once; yields each time either view changed."""
    events: queue.Queue = queue.Queue()

    def worker(side: str) -> None:
        try:
            for _ in stream_chain(task_obj, problem, models[side], config, views[side]):
                events.put(side)
                if stop.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - shown in that side's chat
            views[side].stop(f"Stopped by an error: {exc}")
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
    chain = view.chain
    if chain is None:
        return f"**{spec}**: …"
    if chain.stop_reason == "answer":
        outcome = verdict_text(chain.verdict, chain.answer, view.expected)
    else:
        outcome = f"No final answer ({chain.stop_reason.replace('_', ' ')})"
    n = len(chain.steps)
    return f"**{spec}** · {outcome} · {n} step{'' if n == 1 else 's'} · {chain.elapsed_s:.1f} s"


def build(ctx: Context) -> None:
    store = ctx.store

    def run(task, problem_id, spec_a, spec_b, max_steps, max_new):
        try:
            task_obj, problem = get_problem(task, problem_id)
        except (ValueError, KeyError) as exc:
            yield [], [], f"✗ {exc}", ""
            return
        specs = {"a": (spec_a or EMBEDDED).strip(), "b": (spec_b or EMBEDDED).strip()}
        views = {side: ChainView(problem.question, problem.answer) for side in specs}
        yield views["a"].messages(), views["b"].messages(), "loading…", "loading…"
        with busy(f"Compare: {short(problem.id, 30)}, {specs['a']} vs {specs['b']}"):
            try:
                models = {side: get_model(spec) for side, spec in specs.items()}
            except Exception as exc:  # noqa: BLE001
                yield gr.update(), gr.update(), f"✗ {exc}", f"✗ {exc}"
                return
            config = SolveConfig(int(max_steps), 0.0, 1.0, int(max_new), 0)
            stop = threading.Event()
            for _ in side_by_side(task_obj, problem, models, config, views, stop):
                yield (views["a"].messages(), views["b"].messages(), answer_md(views["a"], specs["a"]),
                       answer_md(views["b"], specs["b"]))
        yield (views["a"].messages(), views["b"].messages(), answer_md(views["a"], specs["a"]),
               answer_md(views["b"], specs["b"]))

    def evaluation(task, spec_a, spec_b, n, split, max_steps, max_new, progress=gr.Progress()):
        from fcapp.evaluate import EvalConfig, evaluate

        specs = [(spec_a or EMBEDDED).strip(), (spec_b or EMBEDDED).strip()]
        if specs[0] == specs[1]:
            raise gr.Error("Pick two different models to evaluate.")
        stop = _running["evaluation"] = threading.Event()
        config = EvalConfig(task, specs, split, int(n), None, int(max_steps), 0, int(max_new))
        progress(0, desc="loading models")
        with busy(f"Evaluation: {task}, {specs[0]} vs {specs[1]}, {int(n)} problems"):
            models = {spec: get_model(spec) for spec in specs}
            try:
                result = evaluate(config, store, stop=stop, models=models,
                                  on_progress=lambda done, total, name: progress((done, total), desc=f"{name}"))
            except InterruptedError:
                return ("Evaluation stopped.", *[gr.update()] * 7)
            finally:
                _running.pop("evaluation", None)
        return (*shown(result, specs), gr.update(choices=past_choices(task)))

    def shown(result, specs):
        from fcapp.evaluate import differing_problems, figures

        figs = figures(result)
        summary = []
        for spec, s in result["models"].items():
            p = s.get("p_value_vs_base")
            summary.append([spec, f"{s['accuracy']:.3f}", f"{s['accuracy_ci'][0]:.2f}–{s['accuracy_ci'][1]:.2f}",
                            f"{s['valid_call_rate']:.3f}", f"{s['mean_steps']:.2f}", f"{s['mean_tokens']:.1f}",
                            f"{s['mean_latency_s']:.2f}", "" if p is None else f"{p:.4f}"])
        differ = differing_problems(result, specs[0], specs[1])
        rows = [[d["problem_id"], d["expected"], d[f"{specs[0]}_answer"], d[f"{specs[1]}_answer"], d["better"]]
                for d in differ]
        note = (f"Evaluated {result['n']} {result['task']} problems; the two differ on {len(rows)}. "
                f"(eval {result.get('eval_id', '')})")
        return (note, figs["accuracy"], figs["valid_call_rate"], figs["mean_steps"], figs["mean_latency_s"],
                summary, gr.update(value=rows, headers=["problem", "expected", specs[0], specs[1], "right one"]))

    def past_choices(task):
        return [(f"#{e['id']} · {' vs '.join(map(str, e['models']))} · n={e['results'].get('n')}", e["id"])
                for e in store.list_evals(task=task, limit=30)]

    def load_past(eval_id):
        record = store.get_eval(int(eval_id)) if eval_id else None
        if record is None:
            return ("Pick an evaluation.", *[gr.update()] * 6)
        specs = list(record["results"]["models"])
        return shown(record["results"], specs[:2] if len(specs) >= 2 else specs * 2)

    def stop_eval():
        stop = _running.get("evaluation")
        if stop is not None:
            stop.set()
        return "Stopping after the current problem…" if stop else "No evaluation is running."

    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        task0 = default_task()
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=task0, label="Task", elem_id="cmp-task", scale=1)
            initial = problem_choices(task0, "heldout")
            problem = gr.Dropdown(initial, value=initial[0][1] if initial else None, label="Held-out problem",
                                  elem_id="cmp-problem", scale=3)
        problem_md = gr.Markdown(problem_text(task0, initial[0][1] if initial else None))
        with gr.Row():
            model_a = gr.Dropdown(model_choices(), value=EMBEDDED, allow_custom_value=True, label="Model A (base)",
                                  elem_id="cmp-model-a")
            model_b = gr.Dropdown(model_choices(), value=tuned_default(), allow_custom_value=True,
                                  label="Model B (tuned)", elem_id="cmp-model-b")
            max_steps = gr.Slider(1, 20, value=10, step=1, label="Step limit", elem_id="cmp-max-steps")
            max_new = gr.Slider(16, 512, value=160, step=8, label="Max new tokens per step", elem_id="cmp-max-new")
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

        with gr.Accordion("Evaluate A vs B on N held-out problems", open=False, elem_id="cmp-eval"):
            with gr.Row():
                n = gr.Slider(1, 200, value=20, step=1, label="Problems (N)", elem_id="cmp-eval-n")
                split = gr.Radio(["heldout", "train"], value="heldout", label="Split")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="cmp-eval-run")
                eval_stop = gr.Button("Stop", variant="stop", elem_id="cmp-eval-stop")
                past = gr.Dropdown(past_choices(task0), label="Earlier evaluations", elem_id="cmp-eval-past")
            eval_note = gr.Markdown(elem_id="cmp-eval-note")
            with gr.Row():
                acc_plot = gr.Plot(elem_id="cmp-plot-accuracy", show_label=False)
                valid_plot = gr.Plot(elem_id="cmp-plot-valid", show_label=False)
            with gr.Row():
                steps_plot = gr.Plot(elem_id="cmp-plot-steps", show_label=False)
                latency_plot = gr.Plot(elem_id="cmp-plot-latency", show_label=False)
            summary = gr.Dataframe(headers=SUMMARY_HEADERS, interactive=False, elem_id="cmp-eval-summary",
                                   label="Summary")
            differ = gr.Dataframe(headers=["problem", "expected", "A", "B", "right one"], interactive=False,
                                  elem_id="cmp-diff", label="Problems where the two differ")

        task.change(lambda t: problem_update(t, "heldout"), task, problem)
        problem.change(problem_text, [task, problem], problem_md)
        event = run_btn.click(run, [task, problem, model_a, model_b, max_steps, max_new],
                              [chat_a, chat_b, answer_a, answer_b], concurrency_limit=1, concurrency_id=MODEL_SLOT)
        stop_btn.click(None, None, None, cancels=[event])
        eval_outputs = [eval_note, acc_plot, valid_plot, steps_plot, latency_plot, summary, differ]
        eval_btn.click(evaluation, [task, model_a, model_b, n, split, max_steps, max_new], [*eval_outputs, past],
                       concurrency_limit=1, concurrency_id=MODEL_SLOT)
        eval_stop.click(stop_eval, None, eval_note)
        past.input(load_past, past, eval_outputs)

        def refresh_models(current_b):
            choices = model_choices()
            b = tuned_default() if current_b in (None, "", EMBEDDED) or current_b not in choices else current_b
            return gr.update(choices=choices), gr.update(choices=choices, value=b)

        tab.select(refresh_models, model_b, [model_a, model_b])
        ctx.loaders.append((refresh_models, [model_b], [model_a, model_b]))
