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
// The noise is a counter-based hash of (seed, row, token): same seed, same tokens, and the
// seed lives in device memory so a CUDA graph can replay the step with a new seed.
// top-k / top-p / min-p are not implemented here; the Python backend declines those calls.
#include <limits.h>
#include <math.h>

#include "head_sample.h"
#include "sk_common.cuh"

namespace safekern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchTile = 8;    // batch rows sharing one read of an LM-head tile
constexpr int kVocabTile = 256;  // LM-head rows per CTA
constexpr int32_t kNever = INT_MAX;  // safekern.spec.NEVER

__device__ __forceinline__ uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Gumbel(0, 1) noise for (row, token). -log(E) with E = -log1p(-w) ~ Exp(1): log1pf keeps
// full precision as w -> 0 (fast-math logf would not), so E > 0 and the noise is finite.
__device__ __forceinline__ float gumbel(uint64_t seed, int row, int token) {
  const uint64_t counter = ((uint64_t)(uint32_t)row << 32) | (uint32_t)token;
  const uint64_t x = mix64(mix64(seed) + 0x9e3779b97f4a7c15ULL * (counter + 1));
  const float w = ((float)(x >> 40) + 0.5f) * 0x1p-24f;  // uniform in (0, 1)
  return -__logf(-log1pf(-w));
}

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

  float temp[kBatchTile], best_v[kBatchTile];
  int best_i[kBatchTile];
#pragma unroll
  for (int bb = 0; bb < kBatchTile; ++bb) {
    temp[bb] = bb < nb ? p.temperature[b0 + bb] : 0.f;
    best_v[bb] = -INFINITY;
    best_i[bb] = INT_MAX;
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
      const float val = temp[bb] == 0.f ? logit : logit / temp[bb] + gumbel(seed, b0 + bb, v);
      if (val > best_v[bb]) {
        best_v[bb] = val;
        best_i[bb] = v;
      }
    }
  }
  __shared__ float warp_v[kWarps][kBatchTile];
  __shared__ int warp_i[kWarps][kBatchTile];
  if (lane == 0) {
#pragma unroll
    for (int bb = 0; bb < kBatchTile; ++bb) {
      warp_v[warp][bb] = best_v[bb];
      warp_i[warp][bb] = best_i[bb];
    }
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int w = 0; w < kWarps; ++w)
      if (better(warp_v[w][threadIdx.x], warp_i[w][threadIdx.x], bv, bi)) {
        bv = warp_v[w][threadIdx.x];
        bi = warp_i[w][threadIdx.x];
      }
    const int64_t off = (int64_t)(b0 + threadIdx.x) * num_tiles + tile;
    p.cand_val[off] = bv;
    p.cand_idx[off] = bi;
  }
}

// int32 arithmetic that wraps like torch's instead of being undefined on overflow.
__device__ __forceinline__ int32_t add_i32(int32_t a, int32_t b) {
  return (int32_t)((uint32_t)a + (uint32_t)b);
}

// safekern.reference.controller.update_state for row b (in place).
__device__ void update_state(const sk_ess_state& s, const sk_ess_config& c, int b, float p_unsafe) {
  const bool ev = s.evaluating[b] != 0;
  const int32_t t = s.seq_len[b];
  const int32_t n = add_i32(t, -s.prompt_len[b]);
  const int32_t mode = s.mode[b];
  const bool flag = ev && p_unsafe >= c.threshold;
  const bool benign = ev && !flag;
  int32_t flags = s.flags[b];
  if (ev) flags = flag ? add_i32(flags, 1) : 0;
  const bool trigger = flag && (mode == SK_MODE_PENDING || flags >= c.tau);
  const bool to_suspect = flag && !trigger && mode != SK_MODE_SUSPECT;
  if (benign) {
    int32_t nxt = kNever, interval = s.interval[b];
    switch (c.schedule) {
      case SK_SCHEDULE_EACH: nxt = add_i32(n, 1); break;
      case SK_SCHEDULE_PERIODIC: nxt = add_i32(n, c.period); break;
      case SK_SCHEDULE_ANNEALING: {
        nxt = add_i32(n, interval);
        if (nxt > c.anneal_stop) nxt = kNever;
        // max(interval + 1, floor(interval * growth)), clamped to NEVER // 4. The product is
        // clamped before the int conversion (out-of-range conversion is undefined in C++).
        const double grown = fmin(floor((double)interval * c.anneal_growth), (double)(kNever / 4));
        interval = min(max(add_i32(interval, 1), (int32_t)grown), kNever / 4);
        break;
      }
      default: break;  // SK_SCHEDULE_FIRST: never again, interval unchanged
    }
    s.next_eval[b] = nxt;
    s.interval[b] = interval;
  }
  if (to_suspect) s.switch_step[b] = t;
  else if (benign) s.switch_step[b] = -1;
  if (trigger) s.mode[b] = SK_MODE_REFUSING;
  else if (to_suspect) s.mode[b] = SK_MODE_SUSPECT;
  else if (benign) s.mode[b] = SK_MODE_BENIGN;
  s.flags[b] = flags;
  if (trigger) {
    s.trigger_step[b] = t;
    if (c.policy != SK_POLICY_LOW) s.forced_idx[b] = 0;
  }
}

