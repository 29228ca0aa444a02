"""Tensor and pipeline parallelism over real torch.distributed (gloo, several processes on the CPU):
every layout must produce the tokens of one process and logprobs within 1e-4 (fp32), on tiny random
Llama, Qwen3, Qwen3-MoE, GLM-4.5 and Mixtral checkpoints and on SmolLM2 (expert parallelism included). Sharding rules and start-up errors are checked in-process."""
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from chitu.config import compose_config
from chitu.config.schema import ConfigError
from chitu.distributed.expert_placement import ExpertPlacement
from chitu.distributed.parallel_state import ParallelState, check_world_size
from chitu.distributed.sharding import Span, head_shard, stage_layers, vocab_shard
import process_tree
from test_launchers import SSH, fake_bin, real_env  # noqa: F401 (fake_bin is a fixture)
from test_models import randomize

SCRIPT = Path(__file__).with_name("dist_generate.py")
TOLERANCE = 1e-4
ENGINE = ["dtype=float32", "infer.max_seq_len=128", "infer.max_reqs=4", "infer.block_size=16",
          "infer.prefill_chunk_size=32", "infer.comm_timeout_s=60"]
SPLIT_DECODE = ["scheduler.pp_config.enforce_decode_num_tasks_max=False", "scheduler.pp_config.decode_num_tasks=2"]
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-6)
MODELS = {
    # an odd vocabulary, so the last tensor rank's vocabulary shard is padded
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=2, vocab_size=321)),
    # one KV head: at tp_size=2 both ranks hold a replica of it
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(num_key_value_heads=1, vocab_size=320,
                                                                            head_dim=32)),
    # 5 experts: expert groups of 2 and 3; a dense layer among the MoE ones
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_key_value_heads=2, vocab_size=320, head_dim=16, num_experts=5, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[2])),
    "glm4-moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, dict(
        num_key_value_heads=2, vocab_size=320, head_dim=16, n_routed_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, use_qk_norm=True, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=1)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_key_value_heads=2, vocab_size=320, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "deepseek-v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        num_key_value_heads=4, vocab_size=320, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name, (config_cls, model_cls, extra) in MODELS.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**TINY, **extra))
        randomize(model)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        paths[name] = str(path)
    return paths


MODEL_TYPES = {"qwen3-moe": "hf-qwen-3-moe", "glm4-moe": "hf-glm-4-moe", "mixtral": "hf-mixtral",
               "deepseek-v3": "deepseek-v3"}


def model_args(name: str, path: str) -> list[str]:
    return [f"models.ckpt_dir={path}", f"models.type={MODEL_TYPES.get(name, 'hf-llama')}"]


