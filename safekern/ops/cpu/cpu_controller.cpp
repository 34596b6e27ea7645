// The ESS controller of one CPU decode step as two fused loops over the batch (issue 11).
//
// The reference is safekern/reference/controller.py (plan_step, update_state, forced_tokens):
// ~60 small torch ops per step, which on a tiny model cost more than the [CLS] row itself.
// Here each is one pass over B rows with the same integer arithmetic (int32 fields, int32
// wrap-around like torch's, the annealing interval grown in float64 and clamped before the
// cast) and the same float32 comparison ``p_unsafe >= threshold`` (threshold rounded to
// float32 as torch rounds a Python scalar). tests/test_cpu_controller.py checks every state
// field against the reference after every step, every schedule x policy.
//
// state: the EssState tensors in the order of STATE below, all (B,) contiguous CPU tensors
// (int32; evaluating and finished bool), refusal_ids (R,) int64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

namespace {

constexpr int32_t PENDING = 0, BENIGN = 1, SUSPECT = 2, REFUSING = 3;
constexpr int32_t NEVER = 2147483647;  // spec.NEVER
// CASCADE: evaluations only after a probe flag (escalate); CASCADE_NET: and annealing's points.
enum Schedule { FIRST = 0, EACH = 1, PERIODIC = 2, ANNEALING = 3, CASCADE = 4, CASCADE_NET = 5 };
enum Policy { LOW = 0, MEDIUM = 1, HIGH = 2 };
// The order of the state tensors in both ops' ``state`` argument.
enum Field {
  PROMPT_LEN, QUERY_START, QUERY_END, SEQ_LEN, MODE, FLAGS, SWITCH_STEP, NEXT_EVAL, INTERVAL,
  FORCED_IDX, TRIGGER_STEP, EVALUATING, FINISHED, N_FIELDS
};

const char* const NAMES[N_FIELDS] = {
    "prompt_len", "query_start", "query_end", "seq_len", "mode", "flags", "switch_step",
    "next_eval", "interval", "forced_idx", "trigger_step", "evaluating", "finished"};

// int32 arithmetic that wraps like torch's int32 tensors (no signed-overflow UB).
inline int32_t add32(int32_t a, int64_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

struct View {
  int32_t* f[N_FIELDS] = {};
  bool* ev = nullptr;
  bool* fin = nullptr;
  int64_t B = 0;
};

View view(at::TensorList state) {
  TORCH_CHECK(state.size() == N_FIELDS, "cpu_controller: state must hold ", N_FIELDS,
              " tensors, got ", state.size());
  View v;
  v.B = state[0].numel();
  for (int i = 0; i < N_FIELDS; ++i) {
    const at::Tensor& t = state[i];
    const bool is_bool = i == EVALUATING || i == FINISHED;
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.numel() == v.B && t.is_contiguous() &&
                    t.scalar_type() == (is_bool ? at::kBool : at::kInt),
                "cpu_controller: state.", NAMES[i], " must be a contiguous (", v.B, ",) CPU ",
                is_bool ? "bool" : "int32", " tensor");
    if (!is_bool) v.f[i] = t.data_ptr<int32_t>();
  }
  v.ev = state[EVALUATING].data_ptr<bool>();
  v.fin = state[FINISHED].data_ptr<bool>();
  return v;
}

// plan_step: sets evaluating, returns the (B, 2, 2) int32 windows and how many rows evaluate
// (a host int: the CPU engine skips the [CLS] rows when none does, without another op).
int64_t plan_core(const View& s, int64_t first_at, int64_t r1, int64_t r2, int64_t r3,
                  int32_t* w) {
  int64_t n_ev = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    const int32_t t = s.f[SEQ_LEN][b], P = s.f[PROMPT_LEN][b], mode = s.f[MODE][b];
    const int32_t n = add32(t, -static_cast<int64_t>(P));
    const bool pending = mode == PENDING && n >= first_at;
    const bool benign = mode == BENIGN && n >= s.f[NEXT_EVAL][b];
    const bool suspect = mode == SUSPECT;
    s.ev[b] = pending || benign || suspect;
    n_ev += s.ev[b];
    int32_t w0s = 0, w0e = 0, w1s = 0, w1e = 0;
    if (pending) {
      w0s = s.f[QUERY_START][b];
      w0e = s.f[QUERY_END][b];
      w1s = P;
      w1e = add32(P, std::min<int64_t>(n, r1));
    } else if (benign) {
      w1s = std::max(P, add32(t, -r2));
      w1e = t;
    } else if (suspect) {
      const int32_t S = s.f[SWITCH_STEP][b];
      w1s = std::max(P, add32(S, -r2));
      w1e = std::min(add32(S, r3), t);
    }
    int32_t* o = w + b * 4;
    o[0] = w0s, o[1] = w0e, o[2] = w1s, o[3] = w1e;
  }
  return n_ev;
}

