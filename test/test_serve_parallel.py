"""The service under torchrun with tensor and pipeline parallelism: rank 0 serves the openai client
while the other ranks compute with it; SIGTERM stops every rank cleanly; a killed rank brings the
whole service down within seconds, and a hung one within infer.comm_timeout_s, with a message
naming that rank. Start-up waits are bounded by infer.dist_init_timeout_s instead, so a short
comm_timeout_s still starts on a loaded machine. Answers are compared in float32 (exact greedy)."""
from __future__ import annotations

import os
import re
import signal
import time

import openai
import psutil
import pytest
import requests

from server_process import ServerProcess
from test_serve import sse_events

TORCHRUN = ("torchrun", "--standalone", "--nproc_per_node", "2")
ENGINE = ("infer.max_seq_len=512", "infer.max_reqs=4")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# rank 0 finds out while it sends a step plan to rank 1 or waits for the tokens rank 1 samples
PEER_FAILED = re.compile(r"(sending to|receiving from) rank 1 failed")


def rank_pid(server: ServerProcess, rank: int) -> int:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child.pid
    raise AssertionError(f"no process of rank {rank} under torchrun")


def wait_all_exited(server: ServerProcess, pids: list[int], timeout: float) -> float:
    start = time.monotonic()
    server.process.wait(timeout=timeout)
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                    timeout=max(1.0, timeout - (time.monotonic() - start)))
    assert not alive, f"ranks still running: {alive}"
    return time.monotonic() - start


def test_tensor_parallel_service_answers_and_stops_on_sigterm(smollm2_path, tmp_path):
    with ServerProcess(tmp_path, *ENGINE, "dtype=float32", "infer.tp_size=2", launcher=TORCHRUN) as server:
        pids = [rank_pid(server, 0), rank_pid(server, 1)]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                                max_tokens=20, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=20,
                                                temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == answer.choices[0].message.content
        server.process.send_signal(signal.SIGTERM)
        wait_all_exited(server, pids, timeout=60)
        log = server.log()
        assert "Chitu service stopped" in log and "CommError" not in log and "Traceback (most recent call last)" \
            not in log.split("Chitu service stopped")[0], log


@pytest.mark.parametrize("failure,timeout", [(signal.SIGKILL, 30), (signal.SIGSTOP, 60)], ids=["killed", "hung"])
def test_failed_rank_stops_every_rank_with_a_message(failure, timeout, smollm2_path, tmp_path):
    # pp=2: rank 0 waits for the tokens rank 1 samples; comm_timeout_s bounds the wait for a hung rank
    # (torchrun then kills the stopped process after its own grace period)
    with ServerProcess(tmp_path, *ENGINE, "infer.pp_size=2", "infer.comm_timeout_s=5", launcher=TORCHRUN) as server:
        pids = [rank_pid(server, 0), rank_pid(server, 1)]
        body = {"messages": QUESTION, "max_tokens": 400, "stop_with_eos": False, "stream": True}
        with requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
            events = sse_events(response)
            next(events)
            os.kill(pids[1], failure)
            rest = list(events)
        errors = [e for e in rest if isinstance(e, dict) and "error" in e]
        assert errors and PEER_FAILED.search(errors[0]["error"]["message"]), errors
        assert wait_all_exited(server, pids, timeout=timeout + 30) < timeout
        assert server.process.returncode != 0
        assert re.search(f"Chitu service stopped: rank 0: {PEER_FAILED.pattern}", server.log()), server.log()
