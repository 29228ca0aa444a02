"""Per-tensor checkpoint readers (safetensors directories and GGUF files) in HF naming and layout."""
from chitu.checkpoint.reader import CheckpointError, CheckpointReader, Shard, open_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "Shard", "open_checkpoint"]
