"""The Triton kernels against their torch references, on random inputs of awkward sizes (GPU only).

Every output is allocated NaN-poisoned and handed to the kernel, so an element it fails to write shows.
Paged-attention caches are NaN everywhere but the slots of the sequences' contexts, so a kernel that
reads past a context (or through a padding entry of a block table) shows too."""
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA device", allow_module_level=True)

from chitu.ops import attention as attention_ops  # noqa: E402
from chitu.ops import linear as linear_ops  # noqa: E402
from chitu.ops import moe as moe_ops  # noqa: E402
from chitu.ops.attention_metadata import AttentionMetadata  # noqa: E402
from chitu.ops.torch_ref import activation as ref_activation  # noqa: E402
from chitu.ops.torch_ref import attention as ref_attention  # noqa: E402
from chitu.ops.torch_ref import fp8 as ref_fp8  # noqa: E402
from chitu.ops.torch_ref import moe as ref_moe  # noqa: E402
from chitu.ops.torch_ref import norm as ref_norm  # noqa: E402
from chitu.ops.torch_ref import rotary as ref_rotary  # noqa: E402
from chitu.ops.triton import (activation, attention, fp8_gemm, fused_moe, gemv, kv_store, moe_config,  # noqa: E402
                              moe_routing, norm, pdl, rotary)

DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# normwise relative error: elementwise kernels differ from the reference by a rounding flip here and
# there; attention (against an fp32 reference) also rounds its probabilities to the input dtype; in
# float32 only the order of the sums differs (tl.dot kept exact, dot.py)
ELEMENTWISE_TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-5}
ATTENTION_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
needs_fp8 = pytest.mark.skipif(torch.cuda.get_device_capability() < (8, 9), reason="e4m3 tensor cores need sm89+")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def assert_close(out: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert not out.isnan().any(), "NaN in the output: an element was not written, or a masked value leaked"
    error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < tol, f"relative error {error:.2e} over {tol:.0e}"


# ---- RMSNorm

NORM_SHAPES = [(1, 4096), (7, 5120), (33, 576), (129, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", NORM_SHAPES)
def test_rms_norm(dtype, tokens, width):
    x, weight = 3 * randn(tokens, width, dtype=dtype), randn(width, dtype=dtype)
    out = norm.rms_norm(x, weight, 1e-6, out=poisoned(x.shape, dtype))
    assert_close(out, ref_norm.rms_norm(x, weight, 1e-6), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", NORM_SHAPES)
def test_add_rms_norm(dtype, tokens, width):
    x, residual = randn(tokens, width, dtype=dtype), 4 * randn(tokens, width, dtype=dtype)
    weight = randn(width, dtype=dtype)
    out, summed = norm.add_rms_norm(x, residual, weight, 1e-5, out=poisoned(x.shape, dtype),
                                    residual_out=poisoned(x.shape, dtype))
    expected_out, expected_sum = ref_norm.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_sum)
    assert_close(out, expected_out, ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(9, 8, 2, 128), (1, 5, 1, 64), (65, 3, 3, 80)])
def test_rms_norm_per_head_of_fused_qkv(dtype, tokens, heads, kv_heads, head_dim):
    """Qwen3's q/k norm: strided [T, heads, head_dim] views into the fused qkv projection."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = randn(head_dim, dtype=dtype)
    for x in (q, k):
        out = norm.rms_norm(x, weight, 1e-6, out=poisoned(x.shape, dtype))
        assert_close(out, ref_norm.rms_norm(x, weight, 1e-6), ELEMENTWISE_TOL[dtype])


# ---- rotary

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (64, 64), (128, 64), (80, 40)])
def test_apply_rotary_matches_reference_bitwise(dtype, interleaved, head_dim, rotary_dim):
    """Same rounding as the reference (cos/sin and each product rounded to x's dtype): equal bits."""
    tokens, heads = 37, 19
    x = randn(tokens, (heads + 3) * head_dim, dtype=dtype)[:, : heads * head_dim].view(tokens, heads, head_dim)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=DEVICE).float() / rotary_dim)
    angles = positions[:, None].float() * inv_freq
    cos, sin = angles.cos(), angles.sin()
    out = rotary.apply_rotary(x, cos, sin, interleaved, out=poisoned(x.shape, dtype))
    assert torch.equal(out, ref_rotary.apply_rotary(x, cos, sin, interleaved))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (128, 64), (80, 40)])