def generate(tmp_path: Path, nproc: int, overrides: list[str], torchrun: bool = False) -> list[dict]:
    out = tmp_path / f"out_{nproc}_{torchrun}_{abs(hash(tuple(overrides)))}.json"
    torchrun = torchrun or nproc > 1
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(nproc)] if torchrun else [sys.executable]
    proc = process_tree.run(launcher + [str(SCRIPT), str(out), *ENGINE, *overrides], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_same_generation(actual: list[dict], expected: list[dict]) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["top_ids"] == want["top_ids"]
        for got_row, want_row in zip(got["logprobs"], want["logprobs"], strict=True):
            assert max(abs(a - b) for a, b in zip(got_row, want_row, strict=True)) < TOLERANCE


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory, smollm2_path) -> dict[str, list[dict]]:
    """One process per model: what every parallel layout must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {name: generate(tmp, 1, model_args(name, path)) for name, path in checkpoints.items()}
    runs["smollm2"] = generate(tmp, 1, [f"models.ckpt_dir={smollm2_path}"])
    return runs


LAYOUTS = [
    ("llama", 2, ["infer.tp_size=2"]),
    ("llama", 2, ["infer.pp_size=2", *SPLIT_DECODE]),
    ("llama", 4, ["infer.tp_size=2", "infer.pp_size=2", "infer.pp_layer_partition=[1,3]", *SPLIT_DECODE]),
    ("qwen3", 2, ["infer.tp_size=2"]),
    ("qwen3", 2, ["infer.pp_size=2"]),
    # 9 heads in 3 KV groups: one rank gets one group, the other two
    ("smollm2", 2, ["infer.tp_size=2"]),
    ("smollm2", 2, ["infer.pp_size=2", *SPLIT_DECODE]),
    # GGUF blocks kept (quant=gguf): each rank slices its rows, or whole blocks of its columns
    ("smollm2", 2, ["infer.tp_size=2", "quant=gguf"]),
    # MoE: experts sliced over the tensor ranks (ep_size=1), whole experts per rank (ep_size=tp_size),
    # and both at once (two expert groups of two ranks); attention tensor-parallel throughout
    ("qwen3-moe", 2, ["infer.tp_size=2"]),
    ("qwen3-moe", 2, ["infer.tp_size=2", "infer.ep_size=2"]),
    ("qwen3-moe", 4, ["infer.tp_size=2", "infer.pp_size=2", "infer.ep_size=2", *SPLIT_DECODE]),
    ("glm4-moe", 2, ["infer.tp_size=2", "infer.ep_size=2"]),
    ("mixtral", 4, ["infer.tp_size=4", "infer.ep_size=2"]),
    # MLA heads split over the ranks, kv_b_proj folded per rank, the latent cache (the reference: mla_absorb=none)
    ("deepseek-v3", 2, ["infer.tp_size=2", "infer.ep_size=2", "infer.mla_absorb=absorb"]),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_under_torchrun_on_one_gpu_matches_plain_python(checkpoints, tmp_path):
    """One GPU, `torchrun --nproc_per_node 1`: the expert-parallel placement with ep_size=1 and the fused
    MoE kernels under CUDA graphs (bf16: fp32 MoE runs the torch reference) give what a plain process gives."""
    args = model_args("qwen3-moe", checkpoints["qwen3-moe"]) + ["device=cuda", "dtype=bfloat16", "infer.ep_size=1",
                                                                "infer.use_cuda_graph=True"]
    assert_same_generation(generate(tmp_path, 1, args, torchrun=True), generate(tmp_path, 1, args))


@pytest.mark.parametrize("model,nproc,layout", LAYOUTS, ids=[f"{m}-{'-'.join(o[:2])}" for m, _, o in LAYOUTS])
def test_parallel_layout_matches_one_process(model, nproc, layout, checkpoints, reference, smollm2_path, tmp_path):
    path = smollm2_path if model == "smollm2" else checkpoints[model]
    assert_same_generation(generate(tmp_path, nproc, [*model_args(model, path), *layout]), reference[model])


def test_tp_and_pp_across_two_nodes(fake_bin, checkpoints, reference, tmp_path):
    """script/ssh_multi_node.sh starts torchrun on two "nodes" (a fake ssh runs them here): node 0's two
    ranks are pipeline stage 0 as a tensor-parallel pair, node 1's are stage 1."""
    out = tmp_path / "out.json"
    command = [str(SSH), "127.0.0.1,127.0.0.1", "2", str(SCRIPT), str(out), *ENGINE,
               f"models.ckpt_dir={checkpoints['llama']}", "infer.tp_size=2", "infer.pp_size=2", *SPLIT_DECODE]
    proc = process_tree.run(command, timeout=300, env=real_env(fake_bin))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_generation(json.loads(out.read_text()), reference["llama"])


# Rank 1 starts late and loads slowly (each longer than infer.comm_timeout_s), then hangs while serving.
TIMEOUTS = """
import sys, time, torch, os
from chitu.config import compose_config
from chitu.distributed.comm import CommError, Mailbox, all_reduce_min, broadcast_in_stage
from chitu.distributed.parallel_state import init_parallel
layout, rank = sys.argv[1], int(os.environ["RANK"])
config = compose_config([f"infer.{layout}_size=2", "infer.comm_timeout_s=1", "infer.dist_init_timeout_s=60"])
time.sleep(2 * rank)
init_parallel(config, torch.device("cpu"))
time.sleep(2 * rank)
print(f"rank {rank} started: min {all_reduce_min(10 + rank)}", flush=True)
if rank == 1:
    time.sleep(4)
    sys.exit()
start = time.monotonic()
try:
    Mailbox().recv_object(1) if layout == "pp" else broadcast_in_stage("plan")
except CommError as e:
    print(f"gave up after {time.monotonic() - start:.1f} s: {e}", flush=True)
"""


@pytest.mark.parametrize("layout,message", [
    ("pp", "receiving from rank 1 failed (rank 1 may have exited or hung past infer.comm_timeout_s=1)"),
    ("tp", "sending a step plan to ranks 1 failed (one may have exited or hung past infer.comm_timeout_s=1)")],
    ids=["pp", "tp"])
