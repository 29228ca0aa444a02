"""Request lifecycle: scheduling, KV block accounting, sampling parameters, detokenization."""
