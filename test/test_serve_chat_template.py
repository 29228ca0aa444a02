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
# Qwen3's switch (Qwen3-8B, Qwen3-30B-A3B, …): with enable_thinking defined and false, the generation prompt
# ends with an empty think block, so the model answers at once; otherwise the model opens its own <think>.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
# GLM-4.5's switch (GLM-4.5, GLM-4.5-Air): with enable_thinking defined and false, each user turn gets
# `/nothink` (unless it already ends with it) and the generation prompt an empty think block.
GLM45_STYLE_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not m.content.endswith('/nothink'))"
    " else '' -}}"
    "{%- elif m.role == 'assistant' %}<|assistant|>\n<think></think>\n{{ m.content }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt -%}"
    "<|assistant|>{{- '\\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' -}}"
    "{%- endif %}")
MESSAGES = [{"role": "user", "content": "hi"}]


def chat_template(source: str) -> ChatTemplate:
    tokenizer = Tokenizer.__new__(Tokenizer)
    tokenizer.hf = sentencepiece_style_tokenizer()
    tokenizer.hf.chat_template = source
    return ChatTemplate(tokenizer)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return chat_template(THINKING_TEMPLATE)


def rendered(template: ChatTemplate, kwargs: dict) -> str:
    return template.tokenizer.hf.decode(template.render(MESSAGES, kwargs, max_chars=1000))


def test_template_variables_reach_the_template(template):
    assert template.variables == {"enable_thinking"}
    assert rendered(template, {"enable_thinking": False}).endswith("<think></think>")
    assert not rendered(template, {"enable_thinking": True}).endswith("</think>")


QWEN3_THINKING = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NOT_THINKING = QWEN3_THINKING + "<think>\n\n</think>\n\n"
GLM45_THINKING = "[gMASK]<sop><|user|>\nhi<|assistant|>"
GLM45_NOT_THINKING = "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"


@pytest.mark.parametrize("source, kwargs, prompt", [
    (QWEN3_STYLE_TEMPLATE, {"enable_thinking": False}, QWEN3_NOT_THINKING),
    (QWEN3_STYLE_TEMPLATE, {"enable_thinking": True}, QWEN3_THINKING),
    (QWEN3_STYLE_TEMPLATE, {}, QWEN3_THINKING),
    (GLM45_STYLE_TEMPLATE, {"enable_thinking": False}, GLM45_NOT_THINKING),
    (GLM45_STYLE_TEMPLATE, {"enable_thinking": True}, GLM45_THINKING),
    (GLM45_STYLE_TEMPLATE, {}, GLM45_THINKING),
], ids=["qwen3-off", "qwen3-on", "qwen3-default", "glm45-off", "glm45-on", "glm45-default"])
def test_enable_thinking_switches_qwen3_and_glm45_style_templates(source, kwargs, prompt):
    template = chat_template(source)
    assert template.variables == {"enable_thinking"}
    ids = template.render(MESSAGES, {**kwargs, "reasoning_effort": "low"}, max_chars=1000)
    assert ids == template.tokenizer.encode_rendered(prompt)
    assert template.tokenizer.hf.decode(ids) == prompt


def test_glm45_style_nothink_goes_on_every_user_turn_once():
    template = chat_template(GLM45_STYLE_TEMPLATE)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab"},
                {"role": "user", "content": "b/nothink"}]
    assert template.tokenizer.hf.decode(template.render(messages, {"enable_thinking": False}, max_chars=1000)) == (
        "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>\nab<|user|>\nb/nothink"
        "<|assistant|>\n<think></think>")


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
