"""Seeded rows are reproducible whatever else is batched and across preemption; each row's
own sampler_priority holds inside a mixed batch."""

import copy
import random

import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                     TopKLogitsWarper)

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplingParams

torch.set_num_threads(1)
V = 256
NEG = float("-inf")

# Rows with every kind of setting, to surround the row under test.
NEIGHBOURS = [
    SamplingParams(), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(top_k=5, seed=77), SamplingParams(min_p=0.1, repetition_penalty=1.3),
    SamplingParams(xtc_probability=0.5, xtc_threshold=0.01), SamplingParams(typical_p=0.8),
    SamplingParams(dry_multiplier=0.8, frequency_penalty=0.5, seed=3),
    SamplingParams(sampler_priority=list(reversed(range(14))), temperature=1.5, min_p=0.2),
    SamplingParams(temperature_last=True, temperature=0.5, tfs=0.9),
    SamplingParams(mirostat_mode=2, mirostat_tau=3.0), SamplingParams(skew=1.0, nsigma=1.5),
    SamplingParams(dynatemp_min=0.3, dynatemp_max=1.8, top_a=0.1),
    SamplingParams(no_repeat_ngram_size=2, logit_bias={4: 3.0}, eta_cutoff=3.0),
]
UNDER_TEST = [
    SamplingParams(seed=1234),
    SamplingParams(seed=-5, temperature=1.3, top_k=50, top_p=0.95, min_p=0.02),
    SamplingParams(seed=42, xtc_probability=0.5, xtc_threshold=0.005, repetition_penalty=1.2),
    SamplingParams(seed=7, dry_multiplier=1.0, frequency_penalty=0.4, skew=0.5),
    SamplingParams(seed=2**40, mirostat_mode=2, mirostat_tau=4.0, typical_p=0.9),
    SamplingParams(seed=9, sampler_priority=["min_p", "temperature"] + [
        s.name.lower() for s in DEFAULT_SAMPLER_ORDER if s.name not in ("MIN_P", "TEMPERATURE")],
        temperature=2.0, min_p=0.3),
]


def row_for(params, rng):
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 40))]
    output = [rng.randrange(V) for _ in range(rng.randrange(0, 30))]
    return SamplingRow(copy.deepcopy(params), prompt, output, {})


def clone_row(row):
    """The same request as seen after preemption: same tokens, fresh state."""
    return SamplingRow(copy.deepcopy(row.params), list(row.prompt_token_ids),
                       list(row.output_token_ids), {})


def test_seeded_row_same_alone_and_in_mixed_batch():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for params in UNDER_TEST:
        for _ in range(5):
            target = row_for(params, rng)
            row_logits = torch.randn(V, generator=gen) * 2
            alone = Sampler(seed=1)(row_logits.unsqueeze(0).clone(), [clone_row(target)])
            neighbours = [row_for(rng.choice(NEIGHBOURS), rng) for _ in range(31)]
            position = rng.randrange(32)
            batch_rows = neighbours[:position] + [clone_row(target)] + neighbours[position:]
            batch_logits = torch.randn(32, V, generator=gen) * 2
            batch_logits[position] = row_logits
            mixed = Sampler(seed=2)(batch_logits, batch_rows)
            assert mixed.token_ids[position] == alone.token_ids[0]


def test_seeded_row_survives_preemption_and_draws_fresh_noise_each_step():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, V, generator=gen) * 0.2        # flat: many plausible tokens
    first, again, next_step, other_seed = [], [], [], []
    for seed in range(200):
        row = SamplingRow(SamplingParams(seed=seed), [1, 2], [3] * 4, {})
        first.append(Sampler()(logits.clone(), [row]).token_ids[0])
        again.append(Sampler()(logits.clone(), [clone_row(row)]).token_ids[0])
        row.output_token_ids.append(9)
        next_step.append(Sampler()(logits.clone(), [row]).token_ids[0])
        other = SamplingRow(SamplingParams(seed=seed + 1000), [1, 2], [3] * 4, {})
        other_seed.append(Sampler()(logits.clone(), [other]).token_ids[0])
    assert first == again                                  # recompute gives the same token
    assert sum(a != b for a, b in zip(first, next_step)) > 150   # a new step, new noise
    assert sum(a != b for a, b in zip(first, other_seed)) > 150


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(1))
    runs = []
    for sampler_seed in (5, 5, 6):
        rows = [SamplingRow(SamplingParams(), [1], [], {}) for _ in range(16)]
        sampler = Sampler(seed=sampler_seed)
        first = sampler(logits.clone(), rows).token_ids
        runs.append(first + sampler(logits.clone(), rows).token_ids)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def processed_logprobs(sampler, logits, rows):
    for row in rows:
        row.params.logprobs, row.params.logprobs_mode = V, "processed"
    out = sampler(logits.clone(), rows)
    table = torch.full((len(rows), V), NEG, dtype=torch.float64)
    for i, lp in enumerate(out.logprobs):
        values = torch.tensor(lp.top_logprobs, dtype=torch.float64)
        values[values <= -9999.0] = NEG
        table[i, torch.tensor(lp.top_token_ids)] = values
    return table


def test_each_rows_sampler_priority_holds_in_a_mixed_batch():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(3)) * 2
    min_p_first = ["min_p", "top_k", "temperature"] + [
        s.name.lower() for s in DEFAULT_SAMPLER_ORDER
        if s.name not in ("MIN_P", "TOP_P_TOP_K", "TEMPERATURE")]
    settings = dict(temperature=3.0, min_p=0.2, top_k=20)
    custom = SamplingParams(sampler_priority=min_p_first, **settings)
    default = SamplingParams(**settings)
    last = SamplingParams(temperature_last=True, **settings)
    rng = random.Random(4)
    rows = [SamplingRow(copy.deepcopy(p), [1], [2], {}) for p in
            [default, custom, last, rng.choice(NEIGHBOURS), custom, default,
             rng.choice(NEIGHBOURS), last]]
    batch = processed_logprobs(Sampler(), logits, rows)

    def reference(x, processors):
        x = x.unsqueeze(0).clone()
        for processor in processors:
            x = processor(torch.tensor([[0]]), x)
        return torch.log_softmax(x[0].double(), -1)

    temp, min_p, top_k = (TemperatureLogitsWarper(3.0), MinPLogitsWarper(0.2),
                          TopKLogitsWarper(20))
    expected = {0: [temp, top_k, min_p], 5: [temp, top_k, min_p],
                1: [min_p, top_k, temp], 4: [min_p, top_k, temp],
                2: [top_k, min_p, temp], 7: [top_k, min_p, temp]}
    for i, processors in expected.items():
        alone = processed_logprobs(Sampler(), logits[i:i + 1], [clone_row(rows[i])])[0]
        torch.testing.assert_close(batch[i], alone, atol=1e-6, rtol=0)
        want = reference(logits[i], processors)
        assert torch.equal(torch.isinf(batch[i]), torch.isinf(want))
        torch.testing.assert_close(batch[i][torch.isfinite(want)],
                                   want[torch.isfinite(want)], atol=1e-4, rtol=0)
    # The orders really differ here: min-p before the temperature keeps fewer tokens.
    assert torch.isinf(batch[1]).sum() > torch.isinf(batch[0]).sum()
