"""The speed-ups change no result: with greedy decoding (and with seeded sampling) a chain is the same
with the prefix cache on or off, and solved in a continuous batch (rows of different lengths, padded,
each going on with its next prompt or the next job the moment its reply ends) or alone, and decoded by the
hand-written one-token pass or by transformers' forward (those two agree to the bit).

Logits are not bit-identical between these paths: MKL's fp32 matmul sums in an order that depends on
how many rows it multiplies (a batch of 8, a prompt of 500 tokens, or one token), so values differ in
the last bits. The chains, what the speed-ups must preserve, are identical."""

from __future__ import annotations

import pytest
import torch

from fcapp.batching import solve_batch
from fcapp.models.base import Completion, Message, SamplingParams
from fcapp.records import Chain
from fcapp.solve import SolveConfig, solve
from fcapp.tasks import get_task

GREEDY = SolveConfig(max_steps=3, max_new_tokens=32)


def record(chain: Chain) -> tuple:
    """Everything a chain holds except its timings."""
    steps = [(s.text, s.call and (s.call.name, s.call.arguments), s.result, s.error, s.prompt_tokens,
              s.completion_tokens) for s in chain.steps]
    return steps, chain.answer, chain.stop_reason, chain.verdict


def test_the_prefix_cache_changes_no_chain_and_saves_most_of_the_encoding(small_model):
    task = get_task("gsm8k")
    problems = [task.get("gsm8k-1"), task.get("gsm8k-6")]  # 2 valid calls; 3 steps with errors fed back
    small_model.prefix_cache = False
    try:
        off = [solve(task, p, small_model, GREEDY) for p in problems]
    finally:
        small_model.prefix_cache = True
    before = (small_model.stats.prompt_tokens, small_model.stats.encoded_tokens)
    on = [solve(task, p, small_model, GREEDY) for p in problems]
    prompt, encoded = (small_model.stats.prompt_tokens - before[0], small_model.stats.encoded_tokens - before[1])

    assert [record(c) for c in on] == [record(c) for c in off]
    assert [len(c.steps) for c in on] == [2, 3]
    assert encoded < 0.3 * prompt, "each step should encode only what is new since the last one"


def test_batched_chains_equal_chains_solved_one_at_a_time(small_model):
    task = get_task("gsm8k")
    greedy = [(task.get("gsm8k-1"), SolveConfig(3, max_new_tokens=32, seed=k)) for k in range(2)]
    mixed = [(task.get(pid), GREEDY) for pid in ("gsm8k-6", "gsm8k-48")]
    sampled = [(task.get("gsm8k-46"), SolveConfig(2, 0.8, 0.95, 32, seed=k)) for k in range(3)]
    jobs = greedy + mixed + sampled

    alone = [solve(task, problem, small_model, config) for problem, config in jobs]
    batched = solve_batch(task, jobs, small_model, batch_size=4)  # finished chains' slots are refilled

    assert [record(c) for c in batched] == [record(c) for c in alone]
    assert len({str(record(c)) for c in batched[-3:]}) > 1, "sampled chains should differ by seed"


def test_continuous_batching_equals_decoding_alone_and_can_stop_mid_decode(small_model):
    """Rows ending at different times go on with a follow-up in their own cached row, the third
    conversation takes the first freed slot, and every reply equals the one decoded alone."""
    questions = ("What is 2+2?", "Name a colour.", "Say hi.")
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 6)]

    def messages(k: int, replies: list[str]) -> list[Message]:
        first: list[Message] = [{"role": "user", "content": questions[k]}]
        if not replies:
            return first
        return first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Again."}]

    alone: dict[int, list[str]] = {}
    for k in range(3):
        alone[k] = [small_model.generate_batch([messages(k, [])], [params[k]])[0].text]
        alone[k].append(small_model.generate_batch([messages(k, alone[k])], [params[k]])[0].text)

    queue, held, replies = [0, 1, 2], {}, {k: [] for k in range(3)}
    started: list[tuple[int, int]] = []  # (slot, conversation) as slots take them

    def requests(slot: int, reply: Completion | None) -> tuple[list[Message], SamplingParams] | None:
        if reply is not None:
            replies[held[slot]].append(reply.text)
            if len(replies[held[slot]]) == 2:
                del held[slot]
        if slot not in held:
            if not queue:
                return None
            held[slot] = queue.pop(0)
        started.append((slot, held[slot]))
        return messages(held[slot], replies[held[slot]]), params[held[slot]]

    list(small_model.generate_continuous(requests, slots=2))
    assert replies == alone
    assert started[:4] == [(0, 0), (1, 1), (0, 0), (0, 2)]  # conversation 2 took slot 0 while 1 decoded

    queue, held, replies = [0, 1, 2], {}, {k: [] for k in range(3)}
    steps = small_model.generate_continuous(requests, slots=2)
    for _ in range(5):  # conversation 0 is on its follow-up
        next(steps)
    steps.close()
    assert small_model.generate_batch([messages(1, [])], [params[1]])[0].text == alone[1][0]


