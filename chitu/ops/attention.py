"""Paged attention: storing new K/V into the block cache and attending over it."""
import torch

from chitu.ops.attention_metadata import AttentionMetadata
from chitu.ops.torch_ref import attention as ref


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    ref.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return ref.paged_attention(q, k_cache, v_cache, meta, scale)
