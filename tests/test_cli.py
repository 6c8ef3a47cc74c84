"""The CLI's chain flags, as a specification: `solve`, `generate` and `eval` take one flag per documented
field of SolveConfig, GenerateConfig and EvalConfig (the same configs the app fills in), a flag not given
keeps the config's own default, and a missing required flag is refused before anything runs."""

from __future__ import annotations

import dataclasses

import pytest

from fcapp import flags
from fcapp.cli import build_parser, eval_config
from fcapp.evaluate import EvalConfig
from fcapp.generate import GenerateConfig
from fcapp.solve import SolveConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def dests(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest for action in sub.choices[command]._actions}


@pytest.mark.parametrize("command, config_cls", [("solve", SolveConfig), ("generate", GenerateConfig),
                                                 ("eval", EvalConfig)])
def test_every_documented_field_of_a_config_is_a_flag_of_its_command(command, config_cls) -> None:
    documented = {f.name for f in dataclasses.fields(config_cls) if "help" in f.metadata}
    assert documented and documented <= dests(command)


def test_generate_builds_its_config_from_the_flags_given_and_the_defaults_of_the_rest() -> None:
    args = parse("generate", "--task", "fol", "--samples", "2", "--split", "all", "--batch-size", "3", "--demo",
                 "--reference")
    assert flags.from_args(GenerateConfig, args) == GenerateConfig("fol", samples=2, split="all", batch_size=3,
                                                                   demo=True, reference=True)
    assert flags.from_args(GenerateConfig, parse("generate", "--task", "fol")) == GenerateConfig("fol")


def test_solve_takes_the_chain_settings_and_may_turn_the_demonstration_off() -> None:
    args = parse("solve", "--task", "fol", "--problem-id", "0", "--max-steps", "20", "--temperature", "0.7",
                 "--no-demo")
    assert flags.from_args(SolveConfig, args) == SolveConfig(max_steps=20, temperature=0.7, demo=False)


def test_eval_runs_at_the_largest_step_limit_and_reads_the_smaller_ones_off_the_same_chains() -> None:
    args = parse("eval", "--task", "folio", "--models", "base, tuned-1", "--max-steps", "20,10",
                 "--problems", "mine.jsonl", "--strict")
    assert eval_config(args) == EvalConfig("folio", ["base", "tuned-1"], max_steps=20, step_limits=[10, 20],
                                           problems_file="mine.jsonl", strict=True)
    assert eval_config(parse("eval", "--task", "fol")) == EvalConfig("fol", ["base"], step_limits=[10])


@pytest.mark.parametrize("argv", [["generate"], ["eval"], ["generate", "--task", "fol", "--split", "test"],
                                  ["eval", "--task", "fol", "--max-steps", "0"]])
def test_a_missing_task_or_a_bad_value_is_refused_by_the_parser(argv, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse(*argv)
    assert stopped.value.code == 2 and "error:" in capsys.readouterr().err
