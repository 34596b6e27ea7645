// ESS attention for CPU decode steps (a few query rows against a KV cache), fp32 (issue 11).
//
// The definition is safekern/reference/attention.py (ess_attention_ref): the same visibility
// rules (ess_visibility, as csrc/ess_logic.cuh key_visible), the key bias added to the scaled
// logits, a row that sees no key -> output 0 and lse -inf. What it saves is the torch path's
// dense (B, Lq, Lk) visibility tensor (~20 small ops per forward) and, per layer, SDPA's
// transposes, GQA expansion and the NaN fix-up: one call per layer, visibility read straight
// from q_pos / seqlens_k / response_start / cls_windows as key ranges.
//
// Each (batch row, KV head) is one task: its G = Hq / Hkv query heads read each visible key
// once. A row's result depends only on its own inputs (not on the other rows, the number of
// rows or threads), so the token row of a step with a [CLS] row is bitwise the token row of a
// step without one.
//
// Non-finite inputs: instead of reproducing the reference's NaN rules the op returns a flag
// ``bad`` when any logit is NaN / +inf or any output element is not finite; the caller then
// runs the reference (as the SDPA path does). Hidden keys are never read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// [sum(a0), ..., sum(a7)]: the horizontal sums of eight vectors in one vector.
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                    __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// q . k[keys[i]] for i in [0, n), D % 8 == 0: eight keys per step, each key's sum computed the
// same way wherever it falls (its own accumulator, then the hsum8 tree).
void dots8(const float* q, const float* k, int64_t ks, const int32_t* keys, int64_t n,
           int64_t D, float scale, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    const int m = static_cast<int>(std::min<int64_t>(8, n - i));
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int u = 0; u < m; ++u)
        acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + keys[i + u] * ks + d), acc[u]);
    }
    const __m256 r = _mm256_mul_ps(
        hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]), vs);
    if (m == 8) {
      _mm256_storeu_ps(out + i, r);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, r);
      std::copy(tmp, tmp + m, out + i);
    }
  }
}

// exp(x) for x <= 0 (x = logit - row max), 8 lanes: Cephes' expf (range reduction by ln 2 in
// two parts, degree-5 polynomial), ~1 ulp; exp(x) = 0 below -87.3 (where expf is denormal)
// and for -inf.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// p[i] = exp(s[i] - m) in place; returns sum(p) (summed in eight lanes, then across them).
float softmax_numerators(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  if (i < n) {
    alignas(32) float tmp[8];
    const int r = static_cast<int>(n - i);
    for (int u = 0; u < 8; ++u) tmp[u] = u < r ? s[i + u] : -INFINITY;
    const __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_load_ps(tmp), vm));
    _mm256_store_ps(tmp, p);
    std::copy(tmp, tmp + r, s + i);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float l = 0.f;
  for (int u = 0; u < 8; ++u) l += lanes[u];
  return l;
}

inline int32_t at32(const int32_t* p, int64_t stride, int64_t i) { return p[i * stride]; }

void check_i32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.sizes() == shape,
              "cpu_attention: ", name, " must be an int32 CPU tensor of shape ", shape,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// (o (B, Lq, Hq, D) float32, lse (B, Hq, Lq) float32, bad: a non-finite logit or output).
