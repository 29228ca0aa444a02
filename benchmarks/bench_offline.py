"""Offline speed of SmolLM2-135M (GGUF Q4_1) on CPU: Chitu beside transformers (and llama-cpp-python
when installed), each measured in the same run, interleaved round by round.

    python benchmarks/bench_offline.py [--rounds 2] [--new-tokens 64] [--batches 1 8 32]

Reports decode tokens/s at each batch size (total over the batch, prefill excluded) and the time to
prefill one 128-token prompt. Lengths are fixed: EOS is ignored.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

PROMPT_LEN = 128
DECODE_PROMPT_LEN = 16


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=generator).tolist()


class ChituRunner:
    def __init__(self, dtype: str, max_batch: int):
        from chitu import LLM
        self.name = f"chitu ({dtype})"
        self.llm = LLM(f"dtype={dtype}", f"infer.max_reqs={max_batch}", "infer.max_seq_len=512")
        self.vocab = self.llm.engine.model_config.vocab_size

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Seconds from the first token to the last (decode only)."""
        from chitu import SamplingParams
        engine = self.llm.engine
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_with_eos=False)
        requests = [engine.add_request(p, params) for p in prompts]
        while not all(r.output_token_ids for r in requests):
            engine.step()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - start

    def prefill(self, prompt: list[int]) -> float:
        from chitu import SamplingParams
        start = time.perf_counter()
        self.llm.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0, stop_with_eos=False))
        return time.perf_counter() - start


class TransformersRunner:
    name = "transformers (fp32)"

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32).eval()
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


def build_runners(path: str, dtypes: list[str], max_batch: int) -> list:
    runners = [ChituRunner(d, max_batch) for d in dtypes] + [TransformersRunner(path)]
    try:
        runners.append(LlamaCppRunner(path))
    except ImportError:
        print("llama-cpp-python is not installed: skipping llama.cpp")
    return runners


def measure(runners: list, batches: list[int], new_tokens: int, rounds: int) -> dict:
    results: dict[tuple[str, str], list[float]] = {}

    def record(runner, key: str, fn: Callable[[], float]) -> None:
        try:
            results.setdefault((runner.name, key), []).append(fn())
        except NotImplementedError:
            pass

    for _ in range(rounds):
        for runner in runners:  # interleaved: every runner once per round
            prompt = random_prompts(1, PROMPT_LEN, runner.vocab)[0]
            record(runner, "prefill_128_s", lambda: runner.prefill(prompt))
            for batch in batches:
                prompts = random_prompts(batch, DECODE_PROMPT_LEN, runner.vocab)
                record(runner, f"decode_b{batch}_tok_s",
                       lambda: batch * (new_tokens - 1) / runner.generate(prompts, new_tokens))
    return {key: statistics.median(values) for key, values in results.items()}


def print_table(results: dict, runners: list, batches: list[int]) -> None:
    columns = ["prefill_128_s"] + [f"decode_b{b}_tok_s" for b in batches]
    print(f"\n{'engine':32}" + "".join(f"{c:>20}" for c in columns))
    for runner in runners:
        cells = [results.get((runner.name, c)) for c in columns]
        print(f"{runner.name:32}" + "".join(f"{v:>20.3f}" if v is not None else f"{'-':>20}" for v in cells))
    baseline = results.get(("transformers (fp32)", "decode_b1_tok_s"))
    for runner in runners[:-1]:
        if baseline and (runner.name, "decode_b1_tok_s") in results:
            b1 = results[(runner.name, "decode_b1_tok_s")] / baseline
            print(f"{runner.name}: batch 1 = {b1:.2f}x transformers' batch 1", end="")
            if (runner.name, f"decode_b{batches[-1]}_tok_s") in results:
                bn = results[(runner.name, f"decode_b{batches[-1]}_tok_s")] / baseline
                print(f"; batch {batches[-1]} total = {bn:.2f}x transformers' batch 1", end="")
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--chitu-dtypes", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    from chitu.config import ConfigError, compose_config
    try:
        path = compose_config().models.checkpoint_path()  # the default model: SmolLM2's GGUF
    except ConfigError as e:
        sys.exit(str(e))
    runners = build_runners(path, args.chitu_dtypes, max(args.batches))
    results = measure(runners, args.batches, args.new_tokens, args.rounds)
    print_table(results, runners, args.batches)


if __name__ == "__main__":
    main()
