"""Model backends behind one ChatModel interface, picked by a spec string (`get_model`).

Spec syntax:

- local: the embedded SmolLM2-135M-Instruct under any of its names (`smollm2`, `base`, ...: see
  `fcapp.models.registry`), a tuned model's name, a local folder or a hub id; loaded with
  `fcapp.models.local.load_model`.
- HTTP: `http[s]://HOST[:PORT]/PATH#MODEL`, the base URL of an OpenAI-compatible API (the part
  before `/chat/completions`, usually ending in /v1) and the model name after `#`, e.g.
  `http://127.0.0.1:8000/v1#smollm2` or `https://api.openai.com/v1#gpt-4o-mini`. The API key is
  read from the environment variable named by `api_key_env` (OPENAI_API_KEY by default; a key is
  never put in the spec, so it stays out of logs and shell history).

Backends are imported on demand: an HTTP teacher never loads torch.
"""

from __future__ import annotations

from typing import Any

from fcapp.models.base import ChatModel


def get_model(spec: str | None, api_key_env: str | None = "OPENAI_API_KEY", **kw: Any) -> ChatModel:
    """Build the model a spec names; `kw` go to OpenAICompatModel or load_model respectively."""
    if spec and spec.startswith(("http://", "https://")):
        from fcapp.models.openai_compat import OpenAICompatModel

        base_url, _, name = spec.partition("#")
        if not name:
            raise ValueError(f"an HTTP model spec needs the model name after '#', e.g. {base_url}#MODEL")
        return OpenAICompatModel(base_url, name, api_key_env=api_key_env, **kw)
    from fcapp.models.local import load_model

    return load_model(spec, **kw)
