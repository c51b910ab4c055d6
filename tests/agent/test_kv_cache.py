"""agent.kv_cache: block budget, reservations, slot mapping, export/import between caches."""

from __future__ import annotations

import pytest
import torch

from agent.kv_cache import CacheFullError, KVCacheSpec, PagedKVCache

N_KV_HEADS, HEAD_DIM = 2, 8


def make_cache(
    block_size: int = 4, layers: range = range(0, 3), num_blocks: int = 8
) -> PagedKVCache:
    return PagedKVCache(KVCacheSpec(block_size, N_KV_HEADS, HEAD_DIM), layers, num_blocks)


def fill(
    cache: PagedKVCache, request_id: str, layers: range, n_tokens: int, seed: int
) -> torch.Tensor:
    """Writes random K/V for positions [0, n_tokens) and returns them as export's layout."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((2, len(layers), n_tokens, N_KV_HEADS, HEAD_DIM), generator=gen)
    cache.reserve(request_id, n_tokens)
    slots = cache.slots(request_id, torch.arange(n_tokens))
    for i, layer in enumerate(layers):
        cache.write(layer, slots, kv[0, i], kv[1, i])
    return kv


# ---- budget -------------------------------------------------------------------------------
def test_block_bytes_follow_the_spec():
    spec = KVCacheSpec(block_size=4, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM)
    assert spec.bytes_per_token_per_layer == 2 * N_KV_HEADS * HEAD_DIM * 4  # K and V, fp32
    assert spec.block_bytes(3) == 4 * spec.bytes_per_token_per_layer * 3
    half = KVCacheSpec(block_size=4, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float16)
    assert half.block_bytes(3) * 2 == spec.block_bytes(3)


def test_blocks_for_budget_rounds_down_to_whole_blocks():
    spec = KVCacheSpec(block_size=4, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM)
    block = spec.block_bytes(3)
    assert spec.blocks_for_budget(10 * block, 3) == 10
    assert spec.blocks_for_budget(10 * block + block - 1, 3) == 10
    assert spec.blocks_for_budget(block - 1, 3) == 0
    assert spec.blocks_for_budget(0, 3) == 0
    # Fewer layers per stage: the same budget holds proportionally more blocks.
    assert spec.blocks_for_budget(10 * block, 1) == 30


def test_cache_built_from_budget_offers_that_many_blocks():
    spec = KVCacheSpec(block_size=4, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM)
    n = spec.blocks_for_budget(5 * spec.block_bytes(2), 2)
    cache = PagedKVCache(spec, range(0, 2), n)
    assert cache.num_free_blocks == 5
    assert cache.k[0].shape == (N_KV_HEADS, 5 * 4, HEAD_DIM)  # head-major slots
    with pytest.raises(ValueError, match="at least one block"):
        PagedKVCache(spec, range(0, 2), spec.blocks_for_budget(0, 2))


def test_blocks_for_tokens_rounds_up():
    spec = KVCacheSpec(block_size=4, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM)
    assert [spec.blocks_for_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# ---- reserve / free -----------------------------------------------------------------------
def test_reserve_takes_blocks_only_for_missing_positions_and_free_returns_them():
    cache = make_cache(block_size=4, num_blocks=8)
    cache.reserve("a", 9)  # positions 0..8 -> 3 blocks
    assert len(cache.block_tables["a"]) == 3
    assert cache.num_free_blocks == 5
    cache.reserve("a", 12)  # still inside 3 blocks
    assert cache.num_free_blocks == 5
    cache.reserve("a", 13)
    assert len(cache.block_tables["a"]) == 4
    assert cache.num_free_blocks == 4
    cache.reserve("b", 4)
    assert set(cache.block_tables["a"]).isdisjoint(cache.block_tables["b"])

    assert cache.free("a") == 4
    assert "a" not in cache.block_tables
    assert cache.num_free_blocks == 7
    assert cache.free("a") == 0  # freeing twice is harmless
    assert cache.free("b") == 1
    assert cache.num_free_blocks == 8


def test_freed_blocks_are_reused():
    cache = make_cache(block_size=4, num_blocks=2)
    cache.reserve("a", 8)
    blocks = set(cache.block_tables["a"])
    cache.free("a")
    cache.reserve("b", 8)
    assert set(cache.block_tables["b"]) == blocks


def test_reserve_when_full_raises_and_leaves_no_partial_table():
    cache = make_cache(block_size=4, num_blocks=4)
    cache.reserve("a", 8)  # 2 blocks, 2 left
    with pytest.raises(CacheFullError, match=r"needs 3 more KV blocks; 2 free"):
        cache.reserve("b", 12)
    assert "b" not in cache.block_tables
    assert cache.num_free_blocks == 2
    # A running request that cannot grow keeps exactly what it had.
    with pytest.raises(CacheFullError):
        cache.reserve("a", 8 + 3 * 4)
    assert len(cache.block_tables["a"]) == 2
    assert cache.num_free_blocks == 2
    cache.reserve("b", 8)  # what is free is still usable
    assert cache.num_free_blocks == 0


# ---- slots --------------------------------------------------------------------------------
def test_slots_map_positions_through_the_block_table():
    cache = make_cache(block_size=4, num_blocks=8)
    cache.reserve("a", 4)
    cache.reserve("b", 4)
    cache.reserve("a", 8)  # a's second block is not next to its first
    table_a = cache.block_tables["a"]
    assert table_a[1] != table_a[0] + 1
    positions = torch.tensor([0, 3, 4, 5, 7])
    expected = [table_a[p // 4] * 4 + p % 4 for p in positions.tolist()]
    assert cache.slots("a", positions).tolist() == expected
    slots_b = set(cache.slots("b", torch.arange(4)).tolist())
    assert slots_b.isdisjoint(cache.slots("a", torch.arange(8)).tolist())


def test_write_lands_at_the_slots_and_export_reads_it_back():
    cache = make_cache(block_size=4, layers=range(0, 2), num_blocks=8)
    cache.reserve("other", 5)
    kv = fill(cache, "a", range(0, 2), 10, seed=0)
    slots = cache.slots("a", torch.arange(10))
    assert torch.equal(cache.k[1][:, slots].transpose(0, 1), kv[0, 1])
    assert torch.equal(cache.v[0][:, slots].transpose(0, 1), kv[1, 0])
    assert torch.equal(cache.export("a", range(0, 2), range(0, 10)), kv)
    assert torch.equal(cache.export("a", range(1, 2), range(3, 7)), kv[:, 1:2, 3:7])


def test_gather_and_export_read_a_pool_with_reserved_room_as_one_without():
    exact = make_cache(block_size=4, layers=range(0, 2), num_blocks=8)
    roomy = PagedKVCache(KVCacheSpec(4, N_KV_HEADS, HEAD_DIM), range(0, 2), 8, max_blocks=64)
    for cache in (exact, roomy):
        cache.reserve("other", 5)
        kv = fill(cache, "a", range(0, 2), 10, seed=0)
    slots = exact.slots("a", torch.arange(10))
    assert torch.equal(roomy.slots("a", torch.arange(10)), slots)
    for layer in (0, 1):
        k_exact, v_exact = (t.clone() for t in exact.gather(layer, slots))
        k_roomy, v_roomy = roomy.gather(layer, slots)
        assert torch.equal(k_roomy, k_exact) and torch.equal(v_roomy, v_exact)
        assert torch.equal(k_roomy.transpose(0, 1), kv[0, layer])
    assert torch.equal(roomy.export("a", range(0, 2), range(0, 10)), kv)


def test_gather_does_not_scale_with_the_reserved_room():
    """Each head's row of the storage spans the reserved maximum, so the view in use is
    strided; reading through it copied the whole used pool every layer of every step (a
    worker's decode step took 30 % longer). Gathering 33 slots must cost about the same with
    room for 64 blocks as for 16,384."""
    import time

    def gather_us(max_blocks: int) -> float:
        cache = PagedKVCache(KVCacheSpec(16, 3, 64), range(0, 1), 4096, max_blocks=max_blocks)
        cache.reserve("a", 33)
        slots = cache.slots("a", torch.arange(33))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                cache.gather(0, slots)
            best = min(best, (time.perf_counter() - t0) / 20)
        return best * 1e6

    small, large = gather_us(4096), gather_us(16384)
    # the strided read copied 4096 blocks x 16 slots x 3 heads x 64 x 4 bytes = 50 MB per call
    assert large < 10 * small + 50, (small, large)


# ---- export / import ----------------------------------------------------------------------
def test_export_import_round_trip_across_block_sizes():
    layers = range(2, 5)
    src = make_cache(block_size=4, layers=layers, num_blocks=8)
    src.reserve("noise", 6)  # so the request's blocks do not start at 0
    kv = fill(src, "r", layers, 11, seed=1)
    exported = src.export("r", layers, range(0, 11))
    assert exported.shape == (2, 3, 11, N_KV_HEADS, HEAD_DIM)
    assert exported.is_contiguous()
    assert torch.equal(exported, kv)

    dst = make_cache(block_size=8, layers=layers, num_blocks=6)
    dst.reserve("resident", 9)
    dst.import_("moved", layers, range(0, 11), exported)
    assert len(dst.block_tables["moved"]) == 2
    assert torch.equal(dst.export("moved", layers, range(0, 11)), kv)
    assert torch.equal(dst.export("moved", range(3, 4), range(4, 9)), kv[:, 1:2, 4:9])


def test_import_of_a_token_range_leaves_earlier_positions_alone():
    layers = range(0, 2)
    src = make_cache(block_size=4, layers=layers)
    kv = fill(src, "r", layers, 12, seed=2)
    dst = make_cache(block_size=8, layers=layers)
    head = fill(dst, "r", layers, 5, seed=3)
    dst.import_("r", layers, range(5, 12), src.export("r", layers, range(5, 12)))
    got = dst.export("r", layers, range(0, 12))
    assert torch.equal(got[:, :, :5], head)
    assert torch.equal(got[:, :, 5:], kv[:, :, 5:])


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 10, N_KV_HEADS, HEAD_DIM),  # one token short
        (2, 2, 11, N_KV_HEADS, HEAD_DIM),  # one layer short
        (2, 3, 11, N_KV_HEADS + 1, HEAD_DIM),  # other head count
        (1, 3, 11, N_KV_HEADS, HEAD_DIM),  # K without V
    ],
)
def test_import_shape_mismatch_raises_and_reserves_nothing(shape):
    dst = make_cache(block_size=8, layers=range(2, 5))
    with pytest.raises(ValueError, match="does not match"):
        dst.import_("moved", range(2, 5), range(0, 11), torch.zeros(shape))
    assert "moved" not in dst.block_tables
    assert dst.num_free_blocks == dst.num_blocks


# ---- layers -------------------------------------------------------------------------------
def test_add_layer_and_drop_layer():
    cache = make_cache(block_size=4, layers=range(0, 2), num_blocks=3)
    cache.add_layer(5)
    assert sorted(cache.k) == sorted(cache.v) == [0, 1, 5]
    assert cache.k[5].shape == (N_KV_HEADS, 3 * 4, HEAD_DIM)
    assert cache.k[5].dtype == torch.float32
    # Slot 0 is read (masked) by padded decode gathers, so it must not hold garbage.
    assert torch.count_nonzero(cache.k[5][:, :4]) == 0 and torch.count_nonzero(cache.v[5][:, :4]) == 0

    kv = fill(cache, "a", range(5, 6), 6, seed=4)
    assert torch.equal(cache.export("a", range(5, 6), range(0, 6)), kv)

    before = cache.k[1].clone()
    cache.drop_layer(0)
    assert sorted(cache.k) == sorted(cache.v) == [1, 5]
    assert torch.equal(cache.k[1], before)  # other layers keep their storage
    with pytest.raises(KeyError):
        cache.export("a", range(0, 1), range(0, 6))


# ---- live resize --------------------------------------------------------------------------
def test_shrink_moves_only_blocks_past_the_end_and_keeps_every_request_intact():
    layers = range(0, 2)
    cache = PagedKVCache(KVCacheSpec(4, N_KV_HEADS, HEAD_DIM), layers, 8, max_blocks=16)
    kv = {rid: fill(cache, rid, layers, n, seed=i) for i, (rid, n) in enumerate([("a", 6), ("b", 9), ("c", 3)])}
    cache.free("a")  # blocks 0-1 free, b holds 2-4, c holds 5
    assert cache.block_tables == {"b": [2, 3, 4], "c": [5]}
    moved = cache.resize(4)
    assert moved == 2  # blocks 4 and 5 moved into the free 0 and 1; 2 and 3 stayed
    assert cache.num_blocks == 4 and cache.num_free_blocks == 0
    assert all(b < 4 for t in cache.block_tables.values() for b in t)
    assert cache.block_tables["b"][:2] == [2, 3]
    assert cache.k[0].shape == (N_KV_HEADS, 16, HEAD_DIM)
    for rid in ("b", "c"):
        n = kv[rid].shape[2]
        assert torch.equal(cache.export(rid, layers, range(0, n)), kv[rid])


def test_shrink_below_the_blocks_in_use_raises_and_changes_nothing():
    cache = PagedKVCache(KVCacheSpec(4, N_KV_HEADS, HEAD_DIM), range(0, 1), 8, max_blocks=8)
    kv = fill(cache, "a", range(0, 1), 12, seed=0)  # 3 blocks
    with pytest.raises(CacheFullError, match="3 are in use"):
        cache.resize(2)
    assert cache.num_blocks == 8 and cache.num_free_blocks == 5
    assert torch.equal(cache.export("a", range(0, 1), range(0, 12)), kv)


def test_grow_adds_free_blocks_up_to_the_reserved_maximum():
    cache = PagedKVCache(KVCacheSpec(4, N_KV_HEADS, HEAD_DIM), range(0, 1), 2, max_blocks=6)
    kv = fill(cache, "a", range(0, 1), 8, seed=0)
    assert cache.num_free_blocks == 0
    cache.resize(6)
    assert cache.num_free_blocks == 4 and cache.k[0].shape == (N_KV_HEADS, 24, HEAD_DIM)
    cache.reserve("b", 16)
    assert sorted(cache.block_tables["b"]) == [2, 3, 4, 5]
    assert torch.equal(cache.export("a", range(0, 1), range(0, 8)), kv)
    with pytest.raises(ValueError, match="grow to 6 blocks"):
        cache.resize(7)


def test_shrinking_hands_the_pool_memory_back_to_the_os():
    from agent.process_memory import memory_breakdown

    spec = KVCacheSpec(16, 4, 64)  # 8 KiB per block per layer (K and V)
    cache = PagedKVCache(spec, range(0, 4), 4096, max_blocks=4096)  # 128 MiB of pool
    before = memory_breakdown()["rss_bytes"]
    for layer in range(4):  # touch every page
        cache.k[layer].fill_(1.0)
        cache.v[layer].fill_(1.0)
    touched = memory_breakdown()["rss_bytes"]
    assert touched - before > 100 << 20
    cache.resize(16)
    released = memory_breakdown()["rss_bytes"]
    assert touched - released > 100 << 20
    cache.resize(4096)  # growing back costs nothing until written
    assert memory_breakdown()["rss_bytes"] - released < 8 << 20


# ---- fork (n > 1: members share the prompt's blocks) ----------------------------------------
def test_fork_shares_full_blocks_copies_the_partial_one_and_frees_by_reference():
    cache = make_cache(block_size=4, num_blocks=8)
    kv = fill(cache, "lead", range(0, 3), 10, seed=1)  # blocks: 4 + 4 + 2 positions
    cache.fork("lead", "member", 10)
    lead, member = cache.block_tables["lead"], cache.block_tables["member"]
    assert member[:2] == lead[:2] and member[2] != lead[2]
    assert cache.num_used_blocks == 4 and cache.shared_blocks() == 2
    assert torch.equal(cache.export("member", range(0, 3), range(0, 10)), kv)
    # Each writes its own next position without touching the other's.
    cache.reserve("member", 11)
    slot = cache.slots("member", torch.tensor([10]))
    cache.write(0, slot, torch.ones(1, N_KV_HEADS, HEAD_DIM), torch.ones(1, N_KV_HEADS, HEAD_DIM))
    assert torch.equal(cache.export("lead", range(0, 3), range(0, 10)), kv)
    assert cache.free("lead") == 1  # only its partial block: the full ones are the member's too
    assert cache.shared_blocks() == 0
    assert torch.equal(cache.export("member", range(0, 3), range(0, 10)), kv)
    assert cache.free("member") == 3 and cache.num_free_blocks == 8


def test_shrinking_moves_a_shared_block_once_for_every_holder():
    cache = make_cache(block_size=4, num_blocks=8)
    cache.reserve("pad", 16)  # blocks 0-3, so the prompt lands at 4 and up
    kv = fill(cache, "lead", range(0, 3), 8, seed=2)
    cache.fork("lead", "a", 8)
    cache.fork("lead", "b", 8)
    assert cache.num_used_blocks == 6
    cache.free("pad")
    cache.resize(4)
    tables = [cache.block_tables[r] for r in ("lead", "a", "b")]
    assert tables[0] == tables[1] == tables[2] and max(tables[0]) < 4
    for rid in ("lead", "a", "b"):
        assert torch.equal(cache.export(rid, range(0, 3), range(0, 8)), kv)
    assert [cache.free(r) for r in ("lead", "a", "b")] == [0, 0, 2]
