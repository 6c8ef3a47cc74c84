"""`python -m benchmarks.dpo`: DPO seconds per pair and peak memory, LoRA against full fine-tuning, on CPU.

Both methods run the real training path, the one `fcapp train` takes: `start_training` validates the
pairs and starts `python -m fcapp.train` in its own process, which writes one log.jsonl line per
optimizer step. The pairs are real agent pairs: GSM8K reference chains (chosen) against wrong chains
built with the same agent and tools (rejected), exported with `fcapp.pairs.make_pairs` from a
temporary store.

- seconds per pair: the time between consecutive log lines (one optimizer step of batch_size x
  grad_accum pairs) divided by the pairs in a step, and the worker's CPU time over the same steps
  (less disturbed by other load); the first step (warm-up: lazy allocations, first-call overheads)
  is reported on its own and left out. TrainConfig's defaults throughout, except grad_accum 1
  (2 pairs a step, half the default's 4) so that two timed steps per method fit the time budget.
- peak memory: the training worker's peak resident set. Each method runs under its own small
  launcher process whose only child is the worker, so RUSAGE_CHILDREN's ru_maxrss is the worker's
  alone (whole run, including the save at the end); the launcher also reads the worker's VmHWM from
  /proc when each step is logged (peak during the steps).

The two methods run one after the other, never together. About 2.5 minutes on the idle 2-core box,
8.5 with other jobs taking about one of its cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import log, publish
from benchmarks.report import machine as machine_basics

RESULTS = Path(__file__).with_name("dpo_results.md")
TASK = "gsm8k"
METHODS = ("lora", "full")
STEPS = 3  # optimizer steps per method: 1 warm-up + 2 timed
GRAD_ACCUM = 1  # 2 pairs per step; TrainConfig's default 2 x 2 takes twice as long a step, with one optimizer update per 4 pairs
GB = 1e9


# ---- the pairs ------------------------------------------------------------------------------------
def wrong_chain(task: Any, problem: Any, index: int) -> Any:
    """A verified-incorrect chain of the same agent and tools, shaped like a small model's mistakes:
    even problems stop one calculation early and answer the last result; odd ones do every
    calculation and then answer a slightly different number."""
    from fcapp.records import Call
    from fcapp.solve import finish, start_chain

    calls = list(task.reference_calls(problem))
    work, final = calls[:-1], calls[-1]
    if index % 2 == 0 and len(work) > 1:
        work = work[:-1]
        answer = None  # the last tool result, filled in below
    else:
        answer = str(final.arguments["answer"]).replace(",", "")
        try:
            answer = str(int(float(answer)) + 1 + index % 3)
        except ValueError:
            answer = answer + "0"
    agent, chain = start_chain(task, problem, "benchmark-wrong")
    chain.seed = index
    if answer is None:
        answer = str(agent.replay_steps(work)[-1].result)
    agent.replay(chain, work + [Call(final.name, {"answer": answer})])
    chain.reference = False
    return finish(task, problem, chain)


def build_pairs_file(folder: Path, count: int) -> tuple[Path, list[dict[str, Any]]]:
    """`count` preference rows from the first GSM8K train problems, exported the way `fcapp pairs` does."""
    from fcapp.pairs import PairPolicy, make_pairs
    from fcapp.solve import reference_chain
    from fcapp.store import Store
    from fcapp.tasks import get_task

    task = get_task(TASK)
    store = Store(folder / "bench.db")
    added = 0
    for index, problem in enumerate(task.split("train")):
        if added == count:
            break
        if task.reference_calls(problem) is None:
            continue
        good = reference_chain(task, problem)
        bad = wrong_chain(task, problem, index)
        if not (good and good.verdict) or bad.verdict is not False:
            continue
        store.add_chain(good, True, role="reference")
        store.add_chain(bad, False)
        added += 1
    path = folder / "pairs.jsonl"
    make_pairs(store, TASK, path, PairPolicy(max_pairs_per_problem=1))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return path, rows


def token_lengths(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Tokens as the trainer sees them (chat template applied), per row."""
    from fcapp.train import load_tokenizer

    tokenizer = load_tokenizer("smollm2")

    def length(messages: list[dict[str, Any]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    prompt = [length(r["prompt"]) for r in rows]
    return {"prompt": prompt,
            "prompt + chosen": [length(r["prompt"] + r["chosen"]) for r in rows],
            "prompt + rejected": [length(r["prompt"] + r["rejected"]) for r in rows]}


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))} (median {fmt.format(statistics.median(values))})"


