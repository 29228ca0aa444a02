"""Writing a step's K and V into the paged cache in one launch (two index_copy_ calls otherwise)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_k, stride_v, stride_slot,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < ROW
    k = tl.load(k_ptr + token * stride_k + offsets, mask=mask)
    v = tl.load(v_ptr + token * stride_v + offsets, mask=mask)
    tl.store(k_cache_ptr + slot * stride_slot + offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_slot + offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [T, kv_heads, head_dim] (rows may be strided views of a fused qkv output) into their slots."""
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    assert k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == head_dim
    row = heads * head_dim
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row,
                                ROW=row, BLOCK=triton.next_power_of_2(row))
