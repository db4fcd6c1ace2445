"""Each sampler stage against an independent reference, on random logits, in mixed batches.

The sampler is used as a black box: every row asks for logprobs over the whole (small)
vocabulary in "processed" mode, which is the distribution it actually sampled from. That is
compared with transformers' logits processors where one exists, and otherwise with a plain
per-row reference written from the formulas in the research notes (float64, no batching).
"""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper, EtaLogitsWarper, MinPLogitsWarper, NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.sampling_params import SamplingParams

torch.set_num_threads(1)
V = 64
NEG = float("-inf")


# ---- harness ----------------------------------------------------------------------------------

def make_rows(params_list, histories=None):
    rows = []
    for i, params in enumerate(params_list):
        prompt, output = histories[i] if histories else ([1, 2, 3], [4, 5])
        rows.append(SamplingRow(params, list(prompt), list(output), {}))
    return rows


def processed(logits, rows, sampler=None, eos=()):
    """Run the sampler; return (tokens, [B, V] processed logprobs, -inf where masked)."""
    vocab = logits.shape[1]
    for row in rows:
        row.params.logprobs, row.params.logprobs_mode = vocab, "processed"
    out = (sampler or Sampler(eos_token_ids=eos, seed=0))(logits.clone(), rows)
    table = torch.full((len(rows), vocab), NEG, dtype=torch.float64)
    for i, lp in enumerate(out.logprobs):
        values = torch.tensor(lp.top_logprobs, dtype=torch.float64)
        values[values <= -9999.0] = NEG
        table[i, torch.tensor(lp.top_token_ids)] = values
    return out.token_ids, table


def assert_dist(actual_logprobs, expected_logits, atol=1e-4):
    """Same support, same log-probabilities on it."""
    expected = torch.log_softmax(expected_logits.to(torch.float64), -1)
    expected[expected < -9999.0] = NEG
    assert torch.equal(torch.isinf(actual_logprobs), torch.isinf(expected)), (
        f"support differs: {torch.isinf(actual_logprobs).nonzero().flatten().tolist()} vs "
        f"{torch.isinf(expected).nonzero().flatten().tolist()}")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual_logprobs[finite], expected[finite], atol=atol, rtol=0)


def hf(processor, logits_row, input_ids=None):
    ids = torch.tensor([input_ids if input_ids is not None else [0]])
    return processor(ids, logits_row.unsqueeze(0).clone())[0]


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(8, V, generator=gen) * 2.5


# ---- plain references for stages transformers does not have -----------------------------------

def ref_probs(x):
    return torch.softmax(x.to(torch.float64), -1)


def ref_top_a(x, a):
    p = ref_probs(x)
    return x.masked_fill((p < a * p.max() ** 2) & (p < p.max()), NEG)


def ref_tfs(x, z):
    p, order = torch.sort(ref_probs(x), descending=True)
    d2 = (p[2:] - 2 * p[1:-1] + p[:-2]).abs()
    cdf = torch.cumsum(d2 / d2.sum(), 0)
    remove = torch.zeros(len(x), dtype=torch.bool)
    remove[1:-1] = cdf > z
    remove[-1] = True
    out = x.clone()
    out[order[remove]] = NEG
    return out


def ref_nsigma(x, n):
    finite = x[torch.isfinite(x)].to(torch.float64)
    return x.masked_fill(x < finite.max() - n * finite.std(), NEG)


def ref_smoothing(x, f, c):
    x = x.to(torch.float64)
    d = x - x.max()
    new = x.max() - f * (3 - c) / 2 * d ** 2 + f * (c - 1) / 2 * d ** 3
    return torch.where(torch.isfinite(x), new, x)


def ref_xtc(x, threshold):
    p = ref_probs(x)
    above = [t for t in range(len(x)) if p[t] >= threshold]
    if len(above) < 2:
        return x
    keep = min(above, key=lambda t: p[t])
    out = x.clone()
    out[[t for t in above if t != keep]] = NEG
    return out


def ref_dynatemp(x, low, high, exponent):
    p = ref_probs(x)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    n = int(torch.isfinite(x).sum())
    t = low + (high - low) * (h / math.log(n)) ** exponent
    return x.to(torch.float64) / t


