"""The C++ decode-step kernels (chitu/ops/cpu/decode_kernels.cpp) against their torch references, on random
inputs of awkward sizes: to summation order in float32, to a rounding flip in bf16."""
import pytest
import torch

from chitu.ops import attention, rotary
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.ops.cpu import decode as kernels
from chitu.ops.torch_ref import activation as ref_activation
from chitu.ops.torch_ref import attention as ref_attention
from chitu.ops.torch_ref import norm as ref_norm
from chitu.ops.torch_ref import rotary as ref_rotary

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("rows,width", [(1, 576), (7, 33), (40, 1000)])
def test_rms_norms(dtype, rows, width):
    x, residual, weight = torch.randn(rows, width, dtype=dtype), torch.randn(rows, width, dtype=dtype), torch.randn(width, dtype=dtype)
    assert_close(kernels.rms_norm(x, weight, 1e-6), ref_norm.rms_norm(x, weight, 1e-6), dtype)
    normed, summed = kernels.add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_summed = ref_norm.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, want_summed)
    assert_close(normed, want_normed, dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32)])
def test_rotary_of_a_strided_view(dtype, interleaved, head_dim, rotary_dim):
    """q heads cut from a fused projection (rows strided), partial rotary passes the rest through."""
    tokens, heads = 5, 3
    fused = torch.randn(tokens, (heads + 2) * head_dim, dtype=dtype)
    x = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    angles = torch.rand(tokens, rotary_dim // 2) * 6
    got = kernels.apply_rotary(x, angles.cos(), angles.sin(), interleaved)
    assert_close(got, ref_rotary.apply_rotary(x, angles.cos(), angles.sin(), interleaved), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_rotary_after_head_norms_runs_the_kernels_as_the_reference(dtype):
    """Qwen3's q/k norms before RoPE (two weights: q heads, then k heads), on a strided view of qkv."""
    tokens, q_heads, kv_heads, head_dim = 6, 5, 2, 64
    fused = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    x = fused[:, : (q_heads + kv_heads) * head_dim].view(tokens, q_heads + kv_heads, head_dim)
    norm = (torch.rand(head_dim, dtype=dtype) + 0.5, torch.rand(head_dim, dtype=dtype) + 0.5, q_heads, 1e-6)
    angles = torch.rand(tokens, head_dim // 2) * 6
    got = rotary.apply_rotary(x, angles.cos(), angles.sin(), False, norm)
    assert_close(got, ref_rotary.apply_rotary(x, angles.cos(), angles.sin(), False, norm), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("width", [77, 300])
def test_silu_and_mul(dtype, width):
    """Widths below and past the kernel's chunk of 256, gates large enough that exp over- and underflows."""
    x = torch.randn(3, 2, 2 * width, dtype=dtype) * 40
    assert_close(kernels.silu_and_mul(x), ref_activation.silu_and_mul(x), dtype)


@pytest.mark.parametrize("k_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16)])
def test_store_kv_writes_strided_rows_into_their_slots_as_the_reference(k_dtype, cache_dtype):
    """k and v cut from a fused projection (strided rows), values narrower than keys, slots out of order; the
    other slots keep what they held."""
    tokens, kv_heads, head_dim, head_dim_v = 5, 3, 48, 32
    fused = torch.randn(tokens, kv_heads * (head_dim + head_dim_v) + 7, dtype=k_dtype)
    k = fused[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, kv_heads * head_dim: kv_heads * (head_dim + head_dim_v)].view(tokens, kv_heads, head_dim_v)
    slots = torch.tensor([17, 3, 40, 0, 22])
    caches = [torch.randn(6, 8, kv_heads, width).to(cache_dtype) for width in (head_dim, head_dim_v)]
    expected = [cache.clone() for cache in caches]
    ref_attention.store_kv(k, v, *expected, slots)
    kernels.store_kv(k, v, *caches, slots)
    assert all(torch.equal(got, want) for got, want in zip(caches, expected))
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.store_kv(k, v, *caches, torch.tensor([0, 1, 2, 3, 48]))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("heads,kv_heads,head_dim,head_dim_v", [(9, 3, 64, 64), (4, 4, 48, 32), (8, 1, 16, 16), (6, 2, 80, 72)])
def test_decode_attention_over_pages(dtype, heads, kv_heads, head_dim, head_dim_v):
    """Three sequences of awkward lengths over shuffled pages (one table padded), caches NaN outside the
    contexts: a kernel reading past a context shows."""
    block_size, context_lens = 16, [1, 37, 80]
    tables = torch.randperm(12)[:10].tolist()
    block_tables = [tables[:1], tables[1:4], tables[4:9]]
    meta = AttentionMetadata.build([1, 1, 1], context_lens, block_tables, block_size, "cpu")
    k_cache = torch.full((12, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full((12, block_size, kv_heads, head_dim_v), float("nan"), dtype=dtype)
    for table, length in zip(block_tables, context_lens, strict=True):
        for pos in range(length):
            k_cache[table[pos // block_size], pos % block_size] = torch.randn(kv_heads, head_dim, dtype=dtype)
            v_cache[table[pos // block_size], pos % block_size] = torch.randn(kv_heads, head_dim_v, dtype=dtype)
    q = torch.randn(3, heads, head_dim, dtype=dtype)
    got = kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, head_dim**-0.5)
    want = ref_attention.paged_attention(q.float(), k_cache.nan_to_num().float(), v_cache.nan_to_num().float(), meta,
                                         head_dim**-0.5)
    assert not got.isnan().any()
    assert_close(got.float(), want, dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_decode_attention_takes_q_cut_from_the_fused_projection(dtype):
    """Batch > 1 decode: q is a row-strided view of qkv, which the kernel reads in place."""
    block_size, heads, kv_heads, head_dim = 16, 4, 2, 32
    meta = AttentionMetadata.build([1, 1, 1], [5, 17, 30], [[0], [1, 2], [3, 4]], block_size, "cpu")
    k_cache, v_cache = (torch.randn(5, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(3, heads, head_dim)
    assert not q.is_contiguous()
    got = attention.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, backend="cpu")
    want = ref_attention.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, head_dim**-0.5)
    assert_close(got.float(), want, dtype)
