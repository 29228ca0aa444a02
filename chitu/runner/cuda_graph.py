"""CUDA graphs of the decode step: one per batch-size bucket up to infer.max_reqs, replayed over
static input buffers. A batch is padded up to its bucket; padded rows read and write only a scratch
KV block that no request owns, so they cannot disturb real sequences."""
from __future__ import annotations

import logging

import torch
from torch import nn

from chitu.ops.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capturable(model: nn.Module) -> bool:
    """Whether the model's decode step can be captured: no module of it declares `capturable = False`
    (an MoE block on the torch reference reads its expert counts on the host)."""
    return all(getattr(m, "capturable", True) for m in model.modules())


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
        # All integer inputs live in one buffer, filled on the host (pinned) and copied over in one go.
        # Two host buffers take turns: a step may be prepared while the previous one's copy is pending.
        size = 4 * max_batch + max_batch * max_blocks_per_seq
        self.host_buffers = [torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2)]
        self.hosts = [self._views(b, max_batch, max_blocks_per_seq) for b in self.host_buffers]
        self.turn = 0
        self.device_inputs = torch.zeros(size, dtype=torch.int64, device=device)
        token_ids, positions, slots, context_lens, tables = self._views(self.device_inputs, max_batch, max_blocks_per_seq)
        self.token_ids = token_ids
        self.meta = AttentionMetadata(
            positions=positions, slot_mapping=slots, block_tables=tables, context_lens=context_lens,
            query_start_loc=torch.arange(max_batch + 1, device=device), token_seq_index=torch.arange(max_batch, device=device),
            token_query_index=torch.zeros(max_batch, dtype=torch.int64, device=device),
            max_query_len=1, max_context_len=max_blocks_per_seq * block_size,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    @staticmethod
    def _views(buffer: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, ...]:
        """token ids, positions, slots, context lengths [rows] and block tables [rows, width]."""
        vectors = buffer[: 4 * rows].view(4, rows)
        return (*vectors.unbind(0), buffer[4 * rows:].view(rows, width))

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
        self._pad_rows(self.hosts[0], 0, len(self.hosts[0][0]))
        self.device_inputs.copy_(self.host_buffers[0])
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

    def _pad_rows(self, host: tuple[torch.Tensor, ...], start: int, end: int) -> None:
        """Host rows [start, end): one token at position 0 of the scratch block."""
        token_ids, positions, slots, context_lens, tables = host
        token_ids[start:end] = 0
        positions[start:end] = 0
        slots[start:end] = self.scratch_block * self.block_size
        context_lens[start:end] = 1
        tables[start:end] = self.scratch_block

    @torch.inference_mode()
    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step: each sequence's newest token (host ids, or the
        previous step's sampled ids on the device) at `positions`."""
        batch = len(token_ids)
        bs = self.bucket_for(batch)
        buffer, host = self.host_buffers[self.turn], self.hosts[self.turn]
        self.turn ^= 1
        host_tokens, host_positions, host_slots, host_context_lens, host_tables = host
        width = host_tables.shape[1]
        if not isinstance(token_ids, torch.Tensor):
            host_tokens[:batch] = torch.tensor(token_ids)
        pos = torch.tensor(positions)
        host_positions[:batch] = pos
        host_context_lens[:batch] = pos + 1
        host_tables[:batch] = torch.tensor([t + [self.scratch_block] * (width - len(t)) for t in block_tables])
        block_of_pos = host_tables[:batch].gather(1, (pos // self.block_size)[:, None]).squeeze(1)
        host_slots[:batch] = block_of_pos * self.block_size + pos % self.block_size
        self._pad_rows(host, batch, bs)
        # This buffer's previous copy (two steps ago) has finished: the engine has read that step's tokens.
        self.device_inputs.copy_(buffer, non_blocking=True)
        if isinstance(token_ids, torch.Tensor):
            self.token_ids[:batch].copy_(token_ids)
        self.graphs[bs].replay()
        return self.logits[bs][:batch]
