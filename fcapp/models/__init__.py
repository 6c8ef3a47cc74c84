"""Model backends behind one ChatModel interface, picked by a spec string (`get_model`).

Spec syntax:

- local: the embedded SmolLM2-135M-Instruct under any of its names (`smollm2`, `base`, ...: see
  `fcapp.models.registry`), a tuned model's name, a local folder or a hub id; loaded with
  `fcapp.models.local.load_model`.
- HTTP: `http[s]://HOST[:PORT]/PATH#MODEL`, the base URL of an OpenAI-compatible API (the part
  before `/chat/completions`, usually ending in /v1) and the model name after `#`, e.g.
  `http://127.0.0.1:8000/v1#smollm2` or `https://api.openai.com/v1#gpt-4o-mini`. It is called
  without a key unless `api_key_env` names the environment variable holding one (the CLI's
  --api-key-env; a key is never put in the spec, so it stays out of logs and shell history).
- a configured teacher: `teacher:NAME` (see fcapp.models.teachers), with the URL, model and key
  variable the operator configured for it. This is how the app reaches a teacher that needs a key.

Backends are imported on demand: an HTTP teacher never loads torch.
"""

from __future__ import annotations

from typing import Any

from fcapp.models import teachers
from fcapp.models.base import ChatModel
from fcapp.models.registry import EMBEDDED, PRECISIONS

QUANTISED = " or ".join(f"'@{precision}'" for precision in PRECISIONS if precision != "fp32")
SPEC_HELP = (f"'{EMBEDDED}' (embedded), a tuned model name, a local folder, http://HOST:PORT/v1#MODEL, or "
             f"teacher:NAME (configured in teachers.json in the data folder); a local model followed by {QUANTISED} "
             "decodes with quantised weights")


def get_model(spec: str | None, api_key_env: str | None = None, **kw: Any) -> ChatModel:
    """Build the model a spec names; `kw` go to OpenAICompatModel or load_model respectively."""
    if spec and spec.startswith(teachers.PREFIX):
        from fcapp.models.openai_compat import OpenAICompatModel

        teacher = teachers.get_teacher(spec)
        return OpenAICompatModel(teacher.url, teacher.model, api_key_env=teacher.key_env, **kw)
    if spec and spec.startswith(("http://", "https://")):
        from fcapp.models.openai_compat import OpenAICompatModel

        base_url, _, name = spec.partition("#")
        if not name:
            raise ValueError(f"an HTTP model spec needs the model name after '#', e.g. {base_url}#MODEL")
        return OpenAICompatModel(base_url, name, api_key_env=api_key_env, **kw)
    from fcapp.models.local import load_model

    return load_model(spec, **kw)
