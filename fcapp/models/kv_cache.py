"""The KV cache of the local backend's decode loop: one persistent batch of rows whose prefixes
later prompts reuse.

`KVState` is the batch: per row its real tokens and the column of each, rows of different lengths
side by side (holes masked out of attention), with the operations the decode loop needs: cut rows
to a prefix (`keep`, `rows`), replace rows (`put`), stack batches (`joined`) and run new tokens
through the model (`feed`). `_GrowingLayer` holds one layer's keys and values in buffers written in
place.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from fcapp.models import llama_step


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to spare. Appending a token writes in place
    (DynamicLayer concatenates, copying the layer's whole cache for every token); the buffer doubles
    when full. Shapes are [rows, kv_heads, columns, head_dim]. `keys` and `values` are views of the
    buffers' first `length` columns, made when read (a decode pass reads none of them: ~90 us a pass
    for 30 layers, made every pass)."""

    def __init__(self) -> None:
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @keys.setter
    def keys(self, value: None) -> None:
        assert value is None, "a _GrowingLayer's keys are written through update, reserve or _store"

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    @values.setter
    def values(self, value: None) -> None:
        assert value is None, "a _GrowingLayer's values are written through update, reserve or _store"

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

    def reserve(self, incoming: torch.Tensor) -> None:
        """Make room for states shaped like `incoming` [rows, heads, new, dim] after the cached ones:
        the first buffers get 256 spare columns, a full one grows to hold them plus as much again."""
        if not self.is_initialized:
            self.lazy_initialization(incoming, incoming)
        if self._k is None:
            self._store(incoming[:, :, :0], incoming[:, :, :0], room=256 + incoming.shape[-2])
        elif self.length + incoming.shape[-2] > self._k.shape[-2]:
            self._store(self.keys, self.values, room=max(256, self.length) + incoming.shape[-2])

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers, room included: a pass that writes its new states in place
        (fcapp.models.llama_step) after `reserve`, then calls `advance`."""
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def advance(self, new: int) -> None:
        """Count the `new` columns written into the buffers after the cached ones."""
        self.length += new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.reserve(key_states)
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.advance(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove columns (negative, as in transformers 5)."""
        self.length = max(0, self.length + min(tokens_to_remove, 0))

    def take(self, source: "_GrowingLayer", rows: list[int], runs: list[list[tuple[int, int]]], width: int) -> None:
        """Become `source`'s rows `rows` over `width` columns: new row j holds the source columns of
        runs[j] ((start, n) pairs) one after another from column 0, then zeros (masked holes: never
        uninitialised memory, whose NaNs a zero attention weight would not cancel). A row's tokens sit
        in a few contiguous runs, so this copies slices (10x faster than gathering columns)."""
        if source._k is None:
            return
        _, heads, _, dim = source.keys.shape
        self.device, self.is_initialized = source.device, True
        self._k = source.keys.new_empty(len(rows), heads, width + 256, dim)
        self._v = source.values.new_empty(len(rows), heads, width + 256, dim)
        for j, (row, pieces) in enumerate(zip(rows, runs)):
            end = 0
            for start, n in pieces:
                self._k[j, :, end:end + n] = source.keys[row, :, start:start + n]
                self._v[j, :, end:end + n] = source.values[row, :, start:start + n]
                end += n
            self._k[j, :, end:width] = 0
            self._v[j, :, end:width] = 0
        self.length = width

    def put(self, rows: list[int], source: "_GrowingLayer", width: int) -> None:
        """Write `source`'s rows over rows `rows`, from column 0. A layer narrower than `width` grows to
        it first, its new columns zeros (masked holes for the other rows)."""
        assert self._k is not None and self._v is not None and source._k is not None
        if width > self.length:
            if width > self._k.shape[-2]:
                self._store(self.keys, self.values, room=max(256, self.length) + width - self.length)
            self._k[:, :, self.length:width] = 0
            self._v[:, :, self.length:width] = 0
            self.length = width
        for j, row in enumerate(rows):
            self._k[row, :, :source.length] = source.keys[j]
            self._v[row, :, :source.length] = source.values[j]

    def join(self, parts: list[tuple["_GrowingLayer", int]], width: int) -> None:
        """Become the rows of `parts` ((layer, its row count) pairs) stacked, from column 0, over
        `width` columns; the columns on the right of a narrower part are zeros (masked holes)."""
        like = next((layer for layer, _ in parts if layer._k is not None), None)
        if like is None:
            return
        _, heads, _, dim = like.keys.shape
        rows = sum(n for _, n in parts)
        k, v = like.keys.new_zeros(rows, heads, width, dim), like.values.new_zeros(rows, heads, width, dim)
        row = 0
        for layer, n in parts:
            if layer._k is not None and layer.length:
                k[row:row + n, :, :layer.length] = layer.keys
                v[row:row + n, :, :layer.length] = layer.values
            row += n
        self.device, self.is_initialized = like.device, True
        self._store(k, v, room=256)


