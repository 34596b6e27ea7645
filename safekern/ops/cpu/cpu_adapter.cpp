// The [CLS] adapter's deltas on CPU: y_i[b, col] += scale * (x[b, col] @ A_i) @ B_i for every
// target i of one projection group (q/k/v, o, gate/up, down), in one call (issue 31).
//
// The definition is safekern/safety/adapter.py (ClsAdapter.delta + AdaptedLinears._add, the torch
// path, which stays the reference and runs wherever this op cannot). What it saves is dispatch:
// the torch path is ~6 small ops per target (slice, two thin matmuls, scale, slice, add), 42 per
// layer, ~10 ms per SmolLM2 decode step at batch 1 for ~4 MFLOP of work. Here the work is two
// plain loops per row and target (rank r is small: 8-64), vectorised by the compiler.
//
// Only the [CLS] column `col` of each output is written; every other row of every output is left
// untouched, so token rows stay bitwise the base projection's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

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
    u.assign(r, 0.f);
    float* __restrict up = u.data();
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict xr = xp + b * x.stride(0) + col * x.stride(1);
      std::fill(u.begin(), u.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {          // u = x_row @ A (over r: vectorised)
        const float xv = xr[k];
        const float* __restrict ak = ap + k * r;
        for (int64_t j = 0; j < r; ++j) up[j] += xv * ak[j];
      }
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
