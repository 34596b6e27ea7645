"""The frozen-LM ESS recipe for a pretrained model (docs/DESIGN.md §1, "a delta on a frozen LM").

What trains: the safety head (a logistic regression on the [CLS] row). Nothing else: the LM's
weights stay the base model's, and ``SafetyConfig.response_sees_cls = False`` keeps every row but
the [CLS] row from attending to the [CLS] key, so with safety on every token row computes exactly
what the base model computes (the [CLS] shifts positions by one; RoPE is relative). Benign
outputs are the base model's by construction; the [CLS] verdict and strategic decoding do all the
safety work.

Why it is cheap. Nobody sees the [CLS], so the K/V of every other token is independent of what
trains. One no-grad forward per training sequence (prompt + response, without the [CLS])
gives every layer's K/V; each training row is then ONE query row — the [CLS] at position 0 —
through the layers, attending to its own K/V and to the K/V of its window, exactly what the engine
computes for an evaluation (tested against the engine). Many windows share one sequence forward.

Windows (the inference rules, docs/DESIGN.md §4), per example with request label ``y`` and
response label ``z`` (harmful continuation 1; benign answer or refusal 0):

* the query span Q (rule 1 at prefill, no response yet) -> ``y``;
* Q + the first ``min(n, r1)`` response tokens (rule 1 with prefilled tokens) -> ``y``;
* response windows of the latest ``r2`` tokens ending at several points, and ``r2 + r3`` long
  SUSPECT-style windows (rules 2-3) -> ``z``, only with ``response_windows=True`` (beyond the
  paper; measured worse on the held-out first verdict with a linear head, AUC 0.79 vs 0.92, so
  the default is the paper's query windows: docs/BENCHMARKS_HISTORY.md). Harmful continuations
  shorter than ``min_harmful_window`` tokens carry too little evidence and are skipped, so very
  short windows are learnt as benign (the tau rule catches a harmful answer a few tokens later).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..safety.adapter import AdaptedLinears, ClsAdapter
from ..data.real import training_rows
from ..ops.cpu.decode_linear import ModuleLinears
from ..evaluation import roc_auc
from ..safety.prompts import encode_prompts, template_split
from ..safety.config import safety_config


@dataclass
class Window:
    """One training row: the [CLS] of sequence ``seq`` sees key 0 and ``spans``; label 0/1;
    ``t`` = tokens in the cache at the evaluation it stands for (the step's token row sits at
    ``t - 1``, where a ``cls_position="last"`` [CLS] row is rotated)."""

    seq: int
    spans: Tuple[Tuple[int, int], ...]
    label: int
    kind: str
    t: int


def example_windows(P: int, q_span: Tuple[int, int], n_resp: int, y: int, z: int, *,
                    n_prefill: int = 0, r1: int = 10, r2: int = 10, r3: int = 10,
                    response_windows: bool = True, min_harmful_window: int = 3,
                    ends: Sequence[int] = (1, 2, 4, 7, 10, 14, 19, 25, 32),
                    tau: Optional[int] = None) -> List[Tuple]:
    """``[(spans, label, kind, t)]`` for one sequence laid out as docs/DESIGN.md §2 (``t`` =
    cache length at the evaluation the window stands for).

    Args:
        P: prompt length incl. [CLS]; q_span: ``[q_start, q_end)``; n_resp: response tokens
            (prefill + generated) present in the sequence; y / z: request / response labels;
        n_prefill: prefilled tokens (a prefill attack): rule 1 covers ``min(n_prefill, r1)``.
        tau: SUSPECT windows as the state machine with this tau makes them: flagged at ``S``,
            the next ``tau - 1`` evaluations see ``[S - r2, t)``, ``r2 + j`` tokens for
            ``j < tau`` (capped by ``r3``); None: one ``r2 + r3`` window per end.
    """
    qs, qe = q_span
    out = [(((qs, qe),), y, "query", P)]
    n_first = n_prefill if n_prefill else n_resp
    first = min(n_first, r1)
    if first > 0:
        out.append((((qs, qe), (P, P + first)), y, "query+response", P + n_first))
    if not response_windows:
        return out
    for e in ends:
        if e > n_resp:
            break
        start = max(0, e - r2)
        if z == 1 and e - start < min_harmful_window:
            continue
        out.append((((P + start, P + e),), z, "response", P + e))
        if tau is None:
            if e >= r2 + r3:                          # a SUSPECT window: S - r2 .. S + r3
                out.append((((P + e - r2 - r3, P + e),), z, "suspect", P + e))
            continue
        for j in range(1, min(tau - 1, r3) + 1):
            if e >= r2 + j:
                out.append((((P + e - r2 - j, P + e),), z, "suspect", P + e))
    return out


# ----------------------------------------------------------------------------- the forward

class _Layers:
    """The decoder modules of a Llama-family model (the engine's ``Arch`` view)."""

    def __init__(self, model):
        from ..runtime.arch import Arch

        self.arch = Arch(model)

    @torch.no_grad()
    def sequence_kv(self, ids: torch.Tensor, lengths: torch.Tensor):
        """K/V of every layer for right-padded ``ids (B, L)`` WITHOUT the [CLS] (positions
        1..L: what they are in an ESS sequence, where no row sees the [CLS]).

        Returns ``[(k, v)]`` per layer, each ``(B, L + 1, Hkv, D)`` with slot 0 empty (the
        [CLS] slot), RoPE applied.
        """
        # The model's own forward and KV cache (no second implementation of the decoder).
        B, L = ids.shape
        pos = torch.arange(1, L + 1, device=ids.device)[None].expand(B, L)
        mask = (torch.arange(L, device=ids.device)[None] < lengths[:, None]).long()
        res = self.arch.base(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=True)
        cache = getattr(res, "cache", None) or res.past_key_values
        out = []
        for layer in cache.layers:                                       # (B, Hkv, L, D)
            k, v = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
            pad = k.new_zeros(B, 1, *k.shape[2:])
            out.append((torch.cat([pad, k], 1), torch.cat([pad, v], 1)))
        return out

    def cls_rows(self, cls_emb: Optional[torch.Tensor],
                 kv: List[Tuple[torch.Tensor, torch.Tensor]],
                 nkeys: torch.Tensor, rope_pos: Optional[torch.Tensor] = None,
                 adapter: Optional[ClsAdapter] = None) -> torch.Tensor:
        """Final-norm hidden state of N [CLS] rows, differentiable in ``cls_emb`` (and in the
        ``adapter``'s weights, whose deltas every row takes: they are all [CLS] rows).

        Args:
            cls_emb: ``(Dm,)`` the [CLS] embedding row (None with an adapter: its own).
            kv: per layer ``(k, v)`` of shape ``(N, K, Hkv, D)``: the window keys of each row
                (slot 0 is overwritten by the row's own fresh [CLS] K/V).
            nkeys: ``(N,)`` valid keys per row (slot 0 included).
            rope_pos: ``(N,)`` RoPE position of each [CLS] row (None = 0, the paper's layout).
            adapter: the [CLS] adapter (None: the base projections only).
        """
        a = self.arch
        lin = ModuleLinears(a.layers)
        if adapter is not None:
            lin = AdaptedLinears(lin, adapter, col=None)
        N = nkeys.shape[0]
        if cls_emb is None:
            cls_emb = adapter.embedding
        x = cls_emb[None, None].expand(N, 1, -1)
        width = kv[0][0].shape[1]
        hidden = torch.arange(width, device=nkeys.device)[None] >= nkeys[:, None].long()
        if rope_pos is not None:
            cos, sin = a.rope_table(int(rope_pos.max()) + 1, nkeys.device, x.dtype)
            cos, sin = cos[rope_pos.long()][:, None, None], sin[rope_pos.long()][:, None, None]
        for i, (layer, (kc, vc)) in enumerate(zip(a.layers, kv)):
            h = layer.input_layernorm(x)
            q, k, v = lin.qkv(i, h)
            q = q.view(N, 1, a.n_heads, a.head_dim)
            k = k.view(N, 1, a.n_kv, a.head_dim)
            v = v.view(N, 1, a.n_kv, a.head_dim)
            if rope_pos is not None:                                     # at 0 RoPE is identity
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kk, vv = torch.cat([k, kc[:, 1:]], 1), torch.cat([v, vc[:, 1:]], 1)
            # Every listed key is visible to the [CLS] row: plain attention over nkeys keys.
            o = _window_attention(q, kk, vv, hidden, a.scale)
            x = x + lin.o(i, o.reshape(N, 1, -1))
            x = x + lin.mlp(i, layer.post_attention_layernorm(x))
        return a.base.norm(x[:, 0])


def _window_attention(q, k, v, hidden, scale):
    """One query row per window over its keys: ``q (N, 1, H, D)``, ``k, v (N, K, Hkv, D)``,
    ``hidden (N, K)`` True for padding keys. ``ess_attention``'s semantics for this case
    (GQA without repeated K/V) in four ops whose autograd is cheap: the reference op builds a
    general (Lq, Lk) visibility mask, which dominated a training step."""
    N, _, H, D = q.shape
    Hkv = k.shape[2]
    s = q.view(N, Hkv, H // Hkv, D) @ k.permute(0, 2, 3, 1) * scale     # (N, Hkv, G, K)
    s = s.masked_fill(hidden[:, None, None], float("-inf"))
    o = torch.softmax(s, -1) @ v.transpose(1, 2)                         # (N, Hkv, G, D)
    return o.reshape(N, 1, H * D)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def gather_windows(kv_seq, windows: Sequence[Window], seq_offset: int):
    """Per layer ``(N, 1 + max_window, Hkv, D)`` K/V of each window's keys (slot 0 left for
    the [CLS]) and ``(N,)`` key counts."""
    idx = [[j for s, e in w.spans for j in range(s, e)] for w in windows]
    width = 1 + max(len(i) for i in idx)
    dev = kv_seq[0][0].device
    rows = torch.tensor([w.seq - seq_offset for w in windows], device=dev)
    cols = torch.zeros(len(windows), width, dtype=torch.long, device=dev)
    for r, i in enumerate(idx):
        cols[r, 1:1 + len(i)] = torch.tensor(i, dtype=torch.long)
    nkeys = torch.tensor([1 + len(i) for i in idx], dtype=torch.int32, device=dev)
    return [(k[rows[:, None], cols], v[rows[:, None], cols]) for k, v in kv_seq], nkeys


# ----------------------------------------------------------------------------- data

def encode_rows(tokenizer, rows: Sequence[Dict], cls_id: int):
    enc = encode_prompts(tokenizer, [r["prompt"] for r in rows],
                         [r.get("prefill", "") + r.get("response", "") for r in rows],
                         cls_id=cls_id, template=template_split(tokenizer))
    n_prefill = [len(tokenizer(r["prefill"], add_special_tokens=False)["input_ids"])
                 if r.get("prefill") else 0 for r in rows]
    return enc, n_prefill


@torch.no_grad()
def chunk_windows(model, tokenizer, rows: Sequence[Dict], *, batch_size: int = 16,
                  response_windows: bool = True, layers: Optional["_Layers"] = None):
    """Yield ``(first_row, kv, windows)`` per chunk of ``batch_size`` rows: the sequence K/V of
    every layer (one no-grad forward) and the chunk's training windows."""
    cfg = safety_config(model, tokenizer)
    layers = layers or _Layers(model)
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0:b0 + batch_size]
        enc, n_pre = encode_rows(tokenizer, chunk, cfg.cls_id)
        wins = []
        for i, r in enumerate(chunk):
            P = enc.prompt_len[i]
            n = len(enc.ids[i]) - P
            for spans, lab, kind, t in example_windows(
                    P, (enc.query_start[i], enc.query_end[i]), n, r["label"],
                    r.get("response_label", r["label"]), n_prefill=n_pre[i],
                    response_windows=response_windows):
                wins.append(Window(b0 + i, spans, lab, kind, t))
        ids, lengths = enc.padded(tokenizer.pad_token_id or 0, model.device)
        yield b0, layers.sequence_kv(ids[:, 1:], lengths - 1), wins


@torch.no_grad()
def cls_features(model, tokenizer, rows: Sequence[Dict], *, batch_size: int = 16,
                 response_windows: bool = False, cls_emb: Optional[torch.Tensor] = None,
                 progress=None):
    """``(features (N, Dm), labels (N,), kinds [N], groups (N,))``: the [CLS] final hidden
    state, label, window kind and row index of every training window of ``rows`` (no grad; the
    [CLS] embedding is the model's own unless ``cls_emb``)."""
    cfg = safety_config(model, tokenizer)
    layers = _Layers(model)
    emb = model.get_input_embeddings().weight[cfg.cls_id] if cls_emb is None else cls_emb
    feats, labels, kinds, groups = [], [], [], []
    for b0, kv, wins in chunk_windows(model, tokenizer, rows, batch_size=batch_size,
                                      response_windows=response_windows, layers=layers):
        kvw, nkeys = gather_windows(kv, wins, b0)
        feats.append(layers.cls_rows(emb, kvw, nkeys,
                                     rope_pos=_rope_positions(wins, cfg.cls_position)))
        labels += [w.label for w in wins]
        kinds += [w.kind for w in wins]
        groups += [w.seq for w in wins]
        if progress is not None:
            progress.update(min(batch_size, len(rows) - b0))
    return (torch.cat(feats), torch.tensor(labels, dtype=torch.float32), kinds,
            torch.tensor(groups))


def fit_head(feats: torch.Tensor, labels: torch.Tensor, *, weight_decay: float = 1e-3,
             steps: int = 300, balance: bool = True) -> nn.Linear:
    """Logistic regression ``p = sigmoid(w . h + b)`` on fixed features (L-BFGS, L2), with
    classes weighted to balance (an over-represented class would move the 0.5 threshold)."""
    torch.manual_seed(0)
    D = feats.shape[1]
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    x = (feats - mu) / sd
    w = torch.zeros(D, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = labels.mean().clamp(1e-3, 1 - 1e-3)
    wt = torch.where(labels > 0.5, 0.5 / pos, 0.5 / (1 - pos)) if balance else None
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, labels, weight=wt) + \
            weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(D, 1)
    with torch.no_grad():                      # fold the standardisation into the head
        head.weight.copy_((w / sd)[None])
        head.bias.copy_(b - (w * mu / sd).sum())
    return head


def _rope_positions(windows: Sequence[Window], cls_position: str) -> Optional[torch.Tensor]:
    """RoPE positions of the windows' [CLS] rows: None for ``"zero"`` (position 0)."""
    if cls_position == "zero":
        return None
    return torch.tensor([w.t - 1 for w in windows])


WEIGHT_DECAYS = (1e-3, 1e-2, 3e-2, 1e-1)


def select_head(feats: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, *,
                weight_decays: Sequence[float] = WEIGHT_DECAYS, val_fraction: float = 0.2,
                seed: int = 0) -> Tuple[nn.Linear, Dict]:
    """Pick the L2 strength by the AUC on a validation split *grouped by sequence* (no
    sequence has windows on both sides), then refit on everything."""
    g = torch.Generator().manual_seed(seed)
    val_groups = []
    for stratum in (True, False):          # sequences with / without a positive window
        uniq = torch.tensor(sorted({int(x) for x, y in zip(groups, labels) if (y > 0.5) ==
                                    stratum} - {int(v) for v in val_groups}), dtype=torch.long)
        if stratum:
            has_pos = set(uniq.tolist())
        else:
            uniq = torch.tensor([u for u in uniq.tolist() if u not in has_pos], dtype=torch.long)
        take = max(1, int(len(uniq) * val_fraction)) if len(uniq) > 1 else 0
        val_groups += uniq[torch.randperm(len(uniq), generator=g)[:take]].tolist()
    val = torch.isin(groups, torch.tensor(val_groups, dtype=groups.dtype))
    scores = {}
    for wd in weight_decays:
        head = fit_head(feats[~val], labels[~val], weight_decay=wd)
        with torch.no_grad():
            p = torch.sigmoid(head(feats[val])[:, 0])
        scores[wd] = roc_auc(p.tolist(), labels[val].tolist())
    best = max(scores, key=lambda wd: scores[wd])
    return fit_head(feats, labels, weight_decay=best), {"weight_decay": best,
                                                        "val_auc": round(scores[best], 4),
                                                        "val_auc_by_wd": scores}


def train_frozen(model, tokenizer, rows: Sequence[Dict], *, response_windows: bool = False,
                 batch_size: int = 16, progress: bool = True, features_cache: Optional[str] = None,
                 log=print) -> Dict:
    """Fit the safety head of an attached ``model`` on ``rows`` (frozen LM); returns a summary.

    ``model`` must be attached with ``response_sees_cls=False`` (the recipe's premise: no row but
    the [CLS] sees the [CLS]). The L2 strength is picked on a grouped validation split
    (:func:`select_head`). ``features_cache``: a ``.pt`` path to save the window features to
    (reused when it exists), for ablations without a second forward over the data.
    """
    from tqdm.auto import tqdm

    cfg = safety_config(model, tokenizer)
    if cfg.response_sees_cls:
        raise ValueError("the frozen-LM recipe needs attach(..., response_sees_cls=False): with "
                         "response rows seeing the [CLS], the LM's own outputs would change")
    t0 = time.perf_counter()
    if features_cache and os.path.isfile(features_cache):
        feats, labels, kinds, groups = torch.load(features_cache)
    else:
        with tqdm(total=len(rows), desc="safekern train: [CLS] features", unit="seq",
                  disable=not progress) as bar:
            # A cache always holds every window kind, so it serves both variants.
            feats, labels, kinds, groups = cls_features(
                model, tokenizer, rows, batch_size=batch_size,
                response_windows=response_windows or bool(features_cache), progress=bar)
        if features_cache:
            torch.save((feats, labels, kinds, groups), features_cache)
    if not response_windows:
        keep = torch.tensor([k in ("query", "query+response") for k in kinds])
        feats, labels, groups = feats[keep], labels[keep], groups[keep]
    head, sel = select_head(feats, labels, groups)
    ref = model.get_input_embeddings().weight
    model.safety_head = head.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        p = torch.sigmoid(model.safety_head(feats.to(ref)).float()[:, 0]).cpu()
    acc = float(((p >= 0.5).float() == labels).float().mean())
    summary = {"sequences": len(rows), "windows": int(labels.numel()),
               "response_windows": response_windows, "cls_position": cfg.cls_position,
               "positive_fraction": round(float(labels.mean()), 3), "train_accuracy": round(acc, 4),
               "train_auc": round(roc_auc(p.tolist(), labels.tolist()), 4), **sel,
               "seconds": round(time.perf_counter() - t0, 1)}
    if log is not None:
        log(f"trained the safety head: {summary}")
    return summary


__all__ = ["example_windows", "chunk_windows", "cls_features", "fit_head", "select_head",
           "train_frozen", "training_rows"]