def test_start_up_waits_for_dist_init_timeout_serving_for_comm_timeout(layout, message, tmp_path):
    script = tmp_path / "timeouts.py"
    script.write_text(TIMEOUTS)
    proc = process_tree.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), layout], timeout=120)
    assert "rank 0 started: min 10" in proc.stdout and "rank 1 started: min 10" in proc.stdout, proc.stderr[-3000:]
    gave_up = [line for line in proc.stdout.splitlines() if line.startswith("gave up after")]
    assert gave_up and message in gave_up[0], proc.stdout
    assert float(gave_up[0].split()[3]) < 3


def test_world_size_must_match_tp_times_pp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(compose_config(["infer.tp_size=2"]))
    with pytest.raises(ConfigError, match=r"infer.tp_size=2 x infer.pp_size=2 = 4 but 2 process\(es\)"):
        check_world_size(compose_config(["infer.tp_size=2", "infer.pp_size=2"]))


def test_ep_size_must_divide_tp_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"infer.ep_size=4 must divide infer.tp_size=2: experts are spread over"):
        check_world_size(compose_config(["infer.tp_size=2", "infer.ep_size=4"]))


def test_plain_python_with_tp_fails_before_loading(tmp_path):
    proc = process_tree.run([sys.executable, str(SCRIPT), str(tmp_path / "x.json"), "infer.tp_size=2",
                             "models.ckpt_dir=/nonexistent"], timeout=120)
    assert proc.returncode != 0
    assert "infer.tp_size=2 x infer.pp_size=1 = 2 but 1 process(es) were started" in proc.stderr


def test_heads_follow_their_kv_group():
    # SmolLM2: 9 query heads in 3 KV groups over 2 ranks
    shards = [head_shard(9, 3, 2, r) for r in range(2)]
    assert [(s.q_heads, s.kv_heads) for s in shards] == [(Span(0, 3), Span(0, 1)), (Span(3, 6), Span(1, 2))]
    # fewer KV heads than ranks: each KV head is replicated, its query heads split
    shards = [head_shard(8, 2, 4, r) for r in range(4)]
    assert [(s.q_heads, s.kv_heads) for s in shards] == [
        (Span(0, 2), Span(0, 1)), (Span(2, 2), Span(0, 1)), (Span(4, 2), Span(1, 1)), (Span(6, 2), Span(1, 1))]
    with pytest.raises(ConfigError, match="multiple of the model's 2 KV heads"):
        head_shard(4, 2, 3, 0)
    with pytest.raises(ConfigError, match="exceeds the model's 4 attention heads"):
        head_shard(4, 4, 8, 0)


def test_vocab_shards_are_padded_to_equal_sizes():
    assert [vocab_shard(321, 2, r) for r in range(2)] == [(Span(0, 161), 161), (Span(161, 160), 161)]
    assert vocab_shard(10, 4, 3) == (Span(9, 1), 3)


def test_stage_layers():
    assert [stage_layers(30, 4, r, None) for r in range(4)] == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert stage_layers(4, 2, 1, [1, 3]) == range(1, 4)
    with pytest.raises(ConfigError, match=r"pp_layer_partition=\[1, 2\] must be 2 positive layer counts"):
        stage_layers(4, 2, 0, [1, 2])
    with pytest.raises(ConfigError, match="infer.pp_size=8 exceeds the model's 4 layers"):
        stage_layers(4, 8, 0, None)


def test_expert_placement_splits_experts_then_columns():
    # 4 tensor ranks, 2 expert groups: ranks 0-1 hold experts 0-1, ranks 2-3 experts 2-4, each half the columns
    placements = [ExpertPlacement.for_rank(ParallelState(tp_size=4, ep_size=2, rank=r), 5, 24) for r in range(4)]
    assert [(p.experts, p.columns) for p in placements] == [
        (Span(0, 2), Span(0, 12)), (Span(0, 2), Span(12, 12)), (Span(2, 3), Span(0, 12)), (Span(2, 3), Span(12, 12))]
    whole = [ExpertPlacement.for_rank(ParallelState(tp_size=2, ep_size=2, rank=r), 8, 24) for r in range(2)]
    assert [(p.experts, p.columns) for p in whole] == [(Span(0, 4), Span(0, 24)), (Span(4, 4), Span(0, 24))]
