"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption.

There are no prefill or decode phases: every request has a number of computed tokens
and a number of known tokens, and each step spends a token budget so that requests
catch up. Running requests go first (a decode costs one token, a prefill its next
chunk), then waiting ones. When the KV pool runs out, the newest running request is
preempted by recompute: its blocks are freed and it goes back to the front of the
queue, keeping its output so far.

The output of a step is a diff for the workers: new requests once (with all their
tokens), then only new tokens and new block ids.
"""

from __future__ import annotations

import time
from collections import deque

from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request, RequestStatus
from aphrodite.protocol import CachedRequestData, NewRequestData, SchedulerOutput


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._dropped: list[str] = []     # to tell the workers at the next step
        self._preempted: list[str] = []   # likewise
        self._step_id = 0
        self.num_preemptions = 0

    # ---- requests in and out ---------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        if not req.prompt_token_ids:
            req.finish("abort")
            return
        if req.max_tokens < 1:   # no room left under max_model_len
            req.finish("length")
            return
        self.waiting.append(req)

    def abort(self, request_ids) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            req.finish("abort")
            self._release(req)
            aborted.append(req)
        return aborted

    def pop_finished(self) -> list[Request]:
        """Finished requests whose final output has to be reported (then forgotten)."""
        done = [r for r in self.requests.values() if r.is_finished]
        for req in done:
            del self.requests[req.request_id]
        return done

    def release_finished(self, req: Request) -> None:
        """Free a request finished outside a step (its grammar failed, say)."""
        if req.is_finished:
            self._release(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.num_tokens_sent or req.num_preemptions:   # the workers may keep its state
            self._dropped.append(req.request_id)
        self.kv.free(req)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._step_id += 1
        out = SchedulerOutput(step_id=self._step_id)
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while True:
                new_blocks = self.kv.allocate_slots(req, num_new)
                if new_blocks is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            if new_blocks is None:       # req preempted itself; nothing after it remains
                break
            self._schedule(req, num_new, new_blocks, out)
            budget -= num_new
            i += 1

        skipped: list[Request] = []      # their grammars still compile: admitted later
        while self.waiting and not preempted and budget > 0 \
                and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.awaiting_grammar:
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = [], 0
            # Prompt logprobs need every prompt position computed, so no prefix-cache hits.
            look_up = req.num_computed_tokens == 0 and not req.wants_prompt_logprobs
            if look_up:
                hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - req.num_computed_tokens - num_hit_tokens, budget)
            new_blocks = self.kv.allocate_slots(req, num_new, hits)
            if new_blocks is None:
                break
            self.waiting.popleft()
            if look_up and req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens
                self.kv.record_prefix_lookup(len(req.prompt_token_ids), num_hit_tokens)
            req.num_computed_tokens += num_hit_tokens
            if req.scheduled_time is None:
                req.scheduled_time = time.time()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule(req, num_new, new_blocks, out)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

        if out.num_scheduled_tokens:   # an empty step is not sent: keep the lists for the next
            out.finished_req_ids, out.preempted_req_ids = self.take_forgotten()
        return out

    def take_forgotten(self) -> tuple[list[str], list[str]]:
        """Finished and preempted ids the workers have not been told about yet (and clear them)."""
        forgotten = self._dropped, self._preempted
        self._dropped, self._preempted = [], []
        return forgotten

    def _schedule(self, req: Request, num_new: int, new_blocks: list[int],
                  out: SchedulerOutput) -> None:
        if req.num_tokens_sent == 0:
            out.new_requests.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                self.kv.block_ids(req.request_id)[:], req.num_computed_tokens,
                req.sampling_params))
        else:
            out.cached_requests.append(CachedRequestData(
                req.request_id, req.all_token_ids[req.num_tokens_sent:] if
                req.num_tokens > req.num_tokens_sent else [],
                new_blocks, req.num_computed_tokens))
        req.num_tokens_sent = req.num_tokens
        out.num_scheduled_tokens[req.request_id] = num_new
        # Advance now, so the next step can be planned without waiting for this one.
        req.num_computed_tokens += num_new
        if req.num_computed_tokens == req.num_tokens and req.samples_under_grammar:
            out.grammar_req_ids.append(req.request_id)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        if req.num_tokens_sent:
            self._preempted.append(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_tokens_sent = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results -------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append sampled tokens; returns the requests that got a token this step."""
        updated = []
        for rid, token_id in sampled.items():
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue          # aborted while the step ran
            if req.num_computed_tokens != req.num_tokens:
                continue          # partial prefill chunk: its sample is meaningless
            req.append_token(token_id)
            if not req.is_finished and req.num_tokens >= self.max_model_len:
                req.finish("length")
            if req.is_finished:
                self._release(req)
            updated.append(req)
        return updated
