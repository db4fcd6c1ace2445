"""Where a decode step's time goes: the engine pieces driven in one process, phase by phase.

    python benchmarks/step_profile.py --batch 64 1 --dtype float32 --threads 2

Scheduler + KV-cache manager + ModelRunner run in this process; the IPC a real step pays
(orjson STEP frame core -> worker, RESULT back, STEP_OUTPUTS to the frontend) is replayed over
a ZeroMQ ipc:// socket pair, so its cost is counted without a second process competing for
the cores. Phases per step:

  schedule   Scheduler.schedule()
  ipc        encode/send/recv/decode of STEP, RESULT and STEP_OUTPUTS frames
  inputs     ModelRunner: apply the diff, build token ids, positions, slots, metadata
  forward    the model's forward pass, split into attention / linear / rest by timers
             wrapped around paged_attention and linear (logits are under sampling); a
             fused quantised decode step (kernels/decode_layers.h) is one call, all "rest"
  logits     the lm_head over the sampled rows (model work: counted with the forward)
  sampling   the sampler (greedy here)
  output     Scheduler.update_from_output + the core's output/stats collection

The machine is shared and timings swing with load, so every figure is the minimum over
--repeats rounds of --steps decode steps (rounds follow each other: the context grows).
On a busy machine wall time is meaningless (each of torch's parallel regions waits for a
descheduled thread); --clock cpu times with this process's CPU time instead, which with
--threads 1 is close to the wall time the same work takes on an idle core.
The non-forward share is (step - forward - logits) / step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
import zmq

from aphrodite.config import EngineConfig
from aphrodite.core.engine_core import EngineCore
from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request
from aphrodite.core.scheduler import Scheduler
from aphrodite.executor.layers import attention, linear
from aphrodite.executor.model_runner import ModelRunner
from aphrodite.protocol import AddRequest, Frame, StepOutputs, decode, encode
from aphrodite.sampling_params import SamplingParams


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# --attention modes: which decode backend the attention selector is told to use.
DECODE_BACKENDS = {"kernel": "cpu", "grouped": "torch_grouped", "static": "torch_padded"}
clock = time.perf_counter


class ForwardTimers:
    """Wraps attention.paged_attention and linear.linear, which the models call through their
    modules, accumulating seconds."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.active = False           # only inside the forward pass (not the lm_head after it)
        self._attention, self._linear = attention.paged_attention, linear.linear

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = clock()
            out = fn(*args, **kwargs)
            self.seconds[name] += clock() - start
            return out
        return wrapper

    def install(self):
        attention.paged_attention = self._timed("attention", self._attention)
        linear.linear = self._timed("linear", self._linear)

    def uninstall(self):
        attention.paged_attention, linear.linear = self._attention, self._linear


