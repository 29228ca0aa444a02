"""Thinking models' output split into `reasoning_content` and `content`, as vLLM's and Chitu's servers do.

`models.reasoning_parser` says how a model thinks: `deepseek_r1` starts its answer inside the reasoning
(its chat template opens `<think>`), so everything before `</think>` is reasoning; `qwen3` (also GLM-4.5)
reasons only when its output opens with `<think>`, and answers directly when thinking is turned off.
Tags split across streamed pieces are held back until they are whole.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag the next piece may complete)."""
    return next((n for n in range(min(len(text), len(tag) - 1), 0, -1) if tag.startswith(text[-n:])), 0)


class ReasoningSplitter:
    def __init__(self, parser: str):
        self.in_reasoning = parser == "deepseek_r1"
        self.at_start = True  # an opening <think> may still come
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of this piece of the output, as far as it can be told yet."""
        text, self.pending = self.pending + text, ""
        if self.at_start:
            stripped = text.lstrip()
            if len(stripped) < len(OPEN) and OPEN.startswith(stripped):
                self.pending = text
                return "", ""
            self.at_start = False
            if stripped.startswith(OPEN):
                text, self.in_reasoning = stripped[len(OPEN):], True
        reasoning = ""
        if self.in_reasoning:
            end = text.find(CLOSE)
            if end < 0:
                keep = _partial_suffix(text, CLOSE)
                self.pending = text[len(text) - keep:]
                return text[: len(text) - keep], ""
            reasoning, text, self.in_reasoning = text[:end], text[end + len(CLOSE):], False
        return reasoning, text

    def flush(self) -> tuple[str, str]:
        """What was held back, once the output has ended."""
        text, self.pending = self.pending, ""
        return (text, "") if self.in_reasoning else ("", text)


def split_reasoning(text: str, parser: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    splitter = ReasoningSplitter(parser)
    reasoning, content = splitter.feed(text)
    rest = splitter.flush()
    return reasoning + rest[0], content + rest[1]
