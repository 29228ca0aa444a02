"""Chitu: a high-performance LLM inference and serving engine.

`from chitu import LLM, SamplingParams` — imported lazily so that `import chitu.config` stays light.
"""
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from chitu.llm import LLM
        return LLM
    if name == "SamplingParams":
        from chitu.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'chitu' has no attribute {name!r}")
