"""The OpenAI-compatible HTTP service: `python -m chitu serve.port=21002 …`."""
