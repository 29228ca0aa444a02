"""CUDA graphs of the decode step: one per batch-size bucket up to infer.max_reqs, replayed over
static input buffers. A batch is padded up to its bucket; padded rows read and write only a scratch
KV block that no request owns, so they cannot disturb real sequences."""
from __future__ import annotations

import logging

import torch
from torch import nn

from chitu.ops.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(max_batch)

        def ints(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.token_ids = ints(max_batch)
        self.meta = AttentionMetadata(
            positions=ints(max_batch), slot_mapping=ints(max_batch),
            block_tables=ints(max_batch, max_blocks_per_seq), context_lens=ints(max_batch),
            query_start_loc=torch.arange(max_batch + 1, device=device), token_seq_index=torch.arange(max_batch, device=device),
            token_query_index=ints(max_batch), max_query_len=1, max_context_len=max_blocks_per_seq * block_size,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _meta_view(self, bs: int) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(
            positions=m.positions[:bs], slot_mapping=m.slot_mapping[:bs], block_tables=m.block_tables[:bs],
            context_lens=m.context_lens[:bs], query_start_loc=m.query_start_loc[:bs + 1],
            token_seq_index=m.token_seq_index[:bs], token_query_index=m.token_query_index[:bs],
            max_query_len=1, max_context_len=m.max_context_len,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(self.token_ids[:bs], self._meta_view(bs)))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._fill_padding(0)
        pool = None
        for bs in reversed(self.buckets):  # largest first, so the smaller graphs reuse its memory pool
            self._forward(bs)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _fill_padding(self, start: int) -> None:
        """Rows from `start` on: one token at position 0 of the scratch block."""
        scratch = self.scratch_block
        self.token_ids[start:] = 0
        self.meta.positions[start:] = 0
        self.meta.slot_mapping[start:] = scratch * self.block_size
        self.meta.block_tables[start:] = scratch
        self.meta.context_lens[start:] = 1

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step: each sequence's newest token at `positions`."""
        batch = len(token_ids)
        bs = self.bucket_for(batch)
        width = self.meta.block_tables.shape[1]
        tables = torch.tensor([t + [self.scratch_block] * (width - len(t)) for t in block_tables])
        pos = torch.tensor(positions)
        slots = tables.gather(1, (pos // self.block_size)[:, None]).squeeze(1) * self.block_size + pos % self.block_size
        self.token_ids[:batch].copy_(torch.tensor(token_ids), non_blocking=True)
        self.meta.positions[:batch].copy_(pos, non_blocking=True)
        self.meta.context_lens[:batch].copy_(pos + 1, non_blocking=True)
        self.meta.slot_mapping[:batch].copy_(slots, non_blocking=True)
        self.meta.block_tables[:batch].copy_(tables, non_blocking=True)
        self._fill_padding(batch)
        self.graphs[bs].replay()
        return self.logits[bs][:batch]
