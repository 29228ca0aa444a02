"""The engine loop in a process of its own, driven through AsyncEngine as the server drives it: the same tokens
and text as the loop on a thread, rejections with their field, a failed build raised at start, the process's
logs where the server logs, and its end (stopped, or killed) reaching everyone; a killed server leaves no engine
process behind."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import psutil
import pytest
import requests

from chitu.config import compose_config
from chitu.config.schema import ConfigError
from chitu.engine.engine import InvalidRequestField, LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.serve.async_engine import AsyncEngine, EngineError, EngineStopped, RequestStream
from chitu.serve.engine_process import EngineProcess
from chitu.serve.engine_thread import EngineThread
from server_process import ServerProcess

OVERRIDES = ["infer.max_seq_len=128", "infer.max_reqs=4", "dtype=float32"]
PROMPTS = [[1, 504, 3458, 282, 260], [1, 504, 3458], [1, 9690, 28, 314, 1345, 30]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, stop_with_eos=False)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, stop_with_eos=False)
EXIT_TIMEOUT_S = 60


@pytest.fixture
def stopped_process():
    """Processes a test starts, killed if the test leaves them running."""
    handles: list[EngineProcess] = []
    yield handles.append
    for handle in handles:
        if handle.is_alive:
            os.kill(handle.pid, signal.SIGKILL)


def run(handle, scenario, on_fatal=lambda error: None):
    async def main():
        async_engine = AsyncEngine(handle, on_fatal=on_fatal)
        async_engine.start()
        try:
            return await scenario(async_engine)
        finally:
            async_engine.stop()

    return asyncio.run(main())


async def _collect(stream: RequestStream) -> tuple[list[int], str]:
    deltas = [delta async for delta in stream]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)


def test_tokens_text_rejections_and_logs_as_with_the_engine_loop_on_a_thread(smollm2_path, tmp_path,
                                                                             stopped_process):
    config = compose_config(OVERRIDES)
    log_file = tmp_path / "server.log"
    with _root_logging_to(log_file, "child says [%(name)s] %(message)s"):
        process = EngineProcess(config)  # takes the root logger's handlers as they are now
    stopped_process(process)
    through_process = run(process, generate_and_reject)
    on_thread = run(EngineThread(lambda: LLMEngine(config)), generate_and_reject)
    assert through_process == on_thread
    assert all(len(tokens) == GREEDY.max_new_tokens and text for tokens, text in through_process)
    assert process.exit_code == 0
    assert "child says [chitu.models.loader] loaded" in log_file.read_text()


async def generate_and_reject(async_engine: AsyncEngine) -> list[tuple[list[int], str]]:
    bad_bias = SamplingParams(max_new_tokens=4, logit_bias={async_engine.vocab_size + 3: 1.0})
    with pytest.raises(InvalidRequestField, match="logit_bias key") as rejected:
        await async_engine.add("bad", PROMPTS[0], bad_bias)
    assert rejected.value.param == "logit_bias"
    streams = [await async_engine.add(f"r{i}-{j}", prompt, params)
               for i, prompt in enumerate(PROMPTS) for j, params in enumerate((GREEDY, SEEDED))]
    return [await _collect(stream) for stream in streams]


@contextlib.contextmanager
def _root_logging_to(path, fmt: str):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_failed_build_is_raised_at_start(smollm2_path, tmp_path, stopped_process):
    process = EngineProcess(compose_config([*OVERRIDES, f"models.ckpt_dir={tmp_path / 'missing'}",
                                            f"models.tokenizer_path={smollm2_path}"]))
    stopped_process(process)
    with pytest.raises(ConfigError, match="missing: no such file or directory"):
        AsyncEngine(process).start()


def test_an_idle_process_sleeps_and_stop_fails_requests_in_flight(smollm2_path, stopped_process):
    async def scenario(async_engine: AsyncEngine) -> None:
        engine_process = psutil.Process(process.pid)
        before = sum(engine_process.cpu_times()[:2])
        await asyncio.sleep(1)
        assert sum(engine_process.cpu_times()[:2]) - before <= 0.05  # CPU seconds in a second of idling
        stream = await async_engine.add("long", PROMPTS[0], SamplingParams(max_new_tokens=100, stop_with_eos=False))
        await anext(stream)
        async_engine.stop()
        with pytest.raises(EngineStopped):
            await _collect(stream)
        with pytest.raises(EngineStopped):
            await async_engine.add("late", PROMPTS[0], GREEDY)

    process = EngineProcess(compose_config(OVERRIDES))
    stopped_process(process)
    run(process, scenario)
    assert process.exit_code == 0


def test_a_killed_engine_process_fails_every_request_and_the_server(smollm2_path, stopped_process):
    fatal = []

    async def scenario(async_engine: AsyncEngine) -> None:
        streams = [await async_engine.add(f"r{i}", PROMPTS[0], SamplingParams(max_new_tokens=100,
                                                                              stop_with_eos=False)) for i in range(2)]
        await anext(streams[0])
        os.kill(process.pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineError, match=r"the engine process exited"):
                await _collect(stream)
        assert not async_engine.is_alive

    process = EngineProcess(compose_config(OVERRIDES))
    stopped_process(process)
    run(process, scenario, on_fatal=fatal.append)
    assert [str(error) for error in fatal] == [f"the engine process exited with code {-signal.SIGKILL}"]


def test_the_engine_process_exits_when_the_server_is_killed(smollm2_path, tmp_path):
    with ServerProcess(tmp_path, *OVERRIDES) as server:
        engine_processes = [child for child in psutil.Process(server.process.pid).children()
                            if "spawn_main" in " ".join(child.cmdline())]  # not multiprocessing's resource tracker
        assert len(engine_processes) == 1
        body = {"prompt": "Once upon a time", "max_tokens": 100, "stop_with_eos": False, "stream": True}
        with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60) as response:
            next(response.iter_lines())  # generating
            server.process.send_signal(signal.SIGKILL)
        gone, alive = psutil.wait_procs(engine_processes, timeout=EXIT_TIMEOUT_S)
        assert not alive
