// Weight rows as the CPU kernels read them, and the product of a few rows of x with them:
// y[m, n] = sum_k x[m, k] w[n, k], each row of w a run of blocks of one format — GGUF's Q4_0, Q4_1, Q8_0 (blocks
// of 32 values), Q4_K, Q5_K and Q6_K (256: eight sub-blocks of 32 under their own scales), or plain values: float32,
// bfloat16, int8 (its per-row scale applied by the caller). Each sub-block is decoded to floats and meets x
// in float32; or, for GGUF blocks under activations no finer than bf16, its integer codes meet x quantized per
// 32 values as ggml's Q8_0 (Activations) in integer dots, llama.cpp's way. Every format is read 32 values at a
// time, each such sub-block once for up to eight rows of x; a sub-block's minimum enters once through the sum
// of x over its 32 values. Compiled for the machine it runs on (-march=native).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace chitu_cpu {

constexpr int64_t QK = 32;
constexpr int64_t ROWS_AT_ONCE = 8;

// ggml's type numbers.
enum Format : int64_t { F32 = 0, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, I8 = 24, BF16 = 30 };

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

inline float bf16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &widened, 4);
  return v;
}

constexpr bool plain(int64_t format) { return format == F32 || format == BF16 || format == I8; }

constexpr int64_t block_bytes(int64_t format) {
  switch (format) {
    case F32: return 128;
    case BF16: return 64;
    case I8: return 32;
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 210;  // Q6_K
  }
}

// Q4_K's super-block of 256 holds eight sub-blocks of 32, with 6-bit scales and minimums under its d and dmin;
// Q5_K's the same, with a fifth bit per code; Q6_K's eight, each two halves of 16 under their own int8 scale
// (folded into the codes here) and its d.
constexpr int64_t sub_blocks(int64_t format) { return format == Q4_K || format == Q5_K || format == Q6_K ? 8 : 1; }

constexpr bool has_minimum(int64_t format) { return format == Q4_1 || format == Q4_K || format == Q5_K; }

// Q4_K's and Q5_K's d, dmin and 12 bytes of scales, then (Q5_K) qh, the fifth bits: that of value j of sub-block s is
// bit s of qh[j]; then the low nibbles: sub-blocks 2i and 2i + 1 the low and high ones of their bytes 32i..32i+31.
constexpr bool k_nibbles(int64_t format) { return format == Q4_K || format == Q5_K; }
constexpr int64_t Q5K_HIGH_BITS = 16;
constexpr int64_t nibbles_offset(int64_t format) { return format == Q5_K ? 48 : 16; }

// Bytes of a row of k values (of plain values any number; of blocks whole ones).
constexpr int64_t row_bytes(int64_t format, int64_t k) {
  return plain(format) ? k * block_bytes(format) / QK : k / QK / sub_blocks(format) * block_bytes(format);
}

// Whether rows of k values can be stored in the format.
constexpr bool fits(int64_t format, int64_t k) { return plain(format) || k % (QK * sub_blocks(format)) == 0; }

// Rows of x [m, k] (float32) as the kernels multiply them by weights of one format. With `quantize` (GGUF
// blocks, activations no finer than bf16) also quantized per whole 32 values exactly as ggml's Q8_0 is
// (d = max|x| / 127, codes = x * (1 / d) rounded, d kept in float16), for integer dots as llama.cpp takes them:
// the product is then with x's Q8_0 round trip d * code. `sums`: x's (or the round trip's) sum over each 32,
// which a GGUF block's minimum multiplies.
struct Activations {
  const float* x;
  int64_t k;
  std::vector<int8_t> codes;        // [m, k / QK * QK], when quantized
  std::vector<float> scales, sums;  // [m, k / QK]

  Activations(const float* x_, int64_t m, int64_t k_, int64_t format, bool quantize) : x(x_), k(k_) {
    if (plain(format)) return;
    const int64_t subs = k / QK;
    sums.assign(m * subs, 0.0f);
    if (!quantize) {
      for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < subs * QK; ++i) sums[r * subs + i / QK] += x[r * k + i];
      return;
    }
    codes.resize(m * subs * QK);
    scales.resize(m * subs);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t sb = 0; sb < subs; ++sb) {
        const float* v = x + r * k + sb * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float d = amax / 127.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
        int8_t* q = &codes[(r * subs + sb) * QK];
        int32_t total = 0;
        for (int j = 0; j < QK; ++j) {
          q[j] = static_cast<int8_t>(std::round(v[j] * inverse));
          total += q[j];
        }
        scales[r * subs + sb] = static_cast<float>(c10::Half(d));
        sums[r * subs + sb] = scales[r * subs + sb] * static_cast<float>(total);
      }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    make_pairs(m);
