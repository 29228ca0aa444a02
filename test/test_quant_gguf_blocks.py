"""quant=gguf (quant/gguf_blocks.py) on the real default model, SmolLM2 (Q4_1 layers, its tied Q8_0
embedding as the LM head, llama.cpp-permuted Q/K rows): logits as the model holding the dequantized
weights gives them, in float32; with bf16 activations (x through Q8_0, as llama.cpp takes it) its argmax
along 64 decode steps; greedy tokens against transformers' on the same file."""
import pytest
import torch

from chitu import LLM, SamplingParams
from chitu.checkpoint import open_checkpoint
from chitu.config import compose_config
from chitu.models.loader import load_configured_model, load_model
from chitu.quant.config import UnsupportedQuantizationError
from chitu.quant.gguf_blocks import GGUFBlocksMethod
from chitu.quant.linear_method import UnquantizedLinearMethod
from test_models import PagedRun, relative_error
from test_quant_int8 import tiny_checkpoint
from test_smollm2 import QUESTIONS, SYSTEM, hf_greedy, hf_reference  # noqa: F401 (a fixture)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def smollm2(path: str, gguf_blocks: bool, device: str = "cpu"):
    with open_checkpoint(path) as reader:
        return load_model(reader, "hf-llama", 256, torch.device(device), torch.float32, gguf_blocks=gguf_blocks)


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_give_the_dequantized_models_logits(smollm2_path, device):
    """On the CPU the C++ kernels read the blocks; on CUDA the Triton kernels their repacked fields."""
    blocks, dense = smollm2(smollm2_path, True, device), smollm2(smollm2_path, False)
    kept = {s.qtype for m in blocks.modules() if isinstance(getattr(m, "method", None), GGUFBlocksMethod)
            for s in m.gguf_segments}
    assert kept == {"Q4_1", "Q8_0"}  # every projection keeps its blocks, and the LM head
    assert blocks.lm_head.gguf_segments[0].qtype == "Q8_0"
    runs = [PagedRun(blocks, 2, 48, device), PagedRun(dense, 2, 48)]
    new_tokens = {0: [1, 9690, 28, 253, 5356, 30], 1: list(range(300, 337))}  # prefill two, then decode both
    for step in range(4):
        got, want = (run.step(new_tokens) for run in runs)
        assert relative_error(got, want) < 1e-5, f"step {step} (0 = prefill)"
        new_tokens = {s: [int(want[i].argmax())] for i, s in enumerate(new_tokens)}


def test_bf16_activations_meet_the_blocks_through_q8_0_and_follow_the_dequantized_model(hf_reference,  # noqa: F811
                                                                                             smollm2_path):
    """bf16 activations take the integer dots (x quantized to Q8_0, as llama.cpp takes it): teacher-forced
    along the float32 dequantized model's greedy reply to the default chat prompt (and along a prompt of plain
    ids) for 64 decode steps, the argmax agrees with that model's on at least 95% of the tokens (llama.cpp:
    61 of 64)."""
    with open_checkpoint(smollm2_path) as reader:
        blocks = load_model(reader, "hf-llama", 256, torch.device("cpu"), torch.bfloat16, gguf_blocks=True)
    dense = smollm2(smollm2_path, False)
    chat = hf_reference[0].apply_chat_template([SYSTEM, {"role": "user", "content": QUESTIONS[0]}],
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
    new_tokens = {0: list(chat), 1: list(range(300, 337))}
    runs = [PagedRun(model, 2, 128) for model in (blocks, dense)]
    agree = 0
    for step in range(65):
        got, want = (run.step(new_tokens) for run in runs)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum()) if step else 0
        new_tokens = {s: [int(want[i].argmax())] for i, s in enumerate(new_tokens)}
    assert agree >= 0.95 * 128, f"{agree} of 128 argmaxes agree"


def test_greedy_tokens_match_transformers(hf_reference):  # noqa: F811
    """64 greedy tokens per question, a batch of three: equal to transformers' (float32 on the
    dequantized file) up to the first step where its best two logits are within 0.15."""
    llm = LLM("quant=gguf", "dtype=float32", "infer.max_seq_len=512", "infer.max_reqs=4")
    outputs = llm.chat([[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS],
                       SamplingParams(max_new_tokens=64, temperature=0))
    llm.close()
    tokenizer, model = hf_reference
    for question, output in zip(QUESTIONS, outputs):
        expected = hf_greedy(hf_reference, question, 64)
        agree = next((i for i, (a, b) in enumerate(zip(output.token_ids, expected)) if a != b), 64)
        if agree < 64:  # they may part only at a near-tie of transformers' logits
            ids = torch.tensor([output.prompt_token_ids + expected[:agree]])
            with torch.inference_mode():
                top2 = model(ids).logits[0, -1].float().topk(2).values
            assert (top2[0] - top2[1]).item() < 0.15, (question, agree)


def test_gguf_blocks_need_a_gguf_file_and_a_device_with_kernels(tmp_path, smollm2_path):
    path, model_type = tiny_checkpoint(tmp_path, "llama")
    with open_checkpoint(path) as reader, pytest.raises(UnsupportedQuantizationError, match="is not one"):
        load_model(reader, model_type, 64, torch.device("cpu"), torch.float32, gguf_blocks=True)
    with open_checkpoint(smollm2_path) as reader, pytest.raises(UnsupportedQuantizationError, match="not for device=meta"):
        load_model(reader, "hf-llama", 64, torch.device("meta"), torch.float32, gguf_blocks=True)


@pytest.mark.parametrize("quant,kept", [(None, True), ("none", False), ("gguf", True)])
def test_on_the_cpu_a_gguf_file_keeps_its_blocks_unless_quant_is_none(smollm2_path, quant, kept):
    overrides = [f"models.ckpt_dir={smollm2_path}", "device=cpu", "dtype=float32", "infer.max_seq_len=64"]
    model = load_configured_model(compose_config(overrides + ([f"quant={quant}"] if quant else [])),
                                  torch.device("cpu"))
    methods = {type(m.method) for m in model.modules() if getattr(m, "method", None) is not None}
    assert methods == ({GGUFBlocksMethod} if kept else {UnquantizedLinearMethod})
