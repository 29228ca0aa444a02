"""Per-tensor checkpoint readers (safetensors directories and GGUF files), by Chitu's tensor names, in HF layout."""
from chitu.checkpoint.reader import CheckpointError, CheckpointReader, Shard, open_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "Shard", "open_checkpoint"]
