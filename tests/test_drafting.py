"""Prompt-lookup drafting: where a guess comes from, and which of a checked run's positions are trusted."""

from __future__ import annotations

import torch

from fcapp.models.drafting import MARGIN, lookup_draft, trusted_positions


def test_a_guess_is_what_followed_the_latest_earlier_occurrence_of_the_tail():
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_draft(context, most=3) == [7, 8, 5]  # the latest of the two earlier [1, 2, 3]
    assert lookup_draft(context, most=1) == [7]


def test_no_guess_when_the_tail_never_occurred():
    assert lookup_draft([1, 2, 3, 4, 5], most=4) == []
    assert lookup_draft([9, 5, 6, 7, 1, 5, 6], most=4) == []  # only the last 2 tokens recur: too weak a clue
    assert lookup_draft([1, 2, 3], most=4) == []


def logits_with(choices: list[tuple[int, float]], vocab: int = 10) -> torch.Tensor:
    """One row per position: the chosen token leads the runner-up (token 0, or 1 when 0 is chosen) by
    the given gap."""
    rows = torch.zeros(len(choices), vocab)
    for i, (token, gap) in enumerate(choices):
        rows[i, token] = 5.0
        rows[i, 1 if token == 0 else 0] = 5.0 - gap
    return rows


def test_every_position_is_trusted_when_each_guess_is_the_clear_greedy_choice():
    draft = [3, 4, 5]
    logits = logits_with([(3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0)])
    assert trusted_positions(logits, draft) == 4  # the three guesses kept, then token 6 from the last position


def test_trust_ends_at_the_first_wrong_guess_whose_position_still_gives_the_next_token():
    logits = logits_with([(3, 1.0), (7, 1.0), (5, 1.0), (6, 1.0)])
    assert trusted_positions(logits, [3, 4, 5]) == 2  # 3 kept, then 7 (greedy's choice, not the guess 4)


def test_an_unclear_choice_is_never_trusted_however_it_compares_with_the_guess():
    just_under = MARGIN / 2
    assert trusted_positions(logits_with([(3, just_under), (4, 1.0)]), [3]) == 0  # a one-token pass must decide
    # the guess 4 is greedy's choice but by a hair: keep 3, and let position 1 (whose choice is 4) go on
    assert trusted_positions(logits_with([(3, 1.0), (4, 1.0), (5, just_under)]), [3, 4]) == 2
