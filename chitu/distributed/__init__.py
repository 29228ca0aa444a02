"""Process groups for tensor and pipeline parallelism, and the messages ranks exchange."""
