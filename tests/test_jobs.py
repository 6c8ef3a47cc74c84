"""Background jobs of the app process: one model slot taken in turns, one active job per kind, and a stop that
ends a job cleanly, also one still waiting for the slot. (The generation and evaluation jobs themselves run
with the real model in tests/test_ui_browser.py.)"""

from __future__ import annotations

import threading
import time

import pytest

from fcapp import jobs


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_model_slot_is_taken_in_turns_and_says_who_holds_it():
    slot = jobs.ModelSlot()
    assert slot.take("Solve gsm8k-0") and slot.holder().startswith("Solve gsm8k-0 (")
    assert not slot.take("Compare", timeout=0.05)
    released = threading.Thread(target=slot.release)  # a streaming handler may give it back from another thread
    released.start()
    released.join()
    assert slot.holder() is None and slot.take("Compare", timeout=0.05)
    slot.release()


def test_one_active_job_per_kind_and_a_stop_while_waiting_for_the_slot():
    gate = threading.Event()

    def work(job: jobs.Job) -> tuple[str, object]:
        with jobs.SLOT.held("a test job", job.stop_event):
            job.progress(1, 2, "one of two")
            gate.wait(10)
        return "finished: two of two", {"done": 2}

    first = jobs.start("test-kind", "first", {}, work, who="ann")
    wait_until(lambda: first.status == "running")
    assert first.note == "one of two" and jobs.latest("test-kind") is first
    with pytest.raises(RuntimeError, match="a test-kind job is already running .* started by ann"):
        jobs.start("test-kind", "second", {}, work)

    waiting = jobs.start("other-kind", "waits for the slot", {}, work)
    wait_until(lambda: jobs.SLOT.holder() is not None)
    assert waiting.status == "waiting"
    waiting.stop()
    wait_until(lambda: not waiting.active)
    assert waiting.status == "stopped" and "waiting for the model" in waiting.note

    gate.set()
    wait_until(lambda: not first.active)
    assert first.status == "finished" and first.result == {"done": 2} and jobs.SLOT.holder() is None
