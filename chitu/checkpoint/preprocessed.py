"""A preprocessed checkpoint (script/preprocess_and_save.py): every rank's loaded model slice as
`model.rank{R}.safetensors` — cut for its TP/PP/EP place, Q/K/V and gate/up merged, quantized when the
run quantized it, MLA folded when it folded — beside the HF config, the tokenizer and `chitu_layout.json`,
the settings those slices were made under. A run with `skip_preprocess=True` (or `quant_ckpt_dir=`) builds
the same model and reads only its own rank's file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from chitu.checkpoint.reader import CheckpointError

if TYPE_CHECKING:
    from chitu.config.schema import ChituConfig

LAYOUT_FILE = "chitu_layout.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """What decides the contents of each rank's file; a run must match it to read them."""

    model_type: str
    tp_size: int
    pp_size: int
    ep_size: int
    pp_layer_partition: list[int] | None
    dtype: str
    quant: str | None  # the method the weights were quantized with as they loaded (quant_on_load)
    mla_absorb: str
    raise_lower_bit_float_to: str

    @classmethod
    def of(cls, config: ChituConfig, dtype: torch.dtype, quant: str | None) -> Layout:
        infer = config.infer
        return cls(config.models.type, infer.tp_size, infer.pp_size, infer.ep_size, infer.pp_layer_partition,
                   str(dtype).removeprefix("torch."), quant, infer.mla_absorb, infer.raise_lower_bit_float_to)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, LAYOUT_FILE), "w") as f:
            json.dump({"format": FORMAT_VERSION, **asdict(self)}, f, indent=2)

    @classmethod
    def read(cls, directory: str) -> Layout:
        path = os.path.join(directory, LAYOUT_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory} is not a preprocessed checkpoint (no {LAYOUT_FILE}): make one with "
                                  f"script/preprocess_and_save.py, or load it without skip_preprocess / quant_ckpt_dir")
        with open(path) as f:
            saved = json.load(f)
        if saved.pop("format", None) != FORMAT_VERSION:
            raise CheckpointError(f"{path} is of another format version than this Chitu's ({FORMAT_VERSION}): "
                                  f"preprocess the checkpoint again")
        return cls(**{f.name: saved.get(f.name) for f in fields(cls)})

    def check_run(self, run: Layout, directory: str) -> None:
        """Refuse a run whose settings would build another model than the one the files hold."""
        keys = {"model_type": "models.type", "tp_size": "infer.tp_size", "pp_size": "infer.pp_size",
                "ep_size": "infer.ep_size", "pp_layer_partition": "infer.pp_layer_partition", "dtype": "dtype",
                "mla_absorb": "infer.mla_absorb", "raise_lower_bit_float_to": "infer.raise_lower_bit_float_to"}
        if run.quant is not None:
            keys["quant"] = "quant"
        wrong = [(key, getattr(self, field), getattr(run, field)) for field, key in keys.items()
                 if getattr(self, field) != getattr(run, field)]
        if wrong:
            listed = "; ".join(f"{key}={saved} when saved, {now} now" for key, saved, now in wrong)
            raise CheckpointError(f"the preprocessed checkpoint {directory} was made for another layout ({listed}): "
                                  f"run with the saved settings, or preprocess the original checkpoint again")


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"model.rank{rank}.safetensors")


def save_rank(model: nn.Module, directory: str, rank: int) -> None:
    """This rank's parameters, as loaded (tied ones once)."""
    save_model(model, rank_file(directory, rank))


def load_rank(model: nn.Module, directory: str, rank: int, device: torch.device) -> None:
    """Fill a model built like the saved one (in its loaded form) from this rank's file; every tensor
    must be there with its shape."""
    path = rank_file(directory, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the preprocessed checkpoint holds no file for rank {rank}")
    try:
        load_model(model, path, strict=True, device=str(device))
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model this run builds: {e}") from None
