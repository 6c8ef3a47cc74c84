"""`python -m benchmarks.decode [--llama-bench PATH]`: measure the local backend and the agent loop,
print a table of ratios and write it to benchmarks/results.md.

Each ratio compares two things measured in this run on this machine. A shared CPU is noisy, so every
timing is the best of two tries, taken in turns with what it is compared to. Each decode precision
(fp32, int8, int4) gets its rows, and with `--llama-bench` (a llama.cpp `llama-bench` binary, built
apart from the project) llama.cpp's decode and prefill on the same GGUF are measured in turns with
fcapp's. 6-10 minutes on the 2-core box, depending on what else runs on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import transformers

from benchmarks.report import Row, arguments, log, publish, table
from benchmarks.report import machine as machine_basics
from fcapp.batching import solve_batch
from fcapp.models.base import Message
from fcapp.models import llama_step
from fcapp.models.cpu import decode_bytes, lay_out_for_decode
from fcapp.models.local import DRAFT_TOKENS, LocalModel
from fcapp.models.registry import PRECISIONS, embedded_gguf, embedded_model_dir, gguf_to_folder
from fcapp.records import Chain
from fcapp.solve import SolveConfig, solve, start_chain
from fcapp.tasks import get_task
from fcapp.tasks.base import Problem, Task

RESULTS = Path(__file__).with_name("results.md")
PROBLEM = "gsm8k-5"  # greedy SmolLM2 goes on to the 5-step limit on it
CHAIN = SolveConfig(max_steps=5, max_new_tokens=48)
SAMPLES = [SolveConfig(4, 0.8, 0.95, 48, seed=k) for k in range(8)]
DECODE = 48  # tokens per decode-rate measurement
T = TypeVar("T")


def timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def best_of(repeat: int, run: Callable[[], float]) -> float:
    """The smallest of `repeat` timings: the one least disturbed by other processes."""
    return min(run() for _ in range(repeat))


@contextlib.contextmanager
def threads_set(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_threads(threads: int, run: Callable[[], float]) -> float:
    with threads_set(threads):
        return run()


# ---- the machine ----------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    return machine_basics() | {"torch": torch.__version__, "transformers": transformers.__version__}


def read_bandwidth() -> float:
    """Memory read bandwidth in bytes/s: summing a 256 MiB tensor (far bigger than any cache), with
    1 thread and with all."""
    data = torch.ones(64 * 2**20)
    rates = []
    for threads in sorted({1, torch.get_num_threads()}):
        with threads_set(threads):
            data.sum()
            rates.append(data.numel() * 4 / best_of(10, lambda: timed(data.sum)))
    return max(rates)


# ---- forward passes without the agent ---------------------------------------------------------------
def bare_decode(model: LocalModel, ids: list[int], n: int, mode: Callable = torch.inference_mode) -> tuple[float, float]:
    """(prefill s, decode s): encode `ids` the way the agent does (reusing the cache) and greedily
    decode n tokens with nothing else: no chat template, no detokenising, no call parsing, no tools."""
    with mode():
        began = time.perf_counter()
        logits = model._prefill([ids])
        middle = time.perf_counter()
        for _ in range(n - 1):
            logits = model._state.feed(model.model, [[int(logits[0].argmax())]], model.pad_id,
                                       model.hand_written_decode)
        return middle - began, time.perf_counter() - middle


def decode_seconds(model: LocalModel, ids: list[int], mode: Callable = torch.inference_mode) -> float:
    """Seconds for one sequence to decode DECODE tokens after `ids` (cold cache)."""
    model.clear_cache()
    return bare_decode(model, ids, DECODE + 1, mode)[1]


def prefill_seconds(model: LocalModel, ids: list[int]) -> float:
    model.clear_cache()
    return bare_decode(model, ids, 1)[0]


def batch_step(model: LocalModel, ids: list[int], rows: int = 8) -> float:
    """Seconds of one decode step of `rows` sequences after `ids` (the best of 6 steps)."""
    model.clear_cache()
    with torch.inference_mode():
        logits = model._prefill([ids] * rows)
        times = []
        for _ in range(6):
            began = time.perf_counter()
            logits = model._state.feed(model.model, [[t] for t in logits.argmax(-1).tolist()], model.pad_id,
                                       model.hand_written_decode)
            times.append(time.perf_counter() - began)
    return min(times)


def plain_generate_rate(ids: list[int]) -> float:
    """Decode tokens/s of transformers' own `generate` on a plainly loaded model, timed between its
    first and last new token (prefill excluded)."""
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    plain = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()

    def run() -> float:
        clock = Clock()
        plain.generate(torch.tensor([ids]), max_new_tokens=DECODE + 1, min_new_tokens=DECODE + 1, do_sample=False,
                       pad_token_id=plain.config.eos_token_id, stopping_criteria=StoppingCriteriaList([clock]))
        return clock.times[-1] - clock.times[0]
    return DECODE / best_of(3, run)


@contextlib.contextmanager
def plain_layout(model: LocalModel) -> Iterator[None]:
    """Store the Linear weights the usual way ([out, in] rows) for a while."""
    for module in model.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()
    try:
        yield
    finally:
        lay_out_for_decode(model.model)


def with_plain_layout(model: LocalModel, run: Callable[[], float]) -> float:
    with plain_layout(model):
        return run()


def without_sharing(run: Callable[[], float]) -> float:
    """`run` with every batched pass attending to each row's own copy of the columns the rows share."""
    least = llama_step.SHARED_MIN
    llama_step.SHARED_MIN = 1 << 62
    try:
        return run()
    finally:
        llama_step.SHARED_MIN = least


