"""repetition_penalty_range (Kobold's rep_pen_range): only the last N tokens of prompt + output
count for the repetition, frequency and presence penalties, checked against a per-token
reference written from that rule (float64, one row at a time), in a mixed batch."""

import pytest
import torch

from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.sampling_params import SamplingParams

torch.set_num_threads(1)
V = 48
NEG = float("-inf")


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], rep: float,
              freq: float, pres: float, last_n: int) -> torch.Tensor:
    """The penalised logits: a token is seen if it is among the last ``last_n`` tokens of
    prompt + output (all of them when 0); frequency and presence count its occurrences among
    those that are output tokens."""
    history = prompt + output
    start = len(history) - last_n if 0 < last_n < len(history) else 0
    window = history[start:]
    output_in_window = history[max(start, len(prompt)):]
    out = logits.clone().to(torch.float64)
    for token in set(window):
        value = out[token]
        out[token] = value / rep if value > 0 else value * rep
        count = output_in_window.count(token)
        out[token] -= freq * count + pres * (count > 0)
    return out


def processed_logprobs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for row in rows:
        row.params.logprobs, row.params.logprobs_mode = V, "processed"
    out = Sampler(eos_token_ids=(), seed=0)(logits.clone(), rows)
    table = torch.full((len(rows), V), NEG, dtype=torch.float64)
    for i, lp in enumerate(out.logprobs):
        table[i, torch.tensor(lp.top_token_ids)] = torch.tensor(lp.top_logprobs,
                                                                dtype=torch.float64)
    return table


CASES = [  # (prompt, output, repetition_penalty, frequency, presence, range)
    ([1, 2, 3, 4, 5], [6, 7, 1], 1.5, 0.0, 0.0, 3),        # 1 counts again through the output
    ([1, 2, 3, 4, 5], [6, 7, 8], 1.5, 0.0, 0.0, 2),        # prompt tokens out of the window
    ([9, 9, 10, 11], [12, 9, 12, 12], 1.3, 0.4, 0.2, 4),   # counts only inside the window
    ([9, 9, 10, 11], [12, 9, 12, 12], 1.3, 0.4, 0.2, 0),   # 0: the whole context
    ([20, 21], [22, 23, 20], 0.8, 0.0, 0.5, 100),          # range beyond the history: all
    ([30, 31, 32], [33, 34, 35, 36], 2.0, 0.3, 0.0, 5),    # window starts in the prompt
    ([40] * 6, [41], 1.2, 0.0, 0.0, 1),                    # only the last token
    ([2, 3], [4], 1.0, 0.0, 0.0, 1),                       # no penalty at all: untouched
]


@pytest.mark.parametrize("greedy", [False, True])
def test_penalty_range_matches_reference_in_a_mixed_batch(greedy):
    logits = torch.randn(len(CASES), V, generator=torch.Generator().manual_seed(7)) * 2.5
    rows = [SamplingRow(SamplingParams(repetition_penalty=rep, frequency_penalty=freq,
                                       presence_penalty=pres, repetition_penalty_range=last_n,
                                       temperature=0.0 if greedy else 1.0),
                        list(prompt), list(output), {})
            for prompt, output, rep, freq, pres, last_n in CASES]
    got = processed_logprobs(logits, rows)
    for i, (prompt, output, rep, freq, pres, last_n) in enumerate(CASES):
        expected = torch.log_softmax(reference(logits[i], prompt, output, rep, freq, pres,
                                               last_n), -1)
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=0)


def test_window_moves_with_the_output_across_steps():
    """The cached history grows step by step; the window follows its end."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2.5
    row = SamplingRow(SamplingParams(repetition_penalty=1.8, repetition_penalty_range=2),
                      [5, 6, 7], [], {})
    for new_token in (8, 5, 9):
        got = processed_logprobs(logits, [row])
        expected = torch.log_softmax(reference(logits[0], row.prompt_token_ids,
                                               row.output_token_ids, 1.8, 0, 0, 2), -1)
        torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=0)
        row.output_token_ids.append(new_token)


def test_range_is_validated_and_accepted_under_kobold_name():
    from aphrodite.frontend.openai_protocol import CompletionRequest
    from aphrodite.sampler_specs import SamplingParamError

    with pytest.raises(SamplingParamError, match="repetition_penalty_range"):
        SamplingParams(repetition_penalty_range=-1)
    body = CompletionRequest.model_validate({"prompt": "x", "rep_pen_range": 64})
    assert body.sent_sampler_fields()["repetition_penalty_range"] == 64
