"""Functions tab: each task's functions as the model sees them, and the user's own functions."""

from __future__ import annotations

import json

import gradio as gr

from fcapp import user_tools
from fcapp.tools import namespaces
from fcapp.tools.base import SchemaError
from fcapp.tools.sandbox import try_call
from fcapp.ui.common import Context, default_task, task_choices

TEMPLATE = '''def percent_of(value: float, percent: float) -> float:
    """Compute a percentage of an amount, e.g. 25 percent of 80 is 20.

    Args:
        value: the whole amount
        percent: the percentage, e.g. 25 for 25%
    """
    return value * percent / 100
'''
TEMPLATE_EXAMPLES = '[{"value": 80, "percent": 25}]'
HEADERS = ["on", "function", "kind", "description", "examples"]


def function_table(task: str | None) -> list[list]:
    if not task:
        return []
    return [["✓" if r["enabled"] else "–", r["signature"], r["kind"],
             r["error"] and f"invalid: {r['error']}" or r["description"], "\n".join(r["examples"])]
            for r in user_tools.function_rows(task)]


def prompt_preview(task: str | None) -> str:
    """The messages a model reads before the question: system prompt with the injected functions,
    then the worked example (built exactly as a real chain's prompt)."""
    if not task:
        return ""
    from fcapp.solve import build_agent
    from fcapp.tasks import get_task

    task_obj = get_task(task)
    problem = task_obj.demonstration()[0]
    messages = build_agent(task_obj, problem).prompt("<the problem's question>")
    return "\n\n".join(f"── {m['role']} ──\n{m['content']}" for m in messages)


def schemas_json(task: str | None) -> dict:
    if not task:
        return {}
    return {r["name"]: r["schema"] for r in user_tools.function_rows(task) if r["schema"]}


def call(task: str | None, name: str | None, arguments: str) -> str:
    if not task or not name:
        return "Pick a function first."
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"✗ The arguments are not valid JSON ({exc.msg}); write an object like {{\"x\": 2}}."
    try:
        tool = user_tools.find_tool(task, name)
    except SchemaError as exc:
        return f"✗ {exc}"
    ok, text, seconds = try_call(tool, parsed)
    shown = tool.render_call(parsed) if isinstance(parsed, dict) else name
    mark = "✓" if ok else "✗"
    return f"{mark} `{shown}` → **{text}**  ({seconds:.2f} s)"


def example_args(task: str | None, name: str | None) -> str:
    if not task or not name:
        return "{}"
    try:
        tool = user_tools.find_tool(task, name)
    except SchemaError:
        return "{}"
    return json.dumps(tool.examples[0] if tool.examples else {})


