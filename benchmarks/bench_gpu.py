"""GPU speed of the whole engine on full-size shapes with random bf16 weights, beside the machine's own
ceilings and transformers, all measured in this one run.

    python benchmarks/bench_gpu.py [--quick] [--moe [Qwen3-30B-A3B Mixtral-8x7B]]

For Llama-3.1-8B and Qwen3-8B shapes (with --moe: Qwen3-30B-A3B and Mixtral-8x7B, against the
active-parameter roofline at batch 1 and the all-weights roofline at larger batches): decode tokens/s at batch 1, 16, 64, 256 (128 prompt tokens,
256 output tokens, EOS ignored; greedy, and with the default sampling settings: temperature 0.8,
top-p 0.9, top-k 50), a 2048-token prefill, and the host time per decode step at
batch 1. Ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate.
transformers: generate() with a static cache on the Llama shape at the same batch sizes.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
import transformers

from chitu.config import compose_config
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.layers.moe.experts import StackedExperts
from chitu.models.registry import build_model

SHAPES = {
    "Llama-3.1-8B": transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"],
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "Qwen3-8B": transformers.Qwen3Config(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, architectures=["Qwen3ForCausalLM"],
        tie_word_embeddings=False),
}
MOE_SHAPES = {  # name: (models.type, config)
    "Qwen3-30B-A3B": ("hf-qwen-3-moe", transformers.Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"])),
    "Mixtral-8x7B": ("hf-mixtral", transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, rms_norm_eps=1e-5,
        sliding_window=None, architectures=["MixtralForCausalLM"])),
}
PROMPT, OUTPUT, PREFILL = 128, 256, 2048
BATCHES = [1, 16, 64, 256]


def timed(fn, repeat: int = 10, inner: int = 1) -> float:
    """Median seconds of fn() on the GPU; with inner > 1, of `inner` calls back to back (divided), so that a
    kernel shorter than its launch is timed by the GPU's queue, not by the host's launch overhead."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    a = torch.randn(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / timed(lambda: b.copy_(a))


def matmul_rate() -> float:
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return 2 * 8192**3 / timed(lambda: a @ b)


def random_prompts(batch: int, length: int, vocab: int, seed: int | None = None) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch if seed is None else seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def chitu_engine(hf_config, max_batch: int, model_type: str = "hf-llama", mla_absorb: str = "none",
                 raise_lower_bit_float_to: str = "float8_e4m3fn") -> LLMEngine:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(hf_config, model_type, PREFILL + 64, torch.bfloat16, mla_absorb, raise_lower_bit_float_to)
    for name, p in model.named_parameters():
        if name.endswith("weight_scale_inv"):  # fp8 blocks: codes of about unit size times 0.02
            p.fill_(0.02)
        elif p.dim() > 1:
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0, 1 if p.dtype == torch.float8_e4m3fn else 0.02))
    blocks = max_batch * (PROMPT + OUTPUT) // 64 + 64
    config = compose_config(["device=cuda", f"infer.max_reqs={max_batch}", f"infer.max_seq_len={PREFILL + 64}",
                             f"infer.num_blocks={blocks}", "infer.use_cuda_graph=True"])
    return LLMEngine(config, model=model)


def chitu_decode(engine: LLMEngine, batch: int, sampled: bool = False) -> tuple[float, float]:
    """(decode tokens/s over the batch, seconds per decode step), greedy or with the default sampling."""
    params = (SamplingParams(max_new_tokens=OUTPUT, stop_with_eos=False) if sampled
              else SamplingParams(max_new_tokens=OUTPUT, temperature=0, stop_with_eos=False))
    requests = [engine.add_request(p, params) for p in random_prompts(batch, PROMPT, engine.model_config.vocab_size)]
    while not all(r.output_token_ids for r in requests):
        engine.step()
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    return batch * (OUTPUT - 1) / elapsed, elapsed / steps


def chitu_prefill(engine: LLMEngine, seed: int) -> float:
    """Seconds to prefill a fresh 2048-token prompt: each seed its own, so the prefix cache cannot serve it."""
    params = SamplingParams(max_new_tokens=1, temperature=0, stop_with_eos=False)
    prompt = random_prompts(1, PREFILL, engine.model_config.vocab_size, seed=1000 + seed)[0]
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def graph_replay_seconds(engine: LLMEngine) -> float:
    """GPU time of the batch-1 decode graph alone: the step minus this is the host's share."""
    return timed(engine.worker.runner.graphs.graphs[1].replay, repeat=50)


