"""Paged KV-cache bookkeeping: which blocks each request owns, and the prefix cache.

Only ids live here; the tensors are in the workers. A block's prefix-cache key chains
its parent's key with its own token ids, so equal keys mean equal whole prefixes. Freed
blocks keep their key and stay findable until they are reused (least recently freed
first), so a later request with the same prefix gets them back for free.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from aphrodite.core.request import Request

_ROOT_HASH = 0x5EED


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()   # kept to rule out hash collisions on a hit


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order = eviction order; OrderedDict gives O(1) removal from the middle.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}            # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_registered: dict[str, int] = {}  # leading blocks already offered to the cache
        self.prefix_queries = 0                      # prompt tokens looked up
        self.prefix_hits = 0                         # of which found in the cache

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def _update_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend req.block_hashes to cover every full block within the first num_tokens."""
        bs = self.block_size
        tokens = None
        while (len(req.block_hashes) + 1) * bs <= num_tokens:
            if tokens is None:
                tokens = req.all_token_ids
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if i else _ROOT_HASH
            req.block_hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks for a request about to start computing.

        At least one token is always left to compute: the model must run on the last
        prompt token to produce the next one.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_hashes(req, req.num_tokens)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        all_tokens = None
        for i, block_hash in enumerate(req.block_hashes[:max_blocks]):
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            if all_tokens is None:
                all_tokens = req.all_token_ids
            block = self.blocks[block_id]
            if block.token_ids != tuple(all_tokens[i * self.block_size:(i + 1) * self.block_size]):
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Make room for num_new_tokens more tokens of req; None if the pool is too small.

        computed_blocks are prefix-cache hits (from get_computed_blocks) that the request
        takes over before computing the rest. Returns the block ids added to the request.
        """
        computed_blocks = computed_blocks or []
        owned = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - len(owned) - len(computed_blocks)
        # Hits that sit in the free list would be consumed by this allocation too.
        reclaimable = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_needed > len(self.free_blocks) - reclaimable:
            if not owned:
                del self.req_blocks[req.request_id]
            return None
        for block_id in computed_blocks:
            self._take(block_id)
        new_blocks = [self._pop_free() for _ in range(max(num_needed, 0))]
        owned.extend(computed_blocks)
        owned.extend(new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, owned, total_tokens)
        return computed_blocks + new_blocks

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def free(self, req: Request) -> None:
        """Release a request's blocks; tails first, so shared prefixes are evicted last."""
        self.req_num_registered.pop(req.request_id, None)
        for block_id in reversed(self.req_blocks.pop(req.request_id, [])):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None

    # ---- internals -----------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:          # evict its old prefix-cache entry
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _cache_full_blocks(self, req: Request, owned: list[int], num_tokens: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        self._update_hashes(req, num_tokens)
        tokens = None
        num_full = num_tokens // self.block_size
        start = self.req_num_registered.get(req.request_id, 0)
        self.req_num_registered[req.request_id] = max(start, num_full)
        for i in range(start, num_full):
            block = self.blocks[owned[i]]
            if block.block_hash is not None:
                continue
            block_hash = req.block_hashes[i]
            if block_hash in self.cached:
                continue   # an identical block is already findable; keep that one
            if tokens is None:
                tokens = req.all_token_ids
            block.block_hash = block_hash
            block.token_ids = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            self.cached[block_hash] = block.block_id
