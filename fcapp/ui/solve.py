"""Solve (live) tab: one problem, one model, the chain streamed token by token and step by step; Stop ends it
cleanly, keeping what it had."""

from __future__ import annotations

import time

import gradio as gr

from fcapp.jobs import SLOT
from fcapp.solve import SolveConfig, solve_events
from fcapp.ui.common import (EMBEDDED, MODEL_HELP, STOPS, ChainView, Context, chatbot, default_task, get_model,
                             get_problem, model_choices, problem_choices, question_md, short, stop_words, task_choices,
                             verdict_text, wait_for_slot, who)


def problem_update(task: str | None, split: str):
    choices = problem_choices(task, split)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def problem_text(task: str | None, problem_id: str | None) -> str:
    if not task or not problem_id:
        return ""
    from fcapp.tasks import get_task

    try:
        problem = get_task(task).get(problem_id)
    except KeyError:  # the problem list is catching up with a task just switched
        return ""
    return f"**{problem.id}** ({problem.split}) · expected answer: `{problem.answer}`\n\n{question_md(problem.question)}"


def stream_chain(task_obj, problem, model, config: SolveConfig, view: ChainView, stop=None, every_s: float = 0.08):
    """Feed `view` from a live chain; yields whenever there is something new worth drawing. Ends early, the
    view marked stopped, once `stop` is set."""
    events = solve_events(task_obj, problem, model, config)
    last = 0.0
    try:
        for event in events:
            view.feed(event)
            if stop is not None and stop.is_set():
                view.stop()
                yield event
                return
            now = time.monotonic()
            if event.kind != "token" or now - last >= every_s:
                last = now
                yield event
    finally:
        events.close()  # a stopped or cancelled run stops generating at once


def summary(chain) -> str:
    n = len(chain.steps)
    return (f"{n} step{'' if n == 1 else 's'} · {chain.valid_calls} valid calls · {chain.completion_tokens} tokens · "
            f"{chain.elapsed_s:.1f} s · {stop_words(chain.stop_reason)}")


def build(ctx: Context) -> None:
    def run(task, split, problem_id, question, expected, spec, max_steps, temperature, top_p, max_new_tokens,
            seed, save, request: gr.Request):
        try:
            task_obj, problem = get_problem(task, problem_id, question, expected, split)
        except (ValueError, KeyError) as exc:
            yield {chat: [], verdict: f"✗ {exc.args[0] if exc.args else exc}"}
            return
        picked = {} if problem.id == "custom" else {
            problem_dd: gr.update(value=problem.id), problem_md: problem_text(task, problem.id)}
        spec = (spec or EMBEDDED).strip()
        view = ChainView(problem.question, problem.answer or None)
        stop = STOPS.begin(request, "solve")
        yield picked | {chat: view.messages(), verdict: f"Starting {spec}…", run_btn: gr.update(interactive=False)}
        held = yield from wait_for_slot(f"Solve: {short(problem.id, 30)} with {short(spec, 40)} for {who(request)}",
                                        stop, lambda words: {verdict: words})
        try:
            if not held:
                yield {verdict: "Stopped before it started.", run_btn: gr.update(interactive=True)}
                return
            yield {verdict: f"Loading {spec}…"}
            try:
                model = get_model(spec)
            except Exception as exc:  # noqa: BLE001 - any load failure is shown, the app goes on
                yield {verdict: f"✗ Cannot load model {spec!r}: {exc}", run_btn: gr.update(interactive=True)}
                return
            config = SolveConfig(max_steps=int(max_steps), temperature=float(temperature), top_p=float(top_p),
                                 max_new_tokens=int(max_new_tokens), seed=int(seed))
            yield {verdict: f"Solving with {spec}…"}
            try:
                for _ in stream_chain(task_obj, problem, model, config, view, stop):
                    yield {chat: view.messages(), verdict: f"Solving with {spec}… step {len(view.steps)}"}
            except Exception as exc:  # noqa: BLE001 - e.g. an unreachable server mid-chain
                note = view.stop(f"Stopped by an error ({exc})")
                yield {chat: view.messages(), verdict: f"✗ {note}", run_btn: gr.update(interactive=True)}
                return
        finally:
            if held:
                SLOT.release()
            STOPS.end(request, "solve", stop)
        chain = view.chain
        if view.stopped or chain is None:
            n = len(view.steps)
            yield {chat: view.messages(), verdict: f"**Stopped** after {n} step{'' if n == 1 else 's'}: no final answer.",
                   run_btn: gr.update(interactive=True)}
            return
        note = f"{verdict_text(chain.verdict, chain.answer, problem.answer)}\n\n{summary(chain)}"
        if save:
            if problem.id != "custom":
                ctx.store.add_problems([problem])
            chain_id = ctx.store.add_chain(chain, chain.verdict, role="live")
            note += f" · saved as chain {chain_id}"
        yield {chat: view.messages(), verdict: note, run_btn: gr.update(interactive=True)}

    def stop(request: gr.Request) -> dict:
        if not STOPS.stop(request, "solve"):
            return {verdict: "Nothing is running."}
        return gr.skip()  # the run itself draws its stopped state

    with gr.Tab("Solve (live)", id="solve", elem_id="tab-solve"):
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task", elem_id="solve-task", scale=1)
            split = gr.Radio(["heldout", "train"], value="heldout", label="Split", elem_id="solve-split", scale=1)
            initial = problem_choices(default_task(), "heldout")
            # a value the list no longer holds (the task was just switched) reaches the handler, which solves the
            # first problem of the new list instead of failing
            problem_dd = gr.Dropdown(initial, value=initial[0][1] if initial else None, label="Problem",
                                     allow_custom_value=True, elem_id="solve-problem", scale=3)
        problem_md = gr.Markdown(problem_text(default_task(), initial[0][1] if initial else None),
                                 elem_id="solve-problem-text")
        with gr.Accordion("…or type your own problem", open=False):
            question = gr.Textbox(label="Question (leave empty to use the picked problem)", lines=3,
                                  elem_id="solve-question")
            expected = gr.Textbox(label="Expected answer (optional, for a verdict)", elem_id="solve-expected")
        with gr.Row():
            model = gr.Dropdown(model_choices(), value=EMBEDDED, allow_custom_value=True, label="Model",
                                info=MODEL_HELP, elem_id="solve-model", scale=3)
            run_btn = gr.Button("Solve", variant="primary", elem_id="solve-run", scale=1)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="solve-stop", scale=1)
        with gr.Accordion("Sampling settings", open=False, elem_id="solve-settings"):
            with gr.Row():
                max_steps = gr.Slider(1, 20, value=10, step=1, label="Step limit", elem_id="solve-max-steps")
                max_new = gr.Slider(16, 512, value=160, step=8, label="Max new tokens per step",
                                    elem_id="solve-max-new")
                temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed")
                save = gr.Checkbox(False, label="Save the chain to the store (for curation)")
        verdict = gr.Markdown(elem_id="solve-verdict")
        chat = chatbot("solve-chat", 560)

    ctx.model_pickers.append(model)
    task.change(problem_update, [task, split], problem_dd)
    split.change(problem_update, [task, split], problem_dd)
    problem_dd.change(problem_text, [task, problem_dd], problem_md)
    run_btn.click(run, [task, split, problem_dd, question, expected, model, max_steps, temperature, top_p, max_new,
                        seed, save], {chat, verdict, run_btn, problem_dd, problem_md}, show_progress="hidden")
    stop_btn.click(stop, None, {verdict}, show_progress="hidden")
