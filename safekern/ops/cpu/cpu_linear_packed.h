// The packed-panel path of cpu_linear.cpp, included once per instruction set inside its own
// namespace after cpu_linear_tile.h (same ``vec``, ``W``, ``vzero``, ``vload``, ``vfma``; the
// includer also defines ``vset1``, ``vstore`` and ``MR``, the activation rows per register
// block). No includes here.
//
// Layout: a weight (N, K) packed as panels (NP, K, P), P = 2 W: panel p holds output columns
// [p P, p P + P) with k outermost (columns past N are zero). One step of k loads the panel's two
// weight vectors and broadcasts x[m, k] into 2 FMAs per row: an outer product, no horizontal
// sums (the tile path's per-output reduction dominates when K is only a few hundred).
// Numerics: per output one fp32 FMA chain over k = 0..K-1 in order, then + bias; a row's result
// never depends on the other rows or on the block it falls in.

template <int mr>
inline void panel(const float* x, int64_t ldx, const float* wp, int64_t K, float* y,
                  int64_t ldy, int64_t ncols, const float* bias) {
  vec acc[mr][2];
  for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    const vec w0 = vload(wp + k * 2 * W), w1 = vload(wp + k * 2 * W + W);
    for (int m = 0; m < mr; ++m) {
      const vec xb = vset1(x[m * ldx + k]);
      acc[m][0] = vfma(w0, xb, acc[m][0]);
      acc[m][1] = vfma(w1, xb, acc[m][1]);
    }
  }
  for (int m = 0; m < mr; ++m) {
    float tmp[2 * W];
    vstore(tmp, acc[m][0]);
    vstore(tmp + W, acc[m][1]);
    float* ym = y + m * ldy;
    if (bias) {
      for (int64_t j = 0; j < ncols; ++j) ym[j] = tmp[j] + bias[j];
    } else {
      for (int64_t j = 0; j < ncols; ++j) ym[j] = tmp[j];
    }
  }
}

template <int mr = MR>
inline void panel_rows(int64_t rows, const float* x, int64_t ldx, const float* wp, int64_t K,
                       float* y, int64_t ldy, int64_t ncols, const float* bias) {
  if constexpr (mr >= 1) {
    if (rows == mr) return panel<mr>(x, ldx, wp, K, y, ldy, ncols, bias);
    panel_rows<mr - 1>(rows, x, ldx, wp, K, y, ldy, ncols, bias);
  }
}

// Panel p (of a weight with N outputs) times every row of x.
inline void packed_panel(const float* x, int64_t ldx, int64_t M, const float* wp, int64_t K,
                         int64_t p, int64_t N, float* y, int64_t ldy, const float* bias) {
  const int64_t n0 = p * 2 * W, ncols = std::min<int64_t>(2 * W, N - n0);
  const float* pw = wp + p * K * 2 * W;
  const float* b = bias ? bias + n0 : nullptr;
  for (int64_t m = 0; m < M; m += MR) {
    const int64_t rows = std::min<int64_t>(MR, M - m);
    panel_rows(rows, x + m * ldx, ldx, pw, K, y + m * ldy + n0, ldy, ncols, b);
  }
}
