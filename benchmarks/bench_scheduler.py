"""The serving scheduler on the GPU (Llama-3.1-8B shape, random bf16 weights), all measured in this one run:

    python benchmarks/bench_scheduler.py [--quick]

1. Decode tokens/s at batch 1 and 64 (128 prompt tokens, 128 output) for each sampling mode — greedy, the
   request defaults (T 0.8, top-p 0.9, top-k 50), seeded, frequency_penalty 0.5, logprobs — with the host syncs
   per decode step that torch.cuda.set_sync_debug_mode reports (the token read is an event wait, not counted).
2. Prefix caching: time to the first token of a request with a 4096-token prompt, then of one sharing its first
   4064 tokens, with caching on and off.
3. Mixed steps: 32 streams decode while a 16384-token prompt arrives; their inter-token latency (median, p99)
   before and during its prefill, for step budgets (infer.prefill_chunk_size) of 4096, 2048 and 512 tokens.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from bench_gpu import SHAPES, random_prompts
from chitu.config import compose_config
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.models.registry import build_model

MODES = {
    "greedy": dict(temperature=0),
    "default": dict(),
    "seeded": dict(seed=1234),
    "frequency_penalty 0.5": dict(frequency_penalty=0.5),
    "logprobs (top 5)": dict(logprobs=True, top_logprobs=5),
}
PROMPT, OUTPUT = 128, 128
LONG_PROMPT, STREAMS = 16384, 32


def build_engine(max_reqs: int, max_seq_len: int, num_blocks: int, chunk: int = 4096) -> LLMEngine:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(SHAPES["Llama-3.1-8B"], "hf-llama", max_seq_len, torch.bfloat16)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    config = compose_config(["device=cuda", f"infer.max_reqs={max_reqs}", f"infer.max_seq_len={max_seq_len}",
                             f"infer.num_blocks={num_blocks}", "infer.use_cuda_graph=True",
                             f"infer.prefill_chunk_size={chunk}"])
    return LLMEngine(config, model=model)


def decode_rate(engine: LLMEngine, batch: int, overrides: dict) -> tuple[float, float]:
    """(decode tokens/s, host syncs per decode step) of `batch` requests with these sampling settings."""
    params = SamplingParams(max_new_tokens=OUTPUT, stop_with_eos=False, **overrides)
    requests = [engine.add_request(p, params) for p in random_prompts(batch, PROMPT, engine.model_config.vocab_size)]
    while not all(len(r.output_token_ids) >= 4 for r in requests):
        engine.step()
    torch.cuda.synchronize()
    syncs, steps = 0, 0
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while engine.has_unfinished():
                engine.step()
                steps += 1
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in requests) - 4 * batch
    return tokens / elapsed, syncs / max(steps, 1)


def sampling_table(engine: LLMEngine, batches: list[int]) -> None:
    print(f"\n{'sampling':24}" + "".join(f"{'b' + str(b) + ' tok/s':>13}{'syncs/step':>12}" for b in batches)
          + "".join(f"{'vs greedy b' + str(b):>15}" for b in batches))
    greedy = {}
    for name, overrides in MODES.items():
        rates = {b: decode_rate(engine, b, overrides) for b in batches}
        greedy = greedy or {b: rates[b][0] for b in batches}
        print(f"{name:24}" + "".join(f"{rates[b][0]:>13.1f}{rates[b][1]:>12.2f}" for b in batches)
              + "".join(f"{rates[b][0] / greedy[b]:>15.1%}" for b in batches), flush=True)


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=1, temperature=0, stop_with_eos=False))
    while not request.output_token_ids:
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def prefix_caching(engine: LLMEngine) -> None:
    vocab = engine.model_config.vocab_size
    shared = random_prompts(1, 4064, vocab)[0]
    suffixes = random_prompts(8, 32, vocab)
    time_to_first_token(engine, random_prompts(3, 4096, vocab)[2])  # warm-up: this prefill's kernels
    print(f"\n{'4096-token prompts':40}{'first TTFT ms':>15}{'second TTFT ms':>16}{'ratio':>8}")
    for enabled in (True, False):
        engine.blocks.prefix_caching = enabled
        suffixes_left = iter(suffixes[4 * (not enabled):])
        prefix = shared[:-1] + [int(enabled)]  # a prefix no earlier run cached
        first = time_to_first_token(engine, prefix + next(suffixes_left))
        second = time_to_first_token(engine, prefix + next(suffixes_left))
        label = f"prefix caching {'on' if enabled else 'off'} (4064 shared)"
        print(f"{label:40}{first * 1e3:>15.1f}{second * 1e3:>16.1f}{second / first:>8.1%}", flush=True)
    engine.blocks.prefix_caching = True


def token_times(engine: LLMEngine, streams: list, long_prompt: list[int]) -> tuple[list[float], list[float], float, float]:
    """Run `streams` (already decoding), add the long prompt; the streams' inter-token gaps before and during its
    prefill, and when it was added and got its first token."""
    last = {id(r): None for r in streams}
    before, during = [], []
    for _ in range(20):
        _step_and_record(engine, streams, last, before)
    added = time.perf_counter()
    long = engine.add_request(long_prompt, SamplingParams(max_new_tokens=1, temperature=0, stop_with_eos=False))
    while not long.output_token_ids:
        _step_and_record(engine, streams, last, during)
    first_token = time.perf_counter()
    for r in streams:
        engine.abort(r.request_id)
    while engine.has_unfinished():
        engine.step()
    return before, during, added, first_token


def _step_and_record(engine: LLMEngine, streams: list, last: dict, gaps: list[float]) -> None:
    outputs = engine.step()
    now = time.perf_counter()
    got = {id(o.request) for o in outputs}
    for r in streams:
        if id(r) in got:
            if last[id(r)] is not None:
                gaps.append(now - last[id(r)])
            last[id(r)] = now


def mixed_steps(engine: LLMEngine, budgets: list[int]) -> None:
    vocab = engine.model_config.vocab_size
    engine.blocks.prefix_caching = False  # each budget's run prefills the same prompts again
    print(f"\n{STREAMS} streams, a {LONG_PROMPT}-token prompt arrives   "
          f"{'ITL p50 ms':>11}{'ITL p99 ms':>11}{'p99/p50':>9}{'  (before: p50)':>15}{'long TTFT s':>13}")
    for budget in budgets:
        engine.scheduler.prefill_budget = budget
        params = SamplingParams(max_new_tokens=4000, temperature=0, stop_with_eos=False)
        streams = [engine.add_request(p, params) for p in random_prompts(STREAMS, PROMPT, vocab)]
        while not all(r.output_token_ids for r in streams):
            engine.step()
        before, during, added, first = token_times(engine, streams, random_prompts(1, LONG_PROMPT, vocab)[0])
        q = torch.tensor(during)
        p50, p99 = q.quantile(0.5).item(), q.quantile(0.99).item()
        print(f"{'  step budget ' + str(budget) + ' tokens':42}{p50 * 1e3:>11.2f}{p99 * 1e3:>11.2f}{p99 / p50:>9.2f}"
              f"{torch.tensor(before).median().item() * 1e3:>15.2f}{first - added:>13.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 only in the sampling table; one budget")
    args = parser.parse_args()
    engine = build_engine(max_reqs=64, max_seq_len=LONG_PROMPT + 256, num_blocks=1536)
    batches = [1] if args.quick else [1, 64]
    decode_rate(engine, 2, {})  # warm-up
    sampling_table(engine, batches)
    prefix_caching(engine)
    mixed_steps(engine, [4096] if args.quick else [4096, 2048, 512])


if __name__ == "__main__":
    main()