def test_decoding_on_two_threads_gives_the_same_chains_as_on_one():
    """Two threads take the split-reduction matmul (`_few_rows_forward`); one thread the plain one."""
    from fcapp.models.local import LocalModel

    task = get_task("gsm8k")
    problems = [task.get("gsm8k-1"), task.get("gsm8k-6")]
    chains = {}
    for threads in (1, 2):
        model = LocalModel(threads=threads)
        chains[threads] = [record(solve(task, p, model, GREEDY)) for p in problems]
    assert chains[1] == chains[2]


def test_a_stream_resumed_on_a_new_thread_at_every_token_gives_the_same_reply(small_model):
    """Gradio resumes a streaming generator on whichever pool thread is free: each decode step must run under
    inference mode on its own thread (a mode entered once around the yields stays on the first thread, and
    the KV cache's in-place updates then fail on the next)."""
    from concurrent.futures import ThreadPoolExecutor

    messages: list[Message] = [{"role": "user", "content": "Name three colours."}]
    params = SamplingParams(max_new_tokens=10)
    expected = "".join(chunk.text for chunk in small_model.stream(messages, params=params))
    stream = small_model.stream(messages, params=params)
    pieces = []
    while True:
        with ThreadPoolExecutor(1) as pool:  # a new thread for every token
            chunk = pool.submit(next, stream, None).result()
        if chunk is None:
            break
        pieces.append(chunk.text)
    assert "".join(pieces) == expected and len(pieces) > 3


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_the_hand_written_decode_pass_gives_the_logits_of_transformers_forward_to_the_bit(small_model, precision):
    """One row (no mask) and three rows of different lengths (masked holes), two decode passes each: the
    pass of `llama_step` and transformers' own forward give identical logits and identical caches (when
    quantised, q/k/v and gate/up quantised together, one matmul in the hand-written pass, three and two
    in transformers')."""
    from fcapp.models.kv_cache import KVState
    from fcapp.models.local import LocalModel

    model = small_model if precision == "fp32" else LocalModel(f"smollm2@{precision}")
    prompts = [model.encode([{"role": "user", "content": text}]) for text in ("Add 2 and 3.", "Hi", "Name a prime.")]
    for batch in (prompts[:1], prompts):
        states = {}
        for hand_written in (True, False):
            state = KVState(len(model.model.model.layers), rows=len(batch))
            with torch.inference_mode():
                state.feed(model.model, batch, model.pad_id)
                nexts = [[11], [12], [13]][:len(batch)]
                first = state.feed(model.model, nexts, model.pad_id, hand_written)
                second = state.feed(model.model, [[t] for t in first.argmax(-1).tolist()], model.pad_id, hand_written)
            states[hand_written] = (first, second, state)
        (first, second, mine), (their_first, their_second, theirs) = states[True], states[False]
        assert torch.equal(first, their_first) and torch.equal(second, their_second)
        assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(mine.cache.layers, theirs.cache.layers))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_decode_layers_run_in_torchscript_with_the_bits_of_the_python_loop(small_model, precision, monkeypatch):
    """The hand-written pass runs its layers' loop compiled by TorchScript (no silent fall-back to Python
    on this PyTorch), and it computes what the same loop run by Python does, to the bit: one row, a
    drafted run of four tokens, and three rows sharing a 70-token prompt (shared columns read once)."""
    from fcapp.models import llama_step
    from fcapp.models.kv_cache import KVState
    from fcapp.models.local import LocalModel

    model = small_model if precision == "fp32" else LocalModel(f"smollm2@{precision}")
    assert isinstance(llama_step._stack_of(model.model)[1], torch.jit.ScriptModule)
    trunk = [1 + i % 60 for i in range(70)]

    def passes() -> list[torch.Tensor]:
        one, rows = KVState(model._layers, rows=1), KVState(model._layers, rows=1)
        with torch.inference_mode():
            one.feed(model.model, [trunk], model.pad_id)
            rows.feed(model.model, [trunk], model.pad_id)
            rows = rows.rows([0, 0, 0], [70, 70, 66])
            return [one.feed(model.model, [[5]], model.pad_id), one.feed(model.model, [[6, 7, 8, 9]], model.pad_id, every=True),
                    rows.feed(model.model, [[5], [6], [7]], model.pad_id), rows.feed(model.model, [[8], [9], [10]], model.pad_id)]

    scripted = passes()
    monkeypatch.setattr(llama_step, "SCRIPTED", False)
    assert all(torch.equal(a, b) for a, b in zip(scripted, passes()))


