"""y = x W^T for a single row x: a batch-1 decode step's LM head, where cuBLAS streams the huge
vocabulary matrix ~10% below the copy rate. Each program reduces a band of W's rows in fp32."""
import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for bn, bk, w, s in [(8, 512, 4, 3), (8, 1024, 4, 3), (16, 512, 4, 3), (16, 256, 4, 4), (4, 1024, 4, 3),
                                (8, 512, 8, 4), (32, 256, 8, 3), (16, 1024, 8, 3),
                                # few rows (an MoE router's 128 experts): one or two rows a program
                                (1, 2048, 4, 2), (2, 1024, 4, 3), (1, 1024, 4, 3), (2, 2048, 8, 2)]]


@triton.autotune(configs=CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, w_stride, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * w_stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T → [1, N] in x's dtype or out's (fp32 accumulation)."""
    n, k = weight.shape
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x.contiguous(), weight, weight.stride(0), out, n, k)
    return out
