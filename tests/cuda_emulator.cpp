// Runs the csrc/ kernels and launchers on CPU threads, for tests/test_cuda_emulated.py and the
// emulated cuda backend of tests/test_hostile_inputs.py (tests/cuda_tools.py builds it).
//
// Not a CUDA emulator in general: just enough of the programming model for these kernels.
// Each launch runs its blocks one after another; a block's threads are fibers (ucontext) on
// one OS thread, switched round-robin whenever one waits at a barrier: __syncthreads waits
// for the block, a warp shuffle exchanges values through a per-warp slot array between two
// warp barriers. __shared__ becomes a function-local static (one copy, shared by the block's
// threads, reused by the next block). This checks indexing, tiling, masking, the online
// softmax, split/combine and the reductions; it cannot see data races, memory-model or
// performance problems (compute-sanitizer on a GPU does).
// Built with g++ (not nvcc), so the CUDA headers give host-only declarations.
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define __shared__ static
#define __launch_bounds__(...)
#define cudaGetLastError sk_emu_cuda_get_last_error

#include <cuda_runtime_api.h>
#include <vector_types.h>

namespace sk_emu {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

ucontext_t g_scheduler;
std::vector<Fiber> g_fibers;
std::vector<uint64_t> g_slots;        // shuffle exchange, one per thread
Barrier g_block_barrier;
std::vector<Barrier> g_warp_barriers;
std::function<void()> g_body;

void wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) swapcontext(&g_fibers[g_thread_idx.x].ctx, &g_scheduler);
}

void fiber_main() {
  g_body();
  g_fibers[g_thread_idx.x].done = true;
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const unsigned n = block.x, warps = (n + 31) / 32;
  g_grid_dim = grid;
  g_block_dim = block;
  g_body = [&] { kernel(args...); };
  g_fibers = std::vector<Fiber>(n);
  g_slots.assign(warps * 32, 0);
  g_warp_barriers.assign(warps, Barrier{32, 0, 0});
  for (Fiber& f : g_fibers) f.stack.resize(1 << 16);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = {x, y, z};
        g_block_barrier = Barrier{n, 0, 0};
        for (Fiber& f : g_fibers) {
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &g_scheduler;
          makecontext(&f.ctx, fiber_main, 0);
          f.done = false;
        }
        for (bool running = true; running;) {
          running = false;
          for (unsigned t = 0; t < n; ++t) {
            if (g_fibers[t].done) continue;
            g_thread_idx = {t, 0, 0};
            swapcontext(&g_scheduler, &g_fibers[t].ctx);
            running = true;
          }
        }
      }
}

}  // namespace sk_emu

#define threadIdx sk_emu::g_thread_idx
#define blockIdx sk_emu::g_block_idx
#define blockDim sk_emu::g_block_dim
#define gridDim sk_emu::g_grid_dim
#define SK_LAUNCH(kernel, grid, block, stream, ...) \
  sk_emu::launch(dim3(grid), dim3(block), kernel, __VA_ARGS__)

inline void __syncthreads() { sk_emu::wait(sk_emu::g_block_barrier); }

template <typename T>
T __shfl_xor_sync(unsigned, T x, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  std::memcpy(&sk_emu::g_slots[t], &x, sizeof(T));
  sk_emu::wait(sk_emu::g_warp_barriers[warp]);
  T y;
  std::memcpy(&y, &sk_emu::g_slots[warp * 32 + (lane ^ offset)], sizeof(T));
  sk_emu::wait(sk_emu::g_warp_barriers[warp]);
  return y;
}

template <typename T>
T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
using std::max;
using std::min;

extern "C" cudaError_t sk_emu_cuda_get_last_error() { return cudaSuccess; }

#include "../csrc/ess_decode_attention.cu"
#include "../csrc/head_sample.cu"

