"""Incremental detokenization for streaming: each new token becomes the text it adds, and no more."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The window starts this many prompt tokens back, so the first output token decodes with its
# leading space (SentencePiece drops the space of a sequence's first word).
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 byte tokens: text still incomplete after this many held tokens
# is malformed, and is emitted as it stands rather than let the window (and each decode) grow.
MAX_HELD_TOKENS = 8
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes only a short window of tokens per step, as vLLM does.

    Tokens [prefix_offset, read_offset) were already emitted and give the context the new tokens
    are decoded in; [read_offset, end) are held back until they make complete characters.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True):
        self._decode_ids = _decoder(tokenizer, skip_special_tokens)
        self._token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one generated token; returns the text it completes ("" while a character is partial)."""
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR)
        if not complete and len(self._token_ids) - self._read_offset < MAX_HELD_TOKENS:
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Emit whatever is still held back, replacement characters included."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        return self._emit(new_text[len(prefix_text):])

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _emit(self, piece: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._pieces.append(piece)
        return piece

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._token_ids[start:end])


def _decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """decode without space clean-up: that rewrites text across token boundaries (" ." -> "."), which would make a
    window's text stop being a prefix of the next window's. A fast tokenizer's decode is then its Rust backend's,
    called here directly: transformers' wrapper around it cost as much again per token (converting the ids)."""
    if isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


def step_text(detokenizer: IncrementalDetokenizer, token_id: int, stop_reason: str | None) -> str:
    """The text a new token adds; a stop token (EOS or a stop_token_ids entry) adds none of its own, and a
    finished request's held-back text is flushed."""
    text = "" if stop_reason == "stop" else detokenizer.add(token_id)
    return text + detokenizer.flush() if stop_reason else text
