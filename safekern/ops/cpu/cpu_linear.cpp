// Decode-step linear layers on CPU: y_i = x @ W_i^T (+ b_i) for a few rows x (M small).
//
// Why: at decode time a GEMM has M = a few rows (the token row, plus the [CLS] row when a
// sequence re-evaluates) and is bound by reading W. MKL's small-M sgemm re-reads W per row at
// some M on this kind of CPU (M = 4-8 cost ~1.6-2x M = 1 here). Here each tile of NB weight
// rows is loaded from memory once and multiplied by every activation row while it sits in L1:
// the cost of extra rows is FMAs, not DRAM traffic. (Which path wins at which M is measured
// by safekern.ops.cpu.decode_linear on first use, not assumed.)
//
// Layout: W_i (N_i, K) row-major (nn.Linear's own weight, no copy, no prepacking), x (M, K)
// with unit stride in K, y_i (M, N_i) fresh. Several weights sharing x (q/k/v, gate/up) run in
// one call: one parallel loop over all their row tiles.
// Numerics: fp32 FMA, per output 8 (AVX2) or 16 (AVX-512) lane-partial sums over K then a
// fixed-order horizontal sum; a row's result never depends on the other rows (same bits at
// M = 1 and M = 2B). AVX2 + FMA is required (the Python side checks the CPU); the AVX-512
// tiles run where the CPU has AVX-512F (cpu_linear_tile.h holds the tile code of both).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int NB = 8;  // weight rows per parallel tile: 8 FMA chains at M = 1

namespace avx2 {
using vec = __m256;
constexpr int W = 8;
constexpr int NB2 = 4;  // 4 x 3 accumulators + 4 weight registers (x from memory): 16 ymm
constexpr int MB = 3;
constexpr bool WIDE2 = false;  // 8 x 2 accumulators + 8 weights would spill 16 ymm
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
constexpr int MR = 6;   // packed path: 6 x 2 accumulators + 2 weights + 1 broadcast: 15 ymm
inline float vsum(vec v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#include "cpu_linear_tile.h"
#include "cpu_linear_packed.h"
}  // namespace avx2

// The same tiles with 16-lane registers and 32 of them (4 x 4 blocks at M >= 2): at M = 8-32
// the AVX2 blocks are FMA-bound below MKL's rate; this doubles the FMA width. Compiled for
// AVX-512F here and called only where the CPU reports it (``isa`` argument, checked).
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
using vec = __m512;
constexpr int W = 16;
constexpr int NB2 = 4;
constexpr int MB = 4;
constexpr bool WIDE2 = true;   // 8 x 2 accumulators + 8 weights: 24 of 32 zmm
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
constexpr int MR = 8;   // packed path: 8 x 2 accumulators + 2 weights + 1 broadcast: 19 zmm
inline float vsum(vec v) {  // fixed order: halves, then the 8-lane sum of the AVX2 path
  const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), upper);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#include "cpu_linear_tile.h"
#include "cpu_linear_packed.h"
}  // namespace avx512
#pragma GCC pop_options

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }

void check_isa(int64_t isa) {
  TORCH_CHECK(isa == 0 || (isa == 1 && has_avx512()),
              "cpu_linear: isa must be 0 (AVX2) or 1 (AVX-512, on a CPU that has it), got ", isa);
}

// x (..., K) checked and read as (M, K), M the product of the leading dims.
at::Tensor rows_of(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 2 && x_in.scalar_type() == at::kFloat &&
                  x_in.stride(-1) == 1,
              "cpu_linear: x must be a (..., M, K) float32 CPU tensor with unit stride in K");
  const at::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  TORCH_CHECK(x.stride(1) == 1, "cpu_linear: x must have unit stride in K");
  return x;
}

// Bias i (or nullptr): a contiguous (N,) float32 CPU tensor.
const float* bias_of(const c10::List<std::optional<at::Tensor>>& biases, size_t i, int64_t N) {
  std::optional<at::Tensor> b = biases.get(i);
  TORCH_CHECK(!b || (b->device().is_cpu() && b->dim() == 1 && b->size(0) == N &&
                     b->is_contiguous() && b->scalar_type() == at::kFloat),
              "cpu_linear: bias ", i, " must be a contiguous (N,) float32 tensor");
  return b ? b->data_ptr<float>() : nullptr;
}

// One parallel loop over the work items of several weights: ends[i] is the cumulative item
// count up to weight i; run(i, j) does item j of weight i.
template <typename Run>
void for_each_item(const std::vector<int64_t>& ends, int64_t grain, const Run& run) {
  at::parallel_for(0, ends.empty() ? 0 : ends.back(), grain, [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    int64_t start = 0;
    while (t0 < t1) {
      while (ends[i] <= t0) start = ends[i++];
      const int64_t stop = std::min(t1, ends[i]);
      for (int64_t t = t0; t < stop; ++t) run(i, t - start);
      t0 = stop;
    }
  });
}

