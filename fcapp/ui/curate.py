"""Curate tab: browse the stored chains, label them one by one in a queue (y / n, auto-advance, undo with u),
label a filter's chains in bulk after seeing the count, edit a final answer (checked by the task and
re-verified), pick the better of two chains blind (A/B), see where two people disagree, and build the
preference dataset. Every action is a call into fcapp.curation; the table and counts follow the store live."""

from __future__ import annotations

import time

import gradio as gr

from fcapp import curation
from fcapp.curation import ChainFilter
from fcapp.paths import data_dir
from fcapp.trainsets import PairPolicy, TrainingDataError, make_pairs
from fcapp.ui.common import Context, chain_messages, chatbot, default_task, short, stop_words, task_choices, who

HEADERS = ["id", "problem", "model", "verifier", "label", "counts as", "steps", "answer", "ended"]
VERDICTS = {"any": None, "correct": True, "incorrect": False}
LABEL_FILTERS = ["any", "unlabelled", "accept", "reject", "edited"]
BULK_CHOICES = [("Accept every unlabelled chain the verifier found correct", "accept-verified"),
                ("Reject every unlabelled chain the verifier found incorrect", "reject-failed")]


def _mark(verdict) -> str:
    return {True: "✓", False: "✗", None: "–"}[verdict]


def chain_filter(task, verdict, label, teacher, problem) -> ChainFilter:
    return ChainFilter(task=task or None, verdict=VERDICTS.get(verdict), label=None if label in (None, "any") else label,
                       model_id=None if teacher in (None, "any") else teacher, problem_id=(problem or "").strip() or None)


def queue_html(state: dict | None) -> str:
    if not state:
        return "<div id='cur-queue-inner' data-labelled='0' data-total='0'>Label the chains of the filter above one " \
               "by one: <b>Label in a queue</b> opens the first; accept [y] or reject [n] opens the next.</div>"
    fraction = state["labelled"] / state["total"] if state["total"] else 1.0
    left = state["total"] - state["labelled"]
    words = (f"Queue: you labelled {state['labelled']} of {state['total']} chains; {left} to go."
             if state["next"] is not None else f"Queue done: you labelled all {state['total']} chains.")
    return (f"<div id='cur-queue-inner' data-labelled='{state['labelled']}' data-total='{state['total']}'>"
            f"<div class='fc-bar'><div style='width:{100 * fraction:.0f}%'></div></div>{words}</div>")


