// The only torch-aware file of the CUDA backend: adapts tensors to the framework-free
// launchers of ess_decode_attention.cu and head_sample.cu, checks what the kernels assume
// (device, dtype, shape, strides) with errors that name the argument, runs on the current
// stream, and registers torch.ops.safekern.cuda_* (a library fragment, so other safekern ops
// defined elsewhere, e.g. from Python, never clash with it).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "ess_decode_attention.h"
#include "head_sample.h"

namespace {

sk_dtype to_sk_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return SK_FLOAT32;
    case at::kHalf: return SK_FLOAT16;
    case at::kBFloat16: return SK_BFLOAT16;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), ", expected ", device);
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n,
                  const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_cuda_status(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> ess_decode_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
    const at::Tensor& seqlens_k, const std::optional<at::Tensor>& response_start,
    const std::optional<at::Tensor>& cls_windows, const std::optional<at::Tensor>& key_bias,
    double softmax_scale, bool causal, int64_t num_splits) {
  const at::Device device = q.device();
  check_cuda(q, "q", device);
  check_cuda(k, "k", device);
  check_cuda(v, "v", device);
  const sk_dtype dtype = to_sk_dtype(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k and v must have the dtype of q (", q.scalar_type(), "), got ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "q, k, v must be 4-D (batch, seqlen, heads, head_dim)");
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k must have shape (", B, ", Lk, Hkv, ", D,
              "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "heads of q (", Hq, ") must be a multiple of heads of k (",
              Hkv, ")");
  TORCH_CHECK(sk_decode_attention_supports_head_dim((int)D), "head_dim ", D,
              " has no compiled CUDA kernel (32, 64, 128)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "q, k, v must have a contiguous last (head_dim) dimension");
  TORCH_CHECK(Lk < INT32_MAX && B * Lq * Hq < INT32_MAX, "sizes exceed int32 indexing");
  check_cuda(q_pos, "q_pos", device);
  TORCH_CHECK(q_pos.scalar_type() == at::kInt && q_pos.dim() == 2 && q_pos.size(0) == B &&
                  q_pos.size(1) == Lq && q_pos.is_contiguous(),
              "q_pos must be a contiguous int32 tensor of shape (", B, ", ", Lq, "), got ",
              q_pos.scalar_type(), " ", q_pos.sizes());
  check_vector(seqlens_k, "seqlens_k", at::kInt, B, device);
  if (response_start.has_value())
    check_vector(*response_start, "response_start", at::kInt, B, device);
  int64_t num_windows = 0;
  if (cls_windows.has_value()) {
    TORCH_CHECK(response_start.has_value(), "cls_windows requires response_start");
    const at::Tensor& w = *cls_windows;
    check_cuda(w, "cls_windows", device);
    TORCH_CHECK(w.scalar_type() == at::kInt && w.dim() == 3 && w.size(0) == B && w.size(2) == 2 &&
                    w.is_contiguous(),
                "cls_windows must be a contiguous int32 tensor of shape (", B, ", W, 2), got ",
                w.scalar_type(), " ", w.sizes());
    num_windows = w.size(1);
  }
  if (key_bias.has_value()) {
    const at::Tensor& kb = *key_bias;
    check_cuda(kb, "key_bias", device);
    TORCH_CHECK(kb.scalar_type() == at::kFloat && kb.dim() == 3 && kb.size(0) == B &&
                    (kb.size(1) == Hq || kb.size(1) == 1) && kb.size(2) == Lk,
                "key_bias must be float32 of shape (", B, ", ", Hq, " or 1, ", Lk, "), got ",
                kb.scalar_type(), " ", kb.sizes());
  }
  TORCH_CHECK(softmax_scale > 0, "softmax_scale must be positive, got ", softmax_scale);
  TORCH_CHECK(num_splits >= 0 && num_splits <= 256, "num_splits must be in [0, 256] (0 = auto)");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (num_splits == 0) {
    int sms = 0;
    check_cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()),
                      "ess_decode_attention");
    num_splits = sk_decode_attention_num_splits((int)B, (int)Hq, (int)Hkv, (int)Lq, (int)Lk, sms);
  }
  at::Tensor o_partial, lse_partial;
  if (num_splits > 1) {
    o_partial = at::empty({num_splits, B, Lq, Hq, D}, q.options().dtype(at::kFloat));
    lse_partial = at::empty({num_splits, B, Hq, Lq}, q.options().dtype(at::kFloat));
  }

  sk_decode_attention_params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_pos = q_pos.data_ptr<int32_t>();
  p.seqlens_k = seqlens_k.data_ptr<int32_t>();
  p.response_start = opt_ptr<int32_t>(response_start);
  p.cls_windows = opt_ptr<int32_t>(cls_windows);
  p.key_bias = opt_ptr<float>(key_bias);
  p.o_partial = num_splits > 1 ? o_partial.data_ptr<float>() : nullptr;
  p.lse_partial = num_splits > 1 ? lse_partial.data_ptr<float>() : nullptr;
  p.q_stride_b = q.stride(0), p.q_stride_s = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_s = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_s = v.stride(1), p.v_stride_h = v.stride(2);
  p.o_stride_b = o.stride(0), p.o_stride_s = o.stride(1), p.o_stride_h = o.stride(2);
  if (key_bias.has_value()) {
    p.bias_stride_b = key_bias->stride(0);
    p.bias_stride_h = key_bias->size(1) == 1 ? 0 : key_bias->stride(1);
    p.bias_stride_k = key_bias->stride(2);
  }
  p.batch = (int)B, p.seqlen_q = (int)Lq, p.seqlen_k = (int)Lk;
  p.heads_q = (int)Hq, p.heads_kv = (int)Hkv, p.head_dim = (int)D;
  p.num_windows = (int)num_windows;
  p.causal = causal ? 1 : 0;
  p.softmax_scale = (float)softmax_scale;
  p.num_splits = (int)num_splits;
  p.dtype = dtype;
  check_cuda_status(sk_ess_decode_attention(&p, c10::cuda::getCurrentCUDAStream(device.index())),
                    "ess_decode_attention");
  return {o, lse};
}

