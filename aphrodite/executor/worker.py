"""Worker process main, one per device: loads the model, owns the KV cache, runs steps.

Started by the engine core (aphrodite/core/workers.py) as ``python -m aphrodite.executor.worker``.
Every rank runs every STEP; only rank 0 answers with a RESULT.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

import zmq

from aphrodite import processes
from aphrodite.config import EngineConfig
from aphrodite.protocol import Failure, Frame, WorkerReady, decode, decode_bitmask, encode

logger = logging.getLogger("aphrodite.worker")


def _set_threads(config: EngineConfig) -> int:
    """Pin torch's thread count: oversubscribed cores make CPU decode many times slower."""
    import torch
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)
    torch.set_num_threads(threads)
    return threads


def _init_distributed(config: EngineConfig, rank: int, ipc_dir: str, device: str) -> None:
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"file://{ipc_dir}/dist-init",
                            rank=rank, world_size=config.tensor_parallel_size)


def run_worker(args: dict) -> None:
    try:
        # SIGKILL: a worker holds nothing that needs cleaning up, and may be stuck in a kernel.
        processes.follow_parent(args, signal.SIGKILL)
    except processes.ParentGone:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the engine core decides when we stop
    rank = args["rank"]
    processes.configure_logging(f"worker-{rank}")
    config = EngineConfig.from_dict(args["config"])
    ctx = zmq.Context()
    steps = processes.socket(ctx, zmq.PULL, args["step_addr"], bind=False)
    results = processes.socket(ctx, zmq.PUSH, args["result_addr"], bind=False, linger_ms=2000)
    try:
        threads = _set_threads(config)
        from aphrodite.executor.model_runner import ModelRunner, pick_device
        device = pick_device(config, rank)
        if config.tensor_parallel_size > 1:
            _init_distributed(config, rank, args["ipc_dir"], device)
        runner = ModelRunner(config, device, rank)
        logger.info("ready: %s on %s, %d threads, %d KV blocks of %d tokens",
                    runner.dtype, device, threads, runner.num_kv_blocks, config.block_size)
        results.send(encode(Frame.READY, WorkerReady(rank=rank, **runner.ready_info())))
        while True:
            if not steps.poll(1000):
                if not processes.parent_alive(args):      # engine core gone: do not linger
                    return
                continue
            frame, step = decode(steps.recv())
            if frame is Frame.SHUTDOWN:
                return
            if frame is Frame.STEP:
                # Only rank 0 samples for real, so only it gets the grammar masks.
                fetch = (lambda s=step: _receive_mask(steps, s.step_id, args)) \
                    if rank == 0 and step.grammar_req_ids else None
                result = runner.execute(step, grammar_mask=fetch)
                if rank == 0:
                    results.send(encode(Frame.RESULT, result))
    except Exception:
        message = traceback.format_exc()
        logger.error("worker failed:\n%s", message)
        results.send(encode(Frame.DEAD, Failure(message, rank)))
        raise SystemExit(1)
    finally:
        steps.close(0)
        results.close()
        ctx.term()


def _receive_mask(steps: zmq.Socket, step_id: int, args: dict):
    """The BITMASK frame that follows this step's STEP: (request ids, int32 [rows, words])."""
    import numpy as np
    while not steps.poll(1000):
        if not processes.parent_alive(args):
            raise processes.ParentGone("the engine core exited before sending the masks")
    header, raw = decode_bitmask(steps.recv_multipart(copy=False))
    if header.step_id != step_id:
        raise RuntimeError(f"masks of step {header.step_id} arrived for step {step_id}")
    words = np.frombuffer(raw, dtype=np.int32)
    return header.req_ids, words.reshape(len(header.req_ids), -1)


if __name__ == "__main__":
    run_worker(processes.child_args())
