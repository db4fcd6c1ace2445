"""KV-cache manager: block accounting, prefix-cache hits, LRU reuse of freed blocks."""

from aphrodite.core.kv_cache_manager import KVCacheManager
from aphrodite.core.request import Request


def make_request(rid, tokens):
    return Request(request_id=rid, prompt_token_ids=list(tokens), sampling_params={},
                   max_tokens=16)


def test_allocates_ceil_blocks_and_frees_them():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", range(10))
    blocks = kv.allocate_slots(req, 10)
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert kv.num_free_blocks == 7
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2) == []          # 12 tokens still fit in 3 blocks
    assert len(kv.allocate_slots(req, 3)) == 1      # the 13th token needs a 4th block
    kv.free(req)
    assert kv.num_free_blocks == 10 and kv.usage == 0.0


def test_refuses_when_pool_is_too_small_and_leaves_state_unchanged():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", range(12))
    assert kv.allocate_slots(req, 12) is None
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []


def test_prefix_hit_on_full_blocks_and_last_token_is_recomputed():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", range(12))
    kv.allocate_slots(first, 12)
    kv.free(first)                                   # blocks stay findable after free
    second = make_request("b", list(range(12)) + [99, 98])
    hits, num = kv.get_computed_blocks(second)
    assert num == 12 and len(hits) == 3
    # Identical prompt: at least one token must still be computed.
    same = make_request("c", range(12))
    hits, num = kv.get_computed_blocks(same)
    assert num == 8 and len(hits) == 2


def test_different_prefix_misses_even_with_equal_later_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    kv.allocate_slots(a, 9)
    b = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert kv.get_computed_blocks(b) == ([], 0)      # chained hashes: block 2 differs by parent


def test_shared_blocks_are_ref_counted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", range(9))
    kv.allocate_slots(a, 9)
    b = make_request("b", list(range(8)) + [50, 51])
    hits, num = kv.get_computed_blocks(b)
    assert num == 8
    b.num_computed_tokens = 0
    kv.allocate_slots(b, 2, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    kv.free(a)
    assert all(kv.blocks[i].ref_count == 1 for i in kv.block_ids("b")[:2])
    assert kv.num_free_blocks == 8 - 3                # a's tail block came back


def test_freed_blocks_are_reused_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    kv.free(a)
    b = make_request("b", [7, 8, 9, 10, 11, 12])
    kv.allocate_slots(b, 6)                           # needs 3 of the 4 blocks
    # a's tail block went back to the free list first, so it was reused first and
    # a's first block (the shared head in a prefix tree) survives.
    again = make_request("c", [1, 2, 3, 4, 5])
    hits, num = kv.get_computed_blocks(again)
    assert num == 2
    kv.free(b)


def test_hit_on_blocks_in_free_list_counts_against_capacity():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    kv.free(a)                                        # 3 free, 2 of them cached
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hits, num = kv.get_computed_blocks(b)
    assert num == 4
    assert kv.allocate_slots(b, 5, hits) is None      # 2 hits + 3 new > 3 blocks
    assert kv.num_free_blocks == 3


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
