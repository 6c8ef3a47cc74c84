"""Shared-prefix packing for SFT: examples of one task start with the same tokens (the system prompt with
the injected functions: 250-360 of their 400-600 tokens), so a batch of them is packed into one sequence
holding that prefix once, `[prefix][rest 1][rest 2]...`, where each rest attends to the prefix and to
itself only and keeps the positions it has alone. The model computes exactly what it computes on each
example alone (same logits, same loss), but the prefix's forward and backward pass run once per batch
instead of once per example, and nothing is padded.

A pack holds up to `batch_size` examples, so an optimizer step still sees batch_size x grad_accum examples.
The shared prefix stops before an example's first trained token, so every trained token counts once (and
is predicted from its own example's tokens), as without packing.
"""

from __future__ import annotations

import random
from typing import Any

GROUP_KEY = 128  # examples whose first tokens agree this far are packed together (same system prompt)


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
    prefix for each rest, and a 4D attention mask [batch, 1, length, length] confining each rest to the
    prefix and itself. Packs of a batch are right-padded to the longest (padding attends to itself only)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            prefix, *rests = row["segments"]
            positions[b, :prefix] = torch.arange(prefix)
            mask[b, 0, :prefix, :prefix] = causal[:prefix, :prefix]
            start = prefix
            for size in rests:
                end = start + size
                positions[b, start:end] = torch.arange(prefix, prefix + size)
                mask[b, 0, start:end, :prefix] = True
                mask[b, 0, start:end, start:end] = causal[:size, :size]
                start = end
            mask[b, 0, range(n, length), range(n, length)] = True  # padding sees itself: no all-masked row
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
