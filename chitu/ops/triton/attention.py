"""Paged attention over the block KV cache [num_blocks, block_size, kv_heads, head_dim] (the value cache
may be narrower: head_dim_v, as MLA without absorption caches it).

Decode (one query per sequence): split-K over the context on a grid (seq, kv head, split), all query
heads of a kv head's group in one tile, then a second kernel merges the splits by log-sum-exp. The
split count comes from static shapes only (batch, kv heads, block-table width). With many splits
(a small batch) each sequence's context is cut into that many equal parts on the device, so a short
context is spread over the splits as a long one is; with few, into parts of the block-table width's
share, which an H200 streams faster (96% of the copy rate at batch 64, against 73% for equal parts).
No host reads of data-dependent values: a decode step can be captured in a CUDA graph and replayed
with other context lengths and block tables.

Prefill: flash attention over query tiles of every sequence; sequence b's queries are the last
q_len[b] of its context_lens[b] tokens, and all its keys (cached prefix and this step's, already
stored) are read through its block table.
"""
import functools

import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl
from chitu.ops.triton.dot import dot

LOG2E = 1.4426950408889634
# tuned on an H100 (bf16, head_dim 128); decode is within noise for BLOCK_N 32..128
DECODE_BLOCK_N = 32
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4
EVEN_SPLITS_FROM = 4  # splits: below this, a context's parts are the block-table width's share


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, n0, kv_end, table_row, k_head, v_head,
                 stride_block, stride_token, v_stride_block, v_stride_token, qk_scale, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr):
    """One online-softmax step (log2 domain) of the query tile q over keys n0 .. n0 + BLOCK_N - 1."""
    pos = n0 + tl.arange(0, BLOCK_N)
    in_range = pos < kv_end
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_head + (block * stride_block + slot * stride_token)[:, None] + d[None, :],
                mask=in_range[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(q.dtype)
    s = dot(q, tl.trans(k), None) * qk_scale
    visible = in_range[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    # every tile holds a key visible to every live row, so m_new is finite there
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(v_head + (block * v_stride_block + slot * v_stride_token)[:, None] + dv[None, :],
                mask=in_range[:, None] & (dv < HEAD_DIM_V)[None, :], other=0.0).to(q.dtype)
    acc = dot(p.to(q.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, context_lens_ptr, mid_out_ptr, mid_lse_ptr,
                         stride_qb, stride_qh, stride_tb, stride_block, stride_token, stride_head,
                         v_stride_block, v_stride_token, v_stride_head, qk_scale, split_len,
                         EVEN_SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    if EVEN_SPLITS:
        split_len = tl.cdiv(tl.cdiv(context_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)

    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, 0, n0, end, tables_ptr + seq * stride_tb,
                                     k_ptr + kv_head * stride_head, v_ptr + kv_head * v_stride_head, stride_block,
                                     stride_token, v_stride_block, v_stride_token, qk_scale, BLOCK_SIZE, BLOCK_N,
                                     BLOCK_D, HEAD_DIM, BLOCK_DV, HEAD_DIM_V, CAUSAL=False)

    # an empty split (start >= context length) leaves weight 0 for the merge
    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(l_i), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    row = (seq * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + split
    tl.store(mid_lse_ptr + row, lse, mask=g < GROUP)
    dv = tl.arange(0, BLOCK_DV)
    tl.store(mid_out_ptr + row[:, None] * HEAD_DIM_V + dv[None, :], out,
             mask=(g < GROUP)[:, None] & (dv < HEAD_DIM_V)[None, :])


@triton.jit
def _decode_merge_kernel(mid_out_ptr, mid_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    rows = (seq * tl.num_programs(1) + head) * num_splits + tl.arange(0, BLOCK_S)
    split_mask = tl.arange(0, BLOCK_S) < num_splits
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(mid_lse_ptr + rows, mask=split_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(mid_out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                    mask=split_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, context_lens_ptr, query_start_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, stride_block, stride_token,
                    stride_head, v_stride_block, v_stride_token, v_stride_head, qk_scale, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # tiles with the most keys start first
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_pos = context_len - q_len + tile * BLOCK_M  # position of the tile's first query

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=q_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table_row = tables_ptr + seq * stride_tb
    k_head, v_head = k_ptr + (head // GROUP) * stride_head, v_ptr + (head // GROUP) * v_stride_head
    # keys up to first_pos are visible to every row of the tile: no causal mask there
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, 0, n0, unmasked_end, table_row, k_head, v_head, stride_block,
                                     stride_token, v_stride_block, v_stride_token, qk_scale, BLOCK_SIZE, BLOCK_N,
                                     BLOCK_D, HEAD_DIM, BLOCK_DV, HEAD_DIM_V, CAUSAL=False)
    kv_end = tl.minimum(first_pos + BLOCK_M, context_len)
    for n0 in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, context_len - q_len + rows, n0, kv_end, table_row, k_head,
                                     v_head, stride_block, stride_token, v_stride_block, v_stride_token, qk_scale,
                                     BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_DV, HEAD_DIM_V, CAUSAL=True)

    out = acc / l_i[:, None]
    dv = tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None] & (dv < HEAD_DIM_V)[None, :])


def _block_of(dim: int) -> int:
    """A tile's width over a head dimension. Below 32, tl.dot over the prefill's 64x64 tiles gave wrong
    values or illegal accesses on an H200 (triton 3.6, head_dim_v 12 in a 16-wide tile)."""
    return max(32, triton.next_power_of_2(dim))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_splits(programs: int, max_tokens: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split of the longest context) of each context: enough programs to fill the
    GPU, from static shapes."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), programs)
    splits = max(1, min(wanted, triton.cdiv(max_tokens, MIN_SPLIT_TOKENS), MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(max_tokens, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    return triton.cdiv(max_tokens, split_len), split_len


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The GQA group size. Values may be narrower than keys (MLA without absorption)."""
    assert k_cache.shape[:3] == v_cache.shape[:3] and k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert q.stride(-1) == 1 and q.shape[1] % k_cache.shape[2] == 0 and q.shape[-1] == k_cache.shape[-1]
    return q.shape[1] // k_cache.shape[2]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q [B, heads, head_dim] over each sequence's context_lens[b] cached tokens
    → [B, heads, head_dim_v]."""
    group = _check_cache(q, k_cache, v_cache)
    batch, heads, head_dim = q.shape
    block_size, kv_heads, head_dim_v = *k_cache.shape[1:3], v_cache.shape[-1]
    splits, split_len = _decode_splits(batch * kv_heads, block_tables.shape[1] * block_size, q.device)
    mid_out = torch.empty(batch, heads, splits, head_dim_v, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(batch, heads, head_dim_v, dtype=q.dtype, device=q.device)
    block_dv = _block_of(head_dim_v)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_out, mid_lse, q.stride(0), q.stride(1),
        block_tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], scale * LOG2E, split_len,
        EVEN_SPLITS=splits >= EVEN_SPLITS_FROM, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=_block_of(head_dim), BLOCK_DV=block_dv, BLOCK_N=DECODE_BLOCK_N,
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES, **pdl.launch_options(q.device),
    )
    _decode_merge_kernel[(batch, heads)](
        mid_out, mid_lse, out, out.stride(0), out.stride(1), splits,
        HEAD_DIM=head_dim_v, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_dv,
        **pdl.launch_options(q.device),
    )
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      max_query_len: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the flat queries q [T, heads, head_dim] → [T, heads, head_dim_v]; sequence b
    owns rows query_start_loc[b]:query_start_loc[b+1], the last of its context_lens[b] tokens."""
    group = _check_cache(q, k_cache, v_cache)
    tokens, heads, head_dim = q.shape
    head_dim_v = v_cache.shape[-1]
    if out is None:
        out = torch.empty(tokens, heads, head_dim_v, dtype=q.dtype, device=q.device)
    grid = (block_tables.shape[0], triton.cdiv(max_query_len, PREFILL_BLOCK_M), heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        scale * LOG2E, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_D=_block_of(head_dim), BLOCK_DV=_block_of(head_dim_v),
        BLOCK_N=PREFILL_BLOCK_N, num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES,
    )
    return out
