"""Paged attention: storing new K/V into the block cache and attending over it."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import decode as cpu_kernels
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.ops.torch_ref import attention as ref

if triton_ops.AVAILABLE:
    from chitu.ops.triton import attention as kernels
    from chitu.ops.triton import kv_store
    from chitu.ops.triton import mla_attention as mla_kernels


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k [T, kv_heads, head_dim] and v [T, kv_heads, head_dim_v] into their slots."""
    contiguous = k_cache.is_contiguous() and v_cache.is_contiguous()
    if triton_ops.enabled(k) and contiguous:
        kv_store.store_kv(k, v, k_cache, v_cache, slot_mapping)
    elif contiguous and k.stride(-1) == 1 and v.stride(-1) == 1 and cpu_kernels.runs_on(k):
        cpu_kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        ref.store_kv(k, v, k_cache, v_cache, slot_mapping)


def store_rows(rows: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write rows [T, width] (MLA latents) into a cache [num_blocks, block_size, width] at their slots."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, rows.to(cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, backend: str = "triton") -> torch.Tensor:
    """backend "ref" forces the torch reference; "triton" uses the kernels where they run, "cpu" its C++
    kernel for decode steps (ops/cpu/decode.py). Values may be
    narrower than keys (MLA without absorption: head_dim_v)."""
    if not kernels_run(backend, q):
        if backend == "cpu" and meta.max_query_len == 1 and q.stride(-1) == 1 and cpu_kernels.runs_on(q):
            return cpu_kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
        return ref.paged_attention(q, k_cache, v_cache, meta, scale)
    if meta.max_query_len == 1:
        return kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    return kernels.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                     meta.query_start_loc, meta.max_query_len, scale)


def kernels_run(backend: str, x: torch.Tensor) -> bool:
    """Whether attention over `x` (queries, or the weights that make them) runs the Triton kernels: no
    host reads then, so a decode step can be captured."""
    return backend != "ref" and triton_ops.enabled(x)


def latent_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, latent: int, scale: float,
                     backend: str = "triton") -> torch.Tensor:
    """MLA over its latent cache [num_blocks, block_size, latent + rope]: q [T, heads, latent + rope] →
    [T, heads, latent]; each token's key is its entry, its value the entry's first `latent` columns."""
    if not kernels_run(backend, q):
        keys = cache.unsqueeze(2)  # one KV head
        return ref.paged_attention(q, keys, keys[..., :latent], meta, scale)
    if meta.max_query_len == 1:
        return mla_kernels.latent_decode(q, cache, meta.block_tables, meta.context_lens, meta.query_start_loc,
                                         latent, scale)
    return mla_kernels.latent_prefill(q, cache, meta.block_tables, meta.context_lens, meta.query_start_loc,
                                      meta.max_query_len, latent, scale)
