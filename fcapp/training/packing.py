"""Shared-prefix packing for SFT: examples of one task start with the same tokens (the system prompt with
the injected functions: 250-360 of their 400-600 tokens), so a batch of them is packed into one sequence
holding that prefix once, `[prefix][rest 1][rest 2]...`, where each rest attends to the prefix and to
itself only and keeps the positions it has alone. The model computes exactly what it computes on each
example alone (same logits, same loss), but the prefix's forward and backward pass run once per batch
instead of once per example, and nothing is padded.

A pack holds up to `batch_size` examples, so an optimizer step still sees batch_size x grad_accum examples.
The shared prefix stops before an example's first trained token, so every trained token counts once (and
is predicted from its own example's tokens), as without packing.

DPO packs each pair the same way, `[prompt][chosen][rejected]` with the prompt once (`PairCollator`):
TRL's DPO loss is left as it is and sees its usual [chosen rows; rejected rows] log-probs, which
`SharedPromptForward` lays out from the one packed forward pass.

The collator describes a pack's layout twice: as a 4D attention mask any attention implementation reads,
and as its `segments`, which `packed_attention` reads to attend within each piece alone (the prefix
causally, each rest to the prefix and causally to itself) instead of over the whole pack and masking most
of it away: a pack of 8 logic examples is ~2,000 tokens, of which a query may see ~500, and an SFT step
on such packs runs 1.6x faster by pieces (benchmarks/training.py).
"""

from __future__ import annotations

import random
from typing import Any

GROUP_KEY = 128  # examples whose first tokens agree this far are packed together (same system prompt)
PACKED_ATTENTION = "fcapp_packed"  # the attention implementation a training model loads with (load_model)
# Piece by piece only where it computes under this share of the whole pack's causal attention: measured
# (benchmarks/training.py), packs of 8 whose pieces are 48% (GSM8K) and 33% (logic) of it ran 1.3x and 1.6x
# faster; GSM8K packs of 2, at 89%, ran 10% slower (a call per piece costs more than the few products saved).
PIECES_PAY_BELOW = 0.75


def _first_trained(example: dict[str, Any]) -> int:
    masks = example["assistant_masks"]
    return next((i for i, m in enumerate(masks) if m), len(masks))


def pack(examples: list[dict[str, Any]], per_pack: int, seed: int = 0) -> list[dict[str, Any]]:
    """Tokenized examples (input_ids, assistant_masks) as packs of up to `per_pack` examples that share a
    prefix: {"input_ids", "assistant_masks", "segments": [prefix length, length of each rest]}. Examples are
    shuffled (seeded) within their group first, so packs mix problems."""
    from fcapp.models.kv_cache import common_prefix  # the decode loop's, one implementation

    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for example in examples:
        groups.setdefault(tuple(example["input_ids"][:GROUP_KEY]), []).append(example)
    rng = random.Random(seed)
    packs = []
    for members in groups.values():
        rng.shuffle(members)
        for start in range(0, len(members), per_pack):
            chunk = members[start:start + per_pack]
            first = chunk[0]["input_ids"]
            # each rest starts before its first trained token: the token a rest starts with is predicted from the
            # previous rest's end in the packed sequence, so it must be one that is not trained on
            shared = max(0, min(min(common_prefix(first, e["input_ids"]), _first_trained(e) - 1) for e in chunk))
            ids, masks = list(first[:shared]), [0] * shared
            segments = [shared]
            for e in chunk:
                ids += e["input_ids"][shared:]
                masks += e["assistant_masks"][shared:]
                segments.append(len(e["input_ids"]) - shared)
            packs.append({"input_ids": ids, "assistant_masks": masks, "segments": segments})
    return packs


