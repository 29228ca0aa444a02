"""Under torchrun (or plain python): complete a fixed set of token-id prompts — greedy with top-5
logprobs, seeded sampling, and a frequency penalty, one request arriving late — and have rank 0
write the tokens and logprobs as JSON. test_distributed.py compares tp/pp runs with one process.
`--case=sampling` (anywhere among the arguments) uses the same prompts with min_p, repetition
penalties and logit_bias instead (test_distributed_sampling.py). `--case=sampling-fails` makes the
sampler fail on every step that samples for the first request (a fault injected on the sampling rank,
whichever it is): that request must fail alone, and the others finish as in a process of their own.

    torchrun --nproc_per_node 2 test/dist_generate.py OUT.json models.ckpt_dir=<dir> infer.tp_size=2
"""
import json
import sys

from chitu.config import compose_config
from chitu.engine.engine import LLMEngine, StepError
from chitu.engine.sampling_params import SamplingParams

PROMPTS = [[11, 52, 3, 97, 140], [7] * 3 + list(range(20, 57)), [201, 99, 13, 8, 64, 31, 2, 150, 77, 5, 18],
           [42, 43, 44, 45, 46, 47, 48]]
PARAMS = [
    SamplingParams(max_new_tokens=8, temperature=0, logprobs=True, top_logprobs=5, stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=0, logprobs=True, top_logprobs=5, stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=40, seed=7, stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=0, frequency_penalty=1.5, stop_with_eos=False),
]
SAMPLING_PARAMS = [
    SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.8, logprobs=True, top_logprobs=5,
                   stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.5, seed=3,
                   stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=40, min_p=0.05, repetition_penalty=1.3,
                   logit_bias={3: 5.0}, seed=7, stop_with_eos=False),
    SamplingParams(max_new_tokens=8, temperature=0, presence_penalty=0.5, repetition_penalty=0.7,
                   logit_bias={10: 2.0, 11: -3.0}, stop_with_eos=False),
]
POISON_BIAS = (1, 0.125)  # a logit_bias entry (token id, bias) that the sampler below fails on
CASES = {"default": PARAMS, "sampling": SAMPLING_PARAMS,
         "sampling-fails": [SamplingParams(max_new_tokens=8, temperature=0, logit_bias=dict([POISON_BIAS]),
                                           stop_with_eos=False), *PARAMS[1:]]}


def fail_sampling_on_poison() -> None:
    """Make the logit-bias step raise for any batch holding POISON_BIAS: no valid input makes sampling
    fail, so the fault is injected, in every rank (only the sampling rank samples)."""
    from chitu.runner import sampler
    apply_logit_bias = sampler.apply_logit_bias

    def failing(logits, batch):
        token_id, bias = POISON_BIAS
        if batch.logit_bias is not None and bool((batch.logit_bias[:, token_id] == bias).any()):
            raise RuntimeError("injected sampling fault")
        return apply_logit_bias(logits, batch)

    sampler.apply_logit_bias = failing
LATE_ARRIVAL_STEP = 3  # the last prompt joins while the others decode


def main() -> None:
    out_path, args = sys.argv[1], sys.argv[2:]
    cases = [a.removeprefix("--case=") for a in args if a.startswith("--case=")]
    case = cases[-1] if cases else "default"
    params = CASES[case]
    if case == "sampling-fails":
        fail_sampling_on_poison()
    overrides = [a for a in args if not a.startswith("--case=")]
    engine = LLMEngine(compose_config(overrides), load_tokenizer=False)
    if not engine.is_driver:
        engine.follow_driver()
        return
    requests = [engine.add_request(p, q) for p, q in zip(PROMPTS[:-1], params[:-1])]
    failed: set[str] = set()
    step = 0
    while engine.has_unfinished() or len(requests) < len(PROMPTS):
        if step == LATE_ARRIVAL_STEP:
            requests.append(engine.add_request(PROMPTS[-1], params[-1]))
        try:
            engine.step()
        except StepError as e:  # a step of one request failed: that request alone is lost
            for request in e.requests:
                engine.abort(request.request_id)
                failed.add(request.request_id)
        step += 1
    engine.close()
    results = [{"failed": r.request_id in failed, "tokens": r.output_token_ids, "logprobs": [[lp.logprob] + [v for _, v in lp.top] for lp in r.logprobs],
                "top_ids": [[i for i, _ in lp.top] for lp in r.logprobs]} for r in requests]
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
