"""Decode steps on CUDA replayed from captured CUDA graphs.

A decode step launches hundreds of small kernels; replaying a captured graph removes the
CPU launch cost that otherwise dominates small batches. Shapes inside a graph are fixed,
so graphs are captured for a ladder of batch sizes and context-length buckets; a step is
padded up to the nearest captured shape. Padding rows write their K/V into a scratch
block that no request owns, and attend to one token, so they cannot disturb real rows.
Mixed prefill/decode steps, and decode steps larger than the ladder, run eagerly.
Only imported on CUDA.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from aphrodite.executor.layers.attention import AttentionConfig, AttentionMetadata

logger = logging.getLogger("aphrodite.worker")

BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_CONTEXT_BUCKET = 512


def context_buckets(max_model_len: int, block_size: int) -> list[int]:
    """Context lengths (whole blocks) to capture: doubling from 512 up to max_model_len."""
    top = -(-max_model_len // block_size) * block_size
    buckets, length = [], MIN_CONTEXT_BUCKET
    while length < top:
        buckets.append(length)
        length *= 2
    return buckets + [top]


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], attention_config: AttentionConfig,
                 max_model_len: int, max_num_seqs: int, scratch_block: int):
        self.model, self.kv_caches, self.attention_config = model, kv_caches, attention_config
        self.device = device = attention_config.device
        self.block_size = block_size = attention_config.block_size
        self.scratch_slot = scratch_block * block_size
        self.batch_sizes = [b for b in BATCH_LADDER if b <= max_num_seqs] or [1]
        self.context_lens = context_buckets(max_model_len, block_size)
        largest = self.batch_sizes[-1]
        max_blocks = self.context_lens[-1] // block_size
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), self.scratch_slot, dtype=torch.long,
                                       device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _metadata(self, batch: int, context: int) -> AttentionMetadata:
        meta = AttentionMetadata.build(
            np.ones(batch), np.full(batch, context), np.zeros((batch, 1)),
            np.full(batch, self.scratch_slot), self.attention_config)
        # A replay refills only the buffers below, so the captured decode may read nothing
        # else that depends on the step (no host-side plan, as the grouped decode has).
        assert meta.decode_backend in ("triton", "torch_padded"), meta.decode_backend
        # Point the plan at the static buffers the replays will refill.
        meta.slot_mapping = meta.write_slots = self.slot_mapping[:batch]
        meta.seq_lens = self.seq_lens[:batch]
        meta.block_tables = self.block_tables[:batch, :context // self.block_size]
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        # Largest first, so smaller graphs reuse the memory pool of larger ones.
        for batch in reversed(self.batch_sizes):
            for context in reversed(self.context_lens):
                meta = self._metadata(batch, context)
                args = (self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.model(*args)                      # warm-up outside the graph
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[batch, context] = self.model(*args)
                pool = graph.pool()
                self.graphs[batch, context] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes up to %d, contexts up to %d)",
                    len(self.graphs), self.batch_sizes[-1], self.context_lens[-1])

    def can_run(self, batch: int, max_seq_len: int) -> bool:
        return batch <= self.batch_sizes[-1] and max_seq_len <= self.context_lens[-1]

    def run(self, token_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            seq_lens: np.ndarray, block_tables: np.ndarray) -> torch.Tensor:
        batch = len(token_ids)
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch)]
        context = self.context_lens[bisect.bisect_left(self.context_lens, int(seq_lens.max()))]
        self.input_ids[:batch].copy_(torch.from_numpy(token_ids), non_blocking=True)
        self.positions[:batch].copy_(torch.from_numpy(positions), non_blocking=True)
        self.slot_mapping[:batch].copy_(torch.from_numpy(slot_mapping), non_blocking=True)
        self.seq_lens[:batch].copy_(torch.from_numpy(seq_lens), non_blocking=True)
        width = block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(torch.from_numpy(block_tables), non_blocking=True)
        # Padding rows: scratch slot, one visible token, block 0 (never read past length 1).
        self.slot_mapping[batch:size].fill_(self.scratch_slot)
        self.seq_lens[batch:size].fill_(1)
        self.graphs[size, context].replay()
        return self.outputs[size, context][:batch]