std::tuple<at::Tensor, int64_t> plan(at::TensorList state, int64_t first_at, int64_t r1,
                                     int64_t r2, int64_t r3) {
  View s = view(state);
  at::Tensor win = at::empty({s.B, 2, 2}, at::TensorOptions().dtype(at::kInt));
  const int64_t n_ev = plan_core(s, first_at, r1, r2, r3, win.data_ptr<int32_t>());
  return {win, n_ev};
}

// head_sample_ref's controller part: p_unsafe = scores where evaluating (NaN elsewhere; a NaN
// score of an evaluating row raises ValueError before anything changes), update_state,
// forced_tokens, and the step's tokens = forced ? refusal token : drawn.
// Returns (tokens (B,) int64, p_unsafe (B,) float32, forced (B,) bool).
struct UpdateArgs {
  int64_t refusal_skip, tau, schedule, policy, period, anneal_stop;
  double threshold, anneal_growth;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> update_core(const View& s, const float* sc,
                                                           const at::Tensor& drawn,
                                                           const at::Tensor& refusal_ids,
                                                           const UpdateArgs& a);

std::tuple<at::Tensor, at::Tensor, at::Tensor> update(
    at::TensorList state, const at::Tensor& scores, const at::Tensor& drawn,
    const at::Tensor& refusal_ids, int64_t refusal_skip, double threshold, int64_t tau,
    int64_t schedule, int64_t policy, int64_t period, double anneal_growth,
    int64_t anneal_stop) {
  View s = view(state);
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 1 && scores.numel() == s.B &&
                  scores.is_contiguous() && scores.scalar_type() == at::kFloat,
              "cpu_controller: scores must be a contiguous (", s.B, ",) float32 CPU tensor");
  return update_core(s, scores.data_ptr<float>(), drawn, refusal_ids,
                     {refusal_skip, tau, schedule, policy, period, anneal_stop, threshold,
                      anneal_growth});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> update_core(const View& s, const float* sc,
                                                           const at::Tensor& drawn,
                                                           const at::Tensor& refusal_ids,
                                                           const UpdateArgs& a) {
  const int64_t refusal_skip = a.refusal_skip, tau = a.tau, schedule = a.schedule,
                policy = a.policy, period = a.period, anneal_stop = a.anneal_stop;
  const double threshold = a.threshold, anneal_growth = a.anneal_growth;
  TORCH_CHECK(drawn.device().is_cpu() && drawn.dim() == 1 && drawn.numel() == s.B &&
                  drawn.is_contiguous() && drawn.scalar_type() == at::kLong,
              "cpu_controller: drawn must be a contiguous (", s.B, ",) int64 CPU tensor");
  TORCH_CHECK(refusal_ids.device().is_cpu() && refusal_ids.dim() == 1 &&
                  refusal_ids.numel() > 0 && refusal_ids.is_contiguous() &&
                  refusal_ids.scalar_type() == at::kLong,
              "cpu_controller: refusal_ids must be a non-empty contiguous int64 CPU tensor");
  TORCH_CHECK(schedule >= FIRST && schedule <= CASCADE_NET, "cpu_controller: bad schedule id ",
              schedule);
  TORCH_CHECK(policy >= LOW && policy <= HIGH, "cpu_controller: bad policy id ", policy);
  const float thr = static_cast<float>(threshold);
  const int64_t* dr = drawn.data_ptr<int64_t>();
  std::string bad;
  int64_t n_bad = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    if (s.ev[b] && std::isnan(sc[b])) {
      if (n_bad++ < 8) bad += (bad.empty() ? "" : ", ") + std::to_string(b);
    }
  }
  // The reference's error (reference/sampling.py, _raise_non_finite), before any state change.
  TORCH_CHECK_VALUE(n_bad == 0, "head_sample: non-finite p_unsafe in rows [", bad, "]: h_cls or "
                    "the safety head (safety_weight, safety_bias) holds NaN/inf (e.g. a weight "
                    "changed in place through .data, which the once-per-version weight check "
                    "cannot see)");
  at::Tensor p_out = at::empty({s.B}, at::TensorOptions().dtype(at::kFloat));
  float* p = p_out.data_ptr<float>();
  for (int64_t b = 0; b < s.B; ++b) p[b] = s.ev[b] ? sc[b] : std::nanf("");
  const int64_t* rid = refusal_ids.data_ptr<int64_t>();
  const int64_t R = refusal_ids.numel();
  const double cap = static_cast<double>(NEVER / 4);
  at::Tensor forced = at::empty({s.B}, at::TensorOptions().dtype(at::kBool));
  at::Tensor tokens = at::empty({s.B}, at::TensorOptions().dtype(at::kLong));  // the step's
  bool* fo = forced.data_ptr<bool>();
  int64_t* to = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    const int32_t t = s.f[SEQ_LEN][b];
    const int32_t n = add32(t, -static_cast<int64_t>(s.f[PROMPT_LEN][b]));
    const bool ev = s.ev[b];
    const bool flag = ev && p[b] >= thr;
    const bool benign_verdict = ev && !flag;
    const int32_t mode = s.f[MODE][b];
    int32_t flags = s.f[FLAGS][b];
    if (ev) flags = flag ? add32(flags, 1) : 0;
    const bool trigger = flag && (mode == PENDING || flags >= tau);
    const bool to_suspect = flag && !trigger && mode != SUSPECT;
    if (benign_verdict) {
      int32_t interval = s.f[INTERVAL][b], nxt;
      switch (schedule) {
        case FIRST: nxt = NEVER; break;
        case EACH: nxt = add32(n, 1); break;
        case PERIODIC: nxt = add32(n, period); break;
        case CASCADE: nxt = NEVER; break;
        default: {  // ANNEALING, CASCADE_NET
          const int32_t at_n = add32(n, interval);
          const double scaled = std::min(std::floor(static_cast<double>(interval) *
                                                    anneal_growth), cap);
          interval = std::min(std::max(add32(interval, 1), static_cast<int32_t>(scaled)),
                              NEVER / 4);
          nxt = at_n > anneal_stop ? NEVER : at_n;
        }
      }
      s.f[NEXT_EVAL][b] = nxt;
      s.f[INTERVAL][b] = interval;
    }
    if (to_suspect) s.f[SWITCH_STEP][b] = t;
    else if (benign_verdict) s.f[SWITCH_STEP][b] = -1;
    int32_t new_mode = mode;
    if (benign_verdict) new_mode = BENIGN;
    if (to_suspect) new_mode = SUSPECT;
    if (trigger) new_mode = REFUSING;
    s.f[MODE][b] = new_mode;
    s.f[FLAGS][b] = flags;
    if (trigger) s.f[TRIGGER_STEP][b] = t;
    int32_t idx = s.f[FORCED_IDX][b];
    if (policy != LOW && trigger) idx = n > 0 ? 0 : static_cast<int32_t>(refusal_skip);
    // forced_tokens
    const bool f = idx >= 0;
    fo[b] = f;
    to[b] = f ? rid[std::min<int64_t>(idx, R - 1)] : dr[b];
    const int32_t next = f ? add32(idx, 1) : idx;
    const bool done = f && next >= R;
    s.f[FORCED_IDX][b] = done ? -1 : next;
    if (policy == HIGH && done) s.fin[b] = true;
  }
  return {tokens, p_out, forced};
}

