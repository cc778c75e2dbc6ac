// lagoon::decode_attention: one new token per sequence (T = 1) attending over its cached keys and
// values, read straight from the KV pools through each sequence's slot list (no gather copy):
//
//     out[b, h] = Σ_{j <= pos[b]} softmax_j(scale · q[b, h] · k[slot[b, j], h / G]) · v[slot[b, j], h / G]
//
// q [B, H, D] (float32 or bf16, any strides), k [N, K, D] and v [N, K, Dv] pools (float32 or bf16,
// last dim contiguous; a paged cache's slots, or a contiguous cache's rows x positions flattened),
// slots [B, S] int64 (slot of position j of sequence b; S >= pos[b] + 1), pos [B] int64 (the query's
// absolute position: it sees keys 0..pos[b]), G = H / K query heads per kv head (grouped-query
// attention, as SDPA's enable_gqa). out [B, H, Dv] in q's dtype.
//
// fp32 accumulation, online softmax over tiles of 32 positions; the G query heads of a kv head share
// each key / value row while it is in L1 (a row is widened to fp32 once). Work items are (sequence,
// chunk of positions); long sequences split into chunks whose partial (max, sum, acc) are merged at
// the end (flash-decoding), so 2+ threads share even a single sequence.
// `isa` 2 / 1 / 0 compiles the same loops for AVX-512, AVX2 + FMA or the portable target (the
// caller picks, this file checks the CPU). exp is a polynomial (Cephes' exp2f, ~1e-7 relative).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileJ = 32;     // positions per softmax tile
constexpr int64_t kMaxD = 512;     // head dims up to this (stack buffers)
constexpr int64_t kMaxH = 256;     // query heads up to this

bool attn_cpu_has(int64_t isa) {
  if (isa == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == 0;
}

// e^x for x <= 0 (softmax after the max is taken out); 0 below -87
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (|t| < 2^22)
  const float f = t - n;                          // [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const int32_t e = (int32_t(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, 4);
  return x < -87.f ? 0.f : p * s;
}

struct Job {
  const float* q;       // [B, H, D] fp32, scaled
  const void* k;        // pool base
  const void* v;
  int64_t k_slot, k_head, v_slot, v_head;  // strides in elements
  const int64_t* slots; // [B, S]
  const int64_t* len;   // [B]
  int64_t S, K, G, D, Dv, chunk, nchunk;
  float* part;          // [B, nchunk, H, Dv + 2]: acc, max, sum
};

template <int L>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * L), aligned(4)));
  typedef uint16_t h __attribute__((vector_size(2 * L), aligned(2)));
  typedef uint32_t u __attribute__((vector_size(4 * L), aligned(4)));
};
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef float v4f __attribute__((vector_size(16), aligned(4)));