def prefill_flops(hf_config, params_without_embedding: int, tokens: int) -> float:
    layers, heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    attention = 2 * 2 * layers * heads * head_dim * tokens * tokens / 2  # QK^T and PV, causal half
    return 2 * params_without_embedding * tokens + attention


def inactive_expert_params(model: torch.nn.Module, top_k: int) -> int:
    """Parameters of the experts one token does not touch: all but top_k of every MoE layer's."""
    stacks = [m for m in model.modules() if isinstance(m, StackedExperts)]
    return sum((s.gate_up.weight.shape[0] - top_k) * (s.gate_up.weight[0].numel() + s.down.weight[0].numel())
               for s in stacks)


def bench_chitu(name: str, hf_config, batches: list[int], ceilings: dict, model_type: str = "hf-llama",
                mla_absorb: str = "none") -> dict:
    engine = chitu_engine(hf_config, max(batches), model_type, mla_absorb)
    model = engine.worker.runner.model
    total_params = sum(p.numel() for p in model.parameters())
    active_params = total_params - inactive_expert_params(model, getattr(hf_config, "num_experts_per_tok", 0))
    body_params = active_params - model.model.embed_tokens.weight.numel()
    chitu_decode(engine, 2)  # warm-up: compiles the prefill kernels
    row = {"params_B": total_params / 1e9, "active_B": active_params / 1e9}
    for batch in batches:
        row[f"b{batch}"], row[f"b{batch}_step_ms"] = chitu_decode(engine, batch)
        row[f"b{batch}_step_ms"] *= 1e3
        row[f"b{batch}_sampled"] = chitu_decode(engine, batch, sampled=True)[0]
    chitu_prefill(engine, seed=0)
    row["prefill_s"] = min(chitu_prefill(engine, seed) for seed in range(1, 4))
    row["prefill_tflops"] = prefill_flops(hf_config, body_params, PREFILL) / row["prefill_s"] / 1e12
    row["roofline_b1"] = ceilings["copy"] / (active_params * 2)  # the bytes one token reads
    row["roofline_all_weights"] = ceilings["copy"] / (total_params * 2)  # steps/s when every weight is read
    row["graph_ms"] = graph_replay_seconds(engine) * 1e3
    row["host_ms"] = row["b1_step_ms"] - row["graph_ms"]
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def hf_decode_rate(model, batch: int, vocab: int, new_tokens: int, compiled: bool) -> float:
    ids = torch.tensor(random_prompts(batch, PROMPT, vocab), device="cuda")

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not compiled)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(2)
    return batch * (new_tokens - 1) / (generate(new_tokens) - generate(1))


