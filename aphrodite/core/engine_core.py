"""The engine-core process: scheduler + KV-cache manager driving the workers.

One thread, one loop: drain frontend frames (blocking only when idle) -> schedule ->
send STEP -> while the workers compute, keep reading frontend frames -> take RESULT ->
update requests -> send one STEP_OUTPUTS frame for the whole step. No torch here.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import traceback

import zmq

from aphrodite import processes
from aphrodite.config import EngineConfig
from aphrodite.core.grammars import GrammarManager, resolve_grammar
from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request
from aphrodite.core.scheduler import Scheduler
from aphrodite.core.workers import WorkerFailure, WorkerGroup
from aphrodite.protocol import (AbortRequests, AddRequest, EngineOutput, EngineStats, Failure,
                                Frame, GrammarMask, SchedulerOutput, StepOutputs, decode,
                                encode)

logger = logging.getLogger("aphrodite.engine")

PARENT_CHECK_S = 1.0      # how often the idle loop checks the frontend and the workers
SEND_TIMEOUT_MS = 1000    # a frontend that stops reading is checked for life this often


class EngineCore:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, ipc_dir: str, frontend_pid: int,
                 session_dir: str | None = None):
        """session_dir: the frontend's socket folder, where it shares the tokenizer."""
        self.config = config
        self.frontend_pid = frontend_pid
        self.workers = WorkerGroup(config, ctx, ipc_dir, frontend_pid)
        self.ready = self.workers.ready
        self.max_model_len = self.ready.max_model_len
        self.eos_token_ids = self.ready.eos_token_ids
        self.kv = KVCacheManager(self.ready.num_kv_blocks, config.block_size,
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.num_worker_requests = 0      # as rank 0 last reported it
        self.grammars = GrammarManager(session_dir or os.path.dirname(ipc_dir),
                                       self.ready.vocab_size, self.eos_token_ids)
        self.compiling: dict[str, object] = {}     # request id -> its grammar's Future

    # ---- frontend frames ---------------------------------------------------------------------
    def handle(self, frame: Frame, body: AddRequest | AbortRequests | None) -> bool:
        """Apply one frontend frame; False means shut down."""
        if frame is Frame.ADD:
            req = Request.from_add_frame(body, self.eos_token_ids, self.max_model_len)
            self.scheduler.add_request(req)
            if req.structured_outputs is not None and not req.is_finished:
                req.awaiting_grammar = True
                self.compiling[req.request_id] = self.grammars.submit(req.structured_outputs)
        elif frame is Frame.ABORT:
            self.scheduler.abort(body.request_ids)
        elif frame is Frame.SHUTDOWN:
            return False
        return True

    def admit_compiled(self) -> bool:
        """Hand finished compiles to their requests; True if one failed (news to send)."""
        failed = False
        for rid, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[rid]
            req = self.scheduler.requests.get(rid)
            if req is None or req.is_finished:
                continue              # aborted while compiling
            resolve_grammar(req, future)
            if req.is_finished:
                self.scheduler.release_finished(req)
                failed = True
        return failed

    def send_grammar_masks(self, step: SchedulerOutput) -> None:
        """BITMASK for the step just sent (the workers run its forward pass meanwhile)."""
        if not step.grammar_req_ids:
            return
        requests = self.scheduler.requests
        bitmask = self.grammars.fill_masks([requests[rid].matcher
                                            for rid in step.grammar_req_ids])
        self.workers.send_grammar_mask(GrammarMask(step.step_id, step.grammar_req_ids), bitmask)

    # ---- outputs -----------------------------------------------------------------------------
    def stats(self, step: SchedulerOutput | None = None, num_generated: int = 0) -> EngineStats:
        num_prompt = 0
        if step is not None:
            for rid, n in step.num_scheduled_tokens.items():
                req = self.scheduler.requests.get(rid)
                if req is not None:
                    start = req.num_computed_tokens - n
                    num_prompt += max(0, min(start + n, len(req.prompt_token_ids)) - start)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_kv_blocks=self.kv.num_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=num_prompt,
            num_generation_tokens=num_generated,
            num_engine_requests=len(self.scheduler.requests),
            num_worker_requests=self.num_worker_requests)

    def collect_outputs(self, updated: list[Request], logprobs: dict) -> list[EngineOutput]:
        outputs = {}
        for req in updated:
            entry = EngineOutput(req.request_id, req.output_token_ids[-1:], req.finish_reason,
                                 req.stop_reason, req.num_cached_tokens, error=req.error,
                                 grammar_complete=req.grammar_complete)
            if req.request_id in logprobs:
                entry.logprobs = [logprobs[req.request_id]]
            # Prompt logprobs are gathered over the prefill chunks and sent once, with the
            # first generated token.
            if req.wants_prompt_logprobs and len(req.output_token_ids) == 1:
                entry.prompt_logprobs = req.prompt_logprobs
            if len(req.output_token_ids) == 1:
                entry.scheduled_time = req.scheduled_time
            outputs[req.request_id] = entry
        for req in self.scheduler.pop_finished():
            if req.request_id not in outputs:
                outputs[req.request_id] = EngineOutput(req.request_id, [], req.finish_reason,
                                                       req.stop_reason, req.num_cached_tokens,
                                                       error=req.error)
        return list(outputs.values())

    def add_prompt_logprobs(self, step: SchedulerOutput, chunks: dict[str, list[dict]]) -> None:
        for rid, entries in chunks.items():
            req = self.scheduler.requests.get(rid)
            if req is None or req.is_finished:
                continue          # aborted while the step ran
            # The scheduler advanced num_computed_tokens past this step's chunk when planning it.
            req.add_prompt_logprobs(req.num_computed_tokens - step.num_scheduled_tokens[rid],
                                    entries)

    def forget_step(self) -> SchedulerOutput | None:
        """A step that runs nothing and only tells the workers which requests to drop.

        The scheduler hands finished ids to the workers with the next real step; once
        traffic stops there is none, and the workers would keep those requests' state.
        """
        finished, preempted = self.scheduler.take_forgotten()
        if not (finished or preempted):
            return None
        return SchedulerOutput(step_id=0, finished_req_ids=finished, preempted_req_ids=preempted)

    def emit(self, outbox: zmq.Socket, frame: Frame, body) -> None:
        """Send to the frontend; if it stops reading, check that it still exists."""
        message = encode(frame, body)
        while True:
            try:
                outbox.send(message)      # SNDTIMEO bounds the wait
                return
            except zmq.Again:
                if os.getppid() != self.frontend_pid:
                    raise processes.ParentGone("the frontend exited") from None

    # ---- main loop -----------------------------------------------------------------------------
    def run(self, inbox: zmq.Socket, outbox: zmq.Socket) -> bool:
        """Serve until SHUTDOWN (returns True) or until the frontend is gone (False)."""
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(self.workers.result_socket, zmq.POLLIN)
        in_flight: SchedulerOutput | None = None
        step_started = 0.0
        last_parent_check = time.monotonic()
        timeout_s = self.config.worker_timeout_s
        dirty = False          # something changed that the frontend has not been told

        while True:
            if self.compiling and self.admit_compiled():
                dirty = True
            if in_flight is None and self.scheduler.has_unfinished():
                step = self.scheduler.schedule()
                if step.num_scheduled_tokens:
                    self.workers.send_step(step)
                    in_flight, step_started = step, time.monotonic()
                    self.send_grammar_masks(step)
            if in_flight is None and not self.scheduler.has_unfinished():
                step = self.forget_step()
                if step is not None:
                    self.workers.send_step(step)
                    in_flight, step_started = step, time.monotonic()
            if in_flight is None and dirty:
                self.emit(outbox, Frame.STEP_OUTPUTS, StepOutputs(
                    self.collect_outputs([], {}), self.stats(), time.time()))
                dirty = False

            if in_flight is not None:
                wait_ms = 100      # woken early by the RESULT frame
            elif self.scheduler.has_unfinished():
                wait_ms = 10       # nothing fitted this step; retry soon, do not spin
            else:
                wait_ms = 1000     # idle: block on the frontend
            events = dict(poller.poll(wait_ms))

            if inbox in events:
                while True:
                    try:
                        message = inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not self.handle(*decode(message)):
                        return True
                    dirty = True

            if self.workers.result_socket in events:
                result = self.workers.recv_result()
                self.add_prompt_logprobs(in_flight, result.prompt_logprobs)
                self.num_worker_requests = result.num_requests
                updated = self.scheduler.update_from_output(in_flight, result.sampled)
                self.emit(outbox, Frame.STEP_OUTPUTS, StepOutputs(
                    self.collect_outputs(updated, result.logprobs),
                    self.stats(in_flight, len(updated)), time.time()))
                in_flight, dirty = None, False
            elif in_flight is not None:
                self.workers.check_alive()
                if time.monotonic() - step_started > timeout_s:
                    raise WorkerFailure(f"a model step took longer than {timeout_s:.0f} s "
                                        "(APHRODITE_ENGINE_ITERATION_TIMEOUT_S)")

            now = time.monotonic()
            if now - last_parent_check > PARENT_CHECK_S:
                last_parent_check = now
                if os.getppid() != self.frontend_pid:
                    logger.warning("frontend process is gone; shutting down")
                    return False
                self.workers.check_alive()     # a worker may die while we are idle