template <int L>
__attribute__((always_inline)) inline typename Lanes<L>::f load(const float* p) {
  typename Lanes<L>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int L>
__attribute__((always_inline)) inline typename Lanes<L>::f load(const c10::BFloat16* p) {
  typename Lanes<L>::h x;
  std::memcpy(&x, p, sizeof x);
  return (typename Lanes<L>::f)(__builtin_convertvector(x, typename Lanes<L>::u) << 16);  // bf16: fp32's upper half
}

// a tree (the serial sum's chain of L dependent adds cost 3x the whole kernel's time)
__attribute__((always_inline)) inline float hsum(v4f b) { return (b[0] + b[2]) + (b[1] + b[3]); }
__attribute__((always_inline)) inline float hsum(v8f a) {
  return hsum(__builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7));
}
__attribute__((always_inline)) inline float hsum(Lanes<16>::f v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// one (sequence, chunk of positions): partial softmax state of all H query heads. A position's
// row (every kv head) is read once, in order, and the rows a few positions ahead are prefetched:
// the pools are far larger than the caches and a step's weights evict them between layers. L > 1:
// D and Dv are multiples of L (L-float vectors); L = 1: plain loops
template <typename KV, int L>
__attribute__((always_inline)) inline void attend_chunk(const Job& job, int64_t item) {
  const int64_t c = item % job.nchunk, b = item / job.nchunk;
  const int64_t K = job.K, G = job.G, H = K * G, D = job.D, Dv = job.Dv, W = Dv + 2;
  float* acc = job.part + item * H * W;  // [H, Dv + 2]: acc, then max and sum
  alignas(64) float kf[kMaxD];
  alignas(64) float s[kMaxH * kTileJ];
  float m[kMaxH], l[kMaxH];
  for (int64_t h = 0; h < H; ++h) {
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
    std::fill(acc + h * W, acc + h * W + Dv, 0.f);
  }
  const float* q = job.q + b * H * D;  // kv head kh's G query heads are kh·G ..
  const KV* kp = static_cast<const KV*>(job.k);
  const KV* vp = static_cast<const KV*>(job.v);
  const int64_t* slot = job.slots + b * job.S;
  const int64_t j0 = c * job.chunk, j1 = std::min(job.len[b], j0 + job.chunk);
  const int64_t krow = ((K - 1) * job.k_head + D) * int64_t(sizeof(KV));  // bytes of a slot's keys
  const int64_t vrow = ((K - 1) * job.v_head + Dv) * int64_t(sizeof(KV));
  constexpr int64_t kAhead = 6;
  for (int64_t t0 = j0; t0 < j1; t0 += kTileJ) {
    const int64_t n = std::min(kTileJ, j1 - t0);
    for (int64_t j = 0; j < n; ++j) {
      if (t0 + j + kAhead < j1) {
        const char* pk = reinterpret_cast<const char*>(kp + slot[t0 + j + kAhead] * job.k_slot);
        const char* pv = reinterpret_cast<const char*>(vp + slot[t0 + j + kAhead] * job.v_slot);
        for (int64_t o = 0; o < krow; o += 64) __builtin_prefetch(pk + o);
        for (int64_t o = 0; o < vrow; o += 64) __builtin_prefetch(pv + o);
      }
      for (int64_t kh = 0; kh < K; ++kh) {
        const KV* kr = kp + slot[t0 + j] * job.k_slot + kh * job.k_head;
        const float* qk = q + kh * G * D;
        float* sk = s + kh * G * kTileJ;
        if constexpr (L > 1) {
          for (int64_t d = 0; d < D; d += L) {
            const auto x = load<L>(kr + d);
            std::memcpy(kf + d, &x, sizeof x);
          }
          for (int64_t g = 0; g < G; ++g) {
            auto a = load<L>(qk + g * D) * load<L>(kf);
            for (int64_t d = L; d < D; d += L) a += load<L>(qk + g * D + d) * load<L>(kf + d);
            sk[g * kTileJ + j] = hsum(a);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) kf[d] = float(kr[d]);
          for (int64_t g = 0; g < G; ++g) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qk[g * D + d] * kf[d];
            sk[g * kTileJ + j] = dot;
          }
        }
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      float* sh = s + h * kTileJ;
      float mt = m[h];
      for (int64_t j = 0; j < n; ++j) mt = std::max(mt, sh[j]);
      const float corr = m[h] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpos(m[h] - mt);
      for (int64_t j = 0; j < n; ++j) sh[j] = exp_nonpos(sh[j] - mt);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += sh[j];
      l[h] = l[h] * corr + sum;
      m[h] = mt;
      if (corr != 1.f)
        for (int64_t d = 0; d < Dv; ++d) acc[h * W + d] *= corr;
    }
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t kh = 0; kh < K; ++kh) {
        const KV* vr = vp + slot[t0 + j] * job.v_slot + kh * job.v_head;
        if constexpr (L > 1) {
          for (int64_t d = 0; d < Dv; d += L) {
            const auto x = load<L>(vr + d);
            for (int64_t g = kh * G; g < (kh + 1) * G; ++g) {
              const auto y = load<L>(acc + g * W + d) + s[g * kTileJ + j] * x;
              std::memcpy(acc + g * W + d, &y, sizeof y);
            }
          }
        } else {
          for (int64_t g = kh * G; g < (kh + 1) * G; ++g) {
            const float p = s[g * kTileJ + j];
            for (int64_t d = 0; d < Dv; ++d) acc[g * W + d] += p * float(vr[d]);
          }
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    acc[h * W + Dv] = m[h];
    acc[h * W + Dv + 1] = l[h];
  }
}

template <typename KV, int L>
__attribute__((always_inline)) inline void run_lanes(const Job& job, int64_t i0, int64_t i1) {
  if (job.D % L == 0 && job.Dv % L == 0)
    for (int64_t i = i0; i < i1; ++i) attend_chunk<KV, L>(job, i);
  else
    for (int64_t i = i0; i < i1; ++i) attend_chunk<KV, 1>(job, i);
}

template <typename KV>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void run_avx512(const Job& job, int64_t i0, int64_t i1) {
  run_lanes<KV, 16>(job, i0, i1);
}

template <typename KV>
__attribute__((target("avx2,fma"))) void run_avx2(const Job& job, int64_t i0, int64_t i1) {
  run_lanes<KV, 8>(job, i0, i1);
}

template <typename KV>
void run_portable(const Job& job, int64_t i0, int64_t i1) {
  run_lanes<KV, 4>(job, i0, i1);
}

template <typename KV>
void run(const Job& job, int64_t isa, int64_t i0, int64_t i1) {
  if (isa == 2) return run_avx512<KV>(job, i0, i1);
  if (isa == 1) return run_avx2<KV>(job, i0, i1);
  run_portable<KV>(job, i0, i1);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                            const at::Tensor& pos, double scale, int64_t isa) {
  const char* op = "decode_attention";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q [B, H, D], k [N, K, D], v [N, K, Dv] expected, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op, ": q must be float32 or bf16");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              op, ": k and v must both be float32 or both bf16, got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, op, ": the pools' last dim must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), N = k.size(0), K = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(2) == D && v.size(0) == N && v.size(1) == K, op, ": q ", q.sizes(), " does not fit k ", k.sizes(),
              " / v ", v.sizes());
  TORCH_CHECK(K > 0 && H % K == 0 && H <= kMaxH && D <= kMaxD && Dv <= kMaxD, op,
              ": unsupported heads / dims (H ", H, ", K ", K, ", D ", D, ", Dv ", Dv, ")");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.scalar_type() == at::kLong, op,
              ": slots must be int64 [B, S], got ", slots.sizes(), " ", slots.scalar_type());
  TORCH_CHECK(pos.numel() == B && pos.scalar_type() == at::kLong, op, ": pos must be int64 with B elements");
  TORCH_CHECK(attn_cpu_has(isa), op, ": this CPU lacks the instructions of kernel ", isa);
  const int64_t S = slots.size(1), G = H / K;
  const at::Tensor sl = slots.contiguous();
  const at::Tensor ps = pos.reshape({B}).contiguous();
  std::vector<int64_t> len(B);
  const int64_t* pp0 = ps.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    len[b] = pp0[b] + 1;
    TORCH_CHECK(len[b] >= 1 && len[b] <= S, op, ": sequence ", b, " at position ", len[b] - 1, " needs ", len[b],
                " slots, given ", S);
    for (int64_t j = 0; j < len[b]; ++j)
      TORCH_CHECK(sp[b * S + j] >= 0 && sp[b * S + j] < N, op, ": slot ", sp[b * S + j], " outside the pool of ", N);
    longest = std::max(longest, len[b]);
  }
  std::vector<float> qf(B * H * D);  // fp32, scaled, [B, H, D] contiguous
  const float* q32 = q.scalar_type() == at::kFloat ? q.data_ptr<float>() : nullptr;
  const c10::BFloat16* q16 = q32 ? nullptr : q.data_ptr<c10::BFloat16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t off = b * qs0 + h * qs1 + d * qs2;
        qf[(b * H + h) * D + d] = (q32 ? q32[off] : float(q16[off])) * float(scale);
      }

  // one task for short work (a thread's wake-up costs about 64k multiply-adds: measured no faster
  // at 2 threads than at 1 below ~200k); else chunks of >= 64 positions, 4+ tasks a thread
  const int64_t threads = at::get_num_threads();
  const int64_t total = B * H * longest * (D + Dv);
  int64_t nchunk = 1;
  if (threads > 1 && total >= (int64_t(1) << 18))
    nchunk = std::max<int64_t>(1, std::min((longest + 63) / 64, (4 * threads + B - 1) / B));
  const int64_t chunk = (longest + nchunk - 1) / nchunk;
  std::vector<float> part(B * nchunk * H * (Dv + 2));
  Job job{qf.data(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
          sp, len.data(), S, K, G, D, Dv, chunk, nchunk, part.data()};
  const int64_t items = B * nchunk;
  const int64_t grain = total >= (int64_t(1) << 18) ? 1 : items + 1;  // parallel_for runs a range < grain inline
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  lagoon::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    if (bf16)
      run<c10::BFloat16>(job, isa, i0, i1);
    else
      run<float>(job, isa, i0, i1);
  });

  // merge the chunks of each (sequence, head)
  auto out = at::empty({B, H, Dv}, q.options());
  const float* pp = part.data();
  std::vector<float> o(Dv);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto at_chunk = [&](int64_t c) { return pp + ((b * nchunk + c) * H + h) * (Dv + 2); };
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < nchunk; ++c)
        if (at_chunk(c)[Dv + 1] > 0.f) mx = std::max(mx, at_chunk(c)[Dv]);
      std::fill(o.begin(), o.end(), 0.f);
      float sum = 0.f;
      for (int64_t c = 0; c < nchunk; ++c) {
        const float* p = at_chunk(c);
        if (!(p[Dv + 1] > 0.f)) continue;  // an empty chunk (a shorter sequence)
        const float w = std::exp(p[Dv] - mx);
        sum += w * p[Dv + 1];
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * p[d];
      }
      const float inv = 1.f / sum;
      if (q.scalar_type() == at::kFloat) {
        float* dst = out.data_ptr<float>() + (b * H + h) * Dv;
        for (int64_t d = 0; d < Dv; ++d) dst[d] = o[d] * inv;
      } else {
        c10::BFloat16* dst = out.data_ptr<c10::BFloat16>() + (b * H + h) * Dv;
        for (int64_t d = 0; d < Dv; ++d) dst[d] = c10::BFloat16(o[d] * inv);
      }
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lagoon, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor pos, float scale, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(lagoon, CPU, m) { m.impl("decode_attention", decode_attention); }
