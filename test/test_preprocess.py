"""script/preprocess_and_save.py (models/preprocess.py) and the runs that read what it saves
(checkpoint/preprocessed.py: skip_preprocess=True, quant_ckpt_dir=): the saved TP and PP slices give the
original checkpoint's tokens under torchrun; layers rewritten after loading (int8 quantized, a tied int8
LM head, MLA folded) come back as loaded; a run of another layout, or of a directory that was never
preprocessed, is refused by name."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from chitu import LLM, SamplingParams
from chitu.checkpoint import CheckpointError
from chitu.config import compose_config
from chitu.models.loader import load_configured_model
from chitu.models.preprocess import preprocess_and_save
import process_tree
from test_distributed import ENGINE, SPLIT_DECODE, assert_same_generation, generate
from test_models import PagedRun
from test_quant_int8 import tiny_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "script" / "preprocess_and_save.py"


def preprocess(target: Path, nproc: int, overrides: list[str], cwd: Path) -> None:
    """The script as the manual runs it: PREPROCESS_AND_SAVE_DIR=<dir> torchrun ... preprocess_and_save.py <overrides>."""
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    proc = process_tree.run(launcher + [str(SCRIPT), *overrides], timeout=300, cwd=cwd,
                            env={**os.environ, "PREPROCESS_AND_SAVE_DIR": str(target)})
    assert proc.returncode == 0, proc.stderr[-3000:]


def saved_args(directory: Path, model_type: str) -> list[str]:
    return [f"models.ckpt_dir={directory}", f"models.tokenizer_path={directory}", f"models.type={model_type}",
            "skip_preprocess=True"]


@pytest.mark.parametrize("layout", [["infer.tp_size=2"], ["infer.pp_size=2", *SPLIT_DECODE]], ids=["tp2", "pp2"])
def test_saved_partition_gives_the_original_tokens(tmp_path, layout):
    """Qwen3-MoE (experts sliced over the tensor ranks, a dense layer among the MoE ones) saved by two ranks,
    then read back by two ranks, each from its own file."""
    path, model_type = tiny_checkpoint(tmp_path / "original", "qwen3-moe")
    original = [f"models.ckpt_dir={path}", f"models.type={model_type}"]
    saved = tmp_path / "saved"
    preprocess(saved, 2, [*original, *ENGINE, *layout], tmp_path)
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["model.rank0.safetensors", "model.rank1.safetensors"]
    assert json.loads((saved / "chitu_layout.json").read_text())["tp_size"] == (2 if "infer.tp_size=2" in layout else 1)
    assert_same_generation(generate(tmp_path, 2, [*saved_args(saved, model_type), *layout]),
                           generate(tmp_path, 1, original))


def logits_of(model, steps: int = 4) -> list[torch.Tensor]:
    run, token_ids, out = PagedRun(model, 1, 16), [3, 17, 99, 5, 250, 41, 8], []
    for _ in range(steps):
        out.append(run.step({0: token_ids}))
        token_ids = [int(out[-1].argmax())]
    return out


@pytest.mark.parametrize("name,overrides", [
    ("qwen3-moe", ["dtype=bfloat16", "quant=w8a16", "quant_on_load=True"]),  # int8 experts and LM head
    ("llama3-rope-scaling-tied", ["dtype=float32", "quant=w8a16", "quant_on_load=True"]),  # int8 head tied to the embedding
    ("llama", ["dtype=float32", "quant=simple_w8a8", "quant_on_load=True"]),
    ("deepseek-v3", ["dtype=float32", "infer.mla_absorb=absorb"]),  # kv_b_proj folded into q and o, then dropped
], ids=["w8a16-moe", "w8a16-tied", "w8a8", "mla-absorb"])
def test_layers_rewritten_after_loading_come_back_as_loaded(tmp_path, name, overrides):
    """In one process: the model read from the saved file holds the tensors the loaded one held, and its
    logits are those logits exactly; the quantized save reads back through the manual's quant_ckpt_dir."""
    path, model_type = tiny_checkpoint(tmp_path / "original", name)
    common = ["device=cpu", "infer.max_seq_len=64", f"models.type={model_type}"]
    loaded_config = compose_config([f"models.ckpt_dir={path}", *common, *overrides])
    preprocess_and_save(loaded_config, str(tmp_path / "saved"))
    loaded = load_configured_model(loaded_config, torch.device("cpu"))
    quantized = "quant_on_load=True" in overrides
    rerun = ([f"models.ckpt_dir={path}", f"quant_ckpt_dir={tmp_path / 'saved'}"] if quantized
             else saved_args(tmp_path / "saved", model_type))
    reread = load_configured_model(compose_config([*rerun, *common, *(o for o in overrides if "quant" not in o)]),
                                   torch.device("cpu"))
    want = {k: v for k, v in loaded.state_dict().items()}
    got = reread.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for got_logits, want_logits in zip(logits_of(reread), logits_of(loaded), strict=True):
        assert torch.equal(got_logits, want_logits)


