"""Training sets: verified and labelled chains become TRL preference rows and SFT examples; exports load
with `datasets` and round-trip through the store; one validator refuses a broken file, or one holding a
held-out problem, for import and training alike."""

from __future__ import annotations

import json
import re

import pytest

from fcapp.store import Store
from fcapp.files import DataFileError
from fcapp.tasks.base import split_of
from fcapp.trainsets import PairPolicy, build_pairs, export_pairs, import_pairs, load_pair_file, make_pairs
from helpers import correct_chain, gsm8k_store, wrong_chain

PROBLEMS = ["gsm8k-1", "gsm8k-2", "gsm8k-4"]  # training problems (gsm8k-3 is held out)


@pytest.fixture
def store(tmp_path):
    return gsm8k_store(tmp_path / "pairs.db", PROBLEMS, ("-1", "12345"))


def test_each_problem_pairs_a_correct_with_an_incorrect_chain(store):
    rows = build_pairs(store, "gsm8k", PairPolicy(max_pairs_per_problem=4))
    assert len(rows) == 3 * 2  # one correct x two incorrect per problem
    row = rows[0]
    assert row["prompt"][0]["role"] == "system" and "calculator(expression: string)" in row["prompt"][0]["content"]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][-1]["content"].startswith("final_answer")
    assert row["rejected"] != row["chosen"]
    assert {t["function"]["name"] for t in row["tools"]} >= {"calculator", "final_answer"}


def test_policy_caps_pairs_and_can_exclude_reference_chains(store):
    assert len(build_pairs(store, "gsm8k", PairPolicy(max_pairs_per_problem=1))) == 3
    assert build_pairs(store, "gsm8k", PairPolicy(use_reference=False)) == []


def test_identical_chains_are_deduplicated(store):
    duplicate = wrong_chain("gsm8k", "gsm8k-1", "-1", seed=99)  # same text as seed 0, another key
    store.add_chain(duplicate, False)
    assert len(build_pairs(store, "gsm8k", PairPolicy(dedup=True))) == 6
    assert len(build_pairs(store, "gsm8k", PairPolicy(dedup=False))) == 7


def test_a_human_label_overrides_the_verifier(store):
    wrong = store.list_chains(task="gsm8k", problem_id="gsm8k-1", verdict=False)
    for chain in wrong:
        store.label_chain(chain["id"], "accept", who="tester")
    rows = build_pairs(store, "gsm8k")
    assert not any(r["problem_id"] == "gsm8k-1" for r in rows)  # no incorrect chain left for it


def test_export_loads_with_datasets_and_round_trips_through_the_store(store, tmp_path):
    import datasets

    card = make_pairs(store, "gsm8k", tmp_path / "out" / "pairs.jsonl")
    jsonl = tmp_path / "out" / "pairs.jsonl"
    assert card["pairs"] == 6 and (tmp_path / "out" / "pairs.jsonl.card.md").exists()
    loaded = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    assert loaded.num_rows == 6 and {"prompt", "chosen", "rejected", "tools"} <= set(loaded.column_names)

    rows = load_pair_file(jsonl)
    export_pairs(rows, tmp_path / "pairs.parquet")
    parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train")
    assert parquet.num_rows == 6
    assert load_pair_file(tmp_path / "pairs.parquet") == rows

    other = Store(tmp_path / "other.db")
    assert import_pairs(jsonl, other) == {"pairs": 6, "policy": "imported-pairs", "tasks": ["gsm8k"]}
    stored = other.list_pairs(task="gsm8k", policy="imported-pairs")
    export_pairs([dict(r) for r in stored], tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == jsonl.read_text()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": [], "chosen": "text", "rejected": []}), "'chosen' must be a list"),
        (json.dumps({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}), "'prompt' must be a list"),
    ],
)
def test_a_broken_pair_file_names_the_line_and_changes_nothing(store, tmp_path, line, message):
    good = json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}], "task": "gsm8k"})
    path = tmp_path / "broken.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataFileError, match=rf"broken.jsonl:2: .*{message}"):
        import_pairs(path, store)
    assert store.list_pairs() == []


