"""The CPU MoE kernel (ops/cpu/moe.py) against a float64 per-token loop over the same weights: float32,
bfloat16 and int8 (W8A16) experts, widths that are and are not multiples of its 32-value blocks, one to
32 tokens, a rank holding only some experts (expert parallelism) or none of a step's; GGUF experts (random
blocks of every type the kernels take) over `gguf`'s dequantization of them, with float32 activations and with
bf16 ones (which meet the blocks through Q8_0), and on the torch reference past the kernel's token limit."""
import gguf
import gguf.quants
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chitu.ops import moe as moe_ops
from chitu.ops.cpu import moe as cpu_moe
from chitu.ops.torch_ref import moe as ref
from chitu.quant.int8 import (Int8DynamicActivationMethod, Int8ExpertStack, Int8WeightOnlyMethod, dequantize,
                              int8_linear, quantize_per_channel, w8a8_linear)
from chitu.quant.gguf_blocks import GGUFExpertStack
from test_cpu_gguf_ops import QTYPES, q8_0_round_trip
from test_moe_ops import per_token
from test_quant_gguf import random_rows


def int8_stack(weights: torch.Tensor, scale_dtype: torch.dtype, weight_only: bool = True) -> Int8ExpertStack:
    q, scale = zip(*(quantize_per_channel(w, scale_dtype) for w in weights))
    return Int8ExpertStack.of(torch.stack(q), torch.stack(scale), int8_linear if weight_only else w8a8_linear,
                              weight_only)


def routed(tokens: int, experts: int, top_k: int, seed: int):
    torch.manual_seed(seed)
    return ref.select_experts(torch.randn(tokens, experts) * 3, top_k, "softmax", True, None, 1, 1, 1.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("hidden, inter", [(64, 32), (96, 40), (40, 17)])
@pytest.mark.parametrize("tokens, experts, top_k, held", [
    (1, 8, 2, range(8)), (3, 7, 3, range(7)), (8, 16, 4, range(16)), (32, 10, 4, range(3, 8)), (5, 6, 2, range(5, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_experts_match_the_per_token_loop(hidden, inter, tokens, experts, top_k, held, dtype):
    weights, ids = routed(tokens, experts, top_k, tokens + hidden)
    x = torch.randn(tokens, hidden).to(dtype)
    gate_up = (torch.randn(len(held), 2 * inter, hidden) / hidden ** 0.5).to(dtype)
    down = (torch.randn(len(held), hidden, inter) / inter ** 0.5).to(dtype)
    assert cpu_moe.takes(x, gate_up, down)
    out = cpu_moe.fused_experts(x, gate_up, down, weights, ids, held.start)
    expected = per_token(x.double(), gate_up.double(), down.double(), weights.double(), ids, held.start)
    assert out.dtype == dtype and out.shape == x.shape
    # float32 sums in both dtypes; bfloat16 only rounds the result
    assert relative_error(out, expected) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8, 29])
def test_int8_experts_match_the_loop_over_their_dequantized_weights(scale_dtype, tokens):
    hidden, inter, experts = 96, 40, 12
    weights, ids = routed(tokens, experts, 3, tokens)
    gate_up, down = int8_stack(torch.randn(experts, 2 * inter, hidden), scale_dtype), \
        int8_stack(torch.randn(experts, hidden, inter), scale_dtype)
    x = torch.randn(tokens, hidden)
    out = cpu_moe.fused_experts(x, gate_up, down, weights, ids, 0)
    expected = per_token(x.double(), dequantize(gate_up.q, gate_up.scale).double(),
                         dequantize(down.q, down.scale).double(), weights.double(), ids, 0)
    assert relative_error(out, expected) < 1e-6


def test_a_rank_holding_none_of_the_chosen_experts_contributes_zeros():
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    out = cpu_moe.fused_experts(torch.randn(3, 32), torch.randn(2, 64, 32), torch.randn(2, 32, 32),
                                torch.ones(3, 2), ids, first_expert=2)
    assert torch.equal(out, torch.zeros(3, 32))


def test_the_moe_op_takes_the_float32_kernel_up_to_its_limit_and_the_reference_past_it():
    experts, hidden, inter = 8, 64, 32
    gate_up, down = torch.randn(experts, 2 * inter, hidden) / 8, torch.randn(experts, hidden, inter) / 8
    for tokens in (cpu_moe.FLOAT32_MAX_TOKENS, cpu_moe.FLOAT32_MAX_TOKENS + 1):
        weights, ids = routed(tokens, experts, 2, tokens)
        x = torch.randn(tokens, hidden)
        out = moe_ops.fused_experts(x, gate_up, down, weights, ids, 0)
        taken = cpu_moe.fused_experts(x, gate_up, down, weights, ids, 0)
        assert torch.equal(out, taken) == (tokens <= cpu_moe.FLOAT32_MAX_TOKENS)
        expected = per_token(x.double(), gate_up.double(), down.double(), weights.double(), ids, 0)
        assert relative_error(out, expected) < 1e-6


def test_w8a8_experts_and_half_precision_are_left_to_the_reference():
    """W8A8 quantizes activations, which the kernel does not; float16 it does not read."""
    x = torch.randn(2, 64)
    w8a8 = int8_stack(torch.randn(4, 64, 64), torch.float32, weight_only=False)
    assert not cpu_moe.takes(x, w8a8, w8a8)
    assert not cpu_moe.takes(x.half(), torch.randn(4, 64, 64).half(), torch.randn(4, 64, 32).half())
    assert Int8WeightOnlyMethod.weight_only and not Int8DynamicActivationMethod.weight_only


def gguf_stack(qtype: str, experts: int, rows: int, in_features: int, seed: int) -> tuple[GGUFExpertStack, torch.Tensor]:
    """(random GGUF experts [experts, rows, bytes], gguf's dequantization of them in float64)."""
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    blocks = random_rows(gguf.GGMLQuantizationType[qtype], (experts, rows, in_features // block_size),
                         np.random.default_rng(seed))
    dense = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])).double()
    return GGUFExpertStack.of(torch.from_numpy(blocks), qtype, in_features), dense


def gguf_experts(qtype: str, experts: int, tokens: int):
    """Experts of hidden size and width 256 (whole K-quant super-blocks) and x [tokens, 256] small enough that silu
    sees values of about one."""
    hidden = inter = 256
    (gate_up, gate_up_dense), (down, down_dense) = (gguf_stack(qtype, experts, 2 * inter, hidden, tokens),
                                                    gguf_stack(qtype, experts, hidden, inter, tokens + 1))
    weights, ids = routed(tokens, experts, 2, tokens)
    x = torch.randn(tokens, hidden) / hidden ** 0.5
    return x, gate_up, down, gate_up_dense, down_dense, weights, ids


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 24])
def test_gguf_experts_match_the_loop_over_their_dequantized_blocks(qtype, tokens):
    x, gate_up, down, gate_up_dense, down_dense, weights, ids = gguf_experts(qtype, 6, tokens)
    assert cpu_moe.takes(x, gate_up, down)
    out = cpu_moe.fused_experts(x, gate_up, down, weights, ids, 1)
    expected = per_token(x.double(), gate_up_dense, down_dense, weights.double(), ids, 1)
    assert relative_error(out, expected) < 1e-6