def ref_skew_logprobs(x, skew):
    p = ref_probs(x)
    sorted_p, order = torch.sort(p, descending=True)
    cdf = torch.cumsum(sorted_p, 0).clamp(0, 1) ** math.exp(skew)
    new_sorted = torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64))
    new = torch.zeros_like(p)
    new[order] = new_sorted
    return torch.log(new / new.sum())


def ref_freq_presence(x, output, freq, pres):
    out = x.clone().to(torch.float64)
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def ref_dry(x, history, mult, base, allowed, breakers, dry_range=0):
    h = history[-dry_range:] if dry_range else list(history)
    out = x.clone().to(torch.float64)
    n = len(h)
    if n < 2 or h[-1] in breakers:
        return out
    best = {}
    for j in range(n - 1):
        if h[j] != h[-1]:
            continue
        length = 0
        while j - length >= 0 and h[j - length] == h[n - 1 - length] \
                and h[n - 1 - length] not in breakers:
            length += 1
        follower = h[j + 1]
        if follower not in breakers and length >= allowed:
            best[follower] = max(best.get(follower, 0), length)
    for token, length in best.items():
        out[token] -= mult * base ** (length - allowed)
    return out


# ---- stages with a transformers reference ------------------------------------------------------

def test_temperature_matches_transformers(logits):
    temps = [0.5, 1.0, 1.7, 0.05, 3.0, 0.0, 1.2, 0.9]
    _, got = processed(logits, make_rows([SamplingParams(temperature=t) for t in temps]))
    for i, t in enumerate(temps):
        expected = logits[i] if t == 0 else hf(TemperatureLogitsWarper(t), logits[i])
        assert_dist(got[i], expected)


def test_top_k_matches_transformers(logits):
    ks = [0, -1, 1, 3, 17, V + 5, 40, 2]
    _, got = processed(logits, make_rows([SamplingParams(top_k=k) for k in ks]))
    for i, k in enumerate(ks):
        expected = logits[i] if k <= 0 else hf(TopKLogitsWarper(k), logits[i])
        assert_dist(got[i], expected)


@pytest.mark.parametrize("vocab,scale", [(V, 2.5), (4096, 0.05), (4096, 4.0)])
def test_top_p_matches_transformers(vocab, scale):
    # (4096, 0.05) is flat: the best 512 candidates hold too little mass, so the full-sort
    # fallback runs; (4096, 4.0) is peaked and stays on the candidate path.
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(7)) * scale
    ps = [1.0, 0.9, 0.5, 0.05, 0.999, 0.7]
    _, got = processed(logits, make_rows([SamplingParams(top_p=p) for p in ps]))
    for i, p in enumerate(ps):
        expected = logits[i] if p == 1.0 else hf(TopPLogitsWarper(p), logits[i])
        assert_dist(got[i], expected)


def test_top_k_then_top_p_in_one_row(logits):
    settings = [(5, 0.8), (20, 0.5), (0, 0.6), (3, 1.0), (30, 0.95), (1, 0.1), (10, 0.3), (0, 1.0)]
    _, got = processed(logits, make_rows([SamplingParams(top_k=k, top_p=p) for k, p in settings]))
    for i, (k, p) in enumerate(settings):
        expected = logits[i]
        if k > 0:
            expected = hf(TopKLogitsWarper(k), expected)
        if p < 1:
            expected = hf(TopPLogitsWarper(p), expected)
        assert_dist(got[i], expected)


def test_min_p_matches_transformers(logits):
    values = [0.0, 0.05, 0.2, 0.5, 1.0, 0.01, 0.3, 0.1]
    _, got = processed(logits, make_rows([SamplingParams(min_p=m) for m in values]))
    for i, m in enumerate(values):
        expected = logits[i] if m == 0 else hf(MinPLogitsWarper(m), logits[i])
        assert_dist(got[i], expected)


@pytest.mark.parametrize("vocab,scale", [(V, 2.5), (4096, 0.05)])
def test_typical_matches_transformers(vocab, scale):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * scale
    values = [1.0, 0.9, 0.5, 0.2, 0.95, 0.01]
    _, got = processed(logits, make_rows([SamplingParams(typical_p=t) for t in values]))
    for i, t in enumerate(values):
        expected = logits[i] if t == 1.0 else hf(TypicalLogitsWarper(mass=t), logits[i])
        assert_dist(got[i], expected)


