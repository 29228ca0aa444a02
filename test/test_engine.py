"""The engine on the real default model (fp32): continuous batching, KV exhaustion, chunked prefill,
admission limits, aborts and stop conditions."""
import dataclasses
import sys

import pytest

from chitu import LLM, SamplingParams
from chitu.engine.detokenizer import IncrementalDetokenizer
from chitu.engine.engine import LLMEngine, RequestRejected

import process_tree

QUESTIONS = ["What is machine learning?", "Name three primary colors.", "写一首关于月亮的短诗。",
             "How do airplanes fly?", "Give me a list of five fruits.", "What is 17 times 3?",
             "Explain recursion to a child.", "Translate 'good morning' into French."]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=1234)


def chat_prompts(engine: LLMEngine) -> list[list[int]]:
    return [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def run_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    request = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    return request.output_token_ids


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, every: int = 2):
    """Request i arrives at step i * every, while the earlier ones are running."""
    requests, step = [], 0
    while len(requests) < len(prompts) or engine.has_unfinished():
        if len(requests) < len(prompts) and step % every == 0:
            requests.append(engine.add_request(prompts[len(requests)], params))
        engine.step()
        step += 1
    return requests


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM("dtype=float32", "infer.max_seq_len=256", "infer.max_reqs=8")


@pytest.fixture(scope="module")
def engine(llm):
    return llm.engine


@pytest.fixture(scope="module")
def alone(engine):
    prompts = chat_prompts(engine)
    return {name: [run_alone(engine, p, params) for p in prompts] for name, params in
            (("greedy", GREEDY), ("seeded", SEEDED))}


@pytest.mark.parametrize("name, params", [("greedy", GREEDY), ("seeded", SEEDED)])
def test_requests_joining_a_running_batch_match_running_alone(engine, alone, name, params):
    requests = run_staggered(engine, chat_prompts(engine), params)
    assert [r.output_token_ids for r in requests] == alone[name]
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back


@pytest.mark.parametrize("name, params", [("greedy", GREEDY), ("seeded", SEEDED)])
def test_overlapped_decode_steps_match_running_alone(engine, alone, name, params):
    """overlap_steps (on by default on CUDA): each decode step is enqueued before the previous one's
    tokens are read, fed with them on the device; a request that stops wastes one step."""
    engine.overlap_steps = True
    try:
        prompts = chat_prompts(engine)
        engine.add_request(prompts[0], params)
        engine.step(), engine.step()  # the prefill, then a decode step that leaves its successor in flight
        assert len(engine.in_flight) == 1 and engine.in_flight[0].plan.tokens_from_previous
        assert [run_alone(engine, p, params) for p in prompts[1:3]] == alone[name][1:3]
        requests = run_staggered(engine, prompts, params)
        assert [r.output_token_ids for r in requests] == alone[name]
    finally:
        engine.overlap_steps = False
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


def test_more_requests_than_kv_blocks_all_finish_correctly(alone, smollm2_path):
    # 6 blocks of 16 tokens hold ~2 requests: admission queues, decode preempts and recomputes.
    small = LLM("dtype=float32", "infer.max_seq_len=96", "infer.max_reqs=8", "infer.block_size=16",
                "infer.num_blocks=6", "infer.prefill_chunk_size=16").engine
    requests = run_staggered(small, chat_prompts(small), GREEDY, every=1)
    assert [r.output_token_ids for r in requests] == alone["greedy"]
    assert small.scheduler.num_preemptions > 0
    assert small.blocks.num_free == 6


def test_prompt_plus_max_tokens_over_max_seq_len_is_rejected(engine):
    with pytest.raises(RequestRejected, match=r"prompt \(250 tokens\) \+ max_new_tokens \(10\) = 260 exceeds"):
        engine.add_request([1] * 250, SamplingParams(max_new_tokens=10))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request([], GREEDY)
    assert not engine.has_unfinished()


def test_abort_frees_blocks_at_once(engine):
    request = engine.add_request(chat_prompts(engine)[0], SamplingParams(max_new_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    engine.abort(request.request_id)
    assert request.finish_reason == "abort" and engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.has_unfinished()


def test_stop_with_eos_false_generates_exactly_max_new_tokens(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say OK."}])
    stopped = run_alone(engine, prompt, SamplingParams(max_new_tokens=40, temperature=0))
    assert stopped[-1] in engine.tokenizer.eos_token_ids and len(stopped) < 40
    forced = engine.add_request(prompt, SamplingParams(max_new_tokens=40, temperature=0, stop_with_eos=False))
    while engine.has_unfinished():
        engine.step()
    assert len(forced.output_token_ids) == 40 and forced.finish_reason == "length"
    assert forced.output_token_ids[:len(stopped)] == stopped


def test_offline_api_takes_text_and_token_ids(llm, engine):
    by_text = llm.generate("The capital of France is", GREEDY)[0]
    by_ids = llm.generate([engine.tokenizer.encode("The capital of France is")], GREEDY)[0]
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text
    assert by_text.finish_reason in ("stop", "length") and by_text.text


def test_stop_token_ids_end_with_stop_and_emit_no_text_of_their_own(llm, engine):
    prompt = chat_prompts(engine)[0]
    full = llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_with_eos=False))[0]
    stop = full.token_ids[4]
    assert engine.tokenizer.hf.decode([stop]).strip()  # a token with text of its own
    k = full.token_ids.index(stop)
    stopped = llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_with_eos=False,
                                                    stop_token_ids=[0, stop]))[0]
    assert stopped.token_ids == full.token_ids[:k + 1] and stopped.finish_reason == "stop"
    detokenizer = IncrementalDetokenizer(engine.tokenizer.hf, prompt)
    assert stopped.text == "".join(detokenizer.add(t) for t in full.token_ids[:k]) + detokenizer.flush()
    assert len(stopped.text) < len(full.text)


