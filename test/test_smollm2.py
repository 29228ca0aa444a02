"""The real default model: Chitu's greedy output on SmolLM2-135M-Instruct (GGUF Q4_1) equals
transformers' greedy output on the same file."""
import os

import pytest
import torch

from chitu import LLM, SamplingParams

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTIONS = ["What is machine learning?", "Name three primary colors.", "写一首关于月亮的短诗。"]


@pytest.fixture(scope="module")
def hf_reference(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM("dtype=float32", "infer.max_seq_len=512", "infer.max_reqs=4")


@torch.inference_mode()
def hf_greedy(hf_reference, question: str, max_new_tokens: int) -> list[int]:
    tokenizer, model = hf_reference
    ids = tokenizer.apply_chat_template([SYSTEM, {"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_64_tokens_match_transformers(llm, hf_reference):
    greedy = SamplingParams(max_new_tokens=64, temperature=0)
    outputs = llm.chat([[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS], greedy)  # batch of 3
    for question, output in zip(QUESTIONS, outputs):
        expected = hf_greedy(hf_reference, question, 64)
        assert output.token_ids == expected, question
        assert output.text == hf_reference[0].decode(expected, skip_special_tokens=True)
    assert "machine learning" in outputs[0].text.lower()


@torch.inference_mode()
def test_logprobs_are_log_softmax_of_the_logits(llm, hf_reference):
    tokenizer, model = hf_reference
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    [output] = llm.chat(messages, SamplingParams(max_new_tokens=4, temperature=0, logprobs=True, top_logprobs=5))
    ids = torch.tensor([output.prompt_token_ids + output.token_ids])
    expected = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    prompt_len = len(output.prompt_token_ids)
    for i, entry in enumerate(output.logprobs):
        row = expected[prompt_len - 1 + i]
        assert entry.token_id == output.token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-3)
        top_ids = [token for token, _ in entry.top]
        assert top_ids == row.topk(5).indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(row.topk(5).values.tolist(), abs=1e-3)
