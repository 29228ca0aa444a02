"""benchmarks/benchmark_serving.py against a real server that requires an API key
(serve.require_api_key=true), and the 401s such a server answers."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import requests

import process_tree
from server_process import REPO, running_server

KEY = "bench-key"
BENCHMARK = REPO / "benchmarks" / "benchmark_serving.py"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve_bench"), "infer.max_reqs=4", "infer.max_seq_len=128",
                        "serve.require_api_key=true", f"serve.api_keys=[{{key:{KEY},priority:1}}]") as s:
        yield s


def benchmark(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return process_tree.run([sys.executable, str(BENCHMARK), "--model", "SmolLM2-135M-Instruct", *args], timeout=300,
                            cwd=cwd)


def test_results_go_to_outputs_by_default(server, tmp_path):
    result = benchmark("--iterations", "1", "--input-len", "8", "--output-len", "4", "--warmup", "0",
                       "--base-url", server.url, "--api-key", KEY, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "outputs" / "benchmark_serving.json").read_text())["summary"]["successful_requests"] == 1
    assert not (tmp_path / "benchmark_serving.json").exists()


@pytest.mark.parametrize("client_processes", ["1", "2"])
def test_benchmark_prints_table_and_saves_json(server, tmp_path, client_processes):
    output = tmp_path / "result.json"
    result = benchmark("--batch-size", "2", "--iterations", "2", "--input-len", "16", "--output-len", "8",
                       "--warmup", "1", "--base-url", server.url, "--api-key", KEY, "--output-json", str(output),
                       "--client-processes", client_processes)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"Client processes\s+{client_processes}\n", result.stdout)
    for row in ("Serving Benchmark Result", "Output token throughput (tok/s)", "Total token throughput (tok/s)",
                "TTFT", "TPOT", "End-to-end", "p50", "p90", "p99"):
        assert row in result.stdout, row
    saved = json.loads(output.read_text())
    summary = saved["summary"]
    assert (summary["successful_requests"], summary["failed_requests"]) == (4, 0)
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (64, 32)
    assert all(r["prompt_tokens"] == 16 and r["output_tokens"] == 8 for r in saved["requests"])
    assert 0 < summary["ttft_ms"]["p50"] <= summary["e2e_latency_ms"]["p50"]
    assert summary["output_throughput"] > 0


def test_benchmark_without_key_reports_the_401(server, tmp_path):
    result = benchmark("--iterations", "1", "--warmup", "0", "--input-len", "4", "--output-len", "2",
                       "--base-url", server.url, "--output-json", str(tmp_path / "r.json"))
    assert result.returncode == 1 and "HTTP 401" in result.stderr, result.stderr


def test_base_url_needs_a_scheme(tmp_path):
    result = benchmark("--base-url", "localhost:21002", "--output-json", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "--base-url must start with http:// or https://" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_plot_option(server, tmp_path):
    chart = tmp_path / "chart.png"
    result = benchmark("--iterations", "1", "--warmup", "0", "--input-len", "4", "--output-len", "2",
                       "--base-url", server.url, "--api-key", KEY, "--output-json", str(tmp_path / "r.json"),
                       "--plot", str(chart))
    if importlib.util.find_spec("matplotlib") is None:
        assert result.returncode == 2 and "pip install 'chitu[plot]'" in result.stderr
    else:
        assert result.returncode == 0 and chart.stat().st_size > 0, result.stderr


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_required_key_missing_or_wrong_is_401(server, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/metrics")):
        response = requests.request(method, f"{server.url}{path}", headers=headers, timeout=30,
                                    json={"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key" and response.json()["error"]["message"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_listed_key_is_accepted(server):
    response = requests.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
