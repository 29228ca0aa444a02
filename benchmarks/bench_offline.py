"""Offline speed on CPU: Chitu beside transformers (and llama-cpp-python when installed), each measured
in the same run, interleaved round by round, on two models:

- SmolLM2-135M (GGUF Q4_1): Chitu in bf16 and fp32, transformers on the dequantized weights in fp32;
- a random Qwen3-MoE of 0.49B parameters, 0.1B active (hidden 1024, 8 layers of 64 experts with 8
  active per token, moe_intermediate_size 256, 16 heads / 4 KV heads of 64, vocab 32000), which
  transformers' `save_pretrained` writes to a temporary directory (safetensors, experts one by one) and
  Chitu reads as `hf-qwen-3-moe`. Both engines in bf16 and in fp32 (`--moe-dtypes`); transformers
  through `Qwen3MoeForCausalLM.generate` with its default experts (`grouped_mm`: one grouped matmul
  per projection) and with its per-expert loop (`eager`).

    python benchmarks/bench_offline.py [--rounds 2] [--new-tokens 64] [--batches 1 8 32]
        [--moe-new-tokens 16] [--moe-batches 1 8] [--moe-dtypes bfloat16 float32] [--moe-only | --no-moe]
        [--quant w8a16 simple_w8a8 gguf]

Reports decode tokens/s at each batch size (total over the batch, prefill excluded), the time to
prefill one 128-token prompt, and Chitu's decode speed over transformers' at the same batch size.
Lengths are fixed: EOS is ignored, decoding is greedy, prompts are random token ids (16 tokens for
decode) from a seeded generator, and the random weights are seeded. Both engines share the process
and so torch's CPU threads, which Chitu sets when it starts (infer.num_threads, by default the
physical cores); OMP_WAIT_POLICY defaults to PASSIVE, as in the test suite.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

# OpenMP threads that spin while they wait crawl when other processes share the cores; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

PROMPT_LEN = 128
# The activations of a quantized run, where not bfloat16 alone: GGUF blocks meet float32 x decoded to floats,
# bf16 x quantized to Q8_0 in integer dots (ops/cpu/gguf.py).
QUANT_DTYPES = {"gguf": ["float32", "bfloat16"]}
DECODE_PROMPT_LEN = 16
SEED = 0
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
# About 0.49B parameters, 0.1B of them active per token.
MOE_CONFIG = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
                  moe_intermediate_size=256, intermediate_size=2048, norm_topk_prob=True,
                  max_position_embeddings=2048, tie_word_embeddings=False)


def random_prompts(batch: int, length: int, vocab: int, seed: int = SEED) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=generator).tolist()


class ChituRunner:
    """Chitu's engine on the configured checkpoint (the default model's when `ckpt_dir` is None)."""

    def __init__(self, dtype: str, max_batch: int, ckpt_dir: str | None = None, model_type: str | None = None,
                 quant: str | None = None):
        """`quant`: a method that quantizes the weights as they load (quant=w8a16 quant_on_load=True), or
        gguf (keep a GGUF file's blocks); None: the weights dequantized into `dtype` (quant=none)."""
        from chitu.config import compose_config
        from chitu.engine.engine import LLMEngine
        self.name = f"chitu ({dtype}{f', {quant}' if quant else ''})"
        overrides = [f"dtype={dtype}", "device=cpu", f"infer.max_reqs={max_batch}", "infer.max_seq_len=512"]
        overrides.append(f"quant={quant or 'none'}")
        if quant not in (None, "gguf"):
            overrides.append("quant_on_load=True")
        if ckpt_dir is not None:
            overrides.append(f"models.ckpt_dir={ckpt_dir}")
        if model_type is not None:
            overrides.append(f"models.type={model_type}")
        self.engine = LLMEngine(compose_config(overrides), load_tokenizer=False)  # token-id prompts only
        self.vocab = self.engine.model_config.vocab_size

    def _add(self, prompts: list[list[int]], new_tokens: int) -> list:
        from chitu import SamplingParams
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_with_eos=False)
        return [self.engine.add_request(p, params) for p in prompts]

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Seconds from the first token to the last (decode only)."""
        requests = self._add(prompts, new_tokens)
        while not all(r.output_token_ids for r in requests):
            self.engine.step()
        start = time.perf_counter()
        while self.engine.has_unfinished():
            self.engine.step()
        return time.perf_counter() - start

    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self._add([prompt], 1)
        while self.engine.has_unfinished():
            self.engine.step()
        return time.perf_counter() - start


class TransformersRunner:
    """transformers' generate on a GGUF file (dequantized) or a save_pretrained directory."""

    def __init__(self, path: str, dtype: str = "float32", experts: str | None = None):
        """`experts`: transformers' experts_implementation for MoE models (None: its default)."""
        from transformers import AutoModelForCausalLM
        kwargs = {"dtype": getattr(torch, dtype)} | ({"experts_implementation": experts} if experts else {})
        if path.endswith(".gguf"):
            self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              **kwargs)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        self.name = f"transformers ({SHORT_DTYPES.get(dtype, dtype)}{f', {experts} experts' if experts else ''})"
        self.model.eval()
        self.vocab = self.model.config.vocab_size

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        first = self.prefill_batch(prompts)
        start = time.perf_counter()
        self._generate(prompts, new_tokens)
        return time.perf_counter() - start - first

    def prefill_batch(self, prompts: list[list[int]]) -> float:
        start = time.perf_counter()
        self._generate(prompts, 1)
        return time.perf_counter() - start

    def prefill(self, prompt: list[int]) -> float:
        return self.prefill_batch([prompt])


