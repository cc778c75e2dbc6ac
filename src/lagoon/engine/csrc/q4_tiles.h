// The tile kernels of Lagoon's 4-bit and 8-bit GGUF matrix-vector products, shared by the dense ops
// (q4_matvec.cpp) and the MoE ops (moe_matvec.cpp): weight layouts, activation quantization per
// block of 32, and per-ISA tile functions (AVX-512 VNNI, AVX2, portable). Everything here is
// internal to each translation unit (an anonymous namespace): no symbols cross between them.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTile = 16;
constexpr int64_t kBlock = 32;
constexpr int64_t kTileBytes = 4 * 64 + 2 * kTile * 2;  // nibbles, d, m

struct Acts {  // one row of x, quantized
  const int8_t* q;  // [K]
  const float* d;   // [K/32]
  const float* s;   // [K/32]
};

// ---------------------------------------------------------------------------------- portable
void tile_scalar(const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  for (int64_t r = 0; r < kTile; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + b * kTileBytes;
      const int8_t* xq = a.q + b * kBlock;
      int32_t dot = 0;
      for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 4; ++i) {
          uint8_t v = p[64 * c + 4 * r + i];
          dot += int32_t(v & 15) * xq[4 * c + i] + int32_t(v >> 4) * xq[16 + 4 * c + i];
        }
      const c10::Half* dm = reinterpret_cast<const c10::Half*>(p + 256);
      acc += float(dm[r]) * a.d[b] * float(dot) + float(dm[kTile + r]) * a.s[b];
    }
    out[r] = acc;
  }
}

// ------------------------------------------------------------------------------------- AVX2
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // rows 0-7, 8-15
  __m256 mac0 = _mm256_setzero_ps(), mac1 = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kTileBytes;
    const int32_t* xb = reinterpret_cast<const int32_t*>(a.q + b * kBlock);
    // |q·xq| pairs <= 2·15·127, eight of them fit int16
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i xl = _mm256_set1_epi32(xb[c]), xh = _mm256_set1_epi32(xb[4 + c]);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32));
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low), xl));
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low), xh));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low), xl));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), xh));
    }
    const __m256 dx = _mm256_set1_ps(a.d[b]), sx = _mm256_set1_ps(a.s[b]);
    const __m128i* dm = reinterpret_cast<const __m128i*>(p + 256);
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(dm)), d1 = _mm256_cvtph_ps(_mm_loadu_si128(dm + 1));
    const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128(dm + 2)), m1 = _mm256_cvtph_ps(_mm_loadu_si128(dm + 3));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0, ones)), _mm256_mul_ps(d0, dx), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1, ones)), _mm256_mul_ps(d1, dx), acc1);
    mac0 = _mm256_fmadd_ps(m0, sx, mac0);
    mac1 = _mm256_fmadd_ps(m1, sx, mac1);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(acc0, mac0));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(acc1, mac1));
}

// --------------------------------------------------------------------------------- AVX-512 VNNI
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"))) void tile_avx512(
    const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc = _mm512_setzero_ps(), mac = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kTileBytes;
    const int32_t* xb = reinterpret_cast<const int32_t*>(a.q + b * kBlock);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    __m512i s2 = _mm512_setzero_si512(), s3 = _mm512_setzero_si512();
    const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
    const __m512i v2 = _mm512_loadu_si512(p + 128), v3 = _mm512_loadu_si512(p + 192);
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v0, low), _mm512_set1_epi32(xb[0]));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), _mm512_set1_epi32(xb[4]));
    s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(v1, low), _mm512_set1_epi32(xb[1]));
    s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), _mm512_set1_epi32(xb[5]));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v2, low), _mm512_set1_epi32(xb[2]));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v2, 4), low), _mm512_set1_epi32(xb[6]));
    s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(v3, low), _mm512_set1_epi32(xb[3]));
    s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(v3, 4), low), _mm512_set1_epi32(xb[7]));
    const __m512i s = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
    const __m256i* dm = reinterpret_cast<const __m256i*>(p + 256);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(dm)), m = _mm512_cvtph_ps(_mm256_loadu_si256(dm + 1));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(a.d[b])), acc);
    mac = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[b]), mac);
  }
  _mm512_storeu_ps(out, _mm512_add_ps(acc, mac));
}

// Up to 4 rows of x against one tile: the unpacked nibbles stay in registers for all of them (a
// small decode batch reads and unpacks each weight once, not once per row)
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"))) void tile_avx512_rows(
    const uint8_t* w, int64_t nb, const Acts* a, float* out) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R], mac[R];
  for (int r = 0; r < R; ++r) acc[r] = mac[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kTileBytes;
    __m512i lo[4], hi[4];
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(p + 64 * c);
      lo[c] = _mm512_and_si512(v, low);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const __m256i* dm = reinterpret_cast<const __m256i*>(p + 256);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(dm)), m = _mm512_cvtph_ps(_mm256_loadu_si256(dm + 1));
    for (int r = 0; r < R; ++r) {
      const int32_t* xb = reinterpret_cast<const int32_t*>(a[r].q + b * kBlock);
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_set1_epi32(xb[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], _mm512_set1_epi32(xb[4]));
      for (int c = 1; c < 4; ++c) {
        s0 = _mm512_dpbusd_epi32(s0, lo[c], _mm512_set1_epi32(xb[c]));
        s1 = _mm512_dpbusd_epi32(s1, hi[c], _mm512_set1_epi32(xb[4 + c]));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(d, _mm512_set1_ps(a[r].d[b])),
                               acc[r]);
      mac[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a[r].s[b]), mac[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + kTile * r, _mm512_add_ps(acc[r], mac[r]));
}