// Where a CPU decode step with [CLS] rows puts its two rows per sequence (the engine's
// cls_layout_ref, safekern/runtime/controller.py, is the reference): pos (B, 2) int64 RoPE
// positions (token t-1; [CLS] t-1 when cls_last else 0), q_pos (B, 2) int32 (token t-1; [CLS] 0
// when evaluating else -1, a padding row), slots (B, 2) int64 cache slots (token t-1; [CLS] 0 when
// evaluating else the spare slot, never read).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cls_layout(const at::Tensor& t_prev,
                                                          const at::Tensor& evaluating,
                                                          bool cls_last, int64_t spare_slot) {
  const int64_t B = t_prev.numel();
  TORCH_CHECK(t_prev.device().is_cpu() && t_prev.dim() == 1 && t_prev.is_contiguous() &&
                  t_prev.scalar_type() == at::kInt,
              "cpu_controller: t_prev must be a contiguous 1-D int32 CPU tensor");
  TORCH_CHECK(evaluating.device().is_cpu() && evaluating.dim() == 1 &&
                  evaluating.numel() == B && evaluating.is_contiguous() &&
                  evaluating.scalar_type() == at::kBool,
              "cpu_controller: evaluating must be a contiguous (", B, ",) bool CPU tensor");
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos = at::empty({B, 2}, i64), slots = at::empty({B, 2}, i64);
  at::Tensor q_pos = at::empty({B, 2}, at::TensorOptions().dtype(at::kInt));
  const int32_t* t = t_prev.data_ptr<int32_t>();
  const bool* ev = evaluating.data_ptr<bool>();
  int64_t* po = pos.data_ptr<int64_t>();
  int64_t* so = slots.data_ptr<int64_t>();
  int32_t* qo = q_pos.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    po[2 * b] = so[2 * b] = t[b];
    qo[2 * b] = t[b];
    po[2 * b + 1] = cls_last ? t[b] : 0;
    qo[2 * b + 1] = ev[b] ? 0 : -1;
    so[2 * b + 1] = ev[b] ? 0 : spare_slot;
  }
  return {pos, q_pos, slots};
}

