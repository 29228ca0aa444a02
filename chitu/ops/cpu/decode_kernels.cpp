// The small per-token operations of a CPU decode step, each one call instead of the several torch ops of
// its reference (chitu/ops/torch_ref): at batch 1 the dispatch of those ops costs more than their work.
// They compute in float32 and round where the references round, so a float32 model matches them to
// summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T rounded(float v) { return static_cast<T>(v); }

// (weight * rms-normalised(x)) per row, x rounded to its dtype before the product, as the reference does.
template <typename T>
void normalise_row(const T* x, const T* weight, T* out, int64_t width, float eps) {
  float sum_squares = 0.f;
  for (int64_t i = 0; i < width; ++i) sum_squares += to_float(x[i]) * to_float(x[i]);
  const float inverse = 1.f / std::sqrt(sum_squares / width + eps);
  for (int64_t i = 0; i < width; ++i)
    out[i] = rounded<T>(to_float(weight[i]) * to_float(rounded<T>(to_float(x[i]) * inverse)));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.scalar_type() == x.scalar_type());
  const int64_t width = x.size(-1), rows = x.numel() / width;
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) normalise_row(xp + r * width, wp, op + r * width, width, eps);
    });
  });
  return out;
}

// (rms_norm(x + residual), x + residual), the sum rounded to the dtype first.
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                        const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && residual.sizes() == x.sizes() &&
              residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type());
  const int64_t width = x.size(-1), rows = x.numel() / width;
  auto summed = torch::empty_like(x), out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *rp = residual.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t *sp = summed.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < width; ++i)
          sp[r * width + i] = rounded<scalar_t>(to_float(xp[r * width + i]) + to_float(rp[r * width + i]));
        normalise_row(sp + r * width, wp, op + r * width, width, eps);
      }
    });
  });
  return {out, summed};
}

// Cache rows the vector paths read: float32 and bfloat16 (half takes the scalar loops).
template <typename C>
constexpr bool VECTOR_ROWS = std::is_same_v<C, float> || std::is_same_v<C, c10::BFloat16>;

#ifdef __AVX2__
inline chitu_cpu::Vec vec_at(const float* p) { return chitu_cpu::load(p); }
inline chitu_cpu::Vec vec_at(const c10::BFloat16* p) { return chitu_cpu::from_bf16(reinterpret_cast<const uint8_t*>(p)); }
#endif

// q · k over n values: four independent accumulators, so positions are not one chain of dependent FMAs.
template <typename C>
inline float dot_row(const float* q, const C* k, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX2__
  if constexpr (VECTOR_ROWS<C>) {
    using namespace chitu_cpu;
    Vec a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
      a0 = fmadd(load(q + i), vec_at(k + i), a0);
      a1 = fmadd(load(q + i + LANES), vec_at(k + i + LANES), a1);
      a2 = fmadd(load(q + i + 2 * LANES), vec_at(k + i + 2 * LANES), a2);
      a3 = fmadd(load(q + i + 3 * LANES), vec_at(k + i + 3 * LANES), a3);
    }
    for (; i + LANES <= n; i += LANES) a0 = fmadd(load(q + i), vec_at(k + i), a0);
    sum = horizontal_sum(add(add(a0, a1), add(a2, a3)));
  }
#endif
  for (; i < n; ++i) sum += q[i] * to_float(k[i]);
  return sum;
}

// f(position, its row of the KV head) along a paged context, page by page (no division per position).
template <typename C, typename F>
inline void for_each_row(const C* cache, const int64_t* table, int64_t context, int64_t block_size,
                         const int64_t* strides, int64_t kv_head, F f) {
  for (int64_t start = 0, page = 0; start < context; start += block_size, ++page) {
    const C* rows = cache + table[page] * strides[0] + kv_head * strides[2];
    const int64_t n = std::min(block_size, context - start);
    for (int64_t i = 0; i < n; ++i) f(start + i, rows + i * strides[1]);
  }
}