def layers_in_python(run: Callable[[], float]) -> float:
    """`run` with the hand-written pass's layers' loop run by Python instead of TorchScript."""
    llama_step.SCRIPTED = False
    try:
        return run()
    finally:
        llama_step.SCRIPTED = True


def layer_matmuls_seconds(model: LocalModel) -> float:
    """Seconds of one token's layer matmuls alone: one row through each of the 120 projection groups
    in the order a pass reads their weights (by the scripted pass's own `_project`), so the weights
    come from memory as in a pass; the best of 10. The floor the layers' other operations add to."""
    stack, _ = llama_step._stack_of(model.model)
    bits, threads = stack.bits, torch.get_num_threads()
    inputs = [torch.randn(1, group[0].shape[1]) for group in stack.fp32]  # each group's input width

    def every_matmul() -> None:
        for g, x in enumerate(inputs):
            stack._project(x, g, bits, threads)
    with torch.inference_mode():
        every_matmul()
        return best_of(10, lambda: timed(every_matmul))


def with_transformers_forward(model: LocalModel, run: Callable[[], float]) -> float:
    """`run` with every pass through transformers' forward instead of the hand-written decode pass."""
    model.hand_written_decode = False
    try:
        return run()
    finally:
        model.hand_written_decode = True


# ---- chains ------------------------------------------------------------------------------------------
def record(chain: Chain) -> list:
    return [(s.text, s.result, s.error) for s in chain.steps] + [chain.answer]


def first_prompt(task: Task, problem: Problem) -> list[Message]:
    """A chain's first prompt: system prompt with the injected functions, worked example, question."""
    return start_chain(task, problem, "bench", CHAIN)[1].messages()


def run_chain(model: LocalModel, task: Task, problem: Problem, prefix_cache: bool = True) -> tuple[float, float, Chain]:
    """(seconds, decode tokens/s of the model inside the loop, chain) of solving from a cold cache."""
    model.clear_cache()
    model.prefix_cache = prefix_cache
    steps, seconds, began = model.stats.decode_steps, model.stats.decode_s, time.perf_counter()
    try:
        chain = solve(task, problem, model, CHAIN)
    finally:
        model.prefix_cache = True
    rate = (model.stats.decode_steps - steps) / (model.stats.decode_s - seconds)
    return time.perf_counter() - began, rate, chain


def one_token_passes(model: LocalModel) -> LocalModel:
    """`model` decoding one token a pass: the rows that time decode passes or count tokens per pass
    measure that loop; drafted runs (a lone greedy row checking prompt-lookup guesses) have their own."""
    model.draft_tokens = 0
    return model