class KVState:
    """The KV cache of a batch of rows plus, per row, which tokens it holds and in which column.

    Rows have different lengths and may lose a tail (the next prompt re-tokenises a reply differently)
    while other rows keep theirs, so a column may be a hole for some rows: holes are masked out of
    attention and compacted away when they waste too much. Positions (RoPE) count only real tokens,
    so every row computes what it would alone. Rows are packed from column 0, so the prompt that
    samples of one problem share sits in the same columns of every row: a decode pass reads its keys
    and values once for all rows (`shared`)."""

    def __init__(self, n_layers: int, rows: int = 0) -> None:
        self.n_layers = n_layers
        self.cache = Cache(layers=[_GrowingLayer() for _ in range(n_layers)])
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # per row: its real tokens, in order
        self.where: list[list[int]] = [[] for _ in range(rows)]   # per row: the column of each of them
        self.valid = torch.zeros(rows, 0, dtype=torch.bool)  # [rows, columns]: column holds a real token
        self._shared: int | None = None  # `shared`, once worked out

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    @property
    def shared(self) -> int:
        """How many leading columns every row holds alike: the same tokens, from position 0, one per
        column. Their keys and values are the same in every row, up to float rounding where rows were
        encoded in different passes. Worked out again after rows are cut, moved or replaced; appending
        leaves it as it was (still true, if perhaps short of what the rows now share)."""
        if self._shared is None:
            n = min((len(tokens) for tokens in self.tokens), default=0)
            for tokens, where in zip(self.tokens, self.where):
                n = min(common_prefix(tokens, self.tokens[0]), common_prefix(where, range(n)), n)
            self._shared = n
        return self._shared

    def match(self, ids: list[int]) -> tuple[int, int]:
        """(row, n): the row sharing the longest prefix with `ids` and that prefix's length."""
        best = (0, 0)
        for row, held in enumerate(self.tokens):
            n = common_prefix(held, ids)
            if n > best[1]:
                best = (row, n)
        return best

    def keep(self, sources: list[int], lengths: list[int]) -> "KVState":
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
        self._shared = None
        for layer in self.cache.layers:
            layer.crop(width - layer.get_seq_length())
        return self

    def rows(self, sources: list[int], lengths: list[int]) -> "KVState":
        """A new state whose row j holds the first lengths[j] tokens of row sources[j], packed from
        column 0 (the holes of shorter rows on the right). This one is left as it is."""
        width = max(lengths, default=0)
        packed = KVState(self.n_layers)
        packed.valid = torch.zeros(len(sources), width, dtype=torch.bool)
        runs = []
        for j, (s, n) in enumerate(zip(sources, lengths)):
            packed.valid[j, :n] = True
            runs.append(_runs(self.where[s][:n]))
        for new, old in zip(packed.cache.layers, self.cache.layers):
            new.take(old, sources, runs, width)
        packed.tokens = [self.tokens[s][:n] for s, n in zip(sources, lengths)]
        packed.where = [list(range(n)) for n in lengths]
        return packed

    def put(self, targets: list[int], source: "KVState") -> None:
        """Replace rows `targets` by `source`'s rows, in place, from column 0: the replaced rows' old
        columns past the new rows' become holes, and where `source` is wider the other rows get masked
        holes on the right."""
        width = max(self.width, source.width)
        valid = torch.zeros(len(self.tokens), width, dtype=torch.bool)
        valid[:, :self.width] = self.valid
        for j, row in enumerate(targets):
            valid[row] = False
            valid[row, :source.width] = source.valid[j]
            self.tokens[row] = list(source.tokens[j])
            self.where[row] = list(source.where[j])
        self.valid, self._shared = valid, None
        for mine, theirs in zip(self.cache.layers, source.cache.layers):
            mine.put(targets, theirs, width)

    @staticmethod
    def joined(states: list["KVState"]) -> "KVState":
        """One state holding the rows of `states` in order, from column 0, as wide as the widest."""
        width = max(state.width for state in states)
        joined = KVState(states[0].n_layers)
        joined.valid = torch.zeros(sum(len(state.tokens) for state in states), width, dtype=torch.bool)
        row = 0
        for state in states:
            joined.valid[row:row + len(state.tokens), :state.width] = state.valid
            joined.tokens += [list(tokens) for tokens in state.tokens]
            joined.where += [list(where) for where in state.where]
            row += len(state.tokens)
        for i, layer in enumerate(joined.cache.layers):
            layer.join([(state.cache.layers[i], len(state.tokens)) for state in states], width)
        return joined

    def feed(self, model: torch.nn.Module, suffixes: list[list[int]], pad_id: int,
             hand_written: bool = True, every: bool = False) -> torch.Tensor:
        """Append each row's new tokens (right-aligned; shorter rows get masked pads first) and return
        the logits after each row's last token, [rows, vocab]. A pass of one token per row runs
        `llama_step.decode_pass` where it supports the model, unless `hand_written` is off; it reads
        the `shared` columns' keys and values once for all rows. `every`: one row's tokens (a drafted
        run), through `decode_pass`; the logits after each of them, [tokens, vocab]."""
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
            if every:
                assert rows == 1 and mask is None and llama_step.supports(model), "a drafted run is one packed row"
                logits = llama_step.decode_pass(model, ids.to(device), positions.to(device), None, self.cache)[0]
            elif new == 1 and hand_written and llama_step.supports(model):
                shared = self.shared if rows > 1 else 0
                logits = llama_step.decode_pass(model, ids.to(device), positions.to(device), mask, self.cache,
                                                shared)[:, -1]
            else:
                logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                               cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        except BaseException:
            self.__init__(self.n_layers)  # a half-updated cache is worthless: start clean
            raise
        for row, suffix in enumerate(suffixes):
            self.tokens[row].extend(suffix)
            self.where[row].extend(range(start + new - len(suffix), start + new))
        self.valid = valid
        return logits


def _runs(columns: list[int]) -> list[tuple[int, int]]:
    """`columns` (ascending) as contiguous runs, (first column, length) each."""
    runs: list[tuple[int, int]] = []
    for column in columns:
        if runs and sum(runs[-1]) == column:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((column, 1))
    return runs


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
