"""A transformers model on this machine: the embedded SmolLM2-135M-Instruct, a tuned model, any local
HF folder, or a hub id when a hub is reachable. CPU by default, GPU when present.

Decoding is a hand-written loop over one persistent batch KV cache: consecutive agent steps,
samples of the same problem and problems of the same task reuse their shared prompt prefix instead
of re-encoding it, `generate_batch` decodes several conversations in one batch, and
`generate_continuous` keeps a batch busy, a row taking its next prompt the moment its reply ends.
Measured choices (benchmarks/results.md): fp32 with weights laid out for one-token matmuls, KV
buffers written in place, one-token passes of Llama models written out by hand (`llama_step`), top-p
sampling without a full sort, intra-op threads picked by measurement.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from fcapp.models.base import Chunk, Completion, Message, ModelError, Request, SamplingParams
from fcapp.models.cpu import ThreadChooser, lay_out_for_decode, quantise_for_decode
from fcapp.models import llama_step
from fcapp.models.drafting import lookup_draft, trusted_positions
from fcapp.models.kv_cache import KVState, common_prefix
from fcapp.models.registry import model_id, resolve_model_path, split_precision

T = TypeVar("T")
# What an encoding pass costs beyond its tokens, in tokens: reading every weight once, the per-layer
# calls, attention over the cache. Measured on the 2-core box (540-token prompt, n new tokens): a pass
# costs about (n + 37) tokens' worth on one thread and (n + 53) on two, so per (n + 40) the passes of
# an agent's steps (a 540-token prompt, then ~14-47-token tool results) cost alike, within about 20%
# (per token alone they differ 3x, and the thread chooser compared passes of different sizes, not
# thread counts).
PASS_TOKENS = 40


def _steps_in_inference_mode(decode: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """Run each step of a decode generator under inference mode. A `with torch.inference_mode()` around its
    yields would not do: a streaming caller (Gradio) resumes the generator on whichever pool thread is free,
    where the mode is off, and the KV cache's in-place updates then fail ("Inplace update to inference
    tensor outside InferenceMode")."""

    @functools.wraps(decode)
    def each_step(*args: Any, **kwargs: Any) -> Iterator[T]:
        steps = decode(*args, **kwargs)
        try:
            while True:
                with torch.inference_mode():
                    try:
                        step = next(steps)
                    except StopIteration:
                        return
                yield step
        finally:
            steps.close()

    return each_step


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """A categorical draw by inverse CDF, `weights` not necessarily normalised (torch.multinomial
    takes ~0.75 ms over a 49k vocabulary, this ~0.05 ms)."""
    cdf = torch.cumsum(weights.double().cpu(), dim=0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1))


@dataclass
class RowCompletion(Completion):
    """A Completion from generate_batch with the row's own wall time (until it stopped) and why it
    stopped: 'eos', 'length' (max_new_tokens), 'stop' (a stop string or stop_when)."""

    elapsed_s: float = 0.0
    stop_reason: str = ""


@dataclass
class DecodeStats:
    """Running totals since the model loaded: what the prefix cache saved and where the time went."""

    prompt_tokens: int = 0   # prompt tokens of all requests
    encoded_tokens: int = 0  # of those, the ones run through the model (the rest came from the cache)
    prefill_s: float = 0.0
    decode_steps: int = 0    # decoding passes: one new token per row, or one row's drafted run
    decode_s: float = 0.0
    drafted_tokens: int = 0  # tokens guessed by prompt lookup and checked (fcapp.models.drafting)
    kept_drafts: int = 0     # of those, the ones kept: greedy decoding's own choice


class _Row:
    """Decoding state of one sequence."""

    def __init__(self, params: SamplingParams, prompt_tokens: int) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)
        self.prompt_tokens = prompt_tokens
        self.began = time.perf_counter()
        self.generated: list[int] = []
        self.text = ""
        self.delta = ""
        self.stop_reason = ""
        self.elapsed_s = 0.0

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def completion(self) -> "RowCompletion":
        return RowCompletion(self.text, self.prompt_tokens, len(self.generated), self.elapsed_s, self.stop_reason)


Refill = Callable[[int, _Row], tuple[list[int], SamplingParams] | None]
"""Given a finished row (its index and state), the prompt and params that row goes on with, or None."""


DRAFT_TOKENS = 6  # prompt-lookup guesses checked per pass when one greedy row decodes (fcapp.models.drafting)


