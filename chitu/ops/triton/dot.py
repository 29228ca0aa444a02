"""tl.dot, exact in float32: by default it rounds float32 operands to tf32 (10 mantissa bits), which would
put the float32 models, the ones compared against transformers, a thousand times further off."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc):
    """a @ b (+ acc, None for none), accumulated in float32."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out