def build(ctx: Context) -> None:
    store = ctx.store

    # ---- reading --------------------------------------------------------------------------------------
    def counts_md(task: str | None) -> str:
        c = store.counts(task)
        return (f"**Problems that can give a pair: {c['pair_problems']}** (a correct and an incorrect chain) · "
                f"{c['chains']} chains: ✓ {c['correct']} correct · ✗ {c['incorrect']} incorrect · "
                f"{c['unverified']} unverified · {c['labelled']} labelled by a person")

    def teachers(task: str | None) -> list[str]:
        return ["any", *store.model_ids(task)]

    def table(flt: ChainFilter) -> list[list]:
        return [[r["id"], r["problem_id"], r["model_id"], _mark(r["verdict"]),
                 f"{r['label']} ({r['labelled_by']})" if r["label"] else "", _mark(r["effective_verdict"]), r["steps"],
                 short(r["effective_answer"] or "", 30), stop_words(r["stop_reason"])]
                for r in flt.chains(store, limit=200)]

    def agreement_md(task: str | None) -> str:
        rows = curation.agreement(store, task)
        if not rows:
            return ("Agreement: no chain has labels from two people yet. Each person's labels are kept apart "
                    "(the --auth user names them), so two people can label the same chains and compare.")
        lines = []
        for row in rows:
            kappa = "" if row["kappa"] is None else f", Cohen's κ {row['kappa']:.2f}"
            differ = (f"; they disagree on chains {', '.join(map(str, row['disagree_on'][:10]))}"
                      if row["disagree_on"] else "")
            lines.append(f"**{row['annotators'][0]}** and **{row['annotators'][1]}** labelled {row['chains']} chains "
                         f"in common and agree on {row['agree']} ({row['agree'] / row['chains']:.0%}{kappa}){differ}.")
        return "Agreement: " + " ".join(lines)

    def refresh(task, verdict, label, teacher, problem) -> dict:
        chains_of_task = store.counts(task)["chains"]
        return {chains: table(chain_filter(task, verdict, label, teacher, problem)), counts: counts_md(task),
                teacher_dd: gr.update(choices=teachers(task)), empty: gr.update(visible=not chains_of_task),
                agreement_box: agreement_md(task)}

    def show(chain_id) -> dict:
        chain = store.get_chain(int(chain_id)) if chain_id else None
        if chain is None:
            return {chat: [], info: f"No chain {chain_id}." if chain_id else "Pick a chain in the table, or label "
                                                                             "in a queue.", answer: ""}
        labels = curation.chain_labels(store, chain["id"])
        said = ", ".join(f"{person} {value}" for person, value in labels.items()) or "none yet"
        if len(set(labels.values())) > 1:
            said += " (they disagree)"
        text = (f"**Chain {chain['id']}** · problem `{chain['problem_id']}` · model {chain['model_id']} "
                f"({chain['role']}) · verifier {_mark(chain['verdict'])} · labels: {said} · "
                f"counts as {_mark(chain['effective_verdict'])} · {stop_words(chain['stop_reason'])}")
        # the verifier's verdict on what is shown (an edit was re-verified); the people's labels are in the info
        verifier = chain["effective_verdict"] if chain["label"] == "edited" else chain["verdict"]
        messages = chain_messages(chain["effective_record"], curation.expected_answer(store, chain), verifier)
        return {chain_id_box: chain["id"], chat: messages, info: text, answer: chain["effective_answer"] or ""}

    def select(evt: gr.SelectData) -> dict:
        row = evt.row_value if evt.row_value else None
        return show(int(row[0]) if row else None)

    # ---- labelling, the queue, undo ------------------------------------------------------------------------
    def advance(queue_ids: list[int], after: int | None, request: gr.Request | None) -> dict:
        """The queue's progress, and its next chain opened (auto-advance); the chain `after` stays open when the
        queue is done."""
        if not queue_ids:
            return {}
        state = curation.queue_state(store, queue_ids, who(request), after)
        updates = {queue_box: queue_html(state)}
        if state["next"] is not None or after is not None:
            updates |= show(state["next"] if state["next"] is not None else after)
        return updates

    def start_queue(task, verdict, label, teacher, problem, request: gr.Request) -> dict:
        ids = curation.queue(store, chain_filter(task, verdict, label, teacher, problem))
        if not ids:
            return {queue_ids_state: [], queue_box: queue_html(None),
                    note: "No chain matches the filter: change the filter, or generate chains."}
        return {queue_ids_state: ids, note: f"Queue of {len(ids)} chains: y accepts, n rejects, u undoes."} | \
            advance(ids, None, request)

    def labelled(done: curation.Labelled, undo_stack: list, queue_ids: list[int], filters: list,
                 request: gr.Request | None, opened: int | None = None) -> dict:
        """After a label: the message (a warning when it overrides the verifier), undo, the table, and the
        queue's progress; the queue moves on to its next chain unless `opened` names the chain to keep open."""
        if done.overrides_verifier:
            gr.Warning(done.message)
        updates = {note: done.message, undo_state: undo_stack + [done.label_ids], **refresh(*filters)}
        if opened is not None or not queue_ids:
            updates |= show(opened if opened is not None else done.chain_ids[0])
            if queue_ids:
                updates[queue_box] = queue_html(curation.queue_state(store, queue_ids, who(request), opened))
            return updates
        return updates | advance(queue_ids, done.chain_ids[0], request)

    def label(value: str):
        def handler(chain_id, undo_stack, queue_ids, task, verdict, lab, teacher, problem, request: gr.Request) -> dict:
            if not chain_id:
                return {note: "Pick a chain first (click a row), or press Label in a queue."}
            try:
                done = curation.label(store, int(chain_id), value, who(request))
            except (KeyError, ValueError) as exc:
                return {note: f"✗ {exc.args[0] if exc.args else exc}"}
            return labelled(done, undo_stack, queue_ids, [task, verdict, lab, teacher, problem], request)
        return handler

    def edit(chain_id, text, undo_stack, queue_ids, task, verdict, lab, teacher, problem, request: gr.Request) -> dict:
        if not chain_id:
            return {note: "Pick a chain first."}
        try:
            done = curation.edit_answer(store, int(chain_id), text or "", who(request))
        except (KeyError, ValueError) as exc:  # a wrong form ("banana" for GSM8K) is said, nothing is stored
            return {note: f"✗ Not saved: {exc.args[0] if exc.args else exc}"}
        return labelled(done, undo_stack, queue_ids, [task, verdict, lab, teacher, problem], request, int(chain_id))

    def skip(chain_id, queue_ids, request: gr.Request) -> dict:
        if not queue_ids:
            return {note: "Skip moves through a queue: press Label in a queue first."}
        return advance(queue_ids, int(chain_id) if chain_id else None, request)

    def undo(undo_stack, queue_ids, task, verdict, lab, teacher, problem, request: gr.Request) -> dict:
        if not undo_stack:
            return {note: "Nothing to undo on this page."}
        chain_ids = curation.undo(store, undo_stack[-1], who(request))
        words = (f"Took back your label of chain {chain_ids[0]}." if len(chain_ids) == 1
                 else f"Took back your labels of {len(chain_ids)} chains.")
        updates = {note: words if chain_ids else "That label is already gone.", undo_state: undo_stack[:-1],
                   **refresh(task, verdict, lab, teacher, problem)}
        if chain_ids:
            updates |= show(chain_ids[0])
            if queue_ids:
                updates[queue_box] = queue_html(curation.queue_state(store, queue_ids, who(request)))
        return updates

    # ---- bulk ----------------------------------------------------------------------------------------------
    def bulk_count(action, task, verdict, lab, teacher, problem, request: gr.Request) -> dict:
        ids = curation.bulk_targets(store, chain_filter(task, verdict, lab, teacher, problem), action)
        if not ids:
            return {note: "No chain to label: none of the filter's unlabelled chains has that verdict.",
                    confirm_row: gr.update(visible=False), bulk_state: None}
        value = curation.BULK[action][0]
        text = (f"This gives **{value}** to **{len(ids)} chains** (the filter's unlabelled chains the verifier found "
                f"{'correct' if value == 'accept' else 'incorrect'}), as {who(request)}. One undo takes them all back.")
        return {confirm_text: text, confirm_row: gr.update(visible=True), bulk_state: [action, len(ids)]}

    def bulk_confirm(pending, undo_stack, task, verdict, lab, teacher, problem, request: gr.Request) -> dict:
        hide = {confirm_row: gr.update(visible=False), bulk_state: None}
        if not pending:
            return hide
        action, count = pending
        try:
            done = curation.bulk_label(store, chain_filter(task, verdict, lab, teacher, problem), action,
                                       who(request), expected=count)
        except (KeyError, ValueError) as exc:
            return hide | {note: f"✗ Nothing labelled: {exc.args[0] if exc.args else exc}"}
        return hide | {note: done.message, undo_state: undo_stack + [done.label_ids],
                       **refresh(task, verdict, lab, teacher, problem)}

    # ---- A/B -----------------------------------------------------------------------------------------------
    def next_pair(task, skipped, verdicts_shown) -> dict:
        skipped = list(skipped or [])
        groups: dict[str, list[int]] = {}
        for row in store.list_chains(task=task or None, label="unlabelled", limit=5000):
            groups.setdefault(row["problem_id"], []).append(row["id"])
        for problem_id, ids in groups.items():
            if len(ids) >= 2 and problem_id not in skipped:
                a, b = store.get_chain(ids[-1]), store.get_chain(ids[-2])
                expected = curation.expected_answer(store, a)
                text = (f"**Problem `{problem_id}`**: which chain is better? Keys: **a** / **b** choose, **s** skips. "
                        + ("" if verdicts_shown else "The verifier's verdicts are hidden so they do not sway you."))
                return {current: [problem_id, a["id"], b["id"]], skipped_state: skipped, ab_info: text,
                        chat_a: chain_messages(a["record"], expected, blind=not verdicts_shown),
                        chat_b: chain_messages(b["record"], expected, blind=not verdicts_shown)}
        return {current: None, skipped_state: skipped, chat_a: [], chat_b: [],
                ab_info: "No problem with two unlabelled chains left: generate more (a page reload forgets the skips)."}

    def choose(pick: str):
        def handler(pair, skipped, verdicts_shown, undo_stack, task, verdict, lab, teacher, problem,
                    request: gr.Request) -> dict:
            if not pair:
                return next_pair(task, skipped, verdicts_shown)
            problem_id, a, b = pair
            if pick == "skip":
                return next_pair(task, list(skipped or []) + [problem_id], verdicts_shown)
            better, worse = (a, b) if pick == "a" else (b, a)
            ids = [curation.label(store, better, "accept", who(request)).label_ids[0],
                   curation.label(store, worse, "reject", who(request)).label_ids[0]]
            return {undo_state: undo_stack + [ids], note: f"Chain {better} accepted, chain {worse} rejected.",
                    **refresh(task, verdict, lab, teacher, problem), **next_pair(task, skipped, verdicts_shown)}
        return handler

    # ---- dataset -------------------------------------------------------------------------------------------
    def export(task, max_per, dedup, use_ref, fmt) -> dict:
        if not task:
            return {export_note: "Pick a task."}
        out = data_dir("exports") / f"pairs-{task}-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
        try:
            card = make_pairs(store, task, out, PairPolicy(int(max_per), bool(dedup), bool(use_ref)))
        except TrainingDataError:  # no pairs yet: nothing is written or offered
            return {files: None, export_note: f"Nothing to export yet: no training problem of {task} has both a "
                                              "correct and an incorrect chain. Label chains above (accept a good one, "
                                              "reject a bad one), or generate more samples per problem."}
        return {files: card["files"],
                export_note: f"Built **{card['pairs']} pairs** from {card['chains']} chains (pair set "
                             f"{card['policy']['name']}, which the Train tab can train on); files: "
                             f"{', '.join(f.rsplit('/', 1)[-1] for f in card['files'])}"}

    # ---- layout --------------------------------------------------------------------------------------------
    with gr.Tab("Curate", id="curate", elem_id="tab-curate"):
        task0 = default_task()
        counts = gr.Markdown(counts_md(task0), elem_id="curate-pairs")
        with gr.Row(visible=not store.counts(task0)["chains"], elem_id="cur-empty", elem_classes="fc-empty") as empty:
            gr.Markdown("**No chains for this task yet.** Chains come from a teacher model solving training "
                        "problems; the verifier checks each one, and here you confirm or correct it.")
            empty_go = gr.Button("Generate chains →", variant="primary", elem_id="cur-empty-go", scale=0,
                                 min_width=200)
        with gr.Row():
            task = gr.Dropdown(list(task_choices()), value=task0, label="Task", elem_id="cur-task")
            verdict = gr.Dropdown(list(VERDICTS), value="any", label="Counts as", elem_id="cur-verdict")
            lab = gr.Dropdown(LABEL_FILTERS, value="any", label="Label", elem_id="cur-label")
            teacher_dd = gr.Dropdown(teachers(task0), value="any", label="Teacher", elem_id="cur-teacher")
            problem = gr.Textbox(label="Problem id", placeholder="all", elem_id="cur-problem")
            refresh_btn = gr.Button("Refresh", elem_id="cur-refresh", scale=0)
        filters = [task, verdict, lab, teacher_dd, problem]
        chains = gr.Dataframe(headers=HEADERS, value=table(ChainFilter(task=task0)), interactive=False,
                              elem_id="cur-table", max_height=300,
                              label="Chains (click a row to read it; the table follows new chains and labels)")
        queue_ids_state, undo_state, bulk_state = gr.State([]), gr.State([]), gr.State(None)
        with gr.Row(equal_height=True):
            queue_btn = gr.Button("Label in a queue", variant="primary", elem_id="cur-queue-start", scale=0,
                                  min_width=180)
            queue_box = gr.HTML(queue_html(None), elem_id="cur-queue")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                info = gr.Markdown("Pick a chain in the table, or label in a queue.", elem_id="cur-chain-info")
                chat = chatbot("cur-chat", 420, autoscroll=False)
            with gr.Column(scale=1):
                chain_id_box = gr.Number(None, label="Chain id", precision=0, elem_id="cur-chain-id")
                open_btn = gr.Button("Open", elem_id="cur-open")
                with gr.Row():
                    accept_btn = gr.Button("Accept [y]", variant="primary", elem_id="cur-accept")
                    reject_btn = gr.Button("Reject [n]", variant="stop", elem_id="cur-reject")
                with gr.Row():
                    skip_btn = gr.Button("Skip", elem_id="cur-skip")
                    undo_btn = gr.Button("Undo [u]", elem_id="cur-undo")
                answer = gr.Textbox(label="Edit the final answer", elem_id="cur-edit-answer",
                                    info="checked by the task (a number for GSM8K; True, False or Unknown for logic), "
                                         "then re-verified")
                edit_btn = gr.Button("Save edit and re-verify", elem_id="cur-edit-save")
                note = gr.Markdown(elem_id="cur-note")

        with gr.Accordion("Bulk labels for the filter above", open=True, elem_id="cur-bulk"):
            with gr.Row(equal_height=True):
                bulk_action = gr.Dropdown(BULK_CHOICES, value="accept-verified", show_label=False,
                                          elem_id="cur-bulk-action", scale=3)
                bulk_btn = gr.Button("Count them first", elem_id="cur-bulk-count", scale=1)
            with gr.Row(visible=False, equal_height=True) as confirm_row:
                confirm_text = gr.Markdown(elem_id="cur-bulk-text")
                confirm_btn = gr.Button("Label them", variant="primary", elem_id="cur-bulk-confirm", scale=0)
                cancel_btn = gr.Button("Cancel", elem_id="cur-bulk-cancel", scale=0)
        agreement_box = gr.Markdown(agreement_md(task0), elem_id="cur-agreement")

        with gr.Accordion("A/B: pick the better of two chains of the same problem", open=True, elem_id="ab"):
            current, skipped_state = gr.State(None), gr.State([])
            with gr.Row():
                ab_info = gr.Markdown("Press **Next pair** to start.", elem_id="ab-info")
                verdicts_shown = gr.Checkbox(False, label="Show the verifier's verdicts", elem_id="ab-verdicts",
                                             scale=0, min_width=240)
                next_btn = gr.Button("Next pair", elem_id="ab-next", scale=0)
            with gr.Row():
                chat_a = chatbot("ab-chat-a", 440, "A", autoscroll=False)
                chat_b = chatbot("ab-chat-b", 440, "B", autoscroll=False)
            with gr.Row():
                a_btn = gr.Button("A is better [a]", elem_id="ab-a")
                ab_skip = gr.Button("Skip [s]", elem_id="ab-skip")
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

    listed = {chains, counts, teacher_dd, empty, agreement_box}
    for trigger in (refresh_btn.click, task.change, verdict.change, lab.change, teacher_dd.input, problem.submit):
        trigger(refresh, filters, listed)
    ctx.store_version.change(refresh, filters, listed, show_progress="hidden")
    opened = {chain_id_box, chat, info, answer}
    chains.select(select, None, opened)
    open_btn.click(show, chain_id_box, opened)
    chain_id_box.submit(show, chain_id_box, opened)
    ctx.task_pickers["curate"] = task
    ctx.wiring.append(lambda: empty_go.click(lambda t: ctx.go("generate", t), task, ctx.navigation()))

    labelling = listed | opened | {note, undo_state, queue_box}
    queue_btn.click(start_queue, filters, labelling | {queue_ids_state})
    accept_btn.click(label("accept"), [chain_id_box, undo_state, queue_ids_state, *filters], labelling)
    reject_btn.click(label("reject"), [chain_id_box, undo_state, queue_ids_state, *filters], labelling)
    skip_btn.click(skip, [chain_id_box, queue_ids_state], labelling)
    undo_btn.click(undo, [undo_state, queue_ids_state, *filters], labelling)
    edit_btn.click(edit, [chain_id_box, answer, undo_state, queue_ids_state, *filters], labelling)

    bulk_btn.click(bulk_count, [bulk_action, *filters], {note, confirm_text, confirm_row, bulk_state})
    confirm_btn.click(bulk_confirm, [bulk_state, undo_state, *filters], labelling | {confirm_row, bulk_state})
    cancel_btn.click(lambda: {confirm_row: gr.update(visible=False), bulk_state: None}, None, {confirm_row, bulk_state})

    ab_shown = {current, skipped_state, ab_info, chat_a, chat_b}
    next_btn.click(next_pair, [task, skipped_state, verdicts_shown], ab_shown)
    verdicts_shown.input(lambda pair, t, s, v: next_pair(t, s, v) if pair else gr.skip(), [current, task, skipped_state,
                                                                                  verdicts_shown], ab_shown)
    for button, pick in ((a_btn, "a"), (b_btn, "b"), (ab_skip, "skip")):
        button.click(choose(pick), [current, skipped_state, verdicts_shown, undo_state, *filters],
                     ab_shown | labelling)

    export_btn.click(export, [task, max_per, dedup, use_ref, fmt], {files, export_note})
    ctx.loaders.append((refresh, filters, listed))