// isa: 0 = AVX2 + FMA, 1 = AVX-512F (see isas()).
// x (..., K) is read as (M, K), M the product of the leading dims; each y_i is (..., N_i).
std::vector<at::Tensor> linear(const at::Tensor& x_in, at::TensorList weights,
                               const c10::List<std::optional<at::Tensor>>& biases, int64_t isa) {
  check_isa(isa);
  const at::Tensor x = rows_of(x_in);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  TORCH_CHECK(biases.size() == weights.size(), "cpu_linear: one bias (or None) per weight");
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  std::vector<at::Tensor> out;
  std::vector<int64_t> tile_end;  // cumulative NB-row tiles over all weights
  std::vector<const float*> bias_ptr;
  int64_t tiles = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(1) == K &&
                    w.scalar_type() == at::kFloat && w.is_contiguous(),
                "cpu_linear: weight ", i, " must be a contiguous (N, ", K, ") float32 tensor");
    bias_ptr.push_back(bias_of(biases, i, w.size(0)));
    out_shape.back() = w.size(0);
    out.push_back(at::empty(out_shape, x.options()));
    tiles += (w.size(0) + NB - 1) / NB;
    tile_end.push_back(tiles);
  }
  const float* xp = x.data_ptr<float>();
  // A chunk of at least ~64k multiply-adds: below that a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 65536 / (NB * K * std::max<int64_t>(M, 1)));
  auto tile = isa == 1 ? avx512::tile : avx2::tile;
  for_each_item(tile_end, grain, [&](size_t i, int64_t j) {
    const int64_t N = weights[i].size(0);
    tile(xp, ldx, M, weights[i].data_ptr<float>(), K, j * NB, std::min(N, (j + 1) * NB), N,
         out[i].data_ptr<float>(), N, bias_ptr[i]);
  });
  return out;
}

// The packed-panel path: packs[i] is weight i as (NP, K, P) panels (P = 32 for AVX-512, 16 for
// AVX2; see cpu_linear_packed.h and cpu_linear.pack), ns[i] its number of outputs N.
std::vector<at::Tensor> packed_linear(const at::Tensor& x_in, at::TensorList packs,
                                      at::IntArrayRef ns,
                                      const c10::List<std::optional<at::Tensor>>& biases,
                                      int64_t isa) {
  check_isa(isa);
  const at::Tensor x = rows_of(x_in);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  TORCH_CHECK(biases.size() == packs.size() && ns.size() == packs.size(),
              "cpu_linear: one N and one bias (or None) per packed weight");
  const int64_t P = isa == 1 ? 2 * avx512::W : 2 * avx2::W;
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  std::vector<at::Tensor> out;
  std::vector<int64_t> panel_end;  // cumulative panels over all weights
  std::vector<const float*> bias_ptr;
  int64_t panels = 0;
  for (size_t i = 0; i < packs.size(); ++i) {
    const at::Tensor& w = packs[i];
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 3 && w.size(1) == K && w.size(2) == P &&
                    ns[i] > 0 && w.size(0) == (ns[i] + P - 1) / P &&
                    w.scalar_type() == at::kFloat && w.is_contiguous(),
                "cpu_linear: packed weight ", i, " must be a contiguous float32 CPU (",
                (ns[i] + P - 1) / P, ", ", K, ", ", P, ") tensor, got ", w.sizes());
    bias_ptr.push_back(bias_of(biases, i, ns[i]));
    out_shape.back() = ns[i];
    out.push_back(at::empty(out_shape, x.options()));
    panels += w.size(0);
    panel_end.push_back(panels);
  }
  const float* xp = x.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (P * K * std::max<int64_t>(M, 1)));
  auto panel = isa == 1 ? avx512::packed_panel : avx2::packed_panel;
  for_each_item(panel_end, grain, [&](size_t i, int64_t j) {
    panel(xp, ldx, M, packs[i].data_ptr<float>(), K, j, ns[i], out[i].data_ptr<float>(), ns[i],
          bias_ptr[i]);
  });
  return out;
}

// out (NP, K, P) = the panels of w (N, K): out[p, k, j] = w[p P + j, k] (0 past N). One
// panel's P weight rows stay in L1 while it is written in order: a pass at copy speed.
void pack_weight(const at::Tensor& w, const at::Tensor& out) {
  TORCH_CHECK(w.device().is_cpu() && out.device().is_cpu() && w.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_contiguous() && out.dim() == 3 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.size(1) == w.size(1) && out.size(0) == (w.size(0) + out.size(2) - 1) /
                  out.size(2),
              "cpu_linear: pack needs a contiguous float32 CPU w (N, K) and out "
              "(ceil(N/P), K, P)");
  const int64_t N = w.size(0), K = w.size(1), NP = out.size(0), P = out.size(2);
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min<int64_t>(P, N - p * P);
      const float* rows = src + p * P * K;
      float* panel = dst + p * K * P;
      for (int64_t k = 0; k < K; ++k) {
        float* o = panel + k * P;
        for (int64_t j = 0; j < cols; ++j) o[j] = rows[j * K + k];
        for (int64_t j = cols; j < P; ++j) o[j] = 0.f;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(safekern_cpu, m) {
  m.def("pack_weight(Tensor w, Tensor(a!) out) -> ()", &pack_weight);
  m.def("packed_linear(Tensor x, Tensor[] packs, int[] ns, Tensor?[] biases, int isa) -> "
        "Tensor[]", &packed_linear);
  m.def("linear(Tensor x, Tensor[] weights, Tensor?[] biases, int isa) -> Tensor[]", &linear);
  m.def("isas() -> str", [] { return std::string(has_avx512() ? "avx2,avx512" : "avx2"); });
}