def build(ctx: Context) -> None:
    def refresh(task: str | None, picked: str | None = None, mine_value: str | None = None) -> dict:
        """The task's functions everywhere they show. The two pickers keep their value only while it still
        names a function (a deleted one is not left behind as a stale choice)."""
        rows = user_tools.function_rows(task) if task else []
        names = [r["name"] for r in rows]
        users = [r["name"] for r in rows if r["kind"] == "user"]
        return {table: function_table(task), enabled: gr.update(choices=names, value=[r["name"] for r in rows if r["enabled"]]),
                schemas: schemas_json(task), preview: prompt_preview(task),
                target: gr.update(choices=names, value=picked if picked in names else None),
                mine: gr.update(choices=users, value=mine_value if mine_value in users else None)}

    def save(task: str | None, source_text: str, examples_text: str) -> dict:
        try:
            function = user_tools.save_function(source_text or "", examples_text, enable_for=[task] if task else [])
        except (SchemaError, ValueError) as exc:
            return {note: f"✗ Not saved: {exc}"}
        return refresh(task, function.name, function.name) | {
            note: f"✓ Saved **{function.name}** and switched it on for {task}. {namespaces.status()}"}

    def switch(task: str | None, chosen: list[str]) -> dict:
        """Apply the checkbox group: every listed function on, the others off (for this task only)."""
        if not task:
            return gr.skip()
        changed = []
        for row in user_tools.function_rows(task):
            if (row["name"] in chosen) != row["enabled"]:
                user_tools.set_enabled(task, row["name"], row["name"] in chosen)
                changed.append(f"**{row['name']}** {'on' if row['name'] in chosen else 'off'}")
        updates = {table: function_table(task), schemas: schemas_json(task), preview: prompt_preview(task)}
        return updates | ({note: f"Switched {', '.join(changed)} for {task}."} if changed else {})

    def load_user(name: str | None) -> dict:
        function = user_tools.get_function(name) if name else None
        if function is None:
            return {note: "Pick one of your functions to edit it."}
        return {source: function.source, examples: json.dumps(function.examples),
                note: f"Editing **{function.name}**: save to replace it."}

    def delete(task: str | None, name: str | None, picked: str | None) -> dict:
        if not name:
            return refresh(task, picked) | {note: "Pick one of your functions to delete it."}
        if not user_tools.delete_function(name):
            return refresh(task, picked) | {note: f"**{name}** is already deleted."}
        return refresh(task, picked) | {note: f"Deleted **{name}**.", source: TEMPLATE, examples: TEMPLATE_EXAMPLES}

    with gr.Tab("Functions", id="functions", elem_id="tab-functions"):
        gr.Markdown("The functions a model may call for each task, with the descriptions and call examples "
                    "injected into its prompt. Add your own in Python: type hints and the docstring become the "
                    "schema. They run in a child process with time and memory limits.")
        gr.Markdown(namespaces.status(), elem_id="fn-sandbox")
        task = gr.Dropdown(list(task_choices()), value=default_task(), label="Task", elem_id="fn-task")
        table = gr.Dataframe(headers=HEADERS, value=function_table(default_task()), interactive=False, wrap=True,
                             column_widths=["40px", "27%", "70px", "33%", "30%"], elem_id="fn-table",
                             label="Functions (✓ = in the prompt)")
        enabled = gr.CheckboxGroup(label="Switched on for this task", elem_id="fn-enabled")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Accordion("Prompt preview (what the model reads before the question)", open=False):
                    preview = gr.Textbox(lines=16, max_lines=40, show_label=False, elem_id="fn-preview",
                                         interactive=False)
            with gr.Column(scale=2):
                with gr.Accordion("JSON schemas", open=False):
                    schemas = gr.JSON(elem_id="fn-schemas")
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("### Your function")
                mine = gr.Dropdown(label="Edit one of yours", elem_id="fn-mine", choices=[])
                source = gr.Code(TEMPLATE, language="python", lines=12, label="Python source", elem_id="fn-source",
                                 interactive=True)
                examples = gr.Textbox(TEMPLATE_EXAMPLES, label="Call examples (JSON list of argument objects)",
                                      elem_id="fn-examples")
                with gr.Row():
                    save_btn = gr.Button("Save function", variant="primary", elem_id="fn-save")
                    delete_btn = gr.Button("Delete", variant="stop", elem_id="fn-delete")
                note = gr.Markdown(elem_id="fn-note")
            with gr.Column():
                gr.Markdown("### Try a call")
                target = gr.Dropdown(label="Function", elem_id="fn-try-name")
                arguments = gr.Textbox("{}", label="Arguments (JSON object)", elem_id="fn-try-args")
                call_btn = gr.Button("Call", elem_id="fn-try-call")
                result = gr.Markdown(elem_id="fn-try-result")

    listed = {table, enabled, schemas, preview, target, mine}
    task.change(refresh, task, listed)
    enabled.input(switch, [task, enabled], {table, schemas, preview, note})
    save_btn.click(save, [task, source, examples], listed | {note})
    delete_btn.click(delete, [task, mine, target], listed | {note, source, examples})
    mine.input(load_user, mine, {source, examples, note})
    target.change(example_args, [task, target], arguments)
    call_btn.click(call, [task, target, arguments], result)
    ctx.loaders.append((refresh, [task], listed))
