"""CPU speed-ups of the local backend, each measured on the 2-core box (benchmarks/results.md):
Linear weights laid out for one-token matmuls (`lay_out_for_decode`), the split-reduction matmul
that puts both cores on one row (`_few_rows_forward`), weight-only quantised copies of the weights
for decoding (`quantise_for_decode`), and intra-op threads chosen by timing the passes as they run
(`ThreadChooser`). None of them changes a weight's shape or value: the quantised copies sit beside
the fp32 weights, which prompts (and training) keep using.
"""

from __future__ import annotations

import types
import warnings
from typing import Optional

import torch


def lay_out_for_decode(model: torch.nn.Module) -> None:
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
    """The Linear's forward through `few_rows_linear`."""
    return few_rows_linear(x, self.weight, self.bias, torch.get_num_threads())


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], threads: int) -> torch.Tensor:
    """x @ weight.T (+ bias) for a few rows (decoding) as two half-length reductions in one batched
    matmul, summed. MKL runs a one-row matmul on a single thread whatever the thread count, but the
    two matmuls of a batch on two threads: measured on the 2-core box, the weights of a token stream
    in 16 ms instead of 28 ms and a decode step is 1.4x faster. With one thread, many rows (a
    prompt), an odd input width or weights not stored [in, out], the plain matmul. Scriptable: the
    hand-written decode pass (fcapp.models.llama_step) runs it inside TorchScript."""
    out_features, in_features = weight.shape[0], weight.shape[1]
    rows = x.numel() // in_features
    if rows > 16 or threads < 2 or in_features % 2 != 0 or not weight.t().is_contiguous():
        return torch.nn.functional.linear(x, weight, bias)
    half = in_features // 2
    halves = torch.bmm(x.reshape(rows, 2, half).transpose(0, 1), weight.t().view(2, half, out_features))
    out = halves.sum(0) if bias is None else halves.sum(0) + bias
    return out.view(list(x.shape[:-1]) + [out_features])


Packed8 = torch.classes.quantized.LinearPackedParamsBase  # FBGEMM's packed int8 weight, as TorchScript types it
GROUP = 32  # int4 group size: the GGUF's Q4_1 blocks, so its layer weights requantise exactly
MOST_ROWS = 8  # a pass with more rows than this takes the fp32 weights (see `QuantisedWeight`)


class QuantisedWeight:
    """A Linear weight [out, in] quantised for one of PyTorch's CPU kernels, with `matmul(x)` about
    x @ weight.T for x [rows, in] in float32. Kernels chosen by measurement on the 2-core box
    (benchmarks/results.md):

    int8: FBGEMM's dynamic quantised linear: weights int8 per output row, each call quantising its
    input to 8 bits with one scale for the call. It streams the weights at memory speed and a few
    rows cost little more than one; the weight-only `_weight_int8pack_mm` ran 2-5x slower and
    grows with the rows. int4: `_weight_int4pack_mm_for_cpu`, weight-only, asymmetric per group
    of 32 inputs (scale and minimum), its input in bfloat16 (the kernel's fast path; float32 takes
    a scalar loop 10-30x slower). The embedded model's layer weights are Q4_1 blocks of 32 in its
    GGUF, so they come back as they were, up to the bfloat16 rounding of each block's scale and
    minimum; the kernel costs more per byte than FBGEMM's and grows with the rows (about fp32's at
    8 rows), so int4 decodes only few-row passes (`MOST_ROWS`)."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        weight = weight.detach().float().contiguous()
        out, inputs = weight.shape
        self.bits = bits
        if bits == 8:
            scales = weight.abs().amax(1).clamp(min=1e-12) / 127
            with warnings.catch_warnings():  # torch 2.13 flags quantised tensors as deprecated; the kernel is not
                warnings.simplefilter("ignore", UserWarning)
                levels = torch.quantize_per_channel(weight, scales.double(), torch.zeros(out, dtype=torch.long), 0,
                                                    torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(levels, None)
            self.nbytes = out * inputs + out * 8  # int8 levels, a float64 scale per row
        elif bits == 4:
            groups = weight.reshape(out, inputs // GROUP, GROUP)
            low, high = groups.amin(-1), groups.amax(-1)
            scales = ((high - low) / 15).clamp(min=1e-12)
            levels = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).reshape(out, inputs), 2)
            # the kernel computes (level - 8) * scale + zero: zero = low + 8 * scale
            self.scales = torch.stack([scales, low + 8 * scales], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self.nbytes = out * inputs // 2 + self.scales.numel() * 2
        else:
            raise ValueError(f"weights quantise to 8 or 4 bits, not {bits}")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return int8_matmul(x, self.packed)
        return int4_matmul(x, self.packed, self.scales, GROUP)


def int8_matmul(x: torch.Tensor, packed: Packed8) -> torch.Tensor:
    """x [rows, in] float32 times an int8 `QuantisedWeight`'s packed weight, float32 (scriptable)."""
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x [rows, in] float32 times an int4 `QuantisedWeight`'s packed weight and the scales of its
    groups of `group` inputs, float32 (scriptable)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group, scales).float()


