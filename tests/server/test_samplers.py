"""The samplers of the user's guide (seed-usage.md) over HTTP: every value in its parameter
table and presets is accepted and does what the guide says.

References: the same request with the same seed and no sampler (a sampler that takes effect
changes the seeded output; one at its neutral value does not), greedy output (temperature 0),
the raw logprobs the server reports for the sampled tokens (which tokens a truncation
sampler may keep follows from them), and token counts of the output text. Requests run
concurrently: the engine batches them.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from aphrodite.model_files import load_tokenizer, resolve_model
from server_utils import GUIDE_PRESETS as PRESETS, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
SEEDS = (1, 2, 3)
MAX_TOKENS = 16

# The guide's table: each parameter at its "Use Case" values and the ends of its range.
TABLE_VALUES = {
    "temperature": [0.7, 0.9, 2.0],
    "top_p": [0.95],
    "top_k": [1, 40, 100],
    "repetition_penalty": [1.1, 1.2, 1.5],
    "frequency_penalty": [-2.0, 0.1, 1.0, 2.0],
    "presence_penalty": [-2.0, 0.1, 2.0],
    "min_p": [0.05],
    "typical_p": [0.95],
}
# Values in the table's ranges that switch the sampler off: the output must not change.
NEUTRAL_VALUES = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_p": 0.0,
                  "typical_p": 1.0}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url_for("v1", route), timeout=300,
                         json={"model": "smollm2", "max_tokens": MAX_TOKENS, **body})


def chat_many(server, bodies: list[dict]) -> list[dict]:
    """Chat completions for `bodies` (sent concurrently); each must succeed."""
    def one(body):
        r = post(server, "chat/completions", {"messages": MESSAGES, **body})
        assert r.status_code == 200, (body, r.text)
        return r.json()["choices"][0]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, bodies))


def text(choice: dict) -> str:
    return choice["message"]["content"]


def test_table_values_are_accepted_and_take_effect(server):
    jobs = [(None, None)] + [(n, v) for n, values in TABLE_VALUES.items() for v in values] \
        + list(NEUTRAL_VALUES.items())
    bodies = [{"seed": s, **({name: value} if name else {})} for name, value in jobs
              for s in SEEDS]
    outs = chat_many(server, bodies)
    results = {job: [text(c) for c in outs[i * len(SEEDS):(i + 1) * len(SEEDS)]]
               for i, job in enumerate(jobs)}
    baseline = results[(None, None)]
    assert all(baseline)
    for name, values in TABLE_VALUES.items():
        for value in values:
            assert results[(name, value)] != baseline, (name, value)
    for name, value in NEUTRAL_VALUES.items():
        assert results[(name, value)] == baseline, (name, value)


def test_presets_are_accepted_reproducible_and_take_effect(server):
    bodies = [{"seed": s, **preset} for preset in PRESETS.values() for s in SEEDS for _ in "ab"]
    bodies += [{"seed": s} for s in SEEDS]
    outs = [text(c) for c in chat_many(server, bodies)]
    baseline = outs[-len(SEEDS):]
    for i, name in enumerate(PRESETS):
        runs = outs[i * 2 * len(SEEDS):(i + 1) * 2 * len(SEEDS)]
        first, again = runs[0::2], runs[1::2]
        assert all(first) and first == again, name          # same seed, same text
        assert first != baseline, name


def test_temperature_zero_top_k_one_and_min_p_one_are_greedy(server):
    bodies = [{"temperature": 0}, {"temperature": 0}]
    bodies += [{"temperature": 1.5, "seed": s, "top_k": 1} for s in SEEDS]
    bodies += [{"temperature": 1.5, "seed": s, "min_p": 1.0} for s in SEEDS]
    bodies += [{"temperature": 1.5, "seed": s} for s in SEEDS]
    outs = [text(c) for c in chat_many(server, bodies)]
    greedy = outs[0]
    assert outs[1] == greedy                                # no seed needed
    assert outs[2:2 + 2 * len(SEEDS)] == [greedy] * 2 * len(SEEDS)
    assert greedy not in outs[2 + 2 * len(SEEDS):]          # without them it samples


def mean_sampled_logprob(choices: list[dict]) -> float:
    values = [e["logprob"] for c in choices for e in c["logprobs"]["content"]]
    return sum(values) / len(values)


def test_high_temperature_is_more_random(server):
    bodies = [{"temperature": t, "seed": s, "logprobs": True} for t in (0.7, 2.0) for s in SEEDS]
    outs = chat_many(server, bodies)
    low, high = outs[:len(SEEDS)], outs[len(SEEDS):]
    assert len({text(c) for c in high}) == len(SEEDS)      # every seed its own text
    # Raw logprobs: at temperature 2 the sampled tokens are much less likely under the model.
    assert mean_sampled_logprob(high) < mean_sampled_logprob(low) - 1.0


@pytest.mark.parametrize("name,value", [("top_k", 5), ("top_p", 0.5), ("min_p", 0.2)])
def test_truncation_samplers_only_sample_kept_tokens(server, name, value):
    # Temperature 1: the raw distribution (reported as top_logprobs) is the one truncated.
    outs = chat_many(server, [{"temperature": 1.0, "seed": s, name: value, "logprobs": True,
                               "top_logprobs": 20} for s in SEEDS])
    tol = 1e-4
    for entry in (e for c in outs for e in c["logprobs"]["content"]):
        above = [t["logprob"] for t in entry["top_logprobs"]
                 if t["logprob"] > entry["logprob"] + tol]
        if name == "top_k":
            assert len(above) < value
        elif name == "top_p":     # the tokens more likely than it hold less than top_p
            assert sum(math.exp(lp) for lp in above) < value + tol
        else:
            best = entry["top_logprobs"][0]["logprob"]
            assert entry["logprob"] >= best + math.log(value) - tol


def test_logit_bias_forces_and_bans_a_token(server, tokenizer):
    forced = tokenizer.encode(" banana", add_special_tokens=False)
    assert len(forced) == 1
    prompt = {"prompt": "The capital of France is", "logprobs": 0, "max_tokens": 6}
    greedy = post(server, "completions", {**prompt, "temperature": 0}).json()["choices"][0]
    first = tokenizer.encode(greedy["logprobs"]["tokens"][0], add_special_tokens=False)
    assert len(first) == 1 and tokenizer.decode(first) == greedy["logprobs"]["tokens"][0]
    for seed in SEEDS:
        r = post(server, "completions", {**prompt, "temperature": 0.9, "seed": seed,
                                         "logit_bias": {str(forced[0]): 100}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tokenizer.decode(forced * 6)
    banned = post(server, "completions", {**prompt, "temperature": 0,
                                          "logit_bias": {str(first[0]): -100}}).json()
    tokens = banned["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 6 and greedy["logprobs"]["tokens"][0] not in tokens
    # The guide's own example values are accepted.
    assert chat_many(server, [{"logit_bias": {"13": 5, "42": -5}, "seed": 1}])[0]["message"]


REPETITIVE = "one two three four one two three four one two three four one two three four"


def repeated_tokens(tokenizer, completion: str) -> int:
    """Output tokens already seen in the prompt or earlier in the output."""
    seen = set(tokenizer.encode(REPETITIVE))
    count = 0
    for token in tokenizer.encode(completion, add_special_tokens=False):
        count += token in seen
        seen.add(token)
    return count


def test_penalties_reduce_repeats(server, tokenizer):
    pairs = [({"temperature": 0}, {"temperature": 0, "repetition_penalty": 1.5})]
    for seed in SEEDS:
        sampled = {"temperature": 0.8, "seed": seed}
        pairs += [({**sampled}, {**sampled, "repetition_penalty": 1.2}),
                  ({**sampled, "frequency_penalty": -2.0}, {**sampled, "frequency_penalty": 2.0}),
                  ({**sampled, "presence_penalty": -2.0}, {**sampled, "presence_penalty": 2.0})]

    def repeats(fields):
        r = post(server, "completions", {"prompt": REPETITIVE, "max_tokens": 24, **fields})
        assert r.status_code == 200, r.text
        return repeated_tokens(tokenizer, r.json()["choices"][0]["text"])

    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(repeats, [fields for pair in pairs for fields in pair]))
    (greedy, greedy_penalised), *sampled = zip(counts[0::2], counts[1::2])
    assert greedy >= 16                                 # greedy keeps counting in circles
    assert greedy_penalised < greedy / 2
    for (less_penalised, more_penalised), (fields, _) in zip(sampled, pairs[1:]):
        assert more_penalised < less_penalised, fields


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 1.5), ("top_p", 0.0), ("top_k", -2),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("frequency_penalty", 2.5),
    ("presence_penalty", -2.5), ("min_p", -0.1), ("min_p", 1.5), ("typical_p", 2),
    ("typical_p", -0.5),
])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_out_of_range_values_are_400_naming_the_field(server, route, field, value):
    body = {"messages": MESSAGES} if route == "chat/completions" else {"prompt": "Hi"}
    r = post(server, route, {**body, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"], error
