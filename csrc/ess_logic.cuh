// The ESS semantics the kernels apply per row: key visibility (DESIGN.md §3), the controller
// update and refusal forcing (§4), and the sampling noise. __host__ __device__ so that
// tests/cuda_host_check.cu runs this very code on the CPU against safekern.reference.
#pragma once

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "head_sample.h"

#define SK_HD __host__ __device__ __forceinline__

namespace safekern {

// Does a row at absolute position `pos` see key `j`? Mirrors reference ess_visibility().
SK_HD bool key_visible(int j, int pos, int seqlen, bool ess, int resp_start, bool causal,
                       const int32_t* win, int num_windows) {
  if (pos < 0 || j >= seqlen) return false;
  if (ess && pos == 0) {  // the [CLS] row: key 0 plus its windows, causality ignored
    if (j == 0) return true;
    for (int w = 0; w < num_windows; ++w)
      if (j >= win[2 * w] && j < win[2 * w + 1]) return true;
    return false;
  }
  if (causal && j > pos) return false;
  return !(ess && j == 0 && pos < resp_start);  // prompt rows do not see the [CLS] key
}

// An upper bound (exclusive) of the keys a row can see, before clipping to seqlen: lets a CTA
// skip the tiles past its rows' last key (a [CLS] row only reads its windows' span).
SK_HD int row_key_end(int pos, int seqlen, bool ess, bool causal, const int32_t* win,
                      int num_windows) {
  if (pos < 0) return 0;
  if (ess && pos == 0) {
    int end = 1;
    for (int w = 0; w < num_windows; ++w)
      if (win[2 * w] < win[2 * w + 1] && win[2 * w + 1] > end) end = win[2 * w + 1];
    return end;
  }
  return causal ? pos + 1 : seqlen;
}

// int32 arithmetic that wraps like torch's instead of being undefined on overflow.
SK_HD int32_t add_i32(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }

// safekern.reference.controller.update_state for row b, in place.
SK_HD void ess_update_state(const sk_ess_state& s, const sk_ess_config& c, int b,
                            float p_unsafe) {
  const int32_t kNever = INT_MAX;  // safekern.spec.NEVER
  const bool ev = s.evaluating[b] != 0;
  const int32_t t = s.seq_len[b];
  const int32_t n = add_i32(t, -s.prompt_len[b]);
  const int32_t mode = s.mode[b];
  const bool flag = ev && p_unsafe >= c.threshold;  // NaN never flags
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
      case SK_SCHEDULE_ANNEALING:
      case SK_SCHEDULE_CASCADE_NET: {
        nxt = add_i32(n, interval);
        if (nxt > c.anneal_stop) nxt = kNever;
        // max(interval + 1, floor(interval * growth)), clamped to NEVER // 4. The product is
        // clamped before the int conversion (out-of-range conversion is undefined in C++).
        const double grown = fmin(floor((double)interval * c.anneal_growth), (double)(kNever / 4));
        const int32_t inc = add_i32(interval, 1);
        interval = (int32_t)grown > inc ? (int32_t)grown : inc;
        if (interval > kNever / 4) interval = kNever / 4;
        break;
      }
      default: break;  // FIRST, CASCADE: never again (a probe flag may bring it), interval kept
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
    // Mid-response the refusal starts on a new line (all ids); an empty response skips it.
    if (c.policy != SK_POLICY_LOW) s.forced_idx[b] = n > 0 ? 0 : s.refusal_skip;
  }
}

// safekern.reference.controller.escalate for row b (the cascade), after ess_update_state: a
// BENIGN row whose probe score q >= threshold is evaluated at the next step.
SK_HD void ess_escalate(const sk_ess_state& s, int b, float q, float threshold) {
  if (s.mode[b] != SK_MODE_BENIGN || !(q >= threshold)) return;
  const int32_t next = add_i32(add_i32(s.seq_len[b], -s.prompt_len[b]), 1);
  if (next < s.next_eval[b]) s.next_eval[b] = next;
}

// safekern.reference.controller.forced_tokens for row b (advances the index): token or -1.
SK_HD int64_t ess_forced_token(const sk_ess_state& s, int policy, int b) {
  const int32_t idx = s.forced_idx[b];
  if (idx < 0) return -1;
  const int64_t token = s.refusal_ids[idx < s.refusal_len ? idx : s.refusal_len - 1];
  const int32_t nxt = idx + 1;
  const bool done = nxt >= s.refusal_len;
  s.forced_idx[b] = done ? -1 : nxt;
  if (done && policy == SK_POLICY_HIGH) s.finished[b] = 1;
  return token;
}

SK_HD uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Gumbel(0, 1) noise for (row, token), a counter-based hash of (seed, row, token). Computed as
// -log(E) with E = -log1p(-w) ~ Exp(1): log1pf keeps full precision as w -> 0 (fast-math logf
// would not), so E > 0 and the noise is finite.
SK_HD float gumbel(uint64_t seed, int row, int token) {
  const uint64_t counter = ((uint64_t)(uint32_t)row << 32) | (uint32_t)token;
  const uint64_t x = mix64(mix64(seed) + 0x9e3779b97f4a7c15ULL * (counter + 1));
  const float w = ((float)(x >> 40) + 0.5f) * 0x1p-24f;  // uniform in (0, 1)
  return -logf(-log1pf(-w));
}

}  // namespace safekern