def test_epsilon_and_eta_use_units_of_1e4(logits):
    # epsilon_cutoff=3 means p < 3e-4 is removed (units of 1e-4), likewise eta.
    logits = logits * 1.6
    eps = [0.0, 3.0, 30.0, 200.0]
    eta = [2.0, 20.0, 0.0, 500.0]
    params = [SamplingParams(epsilon_cutoff=e) for e in eps] + \
             [SamplingParams(eta_cutoff=e) for e in eta]
    _, got = processed(logits, make_rows(params))
    for i, e in enumerate(eps):
        expected = logits[i] if e == 0 else hf(EpsilonLogitsWarper(e * 1e-4), logits[i])
        assert_dist(got[i], expected)
    for j, e in enumerate(eta):
        i = len(eps) + j
        expected = logits[i] if e == 0 else hf(EtaLogitsWarper(e * 1e-4), logits[i])
        assert_dist(got[i], expected)


def test_repetition_penalty_over_prompt_and_output(logits):
    histories = [([1, 2, 3, 9], [4, 5, 5]), ([10, 11], [12, 13, 10]), ([7] * 5, []),
                 ([], [30, 31, 32]), ([1], [2]), ([40, 41], [42]), ([5], [6]), ([8], [9])]
    penalties = [1.3, 0.7, 2.0, 1.1, 1.0, 1.5, 1.25, 1.05]
    rows = make_rows([SamplingParams(repetition_penalty=r) for r in penalties], histories)
    _, got = processed(logits, rows)
    for i, rp in enumerate(penalties):
        prompt, output = histories[i]
        expected = hf(RepetitionPenaltyLogitsProcessor(rp), logits[i], prompt + output)
        assert_dist(got[i], expected)


def test_no_repeat_ngram_matches_transformers(logits):
    histories = [([1, 2, 3, 1, 2], [3, 1, 2]), ([5, 6, 5, 6], [5]), ([9, 9, 9], [9]),
                 ([1, 2], [3]), ([4, 5, 6, 7], [4, 5, 6]), ([8, 1], [8]), ([2], []),
                 ([3, 4, 3, 4, 3], [4, 3])]
    sizes = [2, 2, 3, 1, 3, 2, 2, 0]
    rows = make_rows([SamplingParams(no_repeat_ngram_size=n) for n in sizes], histories)
    _, got = processed(logits, rows)
    for i, n in enumerate(sizes):
        prompt, output = histories[i]
        expected = logits[i] if n == 0 else \
            hf(NoRepeatNGramLogitsProcessor(n), logits[i], prompt + output)
        assert_dist(got[i], expected)


def test_logit_bias_and_bad_words_match_transformers(logits):
    bias = {3: 5.0, 10: -2.5, 20: 250.0}           # 250 is clamped to 100
    bad = [[7], [4, 5, 6], [1, 9], [2, 3, 8]]       # [4, 5] was just generated: 6 is banned
    rows = make_rows([SamplingParams(logit_bias=bias), SamplingParams(bad_words_token_ids=bad),
                      SamplingParams(temperature=0, bad_words_token_ids=bad),
                      SamplingParams(banned_token_ids=[0, 63])])
    _, got = processed(logits[:4], rows)
    seq_bias = [[[t], min(b, 100.0)] for t, b in bias.items()]
    assert_dist(got[0], hf(SequenceBiasLogitsProcessor(seq_bias), logits[0]))
    for i in (1, 2):
        expected = hf(NoBadWordsLogitsProcessor(bad), logits[i], [1, 2, 3, 4, 5])
        assert_dist(got[i], expected)
    assert_dist(got[3], logits[3].index_fill(0, torch.tensor([0, 63]), NEG))


# ---- stages with a plain reference ----------------------------------------------------------

def test_top_a_tfs_nsigma_smoothing(logits):
    params = [SamplingParams(top_a=0.2), SamplingParams(top_a=0.9), SamplingParams(tfs=0.9),
              SamplingParams(tfs=0.5), SamplingParams(nsigma=1.0), SamplingParams(nsigma=2.5),
              SamplingParams(smoothing_factor=0.3),
              SamplingParams(smoothing_factor=0.25, smoothing_curve=2.5)]
    _, got = processed(logits, make_rows(params))
    expected = [ref_top_a(logits[0], 0.2), ref_top_a(logits[1], 0.9), ref_tfs(logits[2], 0.9),
                ref_tfs(logits[3], 0.5), ref_nsigma(logits[4], 1.0), ref_nsigma(logits[5], 2.5),
                ref_smoothing(logits[6], 0.3, 1.0), ref_smoothing(logits[7], 0.25, 2.5)]
    for i, e in enumerate(expected):
        assert_dist(got[i], e)
    assert torch.isinf(got[:6]).any(dim=1).all()     # the filters did remove something


