"""The speed-ups change no result: with greedy decoding (and with seeded sampling) a chain is the same
with the prefix cache on or off, and solved in a lockstep batch (rows of different lengths, padded,
refilled as chains finish) or alone.

Logits are not bit-identical between these paths: MKL's fp32 matmul sums in an order that depends on
how many rows it multiplies (a batch of 8, a prompt of 500 tokens, or one token), so values differ in
the last bits. The chains, what the speed-ups must preserve, are identical."""

from __future__ import annotations

from fcapp.agent import Chain
from fcapp.batching import solve_batch
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