bool cpu_has(int64_t isa) {
  if (isa == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == 1)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return isa == 0;
}

// x [K] (float or bf16) -> int8 codes per block of 32, the blocks' scales and sums
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const T* xb = x + b * kBlock;
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(float(xb[i])));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int32_t v = int32_t(std::nearbyint(float(xb[i]) * inv));
      q[b * kBlock + i] = int8_t(v);
      sum += v;
    }
    d[b] = scale;
    s[b] = scale * float(sum);
  }
}

// ------------------------------------------------------- int8 weights in blocks of 32 (GGUF Q8_0)
// w = d·q, q in -127..127. Layout (`lagoon.engine.cpu_kernels.pack_i8`): per tile and block 576
// bytes: 8 chunks of 64 bytes (byte 4·r + i of chunk g: row r's code for k = 4g + i), the 16 rows'
// sums of the block's codes (int16), their d (f16). y = Σ_blocks d·dx · Σ_k q·xq.
constexpr int64_t kI8TileBytes = 8 * 64 + kTile * 2 + kTile * 2;

void i8tile_scalar(const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  for (int64_t r = 0; r < kTile; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* p = reinterpret_cast<const int8_t*>(w + b * kI8TileBytes);
      const int8_t* xq = a.q + b * kBlock;
      int32_t dot = 0;
      for (int g = 0; g < 8; ++g)
        for (int i = 0; i < 4; ++i) dot += int32_t(p[64 * g + 4 * r + i]) * xq[4 * g + i];
      acc += float(reinterpret_cast<const c10::Half*>(p + 544)[r]) * a.d[b] * float(dot);
    }
    out[r] = acc;
  }
}

// vpmaddubsw needs one unsigned side: |x| there and x's sign moved onto w (|x| <= 127: no saturation)
__attribute__((target("avx2,fma,f16c"))) void i8tile_avx2(const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kI8TileBytes;
    const int32_t* xb = reinterpret_cast<const int32_t*>(a.q + b * kBlock);
    __m256i i0 = _mm256_setzero_si256(), i1 = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      const __m256i x = _mm256_set1_epi32(xb[g]), ax = _mm256_sign_epi8(x, x);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * g));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * g + 32));
      i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(v0, x)), ones));
      i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(v1, x)), ones));
    }
    const __m256 dx = _mm256_set1_ps(a.d[b]);
    const __m128i* dw = reinterpret_cast<const __m128i*>(p + 544);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(dw)), dx), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(dw + 1)), dx), acc1);
  }
  _mm256_storeu_ps(out, acc0);
  _mm256_storeu_ps(out + 8, acc1);
}

// vpdpbusd's unsigned side is x + 128 (x xor 0x80); the block's Σw·128 is taken back from the sums
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"))) void i8tile_avx512(
    const uint8_t* w, int64_t nb, const Acts& a, float* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kI8TileBytes;
    const int32_t* xb = reinterpret_cast<const int32_t*>(a.q + b * kBlock);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    __m512i s2 = _mm512_setzero_si512(), s3 = _mm512_setzero_si512();
    for (int g = 0; g < 8; g += 4) {
      s0 = _mm512_dpbusd_epi32(s0, _mm512_xor_si512(_mm512_set1_epi32(xb[g]), flip), _mm512_loadu_si512(p + 64 * g));
      s1 = _mm512_dpbusd_epi32(s1, _mm512_xor_si512(_mm512_set1_epi32(xb[g + 1]), flip),
                               _mm512_loadu_si512(p + 64 * g + 64));
      s2 = _mm512_dpbusd_epi32(s2, _mm512_xor_si512(_mm512_set1_epi32(xb[g + 2]), flip),
                               _mm512_loadu_si512(p + 64 * g + 128));
      s3 = _mm512_dpbusd_epi32(s3, _mm512_xor_si512(_mm512_set1_epi32(xb[g + 3]), flip),
                               _mm512_loadu_si512(p + 64 * g + 192));
    }
    const __m512i sums = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 512)));
    const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)),
                                       _mm512_slli_epi32(sums, 7));
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 544)));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[b])), acc);
  }
  _mm512_storeu_ps(out, acc);
}

using TileFn = void (*)(const uint8_t*, int64_t, const Acts&, float*);
// rows (1..4) of x against one tile, out [rows][16]
using RowsFn = void (*)(const uint8_t*, int64_t, const Acts*, int, float*);

template <TileFn F>
void one_by_one(const uint8_t* w, int64_t nb, const Acts* a, int rows, float* out) {
  for (int r = 0; r < rows; ++r) F(w, nb, a[r], out + kTile * r);
}

void q4_rows_avx512(const uint8_t* w, int64_t nb, const Acts* a, int rows, float* out) {
  switch (rows) {
    case 1: return tile_avx512(w, nb, a[0], out);
    case 2: return tile_avx512_rows<2>(w, nb, a, out);
    case 3: return tile_avx512_rows<3>(w, nb, a, out);
    default: return tile_avx512_rows<4>(w, nb, a, out);
  }
}

}  // namespace
