"""The engine thread around a real engine in this process: a failing step costs only its own requests,
an idle thread sleeps, and stopping aborts what is in flight and frees its KV blocks."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chitu.config import compose_config
from chitu.engine.engine import LLMEngine, RequestRejected
from chitu.engine.sampling_params import SamplingParams
from chitu.serve.async_engine import AsyncEngine, EngineError, EngineStopped, RequestStream

PROMPT = [1, 504, 3458, 282, 260]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, stop_with_eos=False)


@pytest.fixture(scope="module")
def engine(smollm2_path) -> LLMEngine:
    return LLMEngine(compose_config(["infer.max_seq_len=128", "infer.max_reqs=4"]))


def run_with(engine: LLMEngine, scenario) -> None:
    """Run `scenario(async_engine)` on an event loop, with the engine thread started and stopped around it."""

    async def main() -> None:
        async_engine = AsyncEngine(lambda: engine)
        async_engine.start()
        try:
            await scenario(async_engine)
        finally:
            async_engine.stop()

    asyncio.run(main())
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


async def tokens(stream: RequestStream) -> list[int]:
    return [token async for delta in stream for token in delta.token_ids]


def test_failed_step_costs_only_its_requests(engine):
    async def scenario(async_engine: AsyncEngine) -> None:
        reference = await tokens(await async_engine.add("reference", PROMPT, GREEDY))
        good = await async_engine.add("good", PROMPT, GREEDY)
        first = await anext(good)  # `good` is decoding when the bad prompt's prefill step fails
        bad = await async_engine.add("bad", [engine.model_config.vocab_size + 7], GREEDY)
        with pytest.raises(EngineError, match="the engine failed"):
            await anext(bad)
        assert first.token_ids + await tokens(good) == reference
        assert await tokens(await async_engine.add("after", PROMPT, GREEDY)) == reference

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
        stat = Path(f"/proc/self/task/{async_engine._thread.native_id}/stat")
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
