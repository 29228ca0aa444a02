"""The CPU kernel for plain float32 and bfloat16 weights (ops/cpu/linear.py) against a float64 matmul of
the same values: widths that are and are not multiples of its 32-value blocks, odd out-features, 1 to 40
rows (eight at a time), a bias; and ops.linear taking it on the CPU where it is faster."""
import pytest
import torch
import torch.nn.functional as F

from chitu.ops import linear as linear_ops
from chitu.ops.cpu import linear as cpu_linear


@pytest.mark.parametrize("out_features, in_features", [(77, 160), (5, 32), (130, 40), (33, 577)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_weights_times_rows_are_the_float64_product_rounded_once(out_features, in_features, rows, with_bias):
    torch.manual_seed(rows * in_features)
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).bfloat16()
    bias = torch.randn(out_features).bfloat16() if with_bias else None
    x = torch.randn(2, rows, in_features).bfloat16()
    out = cpu_linear.plain_linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, out_features)
    # float32 sums: the only error left is the final rounding to bfloat16 (2^-9 relative)
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=1e-6)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 3e-3


@pytest.mark.parametrize("out_features, in_features", [(77, 160), (130, 40), (33, 577)])
@pytest.mark.parametrize("rows", [1, 9, 16])
def test_float32_weights_times_rows_are_the_float64_product(out_features, in_features, rows):
    torch.manual_seed(rows * in_features)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    x = torch.randn(rows, in_features)
    expected = F.linear(x.double(), weight.double(), bias.double())
    out = cpu_linear.plain_linear(x, weight, bias)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


def test_ops_linear_takes_the_kernel_on_the_cpu_and_torch_past_its_rows_for_float32():
    weight, x = torch.randn(24, 64), torch.randn(cpu_linear.FLOAT32_MAX_ROWS + 1, 64)
    assert torch.equal(linear_ops.linear(x[:3].bfloat16(), weight.bfloat16()),
                       cpu_linear.plain_linear(x[:3].bfloat16(), weight.bfloat16()))
    assert torch.equal(linear_ops.linear(x[:-1], weight), cpu_linear.plain_linear(x[:-1], weight))
    assert torch.equal(linear_ops.linear(x, weight), F.linear(x, weight))
    assert not cpu_linear.takes_plain(x.half(), weight.half())