// The engine's per-step trace record (safekern/runtime/controller.py, record_ref, is the
// reference), in place at column col[0]: out_p = p, out_ev = evaluating & emit, out_t = seq_len,
// and reason_refusal |= emit & finished.
void record(const at::Tensor& evaluating, const at::Tensor& seq_len, const at::Tensor& finished,
            const at::Tensor& p, const at::Tensor& emit, const at::Tensor& col,
            const at::Tensor& out_p, const at::Tensor& out_ev, const at::Tensor& out_t,
            const at::Tensor& reason_refusal) {
  const int64_t B = evaluating.numel();
  auto vec = [&](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.numel() == B && t.is_contiguous() &&
                    t.scalar_type() == dt,
                "cpu_controller: ", name, " must be a contiguous (", B, ",) ", dt, " CPU tensor");
  };
  vec(evaluating, at::kBool, "evaluating");
  vec(seq_len, at::kInt, "seq_len");
  vec(finished, at::kBool, "finished");
  vec(p, at::kFloat, "p");
  vec(emit, at::kBool, "emit");
  vec(reason_refusal, at::kBool, "reason_refusal");
  TORCH_CHECK(col.device().is_cpu() && col.numel() == 1 && col.scalar_type() == at::kLong,
              "cpu_controller: col must be a one-element int64 CPU tensor");
  const int64_t T = out_p.dim() == 2 ? out_p.size(1) : -1;
  const int64_t c = col.data_ptr<int64_t>()[0];
  auto mat = [&](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == B && t.size(1) == T &&
                    t.is_contiguous() && t.scalar_type() == dt,
                "cpu_controller: ", name, " must be a contiguous (", B, ", T) ", dt,
                " CPU tensor like out_p");
  };
  mat(out_p, at::kFloat, "out_p");
  mat(out_ev, at::kBool, "out_ev");
  mat(out_t, at::kInt, "out_t");
  TORCH_CHECK(c >= 0 && c < T, "cpu_controller: col ", c, " is outside [0, ", T, ")");
  const bool* ev = evaluating.data_ptr<bool>();
  const bool* em = emit.data_ptr<bool>();
  const bool* fin = finished.data_ptr<bool>();
  const int32_t* t = seq_len.data_ptr<int32_t>();
  const float* pp = p.data_ptr<float>();
  float* op = out_p.data_ptr<float>();
  bool* oe = out_ev.data_ptr<bool>();
  int32_t* ot = out_t.data_ptr<int32_t>();
  bool* rr = reason_refusal.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    op[b * T + c] = pp[b];
    oe[b * T + c] = ev[b] && em[b];
    ot[b * T + c] = t[b];
    rr[b] = rr[b] || (em[b] && fin[b]);
  }
}