#endif
  }

  // With 512-bit integer dots, two sub-blocks at a time: per row and pair p, x's scales [s(2p) x 8, s(2p+1) x 8]
  // and its sums over 32 divided by 8 (so that 8 lanes of a minimum times them sum to minimum * sum, exactly).
  std::vector<float> pair_scales, pair_sums;  // [m, subs / 2, 16]

  void make_pairs(int64_t m) {
    const int64_t subs = k / QK, pairs = subs / 2;
    pair_scales.resize(m * pairs * 16);
    pair_sums.resize(m * pairs * 16);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t p = 0; p < pairs; ++p)
        for (int j = 0; j < 16; ++j) {
          const int64_t sb = r * subs + 2 * p + j / 8;
          pair_scales[(r * pairs + p) * 16 + j] = scales[sb];
          pair_sums[(r * pairs + p) * 16 + j] = sums[sb] * 0.125f;
        }
  }

  const float* pair_scale(int64_t r, int64_t sb) const { return &pair_scales[(r * (k / QK / 2) + sb / 2) * 16]; }
  const float* pair_sum(int64_t r, int64_t sb) const { return &pair_sums[(r * (k / QK / 2) + sb / 2) * 16]; }

  bool quantized() const { return !codes.empty(); }
  const float* row(int64_t r) const { return x + r * k; }
  const int8_t* row_codes(int64_t r) const { return codes.data() + r * (k / QK) * QK; }
};

// Value i of a row of plain values (int8 without its row scale).
template <int64_t F>
inline float plain_value(const uint8_t* row, int64_t i) {
  if constexpr (F == F32) return reinterpret_cast<const float*>(row)[i];
  else if constexpr (F == BF16) return bf16_at(row + 2 * i);
  else return reinterpret_cast<const int8_t*>(row)[i];
}

// The values of a row of plain values past its last whole sub-block of 32, times x's.
template <int64_t F>
inline float tail_dot(const uint8_t* row, const float* x, int64_t k) {
  float total = 0.0f;
  if constexpr (plain(F))
    for (int64_t i = k / QK * QK; i < k; ++i) total += plain_value<F>(row, i) * x[i];
  return total;
}

// Q6_K: sub-block s is group g = s % 4 of half n = s / 4; its codes (4 low bits from ql, 2 high from qh,
// minus 32) and the two int8 scales of its halves.
struct Q6KPlace {
  const uint8_t *low, *high;
  int nibble_shift, high_shift;
  const int8_t* scales;
};

inline Q6KPlace q6k_place(const uint8_t* block, int64_t s) {
  const int64_t n = s / 4, g = s % 4;
  return {block + 64 * n + 32 * (g % 2), block + 128 + 32 * n, static_cast<int>(4 * (g / 2)), static_cast<int>(2 * g),
          reinterpret_cast<const int8_t*>(block + 192 + 8 * n + 2 * g)};
}

inline void k_scale_min(const uint8_t* scales, int64_t s, float* scale, float* min) {
  if (s < 4) {
    *scale = scales[s] & 63;
    *min = scales[s + 4] & 63;
  } else {
    *scale = (scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4);
    *min = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
  }
}

// The stored block holding sub-block sb of a row.
template <int64_t F>
inline const uint8_t* block_of(const uint8_t* row, int64_t sb) {
  return row + sb / sub_blocks(F) * block_bytes(F);
}

// The scale and minimum of sub-block s of a stored block (of a GGUF format).
template <int64_t F>
inline void scale_and_min(const uint8_t* block, int64_t s, float* scale, float* min) {
  const float d = half_at(block + (F == Q6_K ? 208 : 0));
  if constexpr (k_nibbles(F)) {
    float sc, m;
    k_scale_min(block + 4, s, &sc, &m);
    *scale = d * sc;
    *min = -half_at(block + 2) * m;
  } else {
    *scale = d;
    *min = F == Q4_1 ? half_at(block + 2) : 0.0f;
  }
}