std::tuple<at::Tensor, at::Tensor, bool> decode_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
    const at::Tensor& q_pos, const at::Tensor& seqlens_k,
    const std::optional<at::Tensor>& response_start,
    const std::optional<at::Tensor>& cls_windows, const std::optional<at::Tensor>& key_bias) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "cpu_attention: q, k, v must be 4-D (B, L, H, D)");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "cpu_attention: q, k, v must be float32 CPU tensors with a unit-stride head "
                "dim");
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 &&
                  Hq % Hkv == 0,
              "cpu_attention: k and v must be (B, Lk, Hkv, D) with Hq % Hkv == 0; got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  check_i32(q_pos, "q_pos", {B, Lq});
  check_i32(seqlens_k, "seqlens_k", {B});
  const bool ess = response_start.has_value();
  if (ess) check_i32(*response_start, "response_start", {B});
  int64_t W = 0;
  if (cls_windows) {
    TORCH_CHECK(ess, "cpu_attention: cls_windows requires response_start");
    TORCH_CHECK(cls_windows->dim() == 3 && cls_windows->size(0) == B &&
                    cls_windows->size(2) == 2,
                "cpu_attention: cls_windows must be (B, W, 2)");
    W = cls_windows->size(1);
    check_i32(*cls_windows, "cls_windows", {B, W, 2});
  }
  int64_t kb_heads = 0;
  if (key_bias) {
    TORCH_CHECK(key_bias->device().is_cpu() && key_bias->scalar_type() == at::kFloat &&
                    key_bias->dim() == 3 && key_bias->size(0) == B &&
                    (key_bias->size(1) == 1 || key_bias->size(1) == Hq) &&
                    key_bias->size(2) == Lk,
                "cpu_attention: key_bias must be a float32 (B, Hq or 1, Lk) CPU tensor");
    kb_heads = key_bias->size(1);
  }
  const int64_t G = Hq / Hkv;
  auto o = at::empty({B, Lq, Hq, D}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int32_t* pos_p = q_pos.data_ptr<int32_t>();
  const int64_t pos_s0 = q_pos.stride(0), pos_s1 = q_pos.stride(1);
  const int32_t* sl_p = seqlens_k.data_ptr<int32_t>();
  const int64_t sl_s = seqlens_k.stride(0);
  const int32_t* rs_p = ess ? response_start->data_ptr<int32_t>() : nullptr;
  const int64_t rs_s = ess ? response_start->stride(0) : 0;
  const int32_t* cw_p = cls_windows ? cls_windows->data_ptr<int32_t>() : nullptr;
  const int64_t cw_s0 = cls_windows ? cls_windows->stride(0) : 0;
  const int64_t cw_s1 = cls_windows ? cls_windows->stride(1) : 0;
  const int64_t cw_s2 = cls_windows ? cls_windows->stride(2) : 0;
  const float* kb_p = key_bias ? key_bias->data_ptr<float>() : nullptr;
  const int64_t kb_s0 = key_bias ? key_bias->stride(0) : 0;
  const int64_t kb_s1 = key_bias ? key_bias->stride(1) : 0;
  const int64_t kb_s2 = key_bias ? key_bias->stride(2) : 0;
  const float fscale = static_cast<float>(scale);
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  std::vector<uint8_t> bad_task(B * Hkv, 0);

  // A task's work is ~Lq * G * Lk * D * 4 flops: split only when there is enough of it.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Lq * G * Lk * D));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> keys(Lk);
    std::vector<float> s(G * Lk);
    std::vector<float> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, hk = t % Hkv;
      const int32_t seqlen = std::min<int64_t>(at32(sl_p, sl_s, b), Lk);
      bool bad = false;
      for (int64_t r = 0; r < Lq; ++r) {
        const int32_t pos = pos_p[b * pos_s0 + r * pos_s1];
        // The row's visible keys (ess_visibility).
        int64_t n = 0;
        if (pos >= 0 && seqlen > 0) {
          if (ess && pos == 0) {       // [CLS] row: key 0 and its windows, causality ignored
            const int32_t* cw = cw_p ? cw_p + b * cw_s0 : nullptr;
            int32_t end = 1;
            for (int64_t w = 0; w < W; ++w)
              end = std::max(end, cw[w * cw_s1 + cw_s2]);
            end = std::min(end, seqlen);
            for (int32_t j = 0; j < end; ++j) {
              bool vis = j == 0;
              for (int64_t w = 0; w < W && !vis; ++w)
                vis = j >= cw[w * cw_s1] && j < cw[w * cw_s1 + cw_s2];
              if (vis) keys[n++] = j;
            }
          } else {
            const int32_t end = causal ? std::min<int32_t>(pos + 1, seqlen) : seqlen;
            const int32_t start = (ess && pos < at32(rs_p, rs_s, b)) ? 1 : 0;
            for (int32_t j = start; j < end; ++j) keys[n++] = j;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          const float* qrow = qp + b * qs0 + r * qs1 + h * qs2;
          float* sg = s.data() + g * Lk;
          float m = NEG_INF;
          const float* kb = kb_p ? kb_p + b * kb_s0 + (kb_heads == 1 ? 0 : h) * kb_s1 : nullptr;
          const float* kbase = kp + b * ks0 + hk * ks2;
          if (D % 8 == 0) {
            dots8(qrow, kbase, ks1, keys.data(), n, D, fscale, sg);
          } else {
            for (int64_t i = 0; i < n; ++i) sg[i] = dot(qrow, kbase + keys[i] * ks1, D) * fscale;
          }
          for (int64_t i = 0; i < n; ++i) {
            float x = sg[i];
            if (kb) sg[i] = x = x + kb[keys[i] * kb_s2];
            m = std::max(m, x);      // std::max drops a NaN x: caught below
            if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) bad = true;
          }
          float* orow = op + ((b * Lq + r) * Hq + h) * D;
          float* lrow = lp + (b * Hq + h) * Lq + r;
          // No visible key, or all removed by a -inf bias; or flagged (the caller discards o).
          if (m == NEG_INF || bad) {
            std::fill(orow, orow + D, 0.f);
            *lrow = NEG_INF;
            continue;
          }
          const float l = softmax_numerators(sg, n, m);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t i = 0; i < n; ++i) {
            const float p = sg[i];
            const float* vrow = vp + b * vs0 + keys[i] * vs1 + hk * vs2;
            for (int64_t d = 0; d < D; ++d) acc[d] += p * vrow[d];
          }
          const float inv = 1.f / l;
          for (int64_t d = 0; d < D; ++d) {
            orow[d] = acc[d] * inv;
            if (!std::isfinite(orow[d])) bad = true;
          }
          *lrow = m + std::log(l);
        }
      }
      bad_task[t] = bad;
    }
  });
  const bool bad = std::any_of(bad_task.begin(), bad_task.end(), [](uint8_t x) { return x; });
  return {o, lse, bad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(safekern_cpu, m) {
  m.def("ess_decode_attention(Tensor q, Tensor k, Tensor v, float scale, bool causal, "
        "Tensor q_pos, Tensor seqlens_k, Tensor? response_start, Tensor? cls_windows, "
        "Tensor? key_bias) -> (Tensor, Tensor, bool)", &decode_attention);
}
