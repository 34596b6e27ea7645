// Fused decode-step tail (DESIGN.md §5), framework-free CUDA: LM head matvec + greedy or
// temperature sampling, safety score, ESS state update and refusal-prefix forcing.
//
// The oracle is safekern.reference.head_sample_ref (with update_state/forced_tokens of
// safekern/reference/controller.py). Two launches, no host synchronisation:
//   1. lm_head_argmax_kernel: each CTA reads a tile of LM-head rows once for up to 8 batch
//      rows and keeps, per row, the best candidate of its tile: argmax of the logit (greedy)
//      or of logit / T + Gumbel noise (Gumbel-max == a draw from softmax(logit / T)), so the
//      (B, V) logits are never written to memory.
//   2. head_sample_finalize_kernel: one CTA per row reduces the tile candidates, scores the
//      [CLS] hidden state, applies the ESS decision and forces the refusal prefix.
// Logprobs (optional): launch 1 also keeps each tile's online (max, sum exp) of logit / T, and
// launch 2 merges them into the row's logsumexp and recomputes the emitted token's logit (one
// dot product of h_tok with its LM-head row), so the step stays two launches.
// NaN/inf (a weight changed through .data, which the once-per-version Python check cannot see):
// a tile with a non-finite logit reports NaN as its candidate (never chosen), and the finalize
// ORs per-row flags into params.nonfinite (1: non-finite logits, 2: a NaN score of a row that
// scored), as the Triton backend does: one compare per logit, no extra pass, no host sync. The
// Python wrapper reads the flags after the launch (or the engine at its own sync points); a
// flagged row's token stays in [0, vocab).
// The noise (ess_logic.cuh) is a counter-based hash of (seed, row, token): same seed, same
// tokens, and the seed lives in device memory so a CUDA graph can replay the step with a new
// seed.
// top-k / top-p / min-p and top-k logprobs are not implemented here; the Python backend
// declines those calls.
#include <limits.h>
#include <math.h>

#include "ess_logic.cuh"
#include "head_sample.h"
#include "sk_common.cuh"

namespace safekern {
namespace head_sample {  // named, so a unity build with the attention kernels has no clashes
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchTile = 8;    // batch rows sharing one read of an LM-head tile
constexpr int kVocabTile = 256;  // LM-head rows per CTA

template <typename T>
__device__ __forceinline__ void load16(const T* ptr, float* out) {
  constexpr int N = 16 / sizeof(T);
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
}

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);  // ties: the lowest token id, as torch.argmax
}

// Merge (m2, s2) into the running logsumexp pair (m, s): s * exp(m) accumulates sum exp(x).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m2 > m) {
    s = s * expf(m - m2) + s2;  // expf(-inf) = 0 for the empty start
    m = m2;
  } else {
    s += s2 * expf(m2 - m);
  }
}

