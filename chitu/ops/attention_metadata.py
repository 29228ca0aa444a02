"""What attention needs to know about one step's batch, built once per step by the runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu.ops.device_copy import to_device


@dataclass
class AttentionMetadata:
    """Tokens of a step are flat: sequence b owns rows query_start_loc[b]:query_start_loc[b+1]."""

    positions: torch.Tensor         # [T] int64: position of each new token in its sequence
    slot_mapping: torch.Tensor      # [T] int64: KV-cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor      # [B, max_blocks] int64 (padding entries point at block 0)
    context_lens: torch.Tensor      # [B] int64: tokens in the cache once this step's tokens are stored
    query_start_loc: torch.Tensor   # [B + 1] int64
    token_seq_index: torch.Tensor   # [T] int64: the sequence each token belongs to
    token_query_index: torch.Tensor  # [T] int64: the token's row inside its sequence's query
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]] | torch.Tensor,
        block_size: int,
        device: torch.device | str,
    ) -> "AttentionMetadata":
        """Metadata for sequences whose last query_lens[b] of context_lens[b] tokens are new. `block_tables`: host
        lists, or the sequences' rows already on the device [B, width] (the runner's persistent tables)."""
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        ctx_lens = torch.tensor(context_lens, dtype=torch.int64)
        starts = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=starts[1:])
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        query_index = torch.arange(int(starts[-1])) - starts[seq_index]
        positions = (ctx_lens - q_lens)[seq_index] + query_index
        host = [positions, ctx_lens, starts, seq_index, query_index]
        if not isinstance(block_tables, torch.Tensor):
            width = max(len(t) for t in block_tables)
            host.append(torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64).flatten())
        # One copy for all of it, so that building a step never waits for the device.
        packed = to_device(torch.cat(host), torch.int64, device)
        positions, ctx_lens, starts, seq_index, query_index, *tables = packed.split([len(t) for t in host])
        tables = block_tables if isinstance(block_tables, torch.Tensor) else tables[0].view(len(query_lens), -1)
        return cls(
            positions=positions,
            slot_mapping=slot_mapping(tables, seq_index, positions, block_size),
            block_tables=tables,
            context_lens=ctx_lens,
            query_start_loc=starts,
            token_seq_index=seq_index,
            token_query_index=query_index,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
        )


def slot_mapping(block_tables: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """KV-cache slot of each token: sequence seq_index[t]'s block holding position positions[t], and the offset."""
    return block_tables[seq_index, positions // block_size] * block_size + positions % block_size


def padded_prefill(bucket: int, request: torch.Tensor, tables: torch.Tensor, scratch_row: int, block_size: int,
                   counting: torch.Tensor) -> AttentionMetadata:
    """One sequence's step of `num_new` tokens, the last of its `context_len`, from its block-table row `row`
    (request = device [num_new, context_len, row]), padded to `bucket` rows by a second sequence: the remaining rows,
    at positions 0.. of the scratch row, whose blocks are all the scratch block. Every shape is the bucket's and
    every value read on the device, so a CUDA graph of this step serves any such request of up to `bucket`
    tokens; the padding rows' keys and values go to the scratch block, and real rows never see them.
    `counting`: arange of at least bucket + 1 on the device."""
    num_new, context_len, row = request[0:1], request[1:2], request[2:3]
    rows = counting[:bucket]
    seq_index = (rows >= num_new).long()
    query_index = rows - num_new * seq_index
    positions = torch.where(seq_index.bool(), query_index, context_len - num_new + rows)
    block_tables = tables[torch.cat([row, torch.full_like(row, scratch_row)])]
    return AttentionMetadata(
        positions=positions, slot_mapping=slot_mapping(block_tables, seq_index, positions, block_size),
        block_tables=block_tables, context_lens=torch.cat([context_len, bucket - num_new]),
        query_start_loc=torch.cat([counting[:1], num_new, counting[bucket:bucket + 1]]),
        token_seq_index=seq_index, token_query_index=query_index,
        max_query_len=bucket, max_context_len=tables.shape[1] * block_size,
    )
