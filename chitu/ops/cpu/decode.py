"""The per-token operations of a CPU decode step in one call each (decode_kernels.cpp). Where the
kernels cannot be built (no compiler), the torch references run instead, after one warning."""
import functools
import logging

import torch

from chitu.ops.cpu.build import KernelBuildError, build

logger = logging.getLogger(__name__)


@functools.cache
def _kernels():
    try:
        return build("chitu_decode_cpu", "decode_kernels.cpp")
    except KernelBuildError as e:
        logger.warning("%s; the torch references run instead (slower at small batches)", e)
        return None


def enabled(x: torch.Tensor) -> bool:
    """Whether the kernels run on `x`: a contiguous CPU tensor, the kernels built."""
    return x.is_contiguous() and runs_on(x)


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels run on the device of `x` (those that take strided rows check their strides)."""
    return x.device.type == "cpu" and _kernels() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _kernels().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    normed, summed = _kernels().add_rms_norm(x, residual, weight, eps)
    return normed, summed


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence q [B, heads, head_dim] over its paged context → [B, heads, head_dim_v]."""
    return _kernels().decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return _kernels().apply_rotary(x, cos.contiguous(), sin.contiguous(), interleaved)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _kernels().silu_and_mul(x)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k [T, kv_heads, D], v [T, kv_heads, Dv] (rows contiguous) into contiguous caches at their slots."""
    _kernels().store_kv(k, v, k_cache, v_cache, slot_mapping)
