"""Rotary position embedding, neox (halves) or interleaved (pairs) style, optionally partial, optionally
after a per-head RMSNorm (see torch_ref.rotary)."""
import torch

from chitu.ops import attention as attention_ops
from chitu.ops import triton as triton_ops
from chitu.ops.cpu import decode as cpu_kernels
from chitu.ops.norm import rms_norm
from chitu.ops.torch_ref import rotary as ref
from chitu.ops.torch_ref.rotary import HeadNorm

if triton_ops.AVAILABLE:
    from chitu.ops.triton import rotary as kernels


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 norm: HeadNorm | None = None) -> torch.Tensor:
    if triton_ops.enabled(x):
        return kernels.apply_rotary(x, cos, sin, interleaved, norm=norm)
    if x.stride(-1) == 1 and cos.dtype == torch.float32 and cpu_kernels.enabled(cos):
        return cpu_kernels.apply_rotary(x if norm is None else _normed_heads(x, norm), cos, sin, interleaved)
    return ref.apply_rotary(x, cos, sin, interleaved, norm)


def rotate_and_store_kv(qkv: torch.Tensor, q_heads: int, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                        norm: HeadNorm | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, q_heads + 2 kv_heads, head_dim]: q and k heads rotated (after their norms), k and v stored in
    their slots of the paged cache; returns q [T, q_heads, head_dim]. One launch on CUDA (a rotary and a
    store elsewhere)."""
    kv_heads = (qkv.shape[1] - q_heads) // 2
    if triton_ops.enabled(qkv) and qkv.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous():
        return kernels.rotate_and_store_kv(qkv, q_heads, cos, sin, interleaved, norm, k_cache, v_cache, slot_mapping)
    q, k = apply_rotary(qkv[:, : q_heads + kv_heads], cos, sin, interleaved, norm).split([q_heads, kv_heads], dim=1)
    attention_ops.store_kv(k, qkv[:, q_heads + kv_heads:], k_cache, v_cache, slot_mapping)
    return q


def _normed_heads(x: torch.Tensor, norm: HeadNorm) -> torch.Tensor:
    """The reference's per-head RMSNorm, on the row kernels: each head a row."""
    low, high, split, eps = norm
    parts = ((x[:, :split], low), (x[:, split:], high))
    return torch.cat([rms_norm(part.reshape(-1, x.shape[-1]), weight, eps).view(part.shape) for part, weight in parts],
                     dim=1)
