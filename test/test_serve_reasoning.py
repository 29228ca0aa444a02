"""Thinking models' replies split into reasoning_content and content: streamed in pieces cut anywhere
(tags split across pieces) the same as whole."""
import openai
import pytest

from chitu.serve.formats import ChatFormat
from chitu.serve.reasoning import split_reasoning
from server_process import running_server

CASES = [  # (parser, output, reasoning, content)
    ("deepseek_r1", "Let me add 2 and 2.</think>\n\nIt is 4.", "Let me add 2 and 2.", "\n\nIt is 4."),
    ("deepseek_r1", "<think>\nhmm</think>4", "\nhmm", "4"),
    ("deepseek_r1", "still thinking <th", "still thinking <th", ""),
    ("qwen3", "<think>\nshort</think>\n\nYes.", "\nshort", "\n\nYes."),
    ("qwen3", "\n<think>a < b</think>b", "a < b", "b"),
    ("qwen3", "No thinking here, <think> is just text.", "", "No thinking here, <think> is just text."),
    ("qwen3", "<thi", "", "<thi"),
]


@pytest.mark.parametrize("parser, output, reasoning, content", CASES)
def test_whole_output_split(parser, output, reasoning, content):
    assert split_reasoning(output, parser) == (reasoning, content)


def streamed(parser: str, output: str, size: int) -> tuple[str, str]:
    fmt = ChatFormat("id", "m", None, False, False, reasoning_parser=parser)
    chunks = [fmt.piece_chunk(output[i:i + size], []) for i in range(0, len(output), size)]
    chunks.append(fmt.finish_chunk("stop"))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    return "".join(d.get("reasoning_content", "") for d in deltas), "".join(d.get("content", "") for d in deltas)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 1000])
@pytest.mark.parametrize("parser, output, reasoning, content", CASES)
def test_streamed_pieces_give_what_the_whole_response_gives(parser, output, reasoning, content, size):
    whole = ChatFormat("id", "m", None, False, False, reasoning_parser=parser).response(output, [], "stop", {})
    message = whole["choices"][0]["message"]
    assert (message["reasoning_content"] or "", message["content"]) == (reasoning, content)
    assert streamed(parser, output, size) == (reasoning, content)


def test_without_a_parser_everything_is_content():
    fmt = ChatFormat("id", "m", None, False, False)
    assert fmt.response("<think>x</think>y", [], "stop", {})["choices"][0]["message"] == {
        "role": "assistant", "content": "<think>x</think>y"}


@pytest.fixture(scope="module")
def client(smollm2_path, tmp_path_factory):
    """The real service with DeepSeek-R1's parser over SmolLM2, which never closes a <think>: its whole
    answer is reasoning."""
    with running_server(tmp_path_factory.mktemp("reasoning"), "dtype=float32", "infer.max_seq_len=256",
                        "models.reasoning_parser=deepseek_r1") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-listed", max_retries=0, timeout=120)


def test_the_service_sends_reasoning_content_streamed_and_whole_alike(client):
    ask = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=16, temperature=0)
    message = client.chat.completions.create(**ask).choices[0].message
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert message.reasoning_content and streamed == message.reasoning_content
    assert message.content == "" and not "".join(d.content or "" for d in deltas)