// A CPU decode step's controller prologue in one call. The engine's reference sequence
// (step_begin_ref, safekern/runtime/controller.py): t_prev = lengths + step_idx - 1;
// state.seq_len = t_prev + 1; plan_step; cls_layout_ref; cache rows flat = row_base + slots.
// Returns (windows (B, 2, 2) int32, n_ev, pos int64, q_pos int32, flat int64): (B, 2), (B, 2),
// (2B,) for the token and [CLS] rows; with skip_idle and no evaluating row, the token rows' alone: (B, 1), (B, 1), (B,).
std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor, at::Tensor> step_begin(
    at::TensorList state, const at::Tensor& lengths, const at::Tensor& step_idx,
    const at::Tensor& row_base, int64_t first_at, int64_t r1, int64_t r2, int64_t r3,
    bool cls_last, int64_t spare_slot, bool skip_idle) {
  View s = view(state);
  const int64_t B = s.B;
  TORCH_CHECK(lengths.device().is_cpu() && lengths.dim() == 1 && lengths.numel() == B &&
                  lengths.is_contiguous() && lengths.scalar_type() == at::kInt,
              "cpu_controller: lengths must be a contiguous (", B, ",) int32 CPU tensor");
  TORCH_CHECK(row_base.device().is_cpu() && row_base.dim() == 1 && row_base.numel() == B &&
                  row_base.is_contiguous() && row_base.scalar_type() == at::kLong,
              "cpu_controller: row_base must be a contiguous (", B, ",) int64 CPU tensor");
  TORCH_CHECK(step_idx.device().is_cpu() && step_idx.numel() == 1 &&
                  step_idx.scalar_type() == at::kLong,
              "cpu_controller: step_idx must be a one-element int64 CPU tensor");
  TORCH_CHECK(spare_slot >= 0, "cpu_controller: spare_slot must be >= 0, got ", spare_slot);
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t* base = row_base.data_ptr<int64_t>();
  // step_idx.int() - 1, then + lengths: int32 arithmetic as torch does it
  const int32_t step = add32(static_cast<int32_t>(step_idx.data_ptr<int64_t>()[0]), -1);
  for (int64_t b = 0; b < B; ++b) s.f[SEQ_LEN][b] = add32(add32(len[b], step), 1);
  at::Tensor win = at::empty({B, 2, 2}, at::TensorOptions().dtype(at::kInt));
  const int64_t n_ev = plan_core(s, first_at, r1, r2, r3, win.data_ptr<int32_t>());
  const int64_t L = skip_idle && n_ev == 0 ? 1 : 2;
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos = at::empty({B, L}, i64), flat = at::empty({B * L}, i64);
  at::Tensor q_pos = at::empty({B, L}, at::TensorOptions().dtype(at::kInt));
  int64_t* po = pos.data_ptr<int64_t>();
  int64_t* fo = flat.data_ptr<int64_t>();
  int32_t* qo = q_pos.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int32_t t = add32(len[b], step);
    po[L * b] = t;
    qo[L * b] = t;
    fo[L * b] = base[b] + t;
    if (L == 2) {
      po[2 * b + 1] = cls_last ? t : 0;
      qo[2 * b + 1] = s.ev[b] ? 0 : -1;
      fo[2 * b + 1] = base[b] + (s.ev[b] ? 0 : spare_slot);
    }
  }
  return {win, n_ev, pos, q_pos, flat};
}