def test_xtc_skew_dynatemp(logits):
    flat = logits * 0.4                              # several tokens above the thresholds
    params = [SamplingParams(xtc_probability=1.0, xtc_threshold=0.05),
              SamplingParams(xtc_probability=1.0, xtc_threshold=0.5),
              SamplingParams(skew=0.7), SamplingParams(skew=-0.5),
              SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5),
              SamplingParams(dynatemp_min=0.2, dynatemp_max=2.0, dynatemp_exponent=2.0,
                             temperature=0.0),  # dynatemp replaces T, so this is not greedy
              SamplingParams(xtc_probability=1.0, xtc_threshold=0.02),
              SamplingParams()]
    _, got = processed(flat, make_rows(params))
    assert_dist(got[0], ref_xtc(flat[0], 0.05))
    assert torch.isinf(got[0]).sum() >= 1
    assert_dist(got[1], ref_xtc(flat[1], 0.5))
    for i, s in ((2, 0.7), (3, -0.5)):
        expected = ref_skew_logprobs(flat[i], s)
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=0)
    assert_dist(got[4], ref_dynatemp(flat[4], 0.5, 1.5, 1.0))
    assert_dist(got[5], ref_dynatemp(flat[5], 0.2, 2.0, 2.0))
    assert_dist(got[6], ref_xtc(flat[6], 0.02))
    assert_dist(got[7], flat[7])


def test_frequency_presence_over_output_only(logits):
    histories = [([4, 4, 4], [1, 2, 2, 3, 3, 3]), ([5], [5, 5, 6]), ([1, 2], []), ([9], [9, 8])]
    settings = [(0.5, 0.0), (0.0, 1.2), (1.0, 1.0), (-0.7, -1.5)]
    rows = make_rows([SamplingParams(frequency_penalty=f, presence_penalty=p)
                      for f, p in settings], histories)
    _, got = processed(logits[:4], rows)
    for i, (f, p) in enumerate(settings):
        assert_dist(got[i], ref_freq_presence(logits[i], histories[i][1], f, p))


def test_dry_matches_reference(logits):
    breakers = [60, 61]
    histories = [
        ([1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1, 2]),           # repeat "1 2 3 4 9" -> penalise 3
        ([5, 6, 7, 60, 5, 6, 7, 8], [60, 5, 6]),             # breaker 60 follows 7: never penalised
        ([1, 2, 1, 2, 1, 2], [1, 2, 1]),                     # overlapping repeats
        (list(range(10, 30)) * 2, list(range(10, 25))),      # long repeat: penalty saturates
        ([1, 2, 3, 61], [1, 2, 3]),                          # last token after a breaker
        ([7, 8, 9, 7, 8], [9, 7, 8, 61]),                    # last token is a breaker: no-op
        ([3, 4, 5, 3, 4, 5, 3, 4], [5, 3, 4]),
        ([1, 2, 3, 1, 2, 3, 1, 2], [3, 1, 2]),
    ]
    settings = [dict(dry_multiplier=0.8), dict(dry_multiplier=1.0, dry_allowed_length=1),
                dict(dry_multiplier=0.5, dry_base=2.0), dict(dry_multiplier=0.8),
                dict(dry_multiplier=0.8, dry_allowed_length=0), dict(dry_multiplier=2.0),
                dict(dry_multiplier=0.8, dry_range=5), dict(dry_multiplier=1.0, dry_base=1.0)]
    rows = make_rows([SamplingParams(dry_sequence_breaker_ids=breakers, **s) for s in settings],
                     histories)
    _, got = processed(logits, rows)
    for i, s in enumerate(settings):
        prompt, output = histories[i]
        expected = ref_dry(logits[i], prompt + output, s["dry_multiplier"],
                           s.get("dry_base", 1.75), s.get("dry_allowed_length", 2), breakers,
                           s.get("dry_range", 0))
        assert_dist(got[i], expected)
    assert not torch.allclose(got[0], torch.log_softmax(logits[0].double(), -1))


