"""API-key priority against a real server with room for one request at a time (infer.max_reqs=1)."""
from __future__ import annotations

import json
import threading

import pytest
import requests

from server_process import running_server
from test_serve import eventually

VIP_KEY = "vip-key"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve_priority"), "infer.max_reqs=1", "infer.max_seq_len=256",
                        f"serve.api_keys=[{{key:{VIP_KEY},priority:1}}]") as s:
        yield s


def test_keyed_request_overtakes_waiting_ones(server):
    finished: list[str] = []
    lock = threading.Lock()

    def complete(name: str, key: str | None = None, max_tokens: int = 4) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"prompt": f"Request {name}:", "max_tokens": max_tokens, "stop_with_eos": False}
        response = requests.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        with lock:
            finished.append(name)

    def start(name: str, **kwargs) -> threading.Thread:
        thread = threading.Thread(target=complete, args=(name,), kwargs=kwargs)
        thread.start()
        return thread

    threads = [start("first", max_tokens=64)]  # holds the only slot
    assert eventually(lambda: server.metrics()["chitu_num_requests_running"] == 1)
    for name in ("b", "c", "d"):
        threads.append(start(name))
        assert eventually(lambda: server.metrics()["chitu_num_requests_waiting"] == len(threads) - 1)
    threads.append(start("vip", key=VIP_KEY))
    for thread in threads:
        thread.join()
    assert finished == ["first", "vip", "b", "c", "d"]


def test_stream_with_key_is_served(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {VIP_KEY}"}
    with requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, stream=True,
                       timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert response.status_code == 200 and lines[-1] == b"data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"

