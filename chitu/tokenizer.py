"""Tokenizer and chat template, from an HF checkpoint directory or a GGUF file's metadata."""
from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer


class Tokenizer:
    def __init__(self, location: str):
        if location.endswith(".gguf"):
            self.hf = AutoTokenizer.from_pretrained(os.path.dirname(location) or ".", gguf_file=os.path.basename(location))
        else:
            self.hf = AutoTokenizer.from_pretrained(location)
        self.eos_token_ids = frozenset(self._eos_ids(location))

    def _eos_ids(self, location: str) -> set[int]:
        ids = {self.hf.eos_token_id} if self.hf.eos_token_id is not None else set()
        generation_config = os.path.join(location, "generation_config.json")
        if os.path.isfile(generation_config):
            with open(generation_config) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        """Token ids of `messages` rendered by the model's chat template, ready for the assistant's turn."""
        return self.encode_rendered(self.render_chat(messages, **template_kwargs))

    def render_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template: send a plain prompt instead")
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat carries its special tokens itself."""
        return self.hf.encode(text, add_special_tokens=False)
