"""Scheduler: token budget, chunked prefill, preemption by recompute, token-level stops.

The model is replaced by a rule (next token = f(all tokens so far)) so every check is
exact; the diffs the scheduler emits are replayed into a worker-side mirror to prove
the workers would see the right tokens and blocks.
"""

from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request
from aphrodite.core.scheduler import Scheduler
from aphrodite.protocol import AddRequest


def next_token(tokens):
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 10


def make_request(rid, prompt, max_tokens=8, **kw):
    return Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params={},
                   max_tokens=max_tokens, **kw)


class WorkerMirror:
    """What a worker would hold after applying each step's diff."""

    def __init__(self):
        self.tokens, self.blocks, self.computed = {}, {}, {}

    def apply(self, out):
        for rid in out.finished_req_ids:
            for d in (self.tokens, self.blocks, self.computed):
                d.pop(rid, None)
        for new in out.new_requests:
            self.tokens[new.req_id] = new.prompt_token_ids + new.output_token_ids
            self.blocks[new.req_id] = list(new.block_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        for c in out.cached_requests:
            self.tokens[c.req_id] += c.new_token_ids
            self.blocks[c.req_id] += c.new_block_ids
            self.computed[c.req_id] = c.num_computed_tokens
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            end = self.computed[rid] + n
            assert end <= len(self.tokens[rid])
            assert len(self.blocks[rid]) * 4 >= end          # block_size 4 in these tests
            if end == len(self.tokens[rid]):
                sampled[rid] = next_token(self.tokens[rid])
            else:
                sampled[rid] = -1                             # must be ignored
        return sampled


def run_to_completion(sched, mirror=None, max_steps=1000):
    mirror, steps = mirror or WorkerMirror(), []
    while sched.has_unfinished():
        out = sched.schedule()
        steps.append(out)
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= sched.max_num_seqs
        sched.update_from_output(out, mirror.apply(out))
        assert len(steps) < max_steps
    return steps


def expected_output(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, max_len=256):
    return Scheduler(KVCacheManager(num_blocks, 4), max_seqs, budget, max_len)


def test_generates_exact_tokens_and_respects_budget():
    sched = make_scheduler()
    prompts = {f"r{i}": list(range(i, i + 3 + 2 * i)) for i in range(6)}
    reqs = {rid: make_request(rid, p) for rid, p in prompts.items()}
    for r in reqs.values():
        sched.add_request(r)
    run_to_completion(sched)
    for rid, r in reqs.items():
        assert r.output_token_ids == expected_output(prompts[rid], 8)
        assert r.finish_reason == "length"
    assert sched.kv.num_free_blocks == 64


def test_chunked_prefill_splits_long_prompt_and_keeps_decodes_going():
    sched = make_scheduler(budget=10)
    short = make_request("short", [1, 2, 3], max_tokens=20)
    long = make_request("long", list(range(100, 137)), max_tokens=2)
    sched.add_request(short)
    sched.add_request(long)
    steps = run_to_completion(sched)
    chunks = [s.num_scheduled_tokens.get("long") for s in steps if "long" in s.num_scheduled_tokens]
    assert sum(chunks[:-1]) >= 37 - 10 and max(chunks) <= 10 and len(chunks) >= 5
    # The short request decoded in every step while the long prompt was being prefilled.
    prefill_steps = [s for s in steps[1:5]]
    assert all(s.num_scheduled_tokens.get("short") == 1 for s in prefill_steps)
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 2)
    assert short.output_token_ids == expected_output([1, 2, 3], 20)


def test_preemption_recomputes_and_everything_finishes_identically():
    prompts = {f"r{i}": [i + 1] * 6 for i in range(6)}
    ample = make_scheduler(num_blocks=200)
    tight = make_scheduler(num_blocks=12)     # 48 token slots for 6 x 22 tokens
    outs = {}
    for sched in (ample, tight):
        reqs = [make_request(rid, p, max_tokens=16) for rid, p in prompts.items()]
        for r in reqs:
            sched.add_request(r)
        run_to_completion(sched)
        outs[sched] = {r.request_id: r.output_token_ids for r in reqs}
    assert tight.num_preemptions > 0 and ample.num_preemptions == 0
    assert outs[tight] == outs[ample]
    assert tight.kv.num_free_blocks == 12


def test_stops_on_eos_and_stop_token_but_not_before_min_tokens():
    prompt = [5, 6, 7]
    expected = expected_output(prompt, 8)
    sched = make_scheduler()
    eos = make_request("eos", prompt, eos_token_ids=frozenset({expected[2]}))
    stop = make_request("stop", prompt, stop_token_ids=frozenset({expected[1]}))
    late = make_request("late", prompt, eos_token_ids=frozenset({expected[1]}), min_tokens=4)
    for r in (eos, stop, late):
        sched.add_request(r)
    run_to_completion(sched)
    assert eos.output_token_ids == expected[:3] and eos.finish_reason == "stop"
    assert eos.stop_reason is None
    assert stop.output_token_ids == expected[:2] and stop.stop_reason == expected[1]
    assert late.output_token_ids == expected and late.finish_reason == "length"


def test_max_model_len_caps_output():
    sched = make_scheduler(max_len=12)
    req = Request.from_add_frame(AddRequest("a", list(range(10)), {"max_tokens": 50}), [], 12)
    sched.add_request(req)
    run_to_completion(sched)
    assert len(req.output_token_ids) == 2 and req.finish_reason == "length"


def test_abort_frees_blocks_and_tells_workers():
    sched = make_scheduler()
    a, b = make_request("a", [1, 2, 3], max_tokens=50), make_request("b", [4, 5], max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    mirror = WorkerMirror()
    out = sched.schedule()
    sched.update_from_output(out, mirror.apply(out))
    assert [r.request_id for r in sched.abort(["a", "a", "unknown"])] == ["a"]
    assert a.finish_reason == "abort"
    out = sched.schedule()
    assert "a" in out.finished_req_ids and "a" not in out.num_scheduled_tokens
    sched.update_from_output(out, mirror.apply(out))
    run_to_completion(sched, mirror)
    assert sched.kv.num_free_blocks == 64
    assert {r.request_id for r in sched.pop_finished()} == {"a", "b"}


def test_prefix_cache_hit_skips_computation():
    sched = make_scheduler()
    shared = list(range(40, 60))
    first = make_request("first", shared + [1], max_tokens=1)
    sched.add_request(first)
    run_to_completion(sched)
    second = make_request("second", shared + [2], max_tokens=4)
    sched.add_request(second)
    steps = run_to_completion(sched)
    assert steps[0].num_scheduled_tokens["second"] == 1       # 20 shared tokens = 5 full blocks
    assert second.num_cached_tokens == 20
    assert second.output_token_ids == expected_output(shared + [2], 4)
    assert sched.kv.prefix_hits == 20 and sched.kv.prefix_queries == 42
