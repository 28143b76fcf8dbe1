"""BlockManager: reference counts, prefix hash chain, eviction, fork copy-on-write."""
from prefloop.server.engine.block_manager import BlockManager


def test_grow_free_and_refcounts():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = []
    assert bm.grow(table, 9) and len(table) == 3
    assert not bm.grow(table, 20)  # needs 5 blocks: refused, table unchanged
    assert len(table) == 3 and bm.num_free == 1
    bm.free(table)
    assert table == [] and bm.num_free == 4


def test_prefix_chain_requires_whole_prefix_and_leaves_one_token():
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    table, hashes = [], []
    bm.grow(table, 6)
    bm.register_full_blocks(table, hashes, tokens, 6)
    blocks, _ = bm.match_prefix([1, 2, 3, 4, 5, 6])
    assert blocks == table[:2]  # the last block is never matched: one token must be computed
    blocks, _ = bm.match_prefix([9, 9, 3, 4, 5, 6, 7])
    assert blocks == []  # same block tokens, different parent: no hit
    bm.free(table)
    assert bm.num_free == 8  # cached blocks stay reusable but count as free
    blocks, _ = bm.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert len(blocks) == 3


def test_eviction_drops_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    table, hashes = [], []
    bm.grow(table, 4)
    bm.register_full_blocks(table, hashes, [1, 2, 3, 4], 4)
    bm.free(table)
    other = []
    assert bm.grow(other, 4)  # evicts both cached blocks
    assert bm.match_prefix([1, 2, 3, 4, 5])[0] == []


def test_fork_shares_full_blocks_and_copies_partial():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = []
    bm.grow(parent, 10)  # 2 full blocks + 2 tokens in the third
    child = bm.fork(parent, 10)
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert bm.ref_counts[parent[0]] == 2 and bm.ref_counts[parent[2]] == 1
    assert bm.take_pending_copies() == [(parent[2], child[2])]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free == 8
