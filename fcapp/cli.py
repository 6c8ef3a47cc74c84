"""`fcapp COMMAND` (or `python -m fcapp COMMAND`): a thin front over the library (the app calls the
same functions)."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from typing import Callable

from fcapp import flags
from fcapp.evaluate import EvalConfig
from fcapp.export import GGUF_TYPES
from fcapp.generate import GenerateConfig
from fcapp.models import QUANTISED, SPEC_HELP
from fcapp.models.registry import EMBEDDED
from fcapp.records import Event, stop_words
from fcapp.solve import SolveConfig
from fcapp.tasks import task_names


def _print(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _api_key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key of an http:// model")


def render_event(event: Event, out: Callable[..., None] = _print) -> None:
    """Human-readable live rendering of one agent event."""
    if event.kind == "step":
        out(f"\n[step {event.step + 1}] ", end="")
    elif event.kind == "token":
        out(event.text, end="")
    elif event.kind == "result":
        out(f"\n  -> {event.text}  ({event.data.get('elapsed_s', 0):.3f} s)")
    elif event.kind == "error":
        out(f"\n  !! {event.text}")
    elif event.kind == "answer":
        out(f"\n  => answer: {event.text}")


def cmd_solve(args: argparse.Namespace) -> int:
    from fcapp.models import get_model
    from fcapp.solve import solve_events
    from fcapp.tasks import get_task
    from fcapp.tasks.base import Problem

    task = get_task(args.task)
    if args.question:
        problem = Problem("custom", task.name, args.question, args.expected or "")
    else:
        problem = task.get(args.problem_id)
    model = get_model(args.model, api_key_env=args.api_key_env)
    if not args.json:
        _print(f"task {task.name} | problem {problem.id} | model {model.model_id}")
        _print(f"Question: {problem.question}")
    chain = None
    for event in solve_events(task, problem, model, flags.from_args(SolveConfig, args)):
        if not args.json:
            render_event(event)
        chain = event.chain or chain
    assert chain is not None
    if args.json:
        _print(json.dumps(chain.to_dict(), ensure_ascii=False, indent=2))
        return 0
    verdict = {True: "correct", False: "incorrect", None: "no ground truth"}[chain.verdict]
    _print(f"\nAnswer: {chain.answer}   expected: {problem.answer or '-'}   verdict: {verdict}")
    _print(f"({len(chain.steps)} steps, {chain.valid_calls} valid calls, {chain.completion_tokens} tokens, "
           f"{chain.elapsed_s:.1f} s; {stop_words(chain.stop_reason)})")
    return 0


def _store(args: argparse.Namespace):
    from fcapp.store import Store

    return Store(args.db)


def cmd_generate(args: argparse.Namespace) -> int:
    import threading

    from tqdm import tqdm

    from fcapp.generate import generate
    from fcapp.models import get_model

    config = flags.from_args(GenerateConfig, args)
    store = _store(args)
    model = get_model(config.teacher, api_key_env=args.api_key_env)
    stop = threading.Event()
    bar = tqdm(desc=f"generate {config.task}", unit="chain", dynamic_ncols=True)

    def progress(stats, chain) -> None:
        bar.total = stats.planned
        bar.update(1)
        bar.set_postfix(chains_per_min=f"{stats.chains_per_min:.1f}", correct=f"{stats.correct_rate:.0%}",
                        failed=stats.failed)

    try:
        stats = generate(config, store, model, on_chain=progress, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        bar.close()
        _print("\nstopped: every finished chain is stored; run the same command again to resume")
        return 130
    bar.close()
    _print(json.dumps(stats.summary() | {"db": str(store.path)}, indent=2))
    return 0 if stats.failed < max(1, stats.planned) else 1


def cmd_pairs(args: argparse.Namespace) -> int:
    from fcapp.trainsets import PairPolicy, import_pairs, make_pairs

    store = _store(args)
    if args.import_file:
        imported = import_pairs(args.import_file, store)
        _print(f"imported {imported['pairs']} pairs from {args.import_file} as pair set {imported['policy']!r}")
        return 0
    if not (args.task and args.out):
        raise ValueError("pairs needs --task and --out (or --import FILE)")
    policy = PairPolicy(args.max_per_problem, not args.no_dedup, not args.no_reference)
    card = make_pairs(store, args.task, args.out, policy)
    _print(json.dumps(card, indent=2))
    return 0


def _step_limits(text: str) -> list[int]:
    limits = sorted({int(part) for part in str(text).split(",") if part.strip()})
    if not limits or limits[0] < 1:
        raise argparse.ArgumentTypeError("step limits are whole numbers >= 1, e.g. 10 or 10,20")
    return limits


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """`fcapp eval`'s config: --max-steps may list several limits, the chains run at the largest."""
    return flags.from_args(EvalConfig, args, max_steps=max(args.max_steps), step_limits=args.max_steps)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fcapp.evaluate import evaluate, write_report
    from fcapp.paths import data_home

    config = eval_config(args)
    bar = tqdm(desc=f"eval {config.task}", unit="chain", dynamic_ncols=True, disable=args.json)

    def progress(done: int, total: int, model: str) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(model=model)

    result = evaluate(config, _store(args), on_progress=progress)
    bar.close()
    report = write_report(result, args.report or data_home() / "reports" / f"eval-{result['eval_id']}.html")
    if args.json:
        _print(json.dumps({k: v for k, v in result.items() if k != "per_problem"} | {"report": str(report)}))
        return 0
    for line in result["skipped_rows"]:
        sys.stderr.write(f"skipped {line}\n")
    if config.problems_file:
        _print(f"{config.problems_file}: {result['n']} problems used, "
               f"{len(result['skipped_rows'])} malformed rows skipped")
    for limit, summaries in result["by_step_limit"].items():
        _print(f"\n{result['task']}: n={result['n']} problems, step limit {limit}")
        _print(f"{'model':<20}{'accuracy':>9}{'95% CI':>16}{'valid calls':>12}{'steps':>7}{'tokens':>8}"
               f"{'latency':>9}{'p vs base':>11}")
        for name, s in summaries.items():
            p = "-" if s["p_value_vs_base"] is None else f"{s['p_value_vs_base']:.4f}"
            ci = f"[{s['accuracy_ci'][0]:.2f}, {s['accuracy_ci'][1]:.2f}]"
            _print(f"{name:<20}{s['accuracy']:>9.3f}{ci:>16}{s['valid_call_rate']:>12.3f}{s['mean_steps']:>7.2f}"
                   f"{s['mean_tokens']:>8.1f}{s['mean_latency_s']:>8.2f}s{p:>11}")
    _print(f"report: {report}")
    return 0


