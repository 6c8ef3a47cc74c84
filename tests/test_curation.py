"""Curation on a real store with real chains: labels that override the verifier say so, edited answers are
checked by the task, the labelling queue advances and counts, bulk labels need the confirmed count, undo
takes back only your own labels, and agreement between two people is measured; the same through `fcapp label`."""

from __future__ import annotations

import pytest

from fcapp import curation
from fcapp.curation import ChainFilter
from fcapp.store import Store
from fcapp.tasks import get_task
from helpers import gsm8k_store, label_history

PROBLEMS = ["gsm8k-1", "gsm8k-2", "gsm8k-4"]  # training problems


@pytest.fixture
def store(tmp_path) -> Store:
    return gsm8k_store(tmp_path / "curate.db", PROBLEMS)


def ids(store: Store, verdict: bool) -> list[int]:
    """The chains the verifier found correct (True) or incorrect (False), whatever their labels."""
    return [c["id"] for c in store.list_chains(task="gsm8k") if c["verdict"] is verdict]


def test_accepting_a_chain_the_verifier_found_wrong_warns_and_counts_as_the_person_says(store):
    wrong = ids(store, False)[0]
    done = curation.label(store, wrong, "accept", "ann")
    assert done.overrides_verifier
    assert "⚠ The verifier found this chain incorrect" in done.message and "expected" in done.message
    assert store.get_chain(wrong)["effective_verdict"] is True

    agreeing = curation.label(store, ids(store, True)[0], "accept", "ann")
    assert not agreeing.overrides_verifier and "⚠" not in agreeing.message


def test_an_edited_answer_must_have_the_tasks_form_and_then_shows_in_the_table(store):
    chain_id = ids(store, False)[0]
    with pytest.raises(ValueError, match="a gsm8k answer is a number"):
        curation.edit_answer(store, chain_id, "banana", "ann")
    assert label_history(store, chain_id) == []  # nothing stored

    problem = store.get_chain(chain_id)["problem_id"]
    truth = get_task("gsm8k").get(problem).answer
    done = curation.edit_answer(store, chain_id, truth, "ann")
    assert "re-verified ✓" in done.message
    row = next(r for r in store.list_chains(task="gsm8k") if r["id"] == chain_id)
    assert row["effective_answer"] == truth and row["answer"] == "-1" and row["effective_verdict"] is True


def test_logic_answers_are_true_false_or_unknown():
    fol = get_task("fol")
    assert fol.check_answer(" true. ") == "True"
    with pytest.raises(ValueError, match="True, False or Unknown"):
        fol.check_answer("maybe")


def test_the_queue_advances_past_labelled_chains_and_undo_brings_a_chain_back(store):
    queue = curation.queue(store, ChainFilter(task="gsm8k", label="unlabelled"))
    assert len(queue) == 6
    state = curation.queue_state(store, queue, "ann")
    assert state == {"total": 6, "labelled": 0, "next": queue[0]}

    first = curation.label(store, queue[0], "reject", "ann")
    curation.label(store, queue[1], "accept", "bob")  # someone else's label does not count as ann's
    state = curation.queue_state(store, queue, "ann", after=queue[0])
    assert state["labelled"] == 1 and state["next"] == queue[1]

    assert curation.undo(store, first, "bob") == []  # only the person who gave a label takes it back
    assert curation.undo(store, first, "ann") == [queue[0]]
    assert curation.queue_state(store, queue, "ann", after=queue[5]) == {"total": 6, "labelled": 0, "next": queue[0]}
    assert store.get_chain(queue[0])["label"] is None


def test_a_bulk_action_labels_the_counted_chains_at_once_and_one_undo_takes_them_back(store):
    flt = ChainFilter(task="gsm8k")
    curation.label(store, ids(store, False)[0], "accept", "ann")  # labelled chains are left alone
    targets = curation.bulk_targets(store, flt, "reject-failed")
    assert len(targets) == 2

    with pytest.raises(ValueError, match="now matches 2 chains, not the 3 you confirmed"):
        curation.bulk_label(store, flt, "reject-failed", "ann", expected=3)
    assert all(store.get_chain(c)["label"] is None for c in targets)

    done = curation.bulk_label(store, flt, "reject-failed", "ann", expected=2)
    assert done.message == "Rejected 2 chains as ann." and sorted(done.chain_ids) == sorted(targets)
    assert all(store.get_chain(c)["label"] == "reject" for c in targets)
    assert curation.bulk_targets(store, flt, "reject-failed") == []
    assert sorted(curation.undo(store, done, "ann")) == sorted(targets)
    assert all(store.get_chain(c)["label"] is None for c in targets)


def test_agreement_of_two_annotators_on_the_chains_both_labelled(store):
    every = ids(store, True) + ids(store, False)
    for chain_id in every:
        curation.label(store, chain_id, "accept" if chain_id in ids(store, True) else "reject", "ann")
    verdicts = {c: store.get_chain(c)["verdict"] for c in every}
    for chain_id in every[:5]:
        curation.label(store, chain_id, "accept" if verdicts[chain_id] else "reject", "bob")
    curation.label(store, every[0], "reject", "bob")  # bob changes his mind: his latest label counts
    [row] = curation.agreement(store, "gsm8k")
    assert row["annotators"] == ("ann", "bob") and row["chains"] == 5 and row["agree"] == 4
    assert row["disagree_on"] == [every[0]] and -1 <= row["kappa"] < 1
    assert curation.chain_labels(store, every[0]) == {"ann": "accept", "bob": "reject"}


def test_the_store_version_follows_every_change(store):
    before = store.version()
    label = store.label_chain(ids(store, True)[0], "accept", "ann")
    labelled = store.version()
    assert labelled != before
    store.remove_labels([label], "ann")
    assert store.version() not in (before, labelled)


def test_fcapp_label_counts_before_it_labels_and_prints_how_to_undo(store, capsys):
    from fcapp.cli import main

    db = str(store.path)
    assert main(["label", "--db", db, "--bulk", "accept-verified", "--task", "gsm8k", "--who", "ann"]) == 0
    assert "would label 3 chains as ann; add --yes" in capsys.readouterr().out
    assert all(c["label"] is None for c in store.list_chains(task="gsm8k"))
    assert main(["label", "--db", db, "--bulk", "accept-verified", "--task", "gsm8k", "--who", "ann", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Accepted 3 chains as ann" in out and "fcapp label --undo" in out
    undo = out.rsplit("--undo ", 1)[1].rstrip(")\n").split()
    assert main(["label", "--db", db, "--undo", *undo, "--who", "ann"]) == 0
    assert all(c["label"] is None for c in store.list_chains(task="gsm8k"))
    assert main(["label", "--db", db, str(ids(store, False)[0]), "--answer", "banana", "--who", "ann"]) == 2
    assert "a gsm8k answer is a number" in capsys.readouterr().err
