// lagoon::q4_matvec (and lagoon::i8_matvec for int8 weights, below): y = x · Wᵀ for a 4-bit GGUF weight (blocks of 32, w = d·q + m, q in 0..15)
// with the activations quantized to int8 per block of 32 (dx = amax/127, xq = round(x/dx), and the
// block's sum sx = dx·Σxq), so each block's dot product is integer work:
//
//     Σ_k w·x ≈ d·dx·Σ_k q·xq + m·sx
//
// Weight layout (`lagoon.engine.cpu_kernels.pack_q4`): tiles of 16 output rows; per tile and block
// 320 bytes: 4 chunks of 64 bytes, then the 16 rows' d (f16), then their m (f16). Chunk c holds, at
// byte 4·r + i, row r's code for k = 4c + i in its low nibble and for k = 16 + 4c + i in its high
// nibble, so one 64-byte load feeds one `vpdpbusd` per nibble with 4 activation bytes broadcast, and
// the 16 int32 lanes are the tile's 16 rows (no horizontal sums).
//
// `isa`: 2 AVX-512 VNNI, 1 AVX2 (vpmaddubsw + vpmaddwd), 0 portable C++; chosen by the caller
// (`lagoon.engine.kernels`), checked here against the CPU. Rows of x (a small decode batch) share
// each weight tile while it is in L1. Threads: lagoon::parallel_for over tiles (pool.h: Lagoon's own
// pool, or torch's at::parallel_for with LAGOON_KERNEL_POOL=0).
#include "q4_tiles.h"

#include <torch/library.h>

namespace {

// y [M, n] = x [M, K] · Wᵀ for a weight packed in tiles of `tile_bytes` per block
at::Tensor matvec(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t tile_bytes, int64_t n,
                  int64_t isa, RowsFn tile) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == tile_bytes &&
                  packed.is_contiguous(),
              op, ": packed must be contiguous uint8 [N/16, K/32, ", tile_bytes, "], got ", packed.sizes());
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock, nt = packed.size(0);
  TORCH_CHECK(K % kBlock == 0 && packed.size(1) == nb, op, ": x has K = ", K, ", the weight ",
              packed.size(1) * kBlock);
  TORCH_CHECK(n > (nt - 1) * kTile && n <= nt * kTile, op, ": n = ", n, " does not fit ", nt, " tiles");
  TORCH_CHECK(cpu_has(isa), op, ": this CPU lacks the instructions of kernel ", isa);

  const at::Tensor xc = x.contiguous();
  auto qx = at::empty({M, K}, x.options().dtype(at::kChar));
  auto ds = at::empty({2, M, nb}, x.options().dtype(at::kFloat));
  int8_t* qp = qx.data_ptr<int8_t>();
  float* dp = ds.data_ptr<float>();
  float* sp = dp + M * nb;
  for (int64_t r = 0; r < M; ++r) {
    if (x.scalar_type() == at::kFloat)
      quantize_row(xc.data_ptr<float>() + r * K, K, qp + r * K, dp + r * nb, sp + r * nb);
    else
      quantize_row(xc.data_ptr<c10::BFloat16>() + r * K, K, qp + r * K, dp + r * nb, sp + r * nb);
  }
  auto y = at::empty({M, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const bool f32 = x.scalar_type() == at::kFloat;
  void* yp = y.data_ptr();
  // ~64k multiply-adds a task at least: a thread's wake-up costs about as much as a small tile's work
  const int64_t grain = std::max<int64_t>(1, 65536 / (kTile * K * M));
  std::vector<Acts> acts(M);
  for (int64_t r = 0; r < M; ++r) acts[r] = Acts{qp + r * K, dp + r * nb, sp + r * nb};
  lagoon::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float out[4 * kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rows = std::min(kTile, n - t * kTile);
      for (int64_t r0 = 0; r0 < M; r0 += 4) {
        const int xrows = static_cast<int>(std::min<int64_t>(4, M - r0));
        tile(w + t * nb * tile_bytes, nb, acts.data() + r0, xrows, out);
        for (int j = 0; j < xrows; ++j) {
          const int64_t r = r0 + j;
          if (f32)
            std::memcpy(static_cast<float*>(yp) + r * n + t * kTile, out + kTile * j, rows * sizeof(float));
          else
            for (int64_t i = 0; i < rows; ++i)
              static_cast<c10::BFloat16*>(yp)[r * n + t * kTile + i] = c10::BFloat16(out[kTile * j + i]);
        }
      }
    }
  });
  return y;
}

at::Tensor q4_matvec(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  const RowsFn tile = isa == 2 ? q4_rows_avx512 : isa == 1 ? one_by_one<tile_avx2> : one_by_one<tile_scalar>;
  return matvec("q4_matvec", x, packed, kTileBytes, n, isa, tile);
}

at::Tensor i8_matvec(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  const RowsFn tile = isa == 2   ? one_by_one<i8tile_avx512>
                      : isa == 1 ? one_by_one<i8tile_avx2>
                                 : one_by_one<i8tile_scalar>;
  return matvec("i8_matvec", x, packed, kI8TileBytes, n, isa, tile);
}

bool has_isa(int64_t isa) { return cpu_has(isa); }

}  // namespace

TORCH_LIBRARY(lagoon, m) {
  m.def("q4_matvec(Tensor x, Tensor packed, int n, int isa) -> Tensor");
  m.def("i8_matvec(Tensor x, Tensor packed, int n, int isa) -> Tensor");
  m.def("cpu_has(int isa) -> bool", has_isa);
}

TORCH_LIBRARY_IMPL(lagoon, CPU, m) {
  m.impl("q4_matvec", q4_matvec);
  m.impl("i8_matvec", i8_matvec);
}
