"""The grammar mask in the sampler: the bit layout against a per-token Python reference, and
its place before every other constraint and stage (checked on the processed distribution
against float64 references from transformers' processors)."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper)

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.executor.sampling.grammar_mask import (allowed_tokens, allowed_tokens_on_device,
                                                      apply_grammar_mask)
from aphrodite.sampling_params import SamplingParams

torch.set_num_threads(1)
V = 80                # not a multiple of 32: the last word is partly padding
WORDS = (V + 31) // 32
NEG = float("-inf")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_bitmask(rows, words=WORDS, seed=0, density=0.3):
    rng = np.random.default_rng(seed)
    bits = rng.random((rows, words * 32)) < density
    bits[:, 0] = True                         # never an empty row
    words_u = np.packbits(bits, axis=1, bitorder="little").view("<u4")
    return words_u.view(np.int32).copy()


def reference_allowed(bitmask, vocab):
    """Token t is allowed iff bit t % 32 of word t // 32 is set (words as unsigned 32-bit)."""
    out = np.zeros((bitmask.shape[0], vocab), dtype=bool)
    for j, row in enumerate(bitmask):
        for t in range(vocab):
            w = t // 32
            out[j, t] = w < len(row) and (int(row[w]) & 0xFFFFFFFF) >> (t % 32) & 1 == 1
    return out


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=torch.Generator().manual_seed(7)) * 2.0


@pytest.mark.parametrize("vocab,words", [(V, WORDS), (64, 2), (100, 3), (96, 2)])
def test_bit_layout_matches_the_reference(vocab, words):
    bitmask = random_bitmask(4, words, seed=vocab)
    bitmask[1, 0] = -1                         # the sign bit is token 31
    expected = reference_allowed(bitmask, vocab)
    assert np.array_equal(allowed_tokens(bitmask, vocab), expected)
    # The unpacking GPUs use, run here on the CPU (and on CUDA where there is one).
    for device in DEVICES:
        on_device = allowed_tokens_on_device(bitmask, vocab, torch.device(device))
        assert np.array_equal(on_device.cpu().numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_only_the_constrained_rows_change(logits, device):
    bitmask = random_bitmask(2)
    rows = [4, 1]                              # not in batch order
    out = logits.to(device)
    apply_grammar_mask(out, rows, bitmask)
    out = out.cpu()
    allowed = reference_allowed(bitmask, V)
    for j, i in enumerate(rows):
        expected = torch.where(torch.from_numpy(allowed[j]), logits[i], torch.tensor(NEG))
        assert torch.equal(out[i], expected)
    for i in (0, 2, 3, 5):
        assert torch.equal(out[i], logits[i])


def test_vocab_padding_beyond_the_bitmask_is_forbidden(logits):
    bitmask = np.full((1, 2), -1, dtype=np.int32)      # allows tokens 0..63 only
    out = logits.clone()
    out[0, 70] = 1e4
    apply_grammar_mask(out, [0], bitmask)
    assert torch.isneginf(out[0, 64:]).all() and torch.equal(out[0, :64], logits[0, :64])
    token = Sampler(seed=0)(logits.clone()[:1].index_put_((torch.tensor([0]),
                                                           torch.tensor([70])),
                                                          torch.tensor(1e4)),
                            [row(SamplingParams(temperature=0))], ([0], bitmask)).token_ids
    assert token[0] < 64


def row(params, prompt=(1, 2, 3), output=(4, 5)):
    return SamplingRow(params, list(prompt), list(output), {})


def processed(logits, rows, masks, eos=()):
    for r in rows:
        r.params.logprobs, r.params.logprobs_mode = V, "processed"
    out = Sampler(eos_token_ids=eos, seed=0)(logits.clone(), rows, masks)
    table = torch.full((len(rows), V), NEG, dtype=torch.float64)
    for i, lp in enumerate(out.logprobs):
        values = torch.tensor(lp.top_logprobs, dtype=torch.float64)
        values[values <= -9999.0] = NEG
        table[i, torch.tensor(lp.top_token_ids)] = values
    return out.token_ids, table


def assert_dist(actual, expected_logits, atol=1e-4):
    expected = torch.log_softmax(expected_logits.to(torch.float64), -1)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    assert torch.allclose(actual[finite], expected[finite], atol=atol)


def masked(x, allowed_row):
    return torch.where(torch.from_numpy(allowed_row), x.double(), torch.tensor(NEG,
                                                                           dtype=torch.float64))


def test_bias_penalties_and_samplers_compose_after_the_mask(logits):
    bitmask = random_bitmask(3, seed=3, density=0.4)
    allowed = reference_allowed(bitmask, V)
    forbidden = int(np.flatnonzero(~allowed[0])[0])
    history = ([1, 2, 3], [4, 5])
    rows = [row(SamplingParams(logit_bias={forbidden: 100.0, 0: 3.0})),
            row(SamplingParams(repetition_penalty=1.4, temperature=0.7)),
            row(SamplingParams(top_k=3)),
            row(SamplingParams())]                      # no grammar: untouched
    tokens, got = processed(logits[:4], rows, ([0, 1, 2], bitmask))
    bias = torch.zeros(V, dtype=torch.float64)
    bias[forbidden], bias[0] = 100.0, 3.0
    assert_dist(got[0], masked(logits[0], allowed[0]) + bias)
    penalised = RepetitionPenaltyLogitsProcessor(1.4)(
        torch.tensor([history[0] + history[1]]), masked(logits[1], allowed[1])[None])[0]
    assert_dist(got[1], penalised / 0.7)
    # top-k counts only the grammar's tokens (a mask after it could leave none).
    assert_dist(got[2], TopKLogitsWarper(3)(None, masked(logits[2], allowed[2])[None])[0])
    assert_dist(got[3], logits[3])
    for j in range(3):
        assert allowed[j, tokens[j]]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, allowed_token_ids=[1, 2, 3]),
    SamplingParams(temperature=0, banned_token_ids=[0, 33, 66]),
    SamplingParams(temperature=0, min_tokens=5),
])
def test_constraints_that_leave_nothing_give_way_to_the_grammar(logits, params):
    bitmask = np.zeros((1, WORDS), dtype=np.int32)
    bitmask[0, 0] = 1                      # token 0
    bitmask[0, 1] = 2                      # token 33
    bitmask[0, 2] = 4                      # token 66
    if params.min_tokens:                  # the grammar allows only EOS (token 66) now
        bitmask[0, :2] = 0
    tokens, got = processed(logits[:1], [row(params)], ([0], bitmask), eos=[66])
    allowed = reference_allowed(bitmask, V)[0]
    assert not torch.isnan(got).any()
    assert allowed[tokens[0]]
    assert tokens[0] == int(masked(logits[0], allowed).argmax())


def test_seeded_rows_give_the_same_tokens_alone_and_in_any_batch(logits):
    bitmask = random_bitmask(2, seed=11, density=0.5)
    for seed in range(5):
        def seeded():
            return row(SamplingParams(seed=seed, temperature=1.2, top_p=0.95))
        alone = Sampler()(logits[:1].clone(), [seeded()], ([0], bitmask[:1])).token_ids[0]
        mixed_rows = [row(SamplingParams(temperature=0.8)), row(SamplingParams(seed=99)),
                      seeded(), row(SamplingParams(temperature=0))]
        batch = logits[[3, 4, 0, 5]].clone()
        mixed = Sampler()(batch, mixed_rows, ([2, 1], bitmask)).token_ids
        assert mixed[2] == alone
        assert reference_allowed(bitmask, V)[0, alone]
