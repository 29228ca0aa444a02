"""ops/triton/codes_gemv.py: the batch-1 integer GEMV over 4- and 8-bit codes. Its x rounding on any device; the
kernel against its float32 reference (dequantized rows times x rounded to int8 per 32 values) on a CUDA device, and
under Triton's interpreter in triton_interpreted_cases.py."""
import pytest
import torch

from chitu.ops.linear import grouped_codes_linear
from chitu.ops.triton import codes_gemv
from chitu.quant.grouped_codes import GroupedCodes
from test_grouped_codes import random_codes

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA device")
TAKEN = ["Q4_0", "Q4_1", "Q4_K", "Q8_0"]


def test_x_rounds_to_127_steps_of_each_groups_largest_magnitude():
    x = torch.randn(3, 96) * torch.logspace(-3, 3, 96)
    x[1, 32:64] = 0.0
    rounded = codes_gemv.quantize_dequantize_x(x)
    amax = x.view(3, 3, 32).abs().amax(dim=-1, keepdim=True)
    step = (amax / 127).expand(3, 3, 32).reshape(3, 96)
    assert torch.all((rounded - x).abs() <= step / 2 * (1 + 1e-6))
    assert torch.equal(rounded[1, 32:64], torch.zeros(32))
    multiples = rounded / step.clamp_min(1e-30)
    assert torch.allclose(multiples, multiples.round(), atol=1e-3)


@pytest.mark.parametrize("qtype,taken", [("Q4_K", True), ("Q4_0", True), ("Q8_0", True), ("Q6_K", False),
                                         ("Q5_K", False)])
def test_the_integer_gemv_takes_4_and_8_bit_codes_in_groups_of_32(qtype: str, taken: bool):
    codes, _ = random_codes(qtype, 2, 1)
    assert codes_gemv.supports(codes) == taken
    assert codes_gemv.supports(GroupedCodes.from_int8(torch.ones(2, 64, dtype=torch.int8), torch.ones(2)))


def check_against_reference(codes: GroupedCodes, dtype: torch.dtype, device: str, tile: dict | None = None) -> None:
    n, k = codes.shape
    x = torch.randn(1, k, device=device).to(dtype)
    expected = codes_gemv.reference(x, codes)
    out = codes_gemv.codes_gemv(x, codes.to(torch.device(device)), tile)
    assert out.dtype == dtype and out.shape == (1, n)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - expected).abs().max().item() <= tolerance * expected.abs().max().item()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (37, 9), (300, 3)])
@pytest.mark.parametrize("qtype", TAKEN)
def test_the_kernel_matches_its_reference(qtype: str, rows: int, blocks_per_row: int, dtype: torch.dtype):
    blocks = blocks_per_row * (8 if qtype in ("Q4_0", "Q4_1", "Q8_0") else 1)
    codes, _ = random_codes(qtype, rows, blocks, seed=rows)
    check_against_reference(codes, dtype, "cuda", dict(BLOCK_N=16, GROUPS=16))  # one tile: the next test takes all


@CUDA
@pytest.mark.parametrize("tile", codes_gemv.CONFIGS, ids=str)
def test_every_tile_matches_the_reference(tile):
    codes, _ = random_codes("Q4_K", 45, 5)
    check_against_reference(codes, torch.float32, "cuda", dict(tile.kwargs, num_warps=tile.num_warps))


@CUDA
def test_int8_rows_match_the_reference():
    q = torch.randint(-127, 128, (45, 96), dtype=torch.int8)
    check_against_reference(GroupedCodes.from_int8(q, torch.rand(45) / 100), torch.float32, "cuda")


@CUDA
def test_one_row_of_supported_codes_takes_the_integer_gemv():
    codes, _ = random_codes("Q4_K", 37, 3)
    codes = codes.to(torch.device("cuda"))
    x = torch.randn(1, 768, device="cuda")
    torch.testing.assert_close(grouped_codes_linear(x, codes), codes_gemv.codes_gemv(x, codes), rtol=0, atol=0)
