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
Probability thresholds are compared in logit space (p < t <=> logit < log t + logsumexp).
"""

from __future__ import annotations

import numpy as np
import torch

from aphrodite.executor.sampling.context import column, count_true, put_rows, take_rows
from aphrodite.sampling_params import CUTOFF_UNIT

NEG_INF = float("-inf")
MASS_CANDIDATES = (64, 1024)     # candidate counts tried in turn before ranking every token


def descending_order(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, largest first."""
    if k < key.shape[1] or key.device.type != "cpu":
        return key.topk(k, dim=-1).indices
    # A full ordering on CPU: numpy's argsort is several times faster than torch's sort.
    return torch.from_numpy(np.argsort(-key.numpy(), axis=-1))


def sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values sorted largest first (values only: numpy's SIMD sort on CPU)."""
    if x.device.type != "cpu":
        return x.sort(-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))


def mass_cutoff(key: torch.Tensor, mass: torch.Tensor, probs_at) -> torch.Tensor:
    """Walking tokens by descending ``key``, a token is kept while the probability mass
    before it is < ``mass`` [R, 1]; returns the key of the last kept token [R, 1] (keep
    key >= it: the first token always stays, and so do ties with the last kept one).
    ``probs_at(rows, idx)`` gives the probabilities of tokens ``idx`` [r, k] of the rows
    ``rows`` (None: all rows)."""
    num_rows, vocab = key.shape
    cutoff = torch.empty(num_rows, 1, dtype=key.dtype, device=key.device)
    pending = None                                   # rows still to settle (None: all)
    for k in MASS_CANDIDATES + (vocab,):
        k = min(k, vocab)
        sub_key = key if pending is None else key[pending]
        idx = descending_order(sub_key, k)
        top_key, top_probs = sub_key.gather(1, idx), probs_at(pending, idx)
        cumulative = top_probs.cumsum(-1)
        sub_mass = mass if pending is None else mass[pending]
        num_kept = ((cumulative - top_probs) < sub_mass).sum(-1, keepdim=True).clamp_min_(1)
        sub_cutoff = top_key.gather(1, num_kept - 1)
        # Rows whose candidates reached the mass are settled; the others look further.
        settled = (cumulative[:, -1:] >= sub_mass).squeeze(1) | (k == vocab)
        rows = torch.arange(num_rows, device=key.device) if pending is None else pending
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
    return logits.masked_fill_(logits < torch.minimum(threshold, top), NEG_INF)


def _logsumexp(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return top + (logits - top).exp_().sum(-1, keepdim=True).log_()


def apply_top_nsigma(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    nsigma = column(rows, "nsigma", logits)
    top = logits.amax(-1, keepdim=True)
    if bool((logits.amin(-1) > NEG_INF).all()):      # every logit finite (the usual case)
        count = torch.full_like(top, logits.shape[1])
        centred = logits - logits.mean(-1, keepdim=True)
    else:                               # statistics over the tokens still in play
        finite = logits > NEG_INF
        count = count_true(finite).to(logits.dtype)
        mean = torch.where(finite, logits, 0).sum(-1, keepdim=True) / count
        centred = torch.where(finite, logits - mean, 0)
    std = (centred.square_().sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt_()
    return logits.masked_fill_(logits < top - nsigma * std, NEG_INF)


def uses_top_p_top_k(p) -> bool:
    return p.top_p < 1 or p.top_k > 0


def apply_top_p_top_k(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
    limited = [k for k in ks if k < vocab]
    if limited:
        k_max = max(limited)
        top_values = logits.topk(k_max, dim=-1).values
        kth = top_values.gather(1, torch.tensor(ks, device=logits.device).clamp_max(k_max)
                                .sub_(1).unsqueeze(1))
        if len(limited) < len(ks):      # rows without a limit: a threshold that keeps all
            no_limit = torch.tensor([k == vocab for k in ks], device=logits.device)
            kth.masked_fill_(no_limit.unsqueeze(1), NEG_INF)
        logits.masked_fill_(logits < kth, NEG_INF)
    p_rows = [j for j, row in enumerate(rows) if row.params.top_p < 1]
    if p_rows:
        sub, index = take_rows(logits, p_rows)
        lse = _logsumexp(sub, sub.amax(-1, keepdim=True))

        def probs_at(pending, idx):     # only the candidates' probabilities are needed
            if pending is None:
                return (sub.gather(1, idx) - lse).exp_()
            return (sub[pending].gather(1, idx) - lse[pending]).exp_()

        cutoff = mass_cutoff(sub, column([rows[j] for j in p_rows], "top_p", sub), probs_at)
        put_rows(logits, index, sub.masked_fill_(sub < cutoff, NEG_INF))
    return logits


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
    q = probs.topk(k, dim=-1).values if k < logits.shape[1] else sorted_descending(probs)
    d2 = (q[:, :-2] - 2 * q[:, 1:-1] + q[:, 2:]).abs()
    cdf = (d2 / d2.sum(-1, keepdim=True).clamp_min(1e-30)).cumsum(-1)
    # cdf never decreases, so the kept tokens are a prefix of the sorted order: the first,
    # then one per cdf value <= tfs (at most V - 2, so the last token always goes).
    num_kept = 1 + (cdf <= column(rows, "tfs", logits)).sum(-1, keepdim=True)
    return logits.masked_fill_(probs < q.gather(1, num_kept - 1), NEG_INF)


def apply_eta_cutoff(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    eta = column(rows, "eta_cutoff", logits) * CUTOFF_UNIT
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp).nansum(-1, keepdim=True)
    cutoff = torch.minimum(eta, eta.sqrt() * torch.exp(-ent))
    keep_top = torch.minimum(cutoff.log(), logp.amax(-1, keepdim=True))
    return logits.masked_fill_(logp < keep_top, NEG_INF)


def apply_epsilon_cutoff(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    epsilon = column(rows, "epsilon_cutoff", logits) * CUTOFF_UNIT
    top = logits.amax(-1, keepdim=True)
    return _remove_below(logits, epsilon.log() + _logsumexp(logits, top), top)


def apply_typical(logits: torch.Tensor, rows, ctx) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    ent = -(probs * logp).nansum(-1, keepdim=True)
    deviation = (-logp - ent).abs()              # inf for -inf logits: ranked last
    key = deviation.neg_()
    cutoff = mass_cutoff(key, column(rows, "typical_p", logits),
                         lambda pending, idx: (probs if pending is None
                                               else probs[pending]).gather(1, idx))
    return logits.masked_fill_(key < cutoff, NEG_INF)
