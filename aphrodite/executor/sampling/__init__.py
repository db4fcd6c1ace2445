"""Stages of the batched sampler (aphrodite/executor/sampler.py drives them).

One step, for a batch of rows (one row = one sequence):
  1. constraints.py  logit_bias, allowed_token_ids, banned tokens and bad words, the
                     min_tokens EOS ban                                   (every row)
  2. the reorderable stages, in each row's order (stages.py lists them):
       dry.py, penalties.py (repetition/frequency/presence, no-repeat-ngram)  (greedy too)
       temperature.py, filters.py (top-n-sigma, top-p/top-k, top-a, min-p, TFS, eta,
       epsilon, typical), shaping.py (quadratic smoothing, XTC)             (random rows)
     after a filter, rows left with few tokens continue on just those (compact.py);
  3. mirostat.py (truncate), softmax, skew (shaping.py), draw.py (one uniform per row), then
     the mirostat update; logprobs.py reports logprobs.
Every stage works on the sub-batch of rows that use it and costs nothing when none does.
history.py caches each row's token history (numpy) for the stages that read it.
"""
