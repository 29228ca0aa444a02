"""How one request wants its tokens chosen and when it stops."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300   # OpenAI's limit
MAX_LOGIT_BIAS = 100.0
MAX_STOP_TOKEN_IDS = 64
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


class InvalidSamplingParam(ValueError):
    """A SamplingParams field of the wrong type or out of range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # pickled to the server's process
        return type(self), (self.param, str(self))


@dataclass
class SamplingParams:
    """Defaults follow Chitu's UserRequest; temperature 0 means greedy. Every feature is off by default.

    The sampler applies, in order: repetition, frequency and presence penalties, then logit_bias (greedy
    rows take the argmax here); then temperature, min_p, top-k and top-p, as vLLM does.
    """

    max_new_tokens: int = 128
    temperature: float = 0.8          # [0, 2]
    top_p: float = 0.9                # (0, 1]
    top_k: int = 50                   # -1 or 0: no top-k filtering; more than the vocabulary: none either
    min_p: float = 0.0                # [0, 1]: drop tokens less likely than min_p x the most likely one
    frequency_penalty: float = 0.0    # [-2, 2], OpenAI's: minus penalty x count in the generated tokens
    presence_penalty: float = 0.0     # [-2, 2], OpenAI's: minus penalty if in the generated tokens
    repetition_penalty: float = 1.0   # (0, 2], HF's: a prompt or generated token's logit l -> l/p if l > 0, else l*p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]; ≤ 300 entries
    seed: int | None = None           # noise keyed by (seed, position, token): reproducible whatever else is in the batch
    logprobs: bool = False            # return log_softmax(logits) of each chosen token
    top_logprobs: int = 0             # and of this many most likely alternatives
    stop_with_eos: bool = True        # false: ignore EOS and always produce max_new_tokens
    # ≤ 64 ids that finish the request ("stop") whatever stop_with_eos; like EOS, the stop token is the last of
    # the output's token ids but adds no text
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalises_prompt(self) -> bool:
        """The sampler needs the prompt's token ids (repetition_penalty covers the prompt too)."""
        return self.repetition_penalty != 1

    def validate(self) -> None:
        """Raise InvalidSamplingParam naming the first field of the wrong type or out of range. Token ids
        (logit_bias keys, stop_token_ids) are checked against the vocabulary when the engine admits them."""
        _check_int("max_new_tokens", self.max_new_tokens, 1, INT64_MAX)
        _check_float("temperature", self.temperature, 0, 2)
        _check_float("top_p", self.top_p, 0, 1, open_low=True)
        _check_int("top_k", self.top_k, -1, INT64_MAX)
        _check_float("min_p", self.min_p, 0, 1)
        _check_float("frequency_penalty", self.frequency_penalty, -2, 2)
        _check_float("presence_penalty", self.presence_penalty, -2, 2)
        _check_float("repetition_penalty", self.repetition_penalty, 0, 2, open_low=True)
        self._check_logit_bias()
        if self.seed is not None:
            _check_int("seed", self.seed, INT64_MIN, INT64_MAX)
        _check_bool("logprobs", self.logprobs)
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidSamplingParam("top_logprobs", "top_logprobs requires logprobs to be true")
        _check_bool("stop_with_eos", self.stop_with_eos)
        self._check_stop_token_ids()

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise InvalidSamplingParam("logit_bias", f"logit_bias must be a dict of token id -> bias, "
                                                     f"got {type(self.logit_bias).__name__}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidSamplingParam("logit_bias", f"logit_bias has {len(self.logit_bias)} entries, more than "
                                                     f"the limit of {MAX_LOGIT_BIAS_ENTRIES}")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias", token_id, 0, INT64_MAX, what=f"logit_bias key {token_id!r}")
            _check_float("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, what=f"logit_bias[{token_id}]")

    def _check_stop_token_ids(self) -> None:
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidSamplingParam("stop_token_ids", f"stop_token_ids must be a list of token ids, "
                                                         f"got {type(self.stop_token_ids).__name__}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParam("stop_token_ids", f"stop_token_ids has {len(self.stop_token_ids)} entries, "
                                                         f"more than the limit of {MAX_STOP_TOKEN_IDS}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, INT64_MAX, what=f"stop_token_ids entry {token_id!r}")


def _check_int(param: str, value: object, low: int, high: int, what: str | None = None) -> None:
    what = what or param
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParam(param, f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidSamplingParam(param, f"{what} must be in [{low}, {high}], got {value}")


def _check_float(param: str, value: object, low: float, high: float, open_low: bool = False,
                 what: str | None = None) -> None:
    what = what or param
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSamplingParam(param, f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or not (low < value if open_low else low <= value) or value > high:
        raise InvalidSamplingParam(param, f"{what} must be in {'(' if open_low else '['}{low:g}, {high:g}], "
                                          f"got {value}")


def _check_bool(param: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidSamplingParam(param, f"{param} must be true or false, got {value!r}")