// The rows of a decode step without ESS (the engine's decode_rows_ref,
// safekern/runtime/controller.py, is the reference): t_prev = lengths + step_idx - 1 (int32 as
// torch), pos = t_prev (B, 1) int64, q_pos = t_prev (B, 1) int32, flat cache rows row_base + t_prev
// (B,) int64, seqlens_k = t_prev + 1 (B,) int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decode_rows(
    const at::Tensor& lengths, const at::Tensor& step_idx, const at::Tensor& row_base) {
  const int64_t B = lengths.numel();
  TORCH_CHECK(lengths.device().is_cpu() && lengths.dim() == 1 && lengths.is_contiguous() &&
                  lengths.scalar_type() == at::kInt,
              "cpu_controller: lengths must be a contiguous 1-D int32 CPU tensor");
  TORCH_CHECK(row_base.device().is_cpu() && row_base.dim() == 1 && row_base.numel() == B &&
                  row_base.is_contiguous() && row_base.scalar_type() == at::kLong,
              "cpu_controller: row_base must be a contiguous (", B, ",) int64 CPU tensor");
  TORCH_CHECK(step_idx.device().is_cpu() && step_idx.numel() == 1 &&
                  step_idx.scalar_type() == at::kLong,
              "cpu_controller: step_idx must be a one-element int64 CPU tensor");
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int64_t* base = row_base.data_ptr<int64_t>();
  const int32_t step = add32(static_cast<int32_t>(step_idx.data_ptr<int64_t>()[0]), -1);
  auto i64 = at::TensorOptions().dtype(at::kLong), i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor pos = at::empty({B, 1}, i64), flat = at::empty({B}, i64);
  at::Tensor q_pos = at::empty({B, 1}, i32), seqlens = at::empty({B}, i32);
  int64_t* po = pos.data_ptr<int64_t>();
  int64_t* fo = flat.data_ptr<int64_t>();
  int32_t* qo = q_pos.data_ptr<int32_t>();
  int32_t* so = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int32_t t = add32(len[b], step);
    po[b] = t;
    qo[b] = t;
    fo[b] = base[b] + t;
    so[b] = add32(t, 1);
  }
  return {pos, q_pos, flat, seqlens};
}

// sigmoid(h @ w + b) as (B,) contiguous float32, through safety_score_ref's ATen ops (same
// bits): the safety head's score of the [CLS] rows and the cascade probe's of the token rows.
// `what` names the (w, b) pair in the error.
at::Tensor linear_score(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                        const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == h.size(1) &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) &&
                  b.device().is_cpu() && b.dim() == 0 && b.scalar_type() == w.scalar_type(),
              "cpu_controller: ", what, " must be a (hidden,) weight and a 0-d bias, float32 "
              "or float64 CPU tensors");
  return at::sigmoid(at::add(at::matmul(h.to(w.scalar_type()), w), b)).to(at::kFloat)
      .contiguous();
}

