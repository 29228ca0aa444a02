"""What a layer keeps in the paged KV cache, declared by the layer and allocated by the runner.

Each caching layer returns a spec: the tensors it stores per cache block, their shapes and dtype.
The runner sizes the cache from the specs (bytes per block, summed over layers), allocates every
layer's pages and binds them to the layer. A block id means the same token slots in every layer, so
layers with different specs (per-head K/V, one MLA latent per token, an fp8 cache) share one block
manager.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class KVCacheSpec(ABC):
    dtype: torch.dtype

    @abstractmethod
    def page_shapes(self, block_size: int) -> dict[str, tuple[int, ...]]:
        """The shape of one block's page of each cached tensor, by name."""

    def page_bytes(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(shape) * element for shape in self.page_shapes(block_size).values())

    def allocate(self, num_blocks: int, block_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        # zeros, not empty: masked-out slots are multiplied by zero weights, and 0 * NaN would leak
        return {name: torch.zeros((num_blocks, *shape), dtype=self.dtype, device=device)
                for name, shape in self.page_shapes(block_size).items()}


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """Per-head keys and values of every token: k [block, kv_heads, head_dim], v [block, kv_heads, head_dim_v]."""

    num_kv_heads: int
    head_dim: int
    head_dim_v: int

    def page_shapes(self, block_size: int) -> dict[str, tuple[int, ...]]:
        return {"k": (block_size, self.num_kv_heads, self.head_dim),
                "v": (block_size, self.num_kv_heads, self.head_dim_v)}


@dataclass(frozen=True)
class MLALatentSpec(KVCacheSpec):
    """Multi-head latent attention with absorbed weights: one entry per token for all heads, the
    compressed KV latent and the shared RoPE key side by side (512 + 64 for DeepSeek-V3)."""

    kv_lora_rank: int
    rope_dim: int

    def page_shapes(self, block_size: int) -> dict[str, tuple[int, ...]]:
        return {"kv_lora_k_pe": (block_size, self.kv_lora_rank + self.rope_dim)}


@runtime_checkable
class CachesKV(Protocol):
    backend: str  # the attention implementation, set by the engine: "ref" (torch), "cpu" or "triton"

    def kv_cache_spec(self) -> KVCacheSpec: ...

    def bind_kv_cache(self, pages: dict[str, torch.Tensor] | None) -> None:
        """Take the pages allocated for `kv_cache_spec()` (None: drop them)."""


def kv_cache_layers(model: nn.Module) -> list[CachesKV]:
    return [m for m in model.modules() if isinstance(m, CachesKV)]
