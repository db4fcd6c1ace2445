"""Model runner: the worker's persistent view of the batch, input preparation, forward, sampling.

The engine core sends a diff each step (new requests once, then new tokens and block
ids); the runner keeps every request's tokens and block table between steps and turns
a step into flat tensors with vectorised numpy, not per-token Python.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from aphrodite.config import EngineConfig
from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches, kv_cache_bytes_per_block,
                                                 populate_host_pool)
from aphrodite.executor.models import get_model_class
from aphrodite.executor.sampler import Sampler, SamplingRow
from aphrodite.executor.sampling.logprobs import summarise
from aphrodite.executor.loader import load_model_weights
from aphrodite.executor.loader.quantization import available_ram
from aphrodite.model_files import eos_token_ids, load_config, max_model_len, resolve_model
from aphrodite.protocol import SchedulerOutput, StepResult
from aphrodite.sampling_params import SamplingParams

logger = logging.getLogger("aphrodite.worker")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_DEFAULT_FRACTION = 0.25
CPU_KV_DEFAULT_CAP = 4 << 30
# Start-up time given to faulting the CPU KV pool in (attention.populate_host_pool).
KV_POPULATE_SECONDS = 2.0
# Prompt logprobs materialise [positions, vocab] float32 logits; this many positions at a
# time bounds that memory for long prefill chunks.
PROMPT_LOGPROBS_ROWS = 256


def pick_device(config: EngineConfig, rank: int) -> str:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    torch.cuda.set_device(rank)
    return f"cuda:{rank}"


def pick_dtype(config: EngineConfig, hf_config, device: str) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device == "cpu":
        return torch.float32          # CPUs without native bf16 math run it slower
    checkpoint = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = _DTYPES.get(checkpoint)
    return checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.bfloat16


def pick_kv_cache_dtype(config: EngineConfig, dtype: torch.dtype,
                        device: torch.device) -> torch.dtype:
    """The KV cache's element type: the model's, or float16 on CPU (rounded on the way in,
    widened to float32 when read: the CPU kernels' float16 loads cost about what float32 ones
    do, and half the bytes cross the memory bus)."""
    if config.kv_cache_dtype == "auto":
        return dtype
    if device.type != "cpu" and dtype != torch.float16:
        raise ValueError("kv_cache_dtype float16 is for the CPU path: on a GPU the KV cache "
                         "takes the model's dtype (--dtype float16 gives a float16 cache)")
    return torch.float16


@dataclass
class RequestState:
    prompt_len: int
    token_ids: list[int]               # prompt + output known so far
    block_ids: list[int]
    num_computed_tokens: int
    row: SamplingRow
    output_token_ids: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: str, rank: int = 0):
        self.config = config
        self.device = torch.device(device)
        files = resolve_model(config.model)
        self.hf_config = load_config(files)
        self.dtype = pick_dtype(config, self.hf_config, device)
        self.kv_dtype = pick_kv_cache_dtype(config, self.dtype, self.device)
        self.block_size = config.block_size
        model_cls = get_model_class(self.hf_config)
        with torch.device(self.device):
            # Rotary tables cover --max-model-len where given (Gemma 3's two tables for its
            # 32k positions take 128 MiB in float32).
            self.model = model_cls(self.hf_config, self.dtype, tp_rank=rank,
                                   tp_size=config.tensor_parallel_size,
                                   max_positions=config.max_model_len or None)
        load_model_weights(self.model, files, config, self.device, progress=rank == 0)
        self.model.eval()
        self.eos_token_ids = eos_token_ids(files, self.hf_config, None)
        self.vocab_size = self.hf_config.vocab_size
        self.max_model_len = max_model_len(self.hf_config)
        if config.max_model_len:
            if config.max_model_len > self.max_model_len:
                raise ValueError(f"max_model_len {config.max_model_len} exceeds what this model "
                                 f"supports ({self.max_model_len} positions)")
            self.max_model_len = config.max_model_len
        # What picks each step's attention backends (a benchmark may set .decode/.prefill).
        self.attention_config = AttentionConfig(
            self.device, self.dtype, self.kv_dtype,
            self.hf_config.num_attention_heads // config.tensor_parallel_size,
            self.model.num_kv_heads, self.model.head_dim, self.block_size)
        self.num_kv_blocks, self.kv_caches = self._allocate_kv_cache(rank)
        if self.device.type == "cpu":
            cpu_kernels.library_available()     # built (or found cached) now, not in a step
            began = time.perf_counter()
            done = populate_host_pool(self.kv_caches, KV_POPULATE_SECONDS)
            logger.info("Faulted in %d of %d KV blocks in %.2f s", done, self.num_kv_blocks,
                        time.perf_counter() - began)
        # The pool must hold at least one sequence of max_model_len tokens.
        self.max_model_len = min(self.max_model_len, self.num_kv_blocks * self.block_size)
        self.sampler = Sampler(eos_token_ids=self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        # Sampler state (mirostat's mu) of preempted requests, until they are recomputed.
        self.preempted_states: dict[str, dict] = {}
        self.reports_results = rank == 0      # only rank 0 replies, so only it needs logprobs
        self.cuda_graphs = None
        if self._captures_cuda_graphs():
            from aphrodite.executor.cuda_graphs import CudaGraphRunner
            self.cuda_graphs = CudaGraphRunner(
                self.model, self.kv_caches, self.attention_config, self.max_model_len,
                config.max_num_seqs, scratch_block=self.num_kv_blocks)
            self.cuda_graphs.capture()

    # ---- start-up ------------------------------------------------------------------------
    def _captures_cuda_graphs(self) -> bool:
        """Decode steps replay CUDA graphs unless --enforce-eager, or the model cannot be
        captured (a mixture of experts reads its routing back to the host)."""
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.model.supports_cuda_graphs)

    def _kv_geometry(self) -> tuple[int, int, int]:
        return self.hf_config.num_hidden_layers, self.model.num_kv_heads, self.model.head_dim

    def _allocate_kv_cache(self, rank: int) -> tuple[int, list[torch.Tensor]]:
        layers, kv_heads, head_dim = self._kv_geometry()
        per_block = kv_cache_bytes_per_block(layers, self.block_size, kv_heads, head_dim,
                                             self.kv_dtype)
        if self.config.num_kv_blocks:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cpu":
            budget = self.config.kv_cache_memory or min(
                int(available_ram() * CPU_KV_DEFAULT_FRACTION), CPU_KV_DEFAULT_CAP)
            num_blocks = budget // per_block
        else:
            num_blocks = self._gpu_kv_budget() // per_block
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({per_block} bytes per block "
                               "needed); raise --kv-cache-memory / --gpu-memory-utilization")
        # On CUDA one extra block, never handed out, takes the writes of CUDA-graph padding.
        extra = int(self._captures_cuda_graphs())
        caches = allocate_kv_caches(layers, num_blocks + extra, self.block_size, kv_heads,
                                    head_dim, self.kv_dtype, self.device)
        return num_blocks, caches

    def _gpu_kv_budget(self) -> int:
        """What --gpu-memory-utilization leaves after weights and a max-size forward pass."""
        torch.cuda.reset_peak_memory_stats()
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        layers, kv_heads, head_dim = self._kv_geometry()
        probe_blocks = -(-tokens // self.block_size)
        probe = allocate_kv_caches(layers, probe_blocks, self.block_size, kv_heads, head_dim,
                                   self.kv_dtype, self.device)
        probe_bytes = sum(t.numel() * t.element_size() for t in probe)
        meta = AttentionMetadata.build(
            np.array([tokens]), np.array([tokens]), np.arange(probe_blocks)[None, :],
            np.arange(tokens), self.attention_config)
        with torch.inference_mode():
            hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device),
                                torch.arange(tokens, device=self.device), probe, meta)
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - probe_bytes
        del probe, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization) - peak

    @property
    def num_request_states(self) -> int:
        """Requests this runner keeps state for (running, plus preempted ones' sampler state)."""
        return len(self.requests) + len(self.preempted_states)

    def ready_info(self) -> dict:
        return {"num_kv_blocks": self.num_kv_blocks, "max_model_len": self.max_model_len,
                "vocab_size": self.vocab_size, "eos_token_ids": list(self.eos_token_ids),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    # ---- one step --------------------------------------------------------------------------
    def _apply_diff(self, step: SchedulerOutput) -> None:
        for rid in step.preempted_req_ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self.preempted_states[rid] = state.row.state
        for rid in step.finished_req_ids:
            self.requests.pop(rid, None)
            self.preempted_states.pop(rid, None)
        for new in step.new_requests:
            params = SamplingParams.from_dict(new.sampling_params)
            outputs = list(new.output_token_ids)
            prompt = new.prompt_token_ids
            # A recomputed request carries on with its sampler state; its token history
            # cache stays valid, since the engine core keeps the tokens generated so far.
            row = SamplingRow(params=params, prompt_token_ids=prompt, output_token_ids=outputs,
                              state=self.preempted_states.pop(new.req_id, {}))
            self.requests[new.req_id] = RequestState(
                prompt_len=len(prompt), token_ids=prompt + outputs,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, row=row,
                output_token_ids=outputs)
        for cached in step.cached_requests:
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.output_token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, mark: Callable[[str], None] | None = None,
                grammar_mask: Callable[[], tuple[list[str], np.ndarray]] | None = None
                ) -> StepResult:
        """Run one step. mark(phase), when given, is called as each phase ends ("inputs",
        "forward", "logits", "sampling"), so benchmarks/step_profile.py can time them.
        grammar_mask(), when given, returns the grammar rows' request ids and int32 bitmask;
        it is called after the forward pass, so the engine core fills it meanwhile."""
        self._apply_diff(step)
        result = StepResult()
        scheduled = step.num_scheduled_tokens
        if not scheduled:   # an idle engine core's step that only drops finished requests
            result.num_requests = self.num_request_states
            return result
        req_ids = list(scheduled)
        states = [self.requests[rid] for rid in req_ids]
        query_lens = np.fromiter(scheduled.values(), dtype=np.int64, count=len(req_ids))
        starts = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64,
                             count=len(states))
        seq_lens = starts + query_lens
        cu = np.zeros(len(req_ids) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu[1:])

        if int(query_lens.max()) == 1:
            token_ids = np.fromiter((s.token_ids[p] for s, p in zip(states, starts)),
                                    dtype=np.int64, count=len(states))
        else:
            token_ids = np.fromiter(
                (t for s, a, b in zip(states, starts, seq_lens) for t in s.token_ids[a:b]),
                dtype=np.int64, count=int(cu[-1]))
        row_of_token = np.repeat(np.arange(len(req_ids)), query_lens)
        positions = np.arange(cu[-1]) - cu[:-1][row_of_token] + starts[row_of_token]

        max_blocks = max(len(s.block_ids) for s in states)
        block_tables = np.zeros((len(states), max_blocks), dtype=np.int64)
        for i, s in enumerate(states):
            block_tables[i, :len(s.block_ids)] = s.block_ids
        slot_mapping = (block_tables[row_of_token, positions // self.block_size]
                        * self.block_size + positions % self.block_size)

        if (self.cuda_graphs is not None and len(token_ids) == len(states)
                and self.cuda_graphs.can_run(len(states), int(seq_lens.max()))):
            hidden = self.cuda_graphs.run(token_ids, positions, slot_mapping, seq_lens,
                                          block_tables)
        else:
            meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, slot_mapping,
                                           self.attention_config)
            if mark is not None:
                mark("inputs")
            hidden = self.model(torch.from_numpy(token_ids).to(self.device),
                                torch.from_numpy(positions).to(self.device), self.kv_caches,
                                meta)
        if mark is not None:
            mark("forward")

        result.num_requests = self.num_request_states
        if self.reports_results:
            result.prompt_logprobs = self._prompt_logprobs(hidden, req_ids, states, starts,
                                                           seq_lens, cu)
        # Only requests whose known tokens are all computed produce a next token.
        sampling = [i for i, s in enumerate(states) if seq_lens[i] == len(s.token_ids)]
        masks = None
        if grammar_mask is not None:
            mask_ids, bitmask = grammar_mask()
            row_of = {req_ids[i]: j for j, i in enumerate(sampling)}
            masks = ([row_of[rid] for rid in mask_ids], bitmask)
        if not sampling:
            if mark is not None:
                mark("sampling")
            return result
        logits = self.model.compute_logits(hidden[torch.from_numpy(cu[1:][sampling] - 1)
                                                  .to(self.device)])
        if mark is not None:
            mark("logits")
        out = self.sampler(logits, [states[i].row for i in sampling], masks)
        result.sampled = {req_ids[i]: int(t) for i, t in zip(sampling, out.token_ids)}
        result.logprobs = {req_ids[i]: lp.to_dict() for i, lp in zip(sampling, out.logprobs)
                           if lp is not None}
        if mark is not None:
            mark("sampling")
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, req_ids: list[str],
                         states: list[RequestState], starts: np.ndarray, seq_lens: np.ndarray,
                         cu: np.ndarray) -> dict[str, list[dict]]:
        """Logprobs of the prompt tokens this step's chunk predicts, for the rows that ask.

        The hidden state at position q predicts token q + 1, so a chunk of positions
        [start, end) yields the entries of prompt tokens start + 1 .. min(end, prompt_len - 1):
        log_softmax of the raw logits in float32, the token's rank and the top-N."""
        out = {}
        for i, state in enumerate(states):
            top_n = state.row.params.prompt_logprobs
            last = min(int(seq_lens[i]), state.prompt_len - 1)   # last prompt token predicted
            if top_n is None or last <= starts[i]:
                continue
            first_row = int(cu[i])
            count = last - int(starts[i])
            targets = torch.tensor(state.token_ids[int(starts[i]) + 1:last + 1],
                                   device=self.device)
            entries = []
            for a in range(0, count, PROMPT_LOGPROBS_ROWS):
                b = min(a + PROMPT_LOGPROBS_ROWS, count)
                logprobs = self.model.compute_logits(
                    hidden[first_row + a:first_row + b]).float().log_softmax(-1)
                entries += [lp.to_dict() for lp in summarise(logprobs, targets[a:b],
                                                             [top_n] * (b - a))]
            out[req_ids[i]] = entries
        return out

