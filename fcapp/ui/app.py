"""Build and launch the fcapp Gradio app (`python app.py`, `python -m fcapp app`)."""

from __future__ import annotations

import logging
from typing import Sequence

import gradio as gr

from fcapp.models import teachers
from fcapp.paths import data_dir
from fcapp.serve import is_loopback
from fcapp.store import Store
from fcapp.tools import namespaces
from fcapp.ui import common, compare, curate, functions, solve, train

CSS = """
.fc-bar { height: 10px; background: var(--neutral-200); border-radius: 5px; overflow: hidden; margin: 4px 0 6px; }
.fc-bar > div { height: 100%; background: var(--color-accent); transition: width 0.5s; }
#busy { text-align: right; }
#fn-preview textarea { font-family: var(--font-mono); font-size: 13px; }
"""

# Keyboard choices in Curate: a / b / s for the A/B buttons, y / n to accept / reject the open chain.
# Ignored while typing in a field, and only for buttons on screen.
HEAD = """
<script>
document.addEventListener("keydown", (event) => {
  const t = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
  const ids = {a: "ab-a", b: "ab-b", s: "ab-skip", y: "cur-accept", n: "cur-reject"};
  const id = ids[event.key.toLowerCase()];
  const button = id && document.getElementById(id);
  if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>
"""


def _dot(color: str) -> str:
    return f"<span style='color:{color}'>●</span>"


def busy_badge() -> str:
    """What holds the model slot, and which training runs are going."""
    from fcapp import training

    parts = []
    holding = common.busy_now()
    if holding:
        parts.append(f"{_dot('#d97706')} model busy: {'; '.join(holding)}")
    else:
        parts.append(f"{_dot('#16a34a')} model slot free")
    for run in training.list_runs():  # run folders: CLI runs count too
        if run["status"] not in training.TERMINAL:
            step = f" step {run['step']}/{run['max_steps']}" if run.get("max_steps") else ""
            parts.append(f"{_dot('#4f46e5')} training {run['name']} ({run['method']}){step}")
    return " · ".join(parts)


def build_app(db: str | None = None) -> gr.Blocks:
    """The whole app over the store at `db` (default: fcapp.db in the data folder)."""
    store = Store(db)
    ctx = common.Context(store)
    # what Gradio copies into its temporary folder (uploads, downloads) is deleted after an hour
    with gr.Blocks(title="fcapp: function calling for small models", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        with gr.Row():
            gr.Markdown("## fcapp · function calling for small language models "
                        "([DPO on verified chains](https://arxiv.org/abs/2410.18890))")
            badge = gr.Markdown(busy_badge(), elem_id="busy")
        with gr.Tabs(elem_id="tabs"):
            functions.build(ctx)
            solve.build(ctx)
            curate.build(ctx)
            train.build(ctx)
            compare.build(ctx)
        gr.Timer(2.0).tick(busy_badge, None, badge, show_progress="hidden")
        for fn, inputs, outputs in ctx.loaders:
            demo.load(fn, inputs, outputs, show_progress="hidden")
    demo.queue(default_concurrency_limit=4)
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