def _progress_postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows for a log line of each stage."""
    if row.get("stage") == "grpo":
        return {"reward": f"{row.get('reward', 0):.3f}", "correct": f"{row.get('rewards/correct/mean', 0):.2f}"}
    if row.get("stage") == "dpo":
        return {"loss": f"{row['loss']:.3f}", "margin": f"{row.get('rewards/margins', 0):.2f}",
                "acc": f"{row.get('rewards/accuracies', 0):.2f}"}
    return {"loss": f"{row['loss']:.3f}"} | ({"round": str(row["round"])} if "round" in row else {})


def round_table(rows: list[dict]) -> str:
    """The per-round table of a `rounds` run: held-out accuracy with its interval, valid-call rate."""
    lines = [f"{'round':>5} {'accuracy':>9} {'95% CI':>14} {'valid calls':>12} {'sampled':>8} {'correct':>8} "
             f"{'trained on':>11} {'too long':>9}"]
    for r in rows:
        ci = f"[{r['accuracy_ci'][0]:.2f}, {r['accuracy_ci'][1]:.2f}]"
        lines.append(f"{r['round']:>5} {r['accuracy']:>9.3f} {ci:>14} {r['valid_call_rate']:>12.3f} "
                     f"{r.get('sampled', '-'):>8} {r.get('sampled_correct', '-'):>8} {r.get('train_rows', '-'):>11} "
                     f"{r.get('too_long', '-'):>9}")
    return "\n".join(lines)


def _follow(job, config) -> int:
    """Show a run's progress until it ends (Ctrl-C stops it, saving what it has); the exit code."""
    import time

    from tqdm import tqdm

    from fcapp.training import TERMINAL

    _print(f"{config.method} run {config.name} in a worker process (pid {job.pid}); log: {job.log_path}")
    bar = tqdm(desc=f"{config.method} {config.name}", unit="round" if config.method == "rounds" else "step",
               dynamic_ncols=True)
    shown_rounds = 0
    try:
        while True:
            info = job.poll()
            log = job.read_log()
            steps = [row for row in log if "loss" in row]
            rounds = [row for row in log if row.get("stage") == "round"]
            if rounds and len(rounds) > shown_rounds:  # each round's row as it comes, under one header
                table = round_table(rounds).splitlines()
                bar.write("\n".join(table if shown_rounds == 0 else table[1 + shown_rounds:]))
                shown_rounds = len(rounds)
                bar.total, bar.n = config.rounds, rounds[-1]["round"]
            elif steps and config.method != "rounds":
                bar.total = info.get("max_steps") or bar.total
                bar.n = steps[-1].get("step", bar.n)
                bar.set_postfix(_progress_postfix(steps[-1]))
            bar.refresh()
            if info["status"] in TERMINAL and shown_rounds == len([r for r in job.read_log() if r.get("stage") == "round"]):
                break
            time.sleep(1)
    except KeyboardInterrupt:
        _print("\nstopping (the worker saves what it has)...")
        info = job.stop()
    bar.close()
    if info["status"] == "failed":
        sys.stderr.write(f"training failed: {info.get('error')}\n{info.get('log_tail', '')}\n")
        return 1
    _print(f"{info['status']}: model {config.name} in {config.out / 'model'} (fcapp models)")
    return 0