def drafting_rows(model: LocalModel) -> list[Row]:
    """Greedy chains of three tasks (the first 4 problems of each, step limit 5), solved with drafted
    runs and with one token a pass, in turns: wall time, decode time and passes, and whether the
    chains are the same."""
    rows = []
    for name in ("fol", "folio", "gsm8k"):
        task = get_task(name)
        problems = task.problems()[:4]

        def solved(draft: int) -> tuple[float, float, int, list[Chain]]:
            model.draft_tokens, stats = draft, model.stats
            model.clear_cache()
            passes, decode, began = stats.decode_steps, stats.decode_s, time.perf_counter()
            try:
                chains = [solve(task, problem, model, SolveConfig(max_steps=5, max_new_tokens=200)) for problem in problems]
            finally:
                model.draft_tokens = 0
            return time.perf_counter() - began, stats.decode_s - decode, stats.decode_steps - passes, chains

        drafted, plain = paired(lambda: solved(DRAFT_TOKENS), lambda: solved(0), key=seconds_of)
        same = [record(c) for c in drafted[3]] == [record(c) for c in plain[3]]
        tokens = sum(step.completion_tokens for chain in plain[3] for step in chain.steps)
        rows.append(Row(f"{name}: 4 greedy chains, drafted runs ({DRAFT_TOKENS} guesses) vs one token a pass",
                        f"{drafted[0]:.1f} vs {plain[0]:.1f} s; decode {drafted[1]:.1f} s in {drafted[2]} passes vs "
                        f"{plain[1]:.1f} s in {plain[2]}, {tokens} tokens; chains identical: {'yes' if same else 'NO'}",
                        f"{plain[0] / drafted[0]:.2f}x"))
    return rows


def raw_replay(model: LocalModel, chain: Chain) -> float:
    """Seconds for the bare loop to produce the chain's tokens: each step's prompt (tokenised
    beforehand, the cache reused as the agent does) and as many greedy tokens as that step made."""
    steps = [(model.encode(dataclasses.replace(chain, steps=chain.steps[:i]).messages()), s.completion_tokens)
             for i, s in enumerate(chain.steps)]
    model.clear_cache()
    return sum(sum(bare_decode(model, ids, max(n, 1))) for ids, n in steps)


def paired(first: Callable[[], T], second: Callable[[], T], rounds: int = 2,
           key: Callable[[T], float] | None = None) -> tuple[T, T]:
    """The best (smallest `key`) result of each of two measurements, taken in turns so that both see
    the same moments of a noisy machine."""
    a, b = [], []
    for _ in range(rounds):
        a.append(first())
        b.append(second())
    return min(a, key=key), min(b, key=key)  # type: ignore[type-var]


def seconds_of(result: tuple) -> float:
    return result[0]


