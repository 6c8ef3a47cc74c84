"""One decoding pass of a Llama-family model (SmolLM2), one new token per row, written out by hand.

transformers' forward spends a third of an int4 decode pass outside the arithmetic: ~12 module calls
a layer, output recording, keyword plumbing and mask preparation, each a few microseconds, 30 layers
a token (measured with the torch profiler, benchmarks/results.md). This pass runs the same tensor
operations in the same order, so in fp32 its logits are transformers' to the bit
(tests/test_perf_equivalence.py). With quantised weights, q/k/v and gate/up are one matmul each:
`quantise_for_decode` quantises each such group as one weight (fcapp.models.cpu).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache


def supports(model: torch.nn.Module) -> bool:
    """Whether `decode_pass` computes what `model`'s own forward does: a plain Llama without biases."""
    config = getattr(model, "config", None)
    return (isinstance(model, LlamaForCausalLM) and not config.attention_bias and not config.mlp_bias
            and getattr(config, "pretraining_tp", 1) == 1)


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return module.weight * (x32 * torch.rsqrt(variance + module.variance_epsilon)).to(x.dtype)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [rows, heads, 1, head_dim] (apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _inputs_of(linears: list[torch.nn.Linear], x: torch.Tensor) -> list[torch.Tensor]:
    """Each Linear of `linears` applied to x: one matmul when they were quantised together."""
    weight = getattr(linears[0], "decode_weight", None)
    if weight is None or any(getattr(linear, "decode_weight", None) is not weight for linear in linears):
        return [linear(x) for linear in linears]
    rows = x.numel() // x.shape[-1]
    out = weight.matmul(x.reshape(rows, x.shape[-1]))
    return [out[:, linear.decode_columns].view(*x.shape[:-1], -1) for linear in linears]


def decode_pass(model: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache) -> torch.Tensor:
    """The logits [rows, vocab] after one new token per row. ids, positions: [rows, 1]; mask: None (one
    row, every column real) or boolean [rows, 1, 1, columns], True where the row may attend (the cache's
    columns and the new one); `cache`'s layers get each row's new keys and values."""
    inner, config = model.model, model.config
    rows = ids.shape[0]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    x = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(x, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        h = _norm(layer.input_layernorm, x)
        q, k, v = (t.view(rows, 1, -1, head_dim).transpose(1, 2)
                   for t in _inputs_of([attention.q_proj, attention.k_proj, attention.v_proj], h))
        q, k = _rotated(q, cos, sin), _rotated(k, cos, sin)
        k, v = cache.update(k, v, index)
        if mask is None:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attention.scaling, enable_gqa=True)
        else:  # transformers' sdpa path for one query: the query heads of a key head as its rows
            o = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(rows, kv_heads, heads // kv_heads, head_dim), k, v, attn_mask=mask, scale=attention.scaling)
        o = o.reshape(rows, heads, 1, head_dim).transpose(1, 2).reshape(rows, 1, heads * head_dim)
        x = x + attention.o_proj(o)
        mlp = layer.mlp
        gate, up = _inputs_of([mlp.gate_proj, mlp.up_proj], _norm(layer.post_attention_layernorm, x))
        x = x + mlp.down_proj(mlp.act_fn(gate) * up)
    return model.lm_head(_norm(inner.norm, x))[:, -1]