def test_mirostat_v2_over_steps():
    gen = torch.Generator().manual_seed(11)
    tau, eta = 3.0, 0.2
    row = SamplingRow(SamplingParams(mirostat_mode=2, mirostat_tau=tau, mirostat_eta=eta,
                                     seed=5), [1, 2], [], {})
    sampler = Sampler(seed=0)
    mu = 2 * tau
    for _ in range(6):
        step_logits = torch.randn(1, V, generator=gen) * 3
        tokens, got = processed(step_logits, [row], sampler)
        surprise = -torch.log_softmax(step_logits[0].double(), -1) / math.log(2)
        expected = step_logits[0].masked_fill(surprise > mu, NEG)
        expected[step_logits[0].argmax()] = step_logits[0].max()
        assert_dist(got[0], expected)
        renormalised = torch.log_softmax(expected.double(), -1)
        mu -= eta * (-renormalised[tokens[0]].item() / math.log(2) - tau)
        assert row.state["mirostat_mu"] == pytest.approx(mu, abs=1e-5)
        row.output_token_ids.append(tokens[0])


# ---- order, greedy rule, constraints, logprobs ------------------------------------------------

ALL_ON = dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2,
              dry_multiplier=0.8, dry_sequence_breaker_ids=[60], no_repeat_ngram_size=3,
              temperature=0.9, nsigma=2.5, top_k=40, top_p=0.97, top_a=0.02, min_p=0.01,
              tfs=0.99, eta_cutoff=1.0, epsilon_cutoff=1.0, typical_p=0.99,
              smoothing_factor=0.1, xtc_probability=1.0, xtc_threshold=0.08)


def reference_pipeline(x, history, output, order):
    """The stage references composed in ``order`` (SamplerStage names)."""
    x = x.to(torch.float64)
    p = SamplingParams(**ALL_ON)
    steps = {
        "dry": lambda x: ref_dry(x, history, 0.8, 1.75, 2, [60]),
        "penalties": lambda x: ref_freq_presence(
            hf(RepetitionPenaltyLogitsProcessor(1.2), x, history), output, 0.3, 0.2),
        "no_repeat_ngram": lambda x: hf(NoRepeatNGramLogitsProcessor(3), x, history),
        "temperature": lambda x: x / p.temperature,
        "top_nsigma": lambda x: ref_nsigma(x, p.nsigma),
        "top_p_top_k": lambda x: hf(TopPLogitsWarper(p.top_p), hf(TopKLogitsWarper(p.top_k), x)),
        "top_a": lambda x: ref_top_a(x, p.top_a),
        "min_p": lambda x: hf(MinPLogitsWarper(p.min_p), x),
        "tfs": lambda x: ref_tfs(x, p.tfs),
        "eta_cutoff": lambda x: hf(EtaLogitsWarper(p.eta_cutoff * 1e-4), x),
        "epsilon_cutoff": lambda x: hf(EpsilonLogitsWarper(p.epsilon_cutoff * 1e-4), x),
        "typical_p": lambda x: hf(TypicalLogitsWarper(p.typical_p), x),
        "quadratic": lambda x: ref_smoothing(x, p.smoothing_factor, 1.0),
        "xtc": lambda x: ref_xtc(x, p.xtc_threshold),
    }
    for name in order:
        x = steps[name](x)
    return x


DEFAULT_NAMES = ["dry", "penalties", "no_repeat_ngram", "temperature", "top_nsigma",
                 "top_p_top_k", "top_a", "min_p", "tfs", "eta_cutoff", "epsilon_cutoff",
                 "typical_p", "quadratic", "xtc"]


def test_default_order_temperature_last_and_custom_priority():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5)) * 1.5
    prompt, output = [1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1, 2, 3, 5, 5]
    custom = list(reversed(DEFAULT_NAMES))
    temp_last = [n for n in DEFAULT_NAMES if n != "temperature"] + ["temperature"]
    params = [SamplingParams(**ALL_ON), SamplingParams(temperature_last=True, **ALL_ON),
              SamplingParams(sampler_priority=custom, **ALL_ON)]
    rows = make_rows(params, [(prompt, output)] * 3)
    _, got = processed(logits, rows)
    for i, order in enumerate([DEFAULT_NAMES, temp_last, custom]):
        assert_dist(got[i], reference_pipeline(logits[i], prompt + output, output, order))


