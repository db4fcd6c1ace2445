"""The sampled token follows the processed distribution.

For fixed logits, 20,000 seeded draws (one batch of 20,000 rows, seeds 0..19999) are compared
with the distribution transformers' warpers produce (XTC: the mixture of its two outcomes).
Tokens the filters remove must never be drawn; on the others a chi-square goodness-of-fit
test must not reject at significance 1e-3 (seeds are fixed, so the outcome is deterministic),
and the total-variation distance must be below 0.02.
"""

import copy

import pytest
import torch
from scipy.stats import chi2
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                     TopKLogitsWarper, TopPLogitsWarper,
                                                     TypicalLogitsWarper)

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.sampling_params import SamplingParams

torch.set_num_threads(1)
DRAWS = 20_000
V = 12
LOGITS = torch.tensor([2.0, 1.6, 1.5, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -1.5, -2.5, -4.0])


def warp(*processors):
    x = LOGITS.unsqueeze(0).clone()
    for processor in processors:
        x = processor(torch.tensor([[0]]), x)
    return torch.softmax(x[0].double(), -1)


def xtc_mixture(threshold, probability):
    p = torch.softmax(LOGITS.double(), -1)
    above = (p >= threshold).nonzero().flatten().tolist()
    cut = LOGITS.clone()
    cut[[t for t in above if t != max(above, key=lambda t: -p[t])]] = float("-inf")
    return probability * torch.softmax(cut.double(), -1) + (1 - probability) * p


def sample_counts(params: SamplingParams, seeded: bool = True) -> torch.Tensor:
    rows = []
    for i in range(DRAWS):
        row_params = copy.copy(params)
        row_params.seed = i if seeded else None
        rows.append(SamplingRow(row_params, [1], [], {}))
    tokens = Sampler(seed=99)(LOGITS.expand(DRAWS, V).clone(), rows).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=V).double()


def assert_matches(counts: torch.Tensor, expected: torch.Tensor):
    zero = expected == 0
    assert counts[zero].sum() == 0, "a removed token was sampled"
    observed, wanted = counts[~zero], expected[~zero] * DRAWS
    statistic = ((observed - wanted) ** 2 / wanted).sum().item()
    p_value = chi2.sf(statistic, df=int((~zero).sum()) - 1)
    assert p_value > 1e-3, f"chi-square {statistic:.1f}, p = {p_value:.2g}"
    assert 0.5 * (counts / DRAWS - expected).abs().sum() < 0.02


CASES = {
    "temperature+top_k": (SamplingParams(temperature=0.7, top_k=5),
                          warp(TemperatureLogitsWarper(0.7), TopKLogitsWarper(5))),
    "top_p": (SamplingParams(top_p=0.8), warp(TopPLogitsWarper(0.8))),
    "min_p": (SamplingParams(min_p=0.15), warp(MinPLogitsWarper(0.15))),
    "typical_p": (SamplingParams(typical_p=0.6), warp(TypicalLogitsWarper(0.6))),
    "xtc": (SamplingParams(xtc_threshold=0.1, xtc_probability=0.5), xtc_mixture(0.1, 0.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_draws_follow_processed_distribution(name):
    params, expected = CASES[name]
    assert (expected > 0).sum() >= 3          # a real distribution, not a single token
    assert_matches(sample_counts(params), expected)


def test_unseeded_draws_follow_distribution():
    params, expected = CASES["temperature+top_k"]
    assert_matches(sample_counts(params, seeded=False), expected)


def test_plain_sampling_is_not_greedy():
    counts = sample_counts(SamplingParams())
    assert_matches(counts, torch.softmax(LOGITS.double(), -1))
    assert (counts > 0).sum() == V
