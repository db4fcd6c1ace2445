"""Truncation filters: each sets some logits to -inf and always keeps the most likely token.

  top-n-sigma  remove logit < max - nsigma * std (std over the finite logits)
  top-k        keep the k largest logits (ties with the k-th are kept)
  top-p        walking tokens from most to least likely, keep a token while the mass before
               it is < top_p (applied after top-k, on the renormalised distribution)
  top-a        remove p < top_a * p_max^2
  min-p        remove p < min_p * p_max
  TFS          sort descending, |second difference| of the probabilities, normalised and
               cumulated; remove where that exceeds tfs; the first token stays, the last goes
               (tokens tied with the last kept one stay too)
  eta          eta = eta_cutoff * 1e-4; remove p < min(eta, sqrt(eta) * exp(-H))
  epsilon      remove p < epsilon_cutoff * 1e-4
  typical      order tokens by |-log p - H| ascending; keep while the mass before is
               < typical_p (the token that crosses the mass stays, as in the paper and in
               transformers; Aphrodite 0.6 dropped it)

Top-p and typical need tokens in order, but a full sort of a 50k vocabulary is slow on CPUs:
they rank only the best 64 candidates, then 1024, then all tokens, each time only for the rows
whose candidates held less than the requested mass; the result is the same either way.
Top-p ranks probabilities (values only: tied tokens have equal probabilities); when its rows
were just cut by top-k (and have no ties past the k-th), it ranks just those k values.
Other probability thresholds are compared in logit space (p < t <=> logit < log t + lse).
"""

from __future__ import annotations

import numpy as np
import torch

from aphrodite.executor.sampling.context import (column, count_true, in_play, put_rows,
                                                remove_below, take_rows)
from aphrodite.sampling_params import CUTOFF_UNIT

NEG_INF = float("-inf")
MASS_CANDIDATES = (64, 1024)     # candidate counts tried in turn before ranking every token


# Up to this many, torch's topk selects fastest on CPUs; beyond, numpy's partition does.
# (numpy partitions the negated values: selecting the largest directly is very slow when a
# row holds many -inf.)
TOPK_LIMIT = 256