def test_other_layouts_and_unpreprocessed_directories_are_refused(tmp_path):
    path, model_type = tiny_checkpoint(tmp_path / "original", "llama")
    common = ["device=cpu", "dtype=float32", "infer.max_seq_len=64"]
    preprocess_and_save(compose_config([f"models.ckpt_dir={path}", f"models.type={model_type}", *common]),
                        str(tmp_path / "saved"))
    wrong = [(["infer.mla_absorb=absorb"], "infer.mla_absorb=none when saved, absorb now"),
             (["dtype=bfloat16"], "dtype=float32 when saved, bfloat16 now"),
             (["quant=w8a16"], "quant=None when saved, w8a16 now")]
    for overrides, message in wrong:
        config = compose_config([*saved_args(tmp_path / "saved", model_type), *common, *overrides])
        with pytest.raises(CheckpointError, match=message):
            load_configured_model(config, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="is not a preprocessed checkpoint"):
        load_configured_model(compose_config([*saved_args(Path(path), model_type), *common]), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="is a preprocessed checkpoint .* read it with skip_preprocess=True"):
        load_configured_model(compose_config([f"models.ckpt_dir={tmp_path / 'saved'}", f"models.type={model_type}",
                                              *common]), torch.device("cpu"))
    (tmp_path / "saved" / "model.rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no file for rank 0"):
        load_configured_model(compose_config([*saved_args(tmp_path / "saved", model_type), *common]),
                              torch.device("cpu"))


def test_a_tp2_save_is_refused_by_one_process(tmp_path):
    path, model_type = tiny_checkpoint(tmp_path / "original", "llama")
    preprocess(tmp_path / "saved", 2, [f"models.ckpt_dir={path}", f"models.type={model_type}", *ENGINE,
                                       "infer.tp_size=2"], tmp_path)
    config = compose_config([*saved_args(tmp_path / "saved", model_type), *ENGINE])
    with pytest.raises(CheckpointError, match="infer.tp_size=2 when saved, 1 now"):
        load_configured_model(config, torch.device("cpu"))


def test_the_default_gguf_model_saves_its_config_and_tokenizer(smollm2_path, tmp_path):
    """SmolLM2 (GGUF: config and tokenizer in the file's metadata) saved, then served from the saved directory
    alone, with its chat template: the same greedy tokens and text."""
    settings = ["dtype=float32", "infer.max_seq_len=256", "infer.max_reqs=2"]
    preprocess(tmp_path / "saved", 1, settings, tmp_path)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    messages = [{"role": "user", "content": "Name three primary colors."}]
    greedy = SamplingParams(max_new_tokens=24, temperature=0)
    outputs = []
    for overrides in ([], saved_args(tmp_path / "saved", "hf-llama")):
        llm = LLM(*settings, *overrides)
        outputs.append(llm.chat(messages, greedy)[0])
        llm.close()
    assert outputs[1].prompt_token_ids == outputs[0].prompt_token_ids
    assert (outputs[1].token_ids, outputs[1].text) == (outputs[0].token_ids, outputs[0].text)
