// Fused LM head + safety score + ESS state update + greedy/temperature sampling: C interface.
// See head_sample.cu. No torch.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "ess_decode_attention.h"  // sk_dtype

#ifdef __cplusplus
extern "C" {
#endif

// safekern.spec constants.
enum { SK_MODE_PENDING = 0, SK_MODE_BENIGN = 1, SK_MODE_SUSPECT = 2, SK_MODE_REFUSING = 3 };
enum { SK_POLICY_LOW = 0, SK_POLICY_MEDIUM = 1, SK_POLICY_HIGH = 2 };
// CASCADE: only the screening probe brings evaluations; CASCADE_NET: and annealing's points.
enum { SK_SCHEDULE_FIRST = 0, SK_SCHEDULE_EACH = 1, SK_SCHEDULE_PERIODIC = 2,
       SK_SCHEDULE_ANNEALING = 3, SK_SCHEDULE_CASCADE = 4, SK_SCHEDULE_CASCADE_NET = 5 };

// safekern.spec.EssState as raw (B,) device pointers, updated in place. mode == NULL: no state.
typedef struct {
  const int32_t* prompt_len;
  const int32_t* seq_len;
  int32_t* mode;
  int32_t* flags;
  int32_t* switch_step;
  int32_t* next_eval;
  int32_t* interval;
  int32_t* forced_idx;
  int32_t* trigger_step;
  const uint8_t* evaluating;  // torch.bool
  uint8_t* finished;          // torch.bool
  const int64_t* refusal_ids; // (R,): the ids of "\n" + refusal text
  int refusal_len;
  int refusal_skip;           // leading ids skipped when the response is empty (the newline)
} sk_ess_state;

// safekern.spec.EssConfig fields the decision reads.
typedef struct {
  float threshold;
  int tau, policy, schedule, period, anneal_stop;
  double anneal_growth;
} sk_ess_config;

typedef struct {
  const void* h_tok;          // (B, Dm), rows contiguous, stride h_stride
  const void* lm_head;        // (V, Dm), rows contiguous, stride w_stride
  int64_t h_stride, w_stride;
  const void* h_cls;          // (B, Dm) stride cls_stride, dtype of h_tok; NULL: no safety score
  int64_t cls_stride;
  const float* safety_w;      // (Dm,) fp32 (a two-class head passed as W[1] - W[0])
  const float* safety_b;      // (1,) fp32 or NULL
  const float* temperature;   // (B,) fp32; 0 = greedy
  const int64_t* seed;        // (1,) device seed of the counter-based RNG
  int64_t* next_tokens;       // (B,) out
  float* p_unsafe;            // (B,) out, NaN where not scored
  float* cand_val;            // workspace (B, num_tiles)
  int32_t* cand_idx;          // workspace (B, num_tiles)
  // Optional logprobs (all NULL = off): the emitted token's log_softmax(logit / T) (T = 0:
  // raw logits), before filtering, from per-tile (max, sum exp) pairs of logit / T.
  float* token_logprob;       // (B,) out
  float* lse_max;             // workspace (B, num_tiles)
  float* lse_sum;             // workspace (B, num_tiles)
  // Optional (NULL = off): (B,) flags ORed in per row, never cleared (the caller zeroes the
  // buffer and reads it when it syncs anyway): 1 = a NaN/inf logit, 2 = a NaN safety score of
  // a row that scored. The token of a flagged row stays in [0, vocab).
  int32_t* nonfinite;
  // Optional (probe_w NULL = off; needs the state): the cascade's screening probe on the token
  // row, q = sigmoid(probe_w . h_tok + probe_b), applied after the state update (ess_escalate).
  const float* probe_w;       // (Dm,) fp32
  const float* probe_b;       // (1,) fp32 or NULL
  float probe_threshold;
  float* probe_out;           // (B,) out or NULL
  sk_ess_state state;
  sk_ess_config ess;
  int batch, hidden, vocab;
  sk_dtype dtype;
} sk_head_sample_params;

// Vocab tiles of the first kernel = columns of the candidate workspace.
int sk_head_sample_num_tiles(int vocab);

cudaError_t sk_head_sample(const sk_head_sample_params* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
