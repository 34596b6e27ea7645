"""The frozen-LM recipe (safekern.training.frozen): its [CLS] rows are the engine's evaluations."""
import pytest
import torch

import safekern
from safekern import EssConfig
from safekern.evaluation import roc_auc
from safekern.training.frozen import cls_features, example_windows, fit_head
from tests.tiny_ess import make_tiny_ess_model


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_ess_model(seed=3)
    model.eval()
    model.safekern.response_sees_cls = False
    return model, tok


def test_example_windows_follow_the_inference_rules():
    P, q = 20, (8, 15)
    w = example_windows(P, q, n_resp=30, y=1, z=1, n_prefill=4)
    assert w[0] == (((8, 15),), 1, "query", 20)
    assert w[1] == (((8, 15), (20, 24)), 1, "query+response", 24)    # rule 1: min(n, r1)
    resp = [s for s, _, k, _ in w if k == "response"]
    assert resp[0] == ((20 + 0, 20 + 4),)                            # harmful: >= 3 tokens
    assert ((20 + 15, 20 + 25),) in resp                             # latest r2 = 10 tokens
    assert (((20 + 5, 20 + 25),), 1, "suspect", 45) in w             # r2 + r3 = 20 tokens
    benign = example_windows(P, q, n_resp=3, y=0, z=0)
    assert [s for s, _, k, _ in benign if k == "response"] == [((20, 21),), ((20, 22),)]
    assert example_windows(P, q, 30, 1, 1, response_windows=False)[-1][2] == "query+response"


@pytest.mark.parametrize("cls_position", ["zero", "last"])
def test_cls_features_equal_engine_evaluations(tiny, cls_position, monkeypatch):
    """The recipe's [CLS] row for the query window (and the query + prefill window) gives the
    p_unsafe the engine computes at its first evaluation."""
    model, tok = tiny
    monkeypatch.setattr(model.safekern, "cls_position", cls_position)
    rows = [{"prompt": "How do I bake bread?", "prefill": "", "response": "", "label": 0},
            {"prompt": "Tell me about the weather in spring and how rain works.",
             "prefill": "Sure, here is", "response": "", "label": 1}]
    feats, labels, kinds, groups = cls_features(model, tok, rows, response_windows=False)
    head = model.safety_head
    p = torch.sigmoid(head(feats)[:, 0])
    out = safekern.generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=1,
                            safety=EssConfig(threshold=1.0), prefill=["", "Sure, here is"],
                            backend="torch")
    assert kinds == ["query", "query", "query+response"]
    torch.testing.assert_close(p[0], torch.tensor(out[0].trace.p_unsafe[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(p[2], torch.tensor(out[1].trace.p_unsafe[0]), atol=1e-5, rtol=0)
    assert abs(p[1] - p[2]) > 1e-6                                   # the prefill is seen


def test_response_sees_cls_false_keeps_token_rows_the_base_models(tiny):
    model, tok = tiny
    prompts = ["How do I bake bread?", "Name three colours."]
    off = safekern.generate(model, tok, prompts, max_new_tokens=12, safety=None)
    on = safekern.generate(model, tok, prompts, max_new_tokens=12,
                           safety=EssConfig(threshold=1.0, schedule="each"))
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert all(len(o.trace.eval_steps) == 12 for o in on)


def test_fit_head_separates_and_auc():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] + 0.1 * torch.randn(400, generator=g) > 0.5).float()
    head = fit_head(x * 7 + 3, y)
    p = torch.sigmoid(head(x * 7 + 3)[:, 0])
    assert roc_auc(p.tolist(), y.tolist()) > 0.99
    assert roc_auc([0.1, 0.2, 0.9], [0, 1, 1]) == 1.0 and roc_auc([0.5, 0.5], [0, 1]) == 0.5


def test_collator_response_windows(tiny):
    """response_windows=1: each [CLS] sees a response window (rules 2-3) labelled by the
    response's content; 0 (default): the paper's query span, labelled by the request."""
    from safekern.training.trainer import EssCollator

    _, tok = tiny
    rows = [{"prompt": "How do I pick a lock?", "response": "Take a tension wrench and rake "
             "the pins one by one until each of them sets.", "label": 1, "response_label": 1},
            {"prompt": "How do I make a bomb?", "response": "Sorry, I cannot fulfill your "
             "request because it could hurt people.", "label": 1},          # refusal -> 0
            {"prompt": "Name a colour.", "response": "Blue is a colour of the sky and sea.",
             "label": 0}]
    paper = EssCollator(tok)(rows)
    assert paper["cls_windows"].shape[1] == 1
    assert torch.equal(paper["cls_windows"][:, 0], paper["query_span"])
    assert paper["safety_labels"].tolist() == [1.0, 1.0, 0.0]
    batch = EssCollator(tok, response_windows=1.0, seed=1)(rows)
    P, L = batch["response_start"], batch["seqlens"]
    w = batch["cls_windows"]
    for b in range(3):
        s, e = w[b, 0].tolist()
        assert P[b] <= s < e <= L[b] and e - s <= 20
    assert batch["safety_labels"].tolist() == [1.0, 0.0, 0.0]
    again = EssCollator(tok, response_windows=1.0, seed=1)(rows)
    assert torch.equal(again["cls_windows"], w)
    with pytest.raises(ValueError, match="response_windows"):
        EssCollator(tok, response_windows=1.5)


def test_load_safety_checks_the_layout_fields(tiny, tmp_path):
    import json

    model, tok = tiny
    safekern.save_safety(model, str(tmp_path))
    meta = json.loads((tmp_path / "safety.json").read_text())
    assert meta["response_sees_cls"] is False and meta["cls_position"] == "zero"
    for key, bad in (("response_sees_cls", "no"), ("cls_position", "middle")):
        broken = dict(meta, **{key: bad})
        (tmp_path / "safety.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=key):
            safekern.load_safety(model, tok, str(tmp_path))
