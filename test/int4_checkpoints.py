"""Tiny AWQ and GPTQ checkpoints for the tests: a transformers model's linear layers quantized to 4-bit
groups and packed as AutoAWQ (GEMM) and the GPTQ packers store them, and, written independently of
Chitu's reader from the format descriptions, their dequantization."""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# the column (of 8) that value j (bits 4j..4j+3) of an AWQ word holds
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass(frozen=True)
class Scheme:
    method: str                     # "awq" or "gptq"
    group_size: int = 32
    sym: bool = False               # GPTQ: every zero 8
    act_order: bool = False         # GPTQ desc_act: groups over a permutation of the input rows
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" stores zero - 1, "gptq_v2" the zero

    def quantization_config(self) -> dict:
        if self.method == "awq":
            return dict(quant_method="awq", bits=4, group_size=self.group_size, zero_point=True, version="gemm",
                        modules_to_not_convert=None)
        return dict(quant_method="gptq", bits=4, group_size=self.group_size, desc_act=self.act_order, sym=self.sym,
                    checkpoint_format=self.checkpoint_format, true_sequential=True, static_groups=False)

    @property
    def zero_offset(self) -> int:
        return 1 if self.method == "gptq" and self.checkpoint_format == "gptq" else 0


def quantize(weight: torch.Tensor, scheme: Scheme, gen: torch.Generator):
    """weight [out, in] → (q [in, out], zeros [groups, out], fp16 scales [groups, out], g_idx [in]) with
    weight ≈ (q - zeros[g_idx]) * scales[g_idx], as GPTQ's min/max grid makes them (no error feedback).
    Act-order takes the input rows in a random order drawn from `gen`."""
    w = weight.T.double()
    rows = w.shape[0]
    group = rows if scheme.group_size == -1 else scheme.group_size
    assert rows % group == 0, f"groups of {group} do not divide {rows} rows"
    order = torch.randperm(rows, generator=gen) if scheme.act_order else torch.arange(rows)
    g_idx = torch.empty(rows, dtype=torch.int64)
    g_idx[order] = torch.arange(rows) // group
    groups = rows // group
    q = torch.empty_like(w, dtype=torch.int64)
    zeros = torch.empty(groups, w.shape[1], dtype=torch.int64)
    scales = torch.empty(groups, w.shape[1], dtype=torch.float16)
    for g in range(groups):
        part = w[g_idx == g]
        low, high = part.min(0).values.clamp(max=0), part.max(0).values.clamp(min=0)
        if scheme.sym:
            scale, zero = (torch.maximum(-low, high) * 2 / 15), torch.full_like(low, 8)
        else:
            scale = (high - low) / 15
            zero = (-low / scale).round().clamp(scheme.zero_offset, 15)
        scales[g] = scale.clamp(min=1e-4).half()
        zeros[g] = zero.long()
        q[g_idx == g] = (part / scales[g].double() + zeros[g]).round().clamp(0, 15).long()
    return q, zeros, scales, g_idx


def _pack(values: torch.Tensor, axis: int, order: list[int]) -> torch.Tensor:
    """Eight 4-bit values along `axis` per int32: value j of a word is element order[j] of its 8."""
    v = values.numpy().astype(np.uint32)
    v = np.moveaxis(v, axis, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for j, element in enumerate(order):
        words |= v[..., element] << np.uint32(4 * j)
    return torch.from_numpy(np.moveaxis(words, -1, axis).view(np.int32).copy())


def pack(q, zeros, scales, g_idx, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear module, as the packers store them."""
    if scheme.method == "awq":
        return {"qweight": _pack(q, 1, AWQ_PACK_ORDER), "qzeros": _pack(zeros, 1, AWQ_PACK_ORDER), "scales": scales}
    return {"qweight": _pack(q, 0, list(range(8))), "qzeros": _pack(zeros - scheme.zero_offset, 1, list(range(8))),
            "scales": scales, "g_idx": g_idx.to(torch.int32)}


def _unpack(words: torch.Tensor, axis: int, order: list[int]) -> torch.Tensor:
    w = np.moveaxis(words.numpy().view(np.uint32), axis, -1)
    values = np.zeros((*w.shape, 8), dtype=np.int64)
    for j, element in enumerate(order):
        values[..., element] = (w >> np.uint32(4 * j)) & 0xF
    return torch.from_numpy(np.moveaxis(values.reshape(*w.shape[:-1], -1), -1, axis))


def dequantize(tensors: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """The float32 [out, in] weight one module's packed tensors describe."""
    if scheme.method == "awq":
        q = _unpack(tensors["qweight"], 1, AWQ_PACK_ORDER)
        zeros = _unpack(tensors["qzeros"], 1, AWQ_PACK_ORDER)
        group = q.shape[0] // zeros.shape[0]
        g_idx = torch.arange(q.shape[0]) // group
    else:
        q = _unpack(tensors["qweight"], 0, list(range(8)))
        zeros = _unpack(tensors["qzeros"], 1, list(range(8))) + scheme.zero_offset
        if scheme.sym:
            zeros = torch.full_like(zeros, 8)
        g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].double()
    return ((q - zeros[g_idx]) * scales[g_idx]).T.float().contiguous()


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """The decoder layers' projections and experts, as AWQ and GPTQ quantize them: not the embedding, the
    LM head, the norms or the MoE routers."""
    return (name.startswith("model.layers.") and name.endswith("_proj.weight") and tensor.dim() == 2)


def act_order_seed(module: str) -> int:
    """One act-order permutation for the projections of one input (GPTQ orders rows by the Hessian of
    their common input): Q/K/V alike, and gate/up."""
    shared = re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", module))
    return zlib.crc32(shared.encode())


def write(hf_model, path: Path, scheme: Scheme) -> tuple[Path, Path]:
    """(the quantized checkpoint, the same model with the dequantized weights, unquantized) under `path`."""
    dense_dir, quant_dir = path / "dequantized", path / scheme.method
    hf_model.save_pretrained(dense_dir, safe_serialization=True)
    hf_model.save_pretrained(quant_dir, safe_serialization=True)
    (file,) = dense_dir.glob("*.safetensors")
    tensors = load_file(file)
    dense, quantized = {}, {}
    for name, tensor in tensors.items():
        if not is_quantized(name, tensor):
            dense[name] = quantized[name] = tensor
            continue
        module = name.removesuffix(".weight")
        gen = torch.Generator().manual_seed(act_order_seed(module))
        packed = pack(*quantize(tensor, scheme, gen), scheme)
        quantized.update({f"{module}.{key}": value for key, value in packed.items()})
        dense[name] = dequantize(packed, scheme)
    save_file(dense, file, metadata={"format": "pt"})
    save_file(quantized, quant_dir / file.name, metadata={"format": "pt"})
    config = json.loads((quant_dir / "config.json").read_text())
    config["quantization_config"] = scheme.quantization_config()
    (quant_dir / "config.json").write_text(json.dumps(config, indent=2))
    return quant_dir, dense_dir
