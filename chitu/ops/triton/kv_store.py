"""Writing a step's K and V into the paged cache in one launch (two index_copy_ calls otherwise)."""
import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl


@triton.jit
def _store_rows(src_ptr, stride_t, stride_h, cache_ptr, token, slot, HEADS: tl.constexpr, DIM: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads, d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    mask = (heads < HEADS)[:, None] & (d < DIM)[None, :]
    rows = tl.load(src_ptr + token * stride_t + heads[:, None] * stride_h + d[None, :], mask=mask)
    tl.store(cache_ptr + slot * (HEADS * DIM) + heads[:, None] * DIM + d[None, :],
             rows.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     HEADS: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    _store_rows(k_ptr, stride_kt, stride_kh, k_cache_ptr, token, slot, HEADS, K_DIM, BLOCK_H, BLOCK_K)
    _store_rows(v_ptr, stride_vt, stride_vh, v_cache_ptr, token, slot, HEADS, V_DIM, BLOCK_H, BLOCK_V)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k [T, kv_heads, head_dim] and v [T, kv_heads, head_dim_v] (rows may be strided views of a fused
    projection's output) into their slots of contiguous caches [num_blocks, block_size, kv_heads, dim]."""
    tokens, heads, k_dim = k.shape
    if tokens == 0:
        return
    assert k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    v_dim = v.shape[2]
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                HEADS=heads, K_DIM=k_dim, V_DIM=v_dim, BLOCK_H=triton.next_power_of_2(heads),
                                BLOCK_K=triton.next_power_of_2(k_dim), BLOCK_V=triton.next_power_of_2(v_dim),
                                **pdl.launch_options(k.device))