def quantise_for_decode(model: torch.nn.Module, precision: str) -> None:
    """Give every Linear of `model` (the output head included) a `QuantisedWeight` of `precision`
    ('int8' or 'int4') for decoding passes. Linears that read the same input (a layer's q/k/v, its
    gate/up) are quantised as one weight, rows stacked, each Linear taking its `decode_columns` of the
    product: the hand-written decode pass (fcapp.models.llama_step) then runs one matmul for them,
    with the same logits (each row is quantised as it would be alone). A Linear called on its own, in
    a pass of two to MOST_ROWS new tokens, computes its group's whole product and keeps its columns.
    Linears whose input width is no multiple of the int4 group stay fp32. With int4 the output head is
    int8, as in the GGUF (Q8_0): its weight is the token embedding, whose values 4 bits would round.
    The fp32 weights stay as they are."""
    bits = {"int8": 8, "int4": 4}[precision]
    model.__dict__.pop("_decode_stack", None)  # the hand-written decode pass gathers the new weights
    head = model.get_output_embeddings()
    for group in _same_input_groups(model):
        if group[0].in_features % GROUP:
            continue
        weight = QuantisedWeight(torch.cat([linear.weight for linear in group]), 8 if head in group else bits)
        start = 0
        for linear in group:
            linear.decode_weight, linear.decode_columns = weight, slice(start, start + linear.out_features)
            linear.forward = types.MethodType(_quantised_forward, linear)
            start += linear.out_features


def _same_input_groups(model: torch.nn.Module) -> list[list[torch.nn.Linear]]:
    """`model`'s Linears, those of a layer that read the same input together: an attention's q/k/v
    projections and an MLP's gate/up (Llama's names); every other Linear alone."""
    grouped: list[list[torch.nn.Linear]] = []
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            linears = [getattr(module, name, None) for name in names]
            if all(isinstance(linear, torch.nn.Linear) for linear in linears):
                grouped.append(linears)
    inside = {id(linear) for group in grouped for linear in group}
    alone = [[module] for module in model.modules() if isinstance(module, torch.nn.Linear) and id(module) not in inside]
    return grouped + alone


def _quantised_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A decoding pass (at most MOST_ROWS rows) through the quantised weight, its input and output
    fp32 like the rest of the model; more rows (a prompt) through the fp32 weight."""
    rows = x.numel() // x.shape[-1]
    if rows > MOST_ROWS:
        return _few_rows_forward(self, x)
    out = self.decode_weight.matmul(x.reshape(rows, self.in_features))[:, self.decode_columns]
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding pass reads: each Linear's quantised copy where it has one, else
    its fp32 weight, plus every other parameter (norms; the embedding rows read are negligible, so
    a tied embedding counts once, as the output head). A weight quantised for a group counts once."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for parameter in module.parameters(recurse=False):
            quantised = getattr(module, "decode_weight", None) if parameter is getattr(module, "weight", None) else None
            counted = quantised if quantised is not None else parameter
            if id(counted) not in seen:
                seen.add(id(counted))
                total += quantised.nbytes if quantised is not None else parameter.numel() * parameter.element_size()
    return total


class ThreadChooser:
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

