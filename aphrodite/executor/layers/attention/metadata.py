"""AttentionMetadata: a step's batch as attention reads it, worked out on the host once a step.

build() turns the scheduler's per-sequence numbers into device tensors and host ints, so the
forward pass never syncs: which tokens are written where, which rows decode (one new token)
and which prefill (several), and the backends selector.select_backends chose for each. The
grouped torch decode also gets its plan here (plan_decode_groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aphrodite.executor.layers.attention.config import AttentionConfig
from aphrodite.executor.layers.attention.selector import select_backends


@dataclass
class PrefillSeq:
    """A sequence with more than one new token (host-side ints, so the loop over them never syncs)."""
    index: int          # row in the batch
    token_start: int    # its first token in the flat batch
    token_end: int
    seq_len: int        # context length after this step (cached prefix + new tokens)


# Padded tokens (sequences x longest member) per decode group. K+V of 2048 tokens of the default
# model are 3 MB in float32: they stay in cache between the gather and the attention. Batch 64,
# one layer, 1 thread, AMD EPYC: 2048 and 4096 measure alike, 16384 runs 2-3x slower on mixed
# lengths (benchmarks/step_profile.py --attention grouped times the path in whole steps).
DECODE_GROUP_TOKENS = 2048


@dataclass
class DecodeGroup:
    """Decode sequences that attend together: rows start..end of the length-sorted order."""
    start: int
    end: int
    num_blocks: int            # blocks gathered per sequence (the longest member's)
    block_ids: torch.Tensor    # [n * num_blocks] long, each member's first num_blocks blocks
    visible: torch.Tensor      # [n, 1, 1, num_blocks * block_size] bool, True below seq_len
    seq_lens: torch.Tensor     # [n, 1, 1, 1] long, each member's context length


@dataclass
class DecodePlan:
    order: torch.Tensor | None       # decode rows sorted by length (None: already sorted)
    groups: list[DecodeGroup]


def plan_decode_groups(seq_lens: np.ndarray, block_tables: np.ndarray, block_size: int,
                       device, group_tokens: int | None = None) -> DecodePlan:
    """Group one-token sequences by length (seq_lens/block_tables: the decode rows only)."""
    group_tokens = group_tokens or DECODE_GROUP_TOKENS
    order = np.argsort(seq_lens, kind="stable")
    sorted_lens = seq_lens[order]
    groups, start, n = [], 0, len(order)
    while start < n:
        end = start + 1
        # Ascending lengths: the newest member is the longest, so padding is count x its length.
        while end < n and (end + 1 - start) * sorted_lens[end] <= group_tokens:
            end += 1
        rows = order[start:end]
        num_blocks = -(-int(sorted_lens[end - 1]) // block_size)
        ids = np.ascontiguousarray(block_tables[rows, :num_blocks], dtype=np.int64).reshape(-1)
        visible = np.arange(num_blocks * block_size)[None, :] < sorted_lens[start:end, None]
        lens = np.ascontiguousarray(sorted_lens[start:end], dtype=np.int64)
        groups.append(DecodeGroup(start, end, num_blocks, torch.from_numpy(ids).to(device),
                                  torch.from_numpy(visible[:, None, None, :]).to(device),
                                  torch.from_numpy(lens).view(-1, 1, 1, 1).to(device)))
        start = end
    identity = bool((order == np.arange(n)).all())
    return DecodePlan(None if identity else torch.from_numpy(order).to(device), groups)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [T] long, flat cache slot per token; -1 = do not write
    query_start_loc: torch.Tensor    # [B + 1] long
    seq_lens: torch.Tensor           # [B] long, context length after this step
    block_tables: torch.Tensor       # [B, max_blocks] long, padded with 0
    max_query_len: int
    max_seq_len: int
    num_decode_only: bool            # every sequence has exactly one new token
    # Execution plan, worked out on the host in build() so the forward pass never syncs.
    num_tokens: int = 0
    write_token_idx: torch.Tensor | None = None  # tokens to write when some slots are -1
    write_slots: torch.Tensor | None = None      # their slots (slot_mapping itself when all valid)
    decode_seq_idx: torch.Tensor | None = None   # [Bd] batch rows with one new token
    decode_token_idx: torch.Tensor | None = None  # [Bd] their tokens in the flat batch
    # Mixed batches only: the decode rows' block tables and context lengths.
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks]
    decode_seq_lens: torch.Tensor | None = None      # [Bd]
    decode_max_seq_len: int = 0
    prefills: list[PrefillSeq] | None = None
    # The backends selector.select_backends chose (names from config.DECODE_BACKENDS and
    # PREFILL_BACKENDS), None where the step has no such rows.
    decode_backend: str | None = None
    prefill_backend: str | None = None
    # True: a decode-only step that the C++ decode kernel serves, on a cache the C++ kernels
    # also write; a model may run it as one fused C++ decode step (models/fused_decode.py).
    cpu_decode_kernel: bool = False
    decode_plan: DecodePlan | None = None        # decode_backend "torch_grouped": its groups
    # prefill_backend "cpu": the prefills as paged_prefill_attention takes them, [n, 4] int64
    # (block-table row, first token, new tokens, context length).
    prefill_seqs: torch.Tensor | None = None

    @classmethod
    def build(cls, query_lens: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray,
              slot_mapping: np.ndarray, config: AttentionConfig) -> AttentionMetadata:
        """The step's metadata on config.device, with the backends chosen for it."""
        device = config.device
        query_lens = np.asarray(query_lens, dtype=np.int64)
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        slot_mapping = np.asarray(slot_mapping, dtype=np.int64)
        query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        assert len(slot_mapping) == num_tokens, "one slot per scheduled token"

        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)

        slots = to_device(slot_mapping)
        write_token_idx = write_slots = None
        valid = slot_mapping >= 0
        if valid.all():
            write_slots = slots
        elif valid.any():
            idx = np.flatnonzero(valid)
            write_token_idx, write_slots = to_device(idx), to_device(slot_mapping[idx])

        is_decode = query_lens == 1
        decode_rows = np.flatnonzero(is_decode)
        prefill_rows = np.flatnonzero(~is_decode & (query_lens > 0))
        starts = query_start_loc[:-1]
        prefills = [PrefillSeq(r, int(starts[r]), int(starts[r] + query_lens[r]), int(seq_lens[r]))
                    for r in prefill_rows.tolist()]
        block_tables = np.asarray(block_tables)
        backends = select_backends(config, query_lens)
        decode_plan = prefill_seqs = None
        if backends.decode == "torch_grouped":
            decode_plan = plan_decode_groups(seq_lens[decode_rows], block_tables[decode_rows],
                                             config.block_size, device)
        if backends.prefill == "cpu":
            prefill_seqs = torch.tensor([[p.index, p.token_start, p.token_end - p.token_start,
                                          p.seq_len] for p in prefills], dtype=torch.int64)
        mixed = 0 < len(decode_rows) < len(query_lens)
        return cls(
            slot_mapping=slots,
            query_start_loc=to_device(query_start_loc),
            seq_lens=to_device(seq_lens),
            block_tables=to_device(block_tables),
            max_query_len=int(query_lens.max(initial=0)),
            max_seq_len=int(seq_lens.max(initial=0)),
            num_decode_only=bool(len(query_lens) > 0 and is_decode.all()),
            num_tokens=num_tokens,
            write_token_idx=write_token_idx,
            write_slots=write_slots,
            decode_seq_idx=to_device(decode_rows) if len(decode_rows) else None,
            decode_token_idx=to_device(starts[decode_rows]) if len(decode_rows) else None,
            decode_block_tables=to_device(block_tables[decode_rows]) if mixed else None,
            decode_seq_lens=to_device(seq_lens[decode_rows]) if mixed else None,
            decode_max_seq_len=int(seq_lens[decode_rows].max(initial=0)),
            prefills=prefills,
            decode_backend=backends.decode,
            prefill_backend=backends.prefill,
            cpu_decode_kernel=backends.cpu_decode_kernel,
            decode_plan=decode_plan,
            prefill_seqs=prefill_seqs,
        )
