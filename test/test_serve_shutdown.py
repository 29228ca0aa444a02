"""SIGTERM while a stream is in flight: the server stops taking connections, lets the stream finish
(within its grace period of 10 s, also on a loaded machine), and exits with status 0."""
from __future__ import annotations

import signal

import pytest
import requests

from server_process import ServerProcess
from test_serve import sse_events


def test_sigterm_lets_the_stream_in_flight_finish(smollm2_path, tmp_path):
    with ServerProcess(tmp_path, "infer.max_seq_len=128") as server:
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 16, "stop_with_eos": False, "stream": True,
                "stream_options": {"include_usage": True}}
        with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60) as response:
            events = sse_events(response)
            first = next(events)
            server.process.send_signal(signal.SIGTERM)
            events = [first, *events]
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 16
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/health", timeout=5)
        assert server.process.wait(timeout=60) == 0, server.log()
        assert "Chitu service stopped" in server.log()