def bench_transformers(hf_config, batches: list[int], quick: bool, compiled: bool = True) -> dict:
    """`compiled`: generate's automatic torch.compile of the static-cache forward (its fast path for dense
    models); off, the eager forward (MoE shapes: compiling their routed experts outlasts the run)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    row = {}
    for batch in batches:
        new_tokens = 32 if quick or batch == 1 else OUTPUT  # batch 1 is slow eager: a shorter run gives the rate
        row[f"b{batch}"] = hf_decode_rate(model, batch, hf_config.vocab_size, new_tokens, compiled)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def print_moe(name: str, row: dict, hf: dict, batches: list[int]) -> None:
    print(f"\n{'engine / shape':36}" + "".join(f"{'b' + str(b) + ' tok/s':>13}" for b in batches)
          + f"{'prefill 2k s':>14}{'step b1 ms':>12}")
    print(f"{'chitu ' + name:36}" + "".join(f"{row[f'b{b}']:>13.1f}" for b in batches)
          + f"{row['prefill_s']:>14.4f}{row['b1_step_ms']:>12.2f}")
    print(f"{'  sampled (T=0.8 p=0.9 k=50)':36}" + "".join(f"{row[f'b{b}_sampled']:>13.1f}" for b in batches))
    print(f"{'transformers (eager) ' + name:36}" + "".join(f"{hf[f'b{b}']:>13.1f}" if f"b{b}" in hf else f"{'-':>13}"
                                                 for b in batches))
    print(f"{name}: {row['params_B']:.2f}B parameters, {row['active_B']:.2f}B active per token; batch 1 "
          f"{row['b1']:.1f} tok/s = {row['b1'] / row['roofline_b1']:.1%} of the active-parameter roofline "
          f"({row['roofline_b1']:.0f} tok/s)")
    for b in batches[1:]:  # batch 1 reads only the active parameters
        line = f"  batch {b}: {row[f'b{b}'] / (b * row['roofline_all_weights']):.1%} of the all-weights roofline"
        if f"b{b}" in hf:
            line += f", {row[f'b{b}'] / hf[f'b{b}']:.2f}x transformers"
        print(line)


def run_moe(batches: list[int], ceilings: dict, shapes: list[str]) -> None:
    for name in shapes:
        model_type, config = MOE_SHAPES[name]
        row = bench_chitu(name, config, batches, ceilings, model_type)
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        hf = bench_transformers(config, [b for b in batches if b in (16, 64)], quick=True, compiled=False)
        print_moe(name, row, hf, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, batches 1 and 64")
    parser.add_argument("--moe", nargs="*", choices=list(MOE_SHAPES), default=None,
                        help="the MoE shapes instead of the dense ones (all when none is named)")
    args = parser.parse_args()
    if args.moe is not None:
        ceilings = {"copy": copy_bandwidth(), "matmul": matmul_rate()}
        print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy'] / 1e12:.2f} TB/s", flush=True)
        run_moe([1, 16, 64] if args.quick else BATCHES, ceilings, args.moe or list(MOE_SHAPES))
        return
    batches = [1, 64] if args.quick else BATCHES
    ceilings = {"copy": copy_bandwidth(), "matmul": matmul_rate()}
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['matmul'] / 1e12:.0f} TFLOP/s", flush=True)
    shapes = list(SHAPES)[:1] if args.quick else list(SHAPES)
    results = {}
    for name in shapes:
        results[name] = bench_chitu(name, SHAPES[name], batches, ceilings)
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    hf = bench_transformers(SHAPES["Llama-3.1-8B"], batches, args.quick)
    print("transformers", {k: round(v, 1) for k, v in hf.items()}, flush=True)
    print(f"\n{'engine / shape':28}" + "".join(f"{'b' + str(b) + ' tok/s':>13}" for b in batches)
          + f"{'prefill 2k s':>14}{'step b1 ms':>12}{'graph b1 ms':>12}{'host b1 ms':>12}")
    for name, row in results.items():
        print(f"{'chitu ' + name:28}" + "".join(f"{row[f'b{b}']:>13.1f}" for b in batches)
              + f"{row['prefill_s']:>14.4f}{row['b1_step_ms']:>12.2f}{row['graph_ms']:>12.2f}{row['host_ms']:>12.2f}")
        print(f"{'  sampled (T=0.8 p=0.9 k=50)':28}" + "".join(f"{row[f'b{b}_sampled']:>13.1f}" for b in batches))
    print(f"{'transformers Llama-3.1-8B':28}" + "".join(f"{hf[f'b{b}']:>13.1f}" for b in batches))
    for name, row in results.items():
        print(f"\n{name}: batch 1 {row['b1']:.1f} tok/s = {row['b1'] / row['roofline_b1']:.1%} of the "
              f"{row['roofline_b1']:.0f} tok/s roofline ({row['params_B']:.2f}B bf16 params at the measured copy rate); "
              f"2048-token prefill {row['prefill_tflops']:.0f} TFLOP/s = {row['prefill_tflops'] * 1e12 / ceilings['matmul']:.1%} "
              f"of the matmul rate; host {row['host_ms']:.2f} ms vs GPU {row['graph_ms']:.2f} ms per batch-1 step")
    llama = results["Llama-3.1-8B"]
    print(f"Llama-3.1-8B batch 64: chitu {llama['b64']:.0f} tok/s = {llama['b64'] / hf['b64']:.2f}x transformers' "
          f"static cache ({hf['b64']:.0f} tok/s)")


if __name__ == "__main__":
    main()
