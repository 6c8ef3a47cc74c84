"""The real app in a subprocess, driven by Debian's Chromium through Playwright (never `playwright install`).

One app for the module, started on a free port over an empty temporary store: the tests run in file order
and build on each other, as a new user would. The overview leads to a first generated chain, a generation
job is followed again after a reload and stopped; then the store is seeded with real GSM8K chains (reference
chains, and wrong chains replayed from wrong calls) so that curation has data. A function is added and
deleted twice, problems are solved and stopped, chains are labelled in a queue, in bulk and blind A/B, an
exported pair file is imported and a tiny DPO run trains on it (the page is reloaded while it runs), GRPO
trains, and the tuned model is compared with the base side by side. Each test saves its tab to
assets/screenshots/, the first ones with an empty store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "assets" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
TUNED = "tiny-dpo"
SOLVE_PROBLEM = "gsm8k-0"  # the demonstration's problem: the embedded model answers it with a call

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install chromium")
expect = playwright_api.expect
expect.set_options(timeout=20_000)  # a page's load events share two cores with the model and training workers


# ---- fast checks of the launcher (no browser) ------------------------------------------------------------
def test_launch_refuses_a_public_host_without_auth():
    from fcapp.ui.app import is_loopback, launch, parse_auth

    with pytest.raises(ValueError, match="--auth"):
        launch(host="0.0.0.0", port=0)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert parse_auth("ann:s3cret:x") == ("ann", "s3cret:x")
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(ValueError):
            parse_auth(bad)


# ---- the app ----------------------------------------------------------------------------------------------
def seed(db: Path) -> dict[str, list[int]]:
    """Four problems with a reference chain and a wrong chain (pairs), then two with two wrong chains."""
    from helpers import correct_chain, wrong_chain

    from fcapp.store import Store
    from fcapp.tasks import get_task

    task = get_task("gsm8k")
    problems = [p for p in task.split("train") if p.id != SOLVE_PROBLEM and task.reference_calls(p)][:6]
    ids: dict[str, list[int]] = {}
    with Store(db) as store:
        store.add_problems(problems)
        for problem in problems[:4]:
            reference = correct_chain("gsm8k", problem.id)
            wrong = wrong_chain("gsm8k", problem.id, "-1", "replayed-wrong")
            ids[problem.id] = [store.add_chain(reference, True, role="reference"),
                               store.add_chain(wrong, wrong.verdict, role="teacher")]
        for problem in problems[4:]:
            for k, answer in enumerate(["-1", "-2"]):
                wrong = wrong_chain("gsm8k", problem.id, answer, f"replayed-wrong-{k}")
                ids.setdefault(problem.id, []).append(store.add_chain(wrong, False, role="teacher"))
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    home = tmp_path_factory.mktemp("app-home")
    db = home / "app.db"
    port = _free_port()
    env = dict(os.environ, FCAPP_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))  # this checkout's fcapp, whatever is installed
    imported = subprocess.run([sys.executable, "-c", "import fcapp; print(fcapp.__file__)"], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
    assert Path(imported).is_relative_to(ROOT), f"the app would run {imported}, not this checkout"
    log = (home / "app.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "fcapp", "app", "--port", str(port), "--db", str(db)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{(home / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the app did not serve within 180 s")
        time.sleep(0.5)
    yield {"url": url, "home": home, "db": db}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()
    _end_training_workers(home)


def _end_training_workers(home: Path) -> None:
    """A training worker this module's app started and that is still going (a failed test) is ended."""
    import json

    for status in (home / "models").glob("*/status.json"):
        info = json.loads(status.read_text())
        if info.get("status") not in ("finished", "stopped", "failed") and info.get("pid"):
            try:
                os.killpg(info["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def seeded(app) -> dict[str, list[int]]:
    """The running app's store, seeded with chains to curate (after the empty-store tests)."""
    return seed(app["db"])


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(app, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(app["url"])
    page.wait_for_selector("#ov-stages")
    yield page
    page.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id: str, value: str) -> None:
    """A number box, or a slider's number box. Typed again if the value did not stick: a box that
    Gradio re-renders right after it appears (an accordion just opened, the page's load events
    finishing) can drop what was typed into it a moment before (seen once in CI: it stayed 0)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    for _ in range(3):
        box.fill(value)
        box.press("Enter")
        try:
            expect(box).to_have_value(value, timeout=2_000)
            return
        except AssertionError:
            page.wait_for_timeout(500)
    expect(box).to_have_value(value)


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a dropdown by typing it."""
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Enter")
    expect(box).to_have_value(value)


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect(page.locator("#busy")).to_contain_text("model free", timeout=10_000)  # the header caught up
    page.wait_for_timeout(500)  # let the last update paint
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def expect_pair_count(page, value: int) -> None:
    expect(page.locator("#curate-pairs")).to_contain_text(f"Problems that can give a pair: {value} ", timeout=15_000)


def no_spinner(chat) -> None:
    """No step of the chat is drawn as still being written."""
    expect(chat.locator(".loading-spinner")).to_have_count(0)
    expect(chat).not_to_contain_text("writing…")


def open_chain(page, chain_id: int) -> None:
    cell = page.locator("#cur-table [role=gridcell][data-col='0']").filter(has_text=re.compile(rf"^\s*{chain_id}\s*$"))
    cell.first.click()
    expect(page.locator("#cur-chain-info")).to_contain_text(f"Chain {chain_id} ")


def progress_done(page) -> int:
    return int(page.locator("#gen-progress-inner").get_attribute("data-done"))


# ---- an empty store: the first run --------------------------------------------------------------------------
def test_overview_with_an_empty_store_leads_to_a_first_chain(page, app):
    expect(page.locator("#ov-chains")).to_have_attribute("data-n", "0")
    expect(page.locator("#ov-next-text")).to_contain_text("No chains yet")
    screenshot(page, "overview-empty")

    open_tab(page, "Curate")  # every empty view says what to do next, and offers it
    expect(page.locator("#cur-empty")).to_be_visible()
    page.get_by_text("Preference dataset").click()
    page.click("#cur-export")
    expect(page.locator("#cur-export-note")).to_contain_text("Nothing to export yet")
    expect(page.locator("#cur-export-file")).not_to_contain_text(".jsonl")  # no empty file is offered
    screenshot(page, "curate-empty")
    open_tab(page, "Train")
    expect(page.locator("#train-empty")).to_contain_text("Nothing to train on yet for gsm8k")
    page.click("#train-start")
    expect(page.locator("#train-note")).to_contain_text("✗ Not started: no preference pairs for gsm8k yet")
    screenshot(page, "train-empty")
    open_tab(page, "Compare")
    expect(page.locator("#cmp-empty")).to_contain_text("No tuned model yet")
    screenshot(page, "compare-empty")

    open_tab(page, "Overview")
    page.click("#ov-next")  # "Generate chains →" opens the Generate tab on the overview's task
    expect(page.locator("#gen-start")).to_be_visible()
    expect(page.locator("#gen-task input")).to_have_value("gsm8k")
    screenshot(page, "generate-empty")
    for elem_id, value in (("gen-samples", "1"), ("gen-limit", "1"), ("gen-max-steps", "2"), ("gen-max-new", "40")):
        set_number(page, elem_id, value)
    page.click("#gen-start")
    progress = page.locator("#gen-progress-inner")
    expect(progress).to_have_attribute("data-status", "finished", timeout=300_000)
    expect(progress).to_contain_text("finished: 1 new chains")
    expect(page.locator("#gen-table")).to_contain_text("gsm8k-")

    open_tab(page, "Overview")  # the counts followed the job: no reload, no Refresh
    expect(page.locator("#ov-chains")).to_have_attribute("data-n", "2")  # the teacher's chain and the reference chain
    expect(page.locator("#ov-next-text")).not_to_contain_text("No chains yet")
    open_tab(page, "Curate")  # its table was drawn empty at page load and follows the store
    expect(page.locator("#cur-empty")).to_be_hidden()
    expect(page.locator("#cur-table")).to_contain_text("smollm2")
    expect(page.locator("#cur-table")).to_contain_text("reference")


def test_a_generation_job_is_followed_after_a_reload_and_stops_cleanly(page, app):
    from fcapp.store import Store

    open_tab(page, "Generate")
    choose(page, "gen-task", "fol")
    for elem_id, value in (("gen-samples", "2"), ("gen-limit", "0"), ("gen-max-steps", "2"), ("gen-max-new", "40")):
        set_number(page, elem_id, value)
    page.locator("#gen-reference input").uncheck()
    page.click("#gen-start")
    progress = page.locator("#gen-progress-inner")
    expect(progress).to_have_attribute("data-done", re.compile(r"^[1-9]"), timeout=300_000)

    page.reload()  # the job belongs to the server: the new page finds it and follows it
    page.wait_for_selector("#ov-stages")
    open_tab(page, "Generate")
    expect(page.locator("#gen-status")).to_contain_text("Reattached to the running generation")
    expect(progress).to_have_attribute("data-status", "running")
    expect(page.locator("#gen-task input")).to_have_value("fol")  # the running job's settings
    seen = progress_done(page)
    expect(progress).not_to_have_attribute("data-done", str(seen), timeout=120_000)  # still counting up

    page.click("#gen-stop")
    expect(progress).to_have_attribute("data-status", "stopped", timeout=120_000)
    expect(progress).to_contain_text("every finished chain is stored")
    stored = int(re.search(r"stopped: (\d+) new chains", progress.inner_text()).group(1))
    with Store(app["db"]) as store:
        assert store.counts("fol")["chains"] == stored > 0
    expect(page.locator("#gen-curate")).to_be_visible()
    screenshot(page, "generate")


# ---- functions and live solving ------------------------------------------------------------------------------
TRIPLE = '''def triple(x: int) -> int:
    """Multiply a whole number by three.

    Args:
        x: the number to multiply
    """
    return 3 * x
'''


def type_source(page, source: str) -> None:
    editor = page.locator("#fn-source .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(source)  # one input event: no auto-indent from the editor


def test_functions_add_try_call_and_delete_twice(page, app):
    open_tab(page, "Functions")
    expect(page.locator("#fn-sandbox")).to_contain_text("User functions run in an OS sandbox")
    note = page.locator("#fn-note")
    type_source(page, "def broken(x):\n    '''Returns x.'''\n    return x\n")
    page.click("#fn-save")
    expect(note).to_contain_text("Not saved")
    expect(note).to_contain_text("needs a type hint")

    type_source(page, TRIPLE)
    page.locator("#fn-examples textarea").fill('[{"x": 4}]')
    page.click("#fn-save")
    expect(note).to_contain_text("Saved triple")
    expect(page.locator("#fn-table")).to_contain_text("triple(x: integer)")
    assert (app["home"] / "user_tools" / "triple.json").exists()  # persisted for the next start

    expect(page.locator("#fn-try-name input")).to_have_value("triple")
    expect(page.locator("#fn-try-args textarea")).to_have_value('{"x": 4}')
    page.locator("#fn-try-args textarea").fill('{"x": 14}')
    page.click("#fn-try-call")
    expect(page.locator("#fn-try-result")).to_contain_text("triple(x=14) → 42")

    page.locator("#fn-try-args textarea").fill('{"x": "many"}')
    page.click("#fn-try-call")
    expect(page.locator("#fn-try-result")).to_contain_text("must be an integer")

    page.locator("#fn-enabled").get_by_text("triple").click()  # switched off for gsm8k
    expect(page.locator("#fn-table [role=gridcell][data-col='0']").last).to_contain_text("–")
    expect(note).to_contain_text("Switched triple off for gsm8k")

    page.get_by_text("Prompt preview").click()  # the injected block, as the model reads it
    preview = page.locator("#fn-preview textarea")
    expect(preview).to_have_value(re.compile(r"calculator\(expression: string\)"))
    expect(preview).to_have_value(re.compile(r"Example: calculator\(expression="))
    expect(preview).not_to_have_value(re.compile("triple"))
    screenshot(page, "functions")

    expect(page.locator("#fn-mine input")).to_have_value("triple")
    page.click("#fn-delete")
    expect(note).to_contain_text("Deleted triple")
    expect(page.locator("#fn-table")).not_to_contain_text("triple(x: integer)")
    expect(page.locator("#fn-mine input")).to_have_value("")  # no stale choice left behind
    page.click("#fn-delete")  # again: said plainly, and the tab keeps working
    expect(note).to_contain_text("Pick one of your functions to delete it")
    assert not (app["home"] / "user_tools" / "triple.json").exists()
    choose(page, "fn-try-name", "calculator")
    expect(page.locator("#fn-try-args textarea")).to_have_value(re.compile("expression"))  # its example came
    page.locator("#fn-try-args textarea").fill('{"expression": "6*7"}')
    page.click("#fn-try-call")
    expect(page.locator("#fn-try-result")).to_contain_text("→ 42")
    expect(page.locator(".toast-body")).to_have_count(0)  # no error popped up on the way


def test_solve_streams_a_chain_with_a_call_and_a_verdict(page):
    open_tab(page, "Solve (live)")
    page.locator("#solve-split").get_by_text("train").click()
    page.locator("#solve-problem input").click()
    page.locator("[role=option]", has_text=f"{SOLVE_PROBLEM} ·").first.click()
    expect(page.locator("#solve-problem-text")).to_contain_text(f"{SOLVE_PROBLEM} (train)")
    page.get_by_text("Sampling settings").click()
    expect(page.locator("#tab-solve").get_by_text("environment variable")).to_have_count(0)  # keys: operator only
    set_number(page, "solve-max-steps", "3")
    set_number(page, "solve-max-new", "48")
    page.click("#solve-run")
    verdict = page.locator("#solve-verdict")
    expect(verdict).to_contain_text(re.compile(r"\d+ steps? · "), timeout=300_000)  # the summary ends a chain
    expect(verdict).to_contain_text(re.compile(r"correct|no ground truth"))
    expect(verdict).to_contain_text(re.compile(r"gave a final answer|reached the step limit|invalid replies"))
    chat = page.locator("#solve-chat")
    expect(chat).to_contain_text("Natalia sold clips")
    expect(chat).to_contain_text(re.compile(r"Step \d+ · \w+\("))  # a function-call step
    chat.get_by_text("Step 1 ·").first.click()  # unfold it: the model's raw reply
    screenshot(page, "solve")


def test_solve_with_a_quantised_model_after_a_task_switch_and_a_clean_stop(page):
    open_tab(page, "Solve (live)")
    choose(page, "solve-task", "fol")
    page.locator("#solve-model input").click()  # the picker offers the quantised decodings of the embedded model
    page.locator("[role=option]", has_text="smollm2@int4").first.click()
    expect(page.locator("#solve-model input")).to_have_value("smollm2@int4")
    page.click("#solve-run")  # at once: the problem list may still show a gsm8k problem
    verdict = page.locator("#solve-verdict")
    expect(verdict).to_contain_text(re.compile(r"\d+ steps? · "), timeout=300_000)
    expect(verdict).not_to_contain_text("has no problem")
    text = page.locator("#solve-problem-text")
    expect(text).to_contain_text("(heldout)")
    assert re.search(r"\n\s*Conclusion:", text.inner_text())  # premises and conclusion each on a line of their own
    fol_chat = page.locator("#solve-chat")
    assert re.search(r"\n\s*Conclusion:", fol_chat.inner_text())
    expect(fol_chat).to_contain_text(re.compile(r"check →|Not carried out"))  # what the call gave, in plain sight

    choose(page, "solve-task", "gsm8k")
    page.get_by_text("Sampling settings").click()
    set_number(page, "solve-max-steps", "20")
    set_number(page, "solve-max-new", "512")
    page.click("#solve-run")
    chat = page.locator("#solve-chat")
    expect(chat.get_by_text("writing…")).to_be_visible(timeout=300_000)
    page.click("#solve-stop")
    expect(verdict).to_contain_text("Stopped after", timeout=60_000)
    expect(chat).to_contain_text("what the model wrote is kept above")
    no_spinner(chat)
    expect(page.locator("#solve-run")).to_be_enabled()


# ---- curation ---------------------------------------------------------------------------------------------
def test_curate_a_queue_with_auto_advance_undo_warnings_and_blind_ab(page, app, seeded):
    from fcapp.store import Store
    from fcapp.tasks import get_task

    open_tab(page, "Curate")
    (first_problem, (w1, w2)), (second_problem, (v1, v2)) = list(seeded.items())[-2:]
    with Store(app["db"]) as store:
        before = store.counts("gsm8k")["pair_problems"]
    expect_pair_count(page, before)  # the page caught up with the seeded store
    note, info, queue = page.locator("#cur-note"), page.locator("#cur-chain-info"), page.locator("#cur-queue-inner")

    choose(page, "cur-label", "unlabelled")
    page.click("#cur-queue-start")  # the filter's chains, newest first
    expect(queue).to_have_attribute("data-labelled", "0")
    expect(info).to_contain_text(f"Chain {v2} ")
    page.locator("#curate-pairs").click()  # focus outside any field: the keys label
    page.keyboard.press("n")
    expect(queue).to_have_attribute("data-labelled", "1")
    expect(info).to_contain_text(f"Chain {v1} ")  # advanced by itself
    expect(queue).to_contain_text(re.compile(r"you labelled 1 of \d+ chains"))
    page.keyboard.press("u")  # undo: the label is gone and its chain is open again
    expect(note).to_contain_text(f"Took back your label of chain {v2}")
    expect(queue).to_have_attribute("data-labelled", "0")
    expect(info).to_contain_text(f"Chain {v2} ")
    choose(page, "cur-label", "any")

    open_chain(page, w1)  # a wrong chain: accepting it goes against the verifier, and says so
    expect(page.locator("#cur-chat")).to_contain_text("final_answer(")
    page.click("#cur-accept")
    expect(note).to_contain_text(f"Chain {w1} accepted")
    expect(note).to_contain_text("The verifier found this chain incorrect")
    expect_pair_count(page, before + 1)

    page.click("#ab-next")  # A/B on the other problem with two wrong chains, blind, chosen with the keyboard
    expect(page.locator("#ab-info")).to_contain_text(f"Problem {second_problem}")
    chat_a = page.locator("#ab-chat-a")
    expect(chat_a).to_contain_text("final_answer(")
    expect(chat_a).to_contain_text("Answer:")
    for word in ("incorrect", "expected", "✗"):
        expect(chat_a).not_to_contain_text(word)
    page.locator("#curate-pairs").click()
    page.keyboard.press("a")
    expect_pair_count(page, before + 2)

    open_chain(page, w2)  # an answer of the wrong form is refused; the truth is re-verified and shown
    answer = page.locator("#cur-edit-answer textarea")
    answer.fill("banana")
    page.click("#cur-edit-save")
    expect(note).to_contain_text("✗ Not saved: a gsm8k answer is a number")
    truth = get_task("gsm8k").get(first_problem).answer
    answer.fill(truth)
    page.click("#cur-edit-save")
    expect(note).to_contain_text(f"answer '{truth}' re-verified ✓")
    expect_pair_count(page, before + 1)  # both of that problem's chains now count as correct
    row = page.locator("#cur-table [role=row]").filter(has=page.locator("[data-col='0']", has_text=re.compile(
        rf"^\s*{w2}\s*$")))
    expect(row.locator("[data-col='7']")).to_have_text(truth)  # the table shows the edited answer

    page.get_by_text("Preference dataset").click()
    page.click("#cur-export")
    # the first export of a fresh cache labels the FOLIO-derived problems with z3 (the held-out guard): seconds
    expect(page.locator("#cur-export-note")).to_contain_text("Built ", timeout=120_000)
    expect(page.locator("#cur-export-file")).to_contain_text(".jsonl")
    page.locator("#cur-chain-id input").fill(str(w1))  # open a chain by its id, too
    page.click("#cur-open")
    expect(info).to_contain_text(f"Chain {w1} ")
    screenshot(page, "curate")


def test_curate_a_bulk_action_labels_the_counted_chains_and_one_undo_takes_them_back(page, app, seeded):
    from fcapp.store import Store

    def unlabelled_wrong() -> int:
        with Store(app["db"]) as store:
            return sum(c["label"] is None and c["verdict"] is False for c in store.list_chains(task="gsm8k", limit=1000))

    open_tab(page, "Curate")
    choose(page, "cur-bulk-action", "Reject every unlabelled chain the verifier found incorrect")
    page.click("#cur-bulk-count")
    text = page.locator("#cur-bulk-text")
    expect(text).to_contain_text("This gives reject to")
    count = int(re.search(r"reject to (\d+) chains", text.inner_text()).group(1))
    assert count == unlabelled_wrong() > 0
    page.click("#cur-bulk-confirm")
    note = page.locator("#cur-note")
    expect(note).to_contain_text(f"Rejected {count} chains as browser")
    expect(page.locator("#cur-bulk-text")).to_be_hidden()
    assert unlabelled_wrong() == 0
    page.click("#cur-undo")
    expect(note).to_contain_text(f"Took back your labels of {count} chains")
    assert unlabelled_wrong() == count


# ---- training ------------------------------------------------------------------------------------------------
def test_an_imported_pair_set_is_previewed_and_trained_on_and_the_run_survives_a_reload(page, app, seeded):
    export = max((app["home"] / "exports").glob("pairs-gsm8k-*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = len(export.read_text().splitlines())
    open_tab(page, "Train")
    page.locator("#train-import input[type=file]").set_input_files(str(export))
    expect(page.locator("#train-import-note")).to_contain_text(f"Imported {rows} pairs")
    pair_set = re.search(r"pair set (imported-\S+) ", page.locator("#train-import-note").inner_text()).group(1)
    expect(page.locator("#train-pairs input")).to_have_value(f"{pair_set} ({rows} pairs)")

    page.locator("#train-advanced").get_by_text("Settings").first.click()
    for elem_id, value in (("train-max-steps", "2"), ("train-batch-size", "1"), ("train-grad-accum", "1")):
        set_number(page, elem_id, value)
    page.click("#train-preview-btn")  # what it would train on, before anything starts
    preview = page.locator("#train-preview")
    expect(preview).to_contain_text(f"dpo on pair set {pair_set}: {rows} pairs from")
    expect(preview).to_contain_text("held-out problems: none")
    expect(preview).to_contain_text("against max_length 1024")
    expect(preview).to_contain_text("2 optimizer steps, 2 pairs trained on; about")
    expect(preview).to_contain_text("estimate")
    expect(page.locator("#train-preview-chart .barlayer .trace").first).to_be_attached()  # the length histogram

    page.locator("#train-name textarea, #train-name input").first.fill(TUNED)
    page.click("#train-start")
    expect(page.locator("#train-note")).to_contain_text(f"Started {TUNED}", timeout=120_000)
    progress = page.locator("#train-progress-inner")
    expect(progress).to_have_attribute("data-status", re.compile("starting|running"))
    expect(page.locator("#train-start")).to_be_disabled()  # locked while it runs
    expect(page.locator("#train-max-steps input[type=number]").first).to_be_disabled()

    page.reload()  # the run belongs to its worker process: the reloaded page finds it again, with its settings
    page.wait_for_selector("#ov-stages")
    open_tab(page, "Train")
    expect(page.locator("#train-note")).to_contain_text(f"Reattached to {TUNED}, still running")
    expect(progress).to_have_attribute("data-status", re.compile("starting|running"))
    expect(page.locator("#train-name textarea, #train-name input").first).to_have_value(TUNED)
    expect(page.locator("#train-pairs input")).to_have_value(re.compile(re.escape(pair_set)))
    expect(page.locator("#train-max-steps input[type=number]").first).to_have_value("2")
    expect(page.locator("#train-max-steps input[type=number]").first).to_be_disabled()
    expect(page.locator("#train-start")).to_be_disabled()

    expect(progress).to_have_attribute("data-step", re.compile(r"[1-9]"), timeout=400_000)  # still progressing
    expect(page.locator("#train-chart-main .scatterlayer .trace").first).to_be_attached()  # the chart drew the loss
    expect(progress).to_have_attribute("data-status", "finished", timeout=400_000)
    expect(progress).to_have_attribute("data-step", "2")
    expect(page.locator("#train-note")).to_contain_text(f"Run {TUNED} finished")
    expect(page.locator("#train-start")).to_be_enabled()
    expect(page.locator("#train-history")).to_contain_text(TUNED)
    expect(page.locator("#train-chart-side .scatterlayer .trace").first).to_be_attached()
    run = app["home"] / "models" / TUNED
    assert json.loads((run / "config.json").read_text())["pair_set"] == pair_set  # it trained on the import
    assert len((run / "data.jsonl").read_text().splitlines()) == rows
    page.get_by_text("Worker output").click()
    expect(page.locator("#train-worker-log textarea")).to_have_value(re.compile(r"\S"))
    screenshot(page, "train")
    open_tab(page, "Solve (live)")  # every model list took the new model, without a reload
    page.locator("#solve-model input").click()
    expect(page.locator("[role=option]", has_text=TUNED)).to_be_visible()
    page.keyboard.press("Escape")
    open_tab(page, "Train")

    data = hashlib.sha256((run / "data.jsonl").read_bytes()).hexdigest()
    page.click("#train-start")  # the same name again: refused with a message, the run's files untouched
    expect(page.locator("#train-note")).to_contain_text("✗ Not started")
    expect(page.locator("#train-note")).to_contain_text("already holds a model")
    assert hashlib.sha256((run / "data.jsonl").read_bytes()).hexdigest() == data


def test_train_tiny_grpo_run_draws_its_reward_chart(page):
    """GRPO from the Train tab: the method's own settings appear, and the reward chart grows per step."""
    open_tab(page, "Train")
    page.locator("#train-method-choice").get_by_text("grpo").click()
    expect(page.locator("#train-method-note")).to_contain_text("verifier's verdict is the reward")
    choose(page, "train-task", "fol")
    page.locator("#train-advanced").get_by_text("Settings").first.click()
    for elem_id, value in (("train-max-steps", "2"), ("train-num-generations", "2"), ("train-limit", "2"),
                           ("train-chain-steps", "2"), ("train-max-new-tokens", "40"), ("train-grad-accum", "1")):
        set_number(page, elem_id, value)
    expect(page.locator("#train-beta")).to_be_hidden()  # a DPO-only option
    page.locator("#train-name textarea, #train-name input").first.fill("tiny-grpo")
    page.click("#train-start")
    expect(page.locator("#train-note")).to_contain_text("Started tiny-grpo", timeout=120_000)
    progress = page.locator("#train-progress-inner")
    expect(progress).to_have_attribute("data-method", "grpo")
    expect(page.locator("#train-start")).to_be_disabled()
    expect(progress).to_have_attribute("data-step", re.compile(r"[1-9]"), timeout=600_000)
    mean_reward = page.locator("#train-chart-main .scatterlayer .trace").first.locator(".point")
    expect(mean_reward.first).to_be_attached()  # the reward chart draws each step
    expect(progress).to_have_attribute("data-status", "finished", timeout=600_000)
    expect(mean_reward).to_have_count(2)  # one point per step
    expect(page.locator("#train-history")).to_contain_text("grpo")


# ---- comparing ------------------------------------------------------------------------------------------------
def test_compare_stops_cleanly_then_solves_side_by_side_and_evaluates(page):
    open_tab(page, "Compare")
    expect(page.locator("#cmp-model-a input")).to_have_value("smollm2")
    expect(page.locator("#cmp-model-b input")).to_have_value("tiny-grpo")  # the newest tuned model
    expect(page.locator("#cmp-empty")).to_be_hidden()
    choose(page, "cmp-model-b", TUNED)
    page.click("#cmp-run")  # the default 160 tokens a step: still writing when stopped
    chats = [page.locator("#cmp-chat-a"), page.locator("#cmp-chat-b")]
    expect(chats[0].get_by_text("writing…").or_(chats[1].get_by_text("writing…")).first).to_be_visible(
        timeout=300_000)
    page.click("#cmp-stop")
    for side, chat in zip("ab", chats):
        expect(page.locator(f"#cmp-answer-{side}")).to_contain_text(re.compile(r"stopped after|Answer|No final"),
                                                                   timeout=60_000)
        no_spinner(chat)
    expect(page.locator("#cmp-answer-a")).to_contain_text("stopped after")
    expect(page.locator("#cmp-run")).to_be_enabled()

    set_number(page, "cmp-max-steps", "2")
    set_number(page, "cmp-max-new", "48")
    page.click("#cmp-run")
    for side, name in (("a", "smollm2"), ("b", TUNED)):
        answer = page.locator(f"#cmp-answer-{side}")
        expect(answer).to_contain_text(re.compile(r"\d+ steps? ·"), timeout=400_000)
        expect(answer).to_contain_text(name)
        expect(answer).to_contain_text(re.compile(r"Answer|No final answer"))
        expect(page.locator(f"#cmp-chat-{side}")).to_contain_text("Step 1")

    set_number(page, "cmp-eval-n", "1")
    page.click("#cmp-eval-run")
    expect(page.locator("#cmp-eval-progress-inner")).to_have_attribute("data-status", "finished", timeout=400_000)
    expect(page.locator("#cmp-eval-summary")).to_contain_text(TUNED)
    expect(page.locator("#cmp-eval-note")).to_contain_text("Evaluated 1 gsm8k problems")
    for side in "ab":  # unfold each side's first step
        page.locator(f"#cmp-chat-{side}").get_by_text("Step 1 ·").first.click()
    screenshot(page, "compare")


def test_overview_counts_every_stage_after_the_walk_through(page, app):
    for stage in ("chains", "pairs", "models", "evaluations"):
        expect(page.locator(f"#ov-{stage}")).not_to_have_attribute("data-n", "0")
    expect(page.locator("#ov-evaluations")).to_have_attribute("data-n", "1")
    expect(page.locator("#ov-next-text")).to_contain_text("Every stage has data")
    screenshot(page, "overview")
    # every bad input on the way (a broken function, an answer of the wrong form, a taken run name, training
    # with no data, a problem list behind its task) was a message on the page, not a traceback in the log
    assert "Traceback" not in (app["home"] / "app.log").read_text(errors="replace")
