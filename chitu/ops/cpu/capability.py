"""What this CPU computes natively, which decides where the C++ kernels beat torch's: without bfloat16
instructions (AVX-512 BF16 or AMX) torch multiplies bfloat16 at a third of the kernels' speed at every
size measured (1 to 128 rows; benchmarks/bench_cpu_kernels.py), with them it wins past a few rows."""
import torch

NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