// The cascade's screening step (reference/controller.py, escalate), after update_core: a
// BENIGN row whose probe score sigmoid(h_tok . w + b)
// (safety_score_ref's ATen ops, same bits) is >= threshold (float32 compare) is evaluated at
// the next step: next_eval = min(next_eval, n + 1). Writes the scores to probe_out (B,).
void escalate_core(const View& s, const at::Tensor& h_tok, const at::Tensor& w,
                   const at::Tensor& b, double threshold, float* probe_out) {
  TORCH_CHECK(h_tok.device().is_cpu() && h_tok.dim() == 2 && h_tok.size(0) == s.B,
              "cpu_controller: h_tok must be a (", s.B, ", hidden) CPU tensor");
  const at::Tensor q = linear_score(h_tok, w, b, "the probe");
  const float* qp = q.data_ptr<float>();
  const float thr = static_cast<float>(threshold);
  for (int64_t i = 0; i < s.B; ++i) {
    if (probe_out != nullptr) probe_out[i] = qp[i];
    if (s.f[MODE][i] != BENIGN || !(qp[i] >= thr)) continue;
    const int32_t n = add32(s.f[SEQ_LEN][i], -static_cast<int64_t>(s.f[PROMPT_LEN][i]));
    s.f[NEXT_EVAL][i] = std::min(s.f[NEXT_EVAL][i], add32(n, 1));
  }
}

// escalate as an op of its own (tests/test_cpu_controller.py compares it with the reference).
void escalate(at::TensorList state, const at::Tensor& h_tok, const at::Tensor& w,
              const at::Tensor& b, double threshold, const at::Tensor& probe_out) {
  View s = view(state);
  TORCH_CHECK(probe_out.device().is_cpu() && probe_out.dim() == 1 && probe_out.numel() == s.B &&
                  probe_out.is_contiguous() && probe_out.scalar_type() == at::kFloat,
              "cpu_controller: probe_out must be a contiguous (", s.B, ",) float32 CPU tensor");
  escalate_core(s, h_tok, w, b, threshold, probe_out.data_ptr<float>());
}