class PackedCollator:
    """Batches of packs: input_ids, labels (-100 off the trained tokens), position_ids restarting after the
    prefix for each rest, a 4D attention mask [batch, 1, length, length] confining each rest to the
    prefix and itself, and each row's `segments` (for packed_attention). Packs of a batch are right-padded to
    the longest (padding attends to itself only)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            prefix, *rests = row["segments"]
            positions[b, :prefix] = torch.arange(prefix)
            start = prefix
            for size in rests:
                positions[b, start:start + size] = torch.arange(prefix, prefix + size)
                start += size
            mask[b, 0] = pack_mask(row["segments"], length)
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask,
                "segments": [row["segments"] for row in rows]}


def pack_mask(segments: list[int], length: int) -> Any:
    """[length, length] bool: which keys each query of a pack sees (the prefix causally, each rest the prefix
    and causally itself; padding up to `length` only itself, so no row is all masked)."""
    import torch

    prefix, *rests = segments
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:prefix, :prefix] = causal[:prefix, :prefix]
    start = prefix
    for size in rests:
        end = start + size
        mask[start:end, :prefix] = True
        mask[start:end, start:end] = causal[:size, :size]
        start = end
    mask[range(start, length), range(start, length)] = True
    return mask


def attention_work(segments: list[int]) -> tuple[int, int]:
    """(query-key products piece by piece, those of causal attention over the whole pack)."""
    prefix, *rests = segments
    length = prefix + sum(rests)
    return (prefix * (prefix + 1) // 2 + sum(size * prefix + size * (size + 1) // 2 for size in rests),
            length * (length + 1) // 2)


def packed_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, segments: list[list[int]] | None = None, **kwargs: Any) -> Any:
    """Attention over packs, one SDPA call per piece: a row's prefix attends causally to itself, each rest
    to the prefix and causally to itself; padding after the last rest gets zeros (it is never attended to
    nor trained on). The result is the dense masked attention's, computed over a few hundred keys a query
    instead of the whole pack. A row whose pieces would save little (PIECES_PAY_BELOW) runs one masked call
    over the whole row instead, under the collator's mask when the batch carries it (else built from the
    segments). A call without `segments` (any unpacked batch) is transformers' SDPA."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    rows = []
    for b, (prefix, *rests) in enumerate(segments):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        pieces_work, whole_work = attention_work([prefix, *rests])
        if pieces_work > PIECES_PAY_BELOW * whole_work:
            whole = attention_mask[b:b + 1] if attention_mask is not None else pack_mask([prefix, *rests], q.size(2))
            rows.append(sdpa(q, k, v, attn_mask=whole.to(q.device), dropout_p=dropout, scale=scaling))
            continue
        pieces = [sdpa(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], dropout_p=dropout, is_causal=True,
                       scale=scaling)] if prefix else []
        start = prefix
        for size in rests:
            end = start + size
            sees = torch.ones(size, prefix + size, dtype=torch.bool, device=query.device)
            sees[:, prefix:] = sees[:, prefix:].tril()
            pieces.append(sdpa(q[:, :, start:end], torch.cat([k[:, :, :prefix], k[:, :, start:end]], dim=2),
                               torch.cat([v[:, :, :prefix], v[:, :, start:end]], dim=2), attn_mask=sees,
                               dropout_p=dropout, scale=scaling))
            start = end
        pieces.append(q.new_zeros(q[:, :, start:].shape))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make `packed_attention` loadable by name (`attn_implementation=`); unpacked calls get SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def pack_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, Any]:
    """One preference pair as a pack: the prompt but its last token as the prefix, then each completion
    behind that last token (untrained, so each completion's first token is predicted from its own prompt)."""
    rests = [prompt[-1:] + chosen, prompt[-1:] + rejected]
    labels = [-100] * (len(prompt) - 1)
    for rest in rests:
        labels += [-100] + rest[1:]
    return {"input_ids": prompt[:-1] + rests[0] + rests[1], "labels": labels,
            "segments": [len(prompt) - 1, len(rests[0]), len(rests[1])]}


class PairCollator:
    """TRL's preference batch (prompt_ids / chosen_ids / rejected_ids rows -> padded [chosen; rejected] rows)
    plus `packed`: the same pairs packed with their prompt once, and where each packed log-prob goes in
    TRL's layout."""

    def __init__(self, pad_id: int) -> None:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.padded = DataCollatorForPreference(pad_token_id=pad_id)
        self.packed = PackedCollator(pad_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.padded(rows)
        packs = [pack_pair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
        index: list[list[int]] = [[], [], [], []]  # TRL row, TRL column, packed row, packed column
        for b, (row, packed) in enumerate(zip(rows, packs)):
            start = len(row["prompt_ids"]) - 1  # log-prob column of a completion's first token, unpacked
            chosen, rejected = len(row["chosen_ids"]), len(row["rejected_ids"])
            for trl_row, length, packed_start in ((b, chosen, start), (len(rows) + b, rejected, start + 1 + chosen)):
                index[0] += [trl_row] * length
                index[1] += range(start, start + length)
                index[2] += [b] * length
                index[3] += range(packed_start, packed_start + length)
        batch["packed"] = self.packed(packs) | {"index": torch.tensor(index)}
        return batch


class SharedPromptForward:
    """Stands in for the model inside TRL's DPO loss: one forward pass over the packed pairs, its per-token
    outputs (zero off the trained tokens, as TRL's fused head gives them) laid out as TRL's padded batch."""

    FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

    def __init__(self, model: Any, packed: dict[str, Any]) -> None:
        self.model, self.packed = model, packed

    def __call__(self, input_ids: Any, **_: Any) -> Any:
        """`input_ids`: TRL's padded batch, read for its shape only (the packed batch holds the same tokens)."""
        index = self.packed["index"]
        out = self.model(**{k: v for k, v in self.packed.items() if k != "index"}, fused_lm_head=True, use_cache=False)
        shape = (input_ids.size(0), input_ids.size(1) - 1)
        for name in self.FIELDS:
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, value.new_zeros(shape).index_put((index[0], index[1]), value[index[2], index[3]]))
        return out
