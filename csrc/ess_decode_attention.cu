// Split-KV decode attention with the ESS masks (DESIGN.md §3), framework-free CUDA.
//
// The oracle is safekern.reference.ess_attention_ref. Decode has few query rows per sequence
// (the token row and the [CLS] row), so a CTA owns one (sequence, KV head) pair and up to
// kRows query rows of that KV head's GQA group: every K/V element it loads serves the whole
// group. The key range is cut into num_splits chunks (grid.x) so short batches still fill the
// GPU (flash-decoding); each split keeps an online softmax and writes a partial output and
// log-sum-exp that a second kernel combines. With one split the first kernel writes o directly.
//
// Per tile of 32 keys: K/V are staged in shared memory as fp32, one thread per (row, key)
// computes the masked, scaled, biased logit, one warp per row updates the running max/sum
// (one lane per key), then one thread per (row, head-dim element) accumulates P @ V.
#include <math.h>

#include "ess_decode_attention.h"
#include "ess_logic.cuh"
#include "sk_common.cuh"

namespace safekern {
namespace decode_attention {  // named, so a unity build with head_sample.cu has no clashes
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;    // query rows per CTA (GQA group x Lq, tiled)
constexpr int kTileK = 32;  // keys per tile: one lane per key in the softmax step
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 64;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    ess_decode_attention_kernel(const sk_decode_attention_params p, int chunk) {
  static_assert(kThreads % D == 0 && kRows % (kThreads / D) == 0, "unsupported head dim");
  constexpr int kRowStep = kThreads / D;  // rows covered by one pass of the P@V threads
  constexpr int kAcc = kRows / kRowStep;

  __shared__ float q_s[kRows][D];
  __shared__ float k_s[kTileK][D + 1];  // +1: threads reading different keys hit distinct banks
  __shared__ float v_s[kTileK][D];
  __shared__ float p_s[kRows][kTileK];
  __shared__ bool vis_s[kRows][kTileK];  // P@V reads v only where the row sees the key
  __shared__ float m_s[kRows], l_s[kRows], alpha_s[kRows];
  __shared__ int pos_s[kRows], head_s[kRows], qi_s[kRows];
  __shared__ int key_hi_s;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.heads_kv, hkv = blockIdx.y % p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const int rows_total = group * p.seqlen_q;
  const int row0 = blockIdx.z * kRows;
  const int seqlen = p.seqlens_k[b];
  const bool ess = p.response_start != nullptr;
  const int resp_start = ess ? p.response_start[b] : 0;
  const int num_windows = p.cls_windows != nullptr ? p.num_windows : 0;
  const int32_t* win = p.cls_windows != nullptr ? p.cls_windows + (int64_t)b * num_windows * 2
                                                 : nullptr;

  if (tid < kRows) {
    const int r = row0 + tid;
    int pos = -1, head = hkv * group, qi = 0;
    if (r < rows_total) {
      qi = r / group;
      head = hkv * group + r % group;
      pos = p.q_pos[(int64_t)b * p.seqlen_q + qi];
    }
    pos_s[tid] = pos;
    head_s[tid] = head;
    qi_s[tid] = qi;
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  __syncthreads();
  if (tid == 0) {  // last key any row of this CTA can see: skips dead tiles (e.g. [CLS]-only)
    int hi = 0;
    for (int r = 0; r < kRows; ++r)
      hi = max(hi, row_key_end(pos_s[r], seqlen, ess, p.causal, win, num_windows));
    key_hi_s = min(hi, seqlen);
  }
  for (int i = tid; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    q_s[r][d] = pos_s[r] >= 0 ? to_float(q[b * p.q_stride_b + qi_s[r] * p.q_stride_s +
                                             head_s[r] * p.q_stride_h + d])
                              : 0.f;
  }
  __syncthreads();

  const int k_begin = split * chunk;
  const int k_end = min(k_begin + chunk, key_hi_s);
  const int d_acc = tid % D, r_acc0 = tid / D;
  float acc[kAcc];
#pragma unroll
  for (int a = 0; a < kAcc; ++a) acc[a] = 0.f;

  for (int k0 = k_begin; k0 < k_end; k0 += kTileK) {
    for (int i = tid; i < kTileK * D; i += kThreads) {
      const int j = i / D, d = i % D, key = k0 + j;
      float kx = 0.f, vx = 0.f;
      if (key < k_end) {
        const int64_t kv_off = (int64_t)key * p.k_stride_s;
        kx = to_float(k[b * p.k_stride_b + kv_off + hkv * p.k_stride_h + d]);
        vx = to_float(v[b * p.v_stride_b + (int64_t)key * p.v_stride_s + hkv * p.v_stride_h + d]);
      }
      k_s[j][d] = kx;
      v_s[j][d] = vx;
    }
    __syncthreads();
    for (int i = tid; i < kRows * kTileK; i += kThreads) {
      const int r = i / kTileK, j = i % kTileK, key = k0 + j;
      float s = -INFINITY;
      const bool visible =
          key < k_end &&
          key_visible(key, pos_s[r], seqlen, ess, resp_start, p.causal, win, num_windows);
      vis_s[r][j] = visible;
      if (visible) {
        float dot = 0.f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) dot += q_s[r][d] * k_s[j][d];
        s = dot * p.softmax_scale;
        if (p.key_bias != nullptr)
          s += p.key_bias[b * p.bias_stride_b + head_s[r] * p.bias_stride_h +
                          (int64_t)key * p.bias_stride_k];
      }
      p_s[r][j] = s;
    }
    __syncthreads();
    for (int r = warp; r < kRows; r += kWarps) {
      const float s = p_s[r][lane];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      // A row with nothing visible yet keeps m = -inf; subtract 0 so exp gives 0, not NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float e = __expf(s - m_use);
      const float sum = warp_sum(e);
      p_s[r][lane] = e;
      if (lane == 0) {
        const float alpha = __expf(m_old - m_use);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < kAcc; ++a) {
      const int r = r_acc0 + a * kRowStep;
      float x = acc[a] * alpha_s[r];
      // p = 0 at a hidden key times a NaN/inf value there would be NaN: hidden keys are skipped.
#pragma unroll 8
      for (int j = 0; j < kTileK; ++j) x += vis_s[r][j] ? p_s[r][j] * v_s[j][d_acc] : 0.f;
      acc[a] = x;
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < kAcc; ++a) {
    const int r = r_acc0 + a * kRowStep;
    if (row0 + r >= rows_total) continue;
    const int head = head_s[r], qi = qi_s[r];
    const float l = l_s[r];
    // A row that sees no key outputs 0; a NaN logit makes l NaN (!= 0), so the row stays NaN,
    // and a visible non-finite value gives NaN (inf -> NaN), as the reference.
    float out = l != 0.f ? acc[a] / l : 0.f;
    if (fabsf(out) == INFINITY) out = NAN;
    const float lse = l != 0.f ? m_s[r] + logf(l) : -INFINITY;
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.o);
      o[b * p.o_stride_b + qi * p.o_stride_s + head * p.o_stride_h + d_acc] = from_float<T>(out);
      if (d_acc == 0 && p.lse != nullptr)
        p.lse[((int64_t)b * p.heads_q + head) * p.seqlen_q + qi] = lse;
    } else {
      const int64_t row = (((int64_t)split * p.batch + b) * p.seqlen_q + qi) * p.heads_q + head;
      p.o_partial[row * D + d_acc] = out;
      if (d_acc == 0)
        p.lse_partial[(((int64_t)split * p.batch + b) * p.heads_q + head) * p.seqlen_q + qi] = lse;
    }
  }
}

// One CTA per (b, query row, head), one thread per head-dim element.
template <typename T, int D>
__global__ void __launch_bounds__(D) ess_decode_combine_kernel(const sk_decode_attention_params p) {
  const int head = blockIdx.x % p.heads_q;
  const int qi = (blockIdx.x / p.heads_q) % p.seqlen_q;
  const int b = blockIdx.x / (p.heads_q * p.seqlen_q);
  const int d = threadIdx.x;
  const int64_t split_stride_lse = (int64_t)p.batch * p.heads_q * p.seqlen_q;
  const int64_t lse_off = ((int64_t)b * p.heads_q + head) * p.seqlen_q + qi;
  const int64_t o_off = (((int64_t)b * p.seqlen_q + qi) * p.heads_q + head) * D + d;
  float m = -INFINITY;
  bool nan_row = false;  // fmaxf drops NaN: a NaN partial (a NaN logit) makes the row NaN
  for (int s = 0; s < p.num_splits; ++s) {
    const float x = p.lse_partial[s * split_stride_lse + lse_off];
    nan_row |= x != x;
    m = fmaxf(m, x);
  }
  float sum = 0.f, acc = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = __expf(p.lse_partial[s * split_stride_lse + lse_off] - m);
      sum += w;
      acc += w * p.o_partial[s * split_stride_lse * D + o_off];
    }
  }
  T* o = static_cast<T*>(p.o);
  o[b * p.o_stride_b + qi * p.o_stride_s + head * p.o_stride_h + d] =
      from_float<T>(nan_row ? NAN : m == -INFINITY ? 0.f : acc / sum);
  if (d == 0 && p.lse != nullptr)
    p.lse[lse_off] = nan_row ? NAN : m == -INFINITY ? -INFINITY : m + logf(sum);
}