def test_the_scripted_decode_layers_see_weights_changed_in_place(small_model, monkeypatch):
    """The scripted layers hold the model's Parameters, not copies: a training step that updates a
    weight in place (GRPO's policy decodes between steps) changes the next pass as it changes the
    Python loop's."""
    from fcapp.models import llama_step
    from fcapp.models.kv_cache import KVState

    def next_logits() -> torch.Tensor:
        state = KVState(small_model._layers, rows=1)
        with torch.inference_mode():
            state.feed(small_model.model, [[1, 2, 3]], small_model.pad_id)
            return state.feed(small_model.model, [[5]], small_model.pad_id)

    weight = small_model.model.model.layers[3].mlp.down_proj.weight
    original = weight.detach().clone()
    before = next_logits()
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        scripted = next_logits()
        monkeypatch.setattr(llama_step, "SCRIPTED", False)
        in_python = next_logits()
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert not torch.equal(before, scripted) and torch.equal(scripted, in_python)


def test_the_hand_written_decode_pass_changes_no_chain(small_model):
    task = get_task("gsm8k")
    problems = [task.get("gsm8k-1"), task.get("gsm8k-6")]
    small_model.hand_written_decode = False
    try:
        theirs = [record(solve(task, p, small_model, GREEDY)) for p in problems]
    finally:
        small_model.hand_written_decode = True
    assert [record(solve(task, p, small_model, GREEDY)) for p in problems] == theirs


def test_drafted_runs_change_no_chain_and_take_fewer_passes(small_model):
    """A lone greedy row checks prompt-lookup guesses of its next tokens in one pass (a FOL reply copies
    the conclusion's formula into `check`) and keeps only greedy decoding's own clear choices, so its
    chains are those of one-token passes, made in fewer passes."""
    from fcapp.models.local import DRAFT_TOKENS

    fol, gsm8k = get_task("fol"), get_task("gsm8k")
    jobs = [(fol, fol.problems()[0]), (fol, fol.problems()[1]), (gsm8k, gsm8k.get("gsm8k-1"))]
    stats = small_model.stats

    def solved() -> tuple[list[tuple], int]:
        small_model.clear_cache()
        passes = stats.decode_steps
        chains = [record(solve(task, problem, small_model, GREEDY)) for task, problem in jobs]
        return chains, stats.decode_steps - passes

    small_model.draft_tokens = 0
    try:
        one_token, one_token_passes = solved()
    finally:
        small_model.draft_tokens = DRAFT_TOKENS
    kept = stats.kept_drafts
    drafted, drafted_passes = solved()

    assert drafted == one_token
    assert stats.kept_drafts > kept
    assert drafted_passes < one_token_passes


def test_a_lone_row_with_holes_decodes_one_token_a_pass_as_it_would_alone(small_model):
    """A slot whose long reply is replaced by a slightly shorter conversation keeps the old columns on
    its right as masked holes (repacked only past a quarter wasted); a drafted run's pass has no mask,
    so that row decodes one token a pass, and its reply is the one it has alone."""
    greedy = SamplingParams(max_new_tokens=24)
    long_one = [{"role": "user", "content": "Repeat after me: one two three, one two three, one two three."}]
    shorter = [{"role": "user", "content": "Repeat after me: one two three, one two three."}]
    alone = small_model.generate_batch([shorter], [greedy])[0].text
    queue, replies = [long_one, shorter], []

    def requests(slot: int, reply: Completion | None) -> tuple[list[Message], SamplingParams] | None:
        if reply is not None:
            replies.append(reply.text)
        return (queue.pop(0), greedy) if queue else None

    small_model.clear_cache()
    list(small_model.generate_continuous(requests, slots=1))
    assert replies[1] == alone
