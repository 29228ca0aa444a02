"""Request bodies of the OpenAI API as Chitu accepts them, and their checks.

Every request is validated completely here, before any expensive work: types are strict (a string
where a number belongs is a 400, as OpenAI answers), numbers must be finite and in range, sizes
stay within the `serve.*` limits, and a field Chitu does not implement is a 400 naming it, never
silently ignored. Fields sent as null take their defaults. Defaults follow Chitu's ChatRequest:
temperature 0.8, top_p 0.9, top_k 50, no penalties; `max_tokens` absent means `request.max_new_tokens`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from chitu.engine.sampling_params import (INT64_MAX, INT64_MIN, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES,
                                          MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, SamplingParams)
from chitu.serve.errors import APIError


@dataclass(frozen=True)
class RequestLimits:
    """The serve.* limits a body is checked against (pydantic's validation context)."""

    max_prompt_chars: int
    max_prompt_tokens: int
    max_stop_strings: int
    max_stop_chars: int


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = ""
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        """OpenAI's content may be a list of parts; text parts are joined, other kinds refused."""
        if content is None:
            return ""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str) \
                    or len(part) != 2:
                raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
            texts.append(part["text"])
        return "\n".join(texts)

    def template_fields(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)


class GenerationRequest(_Strict):
    """The fields both endpoints share."""

    prompt_param: ClassVar[str] = "prompt"  # the field a too-long prompt is reported against

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=-1, le=INT64_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop_with_eos: bool = True
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any, info: ValidationInfo) -> Any:
        stops = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise ValueError("must be a string or a list of strings")
        limits: RequestLimits = info.context
        if len(stops) > limits.max_stop_strings:
            raise ValueError(f"{len(stops)} stop strings exceed the limit of {limits.max_stop_strings} "
                             f"(serve.max_stop_strings)")
        longest = max(map(len, stops), default=0)
        if longest > limits.max_stop_chars:
            raise ValueError(f"a stop string of {longest} characters exceeds the limit of {limits.max_stop_chars} "
                             f"(serve.max_stop_chars)")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float]) -> dict[str, float]:
        for token, value in bias.items():
            if not token.isdecimal():
                raise ValueError(f"keys must be token ids written as strings, got {token!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value} for token {token}")
        return bias

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}: send {n} separate requests instead")
        return n

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def logprob_settings(self) -> tuple[bool, int]:
        """(whether to return logprobs, how many alternatives per token)."""
        raise NotImplementedError

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        logprobs, top_logprobs = self.logprob_settings()
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=float(self.temperature), top_p=float(self.top_p),
            top_k=self.top_k, min_p=float(self.min_p), frequency_penalty=float(self.frequency_penalty),
            presence_penalty=float(self.presence_penalty), repetition_penalty=float(self.repetition_penalty),
            logit_bias={int(t): float(v) for t, v in self.logit_bias.items()} if self.logit_bias else None,
            stop_token_ids=list(self.stop_token_ids or []), seed=self.seed, logprobs=logprobs,
            top_logprobs=top_logprobs, stop_with_eos=self.stop_with_eos and not self.ignore_eos,
        )


class ChatCompletionRequest(GenerationRequest):
    prompt_param: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _prompt_size(cls, messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        chars = sum(len(m.content) for m in messages)
        _check_chars(chars, info.context)
        return messages

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy API: the number of alternatives

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any, info: ValidationInfo) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            raise ValueError("batches of prompts are not supported: send one request per prompt")
        if isinstance(prompt, str):
            _check_chars(len(prompt), info.context)
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            limit = info.context.max_prompt_tokens
            if len(prompt) > limit:
                raise ValueError(f"{len(prompt)} token ids exceed the limit of {limit} tokens (infer.max_seq_len)")
        else:
            raise ValueError("must be a string or a list of token ids")
        return prompt

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


def _check_chars(chars: int, limits: RequestLimits) -> None:
    if chars > limits.max_prompt_chars:
        raise ValueError(f"the prompt's {chars} characters exceed the limit of {limits.max_prompt_chars} "
                         f"(serve.max_prompt_chars)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes, model: type[GenerationRequest], limits: RequestLimits) -> GenerationRequest:
    """The validated request, or an APIError(400) naming what is wrong. Any content type is read as JSON."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") cannot be text
    except (ValueError, UnicodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data, context=limits)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False, include_context=False)[0]) from None


def _api_error(error: dict) -> APIError:
    param = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "extra_forbidden":
        return APIError(400, f"{param}: this field is not supported by this server", param=param,
                        code="unsupported_field")
    message = error["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param)
