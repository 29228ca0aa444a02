// The routed experts of an MoE layer on the CPU in one call (a decode step's few tokens): the (token, expert)
// pairs grouped by expert, every active expert's gate/up rows for its tokens, silu(gate) * up, then every
// down row, each pair's output weighted into its token's sum. Weights stay in their stored format
// (weight_formats.h: float32, bfloat16, int8 with per-row scales, GGUF blocks); activations and sums are
// float32, or, asked to (bf16 activations), quantized to Q8_0 where they meet GGUF blocks, as in linear_kernels.cpp. One task per slice of an expert's gate/up rows, then one per slice of the hidden rows (summing
// all experts there, so no two tasks write one output).
#include "weight_formats.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <optional>

using namespace chitu_cpu;

namespace {

constexpr int64_t GATE_UP_ROWS_PER_TASK = 16;
constexpr int64_t DOWN_ROWS_PER_TASK = 32;

// One stacked projection [E, rows, k] in a format, with its per-row scales [E, rows] when int8.
struct Stack {
  const uint8_t* data;
  int64_t format, rows, k, row_bytes;
  std::optional<torch::Tensor> scale;  // float32

  Stack(const torch::Tensor& w, const std::optional<torch::Tensor>& s, int64_t f, int64_t k_) : format(f), k(k_) {
    TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "stacked expert weights must be contiguous [E, rows, ...]");
    TORCH_CHECK(fits(f, k), "experts' rows of ", k, " values cannot be cut into blocks of format ", f);
    data = static_cast<const uint8_t*>(w.data_ptr());
    rows = w.size(1);
    row_bytes = chitu_cpu::row_bytes(f, k);
    TORCH_CHECK(w.size(2) * w.element_size() == row_bytes, "expert rows of ", w.size(2) * w.element_size(),
                " bytes do not hold ", k, " values of format ", f);
    TORCH_CHECK((f == I8) == s.has_value(), "int8 experts need their scales, other formats none");
    if (s) scale = s->to(torch::kFloat32).contiguous();
  }

  const uint8_t* expert(int64_t e) const { return data + e * rows * row_bytes; }

  // y [m, n_end - n_begin] (row stride y_stride) = rows row0..row0+m-1 of x times rows n_begin..n_end-1 of expert e.
  void multiply(int64_t e, const Activations& x, int64_t row0, int64_t m, int64_t n_begin, int64_t n_end, float* y,
                int64_t y_stride) const {
    dispatch(format, [&](auto f) {
      rows_times_blocks<decltype(f)::value>(x, row0, m, expert(e), row_bytes, n_begin, n_end, y, y_stride);
    });
    if (!scale) return;
    const float* s = scale->data_ptr<float>() + e * rows;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t n = n_begin; n < n_end; ++n) y[i * y_stride + n - n_begin] *= s[n];
  }
};

// The pairs held here, grouped by local expert: pair p (of P) is token tokens[p] under weight gates[p];
// expert active[a]'s pairs are offsets[a] .. offsets[a + 1] - 1.
struct Routing {
  std::vector<int64_t> tokens, active, offsets;
  std::vector<float> gates;

  Routing(const torch::Tensor& weights, const torch::Tensor& ids, int64_t first_expert, int64_t num_local) {
    const int64_t num_tokens = ids.size(0), top_k = ids.size(1);
    const int64_t* id = ids.data_ptr<int64_t>();
    const float* w = weights.data_ptr<float>();
    std::vector<std::vector<int64_t>> pairs(num_local);
    for (int64_t i = 0; i < num_tokens * top_k; ++i) {
      const int64_t local = id[i] - first_expert;
      if (local >= 0 && local < num_local) pairs[local].push_back(i);
    }
    offsets.push_back(0);
    for (int64_t e = 0; e < num_local; ++e) {
      if (pairs[e].empty()) continue;
      active.push_back(e);
      for (int64_t i : pairs[e]) {
        tokens.push_back(i / top_k);
        gates.push_back(w[i]);
      }
      offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
  }

  int64_t count(int64_t a) const { return offsets[a + 1] - offsets[a]; }
};

}  // namespace