def _default_name(args: argparse.Namespace, method: str) -> str:
    import time

    what = (args.task or "").split(",")[0] or os.path.splitext(os.path.basename(args.data or ""))[0] or "run"
    return f"{method}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from fcapp.training import start_training
    from fcapp.training.config import config_from_args

    method = args.method or "dpo"
    name = args.name or (os.path.basename(os.path.normpath(args.out_dir)) if args.out_dir else _default_name(args, method))
    if args.pair_set and args.data:
        raise ValueError("give --data FILE or --pair-set NAME, not both")
    config = config_from_args(args, name=name, method=method)
    if args.preview:
        from fcapp.training.job import preview, render_preview

        facts = preview(config, _store(args))
        _print(json.dumps({k: v for k, v in facts.items() if k != "lengths"}, indent=2) if args.json
               else render_preview(facts))
        return 0
    if args.prepare_only:
        from fcapp.training.job import prepare_training

        config_path = prepare_training(config, _store(args) if args.db else None)
        _print(f"run folder ready: {config_path.parent}\nstart it here with `python -m fcapp.training.worker --config "
               f"{config_path}`, or on N GPUs with `accelerate launch --multi_gpu --num_processes N -m "
               f"fcapp.training.worker --config {config_path}`")
        return 0
    return _follow(start_training(config, _store(args) if args.db else None), config)


def cmd_status(args: argparse.Namespace) -> int:
    from fcapp.pipeline import overview, render

    store = _store(args)
    facts = [overview(store, task) for task in ([args.task] if args.task else task_names())]
    _print(json.dumps(facts, indent=2) if args.json else "\n\n".join(render(f) for f in facts))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from fcapp import curation

    store = _store(args)
    who = args.who or os.environ.get("USER") or "cli"
    if args.undo:
        chains = curation.undo(store, args.undo, who)
        _print(f"took back {len(chains)} label(s) of {who} (chains {', '.join(map(str, chains)) or 'none'})")
        return 0
    if args.agreement:
        rows = curation.agreement(store, args.task)
        for row in rows:
            kappa = "-" if row["kappa"] is None else f"{row['kappa']:.2f}"
            _print(f"{' and '.join(row['annotators'])}: {row['chains']} chains labelled by both, agree on "
                   f"{row['agree']} ({row['agree'] / row['chains']:.0%}), Cohen's kappa {kappa}")
        if not rows:
            _print("no chain has labels from two people yet")
        return 0
    if args.bulk:
        flt = curation.ChainFilter(task=args.task, model_id=args.teacher, problem_id=args.problem)
        targets = curation.bulk_targets(store, flt, args.bulk)
        if not args.yes:
            _print(f"{args.bulk} would label {len(targets)} chains as {who}; add --yes to do it")
            return 0
        done = curation.bulk_label(store, flt, args.bulk, who, expected=len(targets))
    elif args.answer is not None:
        done = curation.edit_answer(store, args.chain, args.answer, who)
    elif args.chain is not None and args.value:
        done = curation.label(store, args.chain, args.value, who)
    else:
        raise ValueError("label needs CHAIN accept|reject, CHAIN --answer TEXT, --bulk ACTION, --undo ID, or --agreement")
    _print(done.message + (f" (undo: fcapp label --undo {' '.join(map(str, done.label_ids))})" if done.label_ids else ""))
    return 0


