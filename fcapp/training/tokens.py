"""A chain as the model reads it: prompt tokens, completion tokens, and which completion tokens are
the model's own (its replies and the end-of-turn token after each) rather than tool results and chat
scaffolding. SFT trains on those tokens only; GRPO scores only them (TRL's env_mask).

The tokens are those of the chat-templated text, tokenized as `LocalModel.encode` does, so a trained
model sees exactly what it will see when it runs the agent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fcapp.records import Message


@dataclass
class ChainTokens:
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]  # 1: a token the model wrote (trained on), 0: tool result / scaffolding

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def assistant_masks(self) -> list[int]:
        """The mask over prompt + completion (SFTTrainer's `assistant_masks` column)."""
        return [0] * len(self.prompt_ids) + self.completion_mask


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": str(m["content"])} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


@functools.lru_cache(maxsize=8)
def _end_token(tokenizer: Any) -> str:
    """The token that closes a turn (once per tokenizer: its vocabulary is a fresh 49k-entry dict each call)."""
    return "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")


def tokenize_chain(tokenizer: Any, prompt: list[Message], completion: list[Message]) -> ChainTokens:
    """Tokens of prompt + completion with the model's own tokens marked: each assistant message's content
    and the end-of-turn token that closes it (so the model learns to stop after its call)."""
    prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    spans = []
    stop = _end_token(tokenizer)
    for i, message in enumerate(completion):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, prompt + completion[:i], generation_prompt=True))
        end = len(_render(tokenizer, prompt + completion[:i + 1], generation_prompt=False))
        closing = _render(tokenizer, prompt + completion[:i + 1], generation_prompt=False).rfind(stop, start, end)
        spans.append((start, closing + len(stop) if stop and closing >= 0 else end))
    text = _render(tokenizer, prompt + completion, generation_prompt=False)
    if not text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside the whole conversation")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    split = next((k for k, (begin, _) in enumerate(offsets) if begin >= len(prompt_text)), len(ids))
    end = len(ids)
    while end > split and not text[offsets[end - 1][0]:offsets[end - 1][1]].strip():
        end -= 1  # the newline after the last end-of-turn token: the conversation ends at that token
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in offsets[split:end]]
    return ChainTokens(ids[:split], ids[split:end], mask)
