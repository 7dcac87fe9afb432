"""Fine-tune a checkpoint on the relevance labels the app collected, and measure the gain honestly.

    envlf finetune --checkpoint runs/ucm-lite4/best --feedback feedback.csv more.csv \
        --data ../shared/datasets/ucm-captions --out runs/ucm-ft1 [--holdout 0.2] [--epochs 5] \
        [--replay-ratio 1.0] [--negatives-per-query 2] [--eval-split val]

What it does, in order:

1. **Read** every feedback CSV with `envlf.feedback.store.read_feedback` (the reader's report of
   skipped rows and why is printed per file; a file that is not an EnVLF feedback file is
   skipped whole, with its reason). A row_id seen in an earlier file is a duplicate. Only the
   latest judgement per (query, item) counts (`latest_judgements`).
2. **Join** judgements to the dataset: t2i items by image id; i2t items by caption *text*
   (the CSV's ``item_text``; its ``item_id`` is a row of the app's caption corpus, which only
   that index knows), their query image by ``query_image_id``. Rows that cannot be resolved
   are skipped with a reason: unknown image id, an uploaded query image (sha256 only), an
   empty caption, i2i judgements (image-image: no caption to pair), a "not relevant" label on
   a pair the dataset itself pairs (its image with its own caption) or that a relevant
   judgement pairs, ...
3. **Hold out** a share of the labelled *queries* (by query id, seeded: the qids with the
   smallest sha256(seed:qid)), never trained on: no training example has a held-out qid, and
   no training or replay pair repeats a held-out (image, caption) pair.
4. **Train** from the parent checkpoint, trunk frozen as configured, on cached trunk maps
   (`envlf.train.recipe.compute_trunk_features`, the trainer's cache). A step takes up to
   ``batch_size`` feedback units (a relevant pair with up to ``negatives_per_query`` of its
   query's judged negatives, or a query with only "not relevant" judgements) plus
   ``round(replay_ratio * batch_size)`` pairs drawn from the dataset's train split (replay, so
   the model does not forget what it knew). Steps: ``--steps``, else
   ``max(min_steps, ceil(epochs * units / batch_size))``; units per step are set so that each
   is seen about ``epochs`` times in the run whatever the number of steps (a few labels
   repeated dozens of times over-fit them). MLM is not trained (it plays no part in search).
   ``--scope`` limits what moves (``fusion``: the fusion encoder and ITM head only, so ITC
   embeddings and every index built with the parent stay valid); ``--l2sp`` pulls the trained
   weights toward the parent's.
5. **Measure** before and after, in one table (printed) and ``report.json``: judged metrics
   on the held-out queries (defined in `judged_metrics`) and `envlf.evaluation.evaluate.evaluate` on
   the eval split (ITC and re-ranked mR, expected under random ties).
6. **Save** ``OUT/model/`` (`save_pretrained`) whose ``config.lineage`` gains one entry
   (`LINEAGE_EVENT`): parent path and fingerprint, every feedback file with its SHA-256 and
   row counts, the held-out qids, the hyper-parameters, the before/after summary and times.

Losses (`envlf.train.losses.batch_losses`): rows = aligned (image, caption) pairs: feedback
positives and replay pairs. A pair (image, caption) is *known positive* when the dataset pairs them, when their
caption strings are identical to a pair that is, or when a (training-side) relevant judgement
pairs them; nothing known positive is ever used as a negative.

- ITM: each row (label 1); each judged "not relevant" pair of the batch (label 0: they are the
  hardest negatives there are, picked by the model itself and refuted by a person);
  ``loss.itm_negatives`` ITC-hard negative captions per row image and images per row caption
  sampled from the batch as in ALBEF (label 0). `envlf.train.losses.itm_loss` (positives and
  negatives weigh half each), plus the parent's listwise term when its ``loss.rank_weight`` is
  set, exactly as the trainer does. ``--judged-loss rank`` instead ranks each
  judged negative below its image's known caption and its query's relevant pair (pairwise,
  see `batch_losses`).
- ITC: symmetric InfoNCE over the rows, targets spread over all known positives. A judged
  negative of a row's query joins that row's candidates (an extra image column for a t2i
  query's caption row, an extra caption column for an i2t query's image row): a certain
  negative instead of a presumed one. Negatives of queries without any relevant judgement stay
  out of ITC (InfoNCE needs a positive in every row, and inventing one would be a guess): they
  train ITM only. ``--no-itc-judged-negatives`` drops them from ITC altogether.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from envlf.data.datasets import check_images, load_dataset
from envlf.data.features import compute_trunk_features
from envlf.evaluation import metrics as M
from envlf.evaluation.evaluate import encode_strings, evaluate
from envlf.feedback.store import empty_frame, latest_judgements, read_feedback
from envlf.model.checkpoint import CheckpointError
from envlf.model.core import load_pretrained
from envlf.paths import Paths
from envlf.runtime import resolve_device
from envlf.train.losses import JUDGED_LOSSES, batch_losses
from envlf.train.loop import FitState, Schedule, fit, make_optimizer
from envlf.train.recipe import seed_everything

log = logging.getLogger(__name__)

LINEAGE_EVENT = "finetune"
# FinetuneConfig.scope -> the parameter name prefixes it trains ("all": what the parent trained)
SCOPES: dict[str, tuple[str, ...]] = {
    "all": (),
    "fusion": ("fusion.",),
    "fusion+proj": ("fusion.", "image_proj.", "text_proj.", "logit_scale"),
}
MODEL_DIR = "model"  # OUT/model/ is the new checkpoint


@dataclass
class FinetuneConfig:
    checkpoint: str = ""  # parent checkpoint directory
    feedback: list[str] = field(default_factory=list)  # feedback CSVs (envlf.feedback.store format)
    data: str = ""  # the dataset the feedback's ids refer to (any envlf.data.datasets layout)
    out: str = "runs/finetune"
    holdout: float = 0.2  # share of labelled queries kept out of training for the before/after
    holdout_queries: list[str] = field(default_factory=list)  # explicit held-out qids (overrides `holdout`)
    seed: int = 0
    # Passes over the feedback units in the whole run: each unit is seen about this often, however
    # many steps there are (a few labels over many steps would otherwise repeat each one dozens
    # of times, which measurably over-fits them and hurts other queries).
    epochs: int = 5
    steps: int = 0  # optimiser steps; 0: ceil(epochs x units / batch_size), at least min_steps
    min_steps: int = 20  # a handful of labels still gets a few steps
    batch_size: int = 16  # feedback units per step, at most (fewer when steps x batch_size > epochs x units)
    replay_ratio: float = 1.0  # replay pairs from the train split per feedback unit
    negatives_per_query: int = 2  # judged negatives a unit brings to a step (sampled from its query's)
    itc_judged_negatives: bool = True  # judged negatives of a row's query join its ITC candidates
    # How "not relevant" judgements train ITM: "ce" (label 0 in the ITM cross-entropy, as
    # ALBEF's negatives) or "rank" (pairwise: below the same image's known caption and the
    # query's relevant pair; see batch_losses). Measured on the tiny model (3 seeds, demo world),
    # "rank" did no better on held-out queries and worse with suggested labels: "ce" stays.
    judged_loss: str = "ce"
    judged_weight: float = 1.0  # "rank" only: weight of the pairwise terms beside the ITM cross-entropy
    # With no training-side judgement (all held out), train on replay alone instead of failing:
    # the control run of an experiment (same steps, no labels), never what a user wants.
    allow_replay_only: bool = False
    # What the fine-tune may move: "all" (whatever the parent trained), "fusion" (the fusion
    # encoder and ITM head only: ITC embeddings, and so every index built with the parent, stay
    # exactly as they were; labels act through re-ranking), "fusion+proj" (also the two ITC
    # projections and the temperature). Default "fusion": the replay-only control of "all"
    # drifted the untouched test split by -0.95 +- 0.32 re-ranked mR (2 seeds), of "fusion" by
    # +0.16 (docs/experiments/label-loop.md).
    scope: str = "fusion"
    # L2-SP (Li et al., ICML 2018): l2sp * sum of (w - w_parent)^2 over the trained weights, a
    # pull toward the parent rather than toward zero. 0: off.
    l2sp: float = 0.0
    lr: float = 1e-4  # new layers (ViT module, cross-attention, heads, projections)
    lr_pretrained: float = 2e-5  # layers that started from pretrained weights
    weight_decay: float = 0.02
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    train_split: str = "train"  # replay source
    eval_split: str = "val"  # evaluate() before / after ("" to skip)
    rerank_k: int = 16  # re-rank depth of that evaluation
    workers: int = 2
    device: str = "auto"
    progress: bool = True
    home: str = ""  # runtime home (envlf.paths): its cache/features keeps the trunk cache


# -- reading and joining feedback -------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    """One latest judgement, joined to the dataset: the (image, caption) pair it is about."""

    qid: str
    direction: str  # t2i | i2t
    query: str  # query key (envlf.feedback.store.query_key)
    image: int  # record index in the dataset
    caption: str  # caption text
    text_key: int  # id of the normalised caption string (StringTable)
    relevant: bool
    rank: int
    row_id: str
    file: str


@dataclass
class Unresolved:
    file: str
    row_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row_id}: {self.reason}"


@dataclass
class FeedbackSet:
    """What `load_feedback` made of the CSVs: judgements, and an account of every row."""

    judgements: list[Judgement]
    files: list[dict]  # per file: path, sha256, bytes, rows_read, rows_skipped, ... (lineage)
    reader_reports: dict[str, str]  # file -> str(ReadReport) or why the file was refused
    unresolved: list[Unresolved]
    superseded: int  # older judgements of a (query, item) judged again later
    duplicates: int  # row_ids already seen in an earlier file

    def report(self) -> str:
        lines = []
        for f in self.files:
            lines.append(f"{f['path']}: {f['status']}; rows read {f['rows_read']}, skipped by the reader "
                         f"{f['rows_skipped']}, duplicates {f['duplicates']}, superseded {f['superseded']}, "
                         f"unresolved {f['unresolved']}, used {f['used']}")
            rep = self.reader_reports.get(f["path"], "")
            lines += ["  " + ln for ln in rep.splitlines()[1:]]  # the reader's own skips and warnings
        if self.unresolved:
            lines.append(f"{len(self.unresolved)} judgement(s) not usable:")
            lines += [f"  {u}" for u in self.unresolved]
        return "\n".join(lines)


class StringTable:
    """Normalised caption string -> integer key (identical captions share one)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def key(self, text: str) -> int:
        return self.ids.setdefault(M.normalize_caption(text), len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_files(paths: Sequence[str | Path]) -> tuple[list[dict], dict[str, str], list, int]:
    """Each feedback file read once, rows already seen in an earlier file dropped: (per-file
    entries, per-file reader reports, the frames with a _file column, duplicates dropped)."""
    files, reports, frames = [], {}, []
    seen: set[str] = set()
    duplicates = 0
    for p in map(str, paths):
        if not Path(p).is_file():
            raise FileNotFoundError(f"feedback file {p} not found")
        digest = sha256_file(p)
        entry = {"path": p, "sha256": digest, "bytes": Path(p).stat().st_size, "status": "ok", "rows_read": 0,
                 "rows_skipped": 0, "duplicates": 0, "superseded": 0, "unresolved": 0, "used": 0,
                 "used_train": 0, "used_holdout": 0}
        files.append(entry)
        try:
            df, rep = read_feedback(p)
        except ValueError as e:
            entry["status"] = f"refused: {e}"
            reports[p] = f"refused: {e}"
            continue
        if sha256_file(p) != digest:
            rep.warnings.append(f"{p} changed while it was read (the app is appending?): "
                                "the recorded SHA-256 is of the bytes before reading")
        reports[p] = str(rep)
        entry.update(rows_read=rep.rows, rows_skipped=len(rep.skipped),
                     skipped_reasons=[str(s) for s in rep.skipped], warnings=list(rep.warnings))
        fresh = ~df["row_id"].isin(seen)
        entry["duplicates"] = int((~fresh).sum())
        duplicates += entry["duplicates"]
        df = df[fresh].assign(_file=p)
        seen.update(df["row_id"])
        frames.append(df)
    return files, reports, frames, duplicates


def _join(row, id_to_idx: dict[str, int]) -> tuple[int, str] | str:
    """A latest judgement's (dataset image index, caption), or why it cannot be used."""
    if row.direction == "i2i":
        return "i2i judgement (image query, image result): no caption to pair, not used"
    if row.direction == "t2i":
        caption = str(row.query_text).strip()
        image = id_to_idx.get(str(row.item_id))
        if image is None:
            return f"t2i result image {str(row.item_id)[:80]!r} is not in the dataset"
    else:  # i2t
        if not row.query_image_id:
            return "i2t query is an uploaded image (sha256 only, no gallery id): its pixels are not in the dataset"
        image = id_to_idx.get(str(row.query_image_id))
        if image is None:
            return f"i2t query image {str(row.query_image_id)[:80]!r} is not in the dataset"
        caption = str(row.item_text).strip()
    if not M.normalize_caption(caption):
        return "empty caption text"
    return image, caption


def load_feedback(paths: Sequence[str | Path], dataset, strings: StringTable,
                  known: set[tuple[int, int]]) -> FeedbackSet:
    """Read, de-duplicate, keep the latest judgement per (query, item), join to `dataset`.

    strings: the caption string table (dataset captions already in it); known: the
    dataset's own (record, string key) pairs, which a "not relevant" label may not contradict.
    Raises FileNotFoundError for a missing file; a file that is not an EnVLF feedback file is
    skipped with its reason (see FeedbackSet.files)."""
    import pandas as pd  # deferred on purpose: pandas costs ~0.5 s to import

    files, reports, frames, duplicates = _read_files(paths)
    entry_of: dict[str, dict] = {}
    for e in files:  # a file given twice: its first entry counts, as before
        entry_of.setdefault(e["path"], e)
    if frames:
        allrows = pd.concat(frames, ignore_index=True)
    else:
        allrows = empty_frame().assign(_file=pd.Series(dtype=object))
    latest = latest_judgements(allrows.drop(columns="_file"))
    file_of = dict(zip(allrows["row_id"], allrows["_file"]))
    kept = set(latest["row_id"])
    superseded = 0
    for rid, f in file_of.items():
        if rid not in kept:
            superseded += 1
            entry_of[f]["superseded"] += 1

    id_to_idx = {r.image_id: i for i, r in enumerate(dataset.records)}
    judgements: list[Judgement] = []
    unresolved: list[Unresolved] = []
    for row in latest.itertuples(index=False):
        joined = _join(row, id_to_idx)
        if isinstance(joined, str):
            unresolved.append(Unresolved(file_of[row.row_id], row.row_id, joined))
            continue
        image, caption = joined
        judgements.append(Judgement(row.qid, row.direction, row.query, image, caption, strings.key(caption),
                                    row.label == "relevant", int(row.rank), row.row_id, file_of[row.row_id]))
    # a "not relevant" label that the data (or a relevant judgement) contradicts is not used
    relevant_pairs = known | {(j.image, j.text_key) for j in judgements if j.relevant}
    out = []
    for j in judgements:
        if not j.relevant and (j.image, j.text_key) in relevant_pairs:
            why = ("the dataset pairs this caption with this image" if (j.image, j.text_key) in known
                   else "another judgement marks the same (image, caption) pair relevant")
            unresolved.append(Unresolved(j.file, j.row_id, f"judged not relevant, but {why}: conflict, not used"))
            continue
        out.append(j)
    for u in unresolved:
        entry_of[u.file]["unresolved"] += 1
    for j in out:
        entry_of[j.file]["used"] += 1
    return FeedbackSet(out, files, reports, unresolved, superseded, duplicates)


def split_holdout(qids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Held-out query ids: the round(fraction * n) distinct qids with the smallest
    sha256(f"{seed}:{qid}"). Deterministic, independent of input order, and growing the
    label set never moves a query from held-out to training at the same fraction by much."""
    distinct = sorted(set(qids))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {fraction}")
    n = int(round(fraction * len(distinct)))
    if fraction > 0 and n == 0 and len(distinct) >= 2:
        n = 1
    ranked = sorted(distinct, key=lambda q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest())
    return set(ranked[:n])


# -- training material ------------------------------------------------------------------------------

@dataclass
class Unit:
    """What one feedback example brings to a step: a relevant pair (the row; None for a query
    judged only "not relevant") and the judged-negative pairs of its query."""

    qid: str
    direction: str
    row: tuple[int, str, int] | None  # (image, caption, text key)
    negatives: list[tuple[int, str, int]]


def build_units(judgements: Sequence[Judgement]) -> list[Unit]:
    by_q: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by_q[j.qid].append(j)
    units = []
    for qid in sorted(by_q):
        js = by_q[qid]
        neg = [(j.image, j.caption, j.text_key) for j in js if not j.relevant]
        pos = [(j.image, j.caption, j.text_key) for j in js if j.relevant]
        if pos:
            units += [Unit(qid, js[0].direction, p, neg) for p in pos]
        elif neg:
            units.append(Unit(qid, js[0].direction, None, neg))
    return units


class KnownPairs:
    """Known-positive (image, string key) pairs as a sorted tensor of codes, for fast masks."""

    def __init__(self, pairs: set[tuple[int, int]], n_keys: int):
        self.n_keys = int(n_keys)
        codes = sorted(i * self.n_keys + k for i, k in pairs)
        self.codes = torch.tensor(codes, dtype=torch.long)

    def mask(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(I,) image ids x (T,) string keys -> (I, T) bool: image i matches caption t."""
        codes = images[:, None].cpu() * self.n_keys + keys[None, :].cpu()
        return torch.isin(codes, self.codes)


# -- scoring labelled pairs -------------------------------------------------------------------------

@torch.no_grad()
def score_pairs(model, features: torch.Tensor, pairs: Sequence[tuple[int, str]], batch_size: int = 64):
    """(image id, caption) pairs -> (ITC cosine (n,), ITM logit margin (n,)) as numpy."""
    model.eval()
    if not pairs:
        return np.zeros(0), np.zeros(0)
    images = sorted({i for i, _ in pairs})
    slot_i = {i: n for n, i in enumerate(images)}
    texts = list(dict.fromkeys(c for _, c in pairs))
    slot_t = {c: n for n, c in enumerate(texts)}
    emb_i, tok = [], []
    for s in range(0, len(images), batch_size):
        e, t = model.encode_image(features=features[torch.tensor(images[s:s + batch_size])].to(model.device).float(),
                                  return_tokens=True)
        emb_i.append(e)
        tok.append(t)
    emb_i, tok = torch.cat(emb_i), torch.cat(tok)

    emb_t, hid, msk = encode_strings(model, texts, progress=False)
    emb_t, hid, msk = emb_t.to(model.device), hid.to(model.device).float(), msk.to(model.device)
    a = torch.tensor([slot_i[i] for i, _ in pairs], device=model.device)
    b = torch.tensor([slot_t[c] for _, c in pairs], device=model.device)
    itc = (emb_i[a] * emb_t[b]).sum(-1)
    margins = []
    for s in range(0, len(pairs), batch_size):
        lg = model.itm_logits(tok[a[s:s + batch_size]], hid[b[s:s + batch_size]], msk[b[s:s + batch_size]])
        margins.append(lg[:, 1] - lg[:, 0])
    return itc.float().cpu().numpy(), torch.cat(margins).float().cpu().numpy()


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a relevant item > score of a non-relevant one), ties counting 1/2."""
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def judged_metrics(model, features: torch.Tensor, judgements: Sequence[Judgement]) -> dict[str, float]:
    """Metrics of a model on a set of judged (query, item) pairs, e.g. the held-out queries.

    Per query with at least one relevant AND one non-relevant judged item ("mixed" queries):
    - ``itm_auc`` / ``itc_auc``: share of (relevant, non-relevant) item pairs the ITM margin /
      ITC cosine orders correctly (ties 1/2): re-ranking quality among the judged items;
    - ``itm_p@1`` / ``itc_p@1``: the judged item each stage scores highest is relevant;
    - ``margin_gap``: mean ITM margin of its relevant items minus that of its non-relevant ones.
    Each is the mean over mixed queries. Over all judged pairs:
    - ``itm_acc``: share whose ITM decision (margin > 0) matches the label;
    - ``itm_loss``: ITM cross-entropy of the labels; ``itm_loss_balanced``: its mean over
      relevant pairs and its mean over non-relevant pairs, averaged (class-balanced).
    """
    out: dict[str, float] = {"queries": float(len({j.qid for j in judgements})), "judgements": float(len(judgements)),
                             "relevant": float(sum(j.relevant for j in judgements))}
    if not judgements:
        return out
    itc, margin = score_pairs(model, features, [(j.image, j.caption) for j in judgements])
    y = np.array([j.relevant for j in judgements])
    out["itm_acc"] = float(((margin > 0) == y).mean())
    # CE of [no, yes] logits with margin m: -log sigmoid(+-m)
    ce = np.logaddexp(0.0, np.where(y, -margin, margin))
    out["itm_loss"] = float(ce.mean())
    # the same with both labels weighted equally: judged sets are mostly "not relevant", and a
    # model that just says "no" more often would otherwise look better
    out["itm_loss_balanced"] = float(np.mean([ce[y].mean() if y.any() else np.nan, ce[~y].mean() if (~y).any()
                                              else np.nan]))
    by_q: dict[str, list[int]] = defaultdict(list)
    for n, j in enumerate(judgements):
        by_q[j.qid].append(n)
    stats = defaultdict(list)
    for idx in by_q.values():
        idx = np.array(idx)
        yq = y[idx]
        if yq.all() or not yq.any():
            continue
        for name, s in (("itm", margin[idx]), ("itc", itc[idx])):
            stats[f"{name}_auc"].append(_auc(s[yq], s[~yq]))
            stats[f"{name}_p@1"].append(float(yq[int(np.argmax(s))]))
        stats["margin_gap"].append(float(margin[idx][yq].mean() - margin[idx][~yq].mean()))
    out["mixed_queries"] = float(len(stats.get("itm_auc", [])))
    for k in ("itm_auc", "itc_auc", "itm_p@1", "itc_p@1", "margin_gap"):
        out[k] = float(np.mean(stats[k])) if stats.get(k) else float("nan")
    return out


def labelled_itm_loss(model, features: torch.Tensor, judgements: Sequence[Judgement]) -> dict[str, float]:
    """ITM cross-entropy of judged pairs (relevant = 1, not relevant = 0), eval mode: plain
    mean and class-balanced ({"itm_loss", "itm_loss_balanced"})."""
    m = judged_metrics(model, features, judgements)
    return {k: m.get(k, float("nan")) for k in ("itm_loss", "itm_loss_balanced")}


def eval_rows(report: dict, rerank_k: int) -> dict[str, float]:
    """The figures of an `evaluate` report that the before/after table shows."""
    rows = report["rows"]
    itc = rows["ITC (expected)"]
    out = {"ITC mR": itc["mR"], "ITC t2i R@1": itc["t2i_R@1"], "ITC i2t R@1": itc["i2t_R@1"]}
    key = f"ITC + ITM top{rerank_k} (expected)"
    if key in rows:
        r = rows[key]
        out.update({f"re-ranked top{rerank_k} mR": r["mR"], "re-ranked t2i R@1": r["t2i_R@1"],
                    "re-ranked i2t R@1": r["i2t_R@1"]})
    return out


def format_table(before: dict[str, dict], after: dict[str, dict], titles: dict[str, str]) -> str:
    """One table: a section per group, a row per metric: before, after, change."""
    lines = [f"{'':38} {'before':>9} {'after':>9} {'change':>9}"]
    for group, b in before.items():
        lines.append(titles.get(group, group))
        a = after.get(group, {})
        for k, v in b.items():
            if k in ("queries", "judgements", "relevant", "mixed_queries"):
                continue
            w = a.get(k, float("nan"))
            lines.append(f"  {k:36} {v:9.3f} {w:9.3f} {w - v:+9.3f}")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------

@dataclass
class FeatureBank:
    """Cached trunk maps of every readable record of the dataset, in record order."""

    dataset: Any
    features: torch.Tensor

    def split_indices(self, name: str) -> list[int]:
        return [i for i, r in enumerate(self.dataset.records) if name == "all" or r.split == name]


def load_bank(model, data: str, workers: int = 2, progress: bool = True,
              home: str | Path | None = None) -> FeatureBank:
    """The dataset (unreadable images dropped) and its trunk maps, through the trainer's
    cache (`compute_trunk_features`): the whole dataset in one pass, as the app's bootstrap
    caches it for its index."""
    if not model.config.vision.freeze_trunk:
        raise ValueError("finetune trains on cached trunk features: the parent's trunk must be frozen "
                         "(vision.freeze_trunk)")
    full = load_dataset(data)
    full, bad = check_images(full, max_workers=max(1, workers), decode=False)
    for p in bad:
        log.warning("skipped unreadable image: %s", p)
    feats = compute_trunk_features(model, full, workers=workers, cache_dir=Paths.resolve(home).features,
                                   progress=progress)
    return FeatureBank(full, feats)


def measure(model, bank: FeatureBank, heldout: Sequence[Judgement], train_j: Sequence[Judgement],
            eval_split: str, rerank_k: int, workers: int = 0, known: dict | None = None) -> dict[str, dict]:
    """{"holdout": judged_metrics on the held-out judgements, "labelled": the training labels'
    ITM loss, "eval": evaluate() figures on eval_split}. known: parts already measured
    ("holdout", "eval") that are reused as they are."""
    known = known or {}
    out = {"holdout": known["holdout"] if "holdout" in known else judged_metrics(model, bank.features, heldout),
           "labelled": labelled_itm_loss(model, bank.features, train_j)}
    if "eval" in known:
        out["eval"] = known["eval"]
    elif eval_split:
        idx = bank.split_indices(eval_split)
        if idx:
            ds = bank.dataset.subset(idx, suffix=eval_split)
            rep = evaluate(model, ds, rerank_k=rerank_k, features=bank.features[torch.tensor(idx)],
                           references=False, workers=workers, progress=False)
            out["eval"] = eval_rows(rep, rerank_k)
    return out


class StepDrawer:
    """Draws one fine-tuning step's batch: `per_step` feedback units (each with up to
    `negatives_per_query` of its judged negatives), `n_replay` replay pairs, and for every
    image of a judged negative one anchor pair of that image (see `batch_losses`).
    Calling it returns (rows, row_negatives, row_directions, itm_only_negatives, anchors)."""

    def __init__(self, units, replay, anchor_pool, per_step: int, n_replay: int, negatives_per_query: int,
                 rng: np.random.Generator):
        self.units, self.replay, self.anchor_pool = units, replay, anchor_pool
        self.per_step, self.n_replay, self.k, self.rng = per_step, n_replay, negatives_per_query, rng
        self.order, self.cursor = rng.permutation(len(units)), 0

    def __call__(self):
        rng, take = self.rng, []
        while len(take) < self.per_step:
            if self.cursor == len(self.order):
                self.order, self.cursor = rng.permutation(len(self.units)), 0
            take.append(self.units[self.order[self.cursor]])
            self.cursor += 1
        rows, negs, dirs, itm_only = [], [], [], []
        for u in take:
            k = min(self.k, len(u.negatives))
            picked = [u.negatives[int(x)] for x in rng.choice(len(u.negatives), size=k, replace=False)] if k else []
            if u.row is None:
                itm_only += picked
            else:
                rows.append(u.row)
                negs.append(picked)
                dirs.append(u.direction)
        if self.n_replay:
            for x in rng.choice(len(self.replay), size=min(self.n_replay, len(self.replay)), replace=False):
                rows.append(self.replay[int(x)])
                negs.append([])
                dirs.append("replay")
        if not rows:  # only negatives and no replay: ITM on them alone is all there is
            raise ValueError("no relevant judgement and --replay-ratio 0: nothing to anchor ITC; add replay")
        anchors = {}
        for i, _, _ in [p for n in negs for p in n] + itm_only:
            if i in self.anchor_pool and i not in anchors:
                pool = self.anchor_pool[i]
                anchors[i] = pool[int(rng.integers(len(pool)))]
        return rows, negs, dirs, itm_only, anchors


def _check(fc: FinetuneConfig, model) -> None:
    if not fc.feedback:
        raise ValueError("give at least one --feedback file")
    if not fc.checkpoint and model is None:
        raise ValueError("--checkpoint is required")
    if fc.replay_ratio < 0 or fc.batch_size < 1:
        raise ValueError("replay_ratio must be >= 0 and batch_size >= 1")
    if fc.judged_loss not in JUDGED_LOSSES:
        raise ValueError(f"judged_loss must be one of {JUDGED_LOSSES}, got {fc.judged_loss!r}")
    if fc.scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {fc.scope!r}")
    if fc.l2sp < 0:
        raise ValueError(f"l2sp must be >= 0, got {fc.l2sp}")


def restrict_scope(model, scope: str) -> list[str]:
    """Freeze every trainable parameter outside `scope` (see FinetuneConfig.scope); returns
    the names left trainable."""
    prefixes = SCOPES[scope]
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad and prefixes and not name.startswith(prefixes):
            p.requires_grad_(False)
        if p.requires_grad:
            names.append(name)
    return names


class L2SP:
    """The pull toward the parent: weight * sum over the trained parameters of (w - w0)^2."""

    def __init__(self, model, weight: float):
        self.weight = float(weight)
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if weight else []

    def __call__(self) -> torch.Tensor | None:
        if not self.pairs:
            return None
        return self.weight * sum(((p - p0.to(p.dtype)) ** 2).sum() for p, p0 in self.pairs)


@dataclass
class HoldOut:
    """Step 3: the judgements split by query into held-out and training sides."""

    held: set[str]  # held-out query ids
    heldout: list[Judgement]
    held_pairs: set[tuple[int, int]]  # (image, string key) of every held-out judgement
    train: list[Judgement]  # training-side judgements, minus any that repeat a held-out pair
    repeats: list[Judgement]  # the training-side judgements dropped for repeating one

    @classmethod
    def of(cls, fc: FinetuneConfig, fb: FeedbackSet) -> "HoldOut":
        qids = [j.qid for j in fb.judgements]
        held = set(fc.holdout_queries) & set(qids) if fc.holdout_queries else split_holdout(qids, fc.holdout, fc.seed)
        heldout = [j for j in fb.judgements if j.qid in held]
        held_pairs = {(j.image, j.text_key) for j in heldout}
        train_j = [j for j in fb.judgements if j.qid not in held]
        repeats = [j for j in train_j if (j.image, j.text_key) in held_pairs]
        train_j = [j for j in train_j if (j.image, j.text_key) not in held_pairs]
        for j in fb.judgements:  # each file's counts of what it gave to each side
            e = next(e for e in fb.files if e["path"] == j.file)
            if j.qid in held:
                e["used_holdout"] += 1
            elif (j.image, j.text_key) not in held_pairs:
                e["used_train"] += 1
        return cls(held, heldout, held_pairs, train_j, repeats)


def _replay_and_anchors(fc: FinetuneConfig, bank: FeatureBank, strings: StringTable, split: HoldOut):
    """Replay: the train split's own pairs, minus any that repeat a held-out pair. Anchors:
    per image, the pairs training may use anyway (replay, relevant labels), for the pairwise
    terms of its judged negatives; never a held-out pair."""
    ds = bank.dataset
    train_idx = bank.split_indices(fc.train_split) if fc.replay_ratio > 0 else []
    replay = [(i, c, strings.key(c)) for i in train_idx for c in ds.records[i].captions]
    replay = [p for p in replay if (p[0], p[2]) not in split.held_pairs]
    if fc.replay_ratio > 0 and not replay:
        raise ValueError(f"replay needs the {fc.train_split!r} split of {fc.data}: it has no pairs")
    anchor_pool: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
    for p in replay:
        anchor_pool[p[0]].append(p)
    for j in split.train:
        if j.relevant and (j.image, j.text_key) not in split.held_pairs:
            anchor_pool[j.image].append((j.image, j.caption, j.text_key))
    return replay, anchor_pool


def _lineage_entry(fc: FinetuneConfig, parent_fp: str, fb: FeedbackSet, split: HoldOut, units, train_qids,
                   plan: dict, before: dict, after: dict, started: str, t_start: float) -> dict:
    """Step 6: what the new checkpoint's lineage records of this fine-tune."""
    hyper = {k: v for k, v in dataclasses.asdict(fc).items() if k not in ("feedback", "holdout_queries", "out",
                                                                          "checkpoint", "data", "progress", "home")}
    return {
        "event": LINEAGE_EVENT,
        "parent": {"path": str(fc.checkpoint), "fingerprint": parent_fp},
        "data": str(fc.data),
        "feedback": [{k: f[k] for k in ("path", "sha256", "bytes", "status", "rows_read", "rows_skipped",
                                         "duplicates", "superseded", "unresolved", "used", "used_train",
                                         "used_holdout")} for f in fb.files],
        "judgements": {"usable": len(fb.judgements), "train": len(split.train), "holdout": len(split.heldout),
                       "relevant_train": sum(j.relevant for j in split.train), "units": len(units),
                       "dropped_repeating_holdout": len(split.repeats)},
        "holdout": {"fraction": fc.holdout, "seed": fc.seed, "explicit": bool(fc.holdout_queries),
                    "qids": sorted(split.held)},
        "train_qids": train_qids,
        "hyperparameters": {**hyper, **plan},
        "before": before, "after": after,
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _train(fc: FinetuneConfig, model, bank: FeatureBank, known: KnownPairs, units, replay, anchor_pool):
    """Step 4 through the one training loop: returns (per-step loss history, seconds, the plan:
    steps run, feedback units and replay pairs per step)."""
    total = fc.steps or max(fc.min_steps, math.ceil(fc.epochs * len(units) / fc.batch_size))
    # feedback units per step: `epochs` passes in all, spread over the steps
    per_step = min(fc.batch_size, len(units), max(1, round(fc.epochs * len(units) / total))) if units else 0
    n_replay = int(round(fc.replay_ratio * fc.batch_size))
    if not units and not n_replay:
        raise ValueError("nothing to train on: no training-side judgements and no replay")
    optimizer = make_optimizer(model, fc.lr, fc.lr_pretrained, fc.weight_decay)
    rng = np.random.default_rng(fc.seed)
    gen = torch.Generator().manual_seed(fc.seed)
    draw = StepDrawer(units, replay, anchor_pool, per_step, n_replay, fc.negatives_per_query, rng)

    pull = L2SP(model, fc.l2sp)

    def loss_fn(batch) -> dict[str, torch.Tensor]:
        rows, negs, dirs, itm_only, anchors = batch
        losses = batch_losses(model, bank.features, known, rows, negs, dirs, itm_only,
                              fc.itc_judged_negatives, gen, anchors, fc.judged_loss, fc.judged_weight)
        penalty = pull()
        if penalty is not None:
            losses["l2sp"] = penalty
            losses["loss"] = losses["loss"] + penalty
        return losses

    history = []

    def on_batch(b: int, losses: dict, st: FitState, bar) -> None:
        history.append({"step": b + 1, **{k: float(v.detach()) for k, v in losses.items()}})
        bar.set_postfix({k: f"{v:.3f}" for k, v in st.running.items()})

    model.train()
    t_train = time.perf_counter()
    fit(model, optimizer, (draw() for _ in range(total)), loss_fn,
        Schedule(total, fc.warmup_steps, fc.min_lr_ratio), device_type=model.device.type,
        desc="fine-tune", progress=fc.progress, total=total, on_batch=on_batch)
    train_s = time.perf_counter() - t_train
    model.eval()
    return history, train_s, {"steps_run": total, "units_per_step": per_step, "replay_pairs_per_step": n_replay}


# long: steps 1-6 of the module docstring in order, each a helper above; it reads as the recipe
def finetune(fc: FinetuneConfig, model=None, bank: FeatureBank | None = None,
             before: dict | None = None) -> dict:
    """Run steps 1-6 of the module docstring; returns the report (also OUT/report.json).
    model / bank: the parent already loaded and its feature bank (the experiment reuses them;
    the model is copied, never changed in place). before: the parent's `measure` on the same
    held-out judgements and eval split ({"holdout", "eval"}: the experiment measures them once
    for all runs; callers must pass figures of the same held-out set), else measured here."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    _check(fc, model)
    seed_everything(fc.seed)
    device = resolve_device(fc.device)
    out = Path(fc.out)
    model = load_pretrained(fc.checkpoint, device=device) if model is None else copy.deepcopy(model).to(device)
    model.vision.set_trunk_trainable(not model.config.vision.freeze_trunk)
    model.text.set_trainable_layers(model.config.text.trainable_layers)
    trained = restrict_scope(model, fc.scope)
    log.info("fine-tuning %d parameter tensors (scope %s)", len(trained), fc.scope)
    parent_fp = model.fingerprint()
    if bank is None:
        bank = load_bank(model, fc.data, fc.workers, fc.progress, fc.home)
    ds = bank.dataset

    # 1-2: read and join
    strings = StringTable()
    known_data = {(i, strings.key(c)) for i, r in enumerate(ds.records) for c in r.captions}
    fb = load_feedback(fc.feedback, ds, strings, known_data)
    print(fb.report())
    if not fb.judgements:
        raise ValueError("no usable judgements in the feedback files (see the report above)")
    split = HoldOut.of(fc, fb)  # 3
    units = build_units(split.train)
    train_qids = sorted({u.qid for u in units})
    if set(train_qids) & split.held:  # the invariant the before/after rests on (tests check it too)
        raise RuntimeError("a held-out query reached the training set")
    if not units and not fc.allow_replay_only:
        raise ValueError("every usable judgement is held out: lower --holdout or label more queries")
    replay, anchor_pool = _replay_and_anchors(fc, bank, strings, split)
    known = KnownPairs(known_data | {(j.image, j.text_key) for j in split.train if j.relevant}, len(strings))
    print(f"judgements: {len(fb.judgements)} usable ({sum(j.relevant for j in fb.judgements)} relevant) from "
          f"{len({j.qid for j in fb.judgements})} queries; held out {len(split.held)} queries "
          f"({len(split.heldout)} judgements); training on {len(split.train)} judgements of {len(train_qids)} "
          f"queries = {len(units)} units" + (f"; dropped {len(split.repeats)} training judgements that repeat a "
                                             "held-out pair" if split.repeats else ""))

    before = measure(model, bank, split.heldout, split.train, fc.eval_split, fc.rerank_k, workers=0, known=before)
    history, train_s, plan = _train(fc, model, bank, known, units, replay, anchor_pool)  # 4
    after = measure(model, bank, split.heldout, split.train, fc.eval_split, fc.rerank_k, workers=0)  # 5
    titles = {"holdout": f"held-out queries ({len(split.held)} queries, {len(split.heldout)} judged items; "
                         "judged metrics)",
              "labelled": f"training labels ({len(split.train)} judged pairs)",
              "eval": f"{fc.eval_split} split, evaluate() (expected under random ties, rerank_k {fc.rerank_k})"}
    table = format_table(before, after, titles)
    print(table)

    # 6: save with lineage
    entry = _lineage_entry(fc, parent_fp, fb, split, units, train_qids, plan, before, after, started, t_start)
    model.config.lineage.append(entry)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / MODEL_DIR)
    report = {"checkpoint": str(out / MODEL_DIR), "parent": entry["parent"], "fingerprint": model.fingerprint(),
              "feedback": fb.files, "unresolved": [dataclasses.asdict(u) for u in fb.unresolved],
              "holdout_qids": sorted(split.held), "train_qids": train_qids, "before": before, "after": after,
              "table": table, "steps": plan["steps_run"], "train_seconds": round(train_s, 1), "history": history,
              "lineage_entry": entry}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


# -- CLI ------------------------------------------------------------------------------------------

CLI_HELP = {
    "holdout": "share of the labelled queries held out (by query id) for the before/after",
    "seed": "seeds the hold-out split, sampling and training",
    "epochs": "passes over the feedback units in the whole run",
    "steps": "optimiser steps (0: max(min-steps, ceil(epochs x units / batch-size)))",
    "batch_size": "feedback units per step, at most",
    "replay_ratio": "pairs of the train split per step, per feedback unit of batch-size",
    "negatives_per_query": "judged negatives a unit brings to a step",
    "itc_judged_negatives": "judged negatives of a row's query join its ITC candidates",
    "judged_loss": "how 'not relevant' labels train ITM: label 0 in the cross-entropy, or pairwise ranking",
    "scope": "what moves: all the parent trained, the fusion encoder + ITM head (ITC and indexes unchanged), or also the ITC projections",
    "l2sp": "weight of the L2-SP pull toward the parent's weights (0: off)",
    "lr": "learning rate of the new layers (ViT module, cross-attention, heads, projections)",
    "lr_pretrained": "learning rate of the layers that started from pretrained weights",
    "eval_split": "split evaluate() measures before and after ('' to skip)",
    "rerank_k": "re-rank depth of that evaluation",
    "home": "runtime home whose cache/features holds the trunk cache ('': $ENVLF_HOME or ~/.cache/envlf)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="envlf finetune", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf finetune --checkpoint runs/ucm-lite4/best --feedback ~/.cache/envlf/feedback.csv "
                                       "--data ../shared/datasets/ucm-captions --out runs/ucm-ft1")
    p.add_argument("--checkpoint", required=True, help="parent checkpoint directory")
    p.add_argument("--feedback", required=True, nargs="+", help="feedback CSV file(s)")
    p.add_argument("--data", required=True, help="dataset the feedback refers to")
    p.add_argument("--out", required=True, help="run directory (the checkpoint goes to OUT/model)")
    d = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("checkpoint", "feedback", "data", "out", "holdout_queries", "allow_replay_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        kw = {"help": f"{CLI_HELP.get(f.name, '')} (default: {default!r})".strip()}
        if f.name == "judged_loss":
            kw["choices"] = JUDGED_LOSSES
        if f.name == "scope":
            kw["choices"] = tuple(SCOPES)
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, **kw)
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=default, **kw)
    p.add_argument("--holdout-queries", nargs="*", default=[], help="explicit held-out query ids (qids)")
    p.add_argument("--json", help="also write the report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    args = build_parser().parse_args(argv)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    try:
        report = finetune(FinetuneConfig(**kw))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    print(f"checkpoint: {report['checkpoint']} (fingerprint {report['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