def test_an_export_trains_one_real_dpo_step_unchanged(store, tmp_path, monkeypatch):
    """What `fcapp pairs` writes is what the DPO worker (TRL's DPOTrainer) trains on, as it is."""
    from fcapp.training import TrainConfig, start_training

    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    make_pairs(store, "gsm8k", tmp_path / "pairs.jsonl")
    job = start_training(TrainConfig(data=str(tmp_path / "pairs.jsonl"), name="from-export", batch_size=2,
                                     grad_accum=1, max_length=1024, max_steps=1))
    status = job.wait(timeout=900)
    assert status["status"] == "finished", (status, (job.out / "worker.log").read_text()[-3000:])
    [step] = job.read_log()
    assert step["stage"] == "dpo" and step["loss"] == pytest.approx(0.6931, abs=1e-3)


# ---- held-out problems never reach a training set ------------------------------------------------------
HELDOUT = "gsm8k-3"  # in the held-out split (split_of), as the store's problems table says too


@pytest.fixture
def contaminated(store):
    """The store also holds a correct and an incorrect chain of a held-out problem."""
    store.add_chain(correct_chain("gsm8k", HELDOUT), True, role="reference")
    store.add_chain(wrong_chain("gsm8k", HELDOUT, "-1"), False)
    return store


def test_pair_and_example_builders_leave_held_out_problems_out(contaminated):
    from fcapp.trainsets import build_examples

    assert split_of(HELDOUT) == "heldout"
    assert HELDOUT not in {r["problem_id"] for r in build_pairs(contaminated, "gsm8k")}
    examples = build_examples(contaminated, "gsm8k")
    assert {r["problem_id"] for r in examples} == set(PROBLEMS)
    assert {r["source"] for r in examples} == {"reference"}


def test_a_labelled_held_out_chain_still_stays_out(contaminated):
    from fcapp.trainsets import build_examples

    [wrong] = contaminated.list_chains(task="gsm8k", problem_id=HELDOUT, verdict=False)
    contaminated.label_chain(wrong["id"], "accept", who="curator")  # as the app's Solve/Curate save would
    assert HELDOUT not in {r["problem_id"] for r in build_examples(contaminated, "gsm8k", ("human",))}


def heldout_row(kind: str, renamed: bool) -> dict:
    """A training row of a held-out problem, under its own id or renamed (same question, another id)."""
    chain = correct_chain("gsm8k", HELDOUT)
    row = {"prompt": chain.prompt, "tools": [], "task": "gsm8k", "problem_id": "my-own-7" if renamed else HELDOUT}
    if kind == "pairs":
        return row | {"chosen": chain.completion_messages(), "rejected": [{"role": "assistant", "content": "no"}]}
    return row | {"completion": chain.completion_messages()}


@pytest.mark.parametrize("kind", ["pairs", "sft"])
@pytest.mark.parametrize("renamed", [False, True], ids=["same-id", "renamed"])
def test_a_training_file_holding_a_held_out_problem_is_refused(tmp_path, kind, renamed):
    from fcapp.trainsets import TrainingDataError, read_training_file

    good = heldout_row(kind, False) | {"prompt": correct_chain("gsm8k", "gsm8k-1").prompt, "problem_id": "gsm8k-1"}
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(heldout_row(kind, renamed)) + "\n")
    with pytest.raises(TrainingDataError, match=rf"1 .*row\(s\) hold held-out problems.*{kind}.jsonl:2"):
        read_training_file(path, kind)


def test_import_refuses_held_out_problems_and_changes_nothing(store, tmp_path):
    from fcapp.trainsets import TrainingDataError

    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(heldout_row("pairs", True)) + "\n")
    with pytest.raises(TrainingDataError, match="held-out"):
        import_pairs(path, store)
    assert store.list_pairs() == []


def test_grpo_prompts_come_from_training_problems_only():
    from fcapp.tasks import get_task
    from fcapp.training.config import TrainConfig
    from fcapp.training.grpo import prompts

    rows, by_question = prompts(TrainConfig(name="g", method="grpo", task="fol", limit=40), get_task("fol"))
    assert len(rows) == 40 and all(split_of(r["problem_id"]) == "train" for r in rows)
    assert {p.id for p in by_question.values()} == {r["problem_id"] for r in rows}


def test_a_second_import_is_a_set_of_its_own(store, tmp_path):
    path = tmp_path / "out.jsonl"
    make_pairs(store, "gsm8k", path)
    first, second = import_pairs(path, store), import_pairs(path, store)
    assert (first["policy"], second["policy"]) == ("imported-out", "imported-out-2")
    assert len(store.list_pairs(policy="imported-out")) == len(store.list_pairs(policy="imported-out-2")) == 6