inline int32_t q6k_code(const Q6KPlace& p, int j) {
  return (((p.low[j] >> p.nibble_shift) & 15) | (((p.high[j] >> p.high_shift) & 3) << 4)) - 32;
}

// The 32 integer codes of sub-block s of a GGUF block, in value order.
template <int64_t F>
inline void codes(const uint8_t* block, int64_t s, int32_t* out) {
  if constexpr (F == Q8_0) {
    for (int j = 0; j < 32; ++j) out[j] = reinterpret_cast<const int8_t*>(block + 2)[j];
  } else if constexpr (F == Q6_K) {
    const Q6KPlace place = q6k_place(block, s);
    for (int j = 0; j < 32; ++j) out[j] = place.scales[j / 16] * q6k_code(place, j);
  } else if constexpr (k_nibbles(F)) {
    const uint8_t* q = block + nibbles_offset(F) + 32 * (s / 2);
    for (int j = 0; j < 32; ++j) {
      out[j] = s % 2 ? q[j] >> 4 : q[j] & 15;
      if constexpr (F == Q5_K) out[j] |= ((block[Q5K_HIGH_BITS + j] >> s) & 1) << 4;
    }
  } else {  // values 0..15 the low nibbles of the 16 bytes, 16..31 the high ones; Q4_0's codes are q - 8
    const uint8_t* q = block + (F == Q4_1 ? 4 : 2);
    const int offset = F == Q4_0 ? 8 : 0;
    for (int j = 0; j < 16; ++j) {
      out[j] = (q[j] & 15) - offset;
      out[j + 16] = (q[j] >> 4) - offset;
    }
  }
}

// Sub-block s's 32 values: plain ones as stored (int8 without its row scale), GGUF's scale * q + min (Q6_K:
// (d * its half's scale) * q, as gguf rounds it).
template <int64_t F>
inline void decode(const uint8_t* block, int64_t s, float* out) {
  if constexpr (F == F32) {
    std::memcpy(out, block, QK * sizeof(float));
  } else if constexpr (F == BF16) {
    for (int j = 0; j < 32; ++j) out[j] = bf16_at(block + 2 * j);
  } else if constexpr (F == I8) {
    for (int j = 0; j < 32; ++j) out[j] = reinterpret_cast<const int8_t*>(block)[j];
  } else if constexpr (F == Q6_K) {
    const Q6KPlace place = q6k_place(block, s);
    const float d = half_at(block + 208);
    for (int j = 0; j < 32; ++j) out[j] = (d * place.scales[j / 16]) * static_cast<float>(q6k_code(place, j));
  } else {
    float scale, min;
    scale_and_min<F>(block, s, &scale, &min);
    int32_t q[32];
    codes<F>(block, s, q);
    for (int j = 0; j < 32; ++j) out[j] = scale * static_cast<float>(q[j]) + min;
  }
}

#ifdef __AVX2__
constexpr int VECS = QK / LANES;
constexpr int64_t PREFETCH_BYTES = 2048;  // ahead of the block being read: measured best of 512..4096

inline __m128i nibbles(__m128i bytes, int shift) { return _mm_and_si128(_mm_srli_epi16(bytes, shift), _mm_set1_epi8(15)); }

// Bit s of each byte as its bit 4 (Q5_K's fifth bits).
inline __m128i fifth_bits(__m128i bytes, int s) {
  return _mm_and_si128(_mm_slli_epi16(_mm_srli_epi16(bytes, s), 4), _mm_set1_epi8(16));
}
inline __m256i fifth_bits(__m256i bytes, int s) {
  return _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(bytes, s), 4), _mm256_set1_epi8(16));
}

// 16 byte codes (signed or not) as floats into the VECS / 2 vectors at q.
template <bool SIGNED>
inline void widen(__m128i bytes, Vec* q) {
  const auto to_float = [](__m128i b) { return SIGNED ? from_i8(b) : from_u8(b); };
  q[0] = to_float(bytes);
  if constexpr (VECS == 4) q[1] = to_float(_mm_srli_si128(bytes, 8));
}

