"""tokenizer.py: a GGUF file's tokenizer is converted once and then loaded from Chitu's cache, the same tokenizer."""
import os
import shutil

from chitu.tokenizer import Tokenizer

TEXTS = ["Hello world", " The quick brown fox\n\n  jumps", "日本語 😀 <|im_start|>x<|im_end|>", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def behaviour(tokenizer: Tokenizer) -> tuple:
    ids = list(range(0, len(tokenizer.hf), 97))
    return ([tokenizer.encode(t) for t in TEXTS], [tokenizer.encode_rendered(t) for t in TEXTS],
            tokenizer.decode(ids), tokenizer.hf.convert_ids_to_tokens(ids), tokenizer.apply_chat_template(CHAT),
            tokenizer.render_chat(CHAT), sorted(tokenizer.eos_token_ids), tokenizer.hf.all_special_tokens,
            len(tokenizer.hf))


def test_a_gguf_tokenizer_is_converted_once_and_loads_the_same_from_the_cache(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CHITU_CACHE_DIR", str(tmp_path))
    converted = Tokenizer(smollm2_path)
    [entry] = (tmp_path / "tokenizers").iterdir()
    cached = Tokenizer(smollm2_path)
    assert cached.hf.name_or_path == str(entry) != converted.hf.name_or_path
    assert behaviour(cached) == behaviour(converted)


def test_a_file_changed_in_place_is_converted_again(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CHITU_CACHE_DIR", str(tmp_path / "cache"))
    copy = str(shutil.copy(smollm2_path, tmp_path / "model.gguf"))
    Tokenizer(copy)
    Tokenizer(copy)
    stat = os.stat(copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    Tokenizer(copy)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_a_cache_that_cannot_be_written_still_gives_the_tokenizer(smollm2_path, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CHITU_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert Tokenizer(smollm2_path).encode("Hello world") == [19556, 905]


def test_a_damaged_cache_entry_is_converted_again(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CHITU_CACHE_DIR", str(tmp_path))
    expected = behaviour(Tokenizer(smollm2_path))
    [entry] = (tmp_path / "tokenizers").iterdir()
    (entry / "tokenizer.json").write_text("{not json")
    assert behaviour(Tokenizer(smollm2_path)) == expected
    replaced = Tokenizer(smollm2_path)
    assert replaced.hf.name_or_path == str(entry) and behaviour(replaced) == expected
