"""Build and launch the fcapp Gradio app (`python app.py`, `python -m fcapp app`)."""

from __future__ import annotations

import logging
from typing import Sequence

import gradio as gr

from fcapp import jobs
from fcapp.models import teachers
from fcapp.paths import data_dir
from fcapp.serve import is_loopback
from fcapp.store import Store
from fcapp.tools import namespaces
from fcapp.ui import common, compare, curate, functions, generate, overview, solve, train

CSS = """
.fc-bar { height: 10px; background: var(--neutral-200); border-radius: 5px; overflow: hidden; margin: 4px 0 6px; }
.fc-bar > div { height: 100%; background: var(--color-accent); transition: width 0.5s; }
#busy { text-align: right; }
#fn-preview textarea { font-family: var(--font-mono); font-size: 13px; }
.fc-stages { display: flex; gap: 8px; align-items: stretch; flex-wrap: wrap; }
.fc-stage { flex: 1; min-width: 150px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px; }
.fc-stage b.n { font-size: 1.6em; display: block; }
.fc-stage.empty { opacity: 0.6; border-style: dashed; }
.fc-arrow { align-self: center; font-size: 1.4em; color: var(--body-text-color-subdued); }
.fc-empty { border-left: 4px solid var(--color-accent); padding: 6px 12px; background: var(--background-fill-secondary); }
/* Gradio's own status text ("queue: 1/1 | 0.1/0.2s", "processing | 2.0s") is jargon: every tab says in words
   what it is doing (waiting for the model, loading, step 3, stopped) */
.meta-text, .meta-text-center, .progress-text { display: none !important; }
"""

# Keyboard choices in Curate: a / b / s for the A/B buttons, y / n to accept / reject the open chain, u to
# undo the last label. Ignored while typing in a field, and only for buttons on screen.
HEAD = """
<script>
document.addEventListener("keydown", (event) => {
  const t = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
  const ids = {a: "ab-a", b: "ab-b", s: "ab-skip", y: "cur-accept", n: "cur-reject", u: "cur-undo"};
  const id = ids[event.key.toLowerCase()];
  const button = id && document.getElementById(id);
  if (button && button.offsetParent !== null && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>
"""


def _dot(color: str) -> str:
    return f"<span style='color:{color}'>●</span>"


def busy_badge() -> str:
    """In plain words: what has the model, which jobs and training runs are going."""
    from fcapp import training

    holder = jobs.SLOT.holder()
    parts = [f"{_dot('#d97706')} model busy: {holder}" if holder else f"{_dot('#16a34a')} model free"]
    for job in jobs.active():
        progress = f" {job.done} of {job.total}" if job.total else ""
        parts.append(f"{_dot('#0891b2')} {job.kind} {job.status}{progress}")
    for run in training.list_runs():  # run folders: CLI runs count too
        if run["status"] not in training.TERMINAL:
            step = f" step {run['step']} of {run['max_steps']}" if run.get("max_steps") else ""
            parts.append(f"{_dot('#4f46e5')} training {run['name']} ({run['method']}){step}")
    return " · ".join(parts)


def build_app(db: str | None = None) -> gr.Blocks:
    """The whole app over the store at `db` (default: fcapp.db in the data folder)."""
    store = Store(db)
    # what Gradio copies into its temporary folder (uploads, downloads) is deleted after an hour
    with gr.Blocks(title="fcapp: function calling for small models", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        with gr.Row():
            gr.Markdown("## fcapp · function calling for small language models "
                        "(SFT, DPO, GRPO on verified chains, after [Manduzio et al.](https://arxiv.org/abs/2410.18890))")
            badge = gr.Markdown(busy_badge(), elem_id="busy")
        store_version, models_version = gr.State(list(store.version())), gr.State(common.model_choices())
        with gr.Tabs(elem_id="tabs") as tabs:
            ctx = common.Context(store, tabs, store_version, models_version)
            for tab in (overview, functions, solve, generate, curate, train, compare):
                tab.build(ctx)
        for wire in ctx.wiring:
            wire()

        def poll() -> dict:
            # a State's change listeners run only when its value differs: views redraw when the store or the
            # model list changed, whoever changed them (this page, another one, the CLI, a training worker)
            return {badge: busy_badge(), store_version: list(store.version()), models_version: common.model_choices()}

        gr.Timer(2.0).tick(poll, None, {badge, store_version, models_version}, show_progress="hidden")
        pickers = ctx.model_pickers
        models_version.change(lambda choices: {p: gr.update(choices=choices) for p in pickers}, models_version,
                              set(pickers), show_progress="hidden")
        for fn, inputs, outputs in ctx.loaders:
            demo.load(fn, inputs, outputs, show_progress="hidden")
    demo.queue(default_concurrency_limit=8)
    return demo


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth takes user:password (both non-empty)")
    return user, password


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, db: str | None = None,
           allow_unsandboxed_functions: bool = False, teacher_files: Sequence[str] = (),
           teacher_flags: Sequence[str] = ()) -> None:
    """Serve the app; a non-loopback host needs `auth` ("user:password"). Where the machine has no
    OS sandbox, user functions are refused unless `allow_unsandboxed_functions`. The teachers the
    browser may pick come from `teacher_files` and `teacher_flags` (see fcapp.models.teachers)."""
    credentials = parse_auth(auth)
    if not is_loopback(host) and credentials is None:
        raise ValueError(f"binding to {host} makes the app reachable from other machines: "
                         "pass --auth user:password (or use the default host 127.0.0.1)")
    teachers.configure(list(teacher_files), list(teacher_flags))
    if allow_unsandboxed_functions:
        namespaces.allow_unsandboxed()
    log = logging.getLogger("fcapp")
    (log.info if namespaces.unavailable() is None else log.warning)(namespaces.status())
    demo = build_app(db)
    demo.launch(server_name=host, server_port=port, auth=credentials, show_error=True, ssr_mode=False,
                theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, head=HEAD,
                allowed_paths=[str(data_dir("exports"))], max_file_size="200mb", quiet=False)