// Sub-block s's 32 values as floats, in value order: plain ones as stored, GGUF's integer codes.
template <int64_t F>
inline void values(const uint8_t* block, int64_t s, Vec* q) {
  if constexpr (F == F32) {
    for (int i = 0; i < VECS; ++i) q[i] = load(reinterpret_cast<const float*>(block) + LANES * i);
  } else if constexpr (F == BF16) {
    for (int i = 0; i < VECS; ++i) q[i] = from_bf16(block + 2 * LANES * i);
  } else if constexpr (F == I8) {
    for (int half = 0; half < 2; ++half)
      widen<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * half)), q + half * VECS / 2);
  } else if constexpr (F == Q8_0) {
    for (int i = 0; i < VECS; ++i)
      q[i] = from_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + LANES * i)));
  } else if constexpr (F == Q6_K) {
    const Q6KPlace place = q6k_place(block, s);
    for (int half = 0; half < 2; ++half) {
      const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(place.low + 16 * half));
      const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(place.high + 16 * half));
      const __m128i nibble = _mm_and_si128(_mm_srli_epi16(low, place.nibble_shift), _mm_set1_epi8(15));
      const __m128i top = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(high, place.high_shift), _mm_set1_epi8(3)), 4);
      const __m128i code = _mm_sub_epi8(_mm_or_si128(nibble, top), _mm_set1_epi8(32));
      Vec* out = q + half * VECS / 2;
      widen<true>(code, out);
      for (int i = 0; i < VECS / 2; ++i) out[i] = mul(out[i], broadcast(place.scales[half]));
    }
  } else if constexpr (k_nibbles(F)) {
    const uint8_t* bytes = block + nibbles_offset(F) + 32 * (s / 2);
    for (int half = 0; half < 2; ++half) {
      __m128i code = nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * half)), 4 * (s % 2));
      if constexpr (F == Q5_K) {
        const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + Q5K_HIGH_BITS + 16 * half));
        code = _mm_or_si128(code, fifth_bits(high, s));
      }
      widen<false>(code, q + half * VECS / 2);
    }
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (F == Q4_1 ? 4 : 2)));
    const __m128i nibble = _mm_set1_epi8(15);
    __m128i low = _mm_and_si128(packed, nibble), high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    if constexpr (F == Q4_0) {  // codes q - 8, signed
      low = _mm_sub_epi8(low, _mm_set1_epi8(8));
      high = _mm_sub_epi8(high, _mm_set1_epi8(8));
    }
    widen<F == Q4_0>(low, q);
    widen<F == Q4_0>(high, q + VECS / 2);
  }
}

// Independent accumulator chains per row of x: a fused multiply-add waits ~4 cycles for the one before it in
// its chain, and two issue per cycle, so a few rows need several chains each to keep the units busy.
constexpr int chains(int rows) { return rows >= 8 ? 1 : rows >= 4 ? 2 : 4; }

