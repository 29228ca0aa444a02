"""Each token's own bytes for logprobs: the pieces of any text's tokens put back together are the text's
UTF-8, for byte-level BPE (SmolLM2's real tokenizer) and for a SentencePiece-style vocabulary with byte
fallback, even where one character is split over several tokens."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from chitu.serve.token_pieces import TokenPieces
from chitu.tokenizer import Tokenizer

TEXTS = ["😀 hi", "naïve café 中文 ☃", " The quick  brown\tfox\n", "🧑‍🚀 emoji sequence", "a" * 50]


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return Tokenizer(smollm2_path)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_join_to_the_text(smollm2, text):
    pieces = TokenPieces(smollm2.hf)
    ids = smollm2.hf.encode(text, add_special_tokens=False)
    assert b"".join(pieces.bytes[i] for i in ids) == text.encode()


def test_an_emoji_split_over_byte_tokens(smollm2):
    pieces = TokenPieces(smollm2.hf)
    ids = smollm2.hf.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the reason this test exists: no single token holds the character
    assert [pieces.bytes[i] for i in ids] != [smollm2.hf.decode([i]).encode() for i in ids]
    assert all(pieces.label(i).startswith("bytes:\\x") for i in ids)


def test_whole_character_tokens_read_as_their_decoding(smollm2):
    pieces = TokenPieces(smollm2.hf)
    for token_id in range(0, len(smollm2.hf), 97):
        decoded = smollm2.hf.decode([token_id], clean_up_tokenization_spaces=False)
        if "\ufffd" not in decoded:
            assert pieces.text[token_id] == decoded == pieces.label(token_id)


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like vocabulary: "▁" for spaces, <0xHH> byte fallback for characters it lacks."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁a", "▁b", "ab", "▁ab", "é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")]
    rust = RustTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("text", ["ab a b", "é ab", "a 😀 b", "☃"])
def test_sentencepiece_token_bytes_join_to_the_text(text):
    hf = sentencepiece_style_tokenizer()
    pieces = TokenPieces(hf)
    ids = hf.encode(text, add_special_tokens=False)
    assert b"".join(pieces.bytes[i] for i in ids) == (" " + text).encode()  # SentencePiece's leading space
    assert pieces.bytes[hf.convert_tokens_to_ids("<s>")] == b"<s>"