def per_token_through_q8_0(x, gate_up, down, weights, ids) -> torch.Tensor:
    """per_token with each projection's input through ggml's Q8_0 round trip, as the kernel takes bf16 activations."""
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = F.linear(q8_0_round_trip(x[t:t + 1]).double(), gate_up[ids[t, k]]).chunk(2, dim=-1)
            h = q8_0_round_trip((F.silu(gate) * up).float()).double()
            out[t] += weights[t, k] * F.linear(h, down[ids[t, k]])[0]
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_bf16_activations_meet_gguf_experts_through_q8_0(qtype):
    """x and silu(gate) * up quantized to Q8_0 as llama.cpp takes them (the loop rounds silu(gate) * up from float64,
    the kernel from float32, which may move a rare code by one); unquantized, x would be ~1e-2 off this loop."""
    x, gate_up, down, gate_up_dense, down_dense, weights, ids = gguf_experts(qtype, 5, 8)
    out = cpu_moe.fused_experts(x.bfloat16(), gate_up, down, weights, ids, 0)
    assert out.dtype == torch.bfloat16
    expected = per_token_through_q8_0(x.bfloat16().float(), gate_up_dense, down_dense, weights.double(), ids)
    assert relative_error(out, expected) < 4e-3  # bf16's rounding of the result: ~1.6e-3


def test_gguf_experts_past_the_kernels_limit_run_on_the_reference():
    for tokens in (cpu_moe.BLOCKS_MAX_TOKENS, cpu_moe.BLOCKS_MAX_TOKENS + 1):
        x, gate_up, down, gate_up_dense, down_dense, weights, ids = gguf_experts("Q4_K", 4, tokens)
        assert cpu_moe.takes(x, gate_up, down) == (tokens <= cpu_moe.BLOCKS_MAX_TOKENS)
        out = moe_ops.fused_experts(x, gate_up, down, weights, ids, 0)
        expected = per_token(x.double(), gate_up_dense, down_dense, weights.double(), ids, 0)
        assert relative_error(out, expected) < 1e-6