// Flat-argument entry points, so ctypes does not have to mirror the parameter structs.
extern "C" int emu_ess_decode_attention(const void* q, const void* k, const void* v, void* o,
                                        float* lse, const int32_t* q_pos,
                                        const int32_t* seqlens_k, const int32_t* response_start,
                                        const int32_t* cls_windows, const float* key_bias,
                                        float* o_partial, float* lse_partial,
                                        const int64_t* strides /* q, k, v, o, bias: b, s|h.. */,
                                        const int* sizes /* B Lq Lk Hq Hkv D W */, int causal,
                                        float scale, int num_splits, int dtype) {
  sk_decode_attention_params p{};
  p.q = q, p.k = k, p.v = v, p.o = o, p.lse = lse, p.q_pos = q_pos, p.seqlens_k = seqlens_k;
  p.response_start = response_start, p.cls_windows = cls_windows, p.key_bias = key_bias;
  p.o_partial = o_partial, p.lse_partial = lse_partial;
  p.q_stride_b = strides[0], p.q_stride_s = strides[1], p.q_stride_h = strides[2];
  p.k_stride_b = strides[3], p.k_stride_s = strides[4], p.k_stride_h = strides[5];
  p.v_stride_b = strides[6], p.v_stride_s = strides[7], p.v_stride_h = strides[8];
  p.o_stride_b = strides[9], p.o_stride_s = strides[10], p.o_stride_h = strides[11];
  p.bias_stride_b = strides[12], p.bias_stride_h = strides[13], p.bias_stride_k = strides[14];
  p.batch = sizes[0], p.seqlen_q = sizes[1], p.seqlen_k = sizes[2], p.heads_q = sizes[3];
  p.heads_kv = sizes[4], p.head_dim = sizes[5], p.num_windows = sizes[6];
  p.causal = causal, p.softmax_scale = scale, p.num_splits = num_splits;
  p.dtype = (sk_dtype)dtype;
  return (int)sk_ess_decode_attention(&p, nullptr);
}

extern "C" int emu_head_sample(const void* h_tok, const void* lm_head, const void* h_cls,
                               const float* safety_w, const float* safety_b,
                               const float* temperature, const int64_t* seed,
                               int64_t* next_tokens, float* p_unsafe, float* cand_val,
                               int32_t* cand_idx, void** state /* 11 fields or NULL */,
                               const int64_t* refusal_ids, int refusal_len, int refusal_skip,
                               float threshold,
                               int tau, int policy, int schedule, int period, int anneal_stop,
                               double anneal_growth, int batch, int hidden, int vocab,
                               int dtype, float* token_logprob, float* lse_max,
                               float* lse_sum, int32_t* nonfinite, const float* probe_w,
                               const float* probe_b, float probe_threshold, float* probe_out) {
  sk_head_sample_params p{};
  p.h_tok = h_tok, p.lm_head = lm_head, p.h_stride = hidden, p.w_stride = hidden;
  p.h_cls = h_cls, p.cls_stride = hidden, p.safety_w = safety_w, p.safety_b = safety_b;
  p.temperature = temperature, p.seed = seed, p.next_tokens = next_tokens;
  p.p_unsafe = p_unsafe, p.cand_val = cand_val, p.cand_idx = cand_idx;
  p.token_logprob = token_logprob, p.lse_max = lse_max, p.lse_sum = lse_sum;
  p.nonfinite = nonfinite;
  p.probe_w = probe_w, p.probe_b = probe_b, p.probe_threshold = probe_threshold;
  p.probe_out = probe_out;
  if (state != nullptr) {
    p.state = sk_ess_state{(const int32_t*)state[0], (const int32_t*)state[1],
                           (int32_t*)state[2], (int32_t*)state[3], (int32_t*)state[4],
                           (int32_t*)state[5], (int32_t*)state[6], (int32_t*)state[7],
                           (int32_t*)state[8], (const uint8_t*)state[9], (uint8_t*)state[10],
                           refusal_ids, refusal_len, refusal_skip};
  }
  p.ess = sk_ess_config{threshold, tau, policy, schedule, period, anneal_stop, anneal_growth};
  p.batch = batch, p.hidden = hidden, p.vocab = vocab, p.dtype = (sk_dtype)dtype;
  return (int)sk_head_sample(&p, nullptr);
}
