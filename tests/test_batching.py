"""Lockstep batches of chains: every round's prompts go to one generate_batch call, finished chains are
yielded at once and their slots refilled, a stop request ends the run between rounds, and a failed
batch call fails only the chains it held. (The real model's equivalence is in test_perf_equivalence.)"""

from __future__ import annotations

import threading

from fcapp.batching import iter_solve_batch, solve_batch
from fcapp.models.base import Completion, Message, SamplingParams
from fcapp.solve import SolveConfig
from fcapp.tasks import get_task

REPLIES = ['calculator(expression="2+3") and then some chatter', 'final_answer(answer="5")']


class ScriptedBatchModel:
    """Answers each conversation by how many replies it already holds; streams each reply character
    by character so that stop_when can end it, like the local model does."""

    model_id = "scripted"

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[int] = []  # rows per call
        self.fail_on_call = fail_on_call

    def generate_batch(self, conversations: list[list[Message]], params: list[SamplingParams],
                       stop_when=None) -> list[Completion]:
        self.calls.append(len(conversations))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("the model fell over")
        out = []
        for row, messages in enumerate(conversations):
            question = max(i for i, m in enumerate(messages) if m["role"] == "user")  # after the demo
            reply = REPLIES[min(sum(m["role"] == "assistant" for m in messages[question:]), 1)]
            text = ""
            for char in reply:
                text += char
                if stop_when and stop_when(row, text):
                    break
            out.append(Completion(text, 10, len(text)))
        return out


def jobs(n: int) -> list:
    task = get_task("gsm8k")
    return [(p, SolveConfig(max_steps=4, seed=k)) for k, p in enumerate(task.split("train")[:n])]


def test_chains_advance_in_lockstep_and_finished_slots_are_refilled():
    model = ScriptedBatchModel()
    chains = solve_batch(get_task("gsm8k"), jobs(5), model, batch_size=2)
    assert model.calls == [2, 2, 2, 2, 1, 1]  # two rounds per pair of chains, then the fifth alone
    assert all(c.stop_reason == "answer" and c.answer == "5" for c in chains)
    assert [s.text for s in chains[0].steps] == ['calculator(expression="2+3")', 'final_answer(answer="5")']
    assert chains[0].steps[0].result == "5"


def test_a_stop_request_ends_the_run_between_rounds_and_drops_unfinished_chains():
    stop = threading.Event()
    model = ScriptedBatchModel()
    seen = []
    for index, chain in iter_solve_batch(get_task("gsm8k"), jobs(6), model, batch_size=2, stop=stop):
        seen.append(index)
        stop.set()
    assert seen == [0, 1]  # both chains of the round that finished are yielded, nothing after
    assert model.calls == [2, 2]


def test_a_failed_batch_call_fails_the_chains_it_held_and_the_run_goes_on():
    model = ScriptedBatchModel(fail_on_call=1)
    outcomes = dict(iter_solve_batch(get_task("gsm8k"), jobs(3), model, batch_size=2))
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError)
    assert outcomes[2].stop_reason == "answer"