template <typename T, bool kVec16>
__global__ void __launch_bounds__(kThreads)
    lm_head_argmax_kernel(const sk_head_sample_params p, int num_tiles) {
  const T* __restrict__ h = static_cast<const T*>(p.h_tok);
  const T* __restrict__ lm = static_cast<const T*>(p.lm_head);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b0 = blockIdx.x * kBatchTile, tile = blockIdx.y;
  const int nb = min(kBatchTile, p.batch - b0);
  const int v_end = min((tile + 1) * kVocabTile, p.vocab);
  const uint64_t seed = (uint64_t)*p.seed;

  const bool logprobs = p.lse_max != nullptr;
  float temp[kBatchTile], best_v[kBatchTile], lse_m[kBatchTile], lse_s[kBatchTile];
  int best_i[kBatchTile];
  bool bad[kBatchTile];  // a NaN/inf logit in this tile (the same in every lane of a warp)
#pragma unroll
  for (int bb = 0; bb < kBatchTile; ++bb) {
    temp[bb] = bb < nb ? p.temperature[b0 + bb] : 0.f;
    best_v[bb] = -INFINITY;
    best_i[bb] = INT_MAX;
    bad[bb] = false;
    lse_m[bb] = -INFINITY;
    lse_s[bb] = 0.f;
  }
  // Rows go to warps round-robin, so each warp visits its rows in increasing token order.
  for (int v = tile * kVocabTile + warp; v < v_end; v += kWarps) {
    const T* w = lm + (int64_t)v * p.w_stride;
    float acc[kBatchTile];
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) acc[bb] = 0.f;
    if (kVec16) {
      constexpr int N = 16 / sizeof(T);
      for (int d = lane * N; d < p.hidden; d += 32 * N) {
        float wf[N];
        load16(w + d, wf);
#pragma unroll
        for (int bb = 0; bb < kBatchTile; ++bb) {
          if (bb >= nb) break;
          float hf[N];
          load16(h + (int64_t)(b0 + bb) * p.h_stride + d, hf);
#pragma unroll
          for (int i = 0; i < N; ++i) acc[bb] += wf[i] * hf[i];
        }
      }
    } else {
      for (int d = lane; d < p.hidden; d += 32) {
        const float wf = to_float(w[d]);
#pragma unroll
        for (int bb = 0; bb < kBatchTile; ++bb) {
          if (bb >= nb) break;
          acc[bb] += wf * to_float(h[(int64_t)(b0 + bb) * p.h_stride + d]);
        }
      }
    }
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) {
      if (bb >= nb) break;  // nb is uniform across the CTA: the shuffles stay converged
      const float logit = warp_sum(acc[bb]);
      bad[bb] |= logit != logit || fabsf(logit) == INFINITY;
      if (logprobs)
        lse_merge(lse_m[bb], lse_s[bb], temp[bb] == 0.f ? logit : logit / temp[bb], 1.f);
      const float val = temp[bb] == 0.f ? logit : logit / temp[bb] + gumbel(seed, b0 + bb, v);
      if (val > best_v[bb]) {
        best_v[bb] = val;
        best_i[bb] = v;
      }
    }
  }
  __shared__ float warp_v[kWarps][kBatchTile];
  __shared__ int warp_i[kWarps][kBatchTile];
  __shared__ float warp_m[kWarps][kBatchTile], warp_s[kWarps][kBatchTile];
  __shared__ bool warp_bad[kWarps][kBatchTile];
  if (lane == 0) {
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) {
      warp_bad[warp][bb] = bad[bb];
      warp_v[warp][bb] = best_v[bb];
      warp_i[warp][bb] = best_i[bb];
      warp_m[warp][bb] = lse_m[bb];
      warp_s[warp][bb] = lse_s[bb];
    }
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    bool tile_bad = false;
    for (int w = 0; w < kWarps; ++w) {
      tile_bad |= warp_bad[w][threadIdx.x];
      if (better(warp_v[w][threadIdx.x], warp_i[w][threadIdx.x], bv, bi)) {
        bv = warp_v[w][threadIdx.x];
        bi = warp_i[w][threadIdx.x];
      }
    }
    const int64_t off = (int64_t)(b0 + threadIdx.x) * num_tiles + tile;
    p.cand_val[off] = tile_bad ? NAN : bv;  // NaN: flagged by the finalize, never chosen
    p.cand_idx[off] = bi;
    if (logprobs) {
      float m = -INFINITY, s = 0.f;
      for (int w = 0; w < kWarps; ++w)
        lse_merge(m, s, warp_m[w][threadIdx.x], warp_s[w][threadIdx.x]);
      p.lse_max[off] = m;
      p.lse_sum[off] = s;
    }
  }
}

