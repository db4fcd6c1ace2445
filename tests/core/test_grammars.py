"""Structured outputs in the engine core, with the real default tokenizer and no model.

The workers are replaced by a recorder (the STEP and BITMASK frames the core would send) and
the model by a seeded pick among the tokens each mask allows, so every check is exact: masks
against llguidance's own token validation, outputs against the constraint (re.fullmatch, the
choice list), and which requests the scheduler admits while a grammar compiles.
"""

import random
import re
import types
from concurrent.futures import Future, wait

import numpy as np
import pytest

from aphrodite.config import EngineConfig
from aphrodite.core import engine_core
from aphrodite.core.grammars import GrammarManager
from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request
from aphrodite.core.scheduler import Scheduler
from aphrodite.executor.sampling.grammar_mask import allowed_tokens
from aphrodite.frontend.engine_process import EngineProcess
from aphrodite.protocol import AddRequest, EngineReady, Frame

VOCAB = 49152
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory, tokenizer):
    """A folder holding tokenizer.json, written by EngineProcess.share_tokenizer itself."""
    folder = tmp_path_factory.mktemp("session")
    holder = types.SimpleNamespace(ipc_dir=str(folder), tokenizer_shared=False)
    EngineProcess.share_tokenizer(holder, tokenizer)
    assert holder.tokenizer_shared and (folder / "tokenizer.json").stat().st_size > 0
    return str(folder)


@pytest.fixture(scope="module")
def manager(session_dir, tokenizer):
    grammars = GrammarManager(session_dir, VOCAB, [tokenizer.eos_token_id])
    yield grammars
    grammars.shutdown()


def allowed_ids(manager, matcher) -> np.ndarray:
    return np.flatnonzero(allowed_tokens(manager.fill_masks([matcher]), VOCAB)[0])


def test_cache_hit_gives_an_equal_but_separate_matcher(manager):
    constraint = {"regex": r"[a-c]{2}x"}
    first = manager.submit(constraint).result(timeout=60)
    cached = len(manager._compiled)
    second = manager.submit(dict(constraint)).result(timeout=60)
    assert len(manager._compiled) == cached          # compiled once
    assert first is not second
    assert np.array_equal(manager.fill_masks([first]), manager.fill_masks([second]))
    token = int(allowed_ids(manager, first)[0])
    assert first.consume_token(token)
    # The other copy did not move.
    assert not np.array_equal(manager.fill_masks([first]), manager.fill_masks([second]))
    third = manager.submit(constraint).result(timeout=60)
    assert np.array_equal(manager.fill_masks([second]), manager.fill_masks([third]))


@pytest.mark.parametrize("constraint", [{"json": SCHEMA}, {"regex": r"(cat|dog)s? [0-9]{1,3}"},
                                        {"choice": ["red apple", "green pear", "blue"]}])