def run_engine_core(args: dict) -> None:
    """Process main, started by the frontend (aphrodite/frontend/engine_process.py)."""
    processes.configure_logging("engine")
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the frontend decides when we stop
    processes.raise_on_sigterm()
    try:
        processes.follow_parent(args, signal.SIGTERM)
    except (processes.ParentGone, processes.Terminated):
        raise SystemExit(0)
    config = EngineConfig.from_dict(args["config"])
    input_addr, output_addr = args["input_addr"], args["output_addr"]
    ctx = zmq.Context()
    inbox = processes.socket(ctx, zmq.PULL, input_addr, bind=False)
    outbox = processes.socket(ctx, zmq.PUSH, output_addr, bind=False, linger_ms=2000,
                              send_timeout_ms=SEND_TIMEOUT_MS)
    # Our sockets live inside the frontend's socket folder, so whichever process outlives
    # the other removes both: the frontend after a killed core, the core after a killed
    # frontend. Nothing is left in /tmp by a supervisor's restarts.
    session_dir = os.path.dirname(input_addr.removeprefix("ipc://"))
    ipc_dir = tempfile.mkdtemp(prefix="core-", dir=session_dir)
    engine = None
    exit_code = 0
    orderly = False        # SHUTDOWN from the frontend: the workers get time to exit
    stopped = False        # SIGTERM, or the frontend gone: it may not clean up after us
    try:
        engine = EngineCore(config, ctx, ipc_dir, args["parent_pid"], session_dir)
        engine.emit(outbox, Frame.READY, engine.ready)
        orderly = engine.run(inbox, outbox)
        stopped = not orderly                      # run() returns False: the frontend is gone
    except (processes.Terminated, processes.ParentGone) as exc:
        logger.warning("stopping at once: %s", exc or "SIGTERM")
        stopped = True
        outbox.setsockopt(zmq.LINGER, 0)           # nobody may be left to read
    except Exception as exc:
        exit_code = 1
        detail = str(exc) if isinstance(exc, WorkerFailure) else traceback.format_exc()
        logger.error("engine core failed: %s", detail)
        try:
            outbox.send(encode(Frame.DEAD, Failure(detail)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    finally:
        if engine is not None:
            engine.grammars.shutdown()
            engine.workers.shutdown(graceful=orderly)
        inbox.close(0)
        outbox.close()
        # destroy(), not term(): sockets of a WorkerGroup that failed half-built are still
        # open, and term() would wait for them forever.
        ctx.destroy(linger=0)
        # Stopped, the whole folder goes. A frontend killed with -9 sends our SIGTERM (the
        # death signal) when its main thread dies, while its other threads can still make it
        # our parent, so getppid() cannot tell that case from a plain stop; and a frontend
        # that is stopping no longer needs its sockets.
        shutil.rmtree(session_dir if stopped else ipc_dir, ignore_errors=True)
    raise SystemExit(exit_code)


if __name__ == "__main__":
    run_engine_core(processes.child_args())
