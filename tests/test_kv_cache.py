"""The KV state of the decode loop: whatever rows are cut, replaced or stacked, feeding a row's next
tokens gives the logits a plain recompute of that row's whole sequence gives (the model run on it
alone, without a cache). A tiny randomly initialised Llama keeps it fast; the code paths are the
real model's."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fcapp.models.kv_cache import KVState, common_prefix

PAD = 0


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def inference_mode() -> Iterator[None]:
    """As in LocalModel, which decodes under inference mode."""
    with torch.inference_mode():
        yield


def recompute(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """The logits after `tokens`, from the model run on them alone."""
    return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def state_of(model: LlamaForCausalLM, rows: list[list[int]]) -> KVState:
    state = KVState(model.config.num_hidden_layers, rows=len(rows))
    state.feed(model, rows, PAD)
    return state


def assert_next_logits_match(model: LlamaForCausalLM, state: KVState, nexts: list[list[int]]) -> None:
    """Feeding `nexts` (one list of new tokens per row, maybe empty) gives each fed row the logits
    of its whole sequence recomputed."""
    expected = [list(held) + new for held, new in zip(state.tokens, nexts)]
    logits = state.feed(model, nexts, PAD)
    for row, (new, tokens) in enumerate(zip(nexts, expected)):
        assert state.tokens[row] == tokens
        if new:
            assert torch.allclose(logits[row], recompute(model, tokens), atol=1e-5), row


PROMPTS = [[5, 6, 7, 8, 9, 10], [5, 6, 11], [12, 13, 14, 15]]


def test_rows_of_different_lengths_decode_as_each_would_alone(model):
    state = state_of(model, PROMPTS)
    assert state.width == 6 and state.valid.sum(1).tolist() == [6, 3, 4]
    assert_next_logits_match(model, state, [[20], [21, 22], []])  # a row may sit a step out
    assert_next_logits_match(model, state, [[23], [24], [25]])


def test_keep_cuts_rows_to_a_prefix_in_place_or_packed(model):
    state = state_of(model, PROMPTS)
    same = state.keep([0, 1, 2], [5, 3, 4])  # rows stay put, little wasted: cut in place
    assert same is state and state.tokens == [PROMPTS[0][:5], PROMPTS[1], PROMPTS[2]]
    assert_next_logits_match(model, state, [[30], [31], [32]])

    state = state_of(model, PROMPTS)
    packed = state.keep([2, 0], [2, 6])  # rows move: a new packed state, the old one untouched
    assert packed is not state and packed.tokens == [PROMPTS[2][:2], PROMPTS[0]]
    assert state.tokens == PROMPTS
    assert_next_logits_match(model, packed, [[33], [34]])
    assert_next_logits_match(model, state, [[35], [36], [37]])


def test_rows_packs_prefixes_from_column_zero(model):
    state = state_of(model, PROMPTS)
    packed = state.rows([1, 1, 0], [3, 2, 4])
    assert packed.width == 4 and packed.tokens == [PROMPTS[1], PROMPTS[1][:2], PROMPTS[0][:4]]
    assert packed.where == [[0, 1, 2], [0, 1], [0, 1, 2, 3]]
    assert_next_logits_match(model, packed, [[40], [41, 42], [43]])


def test_rows_cut_from_rows_with_holes_keep_their_tokens(model):
    state = state_of(model, PROMPTS)  # rows 1 and 2 start with holes: their prompts are right-aligned
    assert_next_logits_match(model, state, [[20], [], [21]])  # row 1 sits out: a hole in its middle
    packed = state.rows([1, 2, 0], [3, 5, 7])
    assert packed.tokens == [PROMPTS[1], PROMPTS[2] + [21], PROMPTS[0] + [20]]
    assert_next_logits_match(model, packed, [[44], [45], [46]])


TRUNK = [1 + i % 60 for i in range(70)]  # a prompt every row shares, long enough for the shared-column attention


def test_rows_sharing_a_prompt_share_its_columns_and_decode_as_each_would_alone(model):
    from fcapp.models.llama_step import SHARED_MIN

    state = state_of(model, [TRUNK])
    samples = state.rows([0, 0, 0], [70, 70, 65])  # two samples of the prompt and one cut inside it
    assert samples.shared == 65 >= SHARED_MIN
    assert_next_logits_match(model, samples, [[5], [6, 7], [8]])
    for _ in range(3):  # one token a row a pass: the pass reads the shared columns once for all rows
        assert_next_logits_match(model, samples, [[9], [10], [11]])
    samples.put([2], state_of(model, [[3, 4]]))
    assert samples.shared == 0
    assert_next_logits_match(model, samples, [[12], [13], [14]])


def test_put_replaces_rows_in_place_whichever_state_is_wider(model):
    state = state_of(model, PROMPTS)
    state.put([1], state_of(model, [[50, 51]]))
    assert state.tokens == [PROMPTS[0], [50, 51], PROMPTS[2]] and state.width == 6
    assert_next_logits_match(model, state, [[52], [53], [54]])

    wider = state_of(model, [[55] * 9, [56, 57]])
    state.put([0, 2], wider)
    assert state.width == 9 and state.tokens == [[55] * 9, [50, 51, 53], [56, 57]]
    assert_next_logits_match(model, state, [[58], [59], [60]])


def test_joined_stacks_states_of_different_widths(model):
    a, b = state_of(model, PROMPTS[:2]), state_of(model, [[1, 2, 3, 4, 5, 6, 7, 8]])
    joined = KVState.joined([a, b])
    assert joined.tokens == PROMPTS[:2] + [[1, 2, 3, 4, 5, 6, 7, 8]] and joined.width == 8
    assert_next_logits_match(model, joined, [[61], [62], [63]])


def test_a_failed_pass_leaves_an_empty_state_not_a_half_updated_one(model):
    state = state_of(model, PROMPTS)
    with pytest.raises(IndexError):
        state.feed(model, [[999], [1], [2]], PAD)  # a token past the vocabulary
    assert state.tokens == [] and state.width == 0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2
