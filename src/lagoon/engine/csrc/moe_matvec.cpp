// lagoon::q4_moe_matvec and lagoon::i8_moe_matvec: the routed experts of an MoE layer on the tile
// kernels of q4_tiles.h (llama.cpp's mul_mat_id). Each slot (token t, its j-th chosen expert
// e = ids[t, j]) gets y[t, j] = x[t] · W_eᵀ (or x[t, j] · W_eᵀ when every slot brings its own input,
// as the down projection's does), reading only the chosen experts' tiles:
//
//     x [N, K] or [N, k, K] (float32 / bf16), packed [E, N_out/16, K/32, tile bytes] uint8,
//     ids [N, k] int64 in 0..E-1  ->  y [N, k, n] float32
//
// `packed` stacks one weight per expert in `pack_q4`'s (320 bytes a tile and block) or `pack_i8`'s
// (576) layout; an expert's gate and up rows stacked as one [2I, H] weight run as one call. The
// activations are quantized to int8 per block of 32 once per row of x, as the dense op does. Slots are
// grouped by expert (a counting sort), and the work is (expert, tile) pairs over Lagoon's pool (pool.h):
// up to 4 slots of one expert share each unpacked tile on AVX-512 (a prefill's tokens, or a decode
// batch's), and an expert nobody chose costs nothing.
#include "q4_tiles.h"

#include <torch/library.h>

namespace {

at::Tensor moe_matvec(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ids,
                      int64_t tile_bytes, int64_t n, int64_t isa, RowsFn tile) {
  TORCH_CHECK(x.device().is_cpu() && (x.dim() == 2 || x.dim() == 3), op, ": x must be a 2-D or 3-D CPU tensor, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.size(3) == tile_bytes &&
                  packed.is_contiguous(),
              op, ": packed must be contiguous uint8 [E, N/16, K/32, ", tile_bytes, "], got ", packed.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.size(0) == x.size(0), op,
              ": ids must be int64 [N, k] with N = x.size(0), got ", ids.sizes(), " for x ", x.sizes());
  const bool per_slot = x.dim() == 3;
  const int64_t N = ids.size(0), k = ids.size(1), K = x.size(-1), nb = K / kBlock;
  const int64_t E = packed.size(0), nt = packed.size(1);
  TORCH_CHECK(!per_slot || x.size(1) == k, op, ": x [N, k, K] must have k = ", k, " slots, got ", x.sizes());
  TORCH_CHECK(K % kBlock == 0 && packed.size(2) == nb, op, ": x has K = ", K, ", the experts ", packed.size(2) * kBlock);
  TORCH_CHECK(n > (nt - 1) * kTile && n <= nt * kTile, op, ": n = ", n, " does not fit ", nt, " tiles");
  TORCH_CHECK(cpu_has(isa), op, ": this CPU lacks the instructions of kernel ", isa);

  const int64_t S = N * k, R = per_slot ? S : N;  // slots, rows of x
  auto y = at::empty({N, k, n}, x.options().dtype(at::kFloat));
  if (S == 0) return y;

  // slots grouped by expert: order[start[e] .. start[e + 1]) are expert e's slots
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), order(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < E, op, ": expert id ", id[s], " is outside 0..", E - 1);
    ++start[id[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < S; ++s) order[fill[id[s]]++] = s;
  }
  std::vector<int64_t> used;  // experts with at least one slot
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);

  // quantize each row of x once
  const at::Tensor xc = x.contiguous();
  auto qx = at::empty({R, K}, x.options().dtype(at::kChar));
  auto ds = at::empty({2, R, nb}, x.options().dtype(at::kFloat));
  int8_t* qp = qx.data_ptr<int8_t>();
  float* dp = ds.data_ptr<float>();
  float* sp = dp + R * nb;
  lagoon::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (x.scalar_type() == at::kFloat)
        quantize_row(xc.data_ptr<float>() + r * K, K, qp + r * K, dp + r * nb, sp + r * nb);
      else
        quantize_row(xc.data_ptr<c10::BFloat16>() + r * K, K, qp + r * K, dp + r * nb, sp + r * nb);
    }
  });
  std::vector<Acts> acts(S);  // in expert order: an expert's slots are neighbours
  for (int64_t i = 0; i < S; ++i) {
    const int64_t r = per_slot ? order[i] : order[i] / k;
    acts[i] = Acts{qp + r * K, dp + r * nb, sp + r * nb};
  }

  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t items = static_cast<int64_t>(used.size()) * nt;
  // ~64k multiply-adds a task at least (the dense op's rule), counting an item's slots
  const int64_t per_item = kTile * K * std::max<int64_t>(1, S / static_cast<int64_t>(used.size()));
  lagoon::parallel_for(0, items, std::max<int64_t>(1, 65536 / per_item), [&](int64_t i0, int64_t i1) {
    alignas(64) float out[4 * kTile];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t e = used[item / nt], t = item % nt;
      const int64_t rows = std::min(kTile, n - t * kTile);
      const uint8_t* wt = w + ((e * nt) + t) * nb * tile_bytes;
      for (int64_t i = start[e]; i < start[e + 1]; i += 4) {
        const int xrows = static_cast<int>(std::min<int64_t>(4, start[e + 1] - i));
        tile(wt, nb, acts.data() + i, xrows, out);
        for (int j = 0; j < xrows; ++j)
          std::memcpy(yp + order[i + j] * n + t * kTile, out + kTile * j, rows * sizeof(float));
      }
    }
  });
  return y;
}

at::Tensor q4_moe_matvec(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ids, int64_t n, int64_t isa) {
  const RowsFn tile = isa == 2 ? q4_rows_avx512 : isa == 1 ? one_by_one<tile_avx2> : one_by_one<tile_scalar>;
  return moe_matvec("q4_moe_matvec", x, packed, ids, kTileBytes, n, isa, tile);
}

at::Tensor i8_moe_matvec(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ids, int64_t n, int64_t isa) {
  const RowsFn tile = isa == 2   ? one_by_one<i8tile_avx512>
                      : isa == 1 ? one_by_one<i8tile_avx2>
                                 : one_by_one<i8tile_scalar>;
  return moe_matvec("i8_moe_matvec", x, packed, ids, kI8TileBytes, n, isa, tile);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lagoon, m) {
  m.def("q4_moe_matvec(Tensor x, Tensor packed, Tensor ids, int n, int isa) -> Tensor");
  m.def("i8_moe_matvec(Tensor x, Tensor packed, Tensor ids, int n, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(lagoon, CPU, m) {
  m.impl("q4_moe_matvec", q4_moe_matvec);
  m.impl("i8_moe_matvec", i8_moe_matvec);
}
