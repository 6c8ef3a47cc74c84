"""Evaluation: same problems and seeds for every model; accuracy with Wilson intervals, valid-call
rate, steps, tokens, latency; an exact McNemar test against base; user problem files."""

from __future__ import annotations

import json

import pytest

from fcapp.cli import main
from fcapp.evaluate import EvalConfig, differing_problems, evaluate, mcnemar_exact, wilson_interval, write_report

FAST = dict(max_steps=2, max_new_tokens=24)


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_known_values():
    base = [False] * 10
    assert mcnemar_exact(base, [True] * 10) == pytest.approx(2 / 2**10)  # 10 discordant, all one way
    assert mcnemar_exact(base, base) == 1.0
    # 6 vs 1 discordant: two-sided binomial p = 2 * P(X <= 1 | n=7, p=.5) = 16/128
    first = [True] * 6 + [False] * 1 + [True] * 3
    second = [False] * 6 + [True] * 1 + [True] * 3
    assert mcnemar_exact(first, second) == pytest.approx(0.125)


GSM8K_FILE = [
    {"question": "Tom has 3 boxes with 4 apples each. How many apples does he have?", "answer": "3*4=<<3*4=12>>12\n#### 12"},
    {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "#### 10"},
]
FOLIO_FILE = [
    {"premises": "All birds fly.\nTweety is a bird.", "premises-FOL": ["∀x (Bird(x) → Fly(x))", "Bird(tweety)"],
     "conclusion": "Tweety flies.", "conclusion-FOL": "Fly(tweety)", "label": "True"},
    {"premises": ["No fish can sing.", "Nemo is a fish."], "premises-FOL": ["∀x (Fish(x) → ¬Sing(x))", "Fish(nemo)"],
     "conclusion": "Nemo can sing.", "label": "False"},
]


@pytest.mark.parametrize("task, rows", [("gsm8k", GSM8K_FILE), ("folio", FOLIO_FILE)])
def test_user_problem_files_are_evaluated_with_the_same_seeds(small_model, tmp_path, task, rows):
    path = tmp_path / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(task, ["base", "again"], problems_file=str(path), **FAST)
    result = evaluate(config, models={"base": small_model, "again": small_model})
    assert result["n"] == 2 and set(result["models"]) == {"base", "again"}
    base, again = result["models"]["base"], result["models"]["again"]
    assert base["p_value_vs_base"] is None and again["p_value_vs_base"] == 1.0
    assert base["accuracy"] == again["accuracy"]  # same model, same seeds, greedy: same outcomes
    assert differing_problems(result, "base", "again") == []
    for stats in (base, again):
        assert 0 <= stats["accuracy_ci"][0] <= stats["accuracy"] <= stats["accuracy_ci"][1] <= 1
        assert 0 <= stats["valid_call_rate"] <= 1 and stats["mean_steps"] >= 1 and stats["mean_tokens"] > 0
    report = write_report(result, tmp_path / "report.html")
    assert "plotly" in report.read_text()


def test_eval_cli_prints_one_json_object_of_the_documented_shape(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(GSM8K_FILE[0]) + "\n")
    code = main(["eval", "--task", "gsm8k", "--models", "base", "--problems", str(path), "--json",
                 "--max-steps", "2", "--max-new-tokens", "24", "--db", str(tmp_path / "e.db")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "gsm8k" and result["n"] == 1
    assert set(result["models"]["base"]) >= {"accuracy", "accuracy_ci", "valid_call_rate", "mean_steps",
                                             "mean_tokens", "mean_latency_s", "p_value_vs_base"}
