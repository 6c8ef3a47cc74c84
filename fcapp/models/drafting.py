"""Prompt-lookup drafting for one greedy row: guess the next tokens from the row's own context, check
them all in one pass, keep what greedy decoding would have produced.

An agent's replies copy a lot from their prompt: a conclusion's formula into `check`, a problem's
numbers into `calculator`, a function's name and its argument names. When the last `TAIL` tokens of
the context occurred earlier in it, the tokens that followed them then are a cheap guess of what
follows now (`lookup_draft`). The decode loop feeds the row's last token and the guess in one pass and
keeps the guessed tokens that greedy decoding picks at each position (`trusted_positions`). On the
2-core CPU a pass of 7 tokens costs ~1.8 one-token passes (fp32): up to 7 tokens for that when the
guess is right, one when it is wrong.

A pass over several tokens rounds differently from one-token passes (its matmuls have more rows),
so a token is kept only where the greedy choice is clear: its logit leads the runner-up by
`MARGIN`, far more than any rounding difference (~1e-5 in float32). The chain is then the one
one-token passes make, as with the thread count, whose rounding moves logits as much.
"""

from __future__ import annotations

import torch

MARGIN = 1e-2  # a kept token's logit leads the runner-up by at least this much


TAIL = 3  # tokens of context that must recur for a guess (measured: 2 guesses often, wrongly, on GSM8K)


def lookup_draft(context: list[int], most: int) -> list[int]:
    """Up to `most` tokens that followed the latest earlier occurrence of the context's last `TAIL`
    tokens; [] when they never occurred before."""
    tail = context[-TAIL:]
    for start in range(len(context) - TAIL - 1, -1, -1):
        if context[start:start + TAIL] == tail:
            return context[start + TAIL:start + TAIL + most]
    return []


def trusted_positions(logits: torch.Tensor, draft: list[int]) -> int:
    """How many leading positions of a checking pass to trust: logits [len(draft) + 1, vocab] after the
    row's last token and after each drafted token. Positions are trusted in order while their greedy
    choice is clear and, before the last one, is the drafted token. With t trusted, draft[:t - 1] is
    what one-token passes would have produced and logits[t - 1] gives the token after it; with 0 even
    the first choice is unclear and a one-token pass must decide."""
    top = logits.float().topk(2, dim=-1)
    clear = (top.values[:, 0] - top.values[:, 1] >= MARGIN).tolist()
    best = top.indices[:, 0].tolist()
    trusted = 0
    for i, is_clear in enumerate(clear):
        if not is_clear:
            break
        trusted = i + 1
        if i == len(draft) or best[i] != draft[i]:
            break
    return trusted
