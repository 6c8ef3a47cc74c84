"""One decoding pass of a Llama-family model (SmolLM2), one new token per row, written out by hand.

transformers' forward spends about a third of an int4 decode pass outside the arithmetic: ~12 module
calls a layer, output recording, keyword plumbing and mask preparation, each a few microseconds, 30
layers a token (profiled: benchmarks/README.md). This pass runs the same tensor operations in the same
order, so its logits are transformers' to the bit (tests/test_perf_equivalence.py). With quantised
weights, q/k/v and gate/up are one matmul each: `quantise_for_decode` quantises each such group as
one weight (fcapp.models.cpu).

Rows that share a prompt (samples of one problem) hold the same keys and values in its columns; read
once a row, they are most of what a batched pass's attention streams (the 540-token prompt of 8 rows:
200 MB a pass at fp32, more than int8 weights). `_attention_sharing` reads them once for all rows.
Its logits equal transformers' up to float rounding (a softmax written out, not SDPA's kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache


def supports(model: torch.nn.Module) -> bool:
    """Whether `decode_pass` computes what `model`'s own forward does (to the bit, but for columns the
    rows share): a plain float32 Llama without biases."""
    config = getattr(model, "config", None)
    return (isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32 and not config.attention_bias
            and not config.mlp_bias and getattr(config, "pretraining_tp", 1) == 1)


@dataclass
class _Layer:
    """What one decoder layer's pass reads, gathered once per model (attribute lookups through
    nn.Module cost microseconds each, dozens a layer a token)."""

    input_norm: torch.nn.Module
    qkv: list[torch.nn.Linear]
    o_proj: torch.nn.Linear
    post_norm: torch.nn.Module
    gate_up: list[torch.nn.Linear]
    down_proj: torch.nn.Linear
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _layers_of(model: LlamaForCausalLM) -> list[_Layer]:
    """`model`'s layers as `_Layer`s, gathered at its first decode pass. They hold modules, whose weights
    (and quantised copies) are read at every pass, so training or quantising the model later is seen."""
    layers = model.__dict__.get("_decode_layers")
    if layers is None:
        layers = [_Layer(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                         layer.self_attn.o_proj, layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj],
                         layer.mlp.down_proj, layer.mlp.act_fn, layer.self_attn.scaling)
                  for layer in model.model.layers]
        model.__dict__["_decode_layers"] = layers
    return layers


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward (torch's rms_norm runs its ops, to the bit, in one call)."""
    return torch.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)


def _projected(linears: list[torch.nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """The outputs of `linears` on x side by side, [..., sum of their widths]: one matmul when they
    were quantised together (`quantise_for_decode`), else each Linear's, concatenated."""
    weight = getattr(linears[0], "decode_weight", None)
    if weight is None or any(getattr(linear, "decode_weight", None) is not weight for linear in linears):
        return torch.cat([linear(x) for linear in linears], dim=-1)
    return weight.matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def _rotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on x [rows, heads, 1, head_dim]: x * cos + rotate_half(x) * sin, with
    rotate_half(x) * sin written as x's halves swapped times sin with its first half negated (the same
    products, to the bit: sin's two halves are equal, and -a * b is a * -b)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


SHARED_MIN = 64  # fewer shared columns than this: SDPA over each row's own copy


def _attention_sharing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, shared: int,
                       scale: float) -> torch.Tensor:
    """Attention of q [rows, kv_heads, group, dim] (a key head's query heads as its rows) over k, v
    [rows, kv_heads, columns, dim] whose first `shared` columns are alike in every row: their scores
    and weighted values are one matmul for all rows' queries, over row 0's copy; the other columns,
    masked by `mask` [rows, 1, 1, columns], one per row. The same [rows, kv_heads, group, dim] as SDPA."""
    rows, kv_heads, group, dim = q.shape
    q = q * scale
    stacked = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    weights = torch.cat([
        torch.matmul(stacked, k[0, :, :shared].transpose(1, 2)).view(kv_heads, rows, group, shared).transpose(0, 1),
        torch.matmul(q, k[:, :, shared:].transpose(2, 3)).masked_fill_(~mask[..., shared:], float("-inf")),
    ], dim=-1).softmax(-1)
    on_shared = weights[..., :shared].transpose(0, 1).reshape(kv_heads, rows * group, shared)
    return (torch.matmul(on_shared, v[0, :, :shared]).view(kv_heads, rows, group, dim).transpose(0, 1)
            + torch.matmul(weights[..., shared:], v[:, :, shared:]))


def decode_pass(model: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache, shared: int = 0) -> torch.Tensor:
    """The logits [rows, new, vocab] after each new token: one per row, or one row's `new` tokens (a
    drafted run being checked, fcapp.models.drafting). ids, positions: [rows, new]; mask: None (one
    row, every column real; its new tokens attend causally) or, with one new token per row, boolean
    [rows, 1, 1, columns], True where the row may attend (the cache's columns and the new one);
    `cache`'s layers get the new keys and values. `shared`: how many leading cache columns every row
    holds alike (see `_attention_sharing`)."""
    config = model.config
    rows, new = ids.shape
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    signed_sin = torch.cat((-sin[..., :head_dim // 2], sin[..., head_dim // 2:]), dim=-1)
    causal = None
    if new > 1:  # query i sees the cache and the new tokens up to its own
        columns = cache.get_seq_length() + new
        causal = torch.ones(new, columns, dtype=torch.bool, device=ids.device).tril(columns - new)
    for index, layer in enumerate(_layers_of(model)):
        qkv = _projected(layer.qkv, _norm(layer.input_norm, x)).view(rows, new, -1, head_dim).transpose(1, 2)
        qk = _rotated(qkv[:, :heads + kv_heads], cos, signed_sin)
        k, v = cache.update(qk[:, heads:], qkv[:, heads + kv_heads:], index)
        if mask is None:
            o = torch.nn.functional.scaled_dot_product_attention(qk[:, :heads], k, v, attn_mask=causal,
                                                                 scale=layer.scaling, enable_gqa=True)
        else:  # transformers' sdpa path for one query: the query heads of a key head as its rows
            q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
            if shared >= SHARED_MIN:
                o = _attention_sharing(q, k, v, mask, shared, layer.scaling)
            else:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling)
        o = o.reshape(rows, heads, new, head_dim).transpose(1, 2).reshape(rows, new, heads * head_dim)
        x = x + layer.o_proj(o)
        gate, up = _projected(layer.gate_up, _norm(layer.post_norm, x)).chunk(2, dim=-1)
        x = x + layer.down_proj(layer.act_fn(gate) * up)
    return model.lm_head(_norm(model.model.norm, x))
