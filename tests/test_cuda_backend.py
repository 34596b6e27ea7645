"""backend="cuda" (csrc/) against the reference: attention, head + safety + sampling, state.

The GPU tests (``@pytest.mark.gpu``) need a CUDA device and the extension (built by
``pip install -e . --no-build-isolation``, else JIT-built here by ``load_jit``). The CPU tests
at the top check what the backend declines, so ``auto`` falls back, without a GPU.
"""
import math

import pytest
import torch

import safekern
from cuda_tools import assert_step_matches
from safekern.ops import cuda_backend, dispatch
from safekern.reference import ess_attention_ref, plan_step
from safekern.reference.sampling import head_sample_ref, safety_score_ref
from safekern.spec import EssConfig, EssState, SamplingParams

CUDA = torch.device("cuda")
DTYPE_ID = dict(ids=lambda d: str(d).replace("torch.", ""))  # -k "float16" selects cases


# --------------------------------------------------------------------------- CPU: can_run

def _attn_ctx(**kw):
    ctx = dict(device=CUDA, dtype=torch.float16, head_dim=128, seqlen_q=2, seqlen_k=4096,
               requires_grad=False)
    ctx.update(kw)
    return ctx


@pytest.mark.parametrize("kw, reason", [
    (dict(device=torch.device("cpu")), "needs CUDA tensors"),
    (dict(requires_grad=True), "no backward"),
    (dict(dtype=torch.float64), "float16, bfloat16 and float32"),
    (dict(head_dim=80), "head_dim"),
    (dict(seqlen_q=17), "decode kernel"),
])
def test_attention_can_run_declines(kw, reason):
    assert reason in cuda_backend.ess_attention_can_run(**_attn_ctx(**kw))


@pytest.mark.parametrize("sampling, reason", [
    (SamplingParams(temperature=1.0, top_k=50), "top_k=50"),
    (SamplingParams(temperature=1.0, top_p=0.9), "top_p=0.9"),
    (SamplingParams(temperature=1.0, min_p=0.1), "min_p=0.1"),
    (SamplingParams(temperature=1.0, top_k=torch.tensor([0, 0])), "per-row top_k"),
])
def test_head_sample_can_run_declines_filters(sampling, reason):
    why = cuda_backend.head_sample_can_run(device=CUDA, dtype=torch.bfloat16, vocab=1000,
                                           sampling=sampling)
    assert why is not None and reason in why


def test_head_sample_can_run_accepts_greedy_and_temperature_up_to_the_build():
    for sampling in (SamplingParams(), SamplingParams(temperature=0.7, top_k=1000),
                     SamplingParams(temperature=torch.tensor([0.0, 1.0]))):
        # Only the extension can be missing: top_k >= vocab is "off".
        assert cuda_backend.head_sample_can_run(device=CUDA, dtype=torch.float16, vocab=1000,
                                                sampling=sampling) == \
            cuda_backend.extension_error()


def test_auto_prefers_triton_until_measured():
    assert cuda_backend.AUTO_TABLE == {}, "entries need the measurement they came from"
    order = dispatch._AUTO_ORDER["ess_attention"](**_attn_ctx())
    assert order[0] == "triton" and "cuda" not in order
    order = dispatch._AUTO_ORDER["head_sample"](device=CUDA, batch=64, vocab=128256)
    assert order[0] == "triton" and "cuda" not in order


def test_explicit_cuda_on_cpu_raises_with_reason():
    q = torch.randn(1, 1, 2, 64)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        safekern.ess_attention(q, q, q, backend="cuda")


# --------------------------------------------------------------------------- GPU helpers

@pytest.fixture(scope="module")
def ext():
    if cuda_backend.extension_error() is not None:
        cuda_backend.load_jit()
    assert cuda_backend.extension_error() is None


def _poison_allocator():
    """Hand NaN-filled blocks to the next allocations, so unwritten outputs fail the tests."""
    torch.empty(1 << 24, device=CUDA).fill_(float("nan"))
    torch.cuda.synchronize()


def i32(x):
    return torch.tensor(x, dtype=torch.int32, device=CUDA)


def _assert_attention_close(got, q, k, v, tol_scale=2.0, **kw):
    want = ess_attention_ref(q.double(), k.double(), v.double(), **kw)
    same_dtype = ess_attention_ref(q, k, v, compute_dtype=q.dtype, **kw)
    ref_err = (same_dtype.double() - want).abs().max().item()
    atol = tol_scale * ref_err + (1e-5 if q.dtype == torch.float32 else 1e-3)
    err = (got.double() - want).abs().max().item()
    assert not torch.isnan(got).any(), "NaN in the output: an element was not written"
    assert err <= atol, f"max error {err:.3g} > {atol:.3g} (reference in {q.dtype}: {ref_err:.3g})"


