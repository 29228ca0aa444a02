import torch
import torch.nn.functional as F

from chitu.ops.attention_metadata import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads, head_dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the flat queries q [T, heads, head_dim] over each sequence's cached context.

    Gathers every sequence's pages into a padded [B, max_context, ...] view and runs one masked SDPA,
    so prefill (with or without a cached prefix) and decode share one path.
    """
    batch, q_rows = meta.num_seqs, meta.max_query_len
    keys = _gather_pages(k_cache, meta)
    values = _gather_pages(v_cache, meta)
    decode = q_rows == 1  # one query per sequence, in sequence order: no padding to scatter into
    if decode:
        queries = q.unsqueeze(1)
    else:
        queries = q.new_zeros(batch, q_rows, *q.shape[1:])
        queries[meta.token_seq_index, meta.token_query_index] = q
    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    first_query_pos = meta.context_lens - query_lens
    query_pos = first_query_pos[:, None] + torch.arange(q_rows, device=q.device)
    key_pos = torch.arange(meta.max_context_len, device=q.device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < meta.context_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    )
    out = out.transpose(1, 2)
    return out[:, 0] if decode else out[meta.token_seq_index, meta.token_query_index]


def _gather_pages(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    pages = cache[meta.block_tables]  # [B, max_blocks, block_size, kv_heads, head_dim]
    return pages.flatten(1, 2)[:, : meta.max_context_len]