def test_out_of_vocabulary_token_ids_and_changed_fields_are_rejected(engine):
    vocab = engine.model_config.vocab_size
    prompt = chat_prompts(engine)[0]
    mutated = SamplingParams()
    mutated.top_k = 2.5
    cases = [("logit_bias", prompt, SamplingParams(logit_bias={5: 1.0, vocab: -1.0}), f"logit_bias key {vocab} is"),
             ("stop_token_ids", prompt, SamplingParams(stop_token_ids=[2, vocab + 7]),
              f"stop_token_ids entry {vocab + 7} is"),
             ("top_k", prompt, mutated, "top_k must be an integer, got 2.5")]
    for param, ids, params, message in cases:
        with pytest.raises(RequestRejected, match=message) as error:
            engine.add_request(ids, params)
        assert error.value.param == param
    with pytest.raises(RequestRejected, match=rf"outside the vocabulary \[0, {vocab}\)"):
        engine.add_request(prompt, SamplingParams(stop_token_ids=[vocab]))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("params", [GREEDY, SEEDED])
def test_logit_bias_of_100_forces_the_token(llm, engine, params):
    forced = engine.tokenizer.encode(" banana")[-1]
    out = llm.generate(chat_prompts(engine)[:2], dataclasses.replace(params, max_new_tokens=4,
                                                                     logit_bias={forced: 100.0}))
    assert [o.token_ids for o in out] == [[forced] * 4] * 2


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.5), dict(frequency_penalty=2.0, presence_penalty=2.0)])
def test_penalties_change_greedy_and_overlap_like_any_request(engine, penalty):
    """The token counts grow on the device, so a penalized request's next step may be enqueued before its
    tokens are read, and samples what it samples when every step waits."""
    params = dataclasses.replace(GREEDY, max_new_tokens=40, **penalty)
    prompt = chat_prompts(engine)[0]
    penalised = run_alone(engine, prompt, params)
    assert penalised != run_alone(engine, prompt, dataclasses.replace(GREEDY, max_new_tokens=40))
    engine.overlap_steps = True
    overlapped = 0
    try:
        request = engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
            overlapped += any(f.plan.tokens_from_previous for f in engine.in_flight)
    finally:
        engine.overlap_steps = False
    assert request.output_token_ids == penalised
    assert overlapped > len(penalised) // 2


def test_the_cpu_kernels_are_built_at_startup_not_in_the_first_request(smollm2_path):
    """A fresh process: once the engine is up, the decode and linear kernels its model runs are loaded
    (building them takes tens of seconds on a fresh machine, which the first request must not wait for)."""
    script = ("from chitu import LLM\n"
              "from chitu.ops.cpu import decode, linear\n"
              "LLM('dtype=float32', 'infer.max_seq_len=64', 'infer.max_reqs=1')\n"
              "print(decode._kernels.cache_info().currsize, linear.kernels.cache_info().currsize)\n")
    done = process_tree.run([sys.executable, "-c", script], timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]


def test_a_stream_keeps_receiving_tokens_while_a_long_prompt_prefills(smollm2_path):
    """Mixed steps: budget 16 tokens a step, a ~150-token prompt arriving while a stream decodes; the stream gets
    a token in every step of that prompt's chunked prefill, and both give the tokens of running alone."""
    small = LLM("dtype=float32", "infer.max_seq_len=256", "infer.max_reqs=4", "infer.block_size=16",
                "infer.prefill_chunk_size=16", "infer.enable_prefix_caching=False").engine
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_with_eos=False)
    short = chat_prompts(small)[0]
    long = small.tokenizer.apply_chat_template([{"role": "user", "content": " ".join(QUESTIONS * 2)}])
    alone = [run_alone(small, p, params) for p in (short, long)]
    stream = small.add_request(short, params)
    while len(stream.output_token_ids) < 2:
        small.step()
    prompt = small.add_request(long, params)
    during = []
    while not prompt.output_token_ids:
        before = len(stream.output_token_ids)
        small.step()
        during.append(len(stream.output_token_ids) - before)
    while small.has_unfinished():
        small.step()
    assert len(during) >= len(long) // 16 and set(during) == {1}
    assert [stream.output_token_ids, prompt.output_token_ids] == alone
