// Host entry points over csrc/ess_logic.cuh, so tests/test_cuda_host_logic.py can run the
// kernels' own ESS logic on a CPU (through ctypes) against safekern.reference.
// Built by the test with nvcc -shared; no GPU is touched.
#include "ess_logic.cuh"

using namespace safekern;

// out[b, r, j] = key_visible(...); end[b, r] = row_key_end(...) clipped to seqlen.
extern "C" void host_visibility(int B, int Lq, int Lk, const int32_t* q_pos,
                                const int32_t* seqlens, const int32_t* resp_start,
                                const int32_t* windows, int num_windows, int causal,
                                uint8_t* out, int32_t* end) {
  for (int b = 0; b < B; ++b) {
    const int32_t* win = windows != nullptr ? windows + (int64_t)b * num_windows * 2 : nullptr;
    const int W = windows != nullptr ? num_windows : 0;
    const bool ess = resp_start != nullptr;
    for (int r = 0; r < Lq; ++r) {
      const int pos = q_pos[b * Lq + r];
      const int e = row_key_end(pos, seqlens[b], ess, causal != 0, win, W);
      end[b * Lq + r] = e < seqlens[b] ? e : seqlens[b];
      for (int j = 0; j < Lk; ++j)
        out[((int64_t)b * Lq + r) * Lk + j] =
            key_visible(j, pos, seqlens[b], ess, ess ? resp_start[b] : 0, causal != 0, win, W);
    }
  }
}

// One head_sample state step for every row (update, then forcing); forced token or -1.
extern "C" void host_ess_step(int B, const int32_t* prompt_len, const int32_t* seq_len,
                              int32_t* mode, int32_t* flags, int32_t* switch_step,
                              int32_t* next_eval, int32_t* interval, int32_t* forced_idx,
                              int32_t* trigger_step, const uint8_t* evaluating, uint8_t* finished,
                              const int64_t* refusal_ids, int refusal_len, int refusal_skip,
                              float threshold,
                              int tau, int policy, int schedule, int period, int anneal_stop,
                              double anneal_growth, const float* p_unsafe, int64_t* forced) {
  const sk_ess_state s{prompt_len, seq_len, mode, flags, switch_step, next_eval, interval,
                       forced_idx, trigger_step, evaluating, finished, refusal_ids, refusal_len,
                       refusal_skip};
  const sk_ess_config c{threshold, tau, policy, schedule, period, anneal_stop, anneal_growth};
  for (int b = 0; b < B; ++b) {
    ess_update_state(s, c, b, p_unsafe[b]);
    forced[b] = ess_forced_token(s, policy, b);
  }
}

// Gumbel-max draws: out[i] = argmax_v logits[v] / temperature + gumbel(seed + i, row, v).
extern "C" void host_gumbel_argmax(int n, int row, int V, const float* logits, float temperature,
                                   uint64_t seed, int32_t* out) {
  for (int i = 0; i < n; ++i) {
    float best = -INFINITY;
    int arg = 0;
    for (int v = 0; v < V; ++v) {
      const float x = logits[v] / temperature + gumbel(seed + (uint64_t)i, row, v);
      if (x > best) {
        best = x;
        arg = v;
      }
    }
    out[i] = arg;
  }
}
