"""`LLM.generate` and the server's /v1/completions give the same seeded samples.

Both hand the engine's outputs to the same OutputProcessor, so for the same prompts,
seeds and engine options they must agree on every choice's text, finish and stop reason,
tokens and logprobs, stop strings included. The stop string " a" ends most samples, often
inside a token (" around", " ancient"), so the text cut and the token/logprob trimming are
both exercised. The offline engine runs first and is shut down before the server is
queried: both use the same 2 cores, each with the default thread count (cores / workers).
"""

from __future__ import annotations

import pytest
import requests

from aphrodite import LLM, SamplingParams
from server_utils import E2E_MAX_MODEL_LEN, shared_server

pytestmark = pytest.mark.slow   # loads the real default model, offline and in the server

PROMPTS = ["The capital of France is", "Once upon a time, a dragon", "Water boils at",
           "My favourite fruit is"]
N, SEED, TEMPERATURE, MAX_TOKENS, LOGPROBS, STOP = 2, 1234, 0.8, 24, 2, " a"
# The engine may batch the prompts' prefills differently in the two runs; float32 logits
# summed in another order differ by a few units in the last place: 1e-5 on a logprob of -2.7.
TOL = 1e-4


@pytest.fixture(scope="module")
def offline():
    """The offline results; the LLM is shut down before the server fixture runs."""
    params = SamplingParams(n=N, seed=SEED, temperature=TEMPERATURE, max_tokens=MAX_TOKENS,
                            logprobs=LOGPROBS, stop=[STOP])
    # The shared server's engine options (tests/server_utils.py: E2E_SERVER_ARGS).
    with LLM(max_model_len=E2E_MAX_MODEL_LEN, kv_cache_memory=256 << 20,
             max_num_seqs=64) as llm:
        return llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.fixture(scope="module")
def served(offline):
    server = shared_server()
    r = requests.post(server.url_for("v1", "completions"), timeout=600, json={
        "model": "smollm2", "prompt": PROMPTS, "n": N, "seed": SEED,
        "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "logprobs": LOGPROBS,
        "stop": [STOP]})
    assert r.status_code == 200, r.text
    return r.json()


def test_offline_and_server_agree(offline, served, tokenizer):
    choices = served["choices"]
    assert len(choices) == len(PROMPTS) * N
    completions = [c for request in offline for c in request.outputs]
    assert [c.index for c in completions] == [i % N for i in range(len(choices))]
    for completion, choice in zip(completions, choices):
        assert choice["text"] == completion.text
        assert choice["finish_reason"] == completion.finish_reason
        assert choice["stop_reason"] == completion.stop_reason
        logprobs = choice["logprobs"]
        # One logprob entry per kept token, in both APIs.
        assert len(completion.logprobs) == len(completion.token_ids)
        assert logprobs["tokens"] == [tokenizer.decode([t]) for t in completion.token_ids]
        assert [e["token_id"] for e in completion.logprobs] == completion.token_ids
        assert logprobs["token_logprobs"] == pytest.approx(
            [e["logprob"] for e in completion.logprobs], abs=TOL)
        for top, entry in zip(logprobs["top_logprobs"], completion.logprobs):
            expected = {tokenizer.decode([entry["token_id"]]): entry["logprob"]}
            expected.update({tokenizer.decode([t]): lp for t, lp in
                             zip(entry["top_token_ids"][:LOGPROBS], entry["top_logprobs"])})
            assert top == pytest.approx(expected, abs=TOL)
    usage = served["usage"]
    assert usage["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in offline)
    assert usage["completion_tokens"] == sum(len(c.token_ids) for c in completions)
    # The stop string fired, once inside a token at least; the samples are distinct.
    stopped = [c for c in completions if c.stop_reason == STOP]
    assert stopped and all(c.finish_reason == "stop" for c in stopped)
    assert any(not tokenizer.decode(c.token_ids).endswith(STOP) for c in stopped)
    assert any(c.finish_reason == "length" for c in completions)
    assert len({tuple(c.token_ids) for c in completions}) == len(completions)
