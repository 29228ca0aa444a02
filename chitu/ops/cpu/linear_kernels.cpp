// A few rows of x times weights as stored on the CPU (the row kernel: weight_formats.h): GGUF blocks, or
// plain float32 / bfloat16 rows; many bfloat16 rows times GGUF blocks in decoded tiles (bf16_tiles.h); and GGUF
// blocks dequantized to float32, where a GEMM of many float32 rows is faster.
#include "bf16_tiles.h"
#include "weight_formats.h"

#include <ATen/Parallel.h>

using namespace chitu_cpu;

namespace {

template <int64_t F>
void dequantize_rows(const uint8_t* w, int64_t n_begin, int64_t n_end, int64_t k, float* out) {
  for (int64_t row = n_begin; row < n_end; ++row)
    for (int64_t sb = 0; sb < k / QK; ++sb)
      decode<F>(block_of<F>(w + row * row_bytes(F, k), sb), sb % sub_blocks(F), out + (row - n_begin) * k + sb * QK);
}

void check(const torch::Tensor& w, int64_t format, int64_t k) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight rows must be contiguous uint8 [n, bytes]");
  TORCH_CHECK(fits(format, k) && w.size(1) == row_bytes(format, k), "weight rows of ", w.size(1),
              " bytes do not hold ", k, " values of type ", format);
}

}  // namespace

// x [m, k] float32 or bfloat16, w [n, bytes] uint8 (the rows' bytes) → x w^T [m, n] in x's dtype (float32 sums);
// quantize_x: GGUF blocks meet x quantized to Q8_0 (weight_formats.h Activations). Taking and returning bfloat16
// here spares a decode step two conversions a projection, each a few microseconds of dispatch.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t format, bool quantize_x) {
  const bool bf16 = x.dtype() == torch::kBFloat16;
  TORCH_CHECK((bf16 || x.dtype() == torch::kFloat32) && x.dim() == 2, "x must be float32 or bfloat16 [m, k]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  check(w, format, k);
  const torch::Tensor xc = x.contiguous();
  std::vector<float> x_floats;
  if (bf16) {
    const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
    x_floats.assign(xb, xb + m * k);
  }
  const Activations rows(bf16 ? x_floats.data() : xc.data_ptr<float>(), m, k, format, quantize_x);
  torch::Tensor y = torch::empty({m, n}, x.options());
  std::vector<float> y_floats(bf16 ? m * n : 0);
  float* yp = bf16 ? y_floats.data() : y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  dispatch(format, [&](auto f) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      rows_times_blocks<decltype(f)::value>(rows, 0, m, wp, w.size(1), begin, end, yp + begin, n);
    });
  });
  if (bf16) std::copy(y_floats.begin(), y_floats.end(), y.data_ptr<c10::BFloat16>());
  return y;
}

// x [m, k] bfloat16, w [n, bytes] uint8 of GGUF blocks → x w^T [m, n] bfloat16 (float32 sums), through tiles
// of w decoded to bfloat16; on CPUs without AVX-512 BF16 an error (bf16_tiles() says which).
torch::Tensor linear_bf16_tiles(const torch::Tensor& x, const torch::Tensor& w, int64_t format) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2, "x must be bfloat16 [m, k]");
  TORCH_CHECK(!plain(format), "type ", format, " is not a GGUF block format");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  check(w, format, k);
  torch::Tensor y = torch::empty({m, n}, x.options());
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const torch::Tensor xc = x.contiguous();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  dispatch(format, [&](auto f) {
    if constexpr (!plain(decltype(f)::value))
      at::parallel_for(0, (n + TILE_ROWS - 1) / TILE_ROWS, 1, [&](int64_t begin, int64_t end) {
        rows_times_tiles<decltype(f)::value>(xc.data_ptr<c10::BFloat16>(), m, k, wp, w.size(1), n, begin, end,
                                             y.data_ptr<c10::BFloat16>());
      });
  });
#else
  TORCH_CHECK(false, "the bfloat16 tiles need AVX-512 BF16, which this build lacks");
#endif
  return y;
}

// w [n, bytes] uint8 of GGUF blocks → [n, k] float32
torch::Tensor dequantize(const torch::Tensor& w, int64_t format, int64_t k) {
  TORCH_CHECK(!plain(format), "type ", format, " is not a GGUF block format");
  check(w, format, k);
  const int64_t n = w.size(0);
  torch::Tensor out = torch::empty({n, k}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  dispatch(format, [&](auto f) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      dequantize_rows<decltype(f)::value>(wp, begin, end, k, op + begin * k);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x w^T for a few rows of x, w as stored");
  m.def("linear_bf16_tiles", &linear_bf16_tiles, "x w^T for many bfloat16 rows of x, w GGUF blocks");
  m.def("bf16_tiles", [] { return BF16_TILES; }, "whether linear_bf16_tiles is built");
  m.def("dequantize", &dequantize, "GGUF blocks to float32");
}
