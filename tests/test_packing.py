"""Shared-prefix packing computes exactly what the examples give one by one: same loss, same gradient,
with the shared system prompt computed once."""

from __future__ import annotations

import pytest
import torch

from fcapp.training.common import load_tokenizer
from fcapp.training.config import TrainConfig
from fcapp.training.packing import PackedCollator, pack
from fcapp.training.sft import tokenized_examples
from helpers import correct_chain


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def examples(tokenizer, ids: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for task, pid in ids:
        chain = correct_chain(task, pid)
        rows.append({"prompt": chain.prompt, "completion": chain.completion_messages(), "_where": pid})
    return tokenized_examples(rows, tokenizer, TrainConfig(name="p", method="sft", data="x"))


def separate_loss(model, rows: list[dict]) -> torch.Tensor:
    """The loss of the rows as one padded batch, the usual way (mean over every trained token)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])])
        attention[b, :n] = 1
    return model(input_ids=ids, attention_mask=attention, labels=labels).loss


def test_a_pack_holds_the_shared_prompt_once_and_gives_the_same_loss_and_gradient(small_model, tokenizer):
    rows = examples(tokenizer, [("fol", "fol-0-0"), ("fol", "fol-0-1"), ("fol", "fol-0-2")])
    [packed] = pack(rows, per_pack=3)
    prefix, *rests = packed["segments"]
    assert prefix > 200  # the system prompt with the functions, at least
    assert len(packed["input_ids"]) == prefix + sum(rests) < sum(len(r["input_ids"]) for r in rows) - 2 * 200
    assert sum(packed["assistant_masks"]) == sum(sum(r["assistant_masks"]) for r in rows)  # each trained once
    batch = PackedCollator(0)([packed | {"labels": [t if m else -100 for t, m in
                                                     zip(packed["input_ids"], packed["assistant_masks"])]}])

    model = small_model.model  # the real SmolLM2, fp32
    with torch.no_grad():
        alone = separate_loss(model, rows)
        together = model(**batch).loss
    assert together.item() == pytest.approx(alone.item(), rel=1e-4)

    weight = model.model.layers[0].self_attn.q_proj.weight
    grads = []
    for compute in (lambda: separate_loss(model, rows), lambda: model(**batch).loss):
        model.zero_grad()
        compute().backward()
        grads.append(weight.grad.clone())
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("pieces_pay_below", [1.0, 0.0], ids=["piece-by-piece", "whole-row-fallback"])
def test_packed_attention_attends_piece_by_piece_to_what_the_dense_mask_gives(tokenizer, monkeypatch,
                                                                              pieces_pay_below):
    """Two packs of unequal length in one batch (the shorter padded): attention computed from the packs'
    segments, piece by piece or (where pieces would not pay) over the whole row, gives the loss and
    gradient of SDPA over the collator's dense 4D mask, and needs no mask."""
    from transformers import AutoModelForCausalLM

    from fcapp.models.registry import resolve_model_path
    from fcapp.training import packing
    from fcapp.training.packing import register_packed_attention

    monkeypatch.setattr(packing, "PIECES_PAY_BELOW", pieces_pay_below)

    rows = examples(tokenizer, [("fol", f"fol-0-{i}") for i in range(5)])
    packs = pack(rows, per_pack=3)
    assert sorted(len(p["segments"]) - 1 for p in packs) == [2, 3]
    batch = PackedCollator(0)([p | {"labels": [t if m else -100 for t, m in zip(p["input_ids"], p["assistant_masks"])]}
                               for p in packs])
    results = []
    for attention, mask in (("sdpa", batch["attention_mask"]), (register_packed_attention(), None)):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.float32,
                                                     attn_implementation=attention)
        loss = model(**(batch | {"attention_mask": mask})).loss
        loss.backward()
        results.append((loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (dense_loss, dense_grad), (packed_loss, packed_grad) = results
    assert packed_loss == pytest.approx(dense_loss, rel=1e-5)
    assert torch.allclose(packed_grad, dense_grad, rtol=1e-3, atol=1e-6)


def test_examples_of_different_tasks_are_never_packed_together(tokenizer):
    rows = examples(tokenizer, [("fol", "fol-0-0"), ("gsm8k", "gsm8k-1"), ("fol", "fol-0-1"), ("gsm8k", "gsm8k-2")])
    packs = pack(rows, per_pack=4)
    assert sorted(len(p["segments"]) - 1 for p in packs) == [2, 2]
    assert all(p["segments"][0] > 200 for p in packs)


def test_scoring_only_the_trained_positions_gives_the_log_probs_of_trls_dense_path(tokenizer):
    """The worker makes TRL's fused LM head score only the positions it trains on (as TRL does on Triton
    devices); on a CPU that is much faster, and the log-probs must be exactly those of TRL's own dense pass."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from fcapp.models.registry import resolve_model_path
    from fcapp.training.common import score_trained_positions_only

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.float32)
    add_fused_lm_head(model)
    rows = examples(tokenizer, [("fol", "fol-0-0"), ("fol", "fol-0-1")])
    [packed] = pack(rows, per_pack=2)
    labels = [t if m else -100 for t, m in zip(packed["input_ids"], packed["assistant_masks"])]
    batch = PackedCollator(0)([packed | {"labels": labels}])
    dense_decision = trl_utils._use_triton
    with torch.no_grad():
        dense = model(**batch, fused_lm_head=True).log_probs
        score_trained_positions_only()
        try:
            compact = model(**batch, fused_lm_head=True).log_probs
        finally:
            trl_utils._use_triton = dense_decision
    assert int((dense != 0).sum()) == sum(packed["assistant_masks"])
    assert torch.allclose(dense, compact, atol=1e-5)


def test_a_packed_pair_gives_trls_own_dpo_log_probs_with_its_prompt_computed_once(tokenizer):
    """DPO packing: `[prompt][chosen][rejected]` in one row, the prompt once, and the per-token log-probs TRL's
    DPO loss reads, laid out as its padded [chosen rows; rejected rows] batch, equal to its own forward's."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from fcapp.models.registry import resolve_model_path
    from fcapp.training.packing import PairCollator, SharedPromptForward

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.float32)
    add_fused_lm_head(model)
    rows = []
    for pid in ("fol-0-0", "fol-0-1"):
        chain = correct_chain("fol", pid)
        prompt = tokenizer.apply_chat_template(chain.prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        chosen = tokenizer.encode(chain.steps[0].text + "<|im_end|>")
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": tokenizer.encode("final_answer(answer=\"True\")")})
    rows[1]["rejected_ids"] += tokenizer.encode(" and some more words than the other")  # unequal lengths
    batch = PairCollator(0)(rows)
    packed = batch.pop("packed")
    assert packed["input_ids"].size(1) == max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) + 1
                                              for r in rows)  # the prompt once (its last token twice)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True, use_cache=False)
        ours = SharedPromptForward(model, packed)(input_ids=batch["input_ids"], labels=labels)
    assert ours.log_probs.shape == theirs.log_probs.shape
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert torch.allclose(ours.log_probs, theirs.log_probs, atol=1e-4)
    assert torch.allclose(ours.log_probs.sum(1), theirs.log_probs.sum(1), rtol=1e-4)