// safekern.reference.controller.forced_tokens for row b: the forced token or -1.
__device__ int64_t forced_token(const sk_ess_state& s, int policy, int b) {
  const int32_t idx = s.forced_idx[b];
  if (idx < 0) return -1;
  const int64_t token = s.refusal_ids[min(idx, s.refusal_len - 1)];
  const int32_t nxt = idx + 1;
  const bool done = nxt >= s.refusal_len;
  s.forced_idx[b] = done ? -1 : nxt;
  if (done && policy == SK_POLICY_HIGH) s.finished[b] = 1;
  return token;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    head_sample_finalize_kernel(const sk_head_sample_params p, int num_tiles) {
  __shared__ float red_v[kWarps];
  __shared__ int red_i[kWarps];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool has_state = p.state.mode != nullptr;
  const bool score = p.h_cls != nullptr && (!has_state || p.state.evaluating[b] != 0);

  float p_unsafe = NAN;  // meaningful in thread 0
  if (score) {
    const T* hc = static_cast<const T*>(p.h_cls) + (int64_t)b * p.cls_stride;
    float acc = 0.f;
    for (int d = threadIdx.x; d < p.hidden; d += kThreads) acc += to_float(hc[d]) * p.safety_w[d];
    acc = warp_sum(acc);
    if (lane == 0) red_v[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float z = p.safety_b != nullptr ? *p.safety_b : 0.f;
      for (int w = 0; w < kWarps; ++w) z += red_v[w];
      p_unsafe = 1.f / (1.f + expf(-z));
    }
    __syncthreads();
  }

  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int t = threadIdx.x; t < num_tiles; t += kThreads) {
    const float v = p.cand_val[(int64_t)b * num_tiles + t];
    const int i = p.cand_idx[(int64_t)b * num_tiles + t];
    if (better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    red_v[warp] = bv;
    red_i[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w)
    if (better(red_v[w], red_i[w], bv, bi)) {
      bv = red_v[w];
      bi = red_i[w];
    }
  int64_t token = bi;
  if (has_state) {
    update_state(p.state, p.ess, b, p_unsafe);
    const int64_t forced = forced_token(p.state, p.ess.policy, b);
    if (forced >= 0) token = forced;
  }
  p.p_unsafe[b] = p_unsafe;
  p.next_tokens[b] = token;
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
  if (vec16) lm_head_argmax_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, num_tiles);
  else lm_head_argmax_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, num_tiles);
  head_sample_finalize_kernel<T><<<p.batch, kThreads, 0, stream>>>(p, num_tiles);
  return cudaGetLastError();
}

}  // namespace
}  // namespace safekern

extern "C" int sk_head_sample_num_tiles(int vocab) {
  return safekern::ceil_div(vocab, safekern::kVocabTile);
}

extern "C" cudaError_t sk_head_sample(const sk_head_sample_params* params, cudaStream_t stream) {
  const sk_head_sample_params& p = *params;
  if (p.batch == 0) return cudaSuccess;
  if (p.batch < 0 || p.vocab <= 0 || p.hidden <= 0 ||
      (p.h_cls != nullptr && p.safety_w == nullptr) ||
      (p.state.mode != nullptr && p.state.refusal_len <= 0))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case SK_FLOAT32: return safekern::launch<float>(p, stream);
    case SK_FLOAT16: return safekern::launch<__half>(p, stream);
    case SK_BFLOAT16: return safekern::launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
