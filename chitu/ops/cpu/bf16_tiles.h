// Many bfloat16 rows of x times GGUF blocks, with AVX-512 BF16's pair dots: 32 weight rows at a time are decoded
// once into a tile of bfloat16 pairs (their values rounded to bfloat16, as dequantizing the file at load would),
// then every row of x meets the tile in vdpbf16ps, 32 multiply-adds an instruction with the weights in registers
// and x's pair broadcast from memory. Decoding costs a few instructions per weight whatever the number of rows,
// so from a dozen rows on this beats the integer dots (weight_formats.h rows_times_block_row), whose scaling per
// 32 values and row costs as much as the dot itself.
#pragma once

#include "weight_formats.h"

namespace chitu_cpu {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool BF16_TILES = true;
constexpr int TILE_ROWS = 32;  // weight rows of a tile: two vectors of 16 lanes
constexpr int X_ROWS = 12;     // rows of x at a time: 24 accumulators, 2 weight vectors, a broadcast

// In place, 16 vectors of 16 32-bit lanes transposed: lane j of vector i becomes lane i of vector j.
inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      v[i + 2 * j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
      v[i + 2 * j + 1] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
    }
  // Each 128-bit quarter now holds a 4x4 block transposed; move the quarters into place.
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      t[i + 4 * j] = _mm512_shuffle_i32x4(v[i + 8 * j], v[i + 4 + 8 * j], 0x88);
      t[i + 4 * j + 8] = _mm512_shuffle_i32x4(v[i + 8 * j], v[i + 4 + 8 * j], 0xdd);
    }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 4], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 4], 0xdd);
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 8], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 8], t[i + 12], 0xdd);
  }
}

// Sub-block s of a GGUF block as 32 bfloat16 values in order, a vector of 16 pairs.
template <int64_t F>
inline __m512i bf16_pairs(const uint8_t* block, int64_t s) {
  Vec q[VECS];
  values<F>(block, s, q);
  float scale, min;
  if constexpr (F == Q6_K) {
    scale = half_at(block + 208);  // values() folded each half's scale into its codes
    min = 0.0f;
  } else {
    scale_and_min<F>(block, s, &scale, &min);
  }
  const Vec low = fmadd(q[0], broadcast(scale), broadcast(min)), high = fmadd(q[1], broadcast(scale), broadcast(min));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

// Weight rows n0..n0+31 (rows past n zero) as pairs[p][j]: the bfloat16 values 2p and 2p+1 of row n0 + j.
template <int64_t F>
void decode_tile(const uint8_t* w, int64_t w_row_bytes, int64_t n0, int64_t n, int64_t k, uint32_t* pairs) {
  for (int half = 0; half < 2; ++half)
    for (int64_t sb = 0; sb < k / QK; ++sb) {
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t row = n0 + 16 * half + j;
        v[j] = row < n ? bf16_pairs<F>(block_of<F>(w + row * w_row_bytes, sb), sb % sub_blocks(F))
                       : _mm512_setzero_si512();
      }
      transpose16(v);
      for (int p = 0; p < 16; ++p)
        _mm512_storeu_si512(pairs + (sb * 16 + p) * TILE_ROWS + 16 * half, v[p]);
    }
}

// ROWS rows of x (bfloat16 [*, k] from x) times a decoded tile → y's columns n0.. (bfloat16, row stride n).
template <int ROWS>
inline void rows_times_tile(const c10::BFloat16* x, int64_t k, const uint32_t* pairs, c10::BFloat16* y, int64_t n,
                            int64_t n0) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* x_pairs = reinterpret_cast<const uint32_t*>(x);
  for (int64_t p = 0; p < k / 2; ++p) {
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pairs + p * TILE_ROWS));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pairs + p * TILE_ROWS + 16));
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x_pairs[r * k / 2 + p])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  const int64_t columns = std::min<int64_t>(TILE_ROWS, n - n0);
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) {
      const int64_t count = std::clamp<int64_t>(columns - 16 * h, 0, 16);
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      _mm256_mask_storeu_epi16(y + r * n + n0 + 16 * h, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[r][h])));
    }
}

// y [m, n] = x [m, k] w^T, both bfloat16, w GGUF blocks of format F (row stride w_row_bytes); the tiles from
// tile_begin to tile_end (columns 32 * tile..).
template <int64_t F>
void rows_times_tiles(const c10::BFloat16* x, int64_t m, int64_t k, const uint8_t* w, int64_t w_row_bytes, int64_t n,
                      int64_t tile_begin, int64_t tile_end, c10::BFloat16* y) {
  std::vector<uint32_t> pairs(k / 2 * TILE_ROWS);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n0 = tile * TILE_ROWS;
    decode_tile<F>(w, w_row_bytes, n0, n, k, pairs.data());
    for (int64_t r0 = 0; r0 < m; r0 += X_ROWS) {
      const c10::BFloat16* xs = x + r0 * k;
      c10::BFloat16* ys = y + r0 * n;
      switch (std::min<int64_t>(X_ROWS, m - r0)) {
        case 1: rows_times_tile<1>(xs, k, pairs.data(), ys, n, n0); break;
        case 2: rows_times_tile<2>(xs, k, pairs.data(), ys, n, n0); break;
        case 3: rows_times_tile<3>(xs, k, pairs.data(), ys, n, n0); break;
        case 4: rows_times_tile<4>(xs, k, pairs.data(), ys, n, n0); break;
        case 5: rows_times_tile<5>(xs, k, pairs.data(), ys, n, n0); break;
        case 6: rows_times_tile<6>(xs, k, pairs.data(), ys, n, n0); break;
        case 7: rows_times_tile<7>(xs, k, pairs.data(), ys, n, n0); break;
        case 8: rows_times_tile<8>(xs, k, pairs.data(), ys, n, n0); break;
        case 9: rows_times_tile<9>(xs, k, pairs.data(), ys, n, n0); break;
        case 10: rows_times_tile<10>(xs, k, pairs.data(), ys, n, n0); break;
        case 11: rows_times_tile<11>(xs, k, pairs.data(), ys, n, n0); break;
        default: rows_times_tile<12>(xs, k, pairs.data(), ys, n, n0); break;
      }
    }
  }
}
#else
constexpr bool BF16_TILES = false;
#endif

}  // namespace chitu_cpu
