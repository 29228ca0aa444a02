"""A hostile client beside normal ones, against a real `python -m chitu`: every hostile request gets its 4xx
with an OpenAI error body, the normal greedy streams beside them produce exactly what they produce alone,
/health keeps answering, a 64 MB body is refused without the server holding it, and past its queue
limits the server answers 503 with Retry-After instead of resetting connections or failing with 500."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import psutil
import pytest
import requests

from test_serve import CHAT, ServerProcess, running_server, sse_events
from test_serve_parallel import TORCHRUN

TEMPLATE_BOMB = {"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}
HOSTILE = [
    ("chat", {"messages": CHAT, "chat_template_kwargs": TEMPLATE_BOMB}, 400),
    ("chat", {"messages": CHAT, "chat_template_kwargs": {"chat_template": "{{ 'a' * 20000000 }}"}}, 400),
    ("chat", {"messages": CHAT, "chat_template_kwargs": {"tokenizer_kwargs": {"max_length": 1}}}, 400),
    ("completions", {"prompt": "a" * 1_000_000, "max_tokens": 4}, 400),
    ("completions", {"prompt": [5] * 1_000_000, "max_tokens": 4}, 400),
    ("chat", {"messages": CHAT, "stop": "x" * 200_000}, 400),
    ("chat", {"messages": CHAT, "seed": 2**64, "temperature": 1.0}, 400),
    ("chat", {"messages": CHAT, "top_k": 2**63, "temperature": 1.0}, 400),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400),
    ("chat", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("completions", '{"prompt": "\\udfff"}', 400),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("chat", "[" * 200_000, 400),
    ("chat", {"messages": CHAT, "max_tokens": 10**40}, 400),
    ("chat", {"messages": [CHAT[1]] * 5000}, 400),  # within the body limit, over the prompt's characters
]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hostile"), "dtype=float32", "infer.max_seq_len=256",
                        "infer.max_reqs=8") as s:
        yield s


def send(url: str, route: str, body: dict | str | bytes | Iterator[bytes], timeout: float = 60) -> requests.Response:
    data = json.dumps(body) if isinstance(body, dict) else body
    return requests.post(f"{url}/v1/{'chat/completions' if route == 'chat' else route}", data=data, timeout=timeout)


def normal_stream(url: str, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."}], "max_tokens": 24,
            "temperature": 0, "stream": True, "stop_with_eos": False}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


def check_refused(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"] and "/chitu/" not in error["message"]
    assert response.headers["x-request-id"]


def test_hostile_requests_beside_normal_streams(server):
    alone = [normal_stream(server.url, i) for i in range(3)]
    health_answers = 0
    done = threading.Event()

    def poll_health() -> None:
        nonlocal health_answers
        while not done.is_set():
            assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
            health_answers += 1
            time.sleep(0.05)

    with ThreadPoolExecutor(24) as pool:
        health = pool.submit(poll_health)
        normals = [pool.submit(normal_stream, server.url, i) for i in range(3)]
        hostile = [(pool.submit(send, server.url, route, body), status) for route, body, status in HOSTILE * 2]
        for future, status in hostile:
            check_refused(future.result(), status)
        together = [future.result() for future in normals]
        done.set()
        health.result()
    assert together == alone
    assert health_answers > 0
    after = requests.post(f"{server.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in server.log_path.read_text()


def test_a_64mb_body_is_refused_without_being_held(server):
    process = psutil.Process(server.process.pid)
    baseline = process.memory_info().rss
    peak = baseline
    sending = threading.Event()

    def sample() -> None:
        nonlocal peak
        while sending.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sending.set()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        body = b'{"prompt": "' + b"a" * (64 << 20) + b'"}'
        check_refused(send(server.url, "completions", body), 413)

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(64):
                yield b"a" * (1 << 20)
        check_refused(send(server.url, "completions", chunks()), 413)
    finally:
        sending.clear()
        sampler.join()
    assert peak - baseline < 32 << 20, f"the server grew by {(peak - baseline) >> 20} MB"
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(smollm2_path, tmp_path):
    with running_server(tmp_path, "infer.max_seq_len=256", "infer.max_reqs=2", "serve.max_waiting_requests=4",
                        "serve.max_connections=32") as server:
        def one(i: int) -> requests.Response:
            return requests.post(f"{server.url}/v1/completions", timeout=600,
                                 json={"prompt": [1, 2 + i % 50, 3], "max_tokens": 2, "stop_with_eos": False})

        with ThreadPoolExecutor(300) as pool:
            responses = list(pool.map(one, range(300)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503} and statuses == {200, 503}, statuses
        for response in responses:
            if response.status_code == 503:
                check_refused(response, 503)
                assert response.headers["retry-after"] == "1"
            else:
                assert response.json()["usage"]["completion_tokens"] == 2
        assert "Traceback" not in server.log_path.read_text()


def test_overflowing_sampling_parameters_under_tensor_parallelism(smollm2_path, tmp_path):
    """Once these reached the step and killed a tp=2 service (EngineDead); now they never get that far."""
    with ServerProcess(tmp_path, "dtype=float32", "infer.max_seq_len=256", "infer.max_reqs=4", "infer.tp_size=2",
                       launcher=TORCHRUN) as server:
        for extra in ({"seed": 2**64}, {"top_k": 2**63}, {"seed": -2**70, "top_k": 2**100}):
            check_refused(send(server.url, "chat", {"messages": CHAT, "temperature": 1.0, **extra}), 400)
        after = send(server.url, "chat", {"messages": CHAT, "max_tokens": 4, "seed": 2**63 - 1, "top_k": 10**9})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
        assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