def test_greedy_rows_skip_filters_but_keep_penalties(logits):
    histories = [([1, 2, 3], [int(logits[0].argmax())] * 3)] + [([1], [2])] * 3
    rows = make_rows([SamplingParams(temperature=0, frequency_penalty=2.0, top_k=1, min_p=0.5,
                                     xtc_probability=1.0, xtc_threshold=0.01),
                      SamplingParams(temperature=0, top_p=0.1, skew=2.0, mirostat_mode=2),
                      SamplingParams(temperature=1e-6, typical_p=0.1),
                      SamplingParams(temperature=0, logit_bias={5: 100})], histories)
    tokens, got = processed(logits[:4], rows)
    penalised = ref_freq_presence(logits[0], histories[0][1], 2.0, 0.0)
    assert_dist(got[0], penalised)
    assert tokens[0] == int(penalised.argmax())
    for i in (1, 2):
        assert_dist(got[i], logits[i])
        assert tokens[i] == int(logits[i].argmax())
    assert tokens[3] == 5


def test_min_tokens_bans_eos_and_stop_ids_until_reached(logits):
    eos = [int(logits[0].argmax())]
    stop_id = int(logits[1].argmax())
    rows = make_rows([SamplingParams(temperature=0, min_tokens=3),
                      SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id]),
                      SamplingParams(temperature=0, min_tokens=2)],
                     [([1], [2]), ([1], [2]), ([1], [2, 3])])
    tokens, got = processed(logits[:3], rows, eos=eos)
    assert tokens[0] != eos[0] and torch.isinf(got[0, eos[0]])
    assert torch.isinf(got[1, stop_id]) and torch.isinf(got[1, eos[0]])
    assert torch.isfinite(got[2, eos[0]])               # two tokens out: the ban is over


def test_allowed_tokens_and_no_token_left_fallback(logits):
    rows = make_rows([SamplingParams(allowed_token_ids=[3, 7, 9]),
                      SamplingParams(allowed_token_ids=[3], banned_token_ids=[3]),
                      SamplingParams(banned_token_ids=list(range(V)))])
    _, got = processed(logits[:3], rows)
    expected = torch.full((V,), NEG)
    expected[[3, 7, 9]] = logits[0, [3, 7, 9]]
    assert_dist(got[0], expected)
    # Constraints that would leave nothing are dropped for that row, not turned into NaNs.
    expected = torch.full((V,), NEG)
    expected[3] = 0.0
    assert_dist(got[1], expected)
    assert_dist(got[2], logits[2])


def test_raw_and_processed_logprobs(logits):
    rows = make_rows([SamplingParams(top_k=3, logprobs=5), SamplingParams(top_k=3, logprobs=0),
                      SamplingParams(top_k=3, logprobs=4, logprobs_mode="processed"),
                      SamplingParams(temperature=0, logprobs=2), SamplingParams(top_k=3)])
    out = Sampler(seed=1)(logits[:5].clone(), rows)
    raw = torch.log_softmax(logits[:5].double(), -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0]
    assert lp.logprob == pytest.approx(raw[0, lp.token_id].item(), abs=1e-5)
    assert lp.rank == 1 + int((raw[0] > raw[0, lp.token_id]).sum())
    assert lp.top_token_ids == raw[0].topk(5).indices.tolist()
    assert lp.top_logprobs == pytest.approx(raw[0].topk(5).values.tolist(), abs=1e-5)
    assert out.logprobs[1].top_token_ids == [] and out.logprobs[1].top_logprobs == []
    masked = hf(TopKLogitsWarper(3), logits[2])
    assert out.logprobs[2].top_token_ids[:3] == masked.topk(3).indices.tolist()
    assert out.logprobs[2].top_logprobs[3] == -9999.0     # beyond top-k: -inf, floored
    assert out.logprobs[3].rank == 1 and out.logprobs[3].token_id == int(logits[3].argmax())
    assert out.logprobs[4] is None
    assert set(out.logprobs[0].to_dict()) == {"token_id", "logprob", "rank", "top_token_ids",
                                              "top_logprobs"}


