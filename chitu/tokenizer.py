"""Tokenizer and chat template, from an HF checkpoint directory or a GGUF file's metadata."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, location: str):
        self.hf = from_gguf(location) if location.endswith(".gguf") else AutoTokenizer.from_pretrained(location)
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


def from_gguf(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file's metadata describes. transformers builds it in seconds (it parses the whole
    file), so it is saved once in Chitu's cache (`cache_root()`), keyed by the file and the transformers version,
    and loaded from there in a fraction of a second after that. A cache that cannot be read or written is
    passed over."""
    try:
        cached = cache_root() / "tokenizers" / _gguf_key(path)
    except (OSError, RuntimeError) as error:  # no home directory
        logger.info("the tokenizer of %s is not cached (%s)", path, error)
        cached = None
    if cached is not None and (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception as error:  # a damaged entry: convert again, and replace it
            logger.warning("the cached tokenizer %s cannot be loaded (%s); converting %s again", cached, error, path)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    if cached is not None and not cached.exists():
        _save(tokenizer, cached)
    return tokenizer


def _save(tokenizer: PreTrainedTokenizerBase, cached: Path) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cached.parent)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, cached)  # whole or not at all: ranks or servers may save at once
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another one did
    except OSError as error:
        logger.info("the tokenizer is not cached in %s (%s)", cached, error)


def cache_root() -> Path:
    """Where Chitu keeps what it derives from checkpoints: CHITU_CACHE_DIR, else $XDG_CACHE_HOME/chitu, else
    ~/.cache/chitu."""
    if os.environ.get("CHITU_CACHE_DIR"):
        return Path(os.environ["CHITU_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chitu"


def _gguf_key(path: str) -> str:
    stat = os.stat(path)
    identity = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]