class LocalModel:
    """ChatModel over a transformers causal LM. One generation at a time per instance (a lock).

    Decoding is a hand-written loop over one persistent batch KV cache, so consecutive agent steps,
    samples of the same problem and problems of the same task reuse their shared prompt prefix
    instead of re-encoding it; `generate_batch` decodes several conversations together and
    `generate_continuous` streams conversations through a batch of slots. On CPU in fp32 the Linear
    weights are stored transposed for speed (same shapes and values): save a model from its folder,
    not from `.model`. A spec ending in `@int8` or `@int4` decodes with quantised copies of the
    Linear weights (`fcapp.models.cpu.quantise_for_decode`); prompts still run in fp32."""

    def __init__(self, spec: str | None = None, device: str | None = None, dtype: str = "float32",
                 prefix_cache: bool = True, threads: int | None = None) -> None:
        """`threads`: intra-op threads while decoding; None picks 1 or all by measuring (CPU)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(spec)
        precision = split_precision(spec)[1]
        device = device or default_device()
        if precision != "fp32" and (device != "cpu" or dtype != "float32"):
            raise ModelError(f"{spec!r}: {precision} weights decode on the CPU, from a float32 model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {spec!r} from {path}: {exc}") from None
        model.eval()
        if device == "cpu" and model.dtype == torch.float32:
            lay_out_for_decode(model)
        if precision != "fp32":
            quantise_for_decode(model, precision)
        self._attach(model, tokenizer, model_id(spec), path, prefix_cache, threads)
        if precision != "fp32":  # a quantised pass's rounding depends on its rows: runs would change chains
            self.draft_tokens = 0

    @classmethod
    def around(cls, model: torch.nn.Module, tokenizer, name: str, threads: int | None = None) -> "LocalModel":
        """Decode with a model already in memory, as it is (a policy being trained: its weights are left
        alone, so call `clear_cache` after they change). The caller puts it in eval mode."""
        local = cls.__new__(cls)
        local._attach(model, tokenizer, name, None, True, threads)
        return local

    def _attach(self, model: torch.nn.Module, tokenizer, name: str, path: str | None, prefix_cache: bool,
                threads: int | None) -> None:
        self.model, self.tokenizer, self.model_id, self.path = model, tokenizer, name, path
        self.device = str(model.device.type)
        layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        if any(kind != "full_attention" for kind in layer_types):
            raise ModelError(f"{name!r}: only full-attention decoder models are supported locally, not {set(layer_types)}")
        self._layers = len(layer_types)
        self.prefix_cache = prefix_cache
        self.hand_written_decode = True  # one-token passes by fcapp.models.llama_step where it fits
        self.draft_tokens = DRAFT_TOKENS  # a lone greedy row checks this many guessed tokens a pass (0: off)
        self.threads = threads
        auto = threads is None and self.device == "cpu"
        self._choosers = {kind: ThreadChooser(torch.get_num_threads()) for kind in ("prefill", "decode")} if auto else {}
        self.stats = DecodeStats()
        self.lock = threading.Lock()
        self._state = KVState(self._layers)  # no rows yet
        self._parked: list[KVState] = []  # rows set aside mid-batch once their reply ended, kept for reuse
        eos = {tokenizer.eos_token_id}
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            eos.add(im_end)
        self.stop_ids = {i for i in eos if i is not None}
        self.pad_id = min(self.stop_ids) if self.stop_ids else 0

    def clear_cache(self) -> None:
        """Forget every cached prefix: the next prompt is encoded from scratch (and the memory freed)."""
        with self.lock:
            self._state, self._parked = KVState(self._layers), []

    # ---- prompt -------------------------------------------------------------------------------
    def encode(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": str(m["content"])} for m in messages],
            tokenize=False, add_generation_prompt=True,
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- decoding -----------------------------------------------------------------------------
    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Load `prompts` as the cache's rows, reusing cached prefixes; logits after each prompt."""
        held = [state for state in (self._state, *self._parked) if state.tokens] if self.prefix_cache else []
        state = KVState.joined(held) if len(held) > 1 else held[0] if held else KVState(self._layers, rows=1)
        self._parked = []
        encoded = 0
        if len(prompts) > 1:
            # a prefix the whole batch shares (the injected prompt) but the cache lacks: encode it once
            shared = min(min(common_prefix(prompts[0], p) for p in prompts), min(map(len, prompts)) - 1)
            row, n = state.match(prompts[0][:shared])
            if shared - n >= 16:
                state = state.keep([row], [n])
                state.feed(self.model, [prompts[0][n:shared]], self.pad_id, self.hand_written_decode)
                encoded += shared - n
        matches = [state.match(p[:-1]) for p in prompts]
        self._state = state = state.keep([row for row, _ in matches], [n for _, n in matches])
        encoded += sum(len(p) - n for p, (_, n) in zip(prompts, matches))
        self.stats.prompt_tokens += sum(map(len, prompts))
        self.stats.encoded_tokens += encoded
        return state.feed(self.model, [p[n:] for p, (_, n) in zip(prompts, matches)], self.pad_id,
                          self.hand_written_decode)

    def _threads(self, kind: str) -> int:
        """Set torch's intra-op threads for the next `kind` ('prefill' or 'decode') pass; the count."""
        chooser = self._choosers.get(kind)
        threads = chooser.next() if chooser else self.threads
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return torch.get_num_threads()

    def _timed(self, kind: str, threads: int, run: Callable[[], torch.Tensor], work: Callable[[], int]) -> tuple[torch.Tensor, float]:
        """Run one forward pass; tell the chooser its time per unit of `work` (tokens encoded, rows)."""
        began = time.perf_counter()
        logits = run()
        seconds = time.perf_counter() - began
        if kind in self._choosers:
            self._choosers[kind].record(threads, seconds / max(1, work()))
        return logits, seconds

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        """One token: greedy at temperature 0, else from the top-p nucleus. The nucleus is looked for
        among the 64 likeliest tokens first (sorting the whole vocabulary costs ~5 ms a token)."""
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p >= 1.0:
            return _draw(probs, generator)
        top, order = torch.topk(probs, min(64, probs.numel()))
        if float(top.sum()) < params.top_p:
            top, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(top, dim=-1) - top < params.top_p
        return int(order[keep][_draw(top[keep], generator)])

    @_steps_in_inference_mode
    def _decode(self, prompts: list[list[int]], params: list[SamplingParams],
                stop_when: Callable[[int, str], bool] | None, refill: Refill | None = None) -> Iterator[list[_Row]]:
        """Decode all rows together, yielding them after every token (each row's `delta` is its new
        text). With `refill`, a row whose reply ended is offered to it at once: a (prompt, params) it
        returns replaces the row inside the running decode (continuous batching), None leaves the row
        finished. A sampled token is fed to the model only when its row goes on, so closing this
        iterator between steps leaves the cache consistent."""
        rows = [_Row(p, len(ids)) for p, ids in zip(params, prompts)]
        live = list(range(len(rows)))  # the row each cache row holds
        ahead: list[torch.Tensor] = []  # logits [1, vocab] of a drafted run's positions not yet picked from
        restore = torch.get_num_threads()
        try:
            logits = self._encoding_pass(lambda: self._prefill(prompts))
            while True:
                ended = self._pick(logits, [(i, rows[i]) for i in live], stop_when)
                if ended:
                    ahead = []
                starts: dict[int, list[int]] = {}
                for i in ended if refill else []:
                    request = refill(i, rows[i])
                    if request is not None:
                        starts[i], rows[i] = request[0], _Row(request[1], len(request[0]))
                yield rows
                if all(row.done for row in rows):
                    return
                running = [j for j, i in enumerate(live) if not rows[i].done]
                if len(running) <= len(live) // 2:  # half the batch is idle: set those rows aside
                    live = [live[j] for j in running]
                    self._set_aside(running)
                if ahead:  # a drafted run's next position: its logits are already computed
                    logits = ahead.pop(0)
                    continue
                decoding = [not rows[i].done and i not in starts for i in live]
                drafting = (self.draft_tokens > 0 and self.hand_written_decode and len(live) == 1 and decoding[0]
                            and rows[live[0]].params.temperature <= 0)
                ahead = self._drafted_run(rows[live[0]].generated[-1]) if drafting else []
                if ahead:
                    logits = ahead.pop(0)
                elif any(decoding):
                    logits = self._step([rows[i].generated[-1:] if on else [] for i, on in zip(live, decoding)])
                if starts:
                    targets = [live.index(i) for i in starts]
                    started = self._encoding_pass(lambda: self._start_rows(targets, list(starts.values())))
                    if not any(decoding):
                        logits = started.new_zeros(len(live), started.shape[-1])
                    logits[targets] = started
        finally:
            torch.set_num_threads(restore)

    def _encoding_pass(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a pass that encodes prompts (`_prefill`, `_start_rows`), timed per token encoded plus
        the pass's own cost (`PASS_TOKENS`)."""
        encoded = self.stats.encoded_tokens
        threads = self._threads("prefill")
        logits, seconds = self._timed("prefill", threads, run,
                                      lambda: self.stats.encoded_tokens - encoded + PASS_TOKENS)
        self.stats.prefill_s += seconds
        return logits

    def _step(self, feed: list[list[int]]) -> torch.Tensor:
        """One decode pass: each cache row's next token (or nothing: a masked pad); logits per row."""
        threads = self._threads("decode")
        logits, seconds = self._timed(
            "decode", threads, lambda: self._state.feed(self.model, feed, self.pad_id, self.hand_written_decode), lambda: 1)
        self.stats.decode_steps += 1
        self.stats.decode_s += seconds
        return logits

    def _drafted_run(self, last: int) -> list[torch.Tensor]:
        """For the one greedy row: feed its last token and a guess of the next ones (prompt lookup) in
        one pass; the logits [1, vocab] of the positions to pick from, in order (their greedy choices
        are the kept guesses, then the token after them). The cache keeps what the run fed but its
        last pick, as after one-token passes. [] with no guess, or when the pass's first choice was
        unclear (the cache then as before: a one-token pass decides)."""
        state = self._state
        held = len(state.tokens[0])
        draft = lookup_draft(state.tokens[0] + [last], self.draft_tokens)
        if not draft or not llama_step.supports(self.model) or not bool(state.valid.all()):
            return []  # (a row with holes, left by a replaced longer row, needs a mask: one token a pass)
        self._threads("decode")  # not timed for the chooser: a run's pass costs more than a one-token pass
        began = time.perf_counter()
        logits = state.feed(self.model, [[last] + draft], self.pad_id, every=True)
        self.stats.decode_steps += 1
        self.stats.decode_s += time.perf_counter() - began
        trusted = trusted_positions(logits, draft)
        self.stats.drafted_tokens += len(draft)
        self.stats.kept_drafts += max(0, trusted - 1)
        self._state = state.keep([0], [held + trusted])
        return [logits[i:i + 1] for i in range(trusted)]

    def _start_rows(self, targets: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Replace cache rows `targets` by rows of `prompts`, each reusing the longest prefix any cache
        row holds (an agent's next prompt: its own last prompt and reply); their logits. Only these
        rows go through the model, so their new tokens cost no padding in the other rows. The cache
        is repacked once its holes (replaced rows' old columns) waste a quarter of it."""
        state = self._state
        matches = [state.match(p[:-1]) if self.prefix_cache else (0, 0) for p in prompts]
        added = state.rows([row for row, _ in matches], [n for _, n in matches])
        logits = added.feed(self.model, [p[n:] for p, (_, n) in zip(prompts, matches)], self.pad_id,
                            self.hand_written_decode)
        self.stats.prompt_tokens += sum(map(len, prompts))
        self.stats.encoded_tokens += sum(len(p) - n for p, (_, n) in zip(prompts, matches))
        state.put(targets, added)
        lengths = [len(tokens) for tokens in state.tokens]
        if sum(lengths) < 0.75 * len(lengths) * state.width:
            self._state = state.rows(list(range(len(lengths))), lengths)
        return logits

    def _set_aside(self, running: list[int]) -> None:
        """Keep decoding only the cache rows `running`; park the others (their prefixes stay reusable).
        A smaller batch makes every remaining step cheaper."""
        state, lengths = self._state, [len(tokens) for tokens in self._state.tokens]
        idle = [j for j in range(len(lengths)) if j not in running]
        self._parked.append(state.rows(idle, [lengths[j] for j in idle]))
        self._state = state.rows(running, [lengths[j] for j in running])

    def _pick(self, logits: torch.Tensor, rows: list[tuple[int, _Row]],
              stop_when: Callable[[int, str], bool] | None) -> list[int]:
        """Sample each running row's next token (logits row j belongs to rows[j]) and apply its stop
        rules; stop_when gets the row's index in the request. The indices of the rows that stopped."""
        greedy = logits.argmax(-1).tolist()
        ended = []
        for j, (i, row) in enumerate(rows):
            row.delta = ""
            if row.done:
                continue
            if row.params.max_new_tokens <= 0:
                row.stop_reason = "length"
                continue
            token = greedy[j] if row.params.temperature <= 0 else self._sample(logits[j], row.params, row.generator)
            if token in self.stop_ids:
                row.stop_reason = "eos"
            else:
                row.generated.append(token)
                text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # else half a multi-byte character: wait for the rest
                    row.delta, row.text = text[len(row.text):], text
                if row.delta and (any(s in row.text for s in row.params.stop)
                                  or (stop_when is not None and stop_when(i, row.text))):
                    row.stop_reason = "stop"
                elif len(row.generated) >= row.params.max_new_tokens:
                    row.stop_reason = "length"
            if row.done:
                row.elapsed_s = time.perf_counter() - row.began
                ended.append(i)
        return ended

    def stream(self, messages: list[Message], tools: list[dict] | None = None,
               params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Stream a reply token by token. Closing the iterator stops generation at once."""
        for (chunk,) in self.stream_batch([messages], [params or SamplingParams()]):
            if chunk.text or chunk.finished:
                yield chunk

    def stream_batch(self, conversations: list[list[Message]], params: list[SamplingParams],
                     stop_when: Callable[[int, str], bool] | None = None) -> Iterator[list[Chunk]]:
        """Decode several conversations together, yielding after every token one Chunk per row: the
        row's new text (often empty) and running counts, `finished` once the row has stopped (and
        on each later yield). Stop rules as in `generate_batch`. Closing the iterator stops at once."""
        if len(conversations) != len(params):
            raise ValueError("stream_batch needs one SamplingParams per conversation")
        if not conversations:
            return
        with self.lock:
            prompts = [self.encode(messages) for messages in conversations]
            for rows in self._decode(prompts, params, stop_when):
                yield [Chunk(row.delta, row.prompt_tokens, len(row.generated), row.done) for row in rows]

    def generate_batch(self, conversations: list[list[Message]], params: list[SamplingParams],
                       stop_when: Callable[[int, str], bool] | None = None) -> list[RowCompletion]:
        """Complete several conversations in one batch. Row i stops at EOS / <|im_end|>, its
        max_new_tokens, a stop string, or when stop_when(i, text) is true (the agent stops at a
        finished call). Sampling is seeded per row as in `stream`, so a row's output does not depend
        on what else is in the batch."""
        if len(conversations) != len(params):
            raise ValueError("generate_batch needs one SamplingParams per conversation")
        if not conversations:
            return []
        with self.lock:
            prompts = [self.encode(messages) for messages in conversations]
            *_, rows = self._decode(prompts, params, stop_when)
        return [row.completion() for row in rows]

    def generate_continuous(self, requests: Callable[[int, RowCompletion | None], Request | None], slots: int,
                            stop_when: Callable[[int, str], bool] | None = None) -> Iterator[None]:
        """Continuous batching: decode up to `slots` conversations together, a slot taking its next
        conversation the moment its reply ends, inside the running decode, instead of waiting for the
        batch's longest reply. `requests(slot, reply)` gives a slot's next (conversation, params), or
        None to leave it empty: first with reply None (slots 0, 1, ... until it gives None), then with
        each reply the slot produced. A new prompt reuses the longest cached prefix (an agent's next
        step: its own prompt and reply so far) and is encoded in a pass of the starting rows alone.
        Stop rules (stop_when gets the slot) and per-row seeding as in `generate_batch`. Yields after
        every token so the caller can act between steps; closing the iterator stops at once; ends
        when every slot is empty."""
        with self.lock:
            first: list[Request] = []
            while len(first) < slots and (request := requests(len(first), None)) is not None:
                first.append(request)
            if not first:
                return

            def refill(slot: int, row: _Row) -> tuple[list[int], SamplingParams] | None:
                request = requests(slot, row.completion())
                return None if request is None else (self.encode(request[0]), request[1])

            prompts = [self.encode(messages) for messages, _ in first]
            for _ in self._decode(prompts, [params for _, params in first], stop_when, refill):
                yield


def load_model(spec: str | None = None, **kwargs) -> "LocalModel":
    """Load a local model, timing the load for the log."""
    began = time.perf_counter()
    model = LocalModel(spec, **kwargs)
    model.load_seconds = time.perf_counter() - began  # type: ignore[attr-defined]
    return model
