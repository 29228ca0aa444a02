"""Hot operations. Each is one function that picks a backend: the plain-torch reference
(ops/torch_ref, CPU and tests) or a Triton kernel (ops/triton, GPU)."""
