"""The model's chat template as clients may use it: `chat_template_kwargs` reach it only as variables.

A client must never replace the template or steer the tokenizer: keys that name an argument of
`apply_chat_template` (`chat_template`, `tokenize`, …) or a variable the renderer sets itself
(`messages`, `bos_token`, …) are refused; keys the template never reads are dropped, as vLLM does,
so a client may send `enable_thinking` to every model.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

from jinja2 import TemplateSyntaxError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chitu.serve.errors import APIError
from chitu.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# What transformers' renderer passes to every template besides the tokenizer's special tokens.
RENDERER_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                                "raise_exception", "strftime_now"})


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        hf = tokenizer.hf
        arguments = set(inspect.signature(hf.apply_chat_template).parameters) - {"kwargs"}
        self.reserved = RENDERER_VARIABLES | arguments | set(hf.special_tokens_map)
        self.variables = _template_variables(hf.chat_template) - self.reserved

    def template_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The client's kwargs that are variables of this template; a reserved name is a 400."""
        for key in kwargs:
            if key in self.reserved:
                raise APIError(400, f"chat_template_kwargs.{key}: only template variables may be set "
                                    f"(this template reads: {', '.join(sorted(self.variables)) or 'none'})",
                               param=f"chat_template_kwargs.{key}")
        return {key: value for key, value in kwargs.items() if key in self.variables}

    def render(self, messages: list[dict[str, str]], kwargs: dict[str, Any], max_chars: int) -> list[int]:
        """Token ids of the messages ready for the assistant's turn; a rendering longer than `max_chars`
        is refused before it is tokenized."""
        try:
            text = self.tokenizer.render_chat(messages, **self.template_kwargs(kwargs))
        except APIError:
            raise
        except Exception as e:  # the template's own checks (roles in order, …) or no template at all
            raise APIError(400, f"cannot apply the model's chat template to these messages: {e}",
                           param="messages") from None
        if len(text) > max_chars:
            raise APIError(400, f"the rendered chat prompt has {len(text)} characters, over the limit of {max_chars} "
                                f"(serve.max_prompt_chars)", param="messages")
        return self.tokenizer.encode_rendered(text)


def _template_variables(template: Any) -> set[str]:
    if not isinstance(template, str):  # no template, or several named ones
        return set()
    environment = ImmutableSandboxedEnvironment(extensions=[loopcontrols])
    try:
        return meta.find_undeclared_variables(environment.parse(template))
    except TemplateSyntaxError as e:  # e.g. transformers' own {% generation %} tag
        logger.warning("cannot list the chat template's variables (%s): chat_template_kwargs are dropped", e)
        return set()
