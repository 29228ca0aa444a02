"""Every rank's block tables on its device, one row per request holding KV blocks (its `table_row`), of width
max_seq_len / block_size. A plan carries only the entries rows gained since the last plan; a step gathers its
rows there, so its host work and copies grow with its batch, not with max_seq_len."""
from __future__ import annotations

import torch

from chitu.ops.device_copy import to_device


class BlockTables:
    def __init__(self, num_rows: int, width: int, device: torch.device, scratch_block: int | None = None):
        """`scratch_block`: one more row, all of that block, for the padding rows of CUDA-graph batches."""
        self.num_rows, self.width, self.device = num_rows, width, device
        self.table = torch.zeros(num_rows + (scratch_block is not None), width, dtype=torch.int64, device=device)
        self.scratch_row = num_rows if scratch_block is not None else None
        if scratch_block is not None:
            self.table[num_rows] = scratch_block

    def apply(self, updates: list[tuple[int, int, list[int]]]) -> None:
        """Write (row, first index, block ids) entries, in one copy and one scatter (enqueued: a step reading them
        is enqueued after, one in flight reading the row's old owner before)."""
        if not updates:
            return
        for row, start, blocks in updates:
            if not 0 <= row < self.num_rows or start + len(blocks) > self.width:
                raise ValueError(f"block table update ({row}, {start}, {len(blocks)} blocks) is outside the "
                                 f"{self.table.shape[0]} x {self.width} tables")
        index = [row * self.width + start + i for row, start, blocks in updates for i in range(len(blocks))]
        values = [block for _, _, blocks in updates for block in blocks]
        packed = to_device(index + values, torch.int64, self.device)
        self.table.view(-1).index_copy_(0, packed[: len(index)], packed[len(index):])

    def rows(self, rows: list[int], num_blocks: int) -> torch.Tensor:
        """[len(rows), num_blocks]: the first `num_blocks` entries of those rows (a copy, gathered on the device)."""
        return self.table[to_device(rows, torch.int64, self.device), :num_blocks]
