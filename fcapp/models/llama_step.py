"""One decoding pass of a Llama-family model (SmolLM2), written out by hand.

transformers' forward spends about a third of an int4 decode pass outside the arithmetic: ~12 module
calls a layer, output recording, keyword plumbing and mask preparation, each a few microseconds, 30
layers a token (profiled: benchmarks/README.md). This pass runs the same tensor operations in the same
order, so its logits are transformers' to the bit (tests/test_perf_equivalence.py). With quantised
weights, q/k/v and gate/up are one matmul each: `quantise_for_decode` quantises each such group as
one weight (fcapp.models.cpu).

The layers' loop (`_Stack`) runs in TorchScript: the same ATen operations, so the same bits, without
Python's cost per operation (~40 a layer): int8 decoding 1.33x and int4 1.14x faster on the 2-core
box (benchmarks/results.md). Where scripting fails (a PyTorch without TorchScript) the same module
runs in Python.

Rows that share a prompt (samples of one problem) hold the same keys and values in its columns; read
once a row, they are most of what a batched pass's attention streams (the 540-token prompt of 8 rows:
200 MB a pass at fp32, more than int8 weights). `_attention_sharing` reads them once for all rows.
Its logits equal transformers' up to float rounding (a softmax written out, not SDPA's kernel).
"""

import logging  # no `from __future__ import annotations`: TorchScript reads `_Stack`'s annotations as types
import warnings
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache

from fcapp.models.cpu import GROUP, MOST_ROWS, Packed8, few_rows_linear, int4_matmul, int8_matmul

if TYPE_CHECKING:
    from fcapp.models.kv_cache import _GrowingLayer

log = logging.getLogger(__name__)

SCRIPTED = True  # run the layers' loop in TorchScript (the benchmark turns it off to measure it)
SHARED_MIN = 64  # fewer shared columns than this: SDPA over each row's own copy


def supports(model: torch.nn.Module) -> bool:
    """Whether `decode_pass` computes what `model`'s own forward does (to the bit, but for columns the
    rows share): a plain float32 Llama without biases, SiLU MLPs, plain Linear projections."""
    config = getattr(model, "config", None)
    return (isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32 and not config.attention_bias
            and not config.mlp_bias and getattr(config, "pretraining_tp", 1) == 1 and config.hidden_act == "silu"
            and _stack_of(model) is not None)