class LlamaCppRunner:
    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, path: str):
        import llama_cpp
        self.llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
        self.vocab = self.llm.n_vocab()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        if len(prompts) != 1:
            raise NotImplementedError
        self.llm.reset()
        self.llm.eval(prompts[0])
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([int(self.llm.sample(temp=0))])
        return time.perf_counter() - start

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return time.perf_counter() - start


def build_runners(path: str | None, dtypes: list[str], max_batch: int, llama_cpp: bool = False,
                  quants: tuple[str, ...] = ()) -> list:
    """Chitu in each dtype (and with each quantization: in bf16, gguf in fp32 and bf16), then transformers in fp32 (the
    baseline), then llama.cpp where asked and installed. `path`: the checkpoint; None for the default
    model (SmolLM2's GGUF)."""
    from chitu.config import ConfigError, compose_config
    try:
        hf_path = path or compose_config().models.checkpoint_path()
    except ConfigError as e:
        sys.exit(str(e))
    runners = ([ChituRunner(d, max_batch, path) for d in dtypes]
               + [ChituRunner(d, max_batch, path, quant=q) for q in quants for d in QUANT_DTYPES.get(q, ["bfloat16"])]
               + [TransformersRunner(hf_path)])
    if llama_cpp:
        try:
            runners.append(LlamaCppRunner(hf_path))
        except ImportError:
            print("llama-cpp-python is not installed: skipping llama.cpp")
    return runners


def save_random_moe(directory: str, config: dict = MOE_CONFIG) -> int:
    """A random Qwen3-MoE (transformers' initialization, seeded) saved as safetensors, experts one by
    one (the layout Chitu reads); returns its parameter count."""
    import transformers
    transformers.set_seed(SEED)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config))
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def measure(runners: list, batches: list[int], new_tokens: int, rounds: int) -> dict:
    results: dict[tuple[str, str], list[float]] = {}

    def record(runner, key: str, fn: Callable[[], float]) -> None:
        try:
            value = fn()
        except NotImplementedError:  # llama.cpp's runner decodes one sequence at a time
            return
        results.setdefault((runner.name, key), []).append(value)

    for _ in range(rounds):
        for runner in runners:  # interleaved: every runner once per round
            prompt = random_prompts(1, PROMPT_LEN, runner.vocab)[0]
            record(runner, "prefill_128_s", lambda: runner.prefill(prompt))
            for batch in batches:
                prompts = random_prompts(batch, DECODE_PROMPT_LEN, runner.vocab)
                record(runner, f"decode_b{batch}_tok_s",
                       lambda: batch * (new_tokens - 1) / runner.generate(prompts, new_tokens))
    return {key: statistics.median(values) for key, values in results.items()}


