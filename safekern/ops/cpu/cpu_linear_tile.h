// The tile code of cpu_linear.cpp, included once per instruction set inside its own namespace.
// The includer defines before it: ``vec`` (the SIMD type), ``W`` (its float lanes), ``vzero``,
// ``vload``, ``vfma``, ``vsum`` (a fixed-order horizontal sum), the block shape ``NB2`` x
// ``MB`` (weight rows x activation rows per register block at M >= 2) and ``WIDE2`` (M = 2 runs
// NB x 2 blocks: enough registers for 8 weight streams at once). No includes here.
//
// Numerics (both instruction sets): per output, W lane-partial fp32 FMA sums over K in steps of
// W, a fixed-order horizontal sum, then the K % W tail in order, then the bias. The per-output
// order does not depend on M or on the block an output falls in, so a row's bits never depend
// on the other rows (same bits at M = 1 and M = 2B).

// y[m, n] for weight rows n < nb and activation rows m < mb. ``pf`` streams the next tile's
// weights into the cache while this one computes (as many 64-byte lines per step as the step
// reads, which covers a tile of the same size): the loop then waits on FMAs, not on memory.
template <int nb, int mb>
inline void block(const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                  int64_t ldy, const float* bias, const char* pf, const char* pf_end) {
  constexpr int lines = nb * W * 4 / 64 > 0 ? nb * W * 4 / 64 : 1;
  vec acc[nb][mb];
  for (int n = 0; n < nb; ++n)
    for (int m = 0; m < mb; ++m) acc[n][m] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    for (int l = 0; l < lines && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
    if (mb == 1) {
      vec xv = vload(x + k);
      for (int n = 0; n < nb; ++n) acc[n][0] = vfma(vload(w + n * K + k), xv, acc[n][0]);
    } else {
      vec wv[nb];
      for (int n = 0; n < nb; ++n) wv[n] = vload(w + n * K + k);
      for (int m = 0; m < mb; ++m) {
        vec xv = vload(x + m * ldx + k);
        for (int n = 0; n < nb; ++n) acc[n][m] = vfma(wv[n], xv, acc[n][m]);
      }
    }
  }
  for (int n = 0; n < nb; ++n) {
    for (int m = 0; m < mb; ++m) {
      float s = vsum(acc[n][m]);
      for (int64_t kk = k; kk < K; ++kk) s += w[n * K + kk] * x[m * ldx + kk];
      y[m * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

// The last r < MB activation rows of a block of NB2 weight rows, in one pass over the weights.
template <int r = MB - 1>
inline void rest(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t K,
                 float* y, int64_t ldy, const float* bias, const char* pf) {
  if constexpr (r >= 1) {
    if (rows == r) return block<NB2, r>(x, ldx, w, K, y, ldy, bias, pf, pf);
    rest<r - 1>(rows, x, ldx, w, K, y, ldy, bias, pf);
  }
}

// Weight rows [n0, n1) of w (n1 - n0 <= NB) times every row of x.
inline void tile(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, int64_t n0,
                 int64_t n1, int64_t N, float* y, int64_t ldy, const float* bias) {
  const char* pf = reinterpret_cast<const char*>(w + n1 * K);
  const char* pf_end = reinterpret_cast<const char*>(w + std::min(N, n1 + NB) * K);
  const float* b = bias ? bias + n0 : nullptr;
  if (n1 - n0 == NB && M == 1) {
    block<NB, 1>(x, ldx, w + n0 * K, K, y + n0, ldy, b, pf, pf_end);
    return;
  }
  if constexpr (WIDE2) {  // M = 2 (batch 1 with its [CLS] row): all NB weight streams at once
    if (n1 - n0 == NB && M == 2) {
      block<NB, 2>(x, ldx, w + n0 * K, K, y + n0, ldy, b, pf, pf_end);
      return;
    }
  }
  int64_t n = n0;
  for (; n + NB2 <= n1; n += NB2) {
    const float* bn = bias ? bias + n : nullptr;
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      block<NB2, MB>(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, bn, pf, pf_end);
    if (m < M) rest(M - m, x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, bn, pf);
    pf += NB2 * K * sizeof(float);  // the next block prefetches the rest of the next tile
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      block<1, 1>(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy,
                  bias ? bias + n : nullptr, pf, pf);
}