// ROWS rows of x (float32) against one weight row: each sub-block decoded to floats once for them, a GGUF scale
// applied once per row.
template <int64_t F, int ROWS>
inline void rows_times_float_row(const float* x, const float* x_block_sums, int64_t k, const uint8_t* weights,
                                 float* out, int64_t out_stride) {
  constexpr int C = chains(ROWS);
  const int64_t subs = k / QK;
  Vec acc[ROWS][C];
  float min_acc[ROWS] = {};
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = zero();
  for (int64_t sb = 0; sb < subs; ++sb) {
    const uint8_t* block = block_of<F>(weights, sb);
    const int64_t s = sb % sub_blocks(F);
    if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH_BYTES, _MM_HINT_T0);
    Vec q[VECS];
    values<F>(block, s, q);
    if constexpr (plain(F)) {
      for (int r = 0; r < ROWS; ++r) {
        const float* xs = x + r * k + sb * QK;
        for (int i = 0; i < VECS; ++i) {
          Vec& chain = acc[r][(sb * VECS + i) % C];
          chain = fmadd(q[i], load(xs + LANES * i), chain);
        }
      }
    } else {
      float scale_value, min;
      scale_and_min<F>(block, s, &scale_value, &min);
      const Vec scale = broadcast(scale_value);
      for (int r = 0; r < ROWS; ++r) {
        const float* xs = x + r * k + sb * QK;
        Vec dot = mul(q[0], load(xs));
        for (int i = 1; i < VECS; ++i) dot = fmadd(q[i], load(xs + LANES * i), dot);
        Vec& chain = acc[r][sb % C];
        chain = fmadd(scale, dot, chain);
        if constexpr (has_minimum(F)) min_acc[r] += min * x_block_sums[r * subs + sb];
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    Vec total = acc[r][0];
    for (int c = 1; c < C; ++c) total = add(total, acc[r][c]);
    out[r * out_stride] = horizontal_sum(total) + min_acc[r] + tail_dot<F>(weights, x + r * k, k);
  }
}

constexpr bool signed_codes(int64_t format) { return format == Q4_0 || format == Q8_0 || format == Q6_K; }

// Sub-block s's 32 integer codes of a GGUF block as bytes in value order (Q6_K: without its halves' scales).
template <int64_t F>
inline __m256i code_bytes(const uint8_t* block, int64_t s) {
  if constexpr (F == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  } else if constexpr (k_nibbles(F)) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + nibbles_offset(F) + 32 * (s / 2)));
    __m256i code = _mm256_and_si256(s % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, _mm256_set1_epi8(15));
    if constexpr (F == Q5_K)
      code = _mm256_or_si256(code, fifth_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + Q5K_HIGH_BITS)), s));
    return code;
  } else if constexpr (F == Q6_K) {
    const Q6KPlace place = q6k_place(block, s);
    __m128i half[2];
    for (int h = 0; h < 2; ++h) {
      const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(place.low + 16 * h));
      const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(place.high + 16 * h));
      const __m128i top = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(high, place.high_shift), _mm_set1_epi8(3)), 4);
      half[h] = _mm_sub_epi8(_mm_or_si128(nibbles(low, place.nibble_shift), top), _mm_set1_epi8(32));
    }
    return _mm256_set_m128i(half[1], half[0]);
  } else {  // values 0..15 the low nibbles of the 16 bytes, 16..31 the high ones; Q4_0's codes are q - 8
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (F == Q4_1 ? 4 : 2)));
    const __m256i q = _mm256_set_m128i(nibbles(packed, 4), nibbles(packed, 0));
    return F == Q4_0 ? _mm256_sub_epi8(q, _mm256_set1_epi8(8)) : q;
  }
}

// Sums of u * s over each four consecutive bytes (u unsigned, s signed; |u * s| of a pair within 16 bits).
inline __m256i byte_dots(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The weights' scale of each of the eight sums of four (Q6_K: the first four in its first half's, the rest in
// its second's) and the sub-block's minimum.
template <int64_t F>
inline __m256 lane_scales(const uint8_t* block, int64_t s, float* min) {
  if constexpr (F == Q6_K) {
    const float d = half_at(block + 208);
    const int8_t* scales = q6k_place(block, s).scales;
    *min = 0.0f;
    return _mm256_set_m128(_mm_set1_ps(d * scales[1]), _mm_set1_ps(d * scales[0]));
  } else {
    float scale;
    scale_and_min<F>(block, s, &scale, min);
    return _mm256_set1_ps(scale);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// Sub-blocks s and s + 1 (in blocks first and second) as 64 codes in value order. Q4_0 / Q4_1: both blocks' 16
// bytes in one vector, their low nibbles (values 0..15) and high ones (16..31) split once for the two and put in
// order by one shuffle of 128-bit quarters.
template <int64_t F>
inline __m512i pair_codes(const uint8_t* first, const uint8_t* second, int64_t s) {
  if constexpr (F == Q4_0 || F == Q4_1) {
    constexpr int offset = F == Q4_1 ? 4 : 2;
    const __m256i packed = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(first + offset))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(second + offset)), 1);
    const __m256i low = _mm256_and_si256(packed, _mm256_set1_epi8(15));
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(15));
    const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);  // lows of both, highs of both
    const __m512i q = _mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0));
    return F == Q4_0 ? _mm512_sub_epi8(q, _mm512_set1_epi8(8)) : q;
  } else {
    return _mm512_inserti64x4(_mm512_castsi256_si512(code_bytes<F>(first, s)),
                              code_bytes<F>(second, (s + 1) % sub_blocks(F)), 1);
  }
}

