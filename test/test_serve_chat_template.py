"""chat_template_kwargs reach the model's template only as its variables: a client can neither replace the
template nor pass tokenizer arguments; a rendering longer than the limit is refused before tokenizing."""
from __future__ import annotations

import pytest

from chitu.serve.chat_template import ChatTemplate
from chitu.serve.errors import APIError
from chitu.tokenizer import Tokenizer
from test_serve_token_pieces import sentencepiece_style_tokenizer

THINKING_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                     "<think></think>{% endif %}{% endif %}")
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    tokenizer = Tokenizer.__new__(Tokenizer)
    tokenizer.hf = sentencepiece_style_tokenizer()
    tokenizer.hf.chat_template = THINKING_TEMPLATE
    return ChatTemplate(tokenizer)


def rendered(template: ChatTemplate, kwargs: dict) -> str:
    return template.tokenizer.hf.decode(template.render(MESSAGES, kwargs, max_chars=1000))


def test_template_variables_reach_the_template(template):
    assert template.variables == {"enable_thinking"}
    assert rendered(template, {"enable_thinking": False}).endswith("<think></think>")
    assert not rendered(template, {"enable_thinking": True}).endswith("</think>")


def test_keys_the_template_does_not_read_are_dropped(template):
    assert rendered(template, {"reasoning_effort": "high"}) == rendered(template, {})


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "tokenizer_kwargs", "return_tensors", "messages",
                                 "add_generation_prompt", "bos_token", "tools"])
def test_reserved_keys_are_refused(template, key):
    with pytest.raises(APIError) as error:
        template.render(MESSAGES, {key: "{{ 'a' * 20000000 }}"}, max_chars=1000)
    assert error.value.status_code == 400 and error.value.param == f"chat_template_kwargs.{key}"


def test_a_rendering_over_the_limit_is_refused(template):
    with pytest.raises(APIError, match="over the limit of 20"):
        template.render([{"role": "user", "content": "x" * 30}], {}, max_chars=20)


def test_smollm2_template_has_no_client_variables(smollm2_path):
    template = ChatTemplate(Tokenizer(smollm2_path))
    assert template.variables == set()
    assert template.render(MESSAGES, {"enable_thinking": False}, 10_000) == template.tokenizer.apply_chat_template(MESSAGES)
