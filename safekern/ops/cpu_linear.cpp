// Decode-step linear layers on CPU: y_i = x @ W_i^T (+ b_i) for a few rows x (M small).
//
// Why: at decode time a GEMM has M = a few rows (the token row, plus the [CLS] row when a
// sequence re-evaluates) and is bound by reading W. MKL's small-M sgemm re-reads W per row on
// this kind of CPU, so two rows cost about twice one row. Here each tile of NB weight rows is
// loaded from memory once and multiplied by every activation row while it sits in L1: the
// cost of extra rows is FMAs, not DRAM traffic.
//
// Layout: W_i (N_i, K) row-major (nn.Linear's own weight, no copy, no prepacking), x (M, K)
// with unit stride in K, y_i (M, N_i) fresh. Several weights sharing x (q/k/v, gate/up) run in
// one call: one parallel loop over all their row tiles.
// Numerics: fp32 FMA, per output 8 lane-partial sums over K then a fixed-order horizontal
// sum; a row's result never depends on the other rows (same bits at M = 1 and M = 2B).
// AVX2 + FMA only (the Python side checks the CPU); no AVX-512 dependency.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <vector>

namespace {

constexpr int NB = 8;  // weight rows per parallel tile: 8 FMA chains at M = 1
constexpr int NB2 = 4; // weight rows per inner block at M >= 2 (4 x 2 accumulators + 4 loads)
constexpr int MB = 2;  // activation rows per inner block

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] for weight rows n < nb and activation rows m < mb. ``pf`` streams the next tile's
// weights into the cache while this one computes (two 64-byte lines per 8-float step, which
// covers a tile of the same size): the loop then waits on FMAs, not on memory latency.
template <int nb, int mb>
inline void block(const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                  int64_t ldy, const float* bias, const char* pf, const char* pf_end) {
  __m256 acc[nb][mb];
  for (int n = 0; n < nb; ++n)
    for (int m = 0; m < mb; ++m) acc[n][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int l = 0; l < nb / 2 && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
    if (mb == 1) {
      __m256 xv = _mm256_loadu_ps(x + k);
      for (int n = 0; n < nb; ++n)
        acc[n][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + n * K + k), xv, acc[n][0]);
    } else {
      __m256 wv[nb];
      for (int n = 0; n < nb; ++n) wv[n] = _mm256_loadu_ps(w + n * K + k);
      for (int m = 0; m < mb; ++m) {
        __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
        for (int n = 0; n < nb; ++n) acc[n][m] = _mm256_fmadd_ps(wv[n], xv, acc[n][m]);
      }
    }
  }
  for (int n = 0; n < nb; ++n) {
    for (int m = 0; m < mb; ++m) {
      float s = hsum(acc[n][m]);
      for (int64_t kk = k; kk < K; ++kk) s += w[n * K + kk] * x[m * ldx + kk];
      y[m * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

// Weight rows [n0, n1) of w (n1 - n0 <= NB) times every row of x.
void tile(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, int64_t n0,
          int64_t n1, int64_t N, float* y, int64_t ldy, const float* bias) {
  const char* pf = reinterpret_cast<const char*>(w + n1 * K);
  const char* pf_end = reinterpret_cast<const char*>(w + std::min(N, n1 + NB) * K);
  const float* b = bias ? bias + n0 : nullptr;
  if (n1 - n0 == NB && M == 1) {
    block<NB, 1>(x, ldx, w + n0 * K, K, y + n0, ldy, b, pf, pf_end);
    return;
  }
  int64_t n = n0;
  for (; n + NB2 <= n1; n += NB2) {
    const float* bn = bias ? bias + n : nullptr;
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      block<NB2, MB>(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, bn, pf, pf_end);
    if (m < M) block<NB2, 1>(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, bn, pf, pf);
    pf += NB2 * K * sizeof(float);  // the next block prefetches the rest of the next tile
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      block<1, 1>(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy,
                  bias ? bias + n : nullptr, pf, pf);
}

std::vector<at::Tensor> linear(const at::Tensor& x, at::TensorList weights,
                               const c10::List<std::optional<at::Tensor>>& biases) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "cpu_linear: x must be a (M, K) float32 tensor with unit stride in K");
  TORCH_CHECK(biases.size() == weights.size(), "cpu_linear: one bias (or None) per weight");
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  std::vector<at::Tensor> out;
  std::vector<int64_t> tile_end;  // cumulative NB-row tiles over all weights
  std::vector<const float*> bias_ptr;
  int64_t tiles = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kFloat &&
                    w.is_contiguous(),
                "cpu_linear: weight ", i, " must be a contiguous (N, ", K, ") float32 tensor");
    std::optional<at::Tensor> b = biases.get(i);
    TORCH_CHECK(!b || (b->dim() == 1 && b->size(0) == w.size(0) && b->is_contiguous() &&
                       b->scalar_type() == at::kFloat),
                "cpu_linear: bias ", i, " must be a contiguous (N,) float32 tensor");
    bias_ptr.push_back(b ? b->data_ptr<float>() : nullptr);
    out.push_back(at::empty({M, w.size(0)}, x.options()));
    tiles += (w.size(0) + NB - 1) / NB;
    tile_end.push_back(tiles);
  }
  const float* xp = x.data_ptr<float>();
  // A chunk of at least ~64k multiply-adds: below that a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 65536 / (NB * K * std::max<int64_t>(M, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    int64_t start = 0;
    while (t0 < t1) {
      while (tile_end[i] <= t0) start = tile_end[i++];
      const int64_t stop = std::min(t1, tile_end[i]);
      const at::Tensor& w = weights[i];
      const int64_t N = w.size(0);
      for (int64_t t = t0; t < stop; ++t)
        tile(xp, ldx, M, w.data_ptr<float>(), K, (t - start) * NB,
             std::min(N, (t - start + 1) * NB), N, out[i].data_ptr<float>(), N, bias_ptr[i]);
      t0 = stop;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(safekern_cpu, m) {
  m.def("linear(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor[]", &linear);
}
