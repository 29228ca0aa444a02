"""The paged KV cache's bookkeeping: which blocks are free, which requests hold which, and (prefix caching)
which full blocks hold which tokens, so that a request whose prompt starts as an earlier one's did reads their
K/V instead of computing them again.

A request holding blocks also holds a row of the ranks' device block tables (`table_row`), from admission until
its blocks are released; the plans send each row's new entries only (`blocks_sent`, runner/block_tables.py).

A full block is known by its key: the hash of the block before it and its own token ids, a chain that pins
every token from the start. A block is shared by reference count; one that no request holds any more but that
has a key stays cached, in least-recently-freed order, until its memory is needed (num_free counts it free).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from chitu.engine.request import Request

BlockKey = tuple[int, tuple[int, ...]]  # (the previous block's hash, or the salt; this block's token ids)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, salt: int = 0):
        self.num_blocks = num_blocks
        self.free_rows: list[int] = []  # table rows given back, reused first
        self.num_rows = 0  # rows ever handed out: at most the requests holding blocks at once
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.salt = salt
        self.free_blocks: deque[int] = deque(range(num_blocks))  # holding nothing anyone may look up
        self.ref_counts = [0] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self.key_of: dict[int, BlockKey] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, first freed first
        self.query_tokens = 0  # prompt tokens looked up at admission, and those found cached
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def blocks_missing(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` still needs to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(request.block_table))

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_missing(request, num_tokens) <= self.num_free

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give `request` enough blocks for `num_tokens` tokens (caller checked can_hold)."""
        for _ in range(self.blocks_missing(request, num_tokens)):
            request.block_table.append(self._take_free())

    def release(self, request: Request) -> None:
        # Last blocks first: they are the first evicted, the prefix others share the last.
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        request.block_table = []
        request.num_computed_tokens = 0
        request.num_cached_blocks = 0
        if request.table_row >= 0:
            self.free_rows.append(request.table_row)
        request.table_row, request.blocks_sent = -1, 0

    def cached_prefix(self, request: Request) -> list[int]:
        """For a request holding no blocks, the cached blocks that hold its first tokens. At least its last token
        is left to compute (its logits are needed): a prompt of whole blocks reuses all but its last block."""
        if not self.prefix_caching or request.block_table:
            return []
        blocks = []
        for key in self._keys(request, (request.num_tokens - 1) // self.block_size):
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, request: Request, prefix: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether the request, reusing `prefix` (cached_prefix), can hold `num_tokens` tokens and leave `reserve`
        blocks free: the prefix's blocks nobody holds are no longer free once it takes them."""
        taken_free = sum(self.ref_counts[block] == 0 for block in prefix)
        return blocks_for(num_tokens, self.block_size) - len(prefix) + reserve <= self.num_free - taken_free

    def take_prefix(self, request: Request, prefix: list[int]) -> None:
        """The request holds `prefix` (cached_prefix), its tokens computed; counted as a lookup and its hits."""
        for block in prefix:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        request.block_table = list(prefix)
        request.table_row = self._take_row()
        request.num_cached_blocks = len(prefix)
        request.num_computed_tokens = len(prefix) * self.block_size
        if self.prefix_caching:
            self.query_tokens += request.num_tokens
            self.hit_tokens += request.num_computed_tokens

    def cache_computed(self, request: Request, num_tokens: int) -> None:
        """Offer the request's blocks filled by its first `num_tokens` tokens (their K/V written) for reuse."""
        if not self.prefix_caching:
            return
        full = min(num_tokens // self.block_size, len(request.block_table))
        keys = self._keys(request, full)
        for index in range(request.num_cached_blocks, full):
            block, key = request.block_table[index], keys[index]
            if key not in self.cached and block not in self.key_of:  # else another request computed it too
                self.cached[key], self.key_of[block] = block, key
        request.num_cached_blocks = max(request.num_cached_blocks, full)

    def _keys(self, request: Request, count: int) -> list[BlockKey]:
        """The keys of the request's first `count` blocks (made once per request; tokens never change)."""
        keys = request.block_keys
        while len(keys) < count:
            start = len(keys) * self.block_size
            previous = hash(keys[-1]) if keys else self.salt
            keys.append((previous, tuple(request.token_ids(start, start + self.block_size))))
        return keys

    def _take_row(self) -> int:
        if self.free_rows:
            return self.free_rows.pop()
        self.num_rows += 1
        return self.num_rows - 1

    def _take_free(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # the cached block freed longest ago
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        self.ref_counts[block] = 1
        return block
