"""The CPU kernels over GGUF blocks (ops/cpu/gguf.py) against `gguf`'s own dequantization and a float64
matmul: random blocks (random codes, finite random scales), in-features that are multiples of 32 but
not of 256 (Q4_K, Q5_K, Q6_K: of 256), odd out-features, 1 to 64 rows (eight at a time; past KERNEL_MAX_ROWS the
dequantized GEMM). Asked to quantize x (bf16 activations), the kernel multiplies x as llama.cpp does, quantized
to Q8_0: its product is with `gguf`'s Q8_0 round trip of x. Many bf16 rows meet the weights decoded to bf16 tiles."""
import subprocess
import sys

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from chitu.ops.cpu import gguf as gguf_ops
from test_quant_gguf import random_rows

QType = gguf.GGMLQuantizationType


K_SHAPES = [(77, 512), (5, 256), (130, 768)]  # whole super-blocks of 256
SHAPES = {"Q4_K": K_SHAPES, "Q5_K": K_SHAPES, "Q6_K": K_SHAPES}
QTYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_case(qtype: str, shape: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(random blocks [out, bytes], gguf's dequantization of them in float64, x [rows, in])."""
    out_features, in_features = SHAPES.get(qtype, [(77, 160), (5, 32), (130, 576)])[shape]
    block_size = gguf.GGML_QUANT_SIZES[QType[qtype]][0]
    blocks = random_rows(QType[qtype], (out_features, in_features // block_size), np.random.default_rng(rows))
    weight = torch.from_numpy(gguf.quants.dequantize(blocks, QType[qtype])).double()
    return torch.from_numpy(blocks), weight, torch.randn(rows, in_features)


def q8_0_round_trip(x: torch.Tensor) -> torch.Tensor:
    blocks = gguf.quants.quantize(x.numpy(), QType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(blocks, QType.Q8_0)).view_as(x)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", range(3))
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 24, 25, 64])
def test_kernel_is_the_product_with_gguf_dequantized_weights(qtype, shape, rows):
    blocks, weight, x = random_case(qtype, shape, rows)
    expected = x.double() @ weight.T
    out = gguf_ops.gguf_linear(x, blocks, qtype)
    assert out.dtype == torch.float32 and out.shape == (rows, weight.shape[0])
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", range(3))
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 24])
def test_quantized_x_meets_the_blocks_as_its_q8_0_round_trip(qtype, shape, rows):
    blocks, weight, x = random_case(qtype, shape, rows)
    expected = q8_0_round_trip(x).double() @ weight.T
    out = gguf_ops.kernels().linear(x, blocks, gguf_ops.FORMATS[qtype], True)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    blocks = random_rows(QType[qtype], (9, 3), np.random.default_rng(0))
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, QType[qtype]))
    assert torch.equal(gguf_ops.dequantize(torch.from_numpy(blocks), qtype, expected.shape[1]), expected)


def test_bf16_activations_come_back_in_bf16_and_leading_dims_are_kept():
    blocks = torch.from_numpy(random_rows(QType.Q4_1, (33, 3), np.random.default_rng(1)))
    x = torch.randn(1, 3, 96, dtype=torch.bfloat16)  # fewer rows than the bf16 tiles take
    out = gguf_ops.gguf_linear(x, blocks, "Q4_1")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 33)
    quantized = gguf_ops.kernels().linear(x.float().view(3, 96), blocks, gguf_ops.FORMATS["Q4_1"], True)
    assert torch.equal(out, quantized.bfloat16().view(1, 3, 33))


needs_tiles = pytest.mark.skipif(not gguf_ops.bf16_tiles(), reason="the bf16 tiles need AVX-512 BF16")


@needs_tiles
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", range(3))
@pytest.mark.parametrize("rows", [1, 4, 12, 13, 25])
def test_bf16_tiles_are_the_product_with_the_weights_rounded_to_bf16(qtype, shape, rows):
    """Each output is the float64 product of x with gguf's dequantized weights rounded to bf16, itself rounded to
    bf16 (2^-9 of it), up to weights whose bf16 rounding went the other way (the kernel rounds scale * q + min
    once, gguf twice): a term within 2^-10 of |x| |w|. Tiles cut at 32 weight rows and 12 rows of x; the shapes'
    5, 77 and 130 out-features end in partial tiles."""
    blocks, weight, x = random_case(qtype, shape, rows)
    x, weight = x.bfloat16(), weight.float().bfloat16().double()
    expected = x.double() @ weight.T
    out = gguf_ops.kernels().linear_bf16_tiles(x, blocks, gguf_ops.FORMATS[qtype])
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    bound = 2 ** -8 * expected.abs() + 2 ** -10 * (x.double().abs() @ weight.abs().T)
    assert ((out.double() - expected).abs() <= bound).all()


@needs_tiles
def test_many_bf16_rows_take_the_tiles():
    blocks, _, x = random_case("Q8_0", 2, gguf_ops.TILES_MIN_ROWS_SMALL)
    x = x.bfloat16()
    assert torch.equal(gguf_ops.gguf_linear(x, blocks, "Q8_0"),
                       gguf_ops.kernels().linear_bf16_tiles(x, blocks, gguf_ops.FORMATS["Q8_0"]))


def test_rows_the_kernel_cannot_take_are_refused_by_name():
    blocks = torch.from_numpy(random_rows(QType.Q8_0, (4, 2), np.random.default_rng(2)))
    with pytest.raises(RuntimeError, match="do not hold 96 values"):
        gguf_ops.gguf_linear(torch.randn(1, 96), blocks, "Q8_0")
    assert not gguf_ops.takes("Q2_K", 256) and not gguf_ops.takes("Q4_1", 48) and not gguf_ops.takes("Q6_K", 288)


def test_a_machine_that_cannot_build_the_kernels_is_told_what_is_missing(tmp_path):
    """Without ninja or a compiler on PATH (a fresh extension cache, so nothing is built yet)."""
    code = ("import torch; from chitu.ops.cpu import gguf\n"
            "gguf.gguf_linear(torch.zeros(1, 32), torch.zeros(1, 18, dtype=torch.uint8), 'Q4_0')")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "KernelBuildError: quant=gguf needs its CPU kernels (or drop quant=gguf" in proc.stderr
    assert "could not be built (a C++ compiler and ninja are needed)" in proc.stderr
