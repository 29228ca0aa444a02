"""Turns a scheduled Batch into tensors, runs the model over the paged KV cache and samples."""
from __future__ import annotations

import torch
from torch import nn

from chitu.engine.scheduler import Batch
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.runner.cuda_graph import DecodeGraphs
from chitu.runner.sampler import RowParams, Sampler, SamplerOutput, SamplingBatch


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int,
                 max_batch: int = 0, max_seq_len: int = 0, use_cuda_graph: bool = False):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.use_cuda_graph = use_cuda_graph
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * element for a in self.model.attention_layers())

    def _allocate_pages(self, num_blocks: int) -> None:
        for attention in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attention.num_kv_heads, attention.head_dim)
            # zeros, not empty: masked-out slots are multiplied by zero weights, and 0 * NaN would leak
            attention.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attention.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Blocks 0..num_blocks-1 belong to the block manager; with CUDA graphs one more is the padding rows' scratch."""
        self._allocate_pages(num_blocks + (1 if self.use_cuda_graph else 0))
        if self.use_cuda_graph:
            max_blocks_per_seq = -(-self.max_seq_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.max_batch, max_blocks_per_seq, self.block_size,
                                       scratch_block=num_blocks, device=self.device)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], SamplerOutput | None]:
        """Compute the batch; returns the indices of requests that sampled, and their samples."""
        rows = range(len(batch.requests))
        sampling_rows = [i for i in rows if batch.samples(i)] if batch.is_prefill else list(rows)
        if self.graphs is not None and not batch.is_prefill and self.graphs.bucket_for(len(batch.requests)):
            logits = self.graphs.run([r.last_token_id for r in batch.requests],
                                     [r.num_computed_tokens for r in batch.requests],
                                     [r.block_table for r in batch.requests])
        else:
            logits = self._run_eager(batch, sampling_rows)
        if not sampling_rows:
            return [], None
        requests = [batch.requests[i] for i in sampling_rows]
        sampling = SamplingBatch.build([_row_params(r) for r in requests],
                                       [r.output_token_ids for r in requests], self.device)
        return sampling_rows, self.sampler(logits, sampling)

    def _run_eager(self, batch: Batch, sampling_rows: list[int]) -> torch.Tensor:
        token_ids, meta = self._prepare_inputs(batch)
        hidden = self.model(token_ids, meta)
        return self.model.compute_logits(hidden[meta.query_start_loc[1:][sampling_rows] - 1])

    def _prepare_inputs(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata]:
        token_ids: list[int] = []
        context_lens = []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            token_ids += request.token_ids(start, start + n)
            context_lens.append(start + n)
        meta = AttentionMetadata.build(batch.num_new_tokens, context_lens,
                                       [r.block_table for r in batch.requests], self.block_size, self.device)
        return torch.tensor(token_ids, dtype=torch.int64).to(self.device, non_blocking=True), meta

    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int) -> int:
        """Peak memory a prefill of `num_tokens` tokens needs beyond the weights (CUDA only)."""
        blocks = -(-num_tokens // self.block_size)
        self._allocate_pages(blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        meta = AttentionMetadata.build([num_tokens], [num_tokens], [list(range(blocks))], self.block_size, self.device)
        tokens = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        self.model.compute_logits(self.model(tokens, meta)[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        for attention in self.model.attention_layers():
            attention.k_cache = attention.v_cache = None
        torch.cuda.empty_cache()
        return peak


def _row_params(request) -> RowParams:
    p = request.params
    return RowParams(
        temperature=0.0 if p.is_greedy else p.temperature, top_p=p.top_p, top_k=p.top_k,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        generator=request.generator, top_logprobs=p.top_logprobs, logprobs=p.logprobs,
    )