class Loop:
    """One engine core + one model runner in this process, frames over a real socket pair."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, ipc_dir: str):
        self.runner = runner
        self.kv = KVCacheManager(runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   runner.max_model_len)
        # The core's output code needs only its scheduler and KV manager.
        self.core = EngineCore.__new__(EngineCore)
        self.core.scheduler, self.core.kv = self.scheduler, self.kv
        self.core.num_worker_requests = 0
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        address = f"ipc://{ipc_dir}/profile"
        self.pull.bind(address)
        self.push.connect(address)

    def _hop(self, frame: Frame, body):
        self.push.send(encode(frame, body))
        return decode(self.pull.recv())[1]

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        body = AddRequest(rid, prompt, params.to_dict())
        self.scheduler.add_request(Request.from_add_frame(body, [], self.runner.max_model_len))

    def step(self, times: dict | None = None, timers: ForwardTimers | None = None) -> int:
        last = [clock()]

        def mark(phase: str) -> None:
            now = clock()
            if times is not None:
                times[phase] += now - last[0]
            if timers is not None:
                timers.active = phase == "inputs"     # the forward pass comes next
            last[0] = now

        out = self.scheduler.schedule()
        mark("schedule")
        body = self._hop(Frame.STEP, out)
        mark("ipc")
        result = self.runner.execute(body, mark)
        result = self._hop(Frame.RESULT, result)
        mark("ipc")
        updated = self.scheduler.update_from_output(out, result.sampled)
        frame = StepOutputs(self.core.collect_outputs(updated, result.logprobs),
                            self.core.stats(out, len(updated)), time.time())
        mark("output")
        self._hop(Frame.STEP_OUTPUTS, frame)
        mark("ipc")
        return len(out.num_scheduled_tokens)

    def close(self):
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


def profile(runner, config, batch: int, prompt_len: int, steps: int, repeats: int,
            seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vocab = runner.vocab_size
    best: dict | None = None
    with tempfile.TemporaryDirectory(prefix="aphrodite-profile-") as ipc_dir:
        loop = Loop(runner, config, ipc_dir)
        # Requests prefilled early decode while later ones prefill: room for those tokens too.
        max_tokens = steps * repeats + 8 + -(-batch * prompt_len // config.max_num_batched_tokens)
        for i in range(batch):
            loop.add(f"r{i}", rng.integers(3, vocab, prompt_len).tolist(), max_tokens)
        while loop.scheduler.waiting or any(not r.output_token_ids
                                            for r in loop.scheduler.running):
            loop.step()                           # prefill (not measured)
        for _ in range(3):
            loop.step()                           # settle
        for _ in range(repeats):
            times, timers = defaultdict(float), ForwardTimers()
            timers.install()
            try:
                start = clock()
                for _ in range(steps):
                    assert loop.step(times, timers) == batch, "every request decodes every step"
                total = clock() - start
            finally:
                timers.uninstall()
            per_step = {k: v / steps for k, v in times.items()}
            per_step.update({f"forward.{k}": v / steps for k, v in timers.seconds.items()})
            per_step["step"] = total / steps
            if best is None or per_step["step"] < best["step"]:
                best = per_step
        loop.close()
    runner.requests.clear()                       # the next batch size starts afresh
    return best


def report(batch: int, t: dict) -> None:
    step = t["step"]
    rest = t["forward"] - t.get("forward.attention", 0) - t.get("forward.linear", 0)
    rows = [("schedule", t["schedule"]), ("ipc", t["ipc"]), ("inputs", t["inputs"]),
            ("forward", t["forward"]), ("  attention", t.get("forward.attention", 0)),
            ("  linear", t.get("forward.linear", 0)), ("  rest", rest),
            ("logits", t.get("logits", 0)), ("sampling", t["sampling"]), ("output", t["output"])]
    print(f"\nbatch {batch}: {step * 1e3:.2f} ms/step, {batch / step:.1f} tok/s")
    for name, value in rows:
        print(f"  {name:<12}{value * 1e3:>9.3f} ms {100 * value / step:>6.1f}%")
    non_forward = step - t["forward"] - t.get("logits", 0)
    print(f"  non-forward {non_forward * 1e3:>9.3f} ms {100 * non_forward / step:>6.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--prompt-len", type=int, default=128, help="context when timing starts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="cpu: this process's CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--attention", nargs="+", default=["kernel"],
                    choices=["kernel", "grouped", "static"],
                    help="decode attention: kernel (the CPU default, C++), grouped (the torch "
                         "fallback without a compiler) and/or static (one padded gather, the "
                         "CUDA-graph path), for a before/after in one run")
    args = ap.parse_args()

    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    config = EngineConfig(model=args.model, dtype=args.dtype, device="cpu",
                          max_num_seqs=max(args.batch), max_num_batched_tokens=2048,
                          enable_prefix_caching=False, kv_cache_memory=4 << 30,
                          num_threads=args.threads)
    runner = ModelRunner(config, "cpu")
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores: anything above ~0 distorts timings); "
          f"{args.dtype}, {args.threads} threads, {args.clock} clock, context {args.prompt_len}+, "
          f"min over {args.repeats} x {args.steps} steps")
    chosen = runner.attention_config
    for mode in args.attention:
        # The selector's choice for decode rows, forced; everything else stays as chosen.
        runner.attention_config = dataclasses.replace(chosen, decode=DECODE_BACKENDS[mode])
        for batch in args.batch:
            print(f"\n[{mode} decode attention]", end="")
            report(batch, profile(runner, config, batch, args.prompt_len, args.steps,
                                  args.repeats, args.seed))
    runner.attention_config = chosen


if __name__ == "__main__":
    main()