// acc[d] = sum over the context of p[pos] * v_pos[d]: the vector path holds 4 vectors of acc in registers along
// the whole context (a sum kept in memory would be stored and reloaded at every position).
template <typename C>
void weighted_rows(const C* v_cache, const int64_t* table, int64_t context, int64_t block_size, const int64_t* strides,
                   int64_t kv_head, const float* p, int64_t width, float* acc) {
  int64_t d0 = 0;
#ifdef __AVX2__
  if constexpr (VECTOR_ROWS<C>) {
    using namespace chitu_cpu;
    for (; d0 + 4 * LANES <= width; d0 += 4 * LANES) {
      Vec a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
      for_each_row(v_cache, table, context, block_size, strides, kv_head, [&](int64_t pos, const C* v) {
        const Vec w = broadcast(p[pos]);
        a0 = fmadd(w, vec_at(v + d0), a0);
        a1 = fmadd(w, vec_at(v + d0 + LANES), a1);
        a2 = fmadd(w, vec_at(v + d0 + 2 * LANES), a2);
        a3 = fmadd(w, vec_at(v + d0 + 3 * LANES), a3);
      });
      store(acc + d0, a0);
      store(acc + d0 + LANES, a1);
      store(acc + d0 + 2 * LANES, a2);
      store(acc + d0 + 3 * LANES, a3);
    }
  }
#endif
  if (d0 == width) return;
  for_each_row(v_cache, table, context, block_size, strides, kv_head, [&](int64_t pos, const C* v) {
    for (int64_t d = d0; d < width; ++d) acc[d] += p[pos] * to_float(v[d]);
  });
}

// Decode attention over a paged cache: q [B, heads, D] (one query per sequence), caches [blocks, block_size,
// kv_heads, D or Dv], block_tables [B, width], context_lens [B] → [B, heads, Dv]. Each task scores the context
// of `group` heads sharing one KV head, then sums the values under the softmax.
template <typename T, typename C>
void attend_one(const T* q, const C* k_cache, const C* v_cache, const int64_t* table, int64_t context,
                int64_t kv_head, int64_t group, int64_t head_dim, int64_t head_dim_v, int64_t block_size,
                const int64_t* k_strides, const int64_t* v_strides, int64_t q_head_stride, float scale, T* out,
                int64_t out_head_stride) {
  std::vector<float> queries(group * head_dim), scores(group * context), acc(group * head_dim_v, 0.f);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) queries[g * head_dim + d] = to_float(q[g * q_head_stride + d]) * scale;
  for_each_row(k_cache, table, context, block_size, k_strides, kv_head, [&](int64_t pos, const C* k) {
    for (int64_t g = 0; g < group; ++g) scores[g * context + pos] = dot_row(queries.data() + g * head_dim, k, head_dim);
  });
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores.data() + g * context;
    const float top = *std::max_element(row, row + context);
    float total = 0.f;
    for (int64_t pos = 0; pos < context; ++pos) total += (row[pos] = std::exp(row[pos] - top));
    for (int64_t pos = 0; pos < context; ++pos) row[pos] /= total;
  }
  for (int64_t g = 0; g < group; ++g)
    weighted_rows(v_cache, table, context, block_size, v_strides, kv_head, scores.data() + g * context, head_dim_v,
                  acc.data() + g * head_dim_v);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim_v; ++d) out[g * out_head_stride + d] = rounded<T>(acc[g * head_dim_v + d]);
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && q.stride(-1) == 1 &&
              k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1 && k_cache.scalar_type() == v_cache.scalar_type());
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              block_tables.is_contiguous() && context_lens.is_contiguous());
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2), head_dim_v = v_cache.size(3), group = heads / kv_heads;
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(3) == head_dim);
  auto out = torch::empty({batch, heads, head_dim_v}, q.options());
  const int64_t k_strides[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t v_strides[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  const int64_t width = block_tables.size(1), block_size = k_cache.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "decode_attention_cache", [&] {
      using C = scalar_t;
      // One task per head where a task per KV head would leave threads idle (batch 1: 3 KV heads on 2 threads
      // run as 2 + 1); the heads of a KV head then each read it, from the cache.
      const int64_t per_task = batch * kv_heads >= 4 * at::get_num_threads() ? group : 1;
      at::parallel_for(0, batch * heads / per_task, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / (heads / per_task), head = task % (heads / per_task) * per_task;
          attend_one<T, C>(q.data_ptr<T>() + b * q.stride(0) + head * q.stride(1), k_cache.data_ptr<C>(),
                           v_cache.data_ptr<C>(), tables + b * width, lens[b], head / group, per_task, head_dim,
                           head_dim_v, block_size, k_strides, v_strides, q.stride(1), scale,
                           out.data_ptr<T>() + b * out.stride(0) + head * out.stride(1), out.stride(1));
        }
      });
    });
  });
  return out;
}

