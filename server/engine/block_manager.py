"""BlockManager: which KV-cache blocks each sequence owns, in plain Python (no tensors).

Blocks are reference counted: a full block can be shared by several sequences (the n candidates of
one prompt, or requests repeating a cached prefix). Prefix caching keys every full block by a hash
chain, hash(parent_hash, block token ids), so a block is reused only when the whole prefix before it
matches too. Blocks whose count drops to zero keep their hash and stay reusable until evicted
(least recently freed first) by an allocation that finds no never-used block.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from prefloop.server.errors import ResourceExhausted


def block_hash(parent: object, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


@dataclass(slots=True)
class ShiftPlan:
    """Slot-level work for one shift, made by `BlockManager.shift` (plain Python, no tensors).

    `copy_*`: slots copied unchanged (K and V): the kept head of a shared boundary block.
    `move_*`: slots whose key is re-rotated by -delta while it moves from src to dst (often the same
    slot: in place); the value is copied where src != dst.
    """
    delta: int
    copy_src: list[int]
    copy_dst: list[int]
    move_src: list[int]
    move_dst: list[int]


@dataclass(slots=True)
class BlockStats:
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose prefill was skipped


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    ref_counts: list[int] = field(init=False)
    stats: BlockStats = field(default_factory=BlockStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.ref_counts = [0] * self.num_blocks
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # never hashed
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed, ref 0, oldest first
        self.hash_of_block: dict[int, int] = {}
        self.block_of_hash: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the runner

    # -- capacity ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (never-used plus evictable cached ones)."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ----------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of_hash[self.hash_of_block.pop(block)]
        else:
            raise ResourceExhausted("KV cache is full")
        self.ref_counts[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def match_prefix(self, token_ids: list[int], root: object = None) -> tuple[list[int], list[int]]:
        """Cached full blocks for the longest matching prefix and the hash chain of those blocks.

        At least one token is left uncached so the model produces logits for the next token.
        `root` starts the hash chain: None for the base model, the sequence's adapter otherwise
        (its K/V differ from the base's for the same tokens).
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        blocks, hashes, parent = [], [], root
        for i in range((len(token_ids) - 1) // bs):
            h = block_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            block = self.block_of_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def record_prefix_lookup(self, num_tokens: int, hit_tokens: int) -> None:
        self.stats.prefix_cache_queries += num_tokens
        self.stats.prefix_cache_hit_tokens += hit_tokens

    def acquire_prefix(self, blocks: list[int]) -> None:
        for block in blocks:
            self._share(block)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table to hold num_tokens; False (and no change) if blocks are short."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        block_table.extend(self._take() for _ in range(need))
        return True

    def free(self, block_table: list[int]) -> None:
        """Release a sequence's blocks (last first, so a prefix's tail is evicted before its head)."""
        for block in reversed(block_table):
            self._release(block)
        block_table.clear()

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, "block freed twice"
        if self.ref_counts[block] == 0:
            if block in self.hash_of_block:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    def fork(self, block_table: list[int], num_tokens: int) -> list[int]:
        """A child's table sharing the parent's full blocks; a partial last block is copied."""
        full = num_tokens // self.block_size
        child = list(block_table[:full])
        for block in child:
            self._share(block)
        if full < len(block_table) and num_tokens % self.block_size:
            dst = self._take()
            self.pending_copies.append((block_table[full], dst))
            child.append(dst)
        return child

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- prefix cache registration -------------------------------------------------------------
    def register_full_blocks(self, block_table: list[int], block_hashes: list[int],
                             token_ids: list[int], num_computed: int, root: object = None) -> None:
        """Hash every block whose tokens are all computed; extends block_hashes in place."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(block_table))
        parent = block_hashes[-1] if block_hashes else root
        for i in range(len(block_hashes), full):
            h = block_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            block_hashes.append(h)
            parent = h
            block = block_table[i]
            if h not in self.block_of_hash and block not in self.hash_of_block:
                self.block_of_hash[h] = block
                self.hash_of_block[block] = h

    # -- context shift (server/engine/context.py) -----------------------------------------------
    def _unregister(self, block: int) -> None:
        """Drop a block from the prefix-cache index: its content is about to change."""
        h = self.hash_of_block.pop(block, None)
        if h is not None and self.block_of_hash.get(h) == block:
            del self.block_of_hash[h]

    def shift(self, block_table: list[int], num_tokens: int, keep: int, discard: int) -> ShiftPlan | None:
        """Drop cached tokens [keep, keep + discard) of a sequence and close the gap.

        `discard` is a whole number of blocks, so every token after the span keeps its offset in a
        block and only whole blocks leave the table; when `keep` is not block-aligned, its last
        block is merged with the block the span ends in (one partial copy). Blocks whose content
        changes are made exclusive first (copy-on-write: blocks shared with other sequences are never
        written) and leave the prefix-cache index. Dropped blocks are released (hashed ones stay
        reusable: their content is untouched). Returns the slot work for the runner, or None (and
        no change) when copy-on-write needs more free blocks than there are.
        """
        bs = self.block_size
        assert discard > 0 and discard % bs == 0, "discard must be whole blocks"
        assert 0 <= keep and keep + discard < num_tokens <= len(block_table) * bs
        kb, r = divmod(keep, bs)
        k = discard // bs
        used = self.blocks_needed(num_tokens)
        boundary = block_table[kb] if r else None
        source = block_table[kb + k] if r else None  # its offsets >= r move into the boundary block
        first_moved = kb + k + 1 if r else kb + k
        dropped = block_table[kb + 1 if r else kb:kb + k]
        moved = list(range(first_moved, used))  # table indices whose tokens are re-rotated
        need = sum(self.ref_counts[block_table[i]] > 1 for i in moved)
        need += bool(r) and self.ref_counts[boundary] > 1
        if need > self.num_free + sum(self.ref_counts[b] == 1 for b in dropped):
            return None
        plan = ShiftPlan(discard, [], [], [], [])
        for block in dropped:  # nothing is read from these: release them first
            self._release(block)

        def exclusive(block: int) -> int:
            if self.ref_counts[block] > 1:  # shared: write a private copy instead
                self.ref_counts[block] -= 1
                return self._take()
            self._unregister(block)
            return block

        def move(src_block: int, dst_block: int, offsets: range) -> None:
            plan.move_src.extend(src_block * bs + j for j in offsets)
            plan.move_dst.extend(dst_block * bs + j for j in offsets)

        new_table = list(block_table[:kb])
        if r:
            dst = exclusive(boundary)
            if dst != boundary:
                plan.copy_src.extend(boundary * bs + j for j in range(r))
                plan.copy_dst.extend(dst * bs + j for j in range(r))
            move(source, dst, range(r, min(bs, num_tokens - (kb + k) * bs)))
            new_table.append(dst)
        for i in moved:
            src = block_table[i]
            dst = exclusive(src)
            move(src, dst, range(min(bs, num_tokens - i * bs)))
            new_table.append(dst)
        if r:
            self._release(source)  # read above; released last so no copy lands on it first
        new_table.extend(block_table[used:])  # blocks grown ahead of the cached tokens, if any
        block_table[:] = new_table
        return plan
