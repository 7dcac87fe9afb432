"""The label loop, simulated: does fine-tuning on N labelled results help on queries never labelled?

    # small: tiny random-weight model, 300-scene world, 3 seeds; about 4 min on 2 busy CPU cores
    python -m experiments.label_loop --out runs/label-loop-tiny
    # real: the app's lite model and demo world, as envlf.bootstrap.prepare_default() leaves them
    python -m experiments.label_loop --out runs/label-loop-lite \
        --data ~/.cache/envlf/world --parent ~/.cache/envlf/models/world-lite/best --repeats 1

Protocol
--------
- **Gallery**: the images of ``--gallery-split`` (default ``val``: never trained on by the parent).
  It is indexed with the parent (`GalleryIndex` + `SearchEngine`), as the app would.
- **Queries**: the distinct caption strings of the gallery images (t2i). They are split once, by
  query id with `envlf.train.finetune.split_holdout` (``--holdout`` share, seeded), into *label-side*
  queries and *held-out* queries. The held-out set is the same for every strategy and budget.
- **Annotator** (simulated from ground truth). ``--relevance content`` (the default; demo
  worlds only): a person who checks what the query says. An image is relevant when it is of
  the query caption's scene type and every grounded phrase of the caption holds there: the
  named category with the stated colour / size, in the stated number (exactly, for a number
  word; "many" at least 8, "several" at least 5, "a few" / "some" at least 2; see
  `envlf.world.truth`). Relations ("beside", "left of") are not checked. "A forest." fits every
  forest tile; "three white planes beside the terminal" only airports with exactly three
  white planes. ``--relevance caption``: only images that carry the query string itself
  (in the demo world almost always the caption's own image) -- stricter than any person,
  since it calls "not relevant" every other tile that fits the words, and fine-tuning then
  learns those false negatives. ``--relevance class``: every image of the same
  scene class (a loose, topical annotator). ``--relevance objects`` (for real captioned data
  such as UCM-Captions, which has no content truth): an image is relevant when it is of the
  query caption's scene class and its own captions name every object the query names
  (``OBJECT_WORDS``: "planes" and "airplane" are one object, colours and counts are not checked).
- **Strategies**, each labelling N results of label-side queries searched once with the parent
  (k = ``--rerank-k`` results, all re-ranked):
  ``top``: each query's results in rank order, ``--depth`` per query, query after query (ranks
  below depth only once every query's top ``--depth`` is labelled); ``suggested``: the N results
  `envlf.feedback.suggest.suggest` scores highest; ``diverse``: blocks of ``--depth`` top results of
  the queries `envlf.feedback.suggest.suggest_queries` picks (uncertain, and covering different
  images); ``random``: N results drawn uniformly (a control).
  A ``control`` run fine-tunes with the same steps and replay and no label at all, so that what
  replay alone does (the parent may not have converged) is not credited to the labels.
- The labels go to a feedback CSV through `FeedbackStore`, as the app writes them; the held-out
  queries are judged too, in the same file (every re-ranked candidate, i.e. the ITC top k, a
  set ITM did not choose, plus every relevant gallery image beyond it), and
  `envlf.train.finetune.finetune` holds them out by qid (``holdout_queries``): their labels are never
  trained on, and it reports judged metrics on them.
- **Gain** (after minus before), on two kinds of held-out queries:
  1. the held-out queries on the labelled gallery: t2i R@1/5/10 over the whole gallery with the
     full ground truth, ranked as search does (ITC top ``--rerank-k`` re-ranked by ITM, the rest
     by ITC), and by ITC alone; and `finetune`'s judged ITM AUC. Their images are gallery images
     that label-side queries may also have been about (each carries 5 captions): that is the
     app's situation, people label an archive and later search it with new words.
  2. the ``--eval-split`` (default ``test``) with ``evaluate()``: images and captions that no
     label touched (generalisation, and forgetting).
  The *label effect* is the gain minus the control's gain, paired by seed.

Findings (docs/experiments/label-loop.md): with the fine-tune's default scope (the fusion encoder
and ITM head), labelling the top 10 results of 100 queries (N = 1,000) raised held-out re-ranked
R@1 by +5.05 +- 0.48 over the replay-only control (3 seeds) and left the untouched test split
where it was (control -0.13 +- 0.25 re-ranked mR); "diverse" blocks gained less than "top".
With scope "all" the control itself drifted the test split by -0.95 +- 0.32 (2 seeds): the ITC
side refitted to small replay batches. The string-identity annotator's labels lowered held-out
recall (generator-2 world): they call tiles that fit the query "not relevant".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from envlf.evaluation import metrics as M
from envlf.feedback.store import FeedbackRow, FeedbackStore, query_id, query_key
from envlf.train.finetune import FinetuneConfig, finetune, load_bank, split_holdout
from envlf.world.truth import ContentTruth

log = logging.getLogger(__name__)

STRATEGIES = ("top", "suggested", "diverse", "random")


# -- ground truth -----------------------------------------------------------------------------------

# The objects a person looks for in an aerial caption (UCM-Captions / RSICD vocabulary), each
# word -> the object it names (plural and synonyms folded). The `objects` annotator reads them.
OBJECT_WORDS = {w: obj for obj, words in {
    "plant": "plant plants", "car": "car cars", "road": "road roads", "house": "house houses villa",
    "mobile home": "mobile", "tree": "tree trees treefs", "building": "building buildings", "river": "river tributary",
    "forest": "forest", "runway": "runway", "boat": "boat boats", "turf": "turf turfs", "sand": "sand sands snds",
    "freeway": "freeway freeways highway", "tennis court": "tennis", "baseball field": "baseball diamond diamonds",
    "golf course": "golf", "bunker": "bunker bunkers", "storage tank": "storage tank tanks", "beach": "beach",
    "harbor": "harbor", "intersection": "intersection junction", "lawn": "lawn lawns", "airport": "airport",
    "airplane": "airplane airplanes plane planes fuselage", "overpass": "overpass", "wave": "wave waves foam foams",
    "roof": "roof roofs", "farmland": "farmland cropland", "water": "water waters sea pond", "pool": "pool pools",
    "grass": "grass", "trail": "trail trails", "chaparral": "chaparral", "weed": "weed weeds", "bush": "bush bushes",
    "desert": "desert loess", "parking lot": "parking parkinglot", "pedestrian": "pedestrian pedestrians people",
    "container": "container containers containters", "stadium": "stadium", "luggage": "luggage lugage",
    "basketball court": "basketball", "bank": "bank banks", "backyard": "backyards",
}.items() for w in words.split()}


def caption_objects(text: str) -> frozenset[str]:
    """The objects a caption names (OBJECT_WORDS), e.g. "two planes beside the runway" -> {airplane, runway}."""
    import re

    return frozenset(OBJECT_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in OBJECT_WORDS)


class Annotator:
    """Relevance from the dataset: see the module docstring (--relevance)."""

    MODES = ("caption", "class", "content", "objects")

    def __init__(self, dataset, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"relevance must be one of {', '.join(self.MODES)}")
        self.mode = mode
        self.records = dataset.records
        self.strings = [{M.normalize_caption(c) for c in r.captions} for r in dataset.records]
        self.classes_of: dict[str, set] = {}
        for r, s in zip(dataset.records, self.strings):
            for k in s:
                self.classes_of.setdefault(k, set()).add(r.label)
        if mode == "objects":  # a person checking the scene and the objects a caption names
            self.objects = [frozenset().union(*map(caption_objects, r.captions)) for r in dataset.records]
        if mode == "content":  # what a person checks: the world's content truth
            self.truth = ContentTruth(dataset.records)
            self._matches: dict[str, np.ndarray | None] = {}

    def relevant(self, query: str, image: int) -> bool:
        k = M.normalize_caption(query)
        if self.mode == "caption":
            return k in self.strings[image]
        if self.mode == "class":
            return self.records[image].label in self.classes_of.get(k, set())
        if self.mode == "objects":
            return k in self.strings[image] or (self.records[image].label in self.classes_of.get(k, set())
                                                and caption_objects(query) <= self.objects[image])
        if k in self.strings[image]:
            return True
        if k not in self._matches:
            self._matches[k] = self.truth.matches(k)
        m = self._matches[k]
        return m is not None and bool(m[image])


UNTOUCHED = "untouched"


def move_untouched(ds, split: str, fraction: float, seed: int) -> list[int]:
    """Move round(fraction * n) of `split`'s images (those with the smallest sha256(seed:image_id))
    to the split "untouched", in place: images and captions no label and no replay touches."""
    import hashlib

    if not 0 < fraction < 1:
        raise ValueError(f"--untouched must be in (0, 1), got {fraction}")
    idx = [i for i, r in enumerate(ds.records) if r.split == split]
    idx.sort(key=lambda i: hashlib.sha256(f"{seed}:{ds.records[i].image_id}".encode()).hexdigest())
    moved = sorted(idx[:round(fraction * len(idx))])
    for i in moved:
        ds.records[i] = dataclasses.replace(ds.records[i], split=UNTOUCHED)
    return moved


# -- held-out recall with full ground truth ------------------------------------------------------

@torch.no_grad()
def heldout_recall(model, features: torch.Tensor, gallery: Sequence[int], queries: Sequence[str],
                   annotator: Annotator, rerank_k: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """t2i recall of `queries` over the `gallery` images (record ids), full ground truth.

    R@k = share of queries with a relevant image in the top k; "re-ranked": the ITC top
    rerank_k ordered by ITM margin above the rest in ITC order (as search and evaluate do)."""
    from envlf.evaluation.evaluate import encode_strings

    model.eval()
    g = torch.tensor(list(gallery))
    emb_i, tok = [], []
    for s in range(0, len(g), 64):
        e, t = model.encode_image(features=features[g[s:s + 64]].to(model.device).float(), return_tokens=True)
        emb_i.append(e)
        tok.append(t)
    emb_i, tok = torch.cat(emb_i), torch.cat(tok)
    emb_t, hid, msk = encode_strings(model, list(queries), progress=False)
    emb_t, hid, msk = emb_t.to(model.device), hid.to(model.device).float(), msk.to(model.device)
    sims = (emb_t @ emb_i.t()).float().cpu().numpy()  # (Q, G)
    hits = {f"ITC R@{k}": [] for k in ks} | {f"re-ranked R@{k}": [] for k in ks}
    for q, text in enumerate(queries):
        rel = np.array([annotator.relevant(text, int(i)) for i in gallery])
        if not rel.any():
            continue
        order = np.argsort(-sims[q], kind="stable")
        n = min(rerank_k, len(order))
        head = order[:n]
        m = model.itm_score(tok[torch.as_tensor(head)], (hid[q:q + 1], msk[q:q + 1]), as_probability=False)
        m = m.float().cpu().numpy()
        rr = np.concatenate([head[np.lexsort((-sims[q][head], -m))], order[n:]])
        for k in ks:
            hits[f"ITC R@{k}"].append(float(rel[order[:k]].any()))
            hits[f"re-ranked R@{k}"].append(float(rel[rr[:k]].any()))
    out = {k: 100.0 * float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out["queries"] = float(len(hits[f"ITC R@{ks[0]}"]))
    return out


# -- strategies -------------------------------------------------------------------------------------

def select(strategy: str, results: list, n: int, depth: int, seed: int) -> list[tuple[int, object]]:
    """N (query number, hit) picks from the label-side search results."""
    if strategy == "top":
        cands = [(h.rank > depth, qn, h.rank, qn, h) for qn, r in enumerate(results) for h in r.items]
        cands.sort(key=lambda t: t[:3])
        return [(qn, h) for *_, qn, h in cands[:n]]
    if strategy == "suggested":
        from envlf.feedback.suggest import suggest

        by_query = {r.query: qn for qn, r in enumerate(results)}
        return [(by_query[s.query], s.hit) for s in suggest(None, results, n=n)]
    if strategy == "diverse":
        from envlf.feedback.suggest import suggest_queries

        by_query = {r.query: qn for qn, r in enumerate(results)}
        return [(by_query[s.query], s.hit) for s in suggest_queries(results, n=n, depth=depth)]
    if strategy == "random":
        cands = [(qn, h) for qn, r in enumerate(results) for h in r.items]
        idx = np.random.default_rng(seed).permutation(len(cands))[:n]
        return [cands[int(i)] for i in sorted(idx)]
    raise ValueError(f"unknown strategy {strategy!r}: choose from {STRATEGIES}")


def judgement_rows(picks, results, annotator: Annotator, row_of: dict[str, int], who: str) -> list[FeedbackRow]:
    rows = []
    for qn, h in picks:
        r = results[qn]
        rel = annotator.relevant(r.query, row_of[h.image_id])
        rows.append(FeedbackRow(annotator=who, direction="t2i", query_text=r.query, item_id=h.image_id,
                                item_text=h.path, rank=h.rank, itc_score=h.itc, itm_score=h.itm,
                                label="relevant" if rel else "not_relevant", model_fingerprint=r.model_fingerprint,
                                index_fingerprint=r.index_fingerprint, app_version="label_loop"))
    return rows


# -- the experiment -------------------------------------------------------------------------------

def finetune_overrides(items: Sequence[str]) -> dict:
    """--ft KEY=VALUE pairs -> FinetuneConfig fields, each value parsed as its field's type."""
    defaults = FinetuneConfig()
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--ft {item!r}: expected KEY=VALUE with KEY a FinetuneConfig field")
        kind = type(getattr(defaults, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--ft {item!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"--ft {item!r}: {key} takes a {kind.__name__}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.label_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="dataset (default: generate a demo world of --world-size scenes in OUT/world)")
    p.add_argument("--world-size", type=int, default=300)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--parent", help="parent checkpoint (default: train one: --model, --parent-epochs)")
    p.add_argument("--model", default="tiny", help="config of the parent trained here (tiny, lite)")
    p.add_argument("--parent-epochs", type=int, default=30)
    p.add_argument("--parent-batch-size", type=int, default=32)
    p.add_argument("--parent-set", action="append", default=None, metavar="KEY=VALUE",
                   help="model config override for the parent trained here (default for tiny: loss.mlm_weight=0, "
                        "which makes its steps 2.5x faster; MLM plays no part in retrieval)")
    p.add_argument("--budgets", default="100,300,1000", help="labelled results per run, comma-separated")
    p.add_argument("--strategies", default="top,suggested", help=f"comma-separated, of {', '.join(STRATEGIES)}")
    p.add_argument("--relevance", default="content", choices=Annotator.MODES)
    p.add_argument("--gallery-split", default="val")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--untouched", type=float, default=0.0,
                   help="move this share of the gallery split's images (seeded) to a split 'untouched' and "
                        "evaluate on it instead of --eval-split: for data without a test split (UCM: train+val)")
    p.add_argument("--holdout", type=float, default=0.5, help="share of the gallery's queries held out")
    p.add_argument("--depth", type=int, default=10, help="results a person labels per query (top strategy)")
    p.add_argument("--rerank-k", type=int, default=16, help="results per query, all re-ranked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="fine-tune every run with this many seeds (seed, seed+1, ...): mean and spread in the table")
    # fine-tuning (envlf.train.finetune.FinetuneConfig)
    p.add_argument("--epochs", type=int, default=5, help="passes over the labels in a run (FinetuneConfig.epochs)")
    p.add_argument("--judged-loss", default="ce", choices=("ce", "rank"), help="FinetuneConfig.judged_loss")
    p.add_argument("--steps", type=int, default=100,
                   help="optimiser steps of every fine-tuning run (the same for all, control included)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the replay-only control run (same steps, no labels)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--replay-ratio", type=float, default=1.0)
    p.add_argument("--negatives-per-query", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-pretrained", type=float, default=2e-5)
    p.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE",
                   help="any other FinetuneConfig field for every run, e.g. --ft scope=fusion --ft l2sp=0.01")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: 1 for the tiny model, which is 3x faster so on 2 busy cores, "
                        "else torch's default)")
    return p


# long: the experiment's one procedure, step by step as docs/experiments/label-loop.md describes it
def run(args: argparse.Namespace) -> dict:
    from envlf.model.core import load_pretrained
    from envlf.search.index import GalleryIndex
    from envlf.search.engine import SearchEngine
    from envlf.runtime import resolve_device
    from envlf.train.recipe import TrainConfig, train

    t0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif args.model == "tiny" and not args.parent:
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in str(args.budgets).split(",") if b.strip()]
    strategies = [s.strip() for s in str(args.strategies).split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}: choose from {STRATEGIES}")
    overrides = finetune_overrides(args.ft)
    timings: dict[str, float] = {}

    # data and parent
    data = args.data
    if not data:
        from envlf.world import generate_world

        data = str(out / "world")
        if not (Path(data) / "dataset.json").exists():
            generate_world(data, n=args.world_size, seed=args.world_seed, workers=1, progress=False)
    parent = args.parent
    if not parent:
        # the last epoch, not the best: "best" is chosen on the val split, which is the gallery
        parent = str(out / "parent" / "last")
        if not (Path(parent) / "model.safetensors").exists():
            t = time.perf_counter()
            sets = args.parent_set if args.parent_set is not None else (
                ["loss.mlm_weight=0"] if args.model == "tiny" else [])
            train(TrainConfig(data=data, out=str(out / "parent"), model=args.model, epochs=args.parent_epochs,
                              batch_size=args.parent_batch_size, lr=1e-3 if args.model == "tiny" else 3e-4,
                              warmup_steps=20, val_rerank_k=args.rerank_k, val_every=args.parent_epochs,
                              workers=args.workers, device=args.device, progress=False, seed=args.seed,
                              overrides=sets))
            timings["parent_train_s"] = time.perf_counter() - t
    device = resolve_device(args.device)
    model = load_pretrained(parent, device=device)
    if args.threads == 0 and model.config.name == "tiny":
        torch.set_num_threads(1)
    bank = load_bank(model, data, workers=args.workers, progress=False)
    ds = bank.dataset
    if args.untouched > 0:
        move_untouched(ds, args.gallery_split, args.untouched, args.seed)
        args.eval_split = UNTOUCHED
    row_of = {r.image_id: i for i, r in enumerate(ds.records)}
    annotator = Annotator(ds, args.relevance)

    # gallery, index, queries
    gallery = bank.split_indices(args.gallery_split)
    if not gallery:
        raise ValueError(f"no {args.gallery_split!r} split in {data}")
    t = time.perf_counter()
    index = GalleryIndex.build(model, ds.subset(gallery, suffix=args.gallery_split), out / "index", workers=0,
                               progress=False, trunk_features=bank.features[torch.tensor(gallery)])
    engine = SearchEngine(model, index)
    timings["index_s"] = time.perf_counter() - t
    texts: dict[str, str] = {}
    for i in gallery:
        for c in ds.records[i].captions:
            texts.setdefault(M.normalize_caption(c), " ".join(c.split()))
    queries = list(texts.values())
    qid_of = {q: query_id("t2i", query_key("t2i", q)) for q in queries}
    held_q = split_holdout(list(qid_of.values()), args.holdout, args.seed)
    held = [q for q in queries if qid_of[q] in held_q]
    label_side = [q for q in queries if qid_of[q] not in held_q]
    label_side = [label_side[int(i)] for i in np.random.default_rng(args.seed).permutation(len(label_side))]
    print(f"gallery: {len(gallery)} {args.gallery_split} images; queries: {len(queries)} distinct captions, "
          f"{len(label_side)} label-side, {len(held)} held out; relevance: {args.relevance}")

    # search once with the parent
    t = time.perf_counter()
    k = min(args.rerank_k, len(gallery))
    results = [engine.text_to_image(q, k=k, rerank_k=k) for q in label_side]
    held_results = [engine.text_to_image(q, k=k, rerank_k=k) for q in held]
    timings["search_s"] = time.perf_counter() - t
    # held-out judgements: every re-ranked candidate (the ITC top k, a set ITM did not choose,
    # so judged ITM metrics on it are fair to ITM) plus every relevant image beyond it
    held_rows = judgement_rows([(qn, h) for qn, r in enumerate(held_results) for h in r.items],
                               held_results, annotator, row_of, "sim-holdout")
    shown = {(r.query, h.image_id) for r in held_results for h in r.items}
    for r in held_results:  # every relevant gallery image too, so each held-out query has a positive
        for i in gallery:
            iid = ds.records[i].image_id
            if (r.query, iid) not in shown and annotator.relevant(r.query, i):
                hit = next((h for h in r.items if h.image_id == iid), None)
                held_rows.append(FeedbackRow(annotator="sim-holdout", direction="t2i", query_text=r.query,
                                             item_id=iid, item_text=str(ds.records[i].path),
                                             rank=hit.rank if hit else k + 1, label="relevant",
                                             app_version="label_loop"))

    before = heldout_recall(model, bank.features, gallery, held, annotator, args.rerank_k)
    plan = ([("control", 0)] if args.control else []) + [(s, n) for s in strategies for n in budgets]
    if not plan:
        raise ValueError("nothing to run: no --strategies and --no-control")
    seeds = [args.seed + r for r in range(max(1, args.repeats))]
    runs, shared_before = [], None
    for seed, (strategy, n) in [(seed, job) for seed in seeds for job in plan]:
        t = time.perf_counter()
        picks = [] if strategy == "control" else select(strategy, results, n, args.depth, seed)
        rows = judgement_rows(picks, results, annotator, row_of, f"sim-{strategy}")
        run_dir = out / "runs" / (f"{strategy}-{n}" + (f"-s{seed}" if len(seeds) > 1 else ""))
        csv = run_dir / "feedback.csv"
        if csv.exists():
            csv.unlink()
        FeedbackStore(csv, fsync=False).append(rows + held_rows)
        fc = FinetuneConfig(checkpoint=parent, feedback=[str(csv)], data=data, out=str(run_dir),
                            holdout_queries=sorted(held_q), seed=seed, steps=args.steps, epochs=args.epochs,
                            judged_loss=args.judged_loss,
                            batch_size=args.batch_size, replay_ratio=args.replay_ratio,
                            negatives_per_query=args.negatives_per_query, lr=args.lr, lr_pretrained=args.lr_pretrained,
                            eval_split=args.eval_split, rerank_k=args.rerank_k, workers=args.workers,
                            device=args.device, progress=False, allow_replay_only=strategy == "control")
        fc = dataclasses.replace(fc, **overrides)
        rep = finetune(fc, model=model, bank=bank, before=shared_before)
        if shared_before is None:  # the parent's figures on the held-out set and eval split: once
            shared_before = {k: v for k, v in rep["before"].items() if k in ("holdout", "eval")}
        tuned = load_pretrained(rep["checkpoint"], device=device)
        after = heldout_recall(tuned, bank.features, gallery, held, annotator, args.rerank_k)
        rec = {"strategy": strategy, "budget": n, "seed": seed, "labelled": len(rows),
               "relevant": sum(r.label == "relevant" for r in rows),
               "queries": len({r.query_text for r in rows}), "steps": rep["steps"],
               "heldout_before": before, "heldout_after": after,
               "judged_before": rep["before"]["holdout"], "judged_after": rep["after"]["holdout"],
               "eval_before": rep["before"].get("eval", {}), "eval_after": rep["after"].get("eval", {}),
               "seconds": round(time.perf_counter() - t, 1)}
        runs.append(rec)
        print(f"{strategy}-{n} seed {seed}: {rec['labelled']} labels ({rec['relevant']} relevant, "
              f"{rec['queries']} queries), "
              f"held-out re-ranked R@1 {before['re-ranked R@1']:.1f} -> {after['re-ranked R@1']:.1f} "
              f"({rec['seconds']} s)", flush=True)
        timings["total_s"] = time.perf_counter() - t0
        summary = {"data": data, "parent": parent, "gallery_split": args.gallery_split,
                   "eval_split": args.eval_split, "relevance": args.relevance, "gallery_images": len(gallery),
                   "label_side_queries": len(label_side), "heldout_queries": len(held),
                   "heldout_qids": sorted(held_q), "runs": runs, "timings": timings, "args": vars(args),
                   "complete": len(runs) == len(plan) * len(seeds)}
        summary["table"] = format_summary(summary)
        # after every run, so a long experiment stopped early keeps what it measured
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(summary["table"])
    return summary


def run_deltas(r: dict, rerank_k: int) -> dict[str, float]:
    """A run's changes (after - before) on the figures the summary shows."""
    hb, ha = r["heldout_before"], r["heldout_after"]
    eb, ea = r["eval_before"], r["eval_after"]
    nan = float("nan")
    out = {k: ha[k] - hb[k] for k in ("re-ranked R@1", "re-ranked R@5", "re-ranked R@10", "ITC R@1", "ITC R@5",
                                       "ITC R@10")}
    out["re-ranked mean R"] = float(np.mean([out[f"re-ranked R@{k}"] for k in (1, 5, 10)]))
    out["ITC mean R"] = float(np.mean([out[f"ITC R@{k}"] for k in (1, 5, 10)]))
    out["ITM AUC"] = r["judged_after"].get("itm_auc", nan) - r["judged_before"].get("itm_auc", nan)
    out["eval ITC mR"] = ea.get("ITC mR", nan) - eb.get("ITC mR", nan)
    key = f"re-ranked top{rerank_k} mR"
    out["eval re-ranked mR"] = ea.get(key, nan) - eb.get(key, nan)
    return out


def _groups(runs: list[dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        out.setdefault((r["strategy"], r["budget"]), []).append(r)
    return out


def _fmt(values: list[float], width: int, digits: int = 2) -> str:
    m = float(np.mean(values))
    if len(values) < 2:
        return f"{m:+{width}.{digits}f}"
    return f"{m:+.{digits}f}±{float(np.std(values, ddof=1)):.{digits}f}".rjust(width)


def format_summary(summary: dict) -> str:
    """The table: the parent's absolute figures, then per (strategy, N) the change after
    fine-tuning, and the label effect (change minus the replay-only control's change, paired
    by seed). With repeats: mean ± sample standard deviation over seeds."""
    rk = summary["args"].get("rerank_k", 16)
    ev = summary["eval_split"]
    cols = ["re-ranked R@1", "re-ranked R@5", "re-ranked R@10", "ITC R@1", "ITC R@5", "ITM AUC", "eval ITC mR",
            "eval re-ranked mR"]
    heads = ["rr R@1", "rr R@5", "rr R@10", "ITC R@1", "ITC R@5", "ITM AUC", f"{ev} ITC mR", f"{ev} rr mR"]
    w = 13
    n_seeds = len({r.get("seed", 0) for r in summary["runs"]})
    lines = [f"held-out queries: {summary['heldout_queries']} (t2i over the gallery of {summary['gallery_images']} "
             f"{summary['gallery_split']} images, relevance: {summary['relevance']}); {ev}: evaluate() on the "
             f"{ev} split; rr = ITC top{rk} re-ranked by ITM; R@k in %; "
             + (f"mean±sd over {n_seeds} seeds" if n_seeds > 1 else "one seed")
             + (f"; fine-tune {' '.join(summary['args']['ft'])}" if summary["args"].get("ft") else ""),
             f"{'run':10} {'N':>5} {'rel':>4} {'steps':>5} |" + "".join(f"{h:>{w}}" for h in heads)]
    if summary["runs"]:
        b = summary["runs"][0]
        hb, jb, eb = b["heldout_before"], b["judged_before"], b["eval_before"]
        vals = [hb["re-ranked R@1"], hb["re-ranked R@5"], hb["re-ranked R@10"], hb["ITC R@1"], hb["ITC R@5"],
                jb.get("itm_auc", float("nan")), eb.get("ITC mR", float("nan")),
                eb.get(f"re-ranked top{rk} mR", float("nan"))]
        lines.append(f"{'parent':10} {'':>5} {'':>4} {'':>5} |" + "".join(f"{v:{w}.2f}" for v in vals)
                     + "   absolute; below: after - before")
    groups = _groups(summary["runs"])
    for (strategy, n), rs in groups.items():
        ds = [run_deltas(r, rk) for r in rs]
        lines.append(f"{strategy:10} {n:5d} {round(np.mean([r['relevant'] for r in rs])):4d} {rs[0]['steps']:5d} |"
                     + "".join(_fmt([d[c] for d in ds], w) for c in cols))
    control = {r.get("seed", 0): run_deltas(r, rk) for r in summary["runs"] if r["strategy"] == "control"}
    if control and len(groups) > 1:
        eff = ["re-ranked mean R", "ITC mean R", "ITM AUC", "eval re-ranked mR"]
        lines += ["", "label effect = change - the replay-only control's change (same seed, steps and replay; "
                      "mean R = mean of R@1, R@5, R@10):",
                  f"{'run':10} {'N':>5} |" + "".join(f"{h:>{w + 2}}" for h in
                                                   ["rr mean R", "ITC mean R", "ITM AUC", f"{ev} rr mR"])]
        for (strategy, n), rs in groups.items():
            if strategy == "control":
                continue
            ds = [(run_deltas(r, rk), control.get(r.get("seed", 0))) for r in rs]
            ds = [(d, c) for d, c in ds if c is not None]
            lines.append(f"{strategy:10} {n:5d} |" + "".join(_fmt([d[k] - c[k] for d, c in ds], w + 2) for k in eff))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # run() may have set it; callers in-process get theirs back
    return 0


if __name__ == "__main__":
    sys.exit(main())
