"""The model families through the Triton kernels on the CPU, under Triton's interpreter: fp32 logits against
transformers, batch 3 (prefill in chunks, then decode) and a lone sequence (the GEMV paths with the norm and
SiLU-and-mul folded in, the fused rotary + K/V store). test_triton_interpreted.py runs this file in a process of its
own with TRITON_INTERPRET=1, which triton reads as it defines the kernels. The interpreter runs the kernels' code,
not their compiled form: the GPU tests still decide about rounding in bf16 and about speed."""
from __future__ import annotations

import collections
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (test_triton_interpreted.py sets it)", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

import chitu.ops.triton as triton_ops  # noqa: E402
import test_codes_gemv  # noqa: E402
import test_grouped_codes  # noqa: E402
import test_models  # noqa: E402
from chitu.ops import attention as attention_ops  # noqa: E402
from chitu.ops.triton import attention, gemv, moe_config, rotary  # noqa: E402
from chitu.quant.grouped_codes import GroupedCodes  # noqa: E402

FAMILIES = ["llama", "qwen3", "glm4", "qwen3-moe", "glm4-moe", "deepseek-v3"]


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    """Every dispatcher takes the Triton kernels for CPU tensors (attention's too); GEMV tiles fixed (no GPU table or autotuning);
    the calls of the fused kernels counted."""
    monkeypatch.setattr(triton_ops, "enabled", lambda x: True)
    monkeypatch.setattr(attention_ops, "kernels_run", lambda backend, x: True)  # whatever backend the test sets
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)  # an H100's, for the decode splits
    monkeypatch.setattr(moe_config, "_tuned", lambda device_index: {})  # the MoE kernels' heuristic tiles
    monkeypatch.setattr(gemv, "tuned_tile", lambda *args: gemv.GemvTile(4, 32, 4, 1))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _index_of_one_element_arrays(interpreter._patch_lang_tensor))
    calls = collections.Counter()
    for module, name in [(rotary, "rotate_and_store_kv"), (gemv, "norm_gemv"), (gemv, "gated_gemv")]:
        monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    return calls


def _index_of_one_element_arrays(patch):
    """triton 3.6's interpreter converts a scalar argument (a one-element array) with int(), which NumPy 2
    refuses: a loop bound like range(BLOCK_K, K, BLOCK_K) fails. Convert it with .item()."""
    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    return patched


def _counted(fn, name: str, calls: collections.Counter):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("name", FAMILIES)
def test_family_through_interpreted_kernels_matches_transformers(name, tmp_path, kernels_on_cpu):
    model_type, config_cls, model_cls, extra = test_models.FAMILIES[name]
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**{**test_models.TINY, **extra})).eval()
    test_models.randomize(hf_model)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = test_models.load_tiny(tmp_path, model_type, "cpu", torch.float32)
    for step, (error,) in enumerate(test_models.run_prefill_and_decode(model, [hf_model])):
        assert error <= 1e-4, f"batch 3, step {step} (0 = prefill)"
    sequence = torch.randint(0, test_models.TINY["vocab_size"], (7,), generator=torch.Generator().manual_seed(2)).tolist()
    run = test_models.PagedRun(model, 1, len(sequence) + 4)
    logits = run.step({0: sequence})
    for step in range(4):
        expected = test_models.hf_last_logits(hf_model, [sequence])
        assert test_models.relative_error(logits, expected) <= 1e-4, f"one row, step {step}"
        sequence.append(int(expected.argmax()))
        logits = run.step({0: [sequence[-1]]})
    attention_fused = model_type != "deepseek-v3"  # MLA stores its latents its own way
    assert kernels_on_cpu["norm_gemv"] and kernels_on_cpu["gated_gemv"]  # each family has dense MLP layers
    assert (kernels_on_cpu["rotate_and_store_kv"] > 0) == attention_fused


@pytest.mark.parametrize("qtype", test_codes_gemv.TAKEN + ["int8"])
def test_integer_codes_gemv_matches_its_reference(qtype: str):
    if qtype == "int8":
        codes = GroupedCodes.from_int8(torch.randint(-127, 128, (19, 160), dtype=torch.int8), torch.rand(19) / 100)
    else:
        codes, _ = test_grouped_codes.random_codes(qtype, 37, 3 * (8 if qtype in ("Q4_0", "Q4_1", "Q8_0") else 1))
    for tile in [dict(BLOCK_N=16, GROUPS=8), dict(BLOCK_N=4, GROUPS=32)]:
        test_codes_gemv.check_against_reference(codes, torch.float32, "cpu", tile)