// The weights' scale of each of the 16 sums of four of a pair of sub-blocks, and their minimums likewise. Q4_0,
// Q4_1, Q8_0: the blocks' float16 d (and m) converted in one instruction and spread by permutes.
template <int64_t F>
inline void pair_scales(const uint8_t* first, const uint8_t* second, int64_t s, __m512* scales, __m512* mins) {
  if constexpr (F == Q4_0 || F == Q4_1 || F == Q8_0) {
    int32_t head0, head1;  // d, then m (Q4_1)
    std::memcpy(&head0, first, 4);
    std::memcpy(&head1, second, 4);
    const __m512 values = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(head0), head1, 1)));
    *scales = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0), values);
    if constexpr (F == Q4_1)
      *mins = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1), values);
  } else {
    float min0, min1;
    const __m256 scales0 = lane_scales<F>(first, s, &min0);
    *scales = _mm512_insertf32x8(_mm512_castps256_ps512(scales0), lane_scales<F>(second, (s + 1) % sub_blocks(F), &min1), 1);
    if constexpr (has_minimum(F)) *mins = _mm512_insertf32x8(_mm512_set1_ps(min0), _mm256_set1_ps(min1), 1);
  }
}
#endif

// ROWS rows of x (quantized) against one row of GGUF blocks: each sub-block's codes made once for them, an
// integer dot per row, scaled by the weights' and the row's scales.
template <int64_t F, int ROWS>
inline void rows_times_block_row(const Activations& a, int64_t row0, const uint8_t* weights, float* out,
                                 int64_t out_stride) {
  constexpr int C = chains(ROWS);
  const int64_t subs = a.k / QK;
  __m256 acc[ROWS][C];
  float min_acc[ROWS] = {};
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t sb = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  // Two sub-blocks at a time: 64 codes in one 512-bit integer dot.
  // One chain per row (and one for its minimums): a pair's ~20 instructions outlast a multiply-add's latency.
  __m512 wide[ROWS], minimums[ROWS];
  for (int r = 0; r < ROWS; ++r) wide[r] = minimums[r] = _mm512_setzero_ps();
  for (; sb + 1 < subs; sb += 2) {
    const uint8_t *first = block_of<F>(weights, sb), *second = block_of<F>(weights, sb + 1);
    const int64_t s = sb % sub_blocks(F);
    if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(first) + PREFETCH_BYTES, _MM_HINT_T0);
    const __m512i codes = pair_codes<F>(first, second, s);
    const __m512i magnitudes = signed_codes(F) ? _mm512_abs_epi8(codes) : codes;
    const __mmask64 negative = signed_codes(F) ? _mm512_movepi8_mask(codes) : 0;
    __m512 scales, mins;
    pair_scales<F>(first, second, s, &scales, &mins);
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      __m512i xq = _mm512_loadu_si512(a.row_codes(row) + sb * QK);
      if constexpr (signed_codes(F)) xq = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
      const __m512 dots = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitudes, xq));
      wide[r] = _mm512_fmadd_ps(dots, _mm512_mul_ps(scales, _mm512_loadu_ps(a.pair_scale(row, sb))), wide[r]);
      if constexpr (has_minimum(F)) minimums[r] = _mm512_fmadd_ps(mins, _mm512_loadu_ps(a.pair_sum(row, sb)), minimums[r]);
    }
  }
  if (sb == subs) {  // no sub-block left for the 256-bit loop
    for (int r = 0; r < ROWS; ++r)
      out[r * out_stride] = _mm512_reduce_add_ps(has_minimum(F) ? _mm512_add_ps(wide[r], minimums[r]) : wide[r]);
    return;
  }
  for (int r = 0; r < ROWS; ++r)
    min_acc[r] = _mm512_reduce_add_ps(has_minimum(F) ? _mm512_add_ps(wide[r], minimums[r]) : wide[r]);
#endif
  for (; sb < subs; ++sb) {
    const uint8_t* block = block_of<F>(weights, sb);
    const int64_t s = sb % sub_blocks(F);
    if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH_BYTES, _MM_HINT_T0);
    const __m256i codes = code_bytes<F>(block, s);
    const __m256i magnitudes = signed_codes(F) ? _mm256_sign_epi8(codes, codes) : codes;
    float min;
    const __m256 scales = lane_scales<F>(block, s, &min);
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.row_codes(row) + sb * QK));
      if constexpr (signed_codes(F)) xq = _mm256_sign_epi8(xq, codes);  // the codes' signs moved onto x
      const __m256 dots = _mm256_cvtepi32_ps(byte_dots(magnitudes, xq));
      __m256& chain = acc[r][sb % C];
      chain = _mm256_fmadd_ps(dots, _mm256_mul_ps(scales, _mm256_set1_ps(a.scales[row * subs + sb])), chain);
      if constexpr (has_minimum(F)) min_acc[r] += min * a.sums[row * subs + sb];
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    __m256 total = acc[r][0];
    for (int c = 1; c < C; ++c) total = _mm256_add_ps(total, acc[r][c]);
    out[r * out_stride] = horizontal_sum8(total) + min_acc[r];
  }
}