def cmd_improve(args: argparse.Namespace) -> int:
    from fcapp.training import start_training
    from fcapp.training.config import config_from_args

    config = config_from_args(args, name=args.name or _default_name(args, "rounds"), method="rounds")
    return _follow(start_training(config), config)


def cmd_examples(args: argparse.Namespace) -> int:
    from fcapp.trainsets import make_examples

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    card = make_examples(_store(args), tasks, args.out, sources, args.max_per_problem,
                         grounded_only=not args.keep_guesses)
    _print(json.dumps(card, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fcapp.serve import serve

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    serve(args.model, args.host, args.port, api_key=api_key, max_batch=args.max_batch)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fcapp.models.registry import list_models

    models = list_models()
    if args.json:
        _print(json.dumps(models, indent=2))
    elif not models:
        _print("no tuned models yet (fcapp train ...)")
    else:
        for m in models:
            _print(f"{m['name']:<24} {m['created']:<20} base={m['base']}  {m['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fcapp.export import export_gguf

    path = export_gguf(args.name, args.gguf, args.type, overwrite=args.force)
    _print(f"{args.name} -> {path} ({args.type}, {path.stat().st_size / 1e6:.0f} MB); "
           f"e.g. llama-cli -m {path} or an Ollama Modelfile `FROM {path}`")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from fcapp.ui.app import launch

    launch(host=args.host, port=args.port, auth=args.auth, db=args.db,
           allow_unsandboxed_functions=args.allow_unsandboxed_functions, teacher_files=args.teachers,
           teacher_flags=args.teacher)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcapp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("solve", help="solve one problem, streaming the chain step by step")
    p.add_argument("--task", required=True, help=f"one of {', '.join(task_names())}")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--problem-id", help="a problem id or its index in the task (e.g. 0)")
    group.add_argument("--question", help="your own problem text")
    p.add_argument("--expected", help="ground truth for --question, to get a verdict")
    p.add_argument("--json", action="store_true", help="print the whole chain record as JSON")
    p.add_argument("--model", default=EMBEDDED, help=SPEC_HELP)
    _api_key_arg(p)
    flags.add_arguments(p, SolveConfig)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("generate", help="teacher chains: K samples per problem, verified and stored")
    flags.add_arguments(p, GenerateConfig, required=("task",))
    _api_key_arg(p)
    p.add_argument("--db", help="SQLite database (default: the user data folder)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pairs", help="verified chains -> TRL preference file (JSONL or .parquet)")
    p.add_argument("--task")
    p.add_argument("--out", help="output file (.jsonl or .parquet)")
    p.add_argument("--max-per-problem", type=int, default=4)
    p.add_argument("--no-dedup", action="store_true", help="keep identical chains")
    p.add_argument("--no-reference", action="store_true", help="never use reference chains as chosen")
    p.add_argument("--import", dest="import_file", help="import a preference file into the store instead")
    p.add_argument("--db")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("eval", help="base vs tuned on the same held-out problems")
    flags.add_arguments(p, EvalConfig, required=("task",))
    p.add_argument("--max-steps", type=_step_limits, default=[10],
                   help="step limit, or several comma-separated (the paper reports 10,20): the chains run at the "
                        "largest and the smaller limits are read off them exactly")
    p.add_argument("--report", help="HTML report path (default: the data folder's reports/)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--db")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible endpoint for a local model")
    p.add_argument("--model", default=EMBEDDED, help=f"a local model; followed by {QUANTISED}, decoded with "
                                                     "quantised weights (faster; fp32, the default, is the reference)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="the most concurrent requests decoded together in one batch")
    p.add_argument("--api-key-env", help="require the bearer key held in this environment variable "
                                         "(needed for a non-loopback host; a key on the command line would show in ps)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("examples", help="verified chains -> SFT examples (JSONL or .parquet)")
    p.add_argument("--task", required=True, help="task, or several comma-separated (one mixed set)")
    p.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    p.add_argument("--sources", default="reference,teacher,human",
                   help="which correct chains: reference, teacher (verifier-accepted), human (accepted by a person)")
    p.add_argument("--max-per-problem", type=int, default=4)
    p.add_argument("--keep-guesses", action="store_true",
                   help="also keep teacher chains whose right answer their own last tool result does not give")
    p.add_argument("--db")
    p.set_defaults(func=cmd_examples)

    from fcapp.training.config import add_arguments

    p = sub.add_parser("train", help="SFT, DPO or GRPO in a worker process (see fcapp/training/config.py)")
    add_arguments(p, methods=("sft", "dpo", "grpo"), skip=("method", "data"))
    p.add_argument("--method", choices=["sft", "dpo", "grpo"], help="training method (default: dpo)")
    p.add_argument("--data", "--pairs", dest="data",
                   help="training file: preference pairs (dpo) or SFT examples (sft); default: built from the "
                        "store's chains of --task")
    p.add_argument("--db", help="SQLite store the data is built from (default: the data folder's)")
    p.add_argument("--preview", action="store_true",
                   help="show what the run would train on (rows, token lengths, steps, estimated time) and stop")
    p.add_argument("--json", action="store_true", help="with --preview: print it as JSON")
    p.add_argument("--prepare-only", action="store_true",
                   help="check everything and write the run folder, then print the worker command (e.g. for "
                        "accelerate launch) instead of starting it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("status", help="where each task stands: problems, chains, pairs, tuned models, evaluations, "
                                      "and the next step")
    p.add_argument("--task", help="one task (default: every task)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--db")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("label", help="label stored chains: accept / reject / edit one, bulk actions, undo, agreement")
    p.add_argument("chain", nargs="?", type=int, help="chain id")
    p.add_argument("value", nargs="?", choices=["accept", "reject"])
    p.add_argument("--answer", help="edit the chain's final answer instead (checked by the task, re-verified)")
    p.add_argument("--bulk", choices=["accept-verified", "reject-failed"],
                   help="label every unlabelled chain of --task (and --teacher / --problem) the verifier found "
                        "correct (accept-verified) or incorrect (reject-failed)")
    p.add_argument("--yes", action="store_true", help="with --bulk: do it (without: only count)")
    p.add_argument("--undo", type=int, nargs="+", metavar="LABEL_ID", help="take back labels you gave")
    p.add_argument("--agreement", action="store_true", help="agreement between people who labelled the same chains")
    p.add_argument("--task")
    p.add_argument("--teacher")
    p.add_argument("--problem")
    p.add_argument("--who", help="your name in the label history (default: $USER)")
    p.add_argument("--db")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("improve", help="iterative rounds: sample with the current model, verify, train, evaluate")
    add_arguments(p, methods=("rounds",), skip=("method", "data", "warmup_steps", "warmup_data"))
    p.set_defaults(func=cmd_improve)

    p = sub.add_parser("models", help="list tuned models, newest first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp and Ollama")
    p.add_argument("name", help=f"a tuned model's name (fcapp models), '{EMBEDDED}' or a model folder")
    p.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write")
    p.add_argument("--type", choices=GGUF_TYPES, default=GGUF_TYPES[0],
                   help="weight type of the matrices: q8_0 (8-bit, half of f16's size) or f16")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("app", help="start the Gradio app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", help="user:password (required for a non-loopback host)")
    p.add_argument("--db", help="SQLite database path")
    p.add_argument("--teachers", action="append", default=[], metavar="FILE",
                   help='HTTP teachers the browser may pick, as {"teachers": [{"name", "url", "model", "key_env"}]} '
                        "(also read: teachers.json in the data folder)")
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=URL#MODEL[,KEY_ENV]",
                   help="one more HTTP teacher; its key (the value of KEY_ENV) is only ever sent to URL")
    p.add_argument("--allow-unsandboxed-functions", action="store_true",
                   help="where the machine has no OS sandbox (bubblewrap namespaces), run user functions "
                        "with resource limits only instead of refusing them")
    p.set_defaults(func=cmd_app)
    return parser


QUIET_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():  # no telemetry, no analytics: nothing calls outside hosts
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _print("\ninterrupted")
        return 130
    except sqlite3.DatabaseError as exc:  # damaged after it was opened
        from fcapp.store import damaged, default_db_path

        sys.stderr.write(f"error: {damaged(getattr(args, 'db', None) or default_db_path(), exc)}\n")
        return 2
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"error: {message}\n")
        return 2