def test_half_precision_logits_and_history_cache():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    row = SamplingRow(SamplingParams(repetition_penalty=1.5, seed=3), [1, 2], [3], {})
    sampler = Sampler()
    for step in range(4):                         # the cached history follows the output
        tokens = sampler(logits.clone(), [row, SamplingRow(SamplingParams(), [1], [], {})])
        row.output_token_ids.append(tokens.token_ids[0])
    _, got = processed(logits[:1].float(), [row])
    expected = hf(RepetitionPenaltyLogitsProcessor(1.5), logits[0].float(),
                  row.prompt_token_ids + row.output_token_ids)
    assert_dist(got[0], expected)


# ---- compaction (rows continue on their surviving tokens after a filter) -----------------------

def test_compaction_changes_nothing(monkeypatch):
    import aphrodite.executor.sampling.compact as compact
    vocab = 512
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(8)) * 2
    settings = [dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2, skew=0.5),
                dict(top_k=30, tfs=0.9, typical_p=0.9), dict(top_k=8, mirostat_mode=2),
                dict(min_p=0.1, xtc_probability=1.0, xtc_threshold=0.05),
                dict(top_k=20, temperature_last=True, temperature=2.0),
                dict(top_k=10, dynatemp_min=0.5, dynatemp_max=2.0),
                dict(top_k=4, sampler_priority=list(reversed(range(14))),
                     repetition_penalty=1.5, no_repeat_ngram_size=2, dry_multiplier=1.0),
                dict(), dict(temperature=0), dict(eta_cutoff=50.0, epsilon_cutoff=20.0)]
    history = ([1, 2, 3, 4, 1, 2, 3], [4, 1, 2])

    def run():
        rows = make_rows([SamplingParams(seed=100 + i, **s) for i, s in enumerate(settings)],
                         [history] * len(settings))
        return processed(logits, rows)

    tokens, compacted = run()
    monkeypatch.setattr(compact, "COMPACT_FRACTION", 10 ** 9)     # never compact
    full_tokens, full = run()
    assert tokens == full_tokens
    assert torch.equal(torch.isinf(compacted), torch.isinf(full))
    torch.testing.assert_close(compacted, full, atol=1e-5, rtol=0)
    assert torch.isinf(compacted[0]).sum() == vocab - 5


def test_token_stages_after_a_filter_see_the_full_vocabulary():
    # Custom order: top-k first (the row is compacted), then the penalties, DRY and
    # no-repeat-ngram, which look tokens up by id.
    vocab = 256
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(9)) * 2
    top = logits[0].topk(6).indices.tolist()
    prompt, output = [top[0], top[1], top[2], 7, top[0], top[1]], [top[2], 7, top[0], top[1]]
    order = ["top_p_top_k", "penalties", "dry", "no_repeat_ngram"] + [
        n for n in DEFAULT_NAMES if n not in ("top_p_top_k", "penalties", "dry",
                                              "no_repeat_ngram")]
    params = SamplingParams(top_k=6, repetition_penalty=1.4, frequency_penalty=0.3,
                            dry_multiplier=0.5, no_repeat_ngram_size=3, sampler_priority=order)
    _, got = processed(logits, make_rows([params], [(prompt, output)]))
    history = prompt + output
    x = hf(TopKLogitsWarper(6), logits[0])
    x = ref_freq_presence(hf(RepetitionPenaltyLogitsProcessor(1.4), x, history), output,
                          0.3, 0.0)
    x = ref_dry(x, history, 0.5, 1.75, 2, [])
    x = hf(NoRepeatNGramLogitsProcessor(3), x.float(), history)
    assert_dist(got[0], x)
    assert torch.isfinite(got[0]).sum() < 6          # the ngram ban removed a top-6 token


def test_cutoffs_above_every_probability_keep_the_top_token():
    flat = torch.randn(2, V, generator=torch.Generator().manual_seed(4)) * 0.1   # p_max ~ 0.02
    rows = make_rows([SamplingParams(epsilon_cutoff=1000.0),
                      SamplingParams(epsilon_cutoff=1000.0, temperature=0.5)])
    _, got = processed(flat, rows)
    assert_dist(got[0], hf(EpsilonLogitsWarper(0.1), flat[0]))
    assert torch.isfinite(got[1]).sum() == 1 and int(got[1].argmax()) == int(flat[1].argmax())