template <int64_t F, int ROWS>
inline void rows_times_row(const Activations& a, int64_t row0, const uint8_t* weights, float* out, int64_t out_stride) {
  if constexpr (plain(F)) {
    rows_times_float_row<F, ROWS>(a.row(row0), nullptr, a.k, weights, out, out_stride);
  } else {
    if (a.quantized()) rows_times_block_row<F, ROWS>(a, row0, weights, out, out_stride);
    else rows_times_float_row<F, ROWS>(a.row(row0), a.sums.data() + row0 * (a.k / QK), a.k, weights, out, out_stride);
  }
}
#endif

// One row of x (row r of a) against one weight row, without vector instructions.
template <int64_t F>
inline float row_times_row(const Activations& a, int64_t r, const uint8_t* weights) {
  const int64_t subs = a.k / QK;
  float total = 0.0f;
  for (int64_t sb = 0; sb < subs; ++sb) {
    float v[QK];
    decode<F>(block_of<F>(weights, sb), sb % sub_blocks(F), v);
    for (int j = 0; j < QK; ++j)
      total += v[j] * (a.quantized() ? a.scales[r * subs + sb] * a.row_codes(r)[sb * QK + j] : a.row(r)[sb * QK + j]);
  }
  return total + tail_dot<F>(weights, a.row(r), a.k);
}

// y[i, j] = x[row0 + i] . w[n_begin + j] for the m_count rows of x from row0 and the weight rows n_begin..n_end-1
// (row stride w_row_bytes), y [m_count, *] with row stride y_stride; ROWS_AT_ONCE rows of x at a time, each
// block read into registers once for them.
template <int64_t F>
void rows_times_blocks(const Activations& a, int64_t row0, int64_t m_count, const uint8_t* w, int64_t w_row_bytes,
                       int64_t n_begin, int64_t n_end, float* y, int64_t y_stride) {
  for (int64_t row = n_begin; row < n_end; ++row) {
    const uint8_t* weights = w + row * w_row_bytes;
    for (int64_t m0 = 0; m0 < m_count; m0 += ROWS_AT_ONCE) {
      const int64_t rows = std::min(ROWS_AT_ONCE, m_count - m0);
      float* out = y + m0 * y_stride + (row - n_begin);
#ifdef __AVX2__
      const int64_t first = row0 + m0;
      switch (rows) {
        case 1: rows_times_row<F, 1>(a, first, weights, out, y_stride); break;
        case 2: rows_times_row<F, 2>(a, first, weights, out, y_stride); break;
        case 3: rows_times_row<F, 3>(a, first, weights, out, y_stride); break;
        case 4: rows_times_row<F, 4>(a, first, weights, out, y_stride); break;
        case 5: rows_times_row<F, 5>(a, first, weights, out, y_stride); break;
        case 6: rows_times_row<F, 6>(a, first, weights, out, y_stride); break;
        case 7: rows_times_row<F, 7>(a, first, weights, out, y_stride); break;
        default: rows_times_row<F, 8>(a, first, weights, out, y_stride); break;
      }
#else
      for (int64_t r = 0; r < rows; ++r) out[r * y_stride] = row_times_row<F>(a, row0 + m0 + r, weights);
#endif
    }
  }
}

template <typename Fn>
void dispatch(int64_t format, Fn&& fn) {
  switch (format) {
    case F32: return fn(std::integral_constant<int64_t, F32>{});
    case BF16: return fn(std::integral_constant<int64_t, BF16>{});
    case I8: return fn(std::integral_constant<int64_t, I8>{});
    case Q4_0: return fn(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return fn(std::integral_constant<int64_t, Q4_1>{});
    case Q8_0: return fn(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return fn(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return fn(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return fn(std::integral_constant<int64_t, Q6_K>{});
  }
  TORCH_CHECK(false, "no CPU kernel for weight format ", format);
}

}  // namespace chitu_cpu
