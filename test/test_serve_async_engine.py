"""The engine loop on a thread around a real engine in this process: a failing step costs only the request at
fault (a step over several is retried with each alone), an idle thread sleeps, and stopping aborts what is in
flight and frees its KV blocks."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from chitu.config import compose_config
from chitu.engine.engine import LLMEngine, RequestRejected, StepError
from chitu.engine.sampling_params import SamplingParams
from chitu.serve import async_engine as async_engine_module
from chitu.serve.async_engine import AsyncEngine, Delta, EngineError, EngineStopped, RequestStream
from chitu.serve.engine_thread import EngineThread

PROMPT = [1, 504, 3458, 282, 260]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, stop_with_eos=False)


@pytest.fixture(scope="module")
def engine(smollm2_path) -> LLMEngine:
    return LLMEngine(compose_config(["infer.max_seq_len=128", "infer.max_reqs=4", "dtype=float32"]))


def run_with(engine: LLMEngine, scenario) -> None:
    """Run `scenario(async_engine)` on an event loop, with the engine thread started and stopped around it."""

    async def main() -> None:
        async_engine = AsyncEngine(EngineThread(lambda: engine))
        async_engine.start()
        try:
            await scenario(async_engine)
        finally:
            async_engine.stop()

    asyncio.run(main())
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


async def tokens(stream: RequestStream) -> list[int]:
    return [token async for delta in stream for token in delta.token_ids]


POISON = 4242  # a token id the model below cannot take: no input reaches such a failure, so one is made


@pytest.fixture
def poisoned(engine, monkeypatch) -> LLMEngine:
    """The engine, its model failing any step whose input holds POISON."""
    model = engine.worker.runner.model
    forward = model.forward

    def failing_forward(token_ids, *args, **kwargs):
        if isinstance(token_ids, torch.Tensor) and bool((token_ids == POISON).any()):
            raise RuntimeError("poisoned input")
        return forward(token_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    return engine


def test_failed_step_costs_only_the_request_at_fault(poisoned):
    async def scenario(async_engine: AsyncEngine) -> None:
        reference = await tokens(await async_engine.add("reference", PROMPT, GREEDY))
        decoding = await async_engine.add("decoding", PROMPT, GREEDY)
        first = await anext(decoding)  # decoding while the bad prompt's prefill fails alone
        bad = await async_engine.add("bad", [*PROMPT, POISON], GREEDY)
        with pytest.raises(EngineError, match=r"the engine failed while running this request \(bad\)"):
            await anext(bad)
        assert first.token_ids + await tokens(decoding) == reference
        # in one prefill with the bad prompt: the failed step is retried with each alone
        together = [await async_engine.add(f"good{i}", PROMPT, GREEDY) for i in range(2)]
        bad = await async_engine.add("bad2", [POISON, *PROMPT], GREEDY)
        assert [await tokens(stream) for stream in together] == [reference] * 2
        with pytest.raises(EngineError):
            await tokens(bad)
        assert await tokens(await async_engine.add("after", PROMPT, GREEDY)) == reference

    run_with(poisoned, scenario)


def test_requests_new_in_a_failed_step_are_retried_with_their_sampling_settings(poisoned):
    """All three are first seen by the sampler in the step that fails: it must still know the good ones."""
    engine = poisoned
    reference = engine.add_request(PROMPT, GREEDY)
    while engine.has_unfinished():
        engine.step()
    good = [engine.add_request(PROMPT, GREEDY) for _ in range(2)]
    bad = engine.add_request([POISON, *PROMPT], GREEDY)
    with pytest.raises(StepError) as failed:
        while engine.has_unfinished():
            engine.step()
    assert failed.value.requests == [bad]
    engine.abort(bad.request_id)
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in good] == [reference.output_token_ids] * 2


def test_out_of_vocabulary_prompt_ids_are_rejected(engine):
    async def scenario(async_engine: AsyncEngine) -> None:
        with pytest.raises(RequestRejected, match="prompt token id"):
            await async_engine.add("bad", [engine.model_config.vocab_size + 7], GREEDY)

    run_with(engine, scenario)


def test_rejection_reaches_the_submitter(engine):
    async def scenario(async_engine: AsyncEngine) -> None:
        with pytest.raises(RequestRejected, match="exceeds"):
            await async_engine.add("long", list(range(100, 220)), GREEDY)
        assert len(await tokens(await async_engine.add("fine", PROMPT, GREEDY))) == GREEDY.max_new_tokens

    run_with(engine, scenario)


def test_idle_engine_thread_sleeps(engine):
    async def scenario(async_engine: AsyncEngine) -> None:
        await tokens(await async_engine.add("one", PROMPT, GREEDY))
        stat = Path(f"/proc/self/task/{async_engine.handle.thread.native_id}/stat")
        before = _cpu_ticks(stat)
        await asyncio.sleep(1)
        assert _cpu_ticks(stat) - before <= 2  # clock ticks (10 ms each) in a second of idling

    run_with(engine, scenario)


def test_stop_aborts_requests_in_flight(engine):
    async def scenario(async_engine: AsyncEngine) -> None:
        stream = await async_engine.add("long", PROMPT, SamplingParams(max_new_tokens=100, stop_with_eos=False))
        await anext(stream)
        async_engine.stop()
        with pytest.raises(EngineStopped):
            await tokens(stream)
        with pytest.raises(EngineStopped):
            await async_engine.add("late", PROMPT, GREEDY)

    run_with(engine, scenario)


def _cpu_ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_streams_get_the_text_of_their_tokens_made_off_the_engine_thread(engine, monkeypatch):
    """The engine thread hands over tokens only; each delta's text, made on the event loop, is what the tokens
    decode to, and a stop token adds none."""
    made_on = set()
    step_text = async_engine_module.step_text

    def recording(*args):
        made_on.add(threading.current_thread().name)
        return step_text(*args)

    async def scenario(async_engine: AsyncEngine) -> None:
        streams = [await async_engine.add(f"r{i}", PROMPT[: 3 + i], SamplingParams(max_new_tokens=10, temperature=0))
                   for i in range(3)]
        for stream in streams:
            deltas = [d async for d in stream]
            token_ids = [t for d in deltas for t in d.token_ids]
            stop = deltas[-1].finish_reason == "stop"
            expected = engine.tokenizer.decode(token_ids[:-1] if stop else token_ids)
            assert "".join(d.text for d in deltas) == expected and expected

    monkeypatch.setattr(async_engine_module, "step_text", recording)
    run_with(engine, scenario)
    assert made_on == {threading.main_thread().name}


def test_a_stream_behind_its_request_gets_the_queued_steps_as_one_delta():
    """Deltas queued while the consumer was busy come out merged, up to the last one; an error queued behind
    them comes next, on its own."""

    async def scenario() -> list:
        stream = RequestStream("r", 3, abort=lambda request_id: None)
        for i, finish in ((1, None), (2, None), (3, "length")):
            stream.put(Delta([i], f"t{i}", [], finish))
        merged = [await stream.__anext__()]
        failing = RequestStream("f", 3, abort=lambda request_id: None)
        failing.put(Delta([7], "a", [], None))
        failing.put(Delta([8], "b", [], None))
        failing.put(EngineError("boom"))
        merged.append(await failing.__anext__())
        with pytest.raises(EngineError, match="boom"):
            await failing.__anext__()
        return merged

    whole, before_error = asyncio.run(scenario())
    assert (whole.token_ids, whole.text, whole.finish_reason) == ([1, 2, 3], "t1t2t3", "length")
    assert (before_error.token_ids, before_error.text, before_error.finish_reason) == ([7, 8], "ab", None)
