"""Run a batch of requests through the engine without the service; print answers and speed.

    torchrun --nproc_per_node 1 test/single_req_test.py request.max_new_tokens=64
    torchrun --nproc_per_node 2 test/single_req_test.py infer.tp_size=2   (or infer.pp_size=2)
    python test/single_req_test.py request.prompt_tokens_len=128 request.max_new_tokens=64 infer.max_reqs=8

Two rounds of infer.max_reqs requests: the first warms up, both are reported. Logs go to outputs/.
"""
import logging
import time

import torch

from chitu.config import ChituConfig, hydra_entry
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams

logger = logging.getLogger("single_req_test")

QUESTIONS = [
    "What is machine learning?",
    "用三句话介绍一下长城。",
    "Write a haiku about the sea.",
    "怎么做番茄炒蛋？",
    "Explain the difference between TCP and UDP.",
    "What is the capital of France, and why is it famous?",
]


def make_prompts(engine: LLMEngine, config: ChituConfig) -> list[list[int]]:
    n, length = config.infer.max_reqs, config.request.prompt_tokens_len
    if length > 0:
        generator = torch.Generator().manual_seed(config.infer.seed)
        vocab = engine.model_config.vocab_size
        return torch.randint(100, vocab - 100, (n, length), generator=generator).tolist()
    tokenizer = engine.tokenizer
    conversations = [[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    if tokenizer.hf.chat_template:
        return [tokenizer.apply_chat_template(c) for c in conversations]
    return [tokenizer.encode(c[-1]["content"]) for c in conversations]


def run_round(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    requests = [engine.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    first_token_at = None
    while engine.has_unfinished():
        engine.step()
        if first_token_at is None and all(r.output_token_ids for r in requests):
            first_token_at = time.perf_counter()
    end = time.perf_counter()
    for i, r in enumerate(requests):
        logger.info("Request %d prompt (%d tokens): %r", i, len(r.prompt_token_ids), engine.tokenizer.decode(r.prompt_token_ids)[-200:])
        logger.info("Response in rank 0: reqs[%d].output=%r (%d tokens, finish_reason=%s)",
                    i, r.detokenizer.text, len(r.output_token_ids), r.finish_reason)
    decode_tokens = sum(len(r.output_token_ids) - 1 for r in requests)
    decode_time = end - first_token_at
    logger.info("Prefill time: %.3f s for %d requests, %d prompt tokens",
                first_token_at - start, len(requests), sum(len(p) for p in prompts))
    if decode_tokens:
        logger.info("Decode: %d tokens in %.3f s = %.2f tokens/s (%.2f tokens/s per request)", decode_tokens,
                    decode_time, decode_tokens / decode_time, decode_tokens / decode_time / len(requests))
    logger.info("Time cost %.3f s", end - start)


@hydra_entry
def main(config: ChituConfig) -> None:
    engine = LLMEngine(config)
    if not engine.is_driver:
        engine.follow_driver()
        return
    synthetic = config.request.prompt_tokens_len > 0
    params = SamplingParams(max_new_tokens=config.request.max_new_tokens, stop_with_eos=not synthetic)
    prompts = make_prompts(engine, config)
    for round_index in range(2):
        logger.info("------ batch %d ------", round_index)
        run_round(engine, prompts, params)
    engine.close()


if __name__ == "__main__":
    main()