# ---- trainable parameters -------------------------------------------------------------------------
def trainable_parameters(config: Any) -> dict[str, int]:
    """Parameters the optimizer updates under each method, for the LoRA settings the worker uses."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fcapp.models.registry import resolve_model_path
    from fcapp.train import _lora

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.base), dtype=torch.float32)
    full = sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, _lora(config))
    return {"full": full, "lora": sum(p.numel() for p in lora.parameters() if p.requires_grad)}


# ---- one method, in its own launcher process ------------------------------------------------------
def vm_hwm(pid: int) -> int | None:
    """Peak resident set of a live process in bytes (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, all processes), from /proc/stat."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def launch(config_path: str) -> int:
    """Launcher: start the training worker as `fcapp train` does, wait for it, report its peak memory.

    The worker is this process's only child, so RUSAGE_CHILDREN's ru_maxrss (the largest reaped
    child's peak) is the worker's. When each step is logged (seen within 0.2 s), it notes the time,
    the worker's CPU time and VmHWM, and the machine's busy CPU time."""
    from fcapp.files import read_log
    from fcapp.train import TrainConfig, start_training

    config = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    job = start_training(config)
    pid, at_step = job.pid, []
    try:
        while job.process is not None and job.process.poll() is None:
            logged = len(read_log(job.log_path))
            if logged > len(at_step):
                snapshot = {"t": time.monotonic(), "cpu": cpu_seconds(pid), "busy": busy_seconds(), "hwm": vm_hwm(pid)}
                at_step += [snapshot] * (logged - len(at_step))
            time.sleep(0.2)
    except BaseException:  # Ctrl-C: the worker has its own session and would go on training
        os.killpg(pid, signal.SIGKILL)
        raise
    info = job.wait()
    print(json.dumps({"status": info["status"], "error": info.get("error"), "pid": pid, "at_step": at_step,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # KiB on Linux
                      "launcher_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0 if info["status"] == "finished" else 1


def run_method(config: Any, folder: Path) -> dict[str, Any]:
    """One method's run under its launcher: per timed step its wall time (log.jsonl), the worker's CPU
    time and what the other processes used meanwhile (in cores); peaks; losses."""
    from fcapp.files import read_log

    config_path = folder / f"{config.method}.json"
    config_path.write_text(json.dumps(config.to_dict()))
    done = subprocess.run([sys.executable, "-m", "benchmarks.dpo", "--launch", str(config_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"status": "failed", "error": done.stderr[-2000:]}
    if report["status"] != "finished":
        worker_log = config.out / "worker.log"
        tail = worker_log.read_text()[-3000:] if worker_log.exists() else ""
        raise RuntimeError(f"{config.method} run {report['status']}: {report.get('error')}\n{tail}")
    steps = [r for r in read_log(config.out / "log.jsonl") if r.get("stage") == "dpo"]
    elapsed = [r["elapsed_s"] for r in steps]
    wall = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    timed = []
    for i, (before, after) in enumerate(zip(report["at_step"], report["at_step"][1:]), start=1):
        cpu = after["cpu"] - before["cpu"] if after["cpu"] is not None and before["cpu"] is not None else None
        others = None
        if cpu is not None and after["busy"] is not None and before["busy"] is not None:
            others = max(0.0, (after["busy"] - before["busy"] - cpu) / max(after["t"] - before["t"], 1e-9))
        timed.append({"wall": wall[i], "cpu": cpu, "others": others})
    hwm = [s["hwm"] for s in report["at_step"] if s["hwm"]]
    return {"warmup_s": wall[0], "timed": timed, "losses": [r["loss"] for r in steps],
            "steps_peak": max(hwm) if hwm else None, "peak": report["ru_maxrss"], "launcher_peak": report["launcher_maxrss"]}


# ---- the machine ----------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    import torch
    import transformers
    import trl

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    return machine_basics() | {
        "torch threads (worker default)": str(torch.get_num_threads()),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "peft": peft_version,
    }


def run(steps: int, grad_accum: int, rounds: int) -> tuple[dict[str, str], list[str], list[dict[str, Any]]]:
    from fcapp.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    per_step = defaults["batch_size"] * grad_accum
    pair_count = per_step * steps  # each pair is seen once per run

    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, trl {info['trl']}")
    with tempfile.TemporaryDirectory(prefix="fcapp-dpo-bench-") as tmp:
        folder = Path(tmp)
        os.environ["FCAPP_HOME"] = str(folder / "home")  # no user functions or models from the real home
        log(f"building {pair_count} GSM8K pairs")
        pairs, rows = build_pairs_file(folder, pair_count)
        lengths = token_lengths(rows)
        base = TrainConfig(pairs=str(pairs), name="bench", grad_accum=grad_accum)
        notes = [
            f"pairs: {len(rows)} GSM8K pairs (reference chain vs a wrong chain built with the same agent and tools), "
            f"tokens with the chat template: prompt {spread(lengths['prompt'])}, "
            f"prompt + chosen {spread(lengths['prompt + chosen'])}, "
            f"prompt + rejected {spread(lengths['prompt + rejected'])}",
            f"settings: TrainConfig defaults (batch_size {base.batch_size}, max_length {base.max_length}, "
            f"learning rate per method, LoRA r {base.lora_r} / alpha {base.lora_alpha} on "
            f"{', '.join(base.lora_targets)}, fp32, no activation checkpointing) except grad_accum {grad_accum} "
            f"(default {defaults['grad_accum']}): {per_step} pairs per optimizer step; max_steps {steps}, step 1 is "
            f"the warm-up, steps 2-{steps} are timed; {rounds} run(s) per method, taken in turns"
            + (" (LoRA, full, LoRA, full ...)" if rounds > 1 else " (LoRA, then full)"),
        ]
        log("counting trainable parameters")
        params = trainable_parameters(base)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for round_ in range(rounds):
            for method in METHODS:  # one after the other, never together
                config = TrainConfig(pairs=str(pairs), name=f"bench-{method}-{round_}", method=method,
                                     max_steps=steps, grad_accum=grad_accum, save_steps=10_000,
                                     out_dir=str(folder / "runs" / f"{method}-{round_}"))
                log(f"{method}: {steps} DPO steps in a worker process")
                result = run_method(config, folder)
                runs[method].append(result)
                log(f"{method}: timed steps " + ", ".join(f"{t['wall']:.1f} s" for t in result["timed"])
                    + f" (warm-up {result['warmup_s']:.1f} s), other load "
                    + ", ".join("?" if t["others"] is None else f"{t['others']:.1f}" for t in result["timed"])
                    + f" cores, peak RSS {gb(result['peak'])}")
    info["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for method, method_runs in runs.items():
        timed = [t for r in method_runs for t in r["timed"]]
        cpu = [t["cpu"] for t in timed if t["cpu"] is not None]
        others = [t["others"] for t in timed if t["others"] is not None]
        results.append({
            "method": method, "params": params[method], "timed": timed,
            "s_per_pair": statistics.mean(t["wall"] for t in timed) / per_step,
            "best_s_per_pair": min(t["wall"] for t in timed) / per_step,
            "cpu_s_per_pair": statistics.mean(cpu) / per_step if cpu else None,
            "others": statistics.mean(others) if others else None,
            "warmups": [r["warmup_s"] for r in method_runs], "losses": method_runs[0]["losses"],
            "steps_peak": max((r["steps_peak"] or 0 for r in method_runs), default=0) or None,
            "peak": max(r["peak"] for r in method_runs), "launcher_peak": max(r["launcher_peak"] for r in method_runs),
        })
    return info, notes, results


def gb(value: float | None) -> str:
    return "?" if not value else f"{value / GB:.2f} GB"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def render(info: dict[str, str], notes: list[str], results: list[dict[str, Any]]) -> str:
    by = {r["method"]: r for r in results}
    lines = ["# DPO benchmark: LoRA vs full fine-tuning on CPU", "",
             "Produced by `python -m benchmarks.dpo` (benchmarks/README.md says what it measures). The absolute "
             "numbers move with the machine's load (below); the two methods ran one after the other.", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| method | trainable params | s/pair | s/pair, best step | CPU s/pair | timed steps, s "
              "(other load, cores) | warm-up step, s | peak RSS, steps | peak RSS, whole run | loss by step |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cpu = f"{r['cpu_s_per_pair']:.1f}" if r["cpu_s_per_pair"] else "?"
        steps = ", ".join(f"{t['wall']:.1f} ({'?' if t['others'] is None else format(t['others'], '.1f')})"
                          for t in r["timed"])
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.2f} M | {r['s_per_pair']:.1f} | "
                     f"{r['best_s_per_pair']:.1f} | {cpu} | {steps} | {', '.join(f'{w:.1f}' for w in r['warmups'])} | "
                     f"{gb(r['steps_peak'])} | {gb(r['peak'])} | {' '.join(f'{x:.3f}' for x in r['losses'])} |")
    if "lora" in by and "full" in by:
        lora, full = by["lora"], by["full"]
        lines.append(f"| full / LoRA | {full['params'] / lora['params']:.0f}x | "
                     f"{ratio(full['s_per_pair'], lora['s_per_pair'])} | "
                     f"{ratio(full['best_s_per_pair'], lora['best_s_per_pair'])} | "
                     f"{ratio(full['cpu_s_per_pair'], lora['cpu_s_per_pair'])} | | | "
                     f"{ratio(full['steps_peak'], lora['steps_peak'])} | {ratio(full['peak'], lora['peak'])} | |")
    lines += ["", "s/pair: wall time of the timed optimizer steps (from log.jsonl) over the pairs they trained on; "
              "best step: the fastest of them, the one least disturbed by other load. CPU s/pair: the worker's "
              "user + system CPU time over the same steps (read from /proc as each step was logged; it grows too "
              "when other processes compete, as the worker's threads wait for each other). Other load: the CPU the "
              "rest of the machine used during each step (busy time in /proc/stat minus the worker's), in cores "
              f"out of {info.get('cores', '?')}. Peak RSS is the training worker's own: \"steps\" is its VmHWM "
              "when the last step was logged, \"whole run\" its ru_maxrss (the worker is the only child of a "
              "launcher process per method), which also covers saving the checkpoint and the model at the end. "
              "The launchers' own peaks, for comparison: "
              + ", ".join(f"{r['method']} {gb(r['launcher_peak'])}" for r in results) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/dpo_results.md as it is")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (the first is the warm-up)")
    parser.add_argument("--grad-accum", type=int, default=GRAD_ACCUM,
                        help="gradient accumulation (pairs per step = batch_size 2 x this)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per method, in turns (2 gives steadier numbers on a busy machine, twice the time)")
    parser.add_argument("--launch", metavar="CONFIG", help=argparse.SUPPRESS)  # internal: one method's launcher
    args = parser.parse_args()
    if args.launch:
        sys.exit(launch(args.launch))
    if args.steps < 2 or args.grad_accum < 1 or args.rounds < 1:
        parser.error("--steps must be at least 2 (the first step is the warm-up); --grad-accum and --rounds at least 1")
    began = time.time()
    info, notes, results = run(args.steps, args.grad_accum, args.rounds)
    publish(began, info, lambda info: render(info, notes, results), RESULTS, not args.no_write)


if __name__ == "__main__":
    main()
