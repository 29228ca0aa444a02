"""OpenAI's response shapes: chat.completion(.chunk) and text_completion, whole and streamed."""
from __future__ import annotations

import time

from chitu.engine.request import TokenLogprob
from chitu.serve.reasoning import ReasoningSplitter, split_reasoning
from chitu.serve.token_pieces import TokenPieces


class ResponseFormat:
    """The shapes of one request's response; subclasses say how a choice and its logprobs look."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, pieces: TokenPieces, logprobs: bool, include_usage: bool):
        self.request_id = request_id
        self.model = model
        self.pieces = pieces
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())

    def first_chunks(self) -> list[dict]:
        return []

    def piece_chunk(self, text: str, logprobs: list[TokenLogprob]) -> dict:
        return self._chunk([self._stream_choice(text, self._logprobs(logprobs), None)])

    def finish_chunk(self, finish_reason: str) -> dict:
        return self._chunk([self._stream_choice(None, None, finish_reason)])

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}

    def response(self, text: str, logprobs: list[TokenLogprob], finish_reason: str, usage: dict) -> dict:
        return {"id": self.request_id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [self._full_choice(text, self._logprobs(logprobs), finish_reason)], "usage": usage}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.request_id, "object": self.chunk_object_name, "created": self.created,
                 "model": self.model, "choices": choices}
        if self.include_usage:  # OpenAI then sends "usage": null on every chunk but the last
            chunk["usage"] = None
        return chunk

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        raise NotImplementedError

    def _stream_choice(self, text: str | None, logprobs: dict | None, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def _full_choice(self, text: str, logprobs: dict | None, finish_reason: str) -> dict:
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    """reasoning_parser (serve/reasoning.py): split a thinking model's output into `reasoning_content`
    and `content`; None leaves it all content."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, *args, reasoning_parser: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reasoning_parser = reasoning_parser
        self.splitter = ReasoningSplitter(reasoning_parser) if reasoning_parser else None

    def first_chunks(self) -> list[dict]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def _stream_choice(self, text: str | None, logprobs: dict | None, finish_reason: str | None) -> dict:
        if self.splitter is None:
            delta = {} if text is None else {"content": text}
        else:  # the finish chunk carries what the splitter held back
            delta = self._delta(*(self.splitter.flush() if text is None else self.splitter.feed(text)))
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def _delta(reasoning: str, content: str) -> dict:
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {})}

    def _full_choice(self, text: str, logprobs: dict | None, finish_reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        if self.reasoning_parser:
            reasoning, content = split_reasoning(text, self.reasoning_parser)
            message = {"role": "assistant", "reasoning_content": reasoning or None, "content": content}
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        content = [{**self._entry(e.token_id, e.logprob),
                    "top_logprobs": [self._entry(token_id, logprob) for token_id, logprob in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.pieces.text[token_id], "logprob": logprob, "bytes": list(self.pieces.bytes[token_id])}


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_offset = 0  # of the next token within the generated text, across chunks

    def _stream_choice(self, text: str | None, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    def _full_choice(self, text: str, logprobs: dict | None, finish_reason: str) -> dict:
        return self._stream_choice(text, logprobs, finish_reason)

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        offsets = []
        for e in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(self.pieces.text[e.token_id])
        return {"tokens": [self.pieces.label(e.token_id) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._alternatives(e.top) for e in entries], "text_offset": offsets}

    def _alternatives(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """The legacy API keys alternatives by their text; tokens whose labels collide keep their ids."""
        alternatives: dict[str, float] = {}
        for token_id, logprob in top:
            label = self.pieces.label(token_id)
            alternatives[f"token_id:{token_id}" if label in alternatives else label] = logprob
        return alternatives
