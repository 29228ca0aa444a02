"""Model execution: input preparation, forward pass over the paged KV cache, sampling."""
