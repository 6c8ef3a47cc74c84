"""`python -m benchmarks`: measure the local backend and the agent loop, print a table of ratios and
write it to benchmarks/results.md.

Each ratio compares two things measured in this run on this machine (a shared CPU is noisy: every
timing is the best of a few tries). About 5 minutes on the 2-core box.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers

from fcapp.agent import Chain
from fcapp.batching import solve_batch
from fcapp.models.local import LocalModel, _lay_out_for_decode, convert_embedded, embedded_model_dir
from fcapp.solve import SolveConfig, solve
from fcapp.tasks import get_task

RESULTS = Path(__file__).with_name("results.md")
PROBLEM = "gsm8k-5"  # greedy SmolLM2 goes on to the 5-step limit on it
CHAIN = SolveConfig(max_steps=5, max_new_tokens=48)
SAMPLES = [SolveConfig(5, 0.8, 0.95, 48, seed=k) for k in range(8)]
DECODE = 48  # tokens per decode-rate measurement


@dataclass
class Row:
    name: str
    measured: str
    value: str
    target: str = ""
    met: bool | None = None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def best_of(repeat: int, run: Callable[[], float]) -> float:
    """The smallest of `repeat` timings: the least disturbed by other processes."""
    return min(run() for _ in range(repeat))


def timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


# ---- the machine ---------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    return {
        "cpu": fields.get("Model name", "unknown").strip(),
        "cores": str(os.cpu_count()),
        "avx512_bf16": "yes" if "avx512_bf16" in flags else "no",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def read_bandwidth() -> float:
    """Memory read bandwidth in bytes/s: summing a 256 MiB tensor (far bigger than any cache)."""
    data = torch.ones(64 * 2**20)
    rates = []
    for threads in sorted({1, torch.get_num_threads()}):
        with use_threads(threads):
            data.sum()
            rates.append(data.numel() * 4 / best_of(10, lambda: timed(data.sum)))
    return max(rates)


@contextlib.contextmanager
def use_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- decoding without the agent --------------------------------------------------------------------
def bare_decode(model: LocalModel, ids: list[int], n: int, mode: Callable = torch.inference_mode) -> tuple[float, float]:
    """(prefill s, decode s): encode `ids` the way the agent does (reusing the cache) and greedily
    decode n tokens with nothing else: no chat template, no detokenising, no call parsing, no tools."""
    with mode():
        began = time.perf_counter()
        logits = model._prefill([ids])
        middle = time.perf_counter()
        for _ in range(n - 1):
            logits = model._state.feed(model.model, [[int(logits[0].argmax())]], model.pad_id)
        return middle - began, time.perf_counter() - middle


def decode_rate(model: LocalModel, ids: list[int], mode: Callable = torch.inference_mode) -> float:
    """Tokens/s of one sequence decoding after `ids` (best of 2)."""
    def run() -> float:
        model.clear_cache()
        return bare_decode(model, ids, DECODE + 1, mode)[1]
    return DECODE / best_of(2, run)


def batch_step(model: LocalModel, ids: list[int], rows: int) -> float:
    """Seconds of one decode step of `rows` sequences after `ids` (best of 6 steps)."""
    model.clear_cache()
    with torch.inference_mode():
        logits = model._prefill([ids] * rows)
        times = []
        for _ in range(6):
            began = time.perf_counter()
            logits = model._state.feed(model.model, [[t] for t in logits.argmax(-1).tolist()], model.pad_id)
            times.append(time.perf_counter() - began)
    return min(times)


def plain_generate_rate(ids: list[int]) -> float:
    """Decode tokens/s of transformers' own `generate` on a plainly loaded model (prefill excluded:
    the difference between generating 1 and DECODE + 1 tokens)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
    prompt = torch.tensor([ids])

    def run(n: int) -> float:
        return timed(lambda: plain.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                            pad_token_id=plain.config.eos_token_id))
    return DECODE / (best_of(2, lambda: run(DECODE + 1)) - best_of(2, lambda: run(1)))


def with_plain_layout(model: LocalModel) -> contextlib.AbstractContextManager:
    """Temporarily store the Linear weights the usual way ([out, in] rows)."""
    @contextlib.contextmanager
    def swap() -> Iterator[None]:
        for module in model.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.contiguous()
        try:
            yield
        finally:
            _lay_out_for_decode(model.model)
    return swap()


