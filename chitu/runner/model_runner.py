"""Turns a scheduled Batch into tensors, runs the model over the paged KV cache and samples."""
from __future__ import annotations

import torch
from torch import nn

from chitu.engine.scheduler import Batch
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.runner.sampler import RowParams, Sampler, SamplerOutput, SamplingBatch


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes across all layers."""
        attention = self.model.attention_layers()
        dtype_size = next(self.model.parameters()).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * dtype_size for a in attention)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        dtype = next(self.model.parameters()).dtype
        self.kv_caches = []
        for attention in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attention.num_kv_heads, attention.head_dim)
            # zeros, not empty: masked-out slots are multiplied by zero weights, and 0 * NaN would leak
            attention.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attention.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            self.kv_caches.append((attention.k_cache, attention.v_cache))

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], SamplerOutput | None]:
        """Compute the batch; returns the indices of requests that sampled, and their samples."""
        token_ids, meta = self._prepare_inputs(batch)
        hidden = self.model(token_ids, meta)
        sampling_rows = [i for i in range(len(batch.requests)) if batch.samples(i)]
        if not sampling_rows:
            return [], None
        last_token_rows = meta.query_start_loc[1:][sampling_rows] - 1
        logits = self.model.compute_logits(hidden[last_token_rows])
        requests = [batch.requests[i] for i in sampling_rows]
        sampling = SamplingBatch.build([_row_params(r) for r in requests],
                                       [r.output_token_ids for r in requests], self.device)
        return sampling_rows, self.sampler(logits, sampling)

    def _prepare_inputs(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata]:
        token_ids: list[int] = []
        context_lens = []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            token_ids += request.token_ids(start, start + n)
            context_lens.append(start + n)
        meta = AttentionMetadata.build(batch.num_new_tokens, context_lens,
                                       [r.block_table for r in batch.requests], self.block_size, self.device)
        return torch.tensor(token_ids, dtype=torch.int64, device=self.device), meta


def _row_params(request) -> RowParams:
    p = request.params
    return RowParams(
        temperature=0.0 if p.is_greedy else p.temperature, top_p=p.top_p, top_k=p.top_k,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        generator=request.generator, top_logprobs=p.top_logprobs, logprobs=p.logprobs,
    )