// state: empty, or in this order: prompt_len, seq_len, mode, flags, switch_step, next_eval,
// interval, forced_idx, trigger_step (int32), evaluating, finished (bool), refusal_ids (int64).
// nonfinite: (B,) int32 flags the kernel ORs in (1: NaN/inf logits, 2: a NaN safety score), in
// place; the caller zeroes it and reads it (safekern.ops.cuda_backend).
constexpr const char* kStateNames[] = {"prompt_len", "seq_len", "mode", "flags", "switch_step",
                                       "next_eval", "interval", "forced_idx", "trigger_step",
                                       "evaluating", "finished", "refusal_ids"};
constexpr size_t kStateSize = sizeof(kStateNames) / sizeof(kStateNames[0]);

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_sample(
    const at::Tensor& h_tok, const at::Tensor& lm_head_weight,
    const std::optional<at::Tensor>& h_cls, const std::optional<at::Tensor>& safety_weight,
    const std::optional<at::Tensor>& safety_bias, const at::Tensor& temperature,
    const at::Tensor& seed, at::TensorList state, int64_t refusal_skip, double threshold,
    int64_t tau, int64_t policy,
    int64_t schedule, int64_t period, int64_t anneal_stop, double anneal_growth, bool logprobs,
    const at::Tensor& nonfinite, const std::optional<at::Tensor>& probe_weight,
    const std::optional<at::Tensor>& probe_bias, double probe_threshold,
    const std::optional<at::Tensor>& probe_out) {
  const at::Device device = h_tok.device();
  check_cuda(h_tok, "h_tok", device);
  check_cuda(lm_head_weight, "lm_head_weight", device);
  const sk_dtype dtype = to_sk_dtype(h_tok, "h_tok");
  TORCH_CHECK(h_tok.dim() == 2 && h_tok.stride(1) == 1,
              "h_tok must be 2-D (B, hidden) with contiguous rows, got ", h_tok.sizes());
  const int64_t B = h_tok.size(0), Dm = h_tok.size(1);
  TORCH_CHECK(lm_head_weight.scalar_type() == h_tok.scalar_type() && lm_head_weight.dim() == 2 &&
                  lm_head_weight.size(1) == Dm && lm_head_weight.stride(1) == 1,
              "lm_head_weight must be (V, ", Dm, ") ", h_tok.scalar_type(),
              " with contiguous rows, got ", lm_head_weight.scalar_type(), " ",
              lm_head_weight.sizes());
  const int64_t V = lm_head_weight.size(0);
  TORCH_CHECK(V > 0 && V < INT32_MAX && Dm < INT32_MAX && B < INT32_MAX,
              "sizes exceed int32 indexing");
  if (h_cls.has_value()) {
    check_cuda(*h_cls, "h_cls", device);
    TORCH_CHECK(h_cls->scalar_type() == h_tok.scalar_type() && h_cls->dim() == 2 &&
                    h_cls->size(0) == B && h_cls->size(1) == Dm && h_cls->stride(1) == 1,
                "h_cls must be (", B, ", ", Dm, ") ", h_tok.scalar_type(),
                " with contiguous rows, got ", h_cls->scalar_type(), " ", h_cls->sizes());
    TORCH_CHECK(safety_weight.has_value(), "safety_weight is required with h_cls");
    check_vector(*safety_weight, "safety_weight", at::kFloat, Dm, device);
  }
  if (safety_bias.has_value()) check_vector(*safety_bias, "safety_bias", at::kFloat, 1, device);
  check_vector(temperature, "temperature", at::kFloat, B, device);
  check_vector(seed, "seed", at::kLong, 1, device);
  check_vector(nonfinite, "nonfinite", at::kInt, B, device);
  TORCH_CHECK(state.empty() || state.size() == kStateSize, "state must hold 0 or ", kStateSize,
              " tensors, got ", state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    const bool is_bool = i == 9 || i == 10;
    if (i + 1 == kStateSize) {
      check_cuda(state[i], "refusal_ids", device);
      TORCH_CHECK(state[i].scalar_type() == at::kLong && state[i].dim() == 1 &&
                      state[i].numel() > 0 && state[i].is_contiguous(),
                  "refusal_ids must be a non-empty contiguous int64 vector");
    } else {
      check_vector(state[i], kStateNames[i], is_bool ? at::kBool : at::kInt, B, device);
    }
  }
  if (probe_weight.has_value()) {
    TORCH_CHECK(!state.empty(),
                "probe_weight requires the state (the probe schedules evaluations)");
    check_vector(*probe_weight, "probe_weight", at::kFloat, Dm, device);
  }
  if (probe_bias.has_value()) check_vector(*probe_bias, "probe_bias", at::kFloat, 1, device);
  if (probe_out.has_value()) check_vector(*probe_out, "probe_out", at::kFloat, B, device);
  if (!state.empty()) {
    TORCH_CHECK(h_cls.has_value(), "state requires h_cls");
    TORCH_CHECK(refusal_skip >= 0 && refusal_skip < state[kStateSize - 1].numel(),
                "refusal_skip must be in [0, len(refusal_ids)), got ", refusal_skip);
  }

  const c10::cuda::CUDAGuard guard(device);
  const int num_tiles = sk_head_sample_num_tiles((int)V);
  at::Tensor next_tokens = at::empty({B}, h_tok.options().dtype(at::kLong));
  at::Tensor p_unsafe = at::empty({B}, h_tok.options().dtype(at::kFloat));
  at::Tensor cand_val = at::empty({B, num_tiles}, h_tok.options().dtype(at::kFloat));
  at::Tensor cand_idx = at::empty({B, num_tiles}, h_tok.options().dtype(at::kInt));
  // Logprobs: the emitted token's logprob (B,) and the (max, sum exp) workspaces.
  const int64_t nlp = logprobs ? B : 0, nlt = logprobs ? num_tiles : 0;
  at::Tensor token_logprob = at::empty({nlp}, h_tok.options().dtype(at::kFloat));
  at::Tensor lse_max = at::empty({nlp, nlt}, h_tok.options().dtype(at::kFloat));
  at::Tensor lse_sum = at::empty({nlp, nlt}, h_tok.options().dtype(at::kFloat));

  sk_head_sample_params p{};
  p.h_tok = h_tok.data_ptr();
  p.lm_head = lm_head_weight.data_ptr();
  p.h_stride = h_tok.stride(0);
  p.w_stride = lm_head_weight.stride(0);
  p.h_cls = h_cls.has_value() ? h_cls->data_ptr() : nullptr;
  p.cls_stride = h_cls.has_value() ? h_cls->stride(0) : 0;
  p.safety_w = h_cls.has_value() ? safety_weight->data_ptr<float>() : nullptr;
  p.safety_b = opt_ptr<float>(safety_bias);
  p.temperature = temperature.data_ptr<float>();
  p.seed = seed.data_ptr<int64_t>();
  p.next_tokens = next_tokens.data_ptr<int64_t>();
  p.p_unsafe = p_unsafe.data_ptr<float>();
  p.cand_val = cand_val.data_ptr<float>();
  p.cand_idx = cand_idx.data_ptr<int32_t>();
  p.token_logprob = logprobs ? token_logprob.data_ptr<float>() : nullptr;
  p.lse_max = logprobs ? lse_max.data_ptr<float>() : nullptr;
  p.lse_sum = logprobs ? lse_sum.data_ptr<float>() : nullptr;
  p.nonfinite = nonfinite.data_ptr<int32_t>();
  p.probe_w = opt_ptr<float>(probe_weight);
  p.probe_b = opt_ptr<float>(probe_bias);
  p.probe_threshold = (float)probe_threshold;
  p.probe_out = probe_out.has_value() ? probe_out->data_ptr<float>() : nullptr;
  if (!state.empty()) {
    sk_ess_state& s = p.state;
    s.prompt_len = state[0].data_ptr<int32_t>();
    s.seq_len = state[1].data_ptr<int32_t>();
    s.mode = state[2].data_ptr<int32_t>();
    s.flags = state[3].data_ptr<int32_t>();
    s.switch_step = state[4].data_ptr<int32_t>();
    s.next_eval = state[5].data_ptr<int32_t>();
    s.interval = state[6].data_ptr<int32_t>();
    s.forced_idx = state[7].data_ptr<int32_t>();
    s.trigger_step = state[8].data_ptr<int32_t>();
    s.evaluating = reinterpret_cast<const uint8_t*>(state[9].data_ptr<bool>());
    s.finished = reinterpret_cast<uint8_t*>(state[10].data_ptr<bool>());
    s.refusal_ids = state[11].data_ptr<int64_t>();
    s.refusal_len = (int)state[11].numel();
    s.refusal_skip = (int)refusal_skip;
  }
  p.ess.threshold = (float)threshold;
  p.ess.tau = (int)tau;
  p.ess.policy = (int)policy;
  p.ess.schedule = (int)schedule;
  p.ess.period = (int)period;
  p.ess.anneal_stop = (int)anneal_stop;
  p.ess.anneal_growth = anneal_growth;
  p.batch = (int)B, p.hidden = (int)Dm, p.vocab = (int)V;
  p.dtype = dtype;
  check_cuda_status(sk_head_sample(&p, c10::cuda::getCurrentCUDAStream(device.index())),
                    "head_sample");
  return {next_tokens, p_unsafe, token_logprob};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(safekern, m) {
  m.def(
      "cuda_ess_decode_attention(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor seqlens_k, "
      "Tensor? response_start, Tensor? cls_windows, Tensor? key_bias, float softmax_scale, "
      "bool causal, int num_splits) -> (Tensor, Tensor)");
  m.def(
      "cuda_head_sample(Tensor h_tok, Tensor lm_head_weight, Tensor? h_cls, Tensor? safety_weight, "
      "Tensor? safety_bias, Tensor temperature, Tensor seed, Tensor(a!)[] state, int refusal_skip, "
      "float threshold, "
      "int tau, int policy, int schedule, int period, int anneal_stop, float anneal_growth, "
      "bool logprobs, Tensor(b!) nonfinite, Tensor? probe_weight=None, Tensor? probe_bias=None, "
      "float probe_threshold=1.0, Tensor(c!)? probe_out=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(safekern, CUDA, m) {
  m.impl("cuda_ess_decode_attention", &ess_decode_attention);
  m.impl("cuda_head_sample", &head_sample);
}

// `import safekern._C` loads this library, whose static initialisers register the ops above;
// the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
