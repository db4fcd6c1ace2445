"""Worker process main: one per device. Loads the model, owns the KV cache, runs steps.

Imported by the engine core only for the spawn target, so torch is imported inside
run_worker, never at module level.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

import zmq

from aphrodite.config import EngineConfig
from aphrodite.protocol import Frame, decode, encode

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


def _run_step(runner, step: dict) -> dict:
    output = runner.execute(step)
    output["num_requests"] = runner.num_request_states
    return output


def run_worker(config_dict: dict, rank: int, step_addr: str, result_addr: str,
               parent_pid: int, ipc_dir: str) -> None:
    from aphrodite.core.workers import ParentGone, die_with_parent
    try:
        # SIGKILL: a worker holds nothing that needs cleaning up, and may be stuck in a kernel.
        die_with_parent(parent_pid, signal.SIGKILL)
    except ParentGone:
        return
    logging.basicConfig(level=os.environ.get("APHRODITE_LOG_LEVEL", "INFO"),
                        format=f"%(levelname)s %(asctime)s worker-{rank} %(message)s")
    config = EngineConfig.from_dict(config_dict)
    ctx = zmq.Context()
    steps = ctx.socket(zmq.PULL)
    steps.connect(step_addr)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 2000)
    results.connect(result_addr)
    try:
        threads = _set_threads(config)
        from aphrodite.executor.model_runner import ModelRunner, pick_device
        device = pick_device(config, rank)
        if config.tensor_parallel_size > 1:
            _init_distributed(config, rank, ipc_dir, device)
        runner = ModelRunner(config, device, rank)
        logger.info("ready: %s on %s, %d threads, %d KV blocks of %d tokens",
                    runner.dtype, device, threads, runner.num_kv_blocks, config.block_size)
        results.send(encode(Frame.READY, {"rank": rank, **runner.ready_info()}))
        while True:
            if not steps.poll(1000):
                if os.getppid() != parent_pid:      # engine core gone: do not linger
                    return
                continue
            frame, body = decode(steps.recv())
            if frame is Frame.SHUTDOWN:
                return
            if frame is Frame.STEP:
                output = _run_step(runner, body)
                if rank == 0:
                    results.send(encode(Frame.RESULT, output))
    except Exception:
        message = traceback.format_exc()
        logger.error("worker failed:\n%s", message)
        results.send(encode(Frame.DEAD, {"rank": rank, "message": message}))
        raise SystemExit(1)
    finally:
        steps.close(0)
        results.close()
        ctx.term()
