"""Continuous batching of chains: a row whose reply ended goes on with its chain's next prompt at once,
finished chains are yielded at once and their slots taken by the next job, a stop request ends the
run, and a failed model fails only the chains it held. (The real model's equivalence is in
test_perf_equivalence.)"""

from __future__ import annotations

import threading

import pytest

from fcapp.batching import iter_solve_batch, solve_batch
from fcapp.models.base import Completion
from fcapp.solve import SolveConfig
from fcapp.tasks import get_task


class ScriptedContinuousModel:
    """Types each slot's reply one character per step, like the local model's decode steps. A chain's
    first reply is a calculator call that grows with the chain's seed (so replies end at different
    steps), its second the final answer. `starts` logs (step, slot, seed, chain step) as slots take
    prompts; `running` the slots decoding at each step."""

    model_id = "scripted"

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.fail_at_step = fail_at_step
        self.step = 0
        self.starts: list[tuple[int, int, int, int]] = []
        self.running: list[list[int]] = []
        self.closed = 0

    def reply(self, slot: int, request) -> list:
        _, params = request
        seed, index = divmod(params.seed, 1000)
        self.starts.append((self.step, slot, seed, index))
        text = f'calculator(expression="2+3{"+0" * seed}")' if index == 0 else 'final_answer(answer="5")'
        return [text + " and then some chatter", ""]

    def generate_continuous(self, requests, slots, stop_when=None):
        rows = {}
        while len(rows) < slots and (request := requests(len(rows), None)) is not None:
            rows[len(rows)] = self.reply(len(rows), request)
        try:
            while rows:
                self.step += 1
                if self.step == self.fail_at_step:
                    raise RuntimeError("the model fell over")
                self.running.append(sorted(rows))
                for slot, row in list(rows.items()):
                    row[1] += row[0][len(row[1])]
                    if row[1] == row[0] or (stop_when and stop_when(slot, row[1])):
                        request = requests(slot, Completion(row[1], 10, len(row[1])))
                        if request is None:
                            del rows[slot]
                        else:
                            rows[slot] = self.reply(slot, request)
                yield
        finally:
            self.closed += 1


def jobs(n: int) -> list:
    task = get_task("gsm8k")
    return [(p, SolveConfig(max_steps=4, seed=k)) for k, p in enumerate(task.split("train")[:n])]


def test_a_row_goes_on_with_its_next_prompt_while_the_others_still_decode():
    model = ScriptedContinuousModel()
    chains = solve_batch(get_task("gsm8k"), jobs(2), model, batch_size=2)
    assert all(c.stop_reason == "answer" and c.answer == "5" for c in chains)
    assert [s.text for s in chains[0].steps] == ['calculator(expression="2+3")', 'final_answer(answer="5")']
    assert chains[1].steps[0].text == 'calculator(expression="2+3+0")' and chains[1].steps[0].result == "5"
    first_step = {(seed, index): step for step, _, seed, index in model.starts}
    assert first_step[(0, 1)] == 28 and first_step[(1, 1)] == 30  # each at the end of its own reply
    assert all(running == [0, 1] for running in model.running[:52])  # no slot idled waiting for the other


def test_a_finished_chain_frees_its_slot_for_the_next_job_at_once():
    model = ScriptedContinuousModel()
    outcomes = list(iter_solve_batch(get_task("gsm8k"), jobs(5), model, batch_size=2))
    assert sorted(index for index, _ in outcomes) == [0, 1, 2, 3, 4]
    assert all(chain.stop_reason == "answer" and len(chain.steps) == 2 for _, chain in outcomes)
    assert [index for index, _ in outcomes][:2] == [0, 1]  # yielded in the order they finished
    job2 = next(step for step, _, seed, index in model.starts if (seed, index) == (2, 0))
    assert job2 == 52 and model.running[job2] == [0, 1]  # chain 1 still decoding beside it
    assert model.closed == 1


def test_a_stop_request_ends_decoding_and_drops_unfinished_chains():
    stop = threading.Event()
    model = ScriptedContinuousModel()
    seen = []
    for index, chain in iter_solve_batch(get_task("gsm8k"), jobs(6), model, batch_size=2, stop=stop):
        seen.append(index)
        stop.set()
    assert seen == [0]  # chain 1 was mid-reply: dropped
    assert model.closed == 1 and model.step == 52
    assert {seed for _, _, seed, _ in model.starts} == {0, 1, 2}  # job 2 took chain 0's slot, then was dropped


@pytest.mark.parametrize("fail_at_step", [3, 53])
def test_a_failed_model_fails_the_chains_it_held_and_the_run_goes_on(fail_at_step):
    model = ScriptedContinuousModel(fail_at_step)
    outcomes = dict(iter_solve_batch(get_task("gsm8k"), jobs(4), model, batch_size=2))
    failed = sorted(index for index, outcome in outcomes.items() if isinstance(outcome, RuntimeError))
    assert failed == ([0, 1] if fail_at_step == 3 else [1, 2])  # at step 53 chain 0 was done, job 2 had its slot
    assert all(outcomes[i].stop_reason == "answer" for i in range(4) if i not in failed)
    assert len(outcomes) == 4 and model.closed == 2
