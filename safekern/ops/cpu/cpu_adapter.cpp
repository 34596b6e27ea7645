// The [CLS] adapter's deltas on CPU: y_i[b, col] += scale * (x[b, col] @ A_i) @ B_i for every
// target i of one projection group (q/k/v, o, gate/up, down), in one call (issue 31).
//
// The definition is safekern/safety/adapter.py (ClsAdapter.delta + AdaptedLinears._add, the torch
// path, which stays the reference and runs wherever this op cannot). What it saves is dispatch:
// the torch path is ~6 small ops per target (slice, two thin matmuls, scale, slice, add), 42 per
// layer, ~10 ms per SmolLM2 decode step at batch 1 for ~4 MFLOP of work. Here the work is two
// loops per target (rank r is small: 8-64): u = x @ A, for ranks 8/16/32/64 in register blocks
// of rows (xa_rows), and y += (s * u) @ B, vectorised by the compiler.
//
// Only the [CLS] column `col` of each output is written; every other row of every output is left
// untouched, so token rows stay bitwise the base projection's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

// u[b] = x[b] @ A for RB rows at once, A's rank r = 8 * RV: the RB * RV accumulators stay in
// registers, so the rows' FMA chains over k run side by side instead of one row after the
// other (each chain is latency-bound: K dependent FMAs). Every u[b][j] is the same sequence of
// fused multiply-adds over k = 0..K-1 as the scalar loop below, so the bits are the same.
template <int RV, int RB>
inline void xa_rows(const float* const* xr, const float* __restrict ap, int64_t K, float* u) {
  __m256 acc[RB][RV];
  for (int b = 0; b < RB; ++b)
    for (int v = 0; v < RV; ++v) acc[b][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 a[RV];
    for (int v = 0; v < RV; ++v) a[v] = _mm256_loadu_ps(ap + (k * RV + v) * 8);
    for (int b = 0; b < RB; ++b) {
      const __m256 xv = _mm256_set1_ps(xr[b][k]);
      for (int v = 0; v < RV; ++v) acc[b][v] = _mm256_fmadd_ps(xv, a[v], acc[b][v]);
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int v = 0; v < RV; ++v) _mm256_storeu_ps(u + b * RV * 8 + v * 8, acc[b][v]);
}

// Rows [0, B) of u = X @ A in blocks of RB (then single rows).
template <int RV, int RB>
void xa_all(const float* const* xr, int64_t B, const float* ap, int64_t K, float* u) {
  int64_t b = 0;
  for (; b + RB <= B; b += RB) xa_rows<RV, RB>(xr + b, ap, K, u + b * RV * 8);
  for (; b < B; ++b) xa_rows<RV, 1>(xr + b, ap, K, u + b * RV * 8);
}

// u = X @ A through the register-blocked path; false when the rank has none (r not 8/16/32/64).
bool xa_fast(const float* const* xr, int64_t B, const float* ap, int64_t K, int64_t r,
             float* u) {
  switch (r) {
    case 8: xa_all<1, 4>(xr, B, ap, K, u); return true;
    case 16: xa_all<2, 4>(xr, B, ap, K, u); return true;
    case 32: xa_all<4, 2>(xr, B, ap, K, u); return true;
    case 64: xa_all<8, 1>(xr, B, ap, K, u); return true;
    default: return false;
  }
}

void adapter_add(const at::Tensor& x, int64_t col, at::TensorList ys, at::TensorList As,
                 at::TensorList Bs, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.stride(2) == 1,
              "adapter_add: x must be a (B, L, K) float32 CPU tensor, unit stride in K");
  const int64_t B = x.size(0), L = x.size(1), K = x.size(2);
  TORCH_CHECK(col >= 0 && col < L, "adapter_add: col ", col, " out of range for L = ", L);
  TORCH_CHECK(ys.size() == As.size() && ys.size() == Bs.size(),
              "adapter_add: ys, As and Bs must have the same length");
  const float s = static_cast<float>(scale);
  const float* xp = x.data_ptr<float>();
  std::vector<float> u;
  std::vector<const float*> xr(B);                 // the [CLS] row of each batch row
  for (int64_t b = 0; b < B; ++b) xr[b] = xp + b * x.stride(0) + col * x.stride(1);
  for (size_t i = 0; i < ys.size(); ++i) {
    const at::Tensor &y = ys[i], &A = As[i], &Bm = Bs[i];
    TORCH_CHECK(A.dim() == 2 && A.size(0) == K && A.scalar_type() == at::kFloat &&
                    A.is_contiguous() && A.device().is_cpu(),
                "adapter_add: As[", i, "] must be a contiguous (", K, ", r) float32 CPU tensor");
    const int64_t r = A.size(1);
    TORCH_CHECK(Bm.dim() == 2 && Bm.size(0) == r && Bm.scalar_type() == at::kFloat &&
                    Bm.is_contiguous() && Bm.device().is_cpu(),
                "adapter_add: Bs[", i, "] must be a contiguous (", r, ", N) float32 CPU tensor");
    const int64_t N = Bm.size(1);
    TORCH_CHECK(y.dim() == 3 && y.size(0) == B && y.size(1) == L && y.size(2) == N &&
                    y.scalar_type() == at::kFloat && y.device().is_cpu() && y.stride(2) == 1,
                "adapter_add: ys[", i, "] must be a (", B, ", ", L, ", ", N,
                ") float32 CPU tensor, unit stride in N");
    const float* __restrict ap = A.data_ptr<float>();
    const float* __restrict bp = Bm.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    u.assign(B * r, 0.f);
    if (!xa_fast(xr.data(), B, ap, K, r, u.data())) {
      for (int64_t b = 0; b < B; ++b) {
        float* __restrict up = u.data() + b * r;
        for (int64_t k = 0; k < K; ++k) {        // u = x_row @ A (over r: vectorised)
          const float xv = xr[b][k];
          const float* __restrict ak = ap + k * r;
          for (int64_t j = 0; j < r; ++j) up[j] += xv * ak[j];
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict up = u.data() + b * r;
      float* __restrict yr = yp + b * y.stride(0) + col * y.stride(1);
      for (int64_t j = 0; j < r; ++j) {          // y_row += (s * u) @ B (over N: vectorised)
        const float uj = s * up[j];
        const float* __restrict bj = bp + j * N;
        for (int64_t n = 0; n < N; ++n) yr[n] += uj * bj[n];
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(safekern_cpu, m) {
  m.def("adapter_add(Tensor x, int col, Tensor(a!)[] ys, Tensor[] As, Tensor[] Bs, "
        "float scale) -> ()", &adapter_add);
}
