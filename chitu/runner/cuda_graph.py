"""CUDA graphs of the decode step: one per batch-size bucket up to infer.max_reqs, replayed over
static input buffers. A batch is padded up to its bucket; padded rows read and write only a scratch
KV block that no request owns (the block tables' scratch row), so they cannot disturb real sequences."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from chitu.layers.moe import host_experts
from chitu.ops.attention_metadata import AttentionMetadata, slot_mapping
from chitu.runner.block_tables import BlockTables

logger = logging.getLogger(__name__)


def capturable(model: nn.Module) -> bool:
    """Whether the model's decode step can be captured: no module of it declares `capturable = False`
    (an MoE block on the torch reference reads its expert counts on the host)."""
    return all(getattr(m, "capturable", True) for m in model.modules())


def capture_graphs(forward: Callable[[int], torch.Tensor], sizes: list[int], graphs: dict[int, torch.cuda.CUDAGraph],
                   outputs: dict[int, torch.Tensor], pool=None):
    """A graph of forward(size) for each size into `graphs`, its output tensor into `outputs`; largest first, so that
    the smaller ones reuse its memory pool (and `pool`'s, when given). Returns the pool."""
    for size in sorted(sizes, reverse=True):
        with host_experts.for_capture():
            forward(size)  # warm-up: compiles kernels (and stages host experts' buffers) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    return pool


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch: int, tables: BlockTables, block_size: int, device: torch.device):
        """`tables` must keep its tensor (the graphs read it) and have a scratch row for the padding rows."""
        self.model = model
        self.block_size = block_size
        self.tables = tables
        self.buckets = batch_buckets(max_batch)
        # The inputs (token ids, positions, context lengths, table rows) live in one buffer, filled on the host
        # (pinned) and copied over in one go. Two host buffers take turns: a step may be prepared while the
        # previous one's copy is pending.
        self.host_buffers = [torch.zeros(4, max_batch, dtype=torch.int64).pin_memory() for _ in range(2)]
        self.turn = 0
        self.device_inputs = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        self.token_ids, self.positions, self.context_lens, self.rows = self.device_inputs.unbind(0)
        self.counting = torch.arange(max_batch + 1, device=device)  # sequence indices and query starts
        self.zeros = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, bs: int) -> torch.Tensor:
        """The decode step of `bs` rows, its block tables gathered from the persistent ones inside the graph."""
        tables = self.tables.table[self.rows[:bs]]
        positions = self.positions[:bs]
        meta = AttentionMetadata(
            positions=positions, slot_mapping=slot_mapping(tables, self.counting[:bs], positions, self.block_size),
            block_tables=tables, context_lens=self.context_lens[:bs], query_start_loc=self.counting[:bs + 1],
            token_seq_index=self.counting[:bs], token_query_index=self.zeros[:bs],
            max_query_len=1, max_context_len=self.tables.width * self.block_size,
        )
        return self.model.compute_logits(self.model(self.token_ids[:bs], meta))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._pad_rows(self.host_buffers[0], 0, self.host_buffers[0].shape[1])
        self.device_inputs.copy_(self.host_buffers[0])
        self.pool = capture_graphs(self._forward, self.buckets, self.graphs, self.logits)  # the prefill graphs share it
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _pad_rows(self, host: torch.Tensor, start: int, end: int) -> None:
        """Host rows [start, end): one token at position 0 of the scratch row's block."""
        host[:, start:end] = torch.tensor([0, 0, 1, self.tables.scratch_row])[:, None]

    @torch.inference_mode()
    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], rows: list[int]) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step: each sequence's newest token (host ids, or the
        previous step's sampled ids on the device) at `positions`, its blocks in table row `rows`."""
        batch = len(rows)
        bs = self.bucket_for(batch)
        host = self.host_buffers[self.turn]
        self.turn ^= 1
        if not isinstance(token_ids, torch.Tensor):
            host[0, :batch] = torch.tensor(token_ids)
        pos = torch.tensor(positions)
        host[1, :batch] = pos
        host[2, :batch] = pos + 1
        host[3, :batch] = torch.tensor(rows)
        self._pad_rows(host, batch, bs)
        # This buffer's previous copy (two steps ago) has finished: the engine has read that step's tokens.
        self.device_inputs.copy_(host, non_blocking=True)
        if isinstance(token_ids, torch.Tensor):
            self.token_ids[:batch].copy_(token_ids)
        self.graphs[bs].replay()
        return self.logits[bs][:batch]
