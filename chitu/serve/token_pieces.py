"""Each vocabulary token's own bytes and text, for logprobs, built once so responses never decode.

Decoding one token of a character split into several byte tokens (an emoji under byte-level BPE)
gives U+FFFD; the token's real bytes come from the vocabulary instead: byte-level BPE maps every
byte to a printable character (GPT-2's table), SentencePiece writes spaces as U+2581 and bytes
that are not characters as `<0xHH>`; added and special tokens are their literal text.
"""
from __future__ import annotations

import json
import re

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


class TokenPieces:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        literal = {token_id: added.content for token_id, added in tokenizer.added_tokens_decoder.items()}
        to_bytes = _byte_level_bytes if _is_byte_level(tokenizer) else _sentencepiece_bytes
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.bytes = [literal[i].encode() if i in literal else to_bytes(piece or "") for i, piece in enumerate(pieces)]
        self.text = [b.decode("utf-8", errors="replace") for b in self.bytes]

    def label(self, token_id: int) -> str:
        """The token's text, or OpenAI's `bytes:\\xNN…` when its bytes are not whole UTF-8 characters."""
        raw = self.bytes[token_id]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level_bytes(piece: str) -> bytes:
    return bytes(_UNICODE_TO_BYTE[c] for c in piece) if all(c in _UNICODE_TO_BYTE for c in piece) else piece.encode()


def _sentencepiece_bytes(piece: str) -> bytes:
    byte = _BYTE_FALLBACK.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