# ---- the run -----------------------------------------------------------------------------------------
def run(llama: Path | None = None) -> tuple[dict[str, str], list[Row]]:
    info = machine()
    rows: list[Row] = []
    task = get_task("gsm8k")
    problem = task.get(PROBLEM)

    log("memory bandwidth")
    bandwidth = read_bandwidth()

    log("model load: cached folder vs converting the GGUF")
    embedded_model_dir()  # the cache exists before it is timed
    cached = best_of(2, lambda: timed(lambda: LocalModel(threads=1)))
    with tempfile.TemporaryDirectory(prefix="fcapp-bench-") as tmp:
        converted = timed(lambda: gguf_to_folder(embedded_gguf(), Path(tmp) / "model"))
    rows.append(Row("model load: cached folder vs converting the GGUF", f"{converted:.1f} s vs {cached:.2f} s",
                    f"{converted / cached:.1f}x", ">= 5x", converted / cached >= 5))

    model = one_token_passes(LocalModel(threads=1))
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    ids = model.encode(first_prompt(task, problem))

    log("threads")
    most = torch.get_num_threads()

    def by_threads(measure: Callable[[], float]) -> dict[int, float]:
        """{threads: best seconds} of `measure` with all cores and with one, taken in turns."""
        many, single = paired(lambda: with_threads(most, measure), lambda: with_threads(1, measure))
        return {most: many, 1: single}
    one = by_threads(lambda: decode_seconds(model, ids) / DECODE)
    step = by_threads(lambda: batch_step(model, ids))
    prefill = by_threads(lambda: prefill_seconds(model, ids))
    threads = min(one, key=one.get)
    model.threads = threads
    for name, times, unit in (("decode step, 1 sequence", one, "ms"), ("decode step, 8 sequences", step, "ms"),
                              (f"prefill of {len(ids)} tokens", prefill, "s")):
        scale = 1e3 if unit == "ms" else 1
        rows.append(Row(f"threads: {name}, {most} vs 1", f"{times[most] * scale:.3g} vs {times[1] * scale:.3g} {unit}",
                        f"{times[1] / times[most]:.2f}x"))
    rows.append(Row("decode throughput: 8 sequences in a batch vs 1", f"{step[threads] * 1e3:.0f} ms/step for 8 vs "
                    f"{one[threads] * 1e3:.0f} ms for 1 ({threads} thread(s))", f"{8 * one[threads] / step[threads]:.2f}x"))

    with threads_set(threads):
        log("decode rates")
        ours, plain_rows = paired(lambda: decode_seconds(model, ids), lambda: with_plain_layout(model, lambda: decode_seconds(model, ids)))
        rows.append(Row("weights laid out [in, out] vs [out, in] (fp32 decode)",
                        f"{DECODE / ours:.1f} vs {DECODE / plain_rows:.1f} tok/s", f"{plain_rows / ours:.2f}x"))
        mine, theirs = paired(lambda: decode_seconds(model, ids),
                              lambda: with_transformers_forward(model, lambda: decode_seconds(model, ids)))
        rows.append(Row("hand-written decode pass vs transformers' forward (fp32 decode, the same logits)",
                        f"{DECODE / mine:.1f} vs {DECODE / theirs:.1f} tok/s", f"{theirs / mine:.2f}x"))
        inference, no_grad = paired(lambda: decode_seconds(model, ids), lambda: decode_seconds(model, ids, torch.no_grad))
        rows.append(Row("inference_mode vs no_grad (decode)", f"{DECODE / inference:.1f} vs {DECODE / no_grad:.1f} tok/s",
                        f"{no_grad / inference:.2f}x"))
        plain = plain_generate_rate(ids)

        log("5-step chain: prefix cache on vs off")
        on, off = paired(lambda: run_chain(model, task, problem, True), lambda: run_chain(model, task, problem, False),
                         key=seconds_of)
        chain = on[2]
        same = record(on[2]) == record(off[2])
        rows.append(Row(f"{len(chain.steps)}-step chain: prefix reuse vs re-encoding each step",
                        f"{off[0]:.1f} s vs {on[0]:.1f} s, chains identical: {'yes' if same else 'NO'}",
                        f"{off[0] / on[0]:.2f}x", ">= 1.5x", off[0] / on[0] >= 1.5 and same))

        log("greedy chains: drafted runs vs one-token passes")
        rows += drafting_rows(model)

        log("agent loop vs the bare loop")
        agent, raw = paired(lambda: run_chain(model, task, problem)[:2], lambda: (raw_replay(model, chain), 0.0))
        overhead = agent[0] / raw[0] - 1
        rows.append(Row("agent loop vs raw decode of the same tokens", f"{agent[0]:.2f} s vs {raw[0]:.2f} s",
                        f"{overhead * 100:+.1f}%", "<= +10%", overhead <= 0.10))
        loop_rate = max(on[1], agent[1])
        bound = bandwidth / weights
        rows.append(Row("decode in the agent loop vs plain model.generate", f"{loop_rate:.1f} vs {plain:.1f} tok/s",
                        f"{loop_rate / plain:.2f}x"))
        rows.append(Row("decode in the agent loop vs memory-bandwidth bound",
                        f"{loop_rate:.1f} vs {bound:.1f} tok/s ({bandwidth / 1e9:.1f} GB/s / {weights / 1e6:.0f} MB)",
                        f"{loop_rate / bound * 100:.1f}%", ">= 50%", loop_rate / bound >= 0.5))
        rows.append(Row("plain model.generate vs memory-bandwidth bound", f"{plain:.1f} vs {bound:.1f} tok/s",
                        f"{plain / bound * 100:.1f}%"))

        log("threads chosen by measurement")
        chosen, fixed = paired(lambda: run_chain(one_token_passes(LocalModel()), task, problem),  # threads=None: the default
                               lambda: run_chain(model, task, problem), key=seconds_of)
        rows.append(Row(f"chain with threads chosen by measurement vs fixed at the best ({threads})",
                        f"{chosen[0]:.2f} s vs {fixed[0]:.2f} s", f"{chosen[0] / fixed[0] - 1:+.1%}"))

        log("bf16")
        rows += bf16_rows(model, ids, chain, bandwidth, task, problem)

        log("precisions" + (" and llama.cpp" if llama else ""))
        rows += precision_rows(model, ids, bandwidth, llama, task, problem, chain)

    info["threads used"] = str(threads)
    info["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return info, rows


def bf16_rows(model: LocalModel, ids: list[int], chain: Chain, bandwidth: float, task: Task, problem: Problem) -> list[Row]:
    """bf16 against fp32: the speed of each kind of pass, and how often it picks the same next token."""
    half = LocalModel(dtype="bfloat16", threads=torch.get_num_threads())
    decode = paired(lambda: decode_seconds(model, ids), lambda: decode_seconds(half, ids))
    step = paired(lambda: batch_step(model, ids), lambda: batch_step(half, ids))
    prefill = paired(lambda: prefill_seconds(model, ids), lambda: prefill_seconds(half, ids))
    bound = bandwidth / sum(p.numel() * p.element_size() for p in half.model.parameters())
    same_chain = record(solve(task, problem, half, CHAIN)) == record(chain)
    with torch.inference_mode():
        tokens = torch.tensor([model.encode(chain.messages())])
        agree = float((model.model(tokens).logits[0].argmax(-1) == half.model(tokens).logits[0].argmax(-1)).float().mean())
    accuracy = f"next-token agreement with fp32 {agree * 100:.1f}%, same greedy chain: {'yes' if same_chain else 'no'}"
    return [
        Row("bf16 vs fp32: decode 1 sequence", f"{DECODE / decode[1]:.1f} vs {DECODE / decode[0]:.1f} tok/s "
            f"({DECODE / decode[1] / bound * 100:.0f}% of the bf16 bound); {accuracy}", f"{decode[0] / decode[1]:.2f}x"),
        Row("bf16 vs fp32: decode step, 8 sequences", f"{step[1] * 1e3:.0f} vs {step[0] * 1e3:.0f} ms", f"{step[0] / step[1]:.2f}x"),
        Row(f"bf16 vs fp32: prefill of {len(ids)} tokens", f"{prefill[1]:.2f} vs {prefill[0]:.2f} s",
            f"{prefill[0] / prefill[1]:.2f}x"),
    ]


# ---- precisions and llama.cpp ---------------------------------------------------------------------------
def llama_bench(binary: Path, threads: list[int], prompt: int) -> dict[tuple[str, int], tuple[float, int]]:
    """llama.cpp's own figures on the shipped GGUF, one `llama-bench` run (each test twice, its mean):
    {(kind, depth): (tok/s, threads)}, the best thread count of each: ('tg', 0) decodes from an empty
    context, ('tg', prompt) after `prompt` tokens already in its cache (`-d`), as fcapp's decode rows
    do; ('pp', 0) encodes `prompt` tokens from an empty context."""
    out = subprocess.run([str(binary), "-m", str(embedded_gguf()), "-t", ",".join(map(str, threads)),
                          "-p", str(prompt), "-n", str(DECODE), "-d", f"0,{prompt}", "-r", "2", "-o", "json"],
                         capture_output=True, text=True, timeout=900, check=True)
    best: dict[tuple[str, int], tuple[float, int]] = {}
    for test in json.loads(out.stdout):
        key = ("pp" if test["n_prompt"] else "tg", int(test.get("n_depth", 0)))
        rate = (float(test["avg_ts"]), int(test["n_threads"]))
        best[key] = max(best.get(key, rate), rate)
    return best


def samples_row(name: str, model: LocalModel, task: Task, problem: Problem) -> Row:
    """8 sampled chains of one problem decoded together (continuous batching) vs one after another,
    with where each run's time went (decode passes, prompt encoding, the rest) and the tokens each
    made: with quantised weights the two runs' chains differ (a kernel's result depends on the rows
    it multiplies together), so their chains/min are then not like for like."""
    def measured(run: Callable[[], list[Chain]]) -> tuple[float, float, float, int]:
        """(wall s, decode s, encoding s, tokens made) of `run` from a cold cache."""
        model.clear_cache()
        stats = model.stats
        before = (stats.decode_s, stats.prefill_s)
        began = time.perf_counter()
        chains = run()
        wall = time.perf_counter() - began
        tokens = sum(step.completion_tokens for chain in chains for step in chain.steps)
        return wall, stats.decode_s - before[0], stats.prefill_s - before[1], tokens

    one_by_one, together = paired(lambda: measured(lambda: [solve(task, problem, model, c) for c in SAMPLES]),
                                  lambda: measured(lambda: solve_batch(task, [(problem, c) for c in SAMPLES], model, 8)),
                                  key=seconds_of)
    ratio = one_by_one[0] / together[0]
    split = "; {}: {:.1f} s = decode {:.1f} + encoding {:.1f} + rest, {} tokens".format
    return Row(f"{name}: 8 samples batched vs one after another",
               f"{60 * 8 / together[0]:.1f} vs {60 * 8 / one_by_one[0]:.1f} chains/min"
               + split("batched", *together) + split("one by one", *one_by_one),
               f"{ratio:.2f}x", ">= 3x", ratio >= 3)


def precision_rows(fp32: LocalModel, ids: list[int], bandwidth: float, llama: Path | None,
                   task: Task, problem: Problem, chain: Chain) -> list[Row]:
    """Per decode precision: one sequence's decode rate against the bandwidth bound of the bytes that
    precision reads per token, an 8-sequence decode step (the prompt the rows share read once, and
    once a row), prefill (fp32 weights whatever the precision), whether the greedy chain is fp32's and
    8 samples batched; llama.cpp's decode and prefill on the shipped GGUF beside them when `llama` is
    given. Each round measures everything once, in turns; the best of two rounds counts. `fp32` is the run's model; the quantised ones use its threads."""
    models = {name: fp32 if name == "fp32" else LocalModel(f"smollm2@{name}", threads=fp32.threads)
              for name in PRECISIONS}
    best: dict[tuple[str, str], float] = {}
    theirs: dict[tuple[str, int], tuple[float, int]] = {}

    def keep(key: tuple[str, str], seconds: float) -> None:
        best[key] = min(best.get(key, seconds), seconds)
    for _ in range(2):
        for name, model in models.items():
            keep((name, "decode"), decode_seconds(model, ids) / DECODE)
            keep((name, "decode python"), layers_in_python(lambda: decode_seconds(model, ids)) / DECODE)
            if llama:  # llama.cpp's tg also decodes from an empty context
                keep((name, "decode empty"), decode_seconds(model, ids[:1]) / DECODE)
            keep((name, "step"), batch_step(model, ids))
            keep((name, "step unshared"), without_sharing(lambda: batch_step(model, ids)))
            keep((name, "prefill"), prefill_seconds(model, ids))
            keep((name, "matmuls"), layer_matmuls_seconds(model))
            keep((name, "matmuls 1 thread"), with_threads(1, lambda: layer_matmuls_seconds(model)))
        if llama:
            for kind, rate in llama_bench(llama, sorted({1, torch.get_num_threads()}), len(ids)).items():
                theirs[kind] = max(theirs.get(kind, rate), rate)
    rows = []
    for name, model in models.items():
        read = decode_bytes(model.model)
        rate, bound = 1 / best[name, "decode"], bandwidth / read
        same = "yes" if record(solve(task, problem, model, CHAIN)) == record(chain) else "no"
        rows += [
            Row(f"{name}: decode 1 sequence vs the bandwidth bound of the bytes it reads",
                f"{rate:.1f} vs {bound:.1f} tok/s ({read / 1e6:.0f} MB a token); {best['fp32', 'decode'] / best[name, 'decode']:.2f}x "
                f"fp32's rate; same greedy chain as fp32: {same}", f"{rate / bound * 100:.1f}%"),
            Row(f"{name}: decode 1 sequence, the layers' loop in TorchScript vs in Python (the same logits)",
                f"{rate:.1f} vs {1 / best[name, 'decode python']:.1f} tok/s",
                f"{best[name, 'decode python'] / best[name, 'decode']:.2f}x"),
            Row(f"{name}: one token's 120 layer matmuls alone (one row, weights from memory), "
                f"{torch.get_num_threads()} thread(s) vs 1; share of a token", f"{best[name, 'matmuls'] * 1e3:.2f} vs "
                f"{best[name, 'matmuls 1 thread'] * 1e3:.2f} ms; {best[name, 'matmuls'] / best[name, 'decode'] * 100:.0f}% "
                f"of a {best[name, 'decode'] * 1e3:.2f} ms token", f"{best[name, 'matmuls 1 thread'] / best[name, 'matmuls']:.2f}x"),
            Row(f"{name}: decode 8 sequences in one step vs 1", f"{8 / best[name, 'step']:.0f} vs {rate:.1f} tok/s "
                f"({best[name, 'step'] * 1e3:.0f} ms a step)", f"{8 * best[name, 'decode'] / best[name, 'step']:.2f}x"),
            Row(f"{name}: decode step of 8 sequences sharing the prompt: its columns read once vs once a row",
                f"{best[name, 'step'] * 1e3:.0f} vs {best[name, 'step unshared'] * 1e3:.0f} ms",
                f"{best[name, 'step unshared'] / best[name, 'step']:.2f}x"),
            Row(f"{name}: prefill of {len(ids)} tokens", f"{len(ids) / best[name, 'prefill']:.0f} tok/s",
                f"{best['fp32', 'prefill'] / best[name, 'prefill']:.2f}x fp32"),
            samples_row(name, model, task, problem),
        ]
    fastest = min(PRECISIONS, key=lambda name: best[name, "decode"])
    ours_pp = len(ids) / best["fp32", "prefill"]
    if not theirs:
        return rows + [Row("llama.cpp decode and prefill on the same GGUF", "skipped: no --llama-bench PATH given", "")]
    (pp, pp_threads) = theirs["pp", 0]
    rows += [Row(f"fcapp prefill vs llama.cpp pp{len(ids)} ({pp_threads} thread(s))", f"{ours_pp:.0f} vs {pp:.0f} tok/s",
                 f"{ours_pp / pp:.2f}x")]
    for depth, ours, where in ((0, best[fastest, "decode empty"], "from an empty context"),
                               (len(ids), best[fastest, "decode"], f"after the {len(ids)}-token prompt")):
        tg, tg_threads = theirs["tg", depth]
        rows.append(Row(f"fcapp's fastest decode ({fastest}, {fp32.threads} thread(s)) vs llama.cpp tg{DECODE} "
                        f"({tg_threads} thread(s), the shipped Q4_1 GGUF), {where}", f"{1 / ours:.1f} vs {tg:.1f} tok/s",
                        f"{1 / ours / tg:.2f}x", ">= 0.90x", 1 / ours / tg >= 0.9))
    return rows


def render(info: dict[str, str], rows: list[Row]) -> str:
    return table("Benchmark results", "Produced by `python -m benchmarks.decode`; benchmarks/README.md says what each row "
                 "measures and what was adopted. On a shared machine the absolute numbers move with its load "
                 "(below); each ratio compares two measurements taken in turns.", info, rows)


def main() -> None:
    parser = arguments("python -m benchmarks.decode", __doc__.splitlines()[0], RESULTS)
    parser.add_argument("--llama-bench", type=Path, metavar="PATH",
                        help="a llama.cpp llama-bench binary: measure llama.cpp on the same GGUF, in turns with fcapp")
    args = parser.parse_args()
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        parser.error(f"--llama-bench {args.llama_bench}: not an executable file")
    began = time.time()
    info, rows = run(args.llama_bench)
    publish(began, info, lambda info: render(info, rows), RESULTS, not args.no_write)


if __name__ == "__main__":
    main()