// x [T, H] float32; gate_up [E, 2I, ...] and down [E, H, ...] (formats and int8 scales as above); weights [T, K]
// float32 and ids [T, K] int64 of the router; experts first_expert .. first_expert + E - 1 are held here
// → sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over those, [T, H] float32. quantize_x: x and silu(gate) * up
// meet GGUF blocks as Q8_0 (weight_formats.h Activations).
torch::Tensor fused_experts(const torch::Tensor& x, const torch::Tensor& gate_up,
                            const std::optional<torch::Tensor>& gate_up_scale, int64_t gate_up_format,
                            const torch::Tensor& down, const std::optional<torch::Tensor>& down_scale,
                            int64_t down_format, const torch::Tensor& weights, const torch::Tensor& ids,
                            int64_t first_expert, bool quantize_x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [T, H]");
  TORCH_CHECK(weights.dtype() == torch::kFloat32 && ids.dtype() == torch::kLong && weights.is_contiguous() &&
              ids.is_contiguous() && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "router weights (float32) and ids (int64) must be contiguous [T, K]");
  const int64_t hidden = x.size(1), width = gate_up.size(1) / 2;
  const Stack up(gate_up, gate_up_scale, gate_up_format, hidden), dn(down, down_scale, down_format, width);
  TORCH_CHECK(down.size(0) == gate_up.size(0) && dn.rows == hidden, "down experts must be [E, H, I]");
  const Routing routing(weights, ids, first_expert, gate_up.size(0));
  const int64_t pairs = static_cast<int64_t>(routing.tokens.size()), experts = routing.active.size();
  torch::Tensor out = torch::zeros_like(x);
  if (pairs == 0) return out;

  std::vector<float> rows(pairs * hidden), h(pairs * 2 * width), act(pairs * width);
  const float* xp = x.data_ptr<float>();
  for (int64_t p = 0; p < pairs; ++p) std::memcpy(&rows[p * hidden], xp + routing.tokens[p] * hidden, hidden * 4);
  const Activations up_in(rows.data(), pairs, hidden, up.format, quantize_x);

  const int64_t up_slices = (2 * width + GATE_UP_ROWS_PER_TASK - 1) / GATE_UP_ROWS_PER_TASK;
  at::parallel_for(0, experts * up_slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / up_slices, n_begin = task % up_slices * GATE_UP_ROWS_PER_TASK;
      const int64_t n_end = std::min(n_begin + GATE_UP_ROWS_PER_TASK, 2 * width), p0 = routing.offsets[a];
      up.multiply(routing.active[a], up_in, p0, routing.count(a), n_begin, n_end, &h[p0 * 2 * width + n_begin],
                  2 * width);
    }
  });
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t i = 0; i < width; ++i) {
      const float gate = h[p * 2 * width + i];
      act[p * width + i] = gate / (1.0f + std::exp(-gate)) * h[p * 2 * width + width + i];
    }
  const Activations down_in(act.data(), pairs, width, dn.format, quantize_x);

  float* op = out.data_ptr<float>();
  const int64_t down_slices = (hidden + DOWN_ROWS_PER_TASK - 1) / DOWN_ROWS_PER_TASK;
  at::parallel_for(0, down_slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y;
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t n_begin = slice * DOWN_ROWS_PER_TASK, n_end = std::min(n_begin + DOWN_ROWS_PER_TASK, hidden);
      const int64_t span = n_end - n_begin;
      for (int64_t a = 0; a < experts; ++a) {
        const int64_t p0 = routing.offsets[a], m = routing.count(a);
        y.resize(m * span);
        dn.multiply(routing.active[a], down_in, p0, m, n_begin, n_end, y.data(), span);
        for (int64_t i = 0; i < m; ++i) {
          float* o = op + routing.tokens[p0 + i] * hidden + n_begin;
          const float gate = routing.gates[p0 + i];
          for (int64_t j = 0; j < span; ++j) o[j] += gate * y[i * span + j];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_experts", &fused_experts, "the routed experts of an MoE layer over a few tokens");
}