class _Stack(torch.nn.Module):
    """A model's decoder layers for decode passes, holding what they read, gathered once per model
    (attribute lookups through nn.Module cost microseconds each, dozens a layer a token) and handed
    to TorchScript once, not at every pass. It holds the Parameters themselves, so training that
    changes their values is seen; `quantise_for_decode` drops it, so the next pass gathers the
    quantised copies. Per layer: its two norms' weights and epsilons, and four projection groups
    (q/k/v, o, gate/up, down), each as the fp32 Linear weights of the group and as its quantised
    weight (`bits` 8 or 4; 0 when the model has none)."""

    norms: List[torch.Tensor]
    eps: List[float]
    fp32: List[List[torch.Tensor]]
    quantised: List[List[torch.Tensor]]  # 4 bits: [packed, scales] per group; else [] per group
    packed8: List[List[Packed8]]  # 8 bits: [packed] per group; else [] per group

    def __init__(self, norms: list[torch.nn.Module], scaling: float, heads: int, kv_heads: int,
                 groups: list[list[torch.nn.Linear]], bits: int) -> None:
        super().__init__()
        self.norms, self.eps = [norm.weight for norm in norms], [float(norm.variance_epsilon) for norm in norms]
        self.scaling, self.heads, self.kv_heads, self.bits, self.group = scaling, heads, kv_heads, bits, GROUP
        self.fp32 = [[linear.weight for linear in group] for group in groups]
        self.quantised = [[g[0].decode_weight.packed, g[0].decode_weight.scales] if bits == 4 else [] for g in groups]
        self.packed8 = [[g[0].decode_weight.packed] if bits == 8 else [] for g in groups]

    def _project(self, x: torch.Tensor, group: int, bits: int, threads: int) -> torch.Tensor:
        """x [tokens, in] through projection group `group`, its outputs side by side [tokens, sum of
        widths]: the group's quantised weight (`bits` 4 or 8) in one matmul, or (0) each fp32 Linear's,
        as their forwards compute them."""
        if bits == 4:
            return int4_matmul(x, self.quantised[group][0], self.quantised[group][1], self.group)
        if bits == 8:
            return int8_matmul(x, self.packed8[group][0])
        outs = [few_rows_linear(x, weight, None, threads) for weight in self.fp32[group]]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, causal: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], shared: int, keys: List[torch.Tensor], values: List[torch.Tensor],
                length: int, quantised: bool, threads: int) -> torch.Tensor:
        """The layers on x [rows, new, hidden], each writing its new keys and values into keys[i],
        values[i] (buffers [rows, kv_heads, room, dim]) after their first `length` columns; the hidden
        states after the last layer. Masks as in `decode_pass`; `shared` > 0: attend to that many
        leading columns once for all rows (`_attention_sharing`). `quantised`: multiply by the
        quantised weights, else by the fp32 ones."""
        rows, new, hidden = x.shape[0], x.shape[1], x.shape[2]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, keys[0].shape[-1]
        bits = self.bits if quantised else 0
        end = length + new
        for i in range(len(keys)):
            g = 4 * i
            h = torch.rms_norm(x, [hidden], self.norms[2 * i], self.eps[2 * i]).reshape(rows * new, hidden)
            qkv = self._project(h, g, bits, threads).view(rows, new, -1, head_dim).transpose(1, 2)
            # narrow, not slicing: one operation where TorchScript issues a slice per dimension
            qk = _rotated(qkv.narrow(1, 0, heads + kv_heads), cos, signed_sin)
            keys[i].narrow(2, length, new).copy_(qk.narrow(1, heads, kv_heads))
            values[i].narrow(2, length, new).copy_(qkv.narrow(1, heads + kv_heads, kv_heads))
            k, v = keys[i].narrow(2, 0, end), values[i].narrow(2, 0, end)
            if mask is None:
                o = torch.nn.functional.scaled_dot_product_attention(qk.narrow(1, 0, heads), k, v, attn_mask=causal,
                                                                     scale=self.scaling, enable_gqa=True)
            else:  # transformers' sdpa path for one query: the query heads of a key head as its rows
                q = qk.narrow(1, 0, heads).reshape(rows, kv_heads, heads // kv_heads, head_dim)
                if shared > 0:
                    o = _attention_sharing(q, k, v, mask, shared, self.scaling)
                else:
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            o = o.reshape(rows, heads, new, head_dim).transpose(1, 2).reshape(rows * new, heads * head_dim)
            x = x + self._project(o, g + 1, bits, threads).view(rows, new, hidden)
            h = torch.rms_norm(x, [hidden], self.norms[2 * i + 1], self.eps[2 * i + 1]).reshape(rows * new, hidden)
            gate, up = self._project(h, g + 2, bits, threads).chunk(2, dim=-1)
            x = x + self._project(torch.nn.functional.silu(gate) * up, g + 3, bits, threads).view(rows, new, hidden)
        return x


def _stack_of(model: LlamaForCausalLM) -> tuple[_Stack, Callable[..., torch.Tensor]] | None:
    """`model`'s `_Stack` and the same compiled by TorchScript (or itself, where scripting fails),
    gathered at its first decode pass; None when a projection is no plain Linear (a LoRA adapter's)
    or only some are quantised: its own forward then decodes."""
    if "_decode_stack" not in model.__dict__:
        stack = _gathered(model)
        model.__dict__["_decode_stack"] = None if stack is None else (stack, _scripted(stack))
    return model.__dict__["_decode_stack"]


def _gathered(model: LlamaForCausalLM) -> _Stack | None:
    config, layers = model.config, model.model.layers
    groups = [group for layer in layers for group in
              ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
               [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj])]
    if any(type(linear) is not torch.nn.Linear for group in groups for linear in group):
        return None
    weights = [getattr(group[0], "decode_weight", None) for group in groups]
    if any(w is not None and any(getattr(linear, "decode_weight", None) is not w for linear in group)
           for w, group in zip(weights, groups)):
        return None
    widths = {w.bits if w is not None else 0 for w in weights}
    if len(widths) > 1:
        return None
    norms = [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    return _Stack(norms, float(layers[0].self_attn.scaling), config.num_attention_heads, config.num_key_value_heads,
                  groups, widths.pop())


def _scripted(stack: _Stack) -> Callable[..., torch.Tensor]:
    """`stack` compiled by TorchScript, or `stack` itself where scripting fails."""
    try:
        with warnings.catch_warnings():  # torch.jit.script is deprecated in favour of torch.compile, which
            warnings.simplefilter("ignore")  # was slower here (benchmarks/README.md); it still works
            return torch.jit.script(stack)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the same computation in Python
        log.warning("TorchScript unavailable (%s): decode passes run their layers in Python", exc)
        return stack


def _rotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on x [rows, heads, new, head_dim]: x * cos + rotate_half(x) * sin, with
    rotate_half(x) * sin written as x's halves swapped times sin with its first half negated (the same
    products, to the bit: sin's two halves are equal, and -a * b is a * -b)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _attention_sharing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, shared: int,
                       scale: float) -> torch.Tensor:
    """Attention of q [rows, kv_heads, group, dim] (a key head's query heads as its rows) over k, v
    [rows, kv_heads, columns, dim] whose first `shared` columns are alike in every row: their scores
    and weighted values are one matmul for all rows' queries, over row 0's copy; the other columns,
    masked by `mask` [rows, 1, 1, columns], one per row. The same [rows, kv_heads, group, dim] as SDPA."""
    rows, kv_heads, group, dim = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    q = q * scale
    stacked = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    weights = torch.cat([
        torch.matmul(stacked, k[0, :, :shared].transpose(1, 2)).view(kv_heads, rows, group, shared).transpose(0, 1),
        torch.matmul(q, k[:, :, shared:].transpose(2, 3)).masked_fill_(~mask[:, :, :, shared:], float("-inf")),
    ], dim=-1).softmax(-1)
    on_shared = weights[:, :, :, :shared].transpose(0, 1).reshape(kv_heads, rows * group, shared)
    return (torch.matmul(on_shared, v[0, :, :shared]).view(kv_heads, rows, group, dim).transpose(0, 1)
            + torch.matmul(weights[:, :, :, shared:], v[:, :, shared:]))


