"""Curate tab: browse verified chains, accept / reject / edit them, A/B choices, build the dataset,
and start a generation job."""

from __future__ import annotations

import threading
import time

import gradio as gr

from fcapp.generate import GenerateConfig, generate
from fcapp.trainsets import PairPolicy, TrainingDataError, import_pairs, make_pairs
from fcapp.paths import data_dir
from fcapp.solve import edit_final_answer
from fcapp.ui.common import (EMBEDDED, MODEL_HELP, MODEL_SLOT, Context, busy, chain_messages, chatbot,
                             default_task, get_model, model_choices, safe_upload, short, task_choices)

HEADERS = ["id", "problem", "model", "verifier", "label", "counts as", "steps", "answer"]
VERDICTS = {"any": None, "correct": True, "incorrect": False}
LABEL_FILTERS = ["any", "unlabelled", "accept", "reject", "edited"]
# The running generation job's stop switch. The model slot runs one job at a time, so any tab (also one
# opened after the starting tab was closed) can stop it.
_running: dict[str, threading.Event] = {}


def _mark(verdict) -> str:
    return {True: "✓", False: "✗", None: "–"}[verdict]


def _who(request: gr.Request | None) -> str:
    return (request.username if request is not None and request.username else None) or "browser"


def build(ctx: Context) -> None:
    store = ctx.store

    def counts_md(task: str | None) -> str:
        c = store.counts(task)
        return (f"**Pair problems: {c['pair_problems']}** (problems with a correct and an incorrect chain) · "
                f"chains {c['chains']}: ✓ {c['correct']} · ✗ {c['incorrect']} · unverified {c['unverified']} · "
                f"labelled {c['labelled']}")

    def teachers(task: str | None) -> list[str]:
        return ["any"] + sorted({c["model_id"] for c in store.list_chains(task=task, limit=100000)})

    def table(task, verdict, label, teacher, problem):
        rows = store.list_chains(task=task or None, verdict=VERDICTS.get(verdict),
                                 label=None if label == "any" else label,
                                 model_id=None if teacher in (None, "any") else teacher,
                                 problem_id=(problem or "").strip() or None, limit=200)
        return [[r["id"], r["problem_id"], r["model_id"], _mark(r["verdict"]), r["label"] or "",
                 _mark(r["effective_verdict"]), r["steps"], short(r["answer"] or "", 30)] for r in rows]

    def refresh(task, verdict, label, teacher, problem):
        return (table(task, verdict, label, teacher, problem), counts_md(task),
                gr.update(choices=teachers(task)))

    def expected_of(record) -> str | None:
        problem = store.get_problem(record["problem_id"], record["task"])
        if problem is None:
            try:
                from fcapp.tasks import get_task

                problem = get_task(record["task"]).get(record["problem_id"])
            except KeyError:
                return None
        return problem.answer

    def show(chain_id):
        chain = store.get_chain(int(chain_id)) if chain_id else None
        if chain is None:
            return [], f"No chain {chain_id}." if chain_id else "Pick a chain in the table.", ""
        label = f"{chain['label']} by {chain['labelled_by']}" if chain["label"] else "none yet"
        info = (f"**Chain {chain['id']}** · problem `{chain['problem_id']}` · model {chain['model_id']} "
                f"({chain['role']}) · verifier {_mark(chain['verdict'])} · label: {label} · "
                f"counts as {_mark(chain['effective_verdict'])}")
        # the verifier's verdict on what is shown (an edit was re-verified); the person's label is in `info`
        verifier = chain["effective_verdict"] if chain["label"] == "edited" else chain["verdict"]
        messages = chain_messages(chain["effective_record"], expected_of(chain), verifier)
        return messages, info, chain["answer"] or ""

    def select(evt: gr.SelectData):
        row = evt.row_value if evt.row_value else None
        chain_id = int(row[0]) if row else None
        return (chain_id, *show(chain_id))

    def label(chain_id, value, task, verdict, lab, teacher, problem, request: gr.Request):
        if not chain_id:
            return ("Pick a chain first.", *[gr.update()] * 5)
        store.label_chain(int(chain_id), value, _who(request))
        note = f"Chain {int(chain_id)}: {'accepted ✓' if value == 'accept' else 'rejected ✗'}."
        return (note, *show(chain_id)[:2], *refresh(task, verdict, lab, teacher, problem)[:2],
                gr.update())

    def edit(chain_id, answer, task, verdict, lab, teacher, problem, request: gr.Request):
        chain = store.get_chain(int(chain_id)) if chain_id else None
        if chain is None:
            return ("Pick a chain first.", *[gr.update()] * 5)
        try:
            edited = edit_final_answer(chain["record"], answer or "")
            new_verdict = edited.verdict
        except ValueError as exc:
            return (f"✗ {exc}", *[gr.update()] * 5)
        store.label_chain(chain["id"], "edited", _who(request), edited_record=edited, edited_verdict=new_verdict)
        note = f"Chain {chain['id']} edited: answer {edited.answer!r} re-verified {_mark(new_verdict)}."
        return (note, *show(chain_id)[:2], *refresh(task, verdict, lab, teacher, problem)[:2], gr.update())

    # ---- A/B ------------------------------------------------------------------------------------------
    def next_pair(task, skipped):
        skipped = list(skipped or [])
        groups: dict[str, list[int]] = {}
        for row in store.list_chains(task=task or None, label="unlabelled", limit=5000):
            groups.setdefault(row["problem_id"], []).append(row["id"])
        for problem_id, ids in groups.items():
            if len(ids) >= 2 and problem_id not in skipped:
                a, b = store.get_chain(ids[-1]), store.get_chain(ids[-2])
                expected = expected_of(a)
                text = (f"**Problem `{problem_id}`**: which chain is better? Keys: **a** / **b** choose, "
                        f"**s** skips.\n\n{short(a['question'], 400)}")
                return ([problem_id, a["id"], b["id"]], skipped, text,
                        chain_messages(a["record"], expected), chain_messages(b["record"], expected))
        note = "No problem with two unlabelled chains left (generate more; a page reload forgets the skips)."
        return None, skipped, note, [], []

    def choose(pick, current, task, skipped, verdict, lab, teacher, problem, request: gr.Request):
        if not current:
            return (*next_pair(task, skipped), counts_md(task), gr.update())
        problem_id, a, b = current
        if pick == "skip":
            skipped = list(skipped or []) + [problem_id]
        else:
            better, worse = (a, b) if pick == "a" else (b, a)
            store.label_chain(better, "accept", _who(request))
            store.label_chain(worse, "reject", _who(request))
        return (*next_pair(task, skipped), counts_md(task), table(task, verdict, lab, teacher, problem))

    # ---- dataset and generation --------------------------------------------------------------------------
    def export(task, max_per, dedup, use_ref, fmt):
        if not task:
            return None, "Pick a task."
        out = data_dir("exports") / f"pairs-{task}-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
        try:
            card = make_pairs(store, task, out, PairPolicy(int(max_per), bool(dedup), bool(use_ref)))
        except TrainingDataError as exc:  # no pairs yet: nothing is written or offered
            return None, f"Nothing to export: {exc}."
        note = (f"Built **{card['pairs']} pairs** from {card['chains']} chains (policy {card['policy']['name']}); "
                f"files: {', '.join(f.rsplit('/', 1)[-1] for f in card['files'])}")
        return card["files"], note

    def upload(file, task):
        if file is None:
            return "Choose a JSONL or Parquet preference file.", gr.update()
        path = safe_upload(file, getattr(file, "orig_name", None) or str(file))
        try:
            imported = import_pairs(path, store)
        except ValueError as exc:
            return f"✗ {exc}", gr.update()
        return (f"Imported {imported['pairs']} pairs from {path.name} as pair set **{imported['policy']}** "
                "(the Train tab can train on it)."), counts_md(task)

    def run_generation(task, teacher, samples, limit, split, temperature, reference, max_steps, max_new,
                       progress=gr.Progress()):
        if not task:
            return "Pick a task."
        stop = _running["generation"] = threading.Event()
        config = GenerateConfig(task, (teacher or EMBEDDED).strip(), int(samples), int(limit) or None, split,
                                float(temperature), 0.95, int(max_steps), int(max_new), 1, 0, bool(reference))
        progress(0, desc=f"loading {config.teacher}")
        with busy(f"Generation: {task} with {short(config.teacher, 40)}"):
            model = get_model(config.teacher)

            def on_chain(stats, chain) -> None:
                progress((stats.done + stats.failed, max(stats.planned, 1)),
                         desc=f"{stats.done} chains, {stats.correct_rate:.0%} correct, "
                              f"{stats.chains_per_min:.1f}/min")

            try:
                stats = generate(config, store, model, on_chain=on_chain, stop=stop)
            finally:
                _running.pop("generation", None)
        state = "stopped" if stop.is_set() else "done"
        return (f"Generation {state}: {stats.done} new chains ({stats.correct} correct), {stats.skipped} already "
                f"stored, {stats.failed} failed, {stats.references} reference chains.")

    def stop_generation():
        stop = _running.get("generation")
        if stop is None:
            return "No generation is running."
        stop.set()
        return "Stopping after the chains in flight…"

    # ---- layout -----------------------------------------------------------------------------------------
    with gr.Tab("Curate", id="curate", elem_id="tab-curate"):
        task0 = default_task()
        counts = gr.Markdown(counts_md(task0), elem_id="curate-pairs")
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=task0, label="Task", elem_id="cur-task")
            verdict = gr.Dropdown(list(VERDICTS), value="any", label="Counts as", elem_id="cur-verdict")
            lab = gr.Dropdown(LABEL_FILTERS, value="any", label="Label", elem_id="cur-label")
            teacher = gr.Dropdown(teachers(task0), value="any", label="Teacher", elem_id="cur-teacher")
            problem = gr.Textbox(label="Problem id", placeholder="all", elem_id="cur-problem")
            refresh_btn = gr.Button("Refresh", elem_id="cur-refresh", scale=0)
        filters = [task, verdict, lab, teacher, problem]
        chains = gr.Dataframe(headers=HEADERS, value=table(task0, "any", "any", "any", ""), interactive=False,
                              elem_id="cur-table", max_height=300, label="Chains (click a row to read it)")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                info = gr.Markdown("Pick a chain in the table.", elem_id="cur-chain-info")
                chat = chatbot("cur-chat", 420, autoscroll=False)
            with gr.Column(scale=1):
                chain_id = gr.Number(label="Chain id", precision=0, elem_id="cur-chain-id")
                open_btn = gr.Button("Open", elem_id="cur-open")
                with gr.Row():
                    accept_btn = gr.Button("Accept [y]", variant="primary", elem_id="cur-accept")
                    reject_btn = gr.Button("Reject [n]", variant="stop", elem_id="cur-reject")
                answer = gr.Textbox(label="Edit the final answer", elem_id="cur-edit-answer")
                edit_btn = gr.Button("Save edit and re-verify", elem_id="cur-edit-save")
                note = gr.Markdown(elem_id="cur-note")

        with gr.Accordion("A/B: pick the better of two chains of the same problem", open=True, elem_id="ab"):
            current, skipped = gr.State(None), gr.State([])
            with gr.Row():
                ab_info = gr.Markdown("Press **Next pair** to start.", elem_id="ab-info")
                next_btn = gr.Button("Next pair", elem_id="ab-next", scale=0)
            with gr.Row():
                chat_a = chatbot("ab-chat-a", 440, "A", autoscroll=False)
                chat_b = chatbot("ab-chat-b", 440, "B", autoscroll=False)
            with gr.Row():
                a_btn = gr.Button("A is better [a]", elem_id="ab-a")
                skip_btn = gr.Button("Skip [s]", elem_id="ab-skip")
                b_btn = gr.Button("B is better [b]", elem_id="ab-b")

        with gr.Accordion("Preference dataset", open=False, elem_id="cur-dataset"):
            with gr.Row():
                max_per = gr.Slider(1, 16, value=4, step=1, label="Max pairs per problem")
                dedup = gr.Checkbox(True, label="Drop identical chains")
                use_ref = gr.Checkbox(True, label="Reference chains may be 'chosen'")
                fmt = gr.Radio(["jsonl", "parquet"], value="jsonl", label="Format")
            export_btn = gr.Button("Build and export", variant="primary", elem_id="cur-export")
            export_note = gr.Markdown(elem_id="cur-export-note")
            files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="cur-export-file")
            uploaded = gr.File(label="Import a preference file (JSONL / Parquet)", file_types=[".jsonl", ".parquet"],
                               elem_id="cur-import")

        with gr.Accordion("Generate chains with a teacher", open=False, elem_id="gen"):
            with gr.Row():
                teacher_model = gr.Dropdown(model_choices(), value=EMBEDDED, allow_custom_value=True,
                                            label="Teacher", info=MODEL_HELP, elem_id="gen-teacher")
                samples = gr.Slider(1, 16, value=4, step=1, label="Samples per problem")
                limit = gr.Number(5, precision=0, label="First N problems (0 = all)")
                gen_split = gr.Radio(["train"], value="train", label="Split",
                                     info="held-out problems are kept for evaluation and never trained on")
            with gr.Row():
                temperature = gr.Slider(0, 1.5, value=0.8, step=0.05, label="Temperature")
                max_steps = gr.Slider(1, 20, value=10, step=1, label="Step limit")
                max_new = gr.Slider(16, 512, value=160, step=8, label="Max new tokens per step")
                reference = gr.Checkbox(True, label="Also store reference chains")
            with gr.Row():
                gen_btn = gr.Button("Start generation", variant="primary", elem_id="gen-start")
                gen_stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
            gen_status = gr.Markdown(elem_id="gen-status")

        refresh_outputs = [chains, counts, teacher]
        for trigger in (refresh_btn.click, task.change, verdict.change, lab.change, teacher.input, problem.submit):
            trigger(refresh, filters, refresh_outputs)
        chains.select(select, None, [chain_id, chat, info, answer])
        open_btn.click(show, chain_id, [chat, info, answer])
        chain_id.submit(show, chain_id, [chat, info, answer])
        label_outputs = [note, chat, info, chains, counts, answer]
        def labeller(value: str):
            def handler(chain_id, task, verdict, lab, teacher, problem, request: gr.Request):
                return label(chain_id, value, task, verdict, lab, teacher, problem, request)
            return handler

        accept_btn.click(labeller("accept"), [chain_id, *filters], label_outputs)
        reject_btn.click(labeller("reject"), [chain_id, *filters], label_outputs)
        edit_btn.click(edit, [chain_id, answer, *filters], label_outputs)

        ab_outputs = [current, skipped, ab_info, chat_a, chat_b, counts, chains]
        next_btn.click(lambda t, s: (*next_pair(t, s), counts_md(t), gr.update()), [task, skipped], ab_outputs)
        def chooser(pick: str):
            def handler(current, task, skipped, verdict, lab, teacher, problem, request: gr.Request):
                return choose(pick, current, task, skipped, verdict, lab, teacher, problem, request)
            return handler

        for button, pick in ((a_btn, "a"), (b_btn, "b"), (skip_btn, "skip")):
            button.click(chooser(pick), [current, task, skipped, verdict, lab, teacher, problem], ab_outputs)

        export_btn.click(export, [task, max_per, dedup, use_ref, fmt], [files, export_note])
        uploaded.upload(upload, [uploaded, task], [export_note, counts])
        gen_btn.click(run_generation, [task, teacher_model, samples, limit, gen_split, temperature, reference,
                                       max_steps, max_new], gen_status,
                      concurrency_limit=1, concurrency_id=MODEL_SLOT)
        gen_stop.click(stop_generation, None, gen_status)
        ctx.loaders.append((refresh, filters, refresh_outputs))
        ctx.loaders.append((lambda: gr.update(choices=model_choices()), [], [teacher_model]))
