// Split-KV ESS decode attention: C interface (no torch). See ess_decode_attention.cu.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SK_FLOAT32 = 0, SK_FLOAT16 = 1, SK_BFLOAT16 = 2 } sk_dtype;

// All strides are in elements. q/k/v/o must have a unit stride on the head dimension.
typedef struct {
  const void* q;                   // (B, Lq, Hq, D)
  const void* k;                   // (B, Lk, Hkv, D)
  const void* v;                   // (B, Lk, Hkv, D)
  void* o;                         // (B, Lq, Hq, D), dtype of q
  float* lse;                      // (B, Hq, Lq) contiguous, or NULL
  const int32_t* q_pos;            // (B, Lq) contiguous; -1 = padding row
  const int32_t* seqlens_k;        // (B,)
  const int32_t* response_start;   // (B,), or NULL: plain (causal) attention, no [CLS] rules
  const int32_t* cls_windows;      // (B, W, 2) contiguous [start, end), or NULL
  const float* key_bias;           // (B, Hq or 1, Lk), or NULL
  // Workspace when num_splits > 1 (fp32, contiguous):
  float* o_partial;                // (num_splits, B, Lq, Hq, D)
  float* lse_partial;              // (num_splits, B, Hq, Lq)
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t bias_stride_b, bias_stride_h, bias_stride_k;  // bias_stride_h = 0 for one bias head
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, num_windows;
  int causal;
  float softmax_scale;
  int num_splits;
  sk_dtype dtype;
} sk_decode_attention_params;

// Number of KV splits that fills `num_sms` SMs without splits shorter than 256 keys.
int sk_decode_attention_num_splits(int batch, int heads_q, int heads_kv, int seqlen_q,
                                   int seqlen_k, int num_sms);

// Head dims with a compiled kernel.
int sk_decode_attention_supports_head_dim(int head_dim);

// Launch on `stream`. Returns cudaErrorInvalidValue for unsupported sizes, else the launch error.
cudaError_t sk_ess_decode_attention(const sk_decode_attention_params* params,
                                    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
