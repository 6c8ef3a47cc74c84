"""A local model written as one GGUF file that llama.cpp and Ollama load (`fcapp export NAME --gguf OUT`).

What can be exported: a Llama-architecture model with SmolLM2's tokenizer, i.e. the embedded model
and every model fcapp tunes from it. The file follows llama.cpp's own converter for Llama models:
tensors under GGUF names, the attention q/k rows permuted to GGML's rotary layout, the byte-level
BPE vocabulary with its merges and special tokens, and the model's chat template. 2-D weights are
stored as `f16` or `q8_0` (8-bit blocks with one scale per 32 values: half the size of f16, and
greedy decoding as the exported model's in practice); norms stay f32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcapp.files import atomic_write
from fcapp.models.base import ModelError
from fcapp.models.registry import embedded_gguf, model_id, resolve_model_path

GGUF_TYPES = ("q8_0", "f16")


def _permute(weights: Any, heads: int) -> Any:
    """HF's q/k rows (two rotary halves per head) in GGML's order (pairs interleaved), as llama.cpp does."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their GGUF token types (special tokens are CONTROL)."""
    import gguf

    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    types = []
    for i in range(size):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _smollm_tokens() -> list[str]:
    """The embedded model's vocabulary, read from its shipped GGUF."""
    import gguf

    return [str(token) for token in gguf.GGUFReader(embedded_gguf()).fields["tokenizer.ggml.tokens"].contents()]


def export_gguf(spec: str, out: str | Path, gguf_type: str = "q8_0", overwrite: bool = False) -> Path:
    """Write the local model `spec` (a tuned model's name, the embedded model, a folder) to the GGUF
    file `out`, atomically. Raises ValueError for a model or type that cannot be exported and
    FileExistsError for an existing `out` unless `overwrite`."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.is_dir() or (out.exists() and not overwrite):
        raise FileExistsError(f"{out} already exists: choose another file name (or overwrite it)")
    folder = Path(resolve_model_path(spec))
    if not (folder / "config.json").is_file():
        raise ModelError(f"{spec!r} is not a local model (no {folder / 'config.json'}): "
                         "give a tuned model's name (fcapp models), smollm2 or a model folder")
    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{spec!r} is a {config.model_type} model (rope {rope.get('rope_type')}): only Llama "
                         "models with plain rotary embeddings, such as SmolLM2 and its tuned models, can be exported")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, token_types = _vocabulary(tokenizer, config.vocab_size)
    if tokens != _smollm_tokens():
        raise ValueError(f"{spec!r} does not use SmolLM2's tokenizer: only SmolLM2 and the models tuned from it "
                         "can be exported")
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    weights = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    matrix_type = gguf.GGMLQuantizationType.Q8_0 if gguf_type == "q8_0" else gguf.GGMLQuantizationType.F16
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_id(spec))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")  # llama.cpp's pre-tokenizer for SmolLM's vocabulary
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_add_bos_token(adds_bos)
        writer.add_add_space_prefix(False)  # byte-level BPE: a space is part of the token that follows it
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)  # + template
        for name, tensor in weights.items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied to token_embd; llama.cpp ties it back when output.weight is absent
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ValueError(f"{spec!r}: no GGUF name for tensor {name}")
            data = tensor.numpy()
            if name.endswith("q_proj.weight"):
                data = _permute(data, heads)
            elif name.endswith("k_proj.weight"):
                data = _permute(data, kv_heads)
            kind = matrix_type if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(out, write)
