"""Train the [CLS] adapter on a frozen LM (docs/DESIGN.md §9; ``safekern train --rank R``).

What trains: the adapter's low-rank deltas on the [CLS] row's projections, its [CLS] embedding
(a leaf of its own, not a view of the embedding matrix, whose [CLS] row stays as attached) and
the safety head. The LM stays frozen and
no token row reads the [CLS] (``response_sees_cls=False``), so the K/V of every token is the base
model's: one no-grad forward per chunk of sequences gives every window's keys, and each window
is one [CLS] row through the layers (``recipe._Layers.cls_rows``), batched into one forward and
backward per optimizer step, bucketed by window width.

Windows are the inference plan's (``recipe.example_windows``): the query span (rule 1 at
prefill), query + first response tokens, the latest ``r2`` tokens at response lengths up to the
longest answer (rule 2), and SUSPECT windows of the lengths ``tau`` reaches (rule 3). Labels by
content: the request's label on query windows, the response's on response windows (benign
answers and refusals 0, every window). A harmful continuation is one multiple-instance *bag*
(``bags=True``): the controller catches it when any window flags, and most of its 10-token
windows ("I'm sorry for", "Here are some") say nothing harmful by themselves, so its windows'
logits are pooled by a soft maximum and the pooled logit takes label 1 (``_bag_loss``); labelling
each such window 1 taught the head to flag those phrases in benign answers. Each epoch keeps
every query window and a fresh random sample of a sequence's response windows
(``windows_per_seq``, ``bag_windows`` for a bag). Sequences are grouped by length into chunks
(one padded K/V forward each; ``_Trainer.chunks``).

Validation is grouped by prompt (no prompt has windows on both sides); the summary reports
validation AUC per window kind and the false / true positive rates at threshold 0.5, per window
and per answer (an answer scores its highest window); the kept epoch maximises the mean of the
first-verdict and per-answer AUCs. ``safekern.training.calibration`` then picks the threshold and tau.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..safety.adapter import TARGETS
from ..evaluation import roc_auc
from ..safety.attach import add_adapter
from ..safety.config import safety_config
from .frozen import Window, _Layers, _rope_positions, encode_rows, example_windows, gather_windows

# Response lengths at which a latest-r2 window is trained: dense early (where the first
# verdicts fall), then geometric up to the longest answer (every length `each` reaches is
# within a few tokens of one of these).
RESPONSE_ENDS = (1, 2, 3, 4, 6, 8, 10, 12, 14, 17, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112,
                 128, 160, 192, 256)


@dataclass
class AdapterRecipe:
    """Hyper-parameters of ``train_adapter`` (defaults: the measured choice, BENCHMARKS.md, "The
    [CLS] adapter")."""

    rank: int = 16
    alpha: float = 32.0
    targets: Tuple[str, ...] = TARGETS
    epochs: int = 2   # the best epoch was the 2nd in both measured 3-epoch runs
    lr: float = 1e-3
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    seqs_per_chunk: int = 16
    rows_per_step: int = 96
    windows_per_seq: int = 10
    bags: bool = True
    bag_windows: int = 32
    r1: int = 10
    r2: int = 10
    r3: int = 10
    tau: int = 3
    val_fraction: float = 0.15
    val_split: str = "prompt"    # or "pattern": whole label-0 patterns held out (split_rows)
    seed: int = 0
    max_seconds: Optional[float] = None

    def __post_init__(self):
        for name in ("rank", "epochs", "seqs_per_chunk", "rows_per_step", "windows_per_seq",
                     "bag_windows", "r1", "r2", "r3", "tau"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("alpha", "lr", "head_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 <= self.weight_decay < 1 or not 0 < self.val_fraction < 0.5:
            raise ValueError("weight_decay must be in [0, 1) and val_fraction in (0, 0.5)")
        if self.val_split not in VAL_SPLITS:
            raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {self.val_split!r}")


def split_by_prompt(rows: Sequence[Dict], fraction: float, seed: int) -> Tuple[list, list]:
    """``(train, val)``: whole prompts go to validation, stratified by the request label."""
    rng = random.Random(seed)
    val_prompts = set()
    for label in (0, 1):
        prompts = sorted({r["prompt"] for r in rows if r["label"] == label})
        rng.shuffle(prompts)
        val_prompts.update(prompts[:max(1, int(len(prompts) * fraction))])
    train = [r for r in rows if r["prompt"] not in val_prompts]
    val = [r for r in rows if r["prompt"] in val_prompts]
    return train, val


VAL_SPLITS = ("prompt", "pattern")


def split_rows(rows: Sequence[Dict], fraction: float, seed: int,
               by: str = "prompt") -> Tuple[list, list]:
    """``(train, val)`` by ``split_by_prompt`` (``by="prompt"``) or by pattern: label-0 rows
    hold out whole patterns (``row["group"]``, e.g. ``"borderline:safe_targets"``; per data set,
    patterns until ``fraction`` of its prompts), so validation asks what the held-out split
    asks, over-refusal on patterns never trained on; label-1 rows hold out whole requests
    (``row["request"]``: a jailbreak-wrapped or rephrased prompt goes with its request)."""
    if by == "prompt":
        return split_by_prompt(rows, fraction, seed)
    if by != "pattern":
        raise ValueError(f"by must be one of {VAL_SPLITS}, got {by!r}")
    missing = [r.get("prompt", "")[:40] for r in rows if "group" not in r or "request" not in r]
    if missing:
        raise ValueError(f"a pattern split needs 'group' and 'request' on every row "
                         f"(safekern.data.real.training_rows); {len(missing)} rows lack them, "
                         f"e.g. {missing[0]!r}")
    rng = random.Random(seed)
    held = set()
    requests = sorted({r["request"] for r in rows if r["label"] == 1})
    rng.shuffle(requests)
    held.update(("request", q) for q in requests[:max(1, int(len(requests) * fraction))])
    by_set: Dict[str, Dict[str, set]] = {}
    for r in rows:
        if r["label"] == 0:
            name, _, _ = r["group"].partition(":")
            by_set.setdefault(name, {}).setdefault(r["group"], set()).add(r["request"])
    for name in sorted(by_set):
        groups = sorted(by_set[name])
        rng.shuffle(groups)
        total, taken = sum(len(v) for v in by_set[name].values()), 0
        for g in groups:
            if taken >= fraction * total:
                break
            if len(groups) > 1 and taken + len(by_set[name][g]) > 2 * fraction * total:
                continue                      # a pattern larger than the share: keep it in train
            held.add(("group", g))
            taken += len(by_set[name][g])

    train, val = [], []
    for r in rows:
        key = ("request", r["request"]) if r["label"] == 1 else ("group", r["group"])
        (val if key in held else train).append(r)
    return train, val


def _windows(tokenizer, rows, cls_id, rc: AdapterRecipe, rng: Optional[random.Random]):
    """Per row the ids and its windows; ``rng`` samples response windows (None: all)."""
    enc, n_pre = encode_rows(tokenizer, rows, cls_id)
    out = []
    for i, r in enumerate(rows):
        P = enc.prompt_len[i]
        n = len(enc.ids[i]) - P
        ends = [e for e in RESPONSE_ENDS if e < n] + ([n] if n > 0 else [])
        wins = [Window(i, spans, lab, kind, t) for spans, lab, kind, t in example_windows(
            P, (enc.query_start[i], enc.query_end[i]), n, r["label"],
            r.get("response_label", r["label"]), n_prefill=n_pre[i], r1=rc.r1, r2=rc.r2,
            r3=rc.r3, tau=rc.tau, ends=ends)]
        first = [w for w in wins if w.kind in ("query", "query+response")]
        rest = [w for w in wins if w.kind not in ("query", "query+response")]
        cap = rc.bag_windows if rc.bags and _is_bag(rest) else rc.windows_per_seq
        if rng is not None and len(rest) > cap:
            rest = rng.sample(rest, cap)
        out.extend(first + rest)
    return enc, out


def _is_bag(windows: List[Window]) -> bool:
    """A harmful continuation's response windows: one bag, not ``len`` labels (below)."""
    return bool(windows) and all(w.label == 1 and w.kind in ("response", "suspect")
                                 for w in windows)


def _bag_loss(logits: torch.Tensor, seqs: List[int], weight: float) -> torch.Tensor:
    """Multiple-instance loss of harmful continuations: a harmful answer is caught when ANY
    of its windows flags (what the controller does), and most of its 10-token windows ("I'm
    sorry for", "as a chatbot", "Here are some") say nothing harmful by themselves; labelling
    each of them 1 teaches the head that such phrases are harmful, and it then flags them in
    benign answers. So each sequence's windows are pooled by a soft maximum,
    ``logsumexp(z) - log(k)``, and the pooled logit takes the label (times ``weight``, the
    positives' class weight; bags have optimizer steps of their own)."""
    groups: Dict[int, List[int]] = {}
    for j, s in enumerate(seqs):
        groups.setdefault(s, []).append(j)
    pooled = torch.stack([torch.logsumexp(logits[idx], 0) - math.log(len(idx))
                          for idx in groups.values()])
    return weight * F.binary_cross_entropy_with_logits(pooled, torch.ones_like(pooled))


def _buckets(windows: List[Window], size: int) -> List[List[Window]]:
    """Windows sorted by key count, cut into batches of ``size`` (little padding per batch)."""
    ws = sorted(windows, key=lambda w: sum(e - s for s, e in w.spans))
    return [ws[i:i + size] for i in range(0, len(ws), size)]


class _Trainer:
    def __init__(self, model, tokenizer, rc: AdapterRecipe):
        self.model, self.tok, self.rc = model, tokenizer, rc
        self.cfg = safety_config(model, tokenizer)
        self.layers = _Layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapter = add_adapter(model, rc.rank, rc.alpha, rc.targets)
        self.head = model.safety_head
        for p in list(self.adapter.parameters()) + list(self.head.parameters()):
            p.requires_grad_(True)
        emb = self.adapter.embedding
        self.opt = torch.optim.AdamW([
            {"params": [p for p in self.adapter.parameters() if p is not emb], "lr": rc.lr},
            {"params": [emb], "lr": rc.lr, "weight_decay": 0.0},
            {"params": list(self.head.parameters()), "lr": rc.head_lr}],
            weight_decay=rc.weight_decay)

    def _kv(self, enc):
        ids, lengths = enc.padded(self.tok.pad_token_id or 0, self.model.device)
        return self.layers.sequence_kv(ids[:, 1:], lengths - 1)

    def _logits(self, kv, batch):
        kvw, nkeys = gather_windows(kv, batch, 0)
        h = self.layers.cls_rows(None, kvw, nkeys,
                                 rope_pos=_rope_positions(batch, self.cfg.cls_position),
                                 adapter=self.adapter)
        return self.head(h)[:, 0].float()

    def lengths(self, rows) -> List[int]:
        """Token count of each row's ESS sequence (what its K/V forward costs)."""
        return [len(i) for i in encode_rows(self.tok, rows, self.cfg.cls_id)[0].ids]

    def chunks(self, rows, rng, lengths=None):
        """Chunks of ``seqs_per_chunk`` rows of similar length: one padded K/V forward each,
        and a random chunk pads every row to its longest (3x the tokens on the default data).
        With ``rng`` (training) the rows are shuffled, cut into mega-batches of 32 chunks, and
        sorted within each by length rounded to 4 tokens with random ties (rows of both labels
        share a chunk, chunks differ every epoch: 1.09x the padded tokens of a full sort);
        without it (scoring) the order is a plain sort by length."""
        n = self.rc.seqs_per_chunk
        lengths = self.lengths(rows) if lengths is None else lengths
        idx = list(range(len(rows)))
        if rng is None:
            order = sorted(idx, key=lambda i: lengths[i])
        else:
            rng.shuffle(idx)
            mega, order = 32 * n, []
            for m0 in range(0, len(idx), mega):
                order += sorted(idx[m0:m0 + mega], key=lambda i: (lengths[i] // 4, rng.random()))
        groups = [order[b0:b0 + n] for b0 in range(0, len(order), n)]
        if rng is not None:
            rng.shuffle(groups)
        for g in groups:
            chunk = [rows[i] for i in g]
            enc, wins = _windows(self.tok, chunk, self.cfg.cls_id, self.rc, rng)
            yield chunk, self._kv(enc), wins

    def train_epoch(self, rows, rng, pos_weight: float, bar=None, deadline=None,
                    lengths=None) -> float:
        losses = []
        for chunk, kv, wins in self.chunks(rows, rng, lengths):
            bag = [w for w in wins if self.rc.bags and w.label == 1
                   and w.kind in ("response", "suspect")]
            solo = [w for w in wins if not (self.rc.bags and w.label == 1
                                            and w.kind in ("response", "suspect"))]
            batches = [(b, False) for b in _buckets(solo, self.rc.rows_per_step)]
            batches += [(b, True) for b in _buckets(bag, 4 * self.rc.rows_per_step)]
            for batch, is_bag in batches:
                if is_bag:
                    loss = _bag_loss(self._logits(kv, batch), [x.seq for x in batch],
                                     pos_weight)
                else:
                    y = torch.tensor([float(w.label) for w in batch])
                    wt = torch.where(y > 0.5, pos_weight, 1.0)
                    loss = F.binary_cross_entropy_with_logits(self._logits(kv, batch), y,
                                                              weight=wt)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(len(chunk))
            if deadline is not None and time.perf_counter() > deadline:
                break
        return sum(losses) / max(1, len(losses))

    @torch.no_grad()
    def scores(self, rows) -> Tuple[List[float], List[int], List[str], List[int]]:
        """Per window of ``rows``: p_unsafe, label, kind and a sequence id."""
        p, y, kinds, seqs, base = [], [], [], [], 0
        for chunk, kv, wins in self.chunks(rows, None):
            for batch in _buckets(wins, 4 * self.rc.rows_per_step):
                p += torch.sigmoid(self._logits(kv, batch)).tolist()
                y += [w.label for w in batch]
                kinds += [w.kind for w in batch]
                seqs += [base + w.seq for w in batch]
            base += len(chunk)
        return p, y, kinds, seqs

    def _params(self):
        return list(self.adapter.parameters()) + list(self.head.parameters())

    def state(self):
        return [t.detach().clone() for t in self._params()]

    @torch.no_grad()
    def load(self, state):
        for p, s in zip(self._params(), state):
            p.copy_(s)


def _metrics(p, y, kinds, threshold: float, seqs: Optional[List[int]] = None) -> Dict:
    """Window AUC (all, first verdicts, response windows), FPR/TPR at ``threshold``; with
    ``seqs``, the same per answer (``*_answer``: an answer scores its highest response window,
    what decides whether it is ever flagged), and ``score``, the mean of the first-verdict and
    answer AUCs (the epoch kept)."""
    out = {"auc": round(roc_auc(p, y), 4)}
    if seqs is not None:
        best: Dict[int, Tuple[float, int]] = {}
        for pi, yi, k, s in zip(p, y, kinds, seqs):
            if k in ("response", "suspect"):
                best[s] = (max(pi, best.get(s, (0.0, yi))[0]), yi)
        ps, ys = [v[0] for v in best.values()], [v[1] for v in best.values()]
        if 0 < sum(ys) < len(ys):
            out["auc_answer"] = round(roc_auc(ps, ys), 4)
            out["fpr_answer"] = round(sum(a >= threshold for a, b in zip(ps, ys) if b == 0)
                                      / (len(ys) - sum(ys)), 4)
            out["tpr_answer"] = round(sum(a >= threshold for a, b in zip(ps, ys) if b == 1)
                                      / sum(ys), 4)
    for group, names in (("first", ("query", "query+response")), ("response",
                                                                   ("response", "suspect"))):
        idx = [i for i, k in enumerate(kinds) if k in names]
        ys = [y[i] for i in idx]
        if 0 < sum(ys) < len(ys):
            out[f"auc_{group}"] = round(roc_auc([p[i] for i in idx], ys), 4)
        neg = [p[i] for i in idx if y[i] == 0]
        pos = [p[i] for i in idx if y[i] == 1]
        if neg:
            out[f"fpr_{group}"] = round(sum(x >= threshold for x in neg) / len(neg), 4)
        if pos:
            out[f"tpr_{group}"] = round(sum(x >= threshold for x in pos) / len(pos), 4)
    parts = [out[k] for k in ("auc_first", "auc_answer") if k in out]
    out["score"] = round(sum(parts) / len(parts), 4) if parts else out["auc"]
    return out


def train_adapter(model, tokenizer, rows: Sequence[Dict], recipe: AdapterRecipe = None, *,
                  progress: bool = True, log=print) -> Dict:
    """Train a [CLS] adapter (+ [CLS] embedding + head) on an attached frozen ``model``.

    ``model`` must be attached with ``response_sees_cls=False``. On return the model carries
    the best epoch's adapter, embedding row and head, and ``model.safekern.windows`` the
    ``(r1, r2, r3)`` it was trained for. Returns a summary with validation metrics.
    """
    from tqdm.auto import tqdm

    rc = recipe or AdapterRecipe()
    t0 = time.perf_counter()
    torch.manual_seed(rc.seed)
    train, val = split_rows(rows, rc.val_fraction, rc.seed, rc.val_split)
    tr = _Trainer(model, tokenizer, rc)
    rng = random.Random(rc.seed)
    labels = [w.label for w in _windows(tokenizer, train, tr.cfg.cls_id, rc, rng)[1]]
    pos = max(1, sum(labels))
    pos_weight = (len(labels) - pos) / pos                 # balance the classes
    deadline = None if rc.max_seconds is None else t0 + rc.max_seconds
    train_lengths = tr.lengths(train)
    history, best = [], None
    with tqdm(total=rc.epochs * len(train), desc="safekern train: [CLS] adapter", unit="seq",
              disable=not progress) as bar:
        for epoch in range(rc.epochs):
            loss = tr.train_epoch(train, rng, pos_weight, bar, deadline, train_lengths)
            p, y, kinds, seqs = tr.scores(val)
            m = {"epoch": epoch + 1, "train_loss": round(loss, 4),
                 **_metrics(p, y, kinds, 0.5, seqs),
                 "seconds": round(time.perf_counter() - t0, 1)}
            history.append(m)
            if log is not None:
                log(f"epoch {epoch + 1}: {m}")
            if best is None or m["score"] > best[0]["score"]:
                best = (m, tr.state())
            if deadline is not None and time.perf_counter() > deadline:
                break
    tr.load(best[1])
    for p in tr._params():
        p.requires_grad_(False)
    model.safekern.windows = (rc.r1, rc.r2, rc.r3)
    return {"sequences": len(train), "val_sequences": len(val), "recipe": asdict(rc),
            "best": best[0], "history": history,
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["AdapterRecipe", "RESPONSE_ENDS", "VAL_SPLITS", "split_by_prompt", "split_rows",
           "train_adapter"]
