"""MLA with absorbed weights over the latent cache [num_blocks, block_size, kv_lora_rank + rope_dim]:
multi-query attention of q [T, heads, kv_lora_rank + rope_dim] whose one key per token is its cache
entry and whose value is the entry's latent part. Each latent tile is read once and serves both as the
keys' latent half and as the values; the RoPE half takes a dot product of its own.

One kernel does both steps. Its rows are (query, head) pairs of one sequence, so the heads of a query
share every key tile it loads. Decode (one query per sequence) also splits the context over a third
grid axis, as ops/triton/attention.py does, and merges the splits with that module's merge kernel;
the split count comes from static shapes only, so a decode step can be captured in a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl
from chitu.ops.triton.dot import dot
from chitu.ops.triton.attention import EVEN_SPLITS_FROM, LOG2E, _decode_merge_kernel, _decode_splits

BLOCK_M = 16  # (query, head) rows a program
BLOCK_N = 32  # keys a tile
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _latent_kernel(q_ptr, cache_ptr, tables_ptr, context_lens_ptr, query_start_ptr, out_ptr, lse_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, stride_block, stride_token,
                   heads, qk_scale, split_len, LATENT: tl.constexpr, ROPE: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, EVEN_SPLITS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    q_start = tl.load(query_start_ptr + seq)
    q_len = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(1) * BLOCK_M >= q_len * heads:
        return
    live = rows < q_len * heads
    query, head = rows // heads, rows % heads
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    q_pos = context_len - q_len + query  # each row's position; dead rows lie past the context
    if SPLIT:  # decode: this program's part of the context
        if EVEN_SPLITS:
            split_len = tl.cdiv(tl.cdiv(context_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        start = tl.program_id(2) * split_len
        end = tl.minimum(start + split_len, context_len)
    else:  # prefill: keys up to the tile's last query
        start = 0
        end = tl.minimum(context_len, tl.max(tl.where(live, q_pos, 0), axis=0) + 1)

    lat, rope = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_R)
    q_rows = q_ptr + (q_start + query).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q_lat = tl.load(q_rows + lat[None, :], mask=live[:, None] & (lat < LATENT)[None, :], other=0.0)
    q_rope = tl.load(q_rows + LATENT + rope[None, :], mask=live[:, None] & (rope < ROPE)[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table_row = tables_ptr + seq * stride_tb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        in_range = pos < end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        entry = cache_ptr + (block * stride_block + (pos % BLOCK_SIZE) * stride_token)[:, None]
        k_lat = tl.load(entry + lat[None, :], mask=in_range[:, None] & (lat < LATENT)[None, :], other=0.0)
        k_rope = tl.load(entry + LATENT + rope[None, :], mask=in_range[:, None] & (rope < ROPE)[None, :], other=0.0)
        s = dot(q_rope, tl.trans(k_rope.to(q_rope.dtype)), dot(q_lat, tl.trans(k_lat.to(q_lat.dtype)), None)) * qk_scale
        # a live row sees its tile's first key: m_new stays finite there
        s = tl.where(in_range[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = dot(p.to(q_lat.dtype), k_lat.to(q_lat.dtype), acc * alpha[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out_mask = live[:, None] & (lat < LATENT)[None, :]
    if SPLIT:  # an empty split leaves weight 0 for the merge
        nonempty = l_i > 0
        split_rows = (seq * heads + head) * tl.num_programs(2) + tl.program_id(2)
        tl.store(lse_ptr + split_rows, tl.where(nonempty, m_i + tl.log2(l_i), float("-inf")), mask=live)
        tl.store(out_ptr + split_rows[:, None] * LATENT + lat[None, :], acc / tl.where(nonempty, l_i, 1.0)[:, None],
                 mask=out_mask)
    else:
        out_rows = out_ptr + (q_start + query).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_rows + lat[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


def _launch(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
            query_start_loc: torch.Tensor, latent: int, scale: float, grid: tuple[int, int, int], out: torch.Tensor,
            lse: torch.Tensor, split_len: int, split: bool) -> None:
    assert cache.stride(-1) == 1 and q.stride(-1) == 1 and cache.shape[-1] == q.shape[-1]
    rope = q.shape[-1] - latent
    _latent_kernel[grid](
        q, cache, block_tables, context_lens, query_start_loc, out, lse, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), cache.stride(0), cache.stride(1), q.shape[1],
        scale * LOG2E, split_len, LATENT=latent, ROPE=rope, BLOCK_SIZE=cache.shape[1], SPLIT=split,
        EVEN_SPLITS=grid[2] >= EVEN_SPLITS_FROM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_L=triton.next_power_of_2(latent), BLOCK_R=max(16, triton.next_power_of_2(rope)),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )


def latent_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, latent: int, scale: float) -> torch.Tensor:
    """One query per sequence: q [B, heads, latent + rope] → [B, heads, latent]."""
    batch, heads, _ = q.shape
    row_tiles = triton.cdiv(heads, BLOCK_M)
    splits, split_len = _decode_splits(batch * row_tiles, block_tables.shape[1] * cache.shape[1], q.device)
    mid_out = torch.empty(batch, heads, splits, latent, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _launch(q, cache, block_tables, context_lens, query_start_loc, latent, scale, (batch, row_tiles, splits),
            mid_out, mid_lse, split_len, split=True)
    out = torch.empty(batch, heads, latent, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(batch, heads)](mid_out, mid_lse, out, out.stride(0), out.stride(1), splits, HEAD_DIM=latent,
                                         BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(latent),
                                         **pdl.launch_options(out.device))
    return out


def latent_prefill(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, max_query_len: int, latent: int, scale: float) -> torch.Tensor:
    """Causal attention of the flat queries q [T, heads, latent + rope] → [T, heads, latent]; sequence b
    owns rows query_start_loc[b]:query_start_loc[b+1], the last of its context_lens[b] tokens."""
    out = torch.empty(*q.shape[:2], latent, dtype=q.dtype, device=q.device)
    grid = (block_tables.shape[0], triton.cdiv(max_query_len * q.shape[1], BLOCK_M), 1)
    _launch(q, cache, block_tables, context_lens, query_start_loc, latent, scale, grid, out, out, 0, split=False)
    return out