def decode_pass(model: LlamaForCausalLM, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache, shared: int = 0) -> torch.Tensor:
    """The logits [rows, new, vocab] after each new token: one per row, or one row's `new` tokens (a
    drafted run being checked, fcapp.models.drafting). ids, positions: [rows, new]; mask: None (one
    row, every column real; its new tokens attend causally) or, with one new token per row, boolean
    [rows, 1, 1, columns], True where the row may attend (the cache's columns and the new one);
    `cache`'s layers (`_GrowingLayer`s) get the new keys and values. `shared`: how many leading cache
    columns every row holds alike (see `_attention_sharing`). A pass of more than MOST_ROWS tokens
    multiplies by the fp32 weights, as the quantised Linears' own forwards do."""
    config = model.config
    rows, new = ids.shape
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    signed_sin = torch.cat((-sin[..., :head_dim // 2], sin[..., head_dim // 2:]), dim=-1)
    length = cache.get_seq_length()
    causal = None
    if new > 1:  # query i sees the cache and the new tokens up to its own
        causal = torch.ones(new, length + new, dtype=torch.bool, device=ids.device).tril(length)
    layers: list[_GrowingLayer] = cache.layers
    incoming = x.new_empty(rows, kv_heads, new, head_dim)
    for layer in layers:
        layer.reserve(incoming)
    buffers = [layer.buffers() for layer in layers]
    stack, scripted = _stack_of(model)
    x = (scripted if SCRIPTED else stack)(x, cos, signed_sin, causal, mask, shared if shared >= SHARED_MIN else 0,
                                          [k for k, _ in buffers], [v for _, v in buffers], length,
                                          rows * new <= MOST_ROWS, torch.get_num_threads())
    for layer in layers:
        layer.advance(new)
    return model.lm_head(torch.rms_norm(x, model.model.norm.weight.shape, model.model.norm.weight,
                                        model.model.norm.variance_epsilon))
