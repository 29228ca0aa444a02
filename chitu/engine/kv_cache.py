"""The paged KV cache's bookkeeping: which blocks are free and which request owns which."""
from __future__ import annotations

from collections import deque

from chitu.engine.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

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
            request.block_table.append(self.free_blocks.popleft())

    def release(self, request: Request) -> None:
        self.free_blocks.extend(request.block_table)
        request.block_table = []
        request.num_computed_tokens = 0