// Rotary embedding of x [T, heads, head_dim] (last dim contiguous) by cos/sin [T, rotary_dim / 2]: neox halves or
// interleaved pairs; every product and sum rounded to x's dtype, as the reference computes in it.
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.dim() == 3 && x.stride(-1) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
              cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat);
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = cos.size(-1);
  TORCH_CHECK(2 * half <= head_dim && cos.size(0) == tokens);
  auto out = torch::empty({tokens, heads, head_dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_rotary", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const int64_t first = interleaved ? 1 : half, step = interleaved ? 2 : 1;
    at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row / heads;
        const T* in = xp + t * x.stride(0) + (row % heads) * x.stride(1);
        T* o = op + row * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float c = to_float(rounded<T>(cp[t * half + i])), s = to_float(rounded<T>(sp[t * half + i]));
          const float a = to_float(in[i * step]), b = to_float(in[i * step + first]);
          o[i * step] = rounded<T>(to_float(rounded<T>(a * c)) - to_float(rounded<T>(b * s)));
          o[i * step + first] = rounded<T>(to_float(rounded<T>(b * c)) + to_float(rounded<T>(a * s)));
        }
        for (int64_t d = 2 * half; d < head_dim; ++d) o[d] = in[d];
      }
    });
  });
  return out;
}

// silu(x[..., :n]) * x[..., n:] for rows of width 2n, silu rounded to the dtype before the product; the exponentials
// in ATen's vectors, as torch's silu takes them.
torch::Tensor silu_and_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0);
  const int64_t width = x.size(-1) / 2, rows = x.numel() / x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    using T = scalar_t;
    using V = at::vec::Vectorized<float>;
    constexpr int64_t CHUNK = 256;
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / width), [&](int64_t begin, int64_t end) {
      float gate[CHUNK];
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c0 = 0; c0 < width; c0 += CHUNK) {
          const int64_t n = std::min(CHUNK, width - c0);
          const T *g = xp + r * 2 * width + c0, *up = g + width;
          for (int64_t j = 0; j < n; ++j) gate[j] = to_float(g[j]);
          at::vec::map([](V v) { return v / (V(1.f) + v.neg().exp()); }, gate, gate, n);
          for (int64_t j = 0; j < n; ++j) op[r * width + c0 + j] = rounded<T>(to_float(rounded<T>(gate[j])) * to_float(up[j]));
        }
    });
  });
  return out;
}

// k [T, kv_heads, D] and v [T, kv_heads, Dv] (last dims contiguous, any other strides) into the rows `slots` of
// caches [blocks, block_size, kv_heads, D or Dv] (contiguous), converted to the caches' dtype.
template <typename T, typename C>
void store_rows(const torch::Tensor& x, torch::Tensor& cache, const int64_t* slots) {
  const int64_t tokens = x.size(0), heads = x.size(1), width = x.size(2);
  const T* xp = x.data_ptr<T>();
  C* cp = cache.data_ptr<C>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const T* row = xp + t * x.stride(0) + h * x.stride(1);
      C* slot = cp + (slots[t] * heads + h) * width;
      if constexpr (std::is_same_v<T, C>) std::copy(row, row + width, slot);
      else for (int64_t d = 0; d < width; ++d) slot[d] = static_cast<C>(to_float(row[d]));
    }
}

void store_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(-1) == 1 && v.stride(-1) == 1 && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
              k.scalar_type() == v.scalar_type() && slot_mapping.scalar_type() == at::kLong &&
              slot_mapping.is_contiguous() && slot_mapping.numel() == k.size(0) && v.size(0) == k.size(0));
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2) && v_cache.size(2) == v.size(1) &&
              v_cache.size(3) == v.size(2), "k/v do not match the caches' heads and widths");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < k.size(0); ++t) TORCH_CHECK(0 <= slots[t] && slots[t] < capacity, "slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "store_kv", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "store_kv_cache", [&] {
      store_rows<T, scalar_t>(k, k_cache, slots);
      store_rows<T, scalar_t>(v, v_cache, slots);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("decode_attention", &decode_attention);
  m.def("apply_rotary", &apply_rotary);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("store_kv", &store_kv);
}
