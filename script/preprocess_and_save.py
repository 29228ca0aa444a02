"""Preprocess a checkpoint for a parallel layout and save it, so that later runs skip the preprocessing.

    PREPROCESS_AND_SAVE_DIR=<dir> [CONFIG_NAME=<config>] torchrun --nproc_per_node <tp x pp> \
        script/preprocess_and_save.py models=<model> models.ckpt_dir=<checkpoint> infer.tp_size=2 [quant=w8a16 quant_on_load=True]

Each rank writes its slice as <dir>/model.rank{R}.safetensors (sharded for infer.tp_size / pp_size /
ep_size, Q/K/V and gate/up merged, quantized when quant_on_load=True); rank 0 writes config.json, the
tokenizer and chitu_layout.json. Then run with the same parallel sizes and
`models.ckpt_dir=<dir> models.tokenizer_path=<dir> skip_preprocess=True` (or, as the manual writes it for a
quantized save, `quant_ckpt_dir=<dir>`).
"""
import os
import sys

from chitu.config import ChituConfig, hydra_entry
from chitu.models.preprocess import preprocess_and_save


@hydra_entry
def main(config: ChituConfig) -> None:
    target = os.environ.get("PREPROCESS_AND_SAVE_DIR")
    if not target:
        sys.exit("set PREPROCESS_AND_SAVE_DIR=<directory> to say where the preprocessed checkpoint goes")
    preprocess_and_save(config, target)


if __name__ == "__main__":
    main()
