"""Training recipe: collator layout, phase masks through the reference attention, joint loss,
the kernel path vs the reference, Trainer (DDP) and FSDP2 under torchrun (2 CPU processes) vs
one process, the embedded dataset, the tiny CLI."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from safekern.data import KINDS, is_refusal, load_split
from safekern.training.trainer import IGNORE, EssCollator, EssForTraining, compute_loss, ess_loss
from tiny_ess import make_tiny_ess_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_ess_model(seed=0)


def _rows():
    rows = load_split("train")
    pick = {k: next(r for r in rows if r["kind"] == k) for k in KINDS}
    return [pick["benign"], pick["malicious"], pick["prefill"]]


# ------------------------------------------------------------------------------- collator

def test_collator_alignment_layout(tiny):
    model, tok = tiny
    rows = _rows()
    b = EssCollator(tok, phase="alignment")(rows)
    cls_id = model.safekern.cls_id
    B, L = b["input_ids"].shape
    assert (b["input_ids"][:, 0] == cls_id).all() and (b["input_ids"][:, 1] == tok.bos_token_id).all()
    assert b["safety_labels"].tolist() == [0.0, 1.0, 1.0]
    for i, r in enumerate(rows):
        n, P = int(b["seqlens"][i]), int(b["response_start"][i])
        ids, lab = b["input_ids"][i], b["labels"][i]
        qs, qe = b["query_span"][i].tolist()
        # The query span decodes to the user message, the windows are exactly that span.
        assert tok.decode(ids[qs:qe]) == r["prompt"]
        assert b["cls_windows"][i].tolist() == [[qs, qe]]
        assert P > qe and tok.decode(ids[1:P]).endswith("<|assistant|>\n")
        n_pre = len(tok(r["prefill"], add_special_tokens=False)["input_ids"]) if r["prefill"] else 0
        assert tok.decode(ids[P:P + n_pre]) == r["prefill"]
        # LM targets: the response after the prefill, ending with EOS; nothing else.
        assert (lab[:P + n_pre] == IGNORE).all() and (lab[n:] == IGNORE).all()
        assert torch.equal(lab[P + n_pre:n], ids[P + n_pre:n])
        assert tok.decode(ids[P + n_pre:n], skip_special_tokens=True) == r["response"]
        assert int(ids[n - 1]) == tok.eos_token_id
        assert (ids[n:] == tok.pad_token_id).all()
    assert b["response_start"].dtype == torch.int32 and b["cls_windows"].shape == (B, 1, 2)


def test_collator_pretraining_layout(tiny):
    _, tok = tiny
    rows = _rows() + [{"text": "plain text for continued pretraining", "label": 0}]
    b = EssCollator(tok, phase="pretraining")(rows)
    L = b["input_ids"].shape[1]
    assert (b["response_start"] == L).all()                # nobody sees [CLS]
    for i in range(len(rows)):
        n = int(b["seqlens"][i])
        assert b["cls_windows"][i].tolist() == [[1, n]]      # [CLS] sees every token
        lab = b["labels"][i]
        assert lab[0] == IGNORE and (lab[n:] == IGNORE).all()
        assert torch.equal(lab[1:n], b["input_ids"][i, 1:n])


def test_collator_validation(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="phase"):
        EssCollator(tok, phase="dpo")
    with pytest.raises(ValueError, match="cls_token"):
        EssCollator(tok, cls_token="[NOPE]")
    col = EssCollator(tok)
    with pytest.raises(ValueError, match="label"):
        col([{"prompt": "hi", "response": "yo", "label": 2}])
    with pytest.raises(ValueError, match="pretraining"):
        col([{"text": "hi"}])
    with pytest.raises(ValueError, match="response"):
        col([{"prompt": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        col([])
    with pytest.raises(ValueError, match="max_length"):
        EssCollator(tok, max_length=8)([{"prompt": "a long prompt " * 4, "response": "x"}])


# ---------------------------------------------------------------------------- phase masks

def _forward(model, batch):
    with torch.no_grad():
        h = model.model(input_ids=batch["input_ids"], response_start=batch["response_start"],
                        cls_windows=batch["cls_windows"], use_cache=False,
                        safekern_backend="torch").last_hidden_state
    return h


def _with_cls_embedding(model, fn):
    emb = model.get_input_embeddings().weight
    cls_id = model.safekern.cls_id
    saved = emb.data[cls_id].clone()
    try:
        with torch.no_grad():
            emb[cls_id] = torch.randn_like(saved) * 3
        return fn()
    finally:
        with torch.no_grad():
            emb[cls_id] = saved


def test_alignment_masks(tiny):
    """Prompt rows never read [CLS]; response rows do; [CLS] reads only its query span."""
    model, tok = tiny
    b = EssCollator(tok, phase="alignment")(_rows())
    h0 = _forward(model, b)
    h1 = _with_cls_embedding(model, lambda: _forward(model, b))
    for i in range(h0.shape[0]):
        P, n = int(b["response_start"][i]), int(b["seqlens"][i])
        torch.testing.assert_close(h1[i, 1:P], h0[i, 1:P], rtol=0, atol=1e-6)
        assert (h1[i, P:n] - h0[i, P:n]).abs().amax() > 1e-3
    # Changing the response must not move the [CLS] row (it only reads the query span).
    b2 = {k: v.clone() for k, v in b.items()}
    P = int(b2["response_start"][0])
    b2["input_ids"][0, P:int(b2["seqlens"][0])] = tok.convert_tokens_to_ids("Ġthe")
    h2 = _forward(model, b2)
    torch.testing.assert_close(h2[0, 0], h0[0, 0], rtol=0, atol=1e-6)
    # ...while changing the query does.
    qs = int(b2["query_span"][0, 0])
    b2["input_ids"][0, qs] = tok.convert_tokens_to_ids("Ġthe")
    assert (_forward(model, b2)[0, 0] - h0[0, 0]).abs().amax() > 1e-3


def test_pretraining_masks(tiny):
    """Nobody reads [CLS]; [CLS] reads everything up to the last token."""
    model, tok = tiny
    b = EssCollator(tok, phase="pretraining")(_rows())
    h0 = _forward(model, b)
    h1 = _with_cls_embedding(model, lambda: _forward(model, b))
    for i in range(h0.shape[0]):
        n = int(b["seqlens"][i])
        torch.testing.assert_close(h1[i, 1:n], h0[i, 1:n], rtol=0, atol=1e-6)
    b2 = {k: v.clone() for k, v in b.items()}
    n = int(b2["seqlens"][0])
    b2["input_ids"][0, n - 1] = tok.convert_tokens_to_ids("Ġthe")
    assert (_forward(model, b2)[0, 0] - h0[0, 0]).abs().amax() > 1e-3


# ----------------------------------------------------------------------------------- loss

def test_ess_loss_matches_manual(tiny):
    model, tok = tiny
    b = EssCollator(tok)(_rows())
    wrapped = EssForTraining(model)
    loss, out = compute_loss(wrapped, b, cls_weight=0.1)
    logits, lab = out["logits"].double(), b["labels"]
    nll, count = 0.0, 0
    for i in range(lab.shape[0]):
        for t in range(1, lab.shape[1]):
            if lab[i, t] != IGNORE:
                nll -= torch.log_softmax(logits[i, t - 1], -1)[lab[i, t]]
                count += 1
    p = torch.sigmoid(out["cls_logits"].double())
    y = b["safety_labels"].double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss.double(), nll / count + 0.1 * bce, rtol=1e-5, atol=1e-5)
    # The safety head reads the [CLS] row through model.safety_head.
    h = model.model(input_ids=b["input_ids"], response_start=b["response_start"],
                    cls_windows=b["cls_windows"], use_cache=False).last_hidden_state
    torch.testing.assert_close(out["cls_logits"], model.safety_head(h[:, 0])[:, 0])


def test_ess_loss_validation():
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match="labels"):
        ess_loss(logits, torch.zeros(2), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2),
                 cls_weight=0.1)
    with pytest.raises(ValueError, match="cls_logits"):
        ess_loss(logits, torch.zeros(3), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2),
                 cls_weight=0.1)
    with pytest.raises(ValueError, match="cls_weight"):
        ess_loss(logits, torch.zeros(2), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2),
                 cls_weight=-1.0)


def test_wrapper_validation(tiny):
    from transformers import LlamaForCausalLM

    from safekern.models.tiny import tiny_llama_config

    with pytest.raises(TypeError, match="safety_head"):
        EssForTraining(LlamaForCausalLM(tiny_llama_config(300, num_hidden_layers=1)))
    model, _ = tiny
    impl = model.config._attn_implementation
    try:
        model.config._attn_implementation = "sdpa"
        with pytest.raises(ValueError, match="safekern"):
            EssForTraining(model)
    finally:
        model.config._attn_implementation = impl


def test_loss_decreases():
    model, tok = make_tiny_ess_model(seed=1)
    wrapped = EssForTraining(model)
    batch = EssCollator(tok)(load_split("train")[:16])
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    hist = []
    for _ in range(10):
        loss, out = compute_loss(wrapped, batch, cls_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append((float(out["lm"]), float(out["cls"])))
    assert hist[-1][0] < 0.8 * hist[0][0]
    assert hist[-1][1] < hist[0][1]


def test_kernel_path_trains_like_the_reference():
    """The recipe through the Triton kernels (forward + backward; interpreter on a CPU): the
    same loss curve and parameters as through the reference, step by step."""
    runs = {}
    for backend in ("torch", "triton"):
        model, tok = make_tiny_ess_model(seed=3)
        wrapped = EssForTraining(model, attention_backend=backend)
        batch = EssCollator(tok)(_rows())
        opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
        losses, grads = [], None
        for _ in range(3):
            loss, _ = compute_loss(wrapped, batch, cls_weight=1.0)
            opt.zero_grad()
            loss.backward()
            if grads is None:
                grads = torch.cat([p.grad.flatten() for p in wrapped.parameters()])
            opt.step()
            losses.append(float(loss))
        runs[backend] = (torch.tensor(losses), grads,
                         torch.cat([p.detach().flatten() for p in wrapped.parameters()]))
    (ref_loss, ref_grad, ref_par), (loss, grad, par) = runs["torch"], runs["triton"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    # Adam normalises each coordinate: tiny gradient differences move near-zero-gradient
    # parameters by up to ~lr * 1e-2 after 3 steps
    torch.testing.assert_close(par, ref_par, rtol=0, atol=1e-4)
    assert loss[-1] < loss[0]
    with pytest.raises(ValueError, match="attention_backend"):
        EssForTraining(make_tiny_ess_model(seed=3)[0], attention_backend="flash")


# ------------------------------------------------------------------------ distributed run

def _run_script(out, *args, nproc=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    script = str(ROOT / "tests" / "dist_train_script.py")
    # --standalone: a private rendezvous on a free port (parallel CI jobs cannot collide).
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(nproc)] if nproc else []) + [script, str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "Signal 6 (SIGABRT)" in proc.stderr:
        # A gloo worker aborting at exit is not what this test checks: run once more, loudly,
        # and require a clean second run. (The script now destroys its process group before
        # exit, which ended the aborts: 1 in 6 runs before, 0 in 20 after, minimum versions.)
        warnings.warn("torchrun worker aborted (SIGABRT); rerunning once:\n" +
                      proc.stderr[-1500:])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


def test_torchrun_matches_single_process(tmp_path):
    """EssTrainer under torchrun (2 gloo processes, 2 rows each) == one process (4 rows) ==
    one process with 2 rows x 2 accumulation steps == the recipe's loss on an FSDP2-sharded
    model (fully_shard, 2 gloo processes): same losses and parameters."""
    single = _run_script(tmp_path / "single.pt", "--batch-size", "4")
    accum = _run_script(tmp_path / "accum.pt", "--batch-size", "2", "--grad-accum", "2")
    dist = _run_script(tmp_path / "dist.pt", "--batch-size", "2", nproc=2)
    fsdp = _run_script(tmp_path / "fsdp.pt", "--batch-size", "2", "--fsdp", nproc=2)
    assert len(single["losses"]) == 3
    for other in (accum, dist, fsdp):
        torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(single["losses"]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other["params"], single["params"], rtol=1e-5, atol=1e-5)
    assert single["losses"][-1] < single["losses"][0]


def test_example_script_trains_and_saves(tmp_path):
    """examples/train_ess.py (docs/TRAINING.md) runs on the tiny model and writes a checkpoint
    plus delta that load_tiny restores."""
    from safekern.training.trainer import load_tiny

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "train_ess.py"), "--tiny", "--max-steps", "2",
           "--batch-size", "2", "--max-length", "128", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    model, tok = load_tiny(str(tmp_path / "final"))
    assert model.safety_head.out_features == 1 and model.safekern.cls_token in tok.get_vocab()


# ---------------------------------------------------------------------------------- data

def test_dataset_splits():
    from safekern.data._generate import generate

    train, held = load_split("train"), load_split("heldout")
    assert generate() == {"train": train, "heldout": held}    # the files are the generator's
    for rows in (train, held):
        assert {r["kind"] for r in rows} == set(KINDS)
        for r in rows:
            assert r["label"] == (r["kind"] != "benign")
            assert is_refusal(r["response"]) == (r["kind"] != "benign")
            assert bool(r["prefill"]) == (r["kind"] == "prefill")
            assert not is_refusal(r["prefill"])
    # Held-out topics, prompts and prefills never occur in the train split.
    for key in ("topic", "prompt", "prefill"):
        overlap = {r[key] for r in train if r[key]} & {r[key] for r in held if r[key]}
        assert not overlap, (key, sorted(overlap)[:3])
    assert len(load_split("heldout", kinds=("prefill",))) >= 20
    with pytest.raises(ValueError, match="split"):
        load_split("test")
    with pytest.raises(ValueError, match="kinds"):
        load_split("train", kinds="benign")
    with pytest.raises(TypeError):
        is_refusal(None)


def test_roc_auc():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from eval_safety import roc_auc
    finally:
        sys.path.pop(0)
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    rng = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=rng).tolist()
    y = (torch.rand(200, generator=rng) < 0.4).long().tolist()
    pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(s, y) for b, yb in zip(s, y)
             if ya == 1 and yb == 0]
    assert abs(roc_auc(s, y) - sum(pairs) / len(pairs)) < 1e-12
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------- tiny CLI

def test_cli_train_tiny_smoke_and_demo(tmp_path):
    from safekern.cli import main
    from safekern.cli.demo import run_demo
    from safekern.training.trainer import load_tiny

    out = tmp_path / "tiny"
    assert main(["train", "--tiny", "--steps", "6", "--batch-size", "8", "--out", str(out)]) == 0
    model, tok = load_tiny(str(out))
    assert model.config._attn_implementation == "safekern"
    lines = []
    rows = run_demo(str(out), per_kind=1, max_new_tokens=4, train_if_missing=False,
                    backend="torch", print_fn=lines.append)
    assert [r["kind"] for r in rows] == list(KINDS)
    assert all(r["trace"] is not None and len(r["trace"].p_unsafe) >= 1 for r in rows)
    assert any("p_unsafe" in line for line in lines)
    with pytest.raises(FileNotFoundError, match="train"):
        load_tiny(str(tmp_path / "missing"))
