"""Save the model every rank has loaded as a preprocessed checkpoint (checkpoint/preprocessed.py):
script/preprocess_and_save.py runs this under torchrun with the run's overrides."""
from __future__ import annotations

import logging
import os
import shutil

from chitu.checkpoint import open_checkpoint
from chitu.checkpoint.preprocessed import Layout, save_rank
from chitu.config.schema import ChituConfig, ConfigError
from chitu.distributed.comm import all_reduce_min
from chitu.distributed.parallel_state import destroy_parallel, init_parallel
from chitu.models.loader import load_configured_model
from chitu.platform import resolve_device, resolve_dtype
from chitu.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def preprocess_and_save(config: ChituConfig, target: str) -> None:
    """Load this rank's slice as `config` asks (sharded, merged, quantized with quant_on_load=True) and write it
    to `target` as model.rank{R}.safetensors; rank 0 adds the config, tokenizer and layout."""
    if config.skip_preprocess or config.quant_ckpt_dir:
        raise ConfigError("preprocess_and_save.py reads the original checkpoint: drop skip_preprocess / quant_ckpt_dir")
    if config.quant == "gguf":
        raise ConfigError("quant=gguf reads a GGUF file's blocks straight from the file: there is nothing to preprocess "
                          "(saving them is not built)")
    device = resolve_device(config)
    state = init_parallel(config, device)
    try:
        model = load_configured_model(config, device, gguf_blocks_by_default=False)  # saving blocks is not built
        os.makedirs(target, exist_ok=True)
        save_rank(model, target, state.rank)
        if state.rank == 0:
            _write_beside(config, target)
            Layout.of(config, resolve_dtype(config), config.quant if config.quant_on_load else None).write(target)
        all_reduce_min(0)  # every rank's file is written before any process exits
        logger.info("rank %d: saved %s", state.rank, target)
    finally:
        destroy_parallel()


def _write_beside(config: ChituConfig, target: str) -> None:
    """The other files of the checkpoint and tokenizer directories (config.json, the tokenizer's,
    generation_config.json, ...); a GGUF file's config and tokenizer, kept in its metadata, as HF files."""
    checkpoint, tokenizer = config.models.checkpoint_path(), config.models.tokenizer_location()
    if os.path.isfile(checkpoint):
        with open_checkpoint(checkpoint) as reader:
            reader.hf_config().save_pretrained(target)
    if os.path.isfile(tokenizer):
        Tokenizer(tokenizer).hf.save_pretrained(target)
    for source in dict.fromkeys(path for path in (checkpoint, tokenizer) if os.path.isdir(path)):
        for entry in os.scandir(source):
            kept = entry.is_file() and not entry.name.endswith(WEIGHT_FILES)
            if kept and not os.path.exists(os.path.join(target, entry.name)):
                shutil.copy(entry.path, target)
