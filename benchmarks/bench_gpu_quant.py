"""GPU speed of quantized weights (quant=gguf blocks, W8A16 int8) on the Llama-3.1-8B shape with random weights made
here, against the same model in bf16 and the machine's copy rate, all measured in this one run.

    python benchmarks/bench_gpu_quant.py [--formats Q4_K Q8_0 w8a16] [--batches 1 64]

First each layer shape's kernel alone (GB/s of the bytes it reads, at 1 and 64 rows), then the engine's decode
tokens/s (greedy and with the default sampling) at each batch. The batch-1 roofline of a format is the copy rate over
the bytes a token reads: every linear layer's stored weights (the LM head included) and the norms, not the
embedding table, of which a token reads one row.
"""
from __future__ import annotations

import argparse
import gc

import gguf
import torch

from bench_gpu import PREFILL, PROMPT, OUTPUT, SHAPES, chitu_decode, copy_bandwidth, timed
from chitu.config import compose_config
from chitu.engine.engine import LLMEngine
from chitu.layers.loadable import ProcessesWeights
from chitu.models.registry import build_model
from chitu.ops.linear import grouped_codes_linear, linear
from chitu.quant.grouped_codes import GroupedCodes
from chitu.quant.gguf_blocks import Segment

GGUF_FORMATS = ["Q4_K", "Q8_0", "Q6_K", "Q4_0"]
LAYER_SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                "down_proj": (4096, 14336), "lm_head": (128256, 4096)}


def random_codes(qtype: str, n: int, k: int) -> GroupedCodes:
    """Random GGUF rows [n, k] of `qtype` repacked on the GPU: random codes and scales, fp16 d and dmin ~ 1e-4 (weights
    of a few hundredths, so 32 random layers stay finite in bf16)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    template = GroupedCodes.from_gguf(torch.zeros(1, type_size, dtype=torch.uint8), qtype)  # the fields' shapes
    tensors = {}
    for name, t in vars(template).items():
        if isinstance(t, torch.Tensor):
            shape = (n, t.shape[1] * k // block_size)
            if t.dtype == torch.float16:
                tensors[name] = (torch.randn(shape, device="cuda") * 1e-4).half()
            else:
                info = torch.iinfo(t.dtype)
                tensors[name] = torch.randint(info.min, info.max + 1, shape, dtype=t.dtype, device="cuda")
    return GroupedCodes(**{**vars(template), **tensors})


def kernel_rows(formats: list[str], ceiling: float) -> None:
    gguf_formats = [f for f in formats if f in GGUF_FORMATS]
    columns = ["bf16"] + gguf_formats + (["int8"] if "w8a16" in formats else [])
    print(f"\n{'kernel':26}{'rows':>6}" + "".join(f"{f:>16}" for f in columns))
    for name, (n, k) in LAYER_SHAPES.items():
        weights = {"bf16": torch.randn(n, k, device="cuda", dtype=torch.bfloat16)}
        weights |= {f: random_codes(f, n, k) for f in gguf_formats}
        if "w8a16" in formats:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
            weights["int8"] = GroupedCodes.from_int8(q, torch.rand(n, device="cuda", dtype=torch.bfloat16) / 100)
        for m in (1, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cells = []
            for w in weights.values():
                if isinstance(w, torch.Tensor):
                    seconds, size = timed(lambda: linear(x, w), repeat=20, inner=50), w.numel() * 2
                else:
                    seconds, size = timed(lambda: grouped_codes_linear(x, w), repeat=20, inner=50), w.stored_bytes
                cells.append(f"{seconds * 1e6:7.1f}us {size / seconds / ceiling:5.0%}")
            print(f"{name + f' {n}x{k}':26}{m:>6}" + "".join(f"{c:>16}" for c in cells), flush=True)
        del weights
    print("(each cell: time of 50 calls back to back, divided, and the bytes read per second as a share of the copy "
          "rate; weights smaller than the GPU's L2 may be read from it after the first call)")


def quantized_model(fmt: str) -> torch.nn.Module:
    """The Llama-3.1-8B shape in bf16, as W8A16, or with every linear layer (and the LM head) in GGUF blocks."""
    config = SHAPES["Llama-3.1-8B"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(config, "hf-llama", PREFILL + 64, torch.bfloat16,
                            quantize_on_load="w8a16" if fmt == "w8a16" else None, gguf_blocks=fmt in GGUF_FORMATS)
    for name, p in model.named_parameters():
        if p.dtype == torch.int8:
            p.copy_(torch.randint(-127, 128, p.shape, dtype=torch.int8))
        elif name.endswith("weight_scale"):
            p.uniform_(1e-4, 2e-4)
        elif p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    for module in model.modules():
        if hasattr(module, "gguf_segments"):
            module.gguf_segments = [Segment(random_codes(fmt, module.out_features, module.in_features), fmt)]
        elif isinstance(module, ProcessesWeights):
            module.after_loading()
    return model


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode token reads: every stored weight but the embedding table."""
    embedding = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    segments = [s for m in model.modules() for s in getattr(m, "gguf_segments", [])]
    return total + sum(s.data.stored_bytes for s in segments)


def engine_rows(formats: list[str], batches: list[int], ceiling: float) -> None:
    rows = {}
    for fmt in ["bf16"] + formats:
        model = quantized_model(fmt)
        blocks = max(batches) * (PROMPT + OUTPUT) // 64 + 64
        config = compose_config(["device=cuda", f"infer.max_reqs={max(batches)}", f"infer.max_seq_len={PREFILL + 64}",
                                 f"infer.num_blocks={blocks}", "infer.use_cuda_graph=True"])
        engine = LLMEngine(config, model=model)
        chitu_decode(engine, 2)
        row = rows[fmt] = {"GB": bytes_per_token(model) / 1e9}
        for batch in batches:
            row[f"b{batch}"] = chitu_decode(engine, batch)[0]
            row[f"b{batch}_sampled"] = chitu_decode(engine, batch, sampled=True)[0]
        print(fmt, {k: round(v, 2) for k, v in row.items()}, flush=True)
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{'weights':10}{'GB/token':>10}" + "".join(f"{f'b{b} greedy':>12}{f'b{b} sampled':>13}" for b in batches)
          + f"{'b1 roofline':>13}{'b1 / roofline':>15}{'b1 / bf16':>11}")
    for fmt, row in rows.items():
        roofline = ceiling / (row["GB"] * 1e9)
        print(f"{fmt:10}{row['GB']:>10.2f}" + "".join(f"{row[f'b{b}']:>12.1f}{row[f'b{b}_sampled']:>13.1f}"
                                                     for b in batches)
              + f"{roofline:>13.1f}{row['b1'] / roofline:>15.1%}{row['b1'] / rows['bf16']['b1']:>10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="*", default=["Q4_K", "Q8_0", "w8a16"],
                        help=f"of {GGUF_FORMATS + ['w8a16']}")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 64])
    parser.add_argument("--skip-kernels", action="store_true")
    args = parser.parse_args()
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {ceiling / 1e12:.2f} TB/s", flush=True)
    if not args.skip_kernels:
        kernel_rows(args.formats, ceiling)
    engine_rows(args.formats, args.batches, ceiling)


if __name__ == "__main__":
    main()