# ---- chains ------------------------------------------------------------------------------------------
def record(chain: Chain) -> list:
    return [(s.text, s.result, s.error) for s in chain.steps] + [chain.answer]


def run_chain(model: LocalModel, task, problem, prefix_cache: bool) -> tuple[float, float, Chain]:
    """(seconds, prefill seconds, chain) of solving from a cold cache."""
    model.clear_cache()
    model.prefix_cache = prefix_cache
    prefill = model.stats.prefill_s
    try:
        began = time.perf_counter()
        chain = solve(task, problem, model, CHAIN)
        return time.perf_counter() - began, model.stats.prefill_s - prefill, chain
    finally:
        model.prefix_cache = True


def raw_replay(model: LocalModel, chain: Chain) -> float:
    """Seconds for the bare loop to produce the chain's tokens: each step's prompt (encoded beforehand,
    reusing the cache as the agent does) and as many greedy tokens as that step generated."""
    steps = [(model.encode(dataclasses.replace(chain, steps=chain.steps[:i]).messages()), s.completion_tokens)
             for i, s in enumerate(chain.steps)]
    model.clear_cache()
    return sum(sum(bare_decode(model, ids, max(n, 1))) for ids, n in steps)


# ---- the run -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; keep benchmarks/results.md")
    args = parser.parse_args()
    began = time.time()
    info = machine()
    rows: list[Row] = []
    task = get_task("gsm8k")
    problem = task.get(PROBLEM)

    log("memory bandwidth")
    bandwidth = read_bandwidth()

    log("model load: cached folder vs converting the GGUF")
    embedded_model_dir()  # make sure the cache exists before timing it
    cached = best_of(2, lambda: timed(lambda: LocalModel(threads=1)))
    with tempfile.TemporaryDirectory(prefix="fcapp-bench-") as tmp:
        converted = timed(lambda: convert_embedded(Path(tmp) / "model"))
    rows.append(Row("model load: cached folder vs converting the GGUF", f"{converted:.1f} s vs {cached:.2f} s",
                    f"{converted / cached:.1f}x", ">= 5x", converted / cached >= 5))

    model = LocalModel(threads=1)
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    ids = model.encode(solve_prompt(task, problem))

    log("threads")
    one, two = (decode_rate_at(model, ids, t) for t in (1, 2))
    step1, step2 = (with_threads_call(t, lambda: batch_step(model, ids, 8)) for t in (1, 2))
    threads = 1 if one >= two else 2
    model.threads = threads
    rows.append(Row("threads: decode 1 sequence, 2 threads vs 1", f"{two:.1f} vs {one:.1f} tok/s", f"{two / one:.2f}x"))
    rows.append(Row("threads: decode 8 sequences, 2 threads vs 1", f"{step2 * 1e3:.0f} vs {step1 * 1e3:.0f} ms/step",
                    f"{step1 / step2:.2f}x"))

    with use_threads(threads):
        log("decode rates")
        ours = decode_rate(model, ids)
        with with_plain_layout(model):
            plain_layout = decode_rate(model, ids)
        no_grad = decode_rate(model, ids, torch.no_grad)
        plain = plain_generate_rate(ids)
        rows.append(Row("weights laid out [in, out] vs [out, in] (fp32 decode)", f"{ours:.1f} vs {plain_layout:.1f} tok/s",
                        f"{ours / plain_layout:.2f}x"))
        rows.append(Row("inference_mode vs no_grad (decode)", f"{ours:.1f} vs {no_grad:.1f} tok/s", f"{ours / no_grad:.2f}x"))

        log("bf16")
        half = LocalModel(dtype="bfloat16", threads=threads)
        half_rate = decode_rate(half, ids)

        log("5-step chain: prefix cache on vs off")
        off = min((run_chain(model, task, problem, False) for _ in range(2)), key=lambda r: r[0])
        on = min((run_chain(model, task, problem, True) for _ in range(2)), key=lambda r: r[0])
        chain = on[2]
        same = record(on[2]) == record(off[2])
        rows.append(Row(f"{len(chain.steps)}-step chain: prefix reuse vs re-encoding each step",
                        f"{off[0]:.1f} s vs {on[0]:.1f} s, chains identical: {'yes' if same else 'NO'}",
                        f"{off[0] / on[0]:.2f}x", ">= 1.5x", off[0] / on[0] >= 1.5 and same))

        log("agent loop vs the bare loop")
        raw = best_of(2, lambda: raw_replay(model, chain))
        overhead = on[0] / raw - 1
        rows.append(Row("agent loop vs raw decode of the same tokens", f"{on[0]:.2f} s vs {raw:.2f} s",
                        f"{overhead * 100:+.1f}%", "<= +10%", overhead <= 0.10))

        tokens = chain.completion_tokens
        loop_rate = tokens / (on[0] - on[1])
        bound = bandwidth / weights
        rows.append(Row("decode in the agent loop vs plain model.generate", f"{loop_rate:.1f} vs {plain:.1f} tok/s",
                        f"{loop_rate / plain:.2f}x"))
        rows.append(Row("decode in the agent loop vs memory-bandwidth bound",
                        f"{loop_rate:.1f} tok/s vs {bound:.1f} ({bandwidth / 1e9:.1f} GB/s / {weights / 1e6:.0f} MB)",
                        f"{loop_rate / bound * 100:.0f}%", ">= 50%", loop_rate / bound >= 0.5))
        rows.append(Row("plain model.generate vs memory-bandwidth bound", f"{plain:.1f} vs {bound:.1f} tok/s",
                        f"{plain / bound * 100:.0f}%"))
        half_bound = bandwidth / sum(p.numel() * p.element_size() for p in half.model.parameters())
        half_chain = solve(task, problem, half, CHAIN)
        with torch.inference_mode():
            full_ids = torch.tensor([model.encode(chain.messages())])
            agree = (model.model(full_ids).logits[0].argmax(-1) == half.model(full_ids).logits[0].argmax(-1)).float().mean()
        rows.append(Row("bf16 vs fp32 decode", f"{half_rate:.1f} vs {ours:.1f} tok/s ({half_rate / half_bound * 100:.0f}% of "
                        f"its bound); next-token agreement {agree * 100:.1f}%, same chain: "
                        f"{'yes' if record(half_chain) == record(chain) else 'no'}", f"{half_rate / ours:.2f}x"))
        del half

        log("8 samples: batched vs one after another")
        model.clear_cache()
        sequential = timed(lambda: [solve(task, problem, model, c) for c in SAMPLES])
        model.clear_cache()
        batched_chains: list[Chain] = []
        batched = timed(lambda: batched_chains.extend(solve_batch(task, [(problem, c) for c in SAMPLES], model, 8)))
        per_min = (60 * len(SAMPLES) / batched, 60 * len(SAMPLES) / sequential)
        rows.append(Row("8 samples batched vs one after another",
                        f"{per_min[0]:.1f} vs {per_min[1]:.1f} chains/min "
                        f"({sum(c.completion_tokens for c in batched_chains)} tokens)",
                        f"{sequential / batched:.2f}x", ">= 3x", sequential / batched >= 3))

    info["threads used"] = str(threads)
    info["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    info["benchmark wall time"] = f"{time.time() - began:.0f} s"
    report = render(info, rows)
    print(report)
    if not args.no_write:
        RESULTS.write_text(report)
        log(f"written to {RESULTS}")


def solve_prompt(task, problem) -> list[dict]:
    """The first prompt of a chain on `problem`: system prompt with the injected functions, the worked
    example, the question."""
    from fcapp.solve import start_chain

    return start_chain(task, problem, "bench", CHAIN)[1].messages()


def with_threads_call(threads: int, run: Callable[[], float]) -> float:
    with use_threads(threads):
        return run()


def decode_rate_at(model: LocalModel, ids: list[int], threads: int) -> float:
    return with_threads_call(threads, lambda: decode_rate(model, ids))


def render(info: dict[str, str], rows: list[Row]) -> str:
    lines = ["# Benchmark results", "", "`python -m benchmarks` (see benchmarks/README.md for what each row measures)", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| benchmark | measured | ratio | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.name} | {row.measured} | {row.value} | {row.target} | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
