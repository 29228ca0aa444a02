"""CPU+GPU hybrid MoE (cpu_layer_num) on a Qwen3-30B-A3B-shaped GGUF with random Q4_K experts, written here (no
weights are downloaded), all measured in this one run:

    python benchmarks/bench_hybrid.py [--layers 48] [--batches 1 8] [--new-tokens 32]
    python benchmarks/bench_hybrid.py --tiny --device cpu      # a smoke test of the script on a small shape

Decode tokens/s at each batch with cpu_layer_num = 0 (everything on the GPU), half and all MoE layers, each eagerly and
under CUDA graphs (the host experts as host-function nodes), and the model entirely on the CPU beside; the CPU experts' achieved bandwidth at batch 1 (the Q4_K bytes of the experts a token
routes to, per second of the host-expert calls) against the host's copy bandwidth measured here (read + written); and DeepSeek-R1-Q4_K_M
extrapolated from that bandwidth (58 MoE layers on the CPU, 8 routed experts of 2048 x 7168 a token).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import gguf
import numpy as np
import torch

from chitu.config import compose_config
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.layers.moe import host_experts, sparse_moe

Q4_K = gguf.GGMLQuantizationType.Q4_K
FULL = dict(hidden=2048, moe_intermediate=768, layers=48, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8,
            vocab=151936)
TINY = dict(hidden=256, moe_intermediate=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=16, top_k=4, vocab=2048)


def random_q4_k(rows: int, cols: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, rows, cols / 256 * 144] bytes of Q4_K blocks: random codes and sub-block scales, small finite d / dmin."""
    blocks = rng.integers(0, 256, size=(count, rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)  # d
    blocks[..., 2:4] = np.frombuffer(np.float16(1e-4).tobytes(), dtype=np.uint8)  # dmin
    return blocks.reshape(count, rows, -1) if count > 1 else blocks.reshape(rows, -1)


def write_model(path: str, s: dict) -> int:
    """A qwen3moe GGUF of shape `s`: attention and norms in F16/F32, every expert in Q4_K. Returns the bytes of the
    routed experts one token reads in one layer (top_k experts' gate, up and down)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "qwen3moe")
    for add, value in ((writer.add_block_count, s["layers"]), (writer.add_context_length, 4096),
                       (writer.add_embedding_length, s["hidden"]), (writer.add_feed_forward_length, 6144),
                       (writer.add_head_count, s["heads"]), (writer.add_head_count_kv, s["kv_heads"]),
                       (writer.add_rope_freq_base, 1e6), (writer.add_layer_norm_rms_eps, 1e-6),
                       (writer.add_expert_count, s["experts"]), (writer.add_expert_used_count, s["top_k"]),
                       (writer.add_key_length, s["head_dim"]), (writer.add_value_length, s["head_dim"]),
                       (writer.add_expert_feed_forward_length, s["moe_intermediate"]), (writer.add_vocab_size, s["vocab"])):
        add(value)
    hidden, inter, heads, kv, head_dim = s["hidden"], s["moe_intermediate"], s["heads"], s["kv_heads"], s["head_dim"]

    def dense(*shape: int) -> np.ndarray:  # GGUF dims are HF's reversed: numpy holds the HF shape
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    writer.add_tensor("token_embd.weight", dense(s["vocab"], hidden))
    writer.add_tensor("output.weight", dense(s["vocab"], hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(s["layers"]):
        for name, shape in (("attn_q", (heads * head_dim, hidden)), ("attn_k", (kv * head_dim, hidden)),
                            ("attn_v", (kv * head_dim, hidden)), ("attn_output", (hidden, heads * head_dim)),
                            ("ffn_gate_inp", (s["experts"], hidden))):
            writer.add_tensor(f"blk.{i}.{name}.weight", dense(*shape).astype(np.float32 if name == "ffn_gate_inp"
                                                                              else np.float16))
        for name, size in (("attn_norm", hidden), ("ffn_norm", hidden), ("attn_q_norm", head_dim),
                           ("attn_k_norm", head_dim)):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(size, dtype=np.float32))
        for name, (rows, cols) in (("ffn_gate_exps", (inter, hidden)), ("ffn_up_exps", (inter, hidden)),
                                   ("ffn_down_exps", (hidden, inter))):
            writer.add_tensor(f"blk.{i}.{name}.weight", random_q4_k(rows, cols, s["experts"], rng), raw_dtype=Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return s["top_k"] * 3 * inter * hidden // 256 * 144


def host_copy_bandwidth() -> float:
    """Bytes read + written per second by a multi-threaded copy of 1 GiB in host memory."""
    a = torch.randn(2**28)
    b = torch.empty_like(a)
    b.copy_(a)
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 5 * 2 * a.numel() * 4 / (time.perf_counter() - start)


class HostExpertTimer:
    """Seconds spent in the host-expert calls (run_on_host, up to the result back on the device) and their count."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self.run = host_experts.run_on_host

    def __call__(self, experts, x, weights, ids):
        start = time.perf_counter()
        out = self.run(experts, x, weights, ids)
        if out.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def decode_rate(engine: LLMEngine, batch: int, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_with_eos=False)
    requests = [engine.add_request(list(range(100 + i, 164 + i)), params) for i in range(batch)]
    while not all(r.output_token_ids for r in requests):
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small shape (a smoke test of the script)")
    parser.add_argument("--layers", type=int, help="MoE layers (default: the shape's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-pure-cpu", action="store_true", help="skip the model entirely on the CPU")
    args = parser.parse_args()
    shape = dict(TINY if args.tiny else FULL)
    shape["layers"] = args.layers or shape["layers"]
    path = os.path.join(tempfile.mkdtemp(prefix="chitu-hybrid-"), "model.gguf")
    start = time.perf_counter()
    expert_bytes = write_model(path, shape)
    print(f"wrote {os.path.getsize(path) / 2**30:.1f} GiB ({shape['layers']} layers) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    bandwidth = host_copy_bandwidth()
    print(f"host copy bandwidth {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)", flush=True)
    graphs = [False, True] if args.device == "cuda" else [False]
    layouts = [(args.device, n, graph) for n in sorted({0, shape["layers"] // 2, shape["layers"]}) for graph in graphs]
    if not args.no_pure_cpu and args.device != "cpu":
        layouts.append(("cpu", 0, False))
    print(f"\n{'device':8}{'cpu_layer_num':>15}{'graphs':>8}" + "".join(f"{'b' + str(b) + ' tok/s':>12}" for b in args.batches)
          + f"{'CPU experts GB/s':>18}{'of host copy':>14}")
    for device, n, graph in layouts:
        timer = HostExpertTimer()
        if not graph:  # inside a graph the host experts run as graph nodes, not through run_on_host
            sparse_moe.run_on_host = timer
        try:
            config = compose_config([f"device={device}", "models=Qwen3-30B-A3B-Q4_K_M", f"models.ckpt_dir={path}",
                                     "quant=gguf", f"cpu_layer_num={n}", "infer.max_reqs=8", "infer.max_seq_len=512",
                                     "infer.num_blocks=128", f"infer.use_cuda_graph={graph}"]
                                    + (["dtype=bfloat16"] if device == "cpu" else []))
            engine = LLMEngine(config, load_tokenizer=False)
            decode_rate(engine, 1, 4)  # warm-up
            rates, achieved = [], 0.0
            for batch in args.batches:
                timer.seconds = timer.calls = 0
                rates.append(decode_rate(engine, batch, args.new_tokens))
                if batch == 1 and timer.calls:  # one token a call: its top_k experts' bytes, read once
                    achieved = expert_bytes * timer.calls / timer.seconds
        finally:
            sparse_moe.run_on_host = host_experts.run_on_host
        cells = "".join(f"{r:>12.2f}" for r in rates)
        measured = f"{achieved / 1e9:>18.1f}{achieved / bandwidth:>14.1%}" if timer.calls else ""
        print(f"{device:8}{n:>15}{str(graph):>8}{cells}{measured}", flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    r1_bytes = 58 * 8 * 3 * 2048 * 7168 // 256 * 144
    print(f"\nDeepSeek-R1-Q4_K_M, 58 MoE layers on the CPU: {r1_bytes / 1e9:.1f} GB of routed experts a token; "
          f"at this run's host-copy bandwidth ({bandwidth / 1e9:.0f} GB/s) the CPU part alone allows at most "
          f"{bandwidth / r1_bytes:.1f} tok/s at batch 1 (Chitu reports 10.6 on an H20 + Xeon 8480P, KTransformers "
          f"8.7-13.7 on one socket)")


if __name__ == "__main__":
    main()
