"""Sampling: greedy is argmax; top-k / top-p keep exactly the right support; seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from lagoon.engine.sampling import SamplingParams, filter_logits, greedy_picks, make_generator, sample
from lagoon.errors import BadRequestError


def test_greedy_is_argmax():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(temperature=0)) == int(logits.argmax())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_picks_argmax_first_maximum_on_ties(dtype):
    # bf16 logits tie often: the fast pick must be argmax's (the first maximum), also with top_k=1,
    # and inside a grammar's mask
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        logits = (torch.randn(49152, generator=g) * 2).round().to(dtype)  # many exact ties
        assert sample(logits, SamplingParams(temperature=0)) == int(torch.argmax(logits))
        assert sample(logits, SamplingParams(temperature=0.7, top_k=1)) == int(torch.argmax(logits))
        allowed = torch.rand(49152, generator=g) < 0.3
        masked = logits.masked_fill(~allowed, float("-inf"))
        assert sample(logits, SamplingParams(temperature=0), allowed=allowed) == int(torch.argmax(masked))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_picks_is_each_rows_first_maximum(dtype):
    # the scheduler's batched greedy pick (numpy's argmax on float32): fresh random rows with many
    # exact ties, a strided view (a column slice, as logits[i] rows of a wider tensor), a NaN row
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        wide = (torch.randn(5, 2 * 49152, generator=g) * 2).round().to(dtype)
        logits = wide[:, ::2]  # not contiguous
        want = [int(torch.argmax(row)) for row in logits]
        assert greedy_picks(logits) == want
        assert greedy_picks(logits.contiguous()) == want
    nan_row = torch.randn(1, 300, generator=g).to(dtype)
    nan_row[0, 7] = nan_row[0, 100] = float("nan")
    assert greedy_picks(nan_row) == [int(nan_row.max(-1).indices)] == [7]
    zeros = torch.full((1, 300), -1.0).to(dtype)
    zeros[0, 9], zeros[0, 40] = -0.0, 0.0  # a tie between -0.0 and +0.0: the first wins, as in torch
    assert greedy_picks(zeros) == [int(torch.argmax(zeros))] == [9]
    with torch.enable_grad():  # an eager forward's logits may carry grad
        x = torch.randn(2, 300, requires_grad=True)
        assert greedy_picks(x * 2) == (x * 2).argmax(-1).tolist()


def test_top_k_and_top_p_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    kept = filter_logits(logits, top_k=0, top_p=0.7)  # 0.64 < 0.7 so the second token is kept too
    assert torch.isfinite(kept).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.7 < probs[:2].sum()
    kept = filter_logits(logits[[3, 0, 4, 1, 2]], top_k=0, top_p=0.5)  # order does not matter
    assert torch.isfinite(kept).tolist() == [False, True, False, False, False]


def test_seeded_sampling_reproduces_and_follows_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(50)]
    b = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(50)]
    assert a == b
    g = make_generator(1)
    draws = torch.tensor([sample(logits, p, g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, logits.softmax(-1), atol=0.03)


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}])
def test_bad_params_are_rejected(bad):
    with pytest.raises(BadRequestError):
        SamplingParams(**bad)