def descending_order(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, largest first (order among ties is
    unspecified)."""
    if k <= TOPK_LIMIT or key.device.type != "cpu":
        return key.topk(k, dim=-1).indices
    neg = -key.numpy()
    if k >= key.shape[1]:
        return torch.from_numpy(np.argsort(neg, axis=-1))
    idx = np.argpartition(neg, k - 1, axis=-1)[:, :k]
    order = np.argsort(np.take_along_axis(neg, idx, axis=-1), axis=-1)
    return torch.from_numpy(np.take_along_axis(idx, order, axis=-1))


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each row, largest first [R, k]."""
    vocab = x.shape[1]
    if x.device.type != "cpu":
        return x.topk(k, dim=-1).values if k < vocab else x.sort(-1, descending=True).values
    if k <= TOPK_LIMIT:
        return x.topk(k, dim=-1).values
    neg = -x.numpy()
    if k < vocab:           # select first (linear time), then sort only the k selected
        neg = np.partition(neg, k - 1, axis=-1)[:, :k]
    return torch.from_numpy(np.sort(neg, axis=-1)).neg_()


def mass_cutoff(num_rows: int, vocab: int, mass: torch.Tensor, candidates) -> torch.Tensor:
    """Walking tokens by descending key, a token is kept while the probability mass before
    it is < ``mass`` [R, 1]; returns the key of the last kept token [R, 1] (keep
    key >= it: the first token always stays, and so do ties with the last kept one).
    ``candidates(rows, k)`` gives the ``k`` largest keys of the rows ``rows`` (None: all
    rows), largest first, and their tokens' probabilities, both [r, k]."""
    cutoff = torch.empty(num_rows, 1, dtype=mass.dtype, device=mass.device)
    pending = None                                   # rows still to settle (None: all)
    for k in MASS_CANDIDATES + (vocab,):
        k = min(k, vocab)
        top_key, top_probs = candidates(pending, k)
        cumulative = top_probs.cumsum(-1)
        sub_mass = mass if pending is None else mass[pending]
        num_kept = ((cumulative - top_probs) < sub_mass).sum(-1, keepdim=True).clamp_min_(1)
        sub_cutoff = top_key.gather(1, num_kept - 1)
        # Rows whose candidates reached the mass are settled; the others look further.
        settled = (cumulative[:, -1:] >= sub_mass).squeeze(1) | (k == vocab)
        rows = torch.arange(num_rows, device=mass.device) if pending is None else pending
        cutoff[rows[settled]] = sub_cutoff[settled]
        if bool(settled.all()):
            break
        pending = rows[~settled]
    return cutoff


def _remove_below(logits: torch.Tensor, threshold: torch.Tensor,
                  top: torch.Tensor | None = None) -> torch.Tensor:
    """Remove tokens whose logit is < ``threshold`` [R, 1], except the most likely one(s).
    (p < t is logit < log t + logsumexp, so no softmax is needed.)"""
    top = logits.amax(-1, keepdim=True) if top is None else top
    return remove_below(logits, logits, torch.minimum(threshold, top))


def _logsumexp(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    # exp is very slow on CPUs for inputs whose result underflows (-inf included); terms
    # below e^-80 cannot change a sum that holds e^0 = 1, so they are clamped first.
    return top + (logits - top).clamp_min_(-80.0).exp_().sum(-1, keepdim=True).log_()


def apply_top_nsigma(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    nsigma = column(rows, "nsigma", logits)
    top = logits.amax(-1, keepdim=True)
    if bool((logits.amin(-1) > NEG_INF).all()):      # every logit finite (the usual case)
        count = torch.full_like(top, logits.shape[1])
        centred = logits - logits.mean(-1, keepdim=True)
    else:                               # statistics over the tokens still in play
        finite = in_play(logits)
        count = count_true(finite).to(logits.dtype)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        mean = torch.where(finite, logits, zero).sum(-1, keepdim=True) / count
        centred = logits - mean
        torch.where(finite, centred, zero, out=centred)
    std = (centred.square_().sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt_()
    return remove_below(logits, logits, top - nsigma * std)


def uses_top_p_top_k(p) -> bool:
    return p.top_p < 1 or p.top_k > 0


def apply_top_p_top_k(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
    limited = [k for k in ks if k < vocab]
    best = None
    if limited:
        k_max = max(limited)
        # One value more than the largest k: it tells whether a row has ties past its k-th.
        best = top_values(logits, min(k_max + 1, vocab))
        kth = best.gather(1, torch.tensor(ks, device=logits.device).clamp_max(k_max)
                          .sub_(1).unsqueeze(1))
        if len(limited) < len(ks):      # rows without a limit: a threshold that keeps all
            no_limit = torch.tensor([k == vocab for k in ks], device=logits.device)
            kth.masked_fill_(no_limit.unsqueeze(1), NEG_INF)
        remove_below(logits, logits, kth)
    p_rows = [j for j, row in enumerate(rows) if row.params.top_p < 1]
    if not p_rows:
        return logits
    sub, index = take_rows(logits, p_rows)
    mass = column([rows[j] for j in p_rows], "top_p", sub)
    survivors = None if best is None else _top_k_survivors(take_rows(best, p_rows)[0],
                                                           [ks[j] for j in p_rows], vocab)
    if survivors is not None:
        # Every top-p row now holds just its k best tokens, already ranked: no full pass.
        probs = survivors.softmax(-1)

        def ranked(pending, k):
            if pending is None:
                return survivors[:, :k], probs[:, :k]
            return survivors[pending, :k], probs[pending, :k]

        cutoff = mass_cutoff(len(p_rows), survivors.shape[1], mass, ranked)
        put_rows(logits, index, remove_below(sub, sub, cutoff))
        return logits
    # Ranked by probability (the same order as by logit): one fused softmax is cheaper
    # than a logsumexp, and tied probabilities make values alone enough.
    probs = sub.softmax(-1)

    def candidates(pending, k):
        values = top_values(probs if pending is None else probs[pending], k)
        return values, values

    cutoff = mass_cutoff(len(p_rows), vocab, mass, candidates)
    put_rows(logits, index, remove_below(sub, probs, cutoff))
    return logits


def _top_k_survivors(best: torch.Tensor, ks: list[int], vocab: int) -> torch.Tensor | None:
    """The surviving values of rows cut to their ``ks`` best by top-k, largest first, -inf
    past each row's k; None unless every row has a k and no ties past its k-th value
    (``best``: each row's largest values, at least k + 1 of them)."""
    if any(k >= vocab for k in ks):
        return None
    k_index = torch.tensor(ks, device=best.device).unsqueeze(1)
    if bool((best.gather(1, k_index) == best.gather(1, k_index - 1)).any()):
        return None
    columns = torch.arange(best.shape[1], device=best.device)
    return best.masked_fill(columns >= k_index, NEG_INF)


def apply_top_a(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    # p < a * p_max^2  <=>  logit < log a + 2 * max - logsumexp
    top = logits.amax(-1, keepdim=True)
    threshold = column(rows, "top_a", logits).log() + 2 * top - _logsumexp(logits, top)
    return _remove_below(logits, threshold, top)


def apply_min_p(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    # p < min_p * p_max  <=>  logit < max + log min_p
    top = logits.amax(-1, keepdim=True)
    return _remove_below(logits, top + column(rows, "min_p", logits).log(), top)


def apply_tfs(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    if logits.shape[1] < 3:
        return logits
    probs = logits.softmax(-1)
    # Only the support and the first zeros matter: after earlier filters a top-k is enough.
    k = int(count_true(probs > 0).max()) + 2
    q = top_values(probs, min(k, logits.shape[1]))
    d2 = (q[:, :-2] - 2 * q[:, 1:-1] + q[:, 2:]).abs()
    cdf = (d2 / d2.sum(-1, keepdim=True).clamp_min(1e-30)).cumsum(-1)
    # cdf never decreases, so the kept tokens are a prefix of the sorted order: the first,
    # then one per cdf value <= tfs (at most V - 2, so the last token always goes).
    num_kept = 1 + (cdf <= column(rows, "tfs", logits)).sum(-1, keepdim=True)
    return remove_below(logits, probs, q.gather(1, num_kept - 1))


def apply_eta_cutoff(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    eta = column(rows, "eta_cutoff", logits) * CUTOFF_UNIT
    logp = logits.log_softmax(-1)
    ent = -(logits.softmax(-1) * logp).nansum(-1, keepdim=True)
    cutoff = torch.minimum(eta, eta.sqrt() * torch.exp(-ent))
    keep_top = torch.minimum(cutoff.log(), logp.amax(-1, keepdim=True))
    return remove_below(logits, logp, keep_top)


def apply_epsilon_cutoff(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    epsilon = column(rows, "epsilon_cutoff", logits) * CUTOFF_UNIT
    top = logits.amax(-1, keepdim=True)
    return _remove_below(logits, epsilon.log() + _logsumexp(logits, top), top)


def apply_typical(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    probs = logits.softmax(-1)       # (not logp.exp(): exp of -inf is slow on CPUs)
    ent = -(probs * logp).nansum(-1, keepdim=True)
    deviation = (-logp - ent).abs()              # inf for -inf logits: ranked last
    key = deviation.neg_()

    def candidates(pending, k):
        sub_key, sub_probs = (key, probs) if pending is None else (key[pending], probs[pending])
        idx = descending_order(sub_key, k)
        return sub_key.gather(1, idx), sub_probs.gather(1, idx)

    cutoff = mass_cutoff(logits.shape[0], logits.shape[1], column(rows, "typical_p", logits),
                         candidates)
    return remove_below(logits, key, cutoff)
