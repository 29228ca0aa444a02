"""quant/grouped_codes.py: GGUF blocks and int8 rows repacked for the GPU kernels, losslessly (bitwise the
`gguf` package's dequantization), and the Triton kernels (ops/triton/grouped_codes.py) against the dequantized
rows on a CUDA device."""
import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from chitu.ops.linear import grouped_codes_linear
from chitu.ops.triton import codes_gemv
from chitu.quant.grouped_codes import GroupedCodes
from test_quant_gguf import FP16_FIELDS, random_rows

QType = gguf.GGMLQuantizationType
QTYPES = [t.name for t in FP16_FIELDS]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA device")


def random_codes(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> tuple[GroupedCodes, torch.Tensor]:
    """(repacked random blocks, the `gguf` package's float32 dequantization of them)."""
    raw = random_rows(QType[qtype], (rows, blocks_per_row), np.random.default_rng(seed))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, QType[qtype]).astype(np.float32))
    return GroupedCodes.from_gguf(torch.from_numpy(raw), qtype), expected


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (7, 3), (4, 10)])
def test_repacked_blocks_dequantize_bitwise_as_gguf(qtype: str, rows: int, blocks_per_row: int):
    codes, expected = random_codes(qtype, rows, blocks_per_row, seed=rows)
    assert codes.shape == tuple(expected.shape)
    assert torch.equal(codes.dequantize(), expected)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_row_slices_keep_their_values(qtype: str):
    codes, expected = random_codes(qtype, 9, 2)
    assert torch.equal(codes.rows(3, 8).dequantize(), expected[3:8])


@pytest.mark.parametrize("qtype,extra_bytes_per_block", [("Q4_K", 4), ("Q5_K", 4), ("Q6_K", 0), ("Q8_0", 0)])
def test_the_repacked_rows_are_hardly_larger_than_their_blocks(qtype: str, extra_bytes_per_block: int):
    """Q4_K/Q5_K: their 12 bytes of 6-bit scales and mins take 16 as bytes."""
    codes, expected = random_codes(qtype, 2, 4)
    stored = codes.stored_bytes
    block_size, type_size = gguf.GGML_QUANT_SIZES[QType[qtype]]
    assert stored == expected.numel() // block_size * (type_size + extra_bytes_per_block)


def test_int8_rows_dequantize_to_q_times_the_row_scale():
    q = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    scale = torch.rand(5, dtype=torch.bfloat16)
    assert torch.equal(GroupedCodes.from_int8(q, scale).dequantize(), q.float() * scale.float()[:, None])


def test_off_cuda_the_dequantized_rows_are_multiplied():
    codes, expected = random_codes("Q4_K", 3, 2)
    x = torch.randn(4, 512)
    torch.testing.assert_close(grouped_codes_linear(x, codes), x @ expected.T, rtol=1e-5, atol=1e-4)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("qtype", QTYPES)
def test_triton_kernels_match_the_dequantized_rows(qtype: str, m: int, dtype: torch.dtype):
    block_size = gguf.GGML_QUANT_SIZES[QType[qtype]][0]
    codes, expected = random_codes(qtype, 37, 2304 // block_size + (block_size == 32), seed=m)
    x = torch.randn(m, expected.shape[1], device="cuda").to(dtype)
    reference = x.double() @ expected.cuda().double().T
    if m > 1 and dtype == torch.bfloat16:  # the GEMM rounds each dequantized tile to x's dtype
        reference = (x @ expected.cuda().to(dtype).T).double()
    if m == 1 and codes_gemv.supports(codes):  # the integer GEMV rounds x to int8 (test_codes_gemv.py)
        reference = codes_gemv.reference(x, codes).double()
    out = grouped_codes_linear(x, codes.to(torch.device("cuda")))
    assert out.dtype == dtype and out.shape == (m, 37)
    scale = reference.abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.double() - reference).abs().max().item() <= tolerance * scale


@CUDA
@pytest.mark.parametrize("m", [1, 5, 64])
def test_triton_kernels_take_int8_rows(m: int):
    q = torch.randint(-127, 128, (45, 96), dtype=torch.int8, device="cuda")
    scale = (torch.rand(45, device="cuda") / 100).to(torch.bfloat16)
    x = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
    codes = GroupedCodes.from_int8(q, scale)
    reference = x @ (q.float() * scale.float()[:, None]).to(torch.bfloat16).T
    if m == 1:  # the integer GEMV rounds x to int8 (test_codes_gemv.py)
        reference = codes_gemv.reference(x, codes)
    out = grouped_codes_linear(x, codes)
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2 * reference.abs().max().item())
