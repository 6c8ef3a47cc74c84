"""The CPU speed-ups of the local backend change no result: the [in, out] layout with its
split-reduction matmul equals the plain Linear, and the thread chooser keeps the cheaper thread
count, backing off a probe that a busy core makes hopeless."""

from __future__ import annotations

import types

import torch

from fcapp.models.cpu import ThreadChooser, lay_out_for_decode


def test_the_split_reduction_matmul_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536, bias=True)
    inputs = {rows: torch.randn(rows, 576) for rows in (1, 3, 40)}
    plain = {rows: layer(x) for rows, x in inputs.items()}
    lay_out_for_decode(layer)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows, x in inputs.items():
                assert torch.allclose(layer(x), plain[rows], atol=1e-5), (threads, rows)
            assert layer(inputs[1][None]).shape == (1, 1, 1536)  # leading dims kept
    finally:
        torch.set_num_threads(before)


def test_the_thread_chooser_keeps_the_cheaper_count_and_backs_off_a_hopeless_probe() -> None:
    chooser = ThreadChooser(2)
    costs = {1: 1.0, 2: 0.6}
    for _ in range(40):
        threads = chooser.next()
        chooser.record(threads, costs[threads])
    assert chooser.current == 2  # probed and switched
    chooser = ThreadChooser(2)
    costs = {1: 1.0, 2: 50.0}
    tried = []
    for _ in range(600):
        threads = chooser.next()
        tried.append(threads)
        chooser.record(threads, costs[threads])
    assert chooser.current == 1
    assert tried.count(2) == 2  # one-pass probes, the second only after the longest wait
    assert tried.index(2, tried.index(2) + 1) - tried.index(2) > ThreadChooser.LONGEST


def test_the_encoding_chooser_compares_thread_counts_not_the_sizes_of_passes(small_model, monkeypatch) -> None:
    """An agent encodes a 540-token prompt, then ~14-47-token tool results, one pass each. Per token a
    short pass costs up to 3x a long one whatever the threads, so timed per token alone the probe of two
    threads (on short passes) lost to one thread (timed on the prompt), and every prompt ran on one core
    (1.4-1.6x slower on the idle 2-core box). Costs below: the passes' measured times on that box."""
    from fcapp.models import local

    def seconds(tokens: int, threads: int) -> float:
        return 0.110 + 0.00295 * tokens if threads == 1 else 0.093 + 0.00175 * tokens
    now = [0.0]
    monkeypatch.setattr(local, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(small_model, "_choosers", {"prefill": ThreadChooser(2)})
    monkeypatch.setattr(small_model, "stats", local.DecodeStats())

    def encode(tokens: int) -> torch.Tensor:
        small_model.stats.encoded_tokens += tokens
        now[0] += seconds(tokens, torch.get_num_threads())
        return torch.zeros(1)
    before = torch.get_num_threads()
    try:
        threads = []
        for tokens in [540, 47, 14, 47, 286, 47, 14, 47, 47, 94, 47, 14] * 3:
            small_model._encoding_pass(lambda: encode(tokens))
            threads.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert small_model._choosers["prefill"].current == 2  # switched after its first probe, and kept
    assert threads[:4] == [1, 1, 2, 2] and threads[4:].count(1) <= 4  # later probes of one thread lost
