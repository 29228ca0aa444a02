"""DeepSeek speed on the GPU, random weights generated here (issue 13's figures).

    python benchmarks/bench_deepseek.py [--quick] [--only v2-lite v3-fp8]

v2-lite: the DeepSeek-V2-Lite shape (15.7B, bf16, MLA absorb-without-precomp as the manual runs it), decode at
batch 1, 16, 64, 256 (128 prompt + 256 output tokens, greedy and the default sampling) against the active-parameter
roofline at the measured copy rate, and transformers' eager generate at 16 and 64.
v3-fp8: a DeepSeek-V3 shape cut to 4 decoder layers (3 dense, 1 MoE of 256 experts; real widths): decode step time
per layer at batch 1 and 64 with the fp8 weights kept (W8A8 projections, W8A16 experts) and dequantized to bf16
(infer.raise_lower_bit_float_to=bfloat16). The per-layer time is the step's over 4, LM head included.
The MLA latent kernel and the fp8 GEMM alone: bench_kernels.py --only MLA fp8.
"""
from __future__ import annotations

import argparse
import gc

import torch
import transformers

from bench_gpu import (bench_chitu, bench_transformers, chitu_decode, chitu_engine, copy_bandwidth, matmul_rate,
                       print_moe)

V2_LITE = transformers.DeepseekV2Config(
    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
    first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, vocab_size=102400, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=163840,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                         mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
    architectures=["DeepseekV2ForCausalLM"])

V3_4_LAYERS = transformers.DeepseekV3Config(
    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=4,
    num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
    first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
    vocab_size=129280, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=163840,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                         mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1),
    quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]),
    architectures=["DeepseekV3ForCausalLM"])


def run_v2_lite(batches: list[int], ceilings: dict) -> None:
    row = bench_chitu("DeepSeek-V2-Lite", V2_LITE, batches, ceilings, "deepseek-v3",
                      mla_absorb="absorb-without-precomp")
    print("DeepSeek-V2-Lite", {k: round(v, 3) for k, v in row.items()}, flush=True)
    hf = bench_transformers(V2_LITE, [b for b in batches if b in (16, 64)], quick=True, compiled=False)
    print_moe("DeepSeek-V2-Lite", row, hf, batches)


def run_v3_fp8(batches: list[int]) -> None:
    print(f"\n{'DeepSeek-V3, 4 layers':34}" + "".join(f"{'b' + str(b) + ' ms/layer':>15}" for b in batches))
    for label, raise_to in (("fp8 kept (W8A8)", "float8_e4m3fn"), ("dequantized to bf16", "bfloat16")):
        engine = chitu_engine(V3_4_LAYERS, max(batches), "deepseek-v3", "absorb-without-precomp", raise_to)
        chitu_decode(engine, 2)
        steps = [chitu_decode(engine, b)[1] for b in batches]
        print(f"{label:34}" + "".join(f"{step * 1e3 / 4:>15.3f}" for step in steps), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1, 16 and 64 only")
    parser.add_argument("--only", nargs="+", choices=["v2-lite", "v3-fp8"], default=["v2-lite", "v3-fp8"])
    args = parser.parse_args()
    ceilings = {"copy": copy_bandwidth(), "matmul": matmul_rate()}
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy'] / 1e12:.2f} TB/s", flush=True)
    if "v3-fp8" in args.only:
        run_v3_fp8([1, 64])
    if "v2-lite" in args.only:
        run_v2_lite([1, 16, 64] if args.quick else [1, 16, 64, 256], ceilings)


if __name__ == "__main__":
    main()