def test_apply_rotary_after_per_head_norms(dtype, interleaved, head_dim, rotary_dim):
    """q and k heads side by side, each normalised by its own weight first (Qwen3's q/k norms in one launch)."""
    tokens, q_heads, k_heads = 37, 19, 5
    heads = q_heads + k_heads
    x = randn(tokens, (heads + 3) * head_dim, dtype=dtype)[:, : heads * head_dim].view(tokens, heads, head_dim)
    norm = (randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype), q_heads, 1e-6)
    angles = torch.rand(tokens, rotary_dim // 2, device=DEVICE) * 1000
    cos, sin = angles.cos(), angles.sin()
    out = rotary.apply_rotary(x, cos, sin, interleaved, out=poisoned(x.shape, dtype), norm=norm)
    assert_close(out, ref_rotary.apply_rotary(x, cos, sin, interleaved, norm), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (64, 64), (80, 40)])
@pytest.mark.parametrize("q_heads,kv_heads,with_norm", [(32, 8, False), (5, 5, True), (19, 1, True), (4, 2, False)])
def test_rotate_and_store_kv(dtype, interleaved, head_dim, rotary_dim, q_heads, kv_heads, with_norm):
    """A fused Q/K/V output (strided rows) in one launch: q rotated out, k rotated and v copied into their
    slots; everything else in the caches untouched. As the reference rotary and K/V store do it."""
    tokens, block_size = 37, 16
    heads = q_heads + 2 * kv_heads
    qkv = randn(tokens, (heads + 3) * head_dim, dtype=dtype)[:, : heads * head_dim].view(tokens, heads, head_dim)
    norm = (randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype), q_heads, 1e-6) if with_norm else None
    angles = torch.rand(tokens, rotary_dim // 2, device=DEVICE) * 1000
    cos, sin = angles.cos(), angles.sin()
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    caches = [poisoned((num_blocks, block_size, kv_heads, head_dim), dtype) for _ in range(4)]
    q = rotary.rotate_and_store_kv(qkv, q_heads, cos, sin, interleaved, norm, caches[0], caches[1], slots,
                                   out=poisoned((tokens, q_heads, head_dim), dtype))
    expected = ref_rotary.apply_rotary(qkv[:, : q_heads + kv_heads], cos, sin, interleaved, norm)
    ref_attention.store_kv(expected[:, q_heads:], qkv[:, q_heads + kv_heads:], caches[2], caches[3], slots)
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    if norm is None:
        assert torch.equal(q, expected[:, :q_heads]) and torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    else:
        assert_close(q, expected[:, :q_heads], ELEMENTWISE_TOL[dtype])
        assert_close(caches[0][slots.div(block_size, rounding_mode="floor"), slots % block_size],
                     expected[:, q_heads:], ELEMENTWISE_TOL[dtype])


# ---- silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (1000, 1037), (49152, 576), (4097, 4096)])
def test_gemv(dtype, n, k):
    x, w = randn(1, k, dtype=dtype), randn(n, k, dtype=dtype) / k**0.5
    out = gemv.gemv(x, w, out=poisoned((1, n), dtype))
    assert_close(out, torch.nn.functional.linear(x.float(), w.float()), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,weight_dtype", [(7, 3, None), (1000, 1037, None), (5120, 2048, None),
                                              (128, 2048, torch.float32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_gemv(dtype, n, k, weight_dtype, with_residual):
    """The residual add and RMSNorm folded into the GEMV: the sum exact, the norm and product as unfused."""
    weight_dtype = weight_dtype or dtype
    x, residual = randn(1, k, dtype=dtype), 4 * randn(1, k, dtype=dtype) if with_residual else None
    norm_weight, w = randn(k, dtype=dtype), randn(n, k, dtype=weight_dtype) / k**0.5
    out, normed, summed = gemv.norm_gemv(x, residual, norm_weight, 1e-6, w, out=poisoned((1, n), weight_dtype))
    expected_sum = x if residual is None else x + residual
    assert torch.equal(summed, expected_sum)
    assert_close(normed, ref_norm.rms_norm(expected_sum, norm_weight, 1e-6), ELEMENTWISE_TOL[dtype])
    assert_close(out, torch.nn.functional.linear(normed.float(), w.float()), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(7, 3), (1000, 1037), (4096, 14336), (2048, 768)])
def test_gated_gemv(dtype, n, k):
    """SiLU-and-mul folded into the down projection's GEMV: bitwise the activation kernel then the GEMV."""
    gate_up, w = 3 * randn(1, 2 * k, dtype=dtype), randn(n, k, dtype=dtype) / k**0.5
    tile = gemv.GemvTile(8, 512, 4, 3)
    out = gemv.gated_gemv(gate_up, w, out=poisoned((1, n), dtype), tile=tile)
    assert torch.equal(out, gemv.gemv(activation.silu_and_mul(gate_up), w, tile=tile))
    expected = torch.nn.functional.linear(ref_activation.silu_and_mul(gate_up).float(), w.float())
    assert_close(out, expected, ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("tile", [gemv.GemvTile(1, 2048, 4, 2), gemv.GemvTile(32, 512, 8, 3), gemv.GemvTile(4, 1024, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_tiles(tile, dtype):
    """Any tile a tuned table may name, on a shape none divides: the plain product and the normed one."""
    n, k = 1001, 2063
    x, residual, norm_weight = randn(1, k, dtype=dtype), randn(1, k, dtype=dtype), randn(k, dtype=dtype)
    w = randn(n, k, dtype=dtype) / k**0.5
    out = gemv.gemv(x, w, out=poisoned((1, n), dtype), tile=tile)
    assert_close(out, torch.nn.functional.linear(x.float(), w.float()), ELEMENTWISE_TOL[dtype])
    out, normed, summed = gemv.norm_gemv(x, residual, norm_weight, 1e-6, w, out=poisoned((1, n), dtype), tile=tile)
    assert torch.equal(summed, x + residual)
    assert_close(out, torch.nn.functional.linear(normed.float(), w.float()), ELEMENTWISE_TOL[dtype])


def _dependent_chain(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor,
                     outs: list[torch.Tensor]) -> None:
    """Triton kernels back to back, each reading what the one before wrote (some a residual two links
    back too), nothing else launched between them."""
    for i, (w, out) in enumerate(zip(weights, outs)):
        if i % 3 == 0:
            gemv.gemv(x, w, out=out)
        elif i % 3 == 1:
            gemv.norm_gemv(x, outs[i - 2] if i >= 2 else None, norm_weight, 1e-6, w, out=out)
        else:
            norm.rms_norm(x, norm_weight, 1e-6, out=out)
        x = out


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm90 or later")
def test_dependent_launches_in_a_graph_equal_plain_launches():
    """With PDL every kernel may start before the one before it ends: in a CUDA graph of 60 dependent
    links over NaN-poisoned buffers, a read before its producer finished would show as NaN or a difference."""
    k = 4096
    weights = [randn(k, k, dtype=torch.bfloat16) / k**0.5 for _ in range(60)]
    x, norm_weight = randn(1, k, dtype=torch.bfloat16), randn(k, dtype=torch.bfloat16)
    outs = [poisoned((1, k), torch.bfloat16) for _ in weights]
    previous = pdl.enabled
    try:
        pdl.enabled = False
        _dependent_chain(x, weights, norm_weight, outs)
        expected = [o.clone() for o in outs]
        pdl.enabled = True
        _dependent_chain(x, weights, norm_weight, outs)  # compiles the PDL variants outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _dependent_chain(x, weights, norm_weight, outs)
    finally:
        pdl.enabled = previous
    for _ in range(5):
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("n,k", [(128, 2048), (60, 1037)])
def test_float_linear_of_a_router(tokens, n, k):
    """bf16 activations times a float32 router weight, accumulated in float32 (the GEMV at one row)."""
    x, w = randn(tokens, k, dtype=torch.bfloat16), randn(n, k, dtype=torch.float32) / k**0.5
    out = linear_ops.float_linear(x, w)
    assert out.dtype == torch.float32
    assert_close(out, x.double() @ w.double().T, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", [(1, 128), (7, 1001), (130, 14336)])
def test_silu_and_mul(dtype, tokens, width):
    x = 3 * randn(tokens, 2 * width, dtype=dtype)
    out = activation.silu_and_mul(x, out=poisoned((tokens, width), dtype))
    assert_close(out, ref_activation.silu_and_mul(x), ELEMENTWISE_TOL[dtype])


# ---- paged attention

def paged_case(query_lens: list[int], context_lens: list[int], heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, extra_table_width: int = 0, head_dim_v: int | None = None):
    """q, caches and metadata over scattered blocks; cache slots outside every context hold NaN."""
    head_dim_v = head_dim_v or head_dim
    blocks = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks) + 5
    order = torch.randperm(num_blocks).tolist()
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    tables = [order[s: s + n] + [0] * extra_table_width for s, n in zip(starts, blocks)]
    k_cache = poisoned((num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache = poisoned((num_blocks, block_size, kv_heads, head_dim_v), dtype)
    every_token = AttentionMetadata.build(context_lens, context_lens, tables, block_size, DEVICE)
    tokens = sum(context_lens)
    ref_attention.store_kv(randn(tokens, kv_heads, head_dim, dtype=dtype),
                           randn(tokens, kv_heads, head_dim_v, dtype=dtype), k_cache, v_cache, every_token.slot_mapping)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, DEVICE)
    return randn(sum(query_lens), heads, head_dim, dtype=dtype), k_cache, v_cache, meta


def fp32_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The reference in fp32; it needs the slots outside the contexts finite (they get weight 0)."""
    return ref_attention.paged_attention(q.float(), k_cache.nan_to_num().float(), v_cache.nan_to_num().float(),
                                         meta, scale)


HEAD_CONFIGS = [(8, 8, 64), (16, 4, 128), (32, 4, 128), (12, 2, 96)]  # (heads, kv_heads, head_dim): groups 1/4/8/6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_decode_attention(dtype, heads, kv_heads, head_dim, block_size):
    context_lens = [1, 17, 64, 200, 1000, 2999, 129]
    q, k_cache, v_cache, meta = paged_case([1] * len(context_lens), context_lens, heads, kv_heads, head_dim,
                                           block_size, dtype, extra_table_width=3)
    scale = head_dim**-0.5
    out = attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                     out=poisoned(q.shape, dtype))
    assert_close(out, fp32_reference(q, k_cache, v_cache, meta, scale), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_long_contexts(dtype):
    context_lens = [20000, 1, 5003, 33333]
    q, k_cache, v_cache, meta = paged_case([1] * 4, context_lens, 32, 8, 128, 64, dtype)
    out = attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 128**-0.5,
                                     out=poisoned(q.shape, dtype))
    assert_close(out, fp32_reference(q, k_cache, v_cache, meta, 128**-0.5), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_large_batch(dtype):
    """Enough sequences to fill the GPU without splitting: parts of the block-table width's share."""
    context_lens = torch.randint(1, 700, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    q, k_cache, v_cache, meta = paged_case([1] * 300, context_lens, 16, 4, 128, 64, dtype)
    assert attention._decode_splits(300 * 4, meta.block_tables.shape[1] * 64, q.device)[0] < attention.EVEN_SPLITS_FROM
    out = attention.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 128**-0.5,
                                     out=poisoned(q.shape, dtype))
    assert_close(out, fp32_reference(q, k_cache, v_cache, meta, 128**-0.5), ATTENTION_TOL[dtype])


def assert_decode_graph_replays(attend, reference, q: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """attend(q, meta) captured once, replayed with new queries, context lengths and block tables (of 64
    blocks each): equal to eager and close to reference(q, meta)."""
    batch, width = q.shape[0], 64

    def tables() -> list[list[int]]:
        return torch.randperm(num_blocks)[: batch * width].view(batch, width).tolist()

    meta = AttentionMetadata.build([1] * batch, [5, 100, 1, 1024, 333], tables(), block_size, DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        attend(q, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend(q, meta)

    for context_lens in ([5, 100, 1, 1024, 333], [1024, 3, 777, 64, 1]):
        new = AttentionMetadata.build([1] * batch, context_lens, tables(), block_size, DEVICE)
        meta.context_lens.copy_(new.context_lens)
        meta.block_tables.copy_(new.block_tables)
        q.copy_(randn(*q.shape, dtype=q.dtype))
        graph.replay()
        assert torch.equal(captured, attend(q, new))
        assert_close(captured, reference(q, new), ATTENTION_TOL[q.dtype])


def test_decode_attention_cuda_graph_replay():
    heads, kv_heads, head_dim, block_size, dtype = 16, 4, 128, 16, torch.bfloat16
    num_blocks, scale = 5 * 64 + 1, head_dim**-0.5
    k_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    assert_decode_graph_replays(lambda q, meta: attention_ops.paged_attention(q, k_cache, v_cache, meta, scale),
                                lambda q, meta: fp32_reference(q, k_cache, v_cache, meta, scale),
                                randn(5, heads, head_dim, dtype=dtype), num_blocks, block_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_attention(dtype, heads, kv_heads, head_dim, block_size):
    """Fresh prompts, prompts after a cached prefix, and one-token queries in one flat batch."""
    query_lens = [1, 37, 100, 1, 129, 513]
    context_lens = [1, 37, 300, 77, 129, 1000]
    q, k_cache, v_cache, meta = paged_case(query_lens, context_lens, heads, kv_heads, head_dim, block_size, dtype,
                                           extra_table_width=2)
    scale = head_dim**-0.5
    out = attention.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                      meta.query_start_loc, meta.max_query_len, scale, out=poisoned(q.shape, dtype))
    assert_close(out, fp32_reference(q, k_cache, v_cache, meta, scale), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim,head_dim_v", [(16, 192, 128), (4, 24, 12)])  # MLA expanded: nope + rope, v
def test_attention_with_narrower_values(dtype, heads, head_dim, head_dim_v):
    """Decode and prefill (through the dispatcher) where values are narrower than keys."""
    for query_lens, context_lens in (([1] * 4, [1, 64, 1000, 129]), ([1, 37, 100], [1, 37, 300])):
        q, k_cache, v_cache, meta = paged_case(query_lens, context_lens, heads, heads, head_dim, 16, dtype,
                                               extra_table_width=2, head_dim_v=head_dim_v)
        out = attention_ops.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
        assert out.shape == (len(q), heads, head_dim_v)
        assert_close(out, fp32_reference(q, k_cache, v_cache, meta, head_dim**-0.5), ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_dispatch_long_prompt(dtype):
    """A 2048-token prompt after a 300-token cached prefix, through the dispatcher, block size 256."""
    q, k_cache, v_cache, meta = paged_case([2048, 5], [2348, 5], 32, 8, 128, 256, dtype)
    out = attention_ops.paged_attention(q, k_cache, v_cache, meta, 128**-0.5)
    assert_close(out, fp32_reference(q, k_cache, v_cache, meta, 128**-0.5), ATTENTION_TOL[dtype])


# ---- MLA over the latent cache (mla_absorb=absorb): one [latent, RoPE key] entry per token

LATENT_SHAPES = [(16, 512, 64), (128, 512, 64), (5, 32, 8)]  # (heads, kv_lora_rank, rope_dim): DeepSeek at tp 8 and 1


def latent_case(query_lens: list[int], context_lens: list[int], heads: int, latent: int, rope: int,
                block_size: int, dtype: torch.dtype):
    """Queries, the latent cache [blocks, block_size, latent + rope] (NaN outside the contexts), metadata
    and the fp32 reference's output."""
    q, cache, _, meta = paged_case(query_lens, context_lens, heads, 1, latent + rope, block_size, dtype,
                                   extra_table_width=2)
    return q, cache.squeeze(2), meta, fp32_reference(q, cache, cache[..., :latent], meta, (latent + rope)**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,latent,rope", LATENT_SHAPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_latent_decode_attention(dtype, heads, latent, rope, block_size):
    context_lens = [1, 17, 64, 200, 1000, 2999, 129]
    q, cache, meta, expected = latent_case([1] * len(context_lens), context_lens, heads, latent, rope, block_size, dtype)
    out = attention_ops.latent_attention(q, cache, meta, latent, (latent + rope)**-0.5)
    assert_close(out, expected, ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,latent,rope", LATENT_SHAPES)
def test_latent_prefill_attention(dtype, heads, latent, rope):
    """Fresh prompts, prompts after a cached prefix, and one-token queries in one flat batch."""
    query_lens, context_lens = [1, 37, 100, 1, 129], [1, 37, 300, 77, 129]
    q, cache, meta, expected = latent_case(query_lens, context_lens, heads, latent, rope, 16, dtype)
    out = attention_ops.latent_attention(q, cache, meta, latent, (latent + rope)**-0.5)
    assert_close(out, expected, ATTENTION_TOL[dtype])


def test_latent_decode_cuda_graph_replay():
    heads, latent, rope, block_size, dtype = 16, 512, 64, 16, torch.bfloat16
    num_blocks, scale = 5 * 64 + 1, (latent + rope)**-0.5
    cache = randn(num_blocks, block_size, latent + rope, dtype=dtype)
    keys = cache.unsqueeze(2)
    assert_decode_graph_replays(lambda q, meta: attention_ops.latent_attention(q, cache, meta, latent, scale),
                                lambda q, meta: fp32_reference(q, keys, keys[..., :latent], meta, scale),
                                randn(5, heads, latent + rope, dtype=dtype), num_blocks, block_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, kv_heads, head_dim, block_size", [(1, 8, 128, 64), (37, 2, 64, 16), (300, 4, 96, 256)])
def test_store_kv_into_pages_of_strided_qkv(dtype, tokens, kv_heads, head_dim, block_size):
    qkv = randn(tokens, (4 + 2) * kv_heads * head_dim, dtype=dtype)
    _, k, v = qkv.split([4 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    caches = [poisoned((num_blocks, block_size, kv_heads, head_dim), dtype) for _ in range(4)]
    kv_store.store_kv(k, v, caches[0], caches[1], slots)
    ref_attention.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, nope, rope, v_dim", [(1, 16, 128, 64, 128), (37, 3, 16, 8, 12)])
def test_store_kv_of_expanded_mla_heads(dtype, tokens, heads, nope, rope, v_dim):
    """MLA without absorption: keys [nope, rope] wider than values, which are strided views of kv_b_proj's output."""
    k = randn(tokens, heads, nope + rope, dtype=dtype)
    v = randn(tokens, heads, nope + v_dim, dtype=dtype)[..., nope:]
    num_blocks, block_size = tokens // 16 + 3, 16
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    caches = [poisoned((num_blocks, block_size, heads, width), dtype) for width in (nope + rope, v_dim) * 2]
    kv_store.store_kv(k, v, caches[0], caches[1], slots)
    ref_attention.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


# ---- fused MoE

def moe_case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
             held: range | None = None):
    held = held or range(experts)
    x = randn(tokens, hidden, dtype=dtype)
    gate_up = randn(len(held), 2 * inter, hidden, dtype=dtype) / hidden**0.5
    down = randn(len(held), hidden, inter, dtype=dtype) / inter**0.5
    logits = randn(tokens, experts, dtype=torch.float32)
    weights, ids = ref_moe.select_experts(logits, top_k, "softmax", True, None, 1, 1, 1.0)
    return x, gate_up, down, weights, ids, held.start


def moe_fp32_reference(x, gate_up, down, weights, ids, first_expert):
    return ref_moe.fused_experts(x.float(), gate_up.float(), down.float(), weights, ids, first_expert)


# both paths at every size: the tensor-core blocks (heuristic tiles) and the few-token GEMVs
MOE_PATHS = {"blocks": lambda tokens, top_k: moe_config.default_config(tokens * top_k),
             "gemv": lambda tokens, top_k: moe_config.GemvConfig(16, 8, 128, 4)}


@pytest.mark.parametrize("path", MOE_PATHS)
@pytest.mark.parametrize("tokens", [1, 3, 64, 257, 4096])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (60, 8), (128, 8), (256, 8)])
def test_fused_moe(tokens, experts, top_k, path):
    case = moe_case(tokens, experts, top_k, hidden=200, inter=96, dtype=torch.bfloat16)
    actual = fused_moe.fused_experts(*case, config=MOE_PATHS[path](tokens, top_k))
    assert_close(actual, moe_fp32_reference(*case), ATTENTION_TOL[torch.bfloat16])


@pytest.mark.parametrize("path", MOE_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_holding_some_experts(dtype, path):
    """Expert parallelism: this rank holds experts 5..16 of 24; slots routed elsewhere add nothing."""
    case = moe_case(57, 24, 4, hidden=128, inter=80, dtype=dtype, held=range(5, 17))
    actual = fused_moe.fused_experts(*case, config=MOE_PATHS[path](57, 4))
    assert_close(actual, moe_fp32_reference(*case), ATTENTION_TOL[dtype])


def fp8_stack(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes, multipliers per 128 x 128 block, the dequantized stack in float32) of a stack [E, out, in]."""
    experts, rows, cols = stack.shape
    blocks = stack.float().view(experts, rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-12) / 448
    codes = (blocks / scale[:, :, None, :, None]).to(torch.float8_e4m3fn)
    dequantized = codes.float() * scale[:, :, None, :, None]
    return codes.view(experts, rows, cols), scale, dequantized.view(experts, rows, cols)


@needs_fp8
@pytest.mark.parametrize("path", MOE_PATHS)
@pytest.mark.parametrize("tokens", [1, 3, 64, 257])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (128, 8)])
def test_fused_moe_of_fp8_block_stacks(tokens, experts, top_k, path):
    """e4m3 experts (DeepSeek's, Qwen3-MoE-FP8's) read with their block multipliers, against the dequantized
    stacks; 384 wide (3 blocks) in and out, so that tiles meet several blocks and the up half its own."""
    x, gate_up, down, weights, ids, first = moe_case(tokens, experts, top_k, hidden=384, inter=384, dtype=torch.bfloat16)
    (gate_up, gate_up_scale, gate_up_deq), (down, down_scale, down_deq) = fp8_stack(gate_up), fp8_stack(down)
    actual = fused_moe.fused_experts(x, gate_up, down, weights, ids, first, config=MOE_PATHS[path](tokens, top_k),
                                     gate_up_scale=gate_up_scale, down_scale=down_scale)
    expected = moe_fp32_reference(x, gate_up_deq.bfloat16(), down_deq.bfloat16(), weights, ids, first)
    assert_close(actual, expected, ATTENTION_TOL[torch.bfloat16])


@pytest.mark.parametrize("tokens", [1, 3, 64, 257])
@pytest.mark.parametrize("experts,top_k,scoring,renormalize,bias,groups,top_groups,scaling", [
    (8, 2, "softmax", True, False, 1, 1, 1.0), (60, 8, "softmax", False, False, 1, 1, 1.0),
    (128, 8, "softmax", True, False, 1, 1, 1.0), (160, 8, "sigmoid", True, True, 1, 1, 2.5),
    (256, 8, "sigmoid", True, True, 8, 4, 2.5), (64, 6, "softmax", False, False, 8, 3, 16.0)])
@pytest.mark.parametrize("group_by_max", [False, True])
def test_select_experts_kernel(tokens, experts, top_k, scoring, renormalize, bias, groups, top_groups, scaling,
                               group_by_max):
    logits = randn(tokens, experts, dtype=torch.float32)
    correction = randn(experts, dtype=torch.float32) / 10 if bias else None
    args = (top_k, scoring, renormalize, correction, groups, top_groups, scaling, group_by_max)
    weights, ids = moe_routing.select_experts(logits, *args)
    expected_weights, expected_ids = ref_moe.select_experts(logits, *args)
    order, expected_order = ids.sort(dim=1), expected_ids.sort(dim=1)  # the same experts, in any order
    assert torch.equal(order.values, expected_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices),
                               rtol=1e-6, atol=1e-7)


def test_align_to_blocks_sorts_slots_into_whole_blocks_of_one_expert():
    ids = torch.tensor([[3, 0], [0, 5], [3, 0], [1, 3]], device=DEVICE)
    layout = fused_moe.align_to_blocks(ids, first_expert=0, num_local=4, block_m=4)  # expert 5 is not held
    slots = layout.sorted_slots.tolist()
    assert int(layout.num_padded) == 12  # experts 0, 1, 3: one block each
    assert slots[:12] == [1, 2, 5, 8, 6, 8, 8, 8, 0, 4, 7, 8]  # 8 = num_slots: padding
    assert layout.block_experts.tolist()[:3] == [0, 1, 3] and set(layout.block_experts.tolist()[3:]) == {-1}


@pytest.mark.parametrize("tokens", [1, 16])  # the GEMV path by default, then tensor-core blocks
def test_fused_moe_cuda_graph_replay(tokens):
    """Captured once, replayed with new tokens and a new routing: the same as eager."""
    x, gate_up, down, weights, ids, _ = moe_case(tokens, 64, 8, hidden=256, inter=128, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe_ops.fused_experts(x, gate_up, down, weights, ids, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_ops.fused_experts(x, gate_up, down, weights, ids, 0)
    for _ in range(2):
        new = moe_case(tokens, 64, 8, hidden=256, inter=128, dtype=torch.bfloat16)
        for buffer, value in zip((x, weights, ids), (new[0], new[3], new[4])):
            buffer.copy_(value)
        graph.replay()
        assert torch.equal(captured, moe_ops.fused_experts(x, gate_up, down, weights, ids, 0))


@pytest.mark.parametrize("tokens,experts,top_k,held,block_m", [
    (1, 8, 2, range(8), 16), (3, 60, 8, range(60), 16), (64, 128, 8, range(128), 16), (128, 256, 8, range(256), 16),
    (57, 24, 4, range(5, 17), 32), (7, 6, 2, range(5, 6), 16)])
def test_align_kernel_equals_torch_alignment(tokens, experts, top_k, held, block_m):
    _, ids = ref_moe.select_experts(randn(tokens, experts, dtype=torch.float32), top_k, "softmax", False, None, 1, 1, 1.0)
    expected = fused_moe.align_to_blocks(ids, held.start, len(held), block_m)
    actual = fused_moe.align_to_blocks_kernel(ids, held.start, len(held), block_m)
    for field in ("sorted_slots", "block_experts", "num_padded"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field


def test_untuned_moe_shape_falls_back_to_the_heuristic():
    assert moe_config.config_for(torch.device(DEVICE), 7, 100, 64, 2, 5) == moe_config.default_config(10, 5)


# ---- FP8 block-scaled W8A8 (sm89+)



@needs_fp8
@pytest.mark.parametrize("rows,width", [(1, 128), (5, 300), (77, 7168), (1, 576)])
def test_quantize_groups_equals_reference_bitwise(rows, width):
    x = 10 * randn(rows, width, dtype=torch.bfloat16)
    x[0, :7] = 0  # a group with zeros, and one (width 300: the last) partial
    codes, scale = fp8_gemm.quantize_groups(x, 128)
    want_codes, want_scale = ref_fp8.quantize_groups(x, 128)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


def _block_fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes and block multipliers of very different sizes, as DeepSeek's checkpoints hold them."""
    codes = (randn(n, k, dtype=torch.float32) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // 128), -(-k // 128), device=DEVICE) * 1e-3 + 1e-5
    return codes, scale


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (3, 1000, 300), (16, 2048, 512), (64, 384, 1536),
                                   (257, 24576, 1536), (4096, 256, 7168)])
def test_block_fp8_linear(dtype, m, n, k):
    """Partial edge blocks along N and K (1000, 300, 576); the reference dequantizes both operands."""
    weight, scale = _block_fp8_weight(n, k)
    x = randn(m, k, dtype=dtype)
    out = fp8_gemm.block_fp8_linear(x, weight, scale, (128, 128))
    assert out.dtype == dtype and not out.isnan().any()
    # e4m3 products on the tensor cores add with fewer than float32's bits within each 128-deep block
    assert_close(out, ref_fp8.block_fp8_linear(x.float(), weight, scale, (128, 128)), 4e-3)
