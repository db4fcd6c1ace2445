"""Logprobs of the sampled tokens: the token's own, its rank and the top-N alternatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aphrodite.executor.sampling.context import count_true

# -inf (a masked token) does not survive JSON; like the OpenAI servers, report it as -9999.
LOGPROB_FLOOR = -9999.0


@dataclass
class RowLogprobs:
    token_id: int
    logprob: float
    rank: int                   # 1 = the most likely token
    top_token_ids: list[int]    # params.logprobs alternatives, most likely first
    top_logprobs: list[float]

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob, "rank": self.rank,
                "top_token_ids": self.top_token_ids, "top_logprobs": self.top_logprobs}


def summarise(logprobs: torch.Tensor, tokens: torch.Tensor,
              top_n: list[int]) -> list[RowLogprobs]:
    """One RowLogprobs per row of ``logprobs`` [R, V] for the sampled ``tokens`` [R]."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = count_true(logprobs > chosen if logprobs.device.type != "cpu"
                       else torch.from_numpy(logprobs.numpy() > chosen.numpy())).add_(1)
    ranks = ranks.squeeze(1)
    n_max = min(max(top_n), logprobs.shape[1])
    if n_max:
        top_values, top_ids = logprobs.topk(n_max, dim=-1)
        top_values, top_ids = top_values.clamp_min(LOGPROB_FLOOR).tolist(), top_ids.tolist()
    chosen = chosen.squeeze(1).clamp_min(LOGPROB_FLOOR).tolist()
    out = []
    for j, (token, rank, n) in enumerate(zip(tokens.tolist(), ranks.tolist(), top_n)):
        ids = top_ids[j][:n] if n_max else []
        values = top_values[j][:n] if n_max else []
        out.append(RowLogprobs(token, chosen[j], rank, ids, values))
    return out
