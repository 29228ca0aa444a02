"""The OpenAI-compatible service, end to end: a real `python -m chitu` process, the official `openai`
client and plain `requests`. One server for the whole module (SmolLM2-135M, float32 for exact greedy)."""
from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import openai
import pytest
import requests

from chitu.tokenizer import Tokenizer
from server_process import ServerProcess, running_server

MAX_SEQ_LEN = 256
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is machine learning?"}]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("serve"), "dtype=float32", f"infer.max_seq_len={MAX_SEQ_LEN}",
                        "infer.max_reqs=32") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-listed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer(smollm2_path)


def sse_events(response: requests.Response) -> Iterator[dict | str]:
    """The `data:` payloads of an SSE response as they arrive: dicts, and the string "[DONE]"."""
    for line in response.iter_lines(chunk_size=None):
        if line.startswith(b"data: "):
            data = line[len(b"data: "):].decode()
            yield data if data == "[DONE]" else json.loads(data)


def eventually(condition, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# --- the openai client ---------------------------------------------------------------------------

def test_chat_greedy_stream_equals_whole(client, tokenizer):
    request = dict(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=12, temperature=0,
                   extra_body={"stop_with_eos": False})
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-2:] == [None, "length"]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    prompt_tokens = len(tokenizer.apply_chat_template(CHAT))
    for usage in (whole.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            prompt_tokens, 12, prompt_tokens + 12)


def test_chat_stops_at_eos(client):
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=40, temperature=0,
                                            messages=[{"role": "user", "content": "What is 2+2?"}])
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens < 40


def test_completions_string_and_token_prompts(client, tokenizer):
    prompt = "The capital of France is"
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, temperature=0)
    ids = client.completions.create(model="SmolLM2-135M-Instruct", prompt=tokenizer.encode(prompt), max_tokens=8,
                                    temperature=0)
    chunks = list(client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8,
                                            temperature=0, stream=True))
    assert whole.object == "text_completion" and whole.choices[0].text
    assert ids.choices[0].text == whole.choices[0].text
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt)) == ids.usage.prompt_tokens


def test_chat_logprobs(client):
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=5,
                                           temperature=0, logprobs=True, top_logprobs=3)
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=5,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completions_logprobs(client):
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=4,
                                      temperature=0, logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == 4
    assert logprobs.text_offset[0] == 0 and all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_logprob_bytes_of_an_emoji_are_its_utf8(client, tokenizer):
    """The emoji's byte tokens decode to U+FFFD one by one; their logprob bytes are the real bytes. Each is
    forced with logit_bias, one request per token."""
    token_ids = tokenizer.hf.encode("😀", add_special_tokens=False)
    assert len(token_ids) > 1
    joined = b""
    for token_id in token_ids:
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=1,
                                                temperature=0, logprobs=True, logit_bias={str(token_id): 100})
        joined += bytes(answer.choices[0].logprobs.content[0].bytes)
    assert joined == "😀".encode()


def test_completions_top_logprobs_keep_every_alternative(client):
    """Byte tokens all decode to U+FFFD: keyed by that text, alternatives would overwrite each other."""
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt="My favourite emoji: 😀😃😄😁🙂",
                                      max_tokens=4, temperature=0, logprobs=20)
    assert [len(top) for top in whole.choices[0].logprobs.top_logprobs] == [20] * 4


def test_stop_strings(client):
    free = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0, extra_body={"stop_with_eos": False})
    stop = free.choices[0].text.strip().split(",")[1] + ","  # a string the greedy answer reaches
    cut = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=12,
                                    temperature=0, stop=[stop, "never"])
    chunks = list(client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=12,
                                            temperature=0, stop=stop, stream=True))
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    def sample() -> str:
        return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=10,
                                              temperature=1.0, seed=1234).choices[0].message.content
    assert sample() == sample()


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    metrics = server.metrics()
    for name in ("chitu_prompt_tokens_total", "chitu_generation_tokens_total", "chitu_num_requests_running",
                 "chitu_num_requests_waiting", "chitu_kv_cache_usage_ratio", "chitu_time_to_first_token_seconds_count",
                 "chitu_time_per_output_token_seconds_count", "chitu_e2e_request_latency_seconds_count"):
        assert name in metrics, name
    assert metrics['chitu_requests_total{finish_reason="length"}'] >= 1


def test_a_repeated_prompt_hits_the_prefix_cache(client, server):
    """A chat of ~200 tokens twice: the second finds at least its first two 64-token blocks cached, and both
    answers (greedy) are the same."""
    messages = [{"role": "user", "content": "Summarise this in a word: " + "the quick brown fox jumps. " * 30}]
    before = server.metrics()
    answers = [client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4,
                                              temperature=0).choices[0].message.content for _ in range(2)]
    after = server.metrics()
    assert answers[0] == answers[1]
    assert after["chitu_prefix_cache_queries_total"] - before.get("chitu_prefix_cache_queries_total", 0) >= 400
    assert after["chitu_prefix_cache_hits_total"] - before.get("chitu_prefix_cache_hits_total", 0) >= 128
    assert 0 < after["chitu_prefix_cache_hit_rate"] <= 1


# --- plain requests --------------------------------------------------------------------------------

def test_requests_stream_without_content_type(server):
    """The manual's `requests.post(stream=True)`; and a body sent without a JSON content type still parses."""
    body = json.dumps({"messages": CHAT, "max_tokens": 6, "stream": True, "temperature": 0})
    with requests.post(f"{server.url}/v1/chat/completions", data=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]