def print_table(title: str, results: dict, runners: list, batches: list[int]) -> None:
    columns = ["prefill_128_s"] + [f"decode_b{b}_tok_s" for b in batches]
    print(f"\n{title}\n{'engine':32}" + "".join(f"{c:>20}" for c in columns))
    for runner in runners:
        cells = [results.get((runner.name, c)) for c in columns]
        print(f"{runner.name:32}" + "".join(f"{v:>20.3f}" if v is not None else f"{'-':>20}" for v in cells))
    baselines = [r.name for r in runners if isinstance(r, TransformersRunner)]
    for runner in runners:
        if not isinstance(runner, ChituRunner):
            continue
        for baseline in baselines:
            ratios = [f"batch {b} = {results[(runner.name, c)] / results[(baseline, c)]:.2f}x"
                      for b, c in zip(batches, columns[1:]) if (runner.name, c) in results and (baseline, c) in results]
            print(f"{runner.name} decode: {', '.join(ratios)} {baseline} at the same batch")


def run_smollm2(args) -> None:
    runners = build_runners(None, args.chitu_dtypes, max(args.batches), llama_cpp=True, quants=args.quant)
    results = measure(runners, args.batches, args.new_tokens, args.rounds)
    print_table(f"SmolLM2-135M (GGUF Q4_1), {args.new_tokens} new tokens, median of {args.rounds} rounds",
                results, runners, args.batches)


def run_moe(args, config: dict = MOE_CONFIG) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_moe_") as directory:
        params = save_random_moe(directory, config)
        gc.collect()
        runners = [ChituRunner(dtype, max(args.moe_batches), directory, "hf-qwen-3-moe") for dtype in args.moe_dtypes]
        runners += [ChituRunner("bfloat16", max(args.moe_batches), directory, "hf-qwen-3-moe", quant)
                    for quant in args.quant if quant != "gguf"]  # a safetensors checkpoint
        # transformers' default experts (grouped_mm: one grouped matmul per projection) and its per-expert loop
        runners += [TransformersRunner(directory, dtype, experts)
                    for dtype in args.moe_dtypes for experts in ("grouped_mm", "eager")]
        results = measure(runners, args.moe_batches, args.moe_new_tokens, args.rounds)
    print_table(f"random Qwen3-MoE, {params / 1e9:.2f}B parameters ({config['num_experts_per_tok']} of "
                f"{config['num_experts']} experts active), {args.moe_new_tokens} new tokens, median of {args.rounds} "
                f"rounds, {torch.get_num_threads()} threads", results, runners, args.moe_batches)


def main(argv: list[str] | None = None, moe_config: dict = MOE_CONFIG) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--chitu-dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--moe-new-tokens", type=int, default=16)
    parser.add_argument("--moe-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--moe-dtypes", nargs="+", choices=list(SHORT_DTYPES), default=["bfloat16", "float32"],
                        help="the dtypes both engines run the MoE model in")
    parser.add_argument("--quant", nargs="*", choices=["w8a16", "simple_w8a8", "gguf"], default=[],
                        help="also Chitu in bf16 with these weights quantized as they load (quant_on_load=True); "
                             "gguf: SmolLM2's blocks kept, float32 activations")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--moe-only", action="store_true", help="only the random Qwen3-MoE")
    only.add_argument("--no-moe", action="store_true", help="only SmolLM2")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    if not args.moe_only:
        run_smollm2(args)
        gc.collect()
    if not args.no_moe:
        run_moe(args, moe_config)


if __name__ == "__main__":
    main()