def test_an_empty_pair_set_is_not_written(tmp_path):
    from fcapp.trainsets import TrainingDataError

    with pytest.raises(TrainingDataError, match="no preference pairs for fol yet"):
        make_pairs(Store(tmp_path / "empty.db"), "fol", tmp_path / "pairs.jsonl")
    assert not (tmp_path / "pairs.jsonl").exists()


# ---- one validator for every reader of a preference file ------------------------------------------------
@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
     "'chosen' is empty"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'prompt' must be a list of {role, content} messages"),
])
def test_import_and_training_accept_and_refuse_a_file_by_the_same_rules(store, tmp_path, row, message):
    """What `fcapp pairs --import` refuses, `fcapp train` refuses too, with the same message."""
    from fcapp.training.job import validate
    from fcapp.trainsets import TrainingDataError

    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TrainingDataError, match=re.escape(message)) as imported:
        import_pairs(path, store)
    from fcapp.training import TrainConfig

    with pytest.raises(TrainingDataError) as trained:
        validate(TrainConfig(name="same-rules", data=str(path)))
    assert str(imported.value) == str(trained.value)


# ---- SFT masks ------------------------------------------------------------------------------------------
def test_sft_labels_cover_the_model_calls_and_mask_tool_results():
    """The labels of a real chain: only the assistant's calls (and the end-of-turn token after each)
    are trained on; the system prompt, the question, the calculator's results are not."""
    from fcapp.training.common import load_tokenizer, training_prompt
    from fcapp.training.tokens import tokenize_chain

    tokenizer = load_tokenizer("smollm2")
    chain = correct_chain("gsm8k", "gsm8k-1")
    tokens = tokenize_chain(tokenizer, training_prompt(chain.prompt, demo=False), chain.completion_messages())
    ids = tokens.prompt_ids + tokens.completion_ids
    trained = tokenizer.decode([i for i, m in zip(ids, tokens.assistant_masks) if m])
    masked = tokenizer.decode([i for i, m in zip(ids, tokens.assistant_masks) if not m])
    calls = [s.text for s in chain.steps]
    assert trained == "".join(text + "<|im_end|>" for text in calls)  # the calls, nothing else
    for step in chain.steps[:-1]:  # every calculator result is context, not a target
        assert f"<|im_start|>tool\n{step.result}<|im_end|>" in masked
    assert chain.question in masked
    assert len(ids) == len(tokens.assistant_masks) and ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_right_answer_its_own_calls_contradict_is_not_grounded():
    """Rounds learn from the model's own correct chains; one whose answer is not what its last tool call
    returned got it right by luck, and is left out."""
    from fcapp.trainsets import grounded

    chain = correct_chain("fol", "fol-0-0")
    assert grounded("fol", chain.to_dict())
    lucky = chain.to_dict()
    check = lucky["steps"][0]
    check["result"] = {"True": "False", "False": "Unknown", "Unknown": "True"}[check["result"]]  # the call disagreed
    assert not grounded("fol", lucky)
    assert grounded("gsm8k", correct_chain("gsm8k", "gsm8k-1").to_dict())


def test_sft_examples_leave_out_a_teachers_right_guess_unless_asked(tmp_path):
    """A teacher chain whose right answer its own `check` contradicts is a guess (1 in 3 on FOL), no chain to
    imitate. By default only grounded teacher chains are examples; reference chains always are."""
    from fcapp.tasks import get_task
    from fcapp.trainsets import build_examples

    problem = get_task("fol").split("train")[0]
    store = Store(tmp_path / "sft.db")
    store.add_chain(correct_chain("fol", problem.id), True, role="reference")
    lucky = correct_chain("fol", problem.id)
    lucky.reference, lucky.model_id, lucky.seed = False, "teacher", 1
    lucky.steps[0].result = {"True": "False", "False": "Unknown", "Unknown": "True"}[lucky.steps[0].result]
    store.add_chain(lucky, True)  # the call said otherwise, the answer is right anyway

    kept = build_examples(store, "fol")
    assert [r["source"] for r in kept] == ["reference"]
    assert kept[0]["completion"][1]["content"] == problem.answer  # its tool gave the answer it ends on
    assert sorted(r["source"] for r in build_examples(store, "fol", grounded_only=False)) == ["reference", "teacher"]