// A CPU decode step's controller epilogue in one call after the draw. The engine's reference
// sequence: scores = safety_score_ref's sigmoid(h_cls.to(cd) @ w + b).float() with the same
// ATen ops (same bits), then update (p_unsafe, state, forced tokens), then record at column
// col with emit, then done |= finished. h_cls is (B, hidden), or (B, L, hidden) whose last row
// per sequence is the [CLS] row. With the cascade's probe (h_tok, probe_w, probe_b defined),
// escalate_core after the update. Returns (tokens (B,) int64, p_unsafe (B,) float32).
std::tuple<at::Tensor, at::Tensor> step_end(
    at::TensorList state, const at::Tensor& h_cls_in, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& drawn, const at::Tensor& refusal_ids, int64_t refusal_skip,
    double threshold, int64_t tau, int64_t schedule, int64_t policy, int64_t period,
    double anneal_growth, int64_t anneal_stop, const at::Tensor& emit, const at::Tensor& col,
    const at::Tensor& out_p, const at::Tensor& out_ev, const at::Tensor& out_t,
    const at::Tensor& reason_refusal, const at::Tensor& done,
    const c10::optional<at::Tensor>& h_tok, const c10::optional<at::Tensor>& probe_w,
    const c10::optional<at::Tensor>& probe_b, double probe_threshold) {
  View s = view(state);
  const bool probe = h_tok.has_value() && h_tok->defined();
  TORCH_CHECK(probe == (probe_w.has_value() && probe_w->defined()) &&
                  probe == (probe_b.has_value() && probe_b->defined()),
              "cpu_controller: h_tok, probe_w and probe_b are given together or not at all");
  TORCH_CHECK(h_cls_in.device().is_cpu() && (h_cls_in.dim() == 2 || h_cls_in.dim() == 3) &&
                  h_cls_in.size(0) == s.B,
              "cpu_controller: h_cls must be a (", s.B, ", hidden) or (", s.B,
              ", L, hidden) CPU tensor");
  TORCH_CHECK(done.device().is_cpu() && done.dim() == 1 && done.numel() == s.B &&
                  done.is_contiguous() && done.scalar_type() == at::kBool,
              "cpu_controller: done must be a contiguous (", s.B, ",) bool CPU tensor");
  const at::Tensor h_cls =
      h_cls_in.dim() == 3 ? h_cls_in.select(1, h_cls_in.size(1) - 1) : h_cls_in;
  const at::Tensor scores = linear_score(h_cls, w, b, "the safety head");
  auto out = update_core(s, scores.data_ptr<float>(), drawn, refusal_ids,
                         {refusal_skip, tau, schedule, policy, period, anneal_stop, threshold,
                          anneal_growth});
  if (probe) escalate_core(s, *h_tok, *probe_w, *probe_b, probe_threshold, nullptr);
  const at::Tensor& p = std::get<1>(out);
  record(state[EVALUATING], state[SEQ_LEN], state[FINISHED], p, emit, col, out_p, out_ev, out_t,
         reason_refusal);
  bool* dn = done.data_ptr<bool>();
  for (int64_t i = 0; i < s.B; ++i) dn[i] = dn[i] || s.fin[i];
  return {std::get<0>(out), p};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(safekern_cpu, m) {
  m.def("ess_plan(Tensor[] state, int first_at, int r1, int r2, int r3) -> (Tensor, int)",
        &plan);
  m.def("ess_update(Tensor[] state, Tensor scores, Tensor drawn, Tensor refusal_ids, "
        "int refusal_skip, float threshold, int tau, int schedule, int policy, int period, "
        "float anneal_growth, int anneal_stop) -> (Tensor, Tensor, Tensor)", &update);
  m.def("ess_record(Tensor evaluating, Tensor seq_len, Tensor finished, Tensor p, Tensor emit, "
        "Tensor col, Tensor(a!) out_p, Tensor(b!) out_ev, Tensor(c!) out_t, "
        "Tensor(d!) reason_refusal) -> ()", &record);
  m.def("ess_step_begin(Tensor[] state, Tensor lengths, Tensor step_idx, Tensor row_base, "
        "int first_at, int r1, int r2, int r3, bool cls_last, int spare_slot, bool skip_idle) "
        "-> (Tensor, int, Tensor, Tensor, Tensor)", &step_begin);
  m.def("decode_rows(Tensor lengths, Tensor step_idx, Tensor row_base) -> "
        "(Tensor, Tensor, Tensor, Tensor)", &decode_rows);
  m.def("ess_step_end(Tensor[] state, Tensor h_cls, Tensor w, Tensor b, Tensor drawn, "
        "Tensor refusal_ids, int refusal_skip, float threshold, int tau, int schedule, "
        "int policy, int period, float anneal_growth, int anneal_stop, Tensor emit, Tensor col, "
        "Tensor(a!) out_p, Tensor(b!) out_ev, Tensor(c!) out_t, Tensor(d!) reason_refusal, "
        "Tensor(e!) done, Tensor? h_tok=None, Tensor? probe_w=None, Tensor? probe_b=None, "
        "float probe_threshold=1.0) -> (Tensor, Tensor)", &step_end);
  m.def("ess_escalate(Tensor[] state, Tensor h_tok, Tensor w, Tensor b, float threshold, "
        "Tensor(a!) probe_out) -> ()", &escalate);
  m.def("ess_cls_layout(Tensor t_prev, Tensor evaluating, bool cls_last, int spare_slot) -> "
        "(Tensor, Tensor, Tensor)", &cls_layout);
}