def test_concurrent_streams_all_complete(server):
    """32 streams at once, each with its exact token count."""
    lengths = [4 + i % 5 for i in range(32)]
    results: dict[int, tuple[int, str]] = {}

    def run(i: int) -> None:
        body = {"prompt": f"Story number {i}:", "max_tokens": lengths[i], "stream": True, "stop_with_eos": False,
                "stream_options": {"include_usage": True}}
        with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=300) as response:
            events = list(sse_events(response))
        finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1]
        results[i] = (events[-2]["usage"]["completion_tokens"], finish)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: (lengths[i], "length") for i in range(32)}


def test_stream_disconnect_frees_kv_blocks(server):
    aborted = server.metrics().get('chitu_requests_total{finish_reason="abort"}', 0)
    body = {"messages": CHAT, "max_tokens": 200, "stream": True, "stop_with_eos": False}
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=60)
    events = sse_events(response)
    for _ in range(4):
        next(events)
    assert server.metrics()["chitu_kv_cache_usage_ratio"] > 0
    response.close()
    assert eventually(lambda: server.metrics()["chitu_kv_cache_usage_ratio"] == 0)
    metrics = server.metrics()
    assert metrics["chitu_num_requests_running"] == 0
    assert metrics['chitu_requests_total{finish_reason="abort"}'] == aborted + 1


def test_whole_response_client_timeout_aborts(server):
    aborted = server.metrics().get('chitu_requests_total{finish_reason="abort"}', 0)
    body = {"messages": CHAT, "max_tokens": 200, "stop_with_eos": False}
    with pytest.raises(requests.Timeout):
        requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=(5, 0.5))
    assert eventually(lambda: server.metrics()["chitu_kv_cache_usage_ratio"] == 0)
    assert server.metrics()['chitu_requests_total{finish_reason="abort"}'] == aborted + 1


# --- bad input -------------------------------------------------------------------------------------

BAD_CHAT = [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400, None),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, None),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),  # a lone surrogate
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, None),  # not UTF-8
    ("[" * 100_000 + "]" * 100_000, 400, None),
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"messages": CHAT, "max_tokens": "10"}, 400, "max_tokens"),
    ({"messages": CHAT, "stream": "yes"}, 400, "stream"),
    ({"messages": "hello"}, 400, "messages"),
    ({"max_tokens": 5}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, 400, "messages.0.tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ({"messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ({"messages": CHAT, "temperature": 2.5}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ({"messages": CHAT, "top_k": -2}, 400, "top_k"),
    ({"messages": CHAT, "top_k": 2**63}, 400, "top_k"),
    ({"messages": CHAT, "top_k": 1.5}, 400, "top_k"),
    ({"messages": CHAT, "seed": 2**64}, 400, "seed"),
    ({"messages": CHAT, "seed": -2**63 - 1}, 400, "seed"),
    ({"messages": CHAT, "min_p": 1.5}, 400, "min_p"),
    ({"messages": CHAT, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"messages": CHAT, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"messages": CHAT, "presence_penalty": -3}, 400, "presence_penalty"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 10**30}, 400, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, 400, None),
    ({"messages": CHAT, "model": "gpt-4o"}, 400, "model"),
    ({"messages": CHAT, "n": 2}, 400, "n"),
    ({"messages": CHAT, "max_tokens": MAX_SEQ_LEN}, 400, "messages"),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": CHAT, "stop": "x" * 200_000}, 400, "stop"),
    ({"messages": CHAT, "stop": [1]}, 400, "stop"),
    ({"messages": CHAT, "stop_token_ids": [10**7]}, 400, "stop_token_ids"),
    ({"messages": CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {"10000000": 1}}, 400, "logit_bias"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format.type"),
    ({"messages": CHAT, "stream_options": {"include_usage": True, "extra": 1}}, 400, "stream_options.extra"),
    ({"messages": CHAT, "chat_template_kwargs": {"chat_template": "{{ 'a' * 20000000 }}"}}, 400,
     "chat_template_kwargs.chat_template"),
    ({"messages": CHAT, "chat_template_kwargs": {"tokenize": False}}, 400, "chat_template_kwargs.tokenize"),
    ({"messages": [{"role": "user", "content": "x" * (32 * MAX_SEQ_LEN + 1)}]}, 400, "messages"),
] + [({"messages": CHAT, field: value}, 400, field) for field, value in [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("functions", []),
    ("parallel_tool_calls", True), ("audio", {}), ("modalities", ["text"]), ("prediction", {}), ("best_of", 2),
    ("echo", True), ("suffix", "x"), ("store", True), ("metadata", {}), ("service_tier", "auto")]]


@pytest.mark.parametrize("body,status,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(server, body, status, param):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = requests.post(f"{server.url}/v1/chat/completions", data=data, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert "Traceback" not in error["message"] and "/chitu/" not in error["message"]


def test_too_long_prompt_message_gives_the_numbers(server):
    response = requests.post(f"{server.url}/v1/completions", timeout=30,
                             json={"prompt": [100] * 200, "max_tokens": 100})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert all(str(n) in message for n in (200, 100, MAX_SEQ_LEN)), message


@pytest.mark.parametrize("body,param", [({"prompt": [10**7]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                                        ({"max_tokens": 3}, "prompt"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                                        ({"prompt": "x" * 1_000_000}, "prompt"), ({"prompt": [5] * 300}, "prompt"),
                                        ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "best_of": 3}, "best_of")])
def test_bad_completion_requests(server, body, param):
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_wrong_route_and_method(server):
    missing = requests.post(f"{server.url}/v1/nothing", json={}, timeout=30)
    wrong_method = requests.get(f"{server.url}/v1/chat/completions", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_still_answers_after_bad_input(client):
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=3)
    assert answer.usage.completion_tokens >= 1