def test_masks_allow_the_tokens_the_matcher_accepts(manager, constraint):
    matcher = manager.submit(constraint).result(timeout=60)
    rng = random.Random(0)
    every_token = range(VOCAB)
    for _ in range(3):                # the start and two states further on
        allowed = set(allowed_ids(manager, matcher).tolist())
        # llguidance's own mask, read bit by bit: bit k of byte b is token 8b + k.
        own = matcher.compute_bitmask()
        assert allowed == {t for t in every_token if own[t // 8] >> (t % 8) & 1}
        if matcher.is_stopped():      # complete: only EOS (the engine finishes it first)
            assert allowed <= set(manager.eos_token_ids)
            break
        # Every allowed token is one the matcher accepts. (The converse does not hold where
        # the grammar forces bytes: the mask keeps their canonical tokens, "ok" but not "o".)
        accepted = {t for t in every_token if matcher.validate_tokens([t]) == 1}
        assert allowed and allowed <= accepted
        choices = sorted(allowed - set(manager.eos_token_ids))
        if not choices:
            break
        assert matcher.consume_token(rng.choice(choices))


# ---- the engine core with recorded workers -----------------------------------------------------

class RecordedWorkers:
    """Stands in for WorkerGroup: keeps what the core sends."""

    def __init__(self, config, ctx, ipc_dir, frontend_pid, eos):
        self.ready = EngineReady(num_kv_blocks=config.num_kv_blocks, block_size=config.block_size,
                                 max_model_len=256, vocab_size=VOCAB, eos_token_ids=[eos],
                                 device="cpu", dtype="float32", worker_pids=[])
        self.masks = []

    def send_step(self, step):
        pass

    def send_grammar_mask(self, header, bitmask):
        self.masks.append((header, bitmask.copy()))


@pytest.fixture
def core(monkeypatch, session_dir, tokenizer, tmp_path):
    monkeypatch.setattr(engine_core, "WorkerGroup",
                        lambda *args: RecordedWorkers(*args, eos=tokenizer.eos_token_id))
    config = EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)
    engine = engine_core.EngineCore(config, None, str(tmp_path), 0, session_dir)
    yield engine
    engine.grammars.shutdown()


def add(engine, rid, prompt, **params):
    engine.handle(Frame.ADD, AddRequest(rid, list(prompt), {"max_tokens": 24, **params}))


def run_step(engine, rng, outputs):
    """One engine step; the model picks, for each sampling request, a random token its mask
    allows (any non-EOS token without one). Returns the step."""
    engine.admit_compiled()
    step = engine.scheduler.schedule()
    if not step.num_scheduled_tokens:
        wait(list(engine.compiling.values()), timeout=1)   # the engine loop's retry
        return step
    engine.workers.send_step(step)
    engine.send_grammar_masks(step)
    masks = {}
    if step.grammar_req_ids:
        header, bitmask = engine.workers.masks[-1]
        assert header.step_id == step.step_id and header.req_ids == step.grammar_req_ids
        rows = allowed_tokens(bitmask, VOCAB)
        masks = dict(zip(header.req_ids, rows))
    sampled = {}
    for rid in step.num_scheduled_tokens:
        req = engine.scheduler.requests[rid]
        if req.num_computed_tokens != req.num_tokens:
            continue                  # a prefill chunk that does not end the prompt
        allowed = np.flatnonzero(masks[rid]) if rid in masks else np.arange(100, 200)
        sampled[rid] = int(rng.choice(allowed))
    updated = engine.scheduler.update_from_output(step, sampled)
    for out in engine.collect_outputs(updated, {}):
        outputs.setdefault(out.request_id, []).append(out)
    return step


def finished(outputs, rid):
    return outputs.get(rid) and outputs[rid][-1].finish_reason is not None


def test_constrained_requests_finish_when_their_grammar_completes(core, tokenizer):
    rng, outputs = random.Random(1), {}
    prompt = tokenizer.encode("Answer:")
    add(core, "regex", prompt, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"})
    add(core, "choice", prompt, structured_outputs={"choice": ["alpha", "beta gamma"]})
    add(core, "free", prompt)
    for _ in range(200):
        if all(finished(outputs, r) for r in ("regex", "choice", "free")):
            break
        run_step(core, rng, outputs)
    for rid, check in (("regex", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
                       ("choice", lambda t: t in ("alpha", "beta gamma"))):
        ids = [t for out in outputs[rid] for t in out.new_token_ids]
        last = outputs[rid][-1]
        assert last.finish_reason == "stop" and last.grammar_complete
        assert check(tokenizer.decode(ids)), tokenizer.decode(ids)
    assert outputs["free"][-1].finish_reason == "length"
    assert not core.scheduler.requests and not core.compiling


def test_a_grammar_that_does_not_compile_fails_only_its_request(core, tokenizer):
    rng, outputs = random.Random(2), {}
    prompt = tokenizer.encode("Hello")
    add(core, "bad", prompt, structured_outputs={"regex": "("})
    add(core, "good", prompt, structured_outputs={"choice": ["yes", "no"]})
    for _ in range(100):
        if finished(outputs, "bad") and finished(outputs, "good"):
            break
        run_step(core, rng, outputs)
    bad = outputs["bad"][-1]
    assert bad.finish_reason == "error" and bad.new_token_ids == []
    assert bad.error["status"] == 400 and bad.error["param"] == "structured_outputs"
    assert "grammar" in bad.error["message"]
    good = [t for out in outputs["good"] for t in out.new_token_ids]
    assert tokenizer.decode(good) in ("yes", "no")
    assert not core.scheduler.requests


def test_a_compiling_request_is_skipped_and_admitted_once_done(core, tokenizer, monkeypatch):
    pending = Future()
    monkeypatch.setattr(core.grammars, "submit", lambda constraint: pending)
    prompt = tokenizer.encode("Hi there")
    add(core, "waits", prompt, structured_outputs={"choice": ["x"]})
    add(core, "behind", prompt)
    rng, outputs = random.Random(3), {}
    for _ in range(3):
        step = run_step(core, rng, outputs)
        assert "waits" not in step.num_scheduled_tokens and "behind" in step.num_scheduled_tokens
    assert list(core.scheduler.waiting)[0].request_id == "waits"
    real = GrammarManager(core.grammars.tokenizer_path.rsplit("/", 1)[0], VOCAB,
                          core.eos_token_ids)
    pending.set_result(real.submit({"choice": ["on", "off"]}).result(timeout=60))
    real.shutdown()
    step = run_step(core, rng, outputs)
    assert "waits" in step.num_scheduled_tokens and step.grammar_req_ids == ["waits"]


def test_scheduler_skips_a_waiting_request_whose_grammar_compiles():
    sched = Scheduler(KVCacheManager(32, 4), 8, 64, 128)
    first = Request("first", [1, 2, 3], {}, max_tokens=4, awaiting_grammar=True)
    second = Request("second", [4, 5], {}, max_tokens=4)
    sched.add_request(first)
    sched.add_request(second)
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["second"]
    assert [r.request_id for r in sched.waiting] == ["first"]
    first.awaiting_grammar = False
    out = sched.schedule()
    assert "first" in out.num_scheduled_tokens


def test_preemption_keeps_the_matcher_and_prefill_chunks_do_not_sample(core, tokenizer):
    """A tiny pool and budget: prompts arrive in chunks and requests get preempted; every
    constrained output still matches."""
    core.scheduler.max_num_batched_tokens = 6
    core.kv.__init__(9, 4, True)       # 9 blocks of 4 tokens for three requests
    rng, outputs = random.Random(4), {}
    pattern = r"[0-9]{6}[a-z]{2}"
    for i in range(3):               # distinct prompts: no shared prefix-cache blocks
        prompt = tokenizer.encode(f"{'abc'[i]} wants six digits then two letters, please:")
        add(core, f"r{i}", prompt, structured_outputs={"regex": pattern})
    for _ in range(400):
        if all(finished(outputs, f"r{i}") for i in range(3)):
            break
        run_step(core, rng, outputs)
    assert core.scheduler.num_preemptions > 0
    for i in range(3):
        ids = [t for out in outputs[f"r{i}"] for t in out.new_token_ids]
        assert outputs[f"r{i}"][-1].finish_reason == "stop"
        assert re.fullmatch(pattern, tokenizer.decode(ids)), tokenizer.decode(ids)