def _decode_case(B, Lk, Hq, Hkv, D, dtype, seed, Lq=2, bias_heads=None, bhsd=False):
    """KV cache + one token row (at t-1) and one [CLS] row (0, or -1 = not evaluating)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(CUDA, dtype)  # noqa: E731
    q = rnd(B, Lq, Hq, D)
    if bhsd:  # a (B, H, S, D) cache viewed as (B, S, H, D)
        k, v = rnd(B, Hkv, Lk, D).transpose(1, 2), rnd(B, Hkv, Lk, D).transpose(1, 2)
    else:
        k, v = rnd(B, Lk, Hkv, D), rnd(B, Lk, Hkv, D)
    seqlens = torch.randint(1, Lk + 1, (B,), generator=g)
    seqlens[0] = Lk
    P = torch.minimum(seqlens, torch.randint(1, max(2, Lk // 2), (B,), generator=g))
    q_pos = torch.full((B, Lq), -1, dtype=torch.int32)
    q_pos[:, 0] = seqlens - 1
    if Lq > 1:
        q_pos[:, 1] = torch.where(torch.arange(B) % 3 == 2, -1, 0)  # some rows do not evaluate
    windows = torch.zeros(B, 2, 2, dtype=torch.int32)
    for b in range(B):
        t, p = int(seqlens[b]), int(P[b])
        windows[b, 0] = torch.tensor([min(1, p), min(3, p)])
        windows[b, 1] = torch.tensor([max(p, t - 10), t])
    kw = dict(q_pos=q_pos.to(CUDA), seqlens_k=seqlens.int().to(CUDA),
              response_start=P.int().to(CUDA), cls_windows=windows.to(CUDA))
    if bias_heads is not None:
        kw["key_bias"] = torch.randn(B, bias_heads, Lk, generator=g).to(CUDA)
    return q, k, v, kw


# --------------------------------------------------------------------------- GPU: attention

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], **DTYPE_ID)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (4, 1), (3, 3)])       # GQA 4:1, MQA, MHA
@pytest.mark.parametrize("Lk", [97, 1000, 5003])                    # odd; several KV splits
def test_ess_decode_step_matches_reference(ext, dtype, D, Hq, Hkv, Lk):
    q, k, v, kw = _decode_case(3, Lk, Hq, Hkv, D, dtype, seed=Lk + D + Hq,
                               bias_heads=1 if Hq != 3 else Hq)
    _poison_allocator()
    got = safekern.ess_attention(q, k, v, backend="cuda", **kw)
    _assert_attention_close(got, q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], **DTYPE_ID)
def test_strided_bhsd_cache_and_lse(ext, dtype):
    q, k, v, kw = _decode_case(4, 777, 8, 2, 64, dtype, seed=1, bias_heads=8, bhsd=True)
    assert k.stride(-1) == 1 and not k.is_contiguous()
    o, lse = safekern.ess_attention(q, k, v, backend="cuda", return_lse=True, **kw)
    _assert_attention_close(o, q, k, v, **kw)
    _, want = ess_attention_ref(q.double(), k.double(), v.double(), return_lse=True, **kw)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), want[fin], atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("Lq", [1, 2, 5])
def test_plain_causal_decode_default_q_pos(ext, Lq):
    """No response_start: plain causal attention, bottom-right aligned, ragged seqlens_k."""
    g = torch.Generator(device="cpu").manual_seed(Lq)
    B, Lk, Hq, Hkv, D = 5, 300, 8, 2, 128
    q = torch.randn(B, Lq, Hq, D, generator=g).to(CUDA, torch.bfloat16)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(CUDA, torch.bfloat16)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(CUDA, torch.bfloat16)
    seqlens = i32([300, 1, 2, 150, 3])  # rows before position 0 are padding (-1)
    got = safekern.ess_attention(q, k, v, seqlens_k=seqlens, backend="cuda")
    _assert_attention_close(got, q, k, v, seqlens_k=seqlens)


@pytest.mark.gpu
def test_rows_at_position_zero_and_last(ext):
    """q_pos 0: [CLS] row in ESS mode (key 0 + windows), key 0 only otherwise; t-1: all keys
    except key 0 for a prompt row; an empty window and a padding row."""
    q, k, v, _ = _decode_case(2, 64, 4, 2, 64, torch.float32, seed=7, Lq=2)
    q_pos = i32([[0, 63], [0, -1]])
    seqlens = i32([64, 40])
    for ess in (dict(response_start=i32([70, 5]), cls_windows=i32([[[5, 5], [10, 20]],
                                                                   [[0, 0], [30, 64]]])),
                dict(response_start=i32([3, 3])), {}):
        kw = dict(q_pos=q_pos, seqlens_k=seqlens, **ess)
        _poison_allocator()
        got = safekern.ess_attention(q, k, v, backend="cuda", **kw)
        _assert_attention_close(got, q, k, v, **kw)
        assert torch.equal(got[1, 1], torch.zeros_like(got[1, 1]))          # padding row


@pytest.mark.gpu
def test_rows_that_see_nothing_output_zero(ext):
    q, k, v, _ = _decode_case(2, 50, 4, 4, 64, torch.float16, seed=3, Lq=2)
    o, lse = safekern.ess_attention(q, k, v, q_pos=i32([[-1, -1], [-1, 5]]),
                                    seqlens_k=i32([0, 6]), return_lse=True, backend="cuda")
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    assert torch.equal(o[1, 0], torch.zeros_like(o[1, 0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1, :, 1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_split_count_does_not_change_the_result(ext, num_splits):
    q, k, v, kw = _decode_case(2, 2049, 8, 2, 128, torch.float32, seed=11, bias_heads=1)
    scale = 128 ** -0.5
    o, lse = torch.ops.safekern.cuda_ess_decode_attention(
        q, k, v, kw["q_pos"], kw["seqlens_k"], kw["response_start"], kw["cls_windows"],
        kw["key_bias"], scale, True, num_splits)
    _assert_attention_close(o, q, k, v, **kw)


@pytest.mark.gpu
def test_bindings_reject_bad_input(ext):
    q = torch.randn(1, 1, 4, 64, device=CUDA)
    k = torch.randn(1, 8, 2, 64, device=CUDA)
    pos, sl = i32([[3]]), i32([8])
    op = torch.ops.safekern.cuda_ess_decode_attention
    q48, k48 = q[..., :48].contiguous(), k[..., :48].contiguous()
    with pytest.raises(RuntimeError, match="head_dim"):
        op(q48, k48, k48, pos, sl, None, None, None, 1.0, True, 0)
    with pytest.raises(RuntimeError, match="q_pos"):
        op(q, k, k, pos.long(), sl, None, None, None, 1.0, True, 0)
    with pytest.raises(RuntimeError, match="key_bias"):
        op(q, k, k, pos, sl, None, None, torch.zeros(1, 3, 8, device=CUDA), 1.0, True, 0)


# --------------------------------------------------------------------------- GPU: head_sample

def _head_case(B, Dm, V, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(B, Dm, generator=g).to(CUDA, dtype)
    w = (torch.randn(V, Dm, generator=g) / math.sqrt(Dm)).to(CUDA, dtype)
    return h, w


def _check_greedy(tokens, h, w):
    logits = h.double() @ w.double().t()
    top2 = logits.topk(2, dim=-1).values
    ref = logits.argmax(-1)
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1)
    assert torch.equal(tokens[clear], ref[clear]), (tokens, ref)
    # Near-ties: the chosen token must still be a maximal one within rounding.
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)
    assert (top2[:, 0] - chosen <= 1e-2 * top2[:, 0].abs().clamp(min=1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], **DTYPE_ID)
@pytest.mark.parametrize("B, Dm, V", [(5, 64, 111), (13, 100, 32000), (64, 4096, 128256 // 4)])
def test_greedy_tokens_and_scores(ext, dtype, B, Dm, V):
    h, w = _head_case(B, Dm, V, dtype, seed=B + V)
    h_cls = torch.randn(B, Dm, device=CUDA).to(dtype)
    sw = torch.randn(Dm, device=CUDA)
    _poison_allocator()
    tokens, p = safekern.head_sample(h, w, h_cls=h_cls, safety_weight=sw, safety_bias=0.25,
                                     backend="cuda")
    assert tokens.dtype == torch.int64 and tokens.shape == (B,)
    _check_greedy(tokens, h, w)
    torch.testing.assert_close(p, safety_score_ref(h_cls, sw, 0.25), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_two_class_head_and_no_safety(ext):
    h, w = _head_case(6, 128, 1000, torch.bfloat16, seed=5)
    h_cls = torch.randn(6, 128, device=CUDA).to(torch.bfloat16)
    W2, b2 = torch.randn(2, 128, device=CUDA), torch.randn(2, device=CUDA)
    _, p = safekern.head_sample(h, w, h_cls=h_cls, safety_weight=W2, safety_bias=b2,
                                backend="cuda")
    torch.testing.assert_close(p, safety_score_ref(h_cls, W2, b2), atol=1e-5, rtol=1e-4)
    tokens, p = safekern.head_sample(h, w, backend="cuda")
    assert torch.isnan(p).all()
    _check_greedy(tokens, h, w)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["low", "medium", "high"])
@pytest.mark.parametrize("schedule", ["first", "each", "periodic", "annealing"])
def test_state_transitions_match_reference_over_random_traces(ext, policy, schedule):
    """Same verdicts -> identical state, p_unsafe and tokens as head_sample_ref, step by step."""
    B, Dm, V, steps = 16, 64, 300, 60
    ess = EssConfig(policy=policy, schedule=schedule, tau=2, period=3, anneal_stop=30)
    g = torch.Generator(device="cpu").manual_seed(sum(map(ord, policy + schedule)))
    P = torch.randint(4, 12, (B,), generator=g)
    qs = torch.randint(1, 3, (B,), generator=g)
    ours = EssState.create(P.tolist(), qs.tolist(), (P - 1).tolist(), [7, 8, 9], ess,
                           device=CUDA)
    ref = ours.clone()
    _, w = _head_case(B, Dm, V, torch.float32, seed=1)
    sw = torch.randn(Dm, device=CUDA)
    unsafe_rate = torch.rand(B, generator=g)  # some rows flag often, some rarely
    for step in range(steps):
        for s in (ours, ref):
            s.seq_len.copy_((P + step).int().to(CUDA))
        plan_step(ours, ess)
        plan_step(ref, ess)
        # Logits of +-(1..3): verdicts far from the threshold, so rounding cannot flip them.
        z = torch.where(torch.rand(B, generator=g) < unsafe_rate, 1.0, -1.0) * \
            (1 + 2 * torch.rand(B, generator=g))
        h_cls = z[:, None].to(CUDA) * sw / sw.dot(sw)
        # Token logits with one clear maximum, so rounding cannot flip a greedy token either.
        h_step = 10 * w[torch.randint(0, V, (B,), generator=g).to(CUDA)]
        t_ours, p_ours = safekern.head_sample(h_step, w, h_cls=h_cls, safety_weight=sw,
                                              state=ours, ess=ess, backend="cuda")
        t_ref, p_ref = head_sample_ref(h_step, w, h_cls=h_cls, safety_weight=sw, state=ref,
                                       ess=ess)
        assert_step_matches(ours, ref, t_ours, t_ref, p_ours, p_ref, step, atol=1e-5, rtol=1e-4)


def _sample_counts(h, w, temperature, n_calls, seed):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    counts = torch.zeros(h.shape[0], w.shape[0], device=CUDA)
    for _ in range(n_calls):
        tok, _ = safekern.head_sample(h, w, sampling=SamplingParams(temperature=temperature),
                                      generator=gen, backend="cuda")
        counts.scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=counts.dtype))
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], **DTYPE_ID)
def test_temperature_sampling_frequencies(ext, dtype):
    B, Dm, V, n = 32, 64, 111, 500  # 16000 draws per distribution (rows share h)
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, Dm, generator=g).expand(B, Dm).contiguous().to(CUDA, dtype)
    w = (2 * torch.randn(V, Dm, generator=g) / math.sqrt(Dm)).to(CUDA, dtype)
    temp = 0.7
    counts = _sample_counts(h, w, temp, n, seed=1).sum(0)
    N = counts.sum()
    probs = torch.softmax((h[0].float() @ w.float().t()) / temp, dim=-1)
    freq = counts / N
    bound = 5 * torch.sqrt(probs * (1 - probs) / N) + 1e-4
    assert ((freq - probs).abs() <= bound).all(), (freq - probs).abs().max()


@pytest.mark.gpu
def test_per_row_temperature_seed_and_generator(ext):
    h, w = _head_case(8, 64, 500, torch.float16, seed=2)
    temp = torch.tensor([0.0, 1.0] * 4, device=CUDA)
    sp = SamplingParams(temperature=temp, seed=123)
    a, _ = safekern.head_sample(h, w, sampling=sp, backend="cuda")
    b, _ = safekern.head_sample(h, w, sampling=sp, backend="cuda")
    assert torch.equal(a, b), "same seed must give the same tokens"
    _check_greedy(a[0::2], h[0::2], w)
    draws = torch.stack([safekern.head_sample(h, w, sampling=SamplingParams(temperature=temp,
                                                                            seed=s),
                                              backend="cuda")[0] for s in range(20)])
    assert (draws[:, 1::2] != draws[0, 1::2]).any(), "different seeds never changed a sample"
    one_step = lambda gen: safekern.head_sample(  # noqa: E731
        h, w, sampling=SamplingParams(temperature=1.0), generator=gen, backend="cuda")[0]
    gen = torch.Generator(device=CUDA).manual_seed(0)
    xs = [one_step(gen) for _ in range(10)]
    assert any(not torch.equal(xs[0], x) for x in xs[1:]), "the generator was not advanced"
    assert torch.equal(xs[0], one_step(torch.Generator(device=CUDA).manual_seed(0))), \
        "the same generator state must give the same tokens"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], **DTYPE_ID)
def test_non_finite_flags_and_errors_like_triton_and_torch(ext, dtype):
    """NaN/inf logits and NaN scores on a real GPU, over several vocab tiles: the cuda kernel
    flags the same rows as the Triton kernel into a caller's buffer (the engine's path),
    ``head_sample(backend="cuda")`` raises the torch backend's message word for word for a
    weight NaN'ed through ``.data`` (tests/test_hostile_inputs.py has the per-case probe), and
    under CUDA-graph capture nothing is read on the host (a sync would break the capture)."""
    from safekern.ops.head_sample import raise_non_finite

    B, Dm, V = 9, 128, 1000
    h, w = _head_case(B, Dm, V, dtype, seed=3)
    h_cls = torch.randn(B, Dm, device=CUDA).to(dtype)
    sw = torch.randn(Dm, device=CUDA)
    bad_h, bad_cls = h.clone(), h_cls.clone()
    bad_h[2] = float("nan")
    bad_h[5, 7] = float("inf")
    bad_cls[4, 0] = float("nan")
    want = [0, 0, 1, 0, 2, 1, 0, 0, 0]
    for backend in ("triton", "cuda"):
        _, fn = dispatch.choose("head_sample", backend, device=CUDA, dtype=dtype, batch=B,
                                vocab=V, hidden=Dm, sampling=SamplingParams())
        flags = torch.zeros(B, dtype=torch.int32, device=CUDA)
        tok, _ = fn(bad_h, w, h_cls=bad_cls, safety_weight=sw, safety_bias=None, state=None,
                    ess=None, sampling=SamplingParams(), generator=None, nonfinite=flags)
        assert flags.tolist() == want, backend
        assert bool(((tok >= 0) & (tok < V)).all()), backend
        with pytest.raises(ValueError, match=r"non-finite logits in rows \[2, 5\]"):
            raise_non_finite(flags)

    messages = {}
    for backend in ("torch", "triton", "cuda"):
        for sp in (SamplingParams(), SamplingParams(temperature=0.8, seed=1)):
            w2, sw2 = w.clone(), sw.clone()
            safekern.head_sample(h, w2, h_cls=h_cls, safety_weight=sw2, sampling=sp,
                                 backend=backend)                     # the weight checks pass
            w2.data[17, 3] = float("nan")
            with pytest.raises(ValueError) as err:
                safekern.head_sample(h, w2, h_cls=h_cls, safety_weight=sw2, sampling=sp,
                                     backend=backend)
            messages[backend, "logits", sp.temperature] = str(err.value)
            w2.data[17, 3] = 0.0
            sw2.data[0] = float("nan")
            with pytest.raises(ValueError) as err:
                safekern.head_sample(h, w2, h_cls=h_cls, safety_weight=sw2, sampling=sp,
                                     backend=backend)
            messages[backend, "p_unsafe", sp.temperature] = str(err.value)
    for (backend, what, temp), msg in messages.items():
        assert msg == messages["torch", what, temp], (backend, what, temp)
        assert f"non-finite {what} in rows" in msg

    # CUDA graph: the wrapper allocates its own flags but, with value checks off during
    # capture, never reads them; replays give in-range tokens for the NaN rows.
    static_h = bad_h.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, on finite inputs
        safekern.head_sample(h, w, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, _ = safekern.head_sample(static_h, w, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert bool(((tok >= 0) & (tok < V)).all())