template <typename T, int D>
cudaError_t launch(const sk_decode_attention_params& p, cudaStream_t stream) {
  const int group = p.heads_q / p.heads_kv;
  const int row_blocks = ceil_div(group * p.seqlen_q, kRows);
  const int chunk = ceil_div(ceil_div(p.seqlen_k, p.num_splits), kTileK) * kTileK;
  if ((int64_t)p.batch * p.heads_kv > 65535 || row_blocks > 65535 ||
      (int64_t)p.batch * p.seqlen_q * p.heads_q > 0x7fffffff)
    return cudaErrorInvalidValue;
  const dim3 grid(p.num_splits, p.batch * p.heads_kv, row_blocks);
  const auto attention = ess_decode_attention_kernel<T, D>;
  SK_LAUNCH(attention, grid, kThreads, stream, p, chunk);
  if (p.num_splits > 1) {
    const auto combine = ess_decode_combine_kernel<T, D>;
    SK_LAUNCH(combine, p.batch * p.seqlen_q * p.heads_q, D, stream, p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_head_dim(const sk_decode_attention_params& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace decode_attention
}  // namespace safekern

extern "C" int sk_decode_attention_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

extern "C" int sk_decode_attention_num_splits(int batch, int heads_q, int heads_kv, int seqlen_q,
                                              int seqlen_k, int num_sms) {
  using namespace safekern;
  using namespace safekern::decode_attention;
  if (heads_kv <= 0 || seqlen_k <= 0) return 1;
  const int ctas = batch * heads_kv * ceil_div(heads_q / heads_kv * seqlen_q, kRows);
  // Two waves of CTAs hide the combine's cost; more splits only add partial-output traffic.
  int splits = ceil_div(2 * num_sms, ctas > 0 ? ctas : 1);
  splits = min(splits, ceil_div(seqlen_k, kMinKeysPerSplit));
  return max(1, min(splits, kMaxSplits));
}

extern "C" cudaError_t sk_ess_decode_attention(const sk_decode_attention_params* params,
                                               cudaStream_t stream) {
  using namespace safekern::decode_attention;
  const sk_decode_attention_params& p = *params;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0) return cudaSuccess;  // empty output
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.seqlen_k < 0 || p.num_splits < 1 ||
      (p.num_splits > 1 && (p.o_partial == nullptr || p.lse_partial == nullptr)))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case SK_FLOAT32: return launch_head_dim<float>(p, stream);
    case SK_FLOAT16: return launch_head_dim<__half>(p, stream);
    case SK_BFLOAT16: return launch_head_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