// sigmoid(h . w + bias) of one row over the CTA (every thread must call it): the value in
// thread 0, NaN in the others; red is kWarps floats of shared memory. The safety head's score
// of the [CLS] row and the cascade probe's of the token row.
template <typename T>
__device__ float block_sigmoid_dot(const T* h, const float* w, const float* bias, int hidden,
                                   float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float acc = 0.f;
  for (int d = threadIdx.x; d < hidden; d += kThreads) acc += to_float(h[d]) * w[d];
  acc = warp_sum(acc);
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  float out = NAN;
  if (threadIdx.x == 0) {
    float z = bias != nullptr ? *bias : 0.f;
    for (int i = 0; i < kWarps; ++i) z += red[i];
    out = 1.f / (1.f + expf(-z));
  }
  __syncthreads();
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    head_sample_finalize_kernel(const sk_head_sample_params p, int num_tiles) {
  __shared__ float red_v[kWarps];
  __shared__ int red_i[kWarps], red_bad[kWarps];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool has_state = p.state.mode != nullptr;
  const bool score = p.h_cls != nullptr && (!has_state || p.state.evaluating[b] != 0);

  float p_unsafe = NAN;  // meaningful in thread 0
  if (score)
    p_unsafe = block_sigmoid_dot(static_cast<const T*>(p.h_cls) + (int64_t)b * p.cls_stride,
                                 p.safety_w, p.safety_b, p.hidden, red_v);

  // The cascade's screening probe on the token row (uniform across the CTA): q in thread 0.
  const bool probe = p.probe_w != nullptr && has_state;
  float q = NAN;
  if (probe)
    q = block_sigmoid_dot(static_cast<const T*>(p.h_tok) + (int64_t)b * p.h_stride, p.probe_w,
                          p.probe_b, p.hidden, red_v);

  float bv = -INFINITY;
  int bi = INT_MAX, bad = 0;  // bad: a tile of this row saw a NaN/inf logit
  for (int t = threadIdx.x; t < num_tiles; t += kThreads) {
    const float v = p.cand_val[(int64_t)b * num_tiles + t];
    const int i = p.cand_idx[(int64_t)b * num_tiles + t];
    bad |= v != v;
    if (better(v, i, bv, bi)) {  // never true for NaN
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    red_v[warp] = bv;
    red_i[warp] = bi;
    red_bad[warp] = bad;
  }
  __syncthreads();
  __shared__ int64_t chosen;
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      bad |= red_bad[w];
      if (better(red_v[w], red_i[w], bv, bi)) {
        bv = red_v[w];
        bi = red_i[w];
      }
    }
    // No candidate (every logit NaN or -inf): token 0, as the Triton kernel; the row is flagged.
    int64_t token = bi < p.vocab ? bi : 0;
    if (has_state) {
      ess_update_state(p.state, p.ess, b, p_unsafe);
      if (probe) {
        ess_escalate(p.state, b, q, p.probe_threshold);
        if (p.probe_out != nullptr) p.probe_out[b] = q;
      }
      const int64_t forced = ess_forced_token(p.state, p.ess.policy, b);
      if (forced >= 0) token = forced;
    }
    if (p.nonfinite != nullptr)  // one thread per row: a plain read-modify-write
      p.nonfinite[b] |= (bad ? 1 : 0) | (score && p_unsafe != p_unsafe ? 2 : 0);
    p.p_unsafe[b] = p_unsafe;
    p.next_tokens[b] = token;
    chosen = token;
  }
  if (p.token_logprob == nullptr) return;  // uniform across the CTA

  // logprob = logit(token) / T - logsumexp(logit / T): merge the tiles' (max, sum) pairs and
  // recompute the emitted token's logit (forced tokens included) with the whole CTA.
  float m = -INFINITY, s = 0.f, dot = 0.f;
  for (int t = threadIdx.x; t < num_tiles; t += kThreads)
    lse_merge(m, s, p.lse_max[(int64_t)b * num_tiles + t], p.lse_sum[(int64_t)b * num_tiles + t]);
  __syncthreads();  // `chosen` is written
  const T* h = static_cast<const T*>(p.h_tok) + (int64_t)b * p.h_stride;
  const T* w = static_cast<const T*>(p.lm_head) + chosen * p.w_stride;
  for (int d = threadIdx.x; d < p.hidden; d += kThreads) dot += to_float(h[d]) * to_float(w[d]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, o);
    const float os = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, om, os);
  }
  dot = warp_sum(dot);
  __shared__ float red_m[kWarps], red_s[kWarps], red_d[kWarps];
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
    red_d[warp] = dot;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w2 = 1; w2 < kWarps; ++w2) {
    lse_merge(m, s, red_m[w2], red_s[w2]);
    dot += red_d[w2];
  }
  const float temp = p.temperature[b];
  p.token_logprob[b] = (temp == 0.f ? dot : dot / temp) - (m + logf(s));
}

template <typename T>
cudaError_t launch(const sk_head_sample_params& p, cudaStream_t stream) {
  const int num_tiles = sk_head_sample_num_tiles(p.vocab);
  if (num_tiles > 65535) return cudaErrorInvalidValue;
  constexpr int N = 16 / sizeof(T);
  const bool vec16 = p.hidden % N == 0 && p.h_stride % N == 0 && p.w_stride % N == 0 &&
                     reinterpret_cast<uintptr_t>(p.h_tok) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.lm_head) % 16 == 0;
  const dim3 grid(ceil_div(p.batch, kBatchTile), num_tiles);
  const auto argmax = vec16 ? lm_head_argmax_kernel<T, true> : lm_head_argmax_kernel<T, false>;
  SK_LAUNCH(argmax, grid, kThreads, stream, p, num_tiles);
  const auto finalize = head_sample_finalize_kernel<T>;
  SK_LAUNCH(finalize, p.batch, kThreads, stream, p, num_tiles);
  return cudaGetLastError();
}

}  // namespace
}  // namespace head_sample
}  // namespace safekern

extern "C" int sk_head_sample_num_tiles(int vocab) {
  return safekern::ceil_div(vocab, safekern::head_sample::kVocabTile);
}

extern "C" cudaError_t sk_head_sample(const sk_head_sample_params* params, cudaStream_t stream) {
  const sk_head_sample_params& p = *params;
  if (p.batch == 0) return cudaSuccess;
  if (p.batch < 0 || p.vocab <= 0 || p.hidden <= 0 ||
      (p.h_cls != nullptr && p.safety_w == nullptr) ||
      (p.state.mode != nullptr && p.state.refusal_len <= 0) ||
      (p.probe_w != nullptr && p.state.mode == nullptr) ||
      (p.token_logprob != nullptr) != (p.lse_max != nullptr) ||
      (p.lse_max != nullptr) != (p.lse_sum != nullptr))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case SK_FLOAT32: return safekern::head_sample::launch<float>(p, stream);
    case SK_FLOAT16: return safekern::head_sample::launch<__half>(p, stream);
    case SK_BFLOAT16: return safekern::head_sample::launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
