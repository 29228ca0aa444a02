"""CUDA graphs of a lone sequence's prefill step: a chunk of a prompt, or the uncached end of a prompt whose prefix
the cache holds. Eagerly such a step of a few dozen tokens is bound by the host's few hundred launches, not by the
GPU; replayed from a graph it takes the GPU's time. One graph per token bucket up to `max_tokens`; a step is padded
to its bucket by a second sequence in the block tables' scratch row (ops.attention_metadata.padded_prefill)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from chitu.ops.attention_metadata import padded_prefill
from chitu.runner.block_tables import BlockTables
from chitu.runner.cuda_graph import capture_graphs

logger = logging.getLogger(__name__)

BUCKETS = (16, 32, 64, 128, 256)


class PrefillGraphs:
    def __init__(self, model: nn.Module, max_tokens: int, tables: BlockTables, block_size: int,
                 device: torch.device, pool=None):
        """`tables` must keep its tensor (the graphs read it) and have a scratch row; `pool`: a graph memory pool to
        share (the decode graphs')."""
        self.model, self.tables, self.block_size = model, tables, block_size
        self.buckets = [b for b in BUCKETS if b <= max_tokens]
        largest = self.buckets[-1] if self.buckets else 0
        # token ids, then [num_new, context_len, row]: filled on the host (pinned, two taking turns as the decode
        # graphs' do) and copied over in one go
        self.host_buffers = [torch.zeros(largest + 3, dtype=torch.int64).pin_memory() for _ in range(2)]
        self.turn = 0
        self.device_inputs = torch.zeros(largest + 3, dtype=torch.int64, device=device)
        self.token_ids, self.request = self.device_inputs[:largest], self.device_inputs[largest:]
        self.counting = torch.arange(largest + 1, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all(pool)

    def _forward(self, bucket: int) -> torch.Tensor:
        """Logits [1, vocab] of the sequence's last new token."""
        meta = padded_prefill(bucket, self.request, self.tables.table, self.tables.scratch_row, self.block_size,
                              self.counting)
        hidden = self.model(self.token_ids[:bucket], meta)
        return self.model.compute_logits(hidden.index_select(0, self.request[0:1] - 1))

    @torch.inference_mode()
    def _capture_all(self, pool) -> None:
        # a placeholder request: one token at position 0 of the scratch row
        self.device_inputs[-3:] = torch.tensor([1, 1, self.tables.scratch_row])
        capture_graphs(self._forward, self.buckets, self.graphs, self.logits, pool)
        logger.info("captured prefill CUDA graphs for %s tokens", self.buckets)

    def bucket_for(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    @torch.inference_mode()
    def run(self, token_ids: list[int], context_len: int, row: int) -> torch.Tensor:
        """Logits [1, vocab] after the sequence in table row `row` takes `token_ids`, the last of its `context_len`
        tokens (its earlier ones already in the cache)."""
        num_new = len(token_ids)
        bucket = self.bucket_for(num_new)
        host = self.host_buffers[self.turn]
        self.turn ^= 1
        host[:num_new] = torch.tensor(token_ids)
        host[num_new:bucket] = 0
        host[-3:] = torch.tensor([num_new, context_len, row])
        self.device_inputs.copy_(host, non_blocking=True)
        self.graphs[bucket].replay()
        return self.logits[bucket]
