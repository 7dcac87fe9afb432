"""Evaluate retrieval with the standard protocol, both stages: ITC alone, then ITC + fusion re-ranking.

    envlf evaluate --checkpoint runs/ucm-lite4/best --data ../shared/datasets/ucm-captions \
        --split val --rerank-k 16 --k-sweep 1,4,8,16,32 --json runs/ucm-lite4/eval-val.json

Stage 1 scores every (image, caption) pair by the cosine of their ITC embeddings. Stage 2
re-scores each query's top k candidates with the fusion encoder's ITM logit margin (plus
``blend`` x the ITC logit, the model's ``fusion.rerank_blend`` by default, as in search) and
places them, re-ordered, above the rest, which
keep their ITC order. Identical caption strings are encoded and re-ranked once, so they get
identical scores everywhere, as the tie rules assume. Recalls are reported as the expectation
under random tie-breaking and, beside it, the pessimistic figure (ties ranked against the
query). Reference rows come from the data alone: the type oracle and the caption-string
ceiling (envlf.evaluation.metrics).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from envlf.data.datasets import (
    CaptionDataset,
    ImageCaptionDataset,
    collate,
)
from envlf.data.transforms import build_transform
from envlf.evaluation import metrics as M
from envlf.search.rerank import rerank_score

log = logging.getLogger(__name__)

RERANK_OFFSET = 1.0e4  # lifts re-ranked candidates above every ITC-only score

# A reference row's scorer: (records, captions, txt2img) -> (n_images, n_captions) scores, or
# None when it does not apply to this data (e.g. the demo world's content oracle on UCM).
Oracle = Callable[[Sequence, Sequence[str], np.ndarray], "np.ndarray | None"]


@dataclass
class Encoded:
    """A dataset encoded once: everything both stages need."""

    image_emb: torch.Tensor  # (N, E) float32, L2-normalised
    image_tokens: torch.Tensor  # (N, 1+P, Dv) for the fusion encoder (float16 to save memory)
    text_emb: torch.Tensor  # (U, E) one row per distinct caption string
    text_hidden: torch.Tensor  # (U, T, D) text states of each distinct string (float16)
    text_mask: torch.Tensor  # (U, T)
    caption_to_string: np.ndarray  # (M,) caption -> row in the text arrays
    strings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _loader(dataset: CaptionDataset, transform, batch_size: int, workers: int):
    ds = ImageCaptionDataset(dataset, transform, mode="images")
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                       persistent_workers=False)


@torch.no_grad()
def encode_images(model, dataset: CaptionDataset, batch_size: int = 32, workers: int = 0,
                  features: torch.Tensor | None = None, progress: bool = True, image_encoder=None):
    """All images -> (emb (N, E), tokens (N, 1+P, Dv) float16). `features`: cached trunk
    outputs for exactly these records (frozen-trunk runs), skipping the trunk. image_encoder:
    encodes the pixels instead of the model (envlf.model.onnx.OnnxImageEncoder)."""
    model.eval()
    embs, toks = [], []
    if features is not None:
        for s in tqdm(range(0, len(features), batch_size), desc="encode images", disable=not progress, leave=False):
            e, t = model.encode_image(features=features[s:s + batch_size].float(), return_tokens=True)
            embs.append(e.float().cpu())
            toks.append(t.half().cpu())
    else:
        tf = build_transform(model.config.vision)
        for batch in tqdm(_loader(dataset, tf, batch_size, workers), desc="encode images", disable=not progress,
                          leave=False):
            if batch is None:
                continue
            if batch["dropped"]:
                raise ValueError("unreadable images in the evaluation set: run check_images first")
            e, t = (image_encoder or model).encode_image(batch["image"], return_tokens=True)
            embs.append(e.float().cpu())
            toks.append(t.half().cpu())
    return torch.cat(embs), torch.cat(toks)


@torch.no_grad()
def encode_strings(model, strings: Sequence[str], batch_size: int = 128, progress: bool = True):
    """Distinct caption strings -> (emb (U, E), hidden (U, T, D) float16, mask (U, T))."""
    model.eval()
    embs, hiddens, masks = [], [], []
    T = 0
    for s in tqdm(range(0, len(strings), batch_size), desc="encode captions", disable=not progress, leave=False):
        e, h, b = model.encode_text(list(strings[s:s + batch_size]), return_hidden=True)
        embs.append(e.float().cpu())
        hiddens.append(h.half().cpu())
        masks.append(b.attention_mask.cpu())
        T = max(T, h.shape[1])
    pad = lambda x, v: torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]), value=v)  # noqa: E731
    return (torch.cat(embs), torch.cat([pad(h, 0.0) for h in hiddens]), torch.cat([pad(m, 0) for m in masks]))


def distinct_strings(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Captions -> (distinct strings in first-seen order, caption -> string index). Strings
    are told apart by `metrics.normalize_caption`, the same rule the ceiling uses."""
    index: dict[str, int] = {}
    strings: list[str] = []
    out = np.empty(len(captions), dtype=np.int64)
    for c, text in enumerate(captions):
        key = M.normalize_caption(text)
        if key not in index:
            index[key] = len(strings)
            strings.append(text)
        out[c] = index[key]
    return strings, out


def encode_dataset(model, dataset: CaptionDataset, batch_size: int = 32, workers: int = 0,
                   features: torch.Tensor | None = None, progress: bool = True, image_encoder=None) -> Encoded:
    t0 = time.perf_counter()
    img_emb, img_tok = encode_images(model, dataset, batch_size, workers, features, progress, image_encoder)
    t1 = time.perf_counter()
    strings, cap2str = distinct_strings(dataset.captions())
    txt_emb, hidden, mask = encode_strings(model, strings, progress=progress)
    t2 = time.perf_counter()
    return Encoded(img_emb, img_tok, txt_emb, hidden, mask, cap2str, strings,
                   {"encode_images_s": t1 - t0, "encode_captions_s": t2 - t1,
                    "images": len(dataset), "distinct_captions": len(strings)})


@torch.no_grad()
def itm_topk(model, enc: Encoded, k: int, batch_size: int = 64, progress: bool = True):
    """Fusion scores of each query's top-k ITC candidates, both directions.

    Returns (string x image candidates (U, k), their ITM margins (U, k), image x string
    candidates (N, k), margins (N, k)); candidates sorted by ITC, best first."""
    model.eval()
    dev = model.device
    sims = enc.text_emb @ enc.image_emb.t()  # (U, N)
    k_t2i, k_i2t = min(k, sims.shape[1]), min(k, sims.shape[0])
    t2i_idx = sims.topk(k_t2i, dim=1).indices  # (U, k)
    i2t_idx = sims.t().topk(k_i2t, dim=1).indices  # (N, k)
    t2i_s = torch.empty(t2i_idx.shape)
    for u in tqdm(range(len(t2i_idx)), desc=f"re-rank t2i top{k_t2i}", disable=not progress, leave=False):
        t2i_s[u] = model.itm_score(enc.image_tokens[t2i_idx[u]].to(dev).float(),
                                   (enc.text_hidden[u:u + 1].to(dev).float(), enc.text_mask[u:u + 1].to(dev)),
                                   as_probability=False, batch_size=batch_size).float().cpu()
    i2t_s = torch.empty(i2t_idx.shape)
    for n in tqdm(range(len(i2t_idx)), desc=f"re-rank i2t top{k_i2t}", disable=not progress, leave=False):
        idx = i2t_idx[n]
        i2t_s[n] = model.itm_score(enc.image_tokens[n:n + 1].to(dev).float(),
                                   (enc.text_hidden[idx].to(dev).float(), enc.text_mask[idx].to(dev)),
                                   as_probability=False, batch_size=batch_size).float().cpu()
    return t2i_idx, t2i_s, i2t_idx, i2t_s


def reranked_matrices(model, enc: Encoded, itm: tuple, k: int, blend: float | None = None):
    """(images x captions) score matrices after re-ranking the top k of each query, one per
    direction: i2t rows re-ranked per image, t2i columns re-ranked per caption string. The
    re-ranked candidates score RERANK_OFFSET + envlf.search.rerank.rerank_score, the order
    search shows."""
    t2i_idx, t2i_s, i2t_idx, i2t_s = itm
    sims = (enc.image_emb @ enc.text_emb.t()).numpy().astype(np.float64)  # (N, U)
    i2t = sims.copy()
    t2i = sims.copy()
    kk = min(k, i2t_idx.shape[1])
    for n in range(i2t.shape[0]):
        cols = i2t_idx[n, :kk].numpy()
        i2t[n, cols] = RERANK_OFFSET + rerank_score(model, i2t_s[n, :kk].numpy().astype(np.float64), sims[n, cols], blend)
    kk = min(k, t2i_idx.shape[1])
    for u in range(t2i.shape[1]):
        rows = t2i_idx[u, :kk].numpy()
        t2i[rows, u] = RERANK_OFFSET + rerank_score(model, t2i_s[u, :kk].numpy().astype(np.float64), sims[rows, u], blend)
    cap = enc.caption_to_string
    return i2t[:, cap], t2i[:, cap]  # (N, M) each


def recalls(i2t_scores: np.ndarray, t2i_scores: np.ndarray, txt2img, ties: str) -> dict[str, float]:
    """Standard-protocol recalls when each direction has its own score matrix (N, M)."""
    a = M.recall_at_k(i2t_scores, txt2img, ties=ties)
    b = M.recall_at_k(t2i_scores, txt2img, ties=ties)
    out = {k: v for k, v in a.items() if k.startswith("i2t")}
    out.update({k: v for k, v in b.items() if k.startswith("t2i")})
    r = [v for k, v in out.items() if "_R@" in k]
    out["rsum"] = float(sum(r))
    out["mR"] = float(np.mean(r))
    return out


def evaluate(model, dataset: CaptionDataset, rerank_k: int = 16, k_sweep: Sequence[int] = (), blend: float | None = None,
             batch_size: int = 32, workers: int = 0, features: torch.Tensor | None = None,
             references: bool = True, oracles: Mapping[str, Oracle] | None = None,
             progress: bool = True, scores: dict | None = None, image_encoder=None) -> dict:
    """Both stages on one split. Returns a JSON-able report. blend: ITC weight in the
    re-ranked score (default: the model's config.fusion.rerank_blend, as search uses).
    oracles: further reference rows, name -> a scorer of the split (see ``Oracle``); the
    caller that knows the data's origin supplies them (the CLI adds the demo world's).
    scores: a dict to receive the final (N, M) score matrices the report's headline comes from,
    "i2t" and "t2i" (re-ranked at rerank_k, else both ITC), e.g. for envlf.evaluation.report.
    image_encoder: encodes the images instead of the model (see encode_images)."""
    blend = model.config.fusion.rerank_blend if blend is None else float(blend)
    enc = encode_dataset(model, dataset, batch_size, workers, features, progress, image_encoder)
    txt2img = dataset.txt2img()
    t0 = time.perf_counter()
    sims = (enc.image_emb @ enc.text_emb.t()).numpy()[:, enc.caption_to_string]  # (N, M)
    timings = dict(enc.timings)
    rows: dict[str, dict] = {}
    for ties in ("expected", "pessimistic"):
        rows[f"ITC ({ties})"] = M.recall_at_k(sims, txt2img, ties=ties)
    timings["itc_scoring_s"] = time.perf_counter() - t0
    sweep: dict[int, dict] = {}
    ks = sorted({int(k) for k in (*k_sweep, rerank_k) if int(k) > 0})
    if ks:
        t0 = time.perf_counter()
        itm = itm_topk(model, enc, max(ks), progress=progress)
        timings["rerank_s"] = time.perf_counter() - t0
        n_queries = itm[0].shape[0] + itm[2].shape[0]
        timings["rerank_ms_per_query"] = 1e3 * timings["rerank_s"] / max(1, n_queries)
        timings["rerank_pairs"] = int(itm[0].numel() + itm[2].numel())
        for k in ks:
            i2t, t2i = reranked_matrices(model, enc, itm, k, blend)
            sweep[k] = {ties: recalls(i2t, t2i, txt2img, ties) for ties in ("expected", "pessimistic")}
            if scores is not None and k == rerank_k:
                scores["i2t"], scores["t2i"] = i2t, t2i
        if rerank_k > 0:
            for ties in ("expected", "pessimistic"):
                rows[f"ITC + ITM top{rerank_k} ({ties})"] = sweep[rerank_k][ties]
    if scores is not None and "t2i" not in scores:
        scores["i2t"] = scores["t2i"] = sims
    if references:
        labels = dataset.labels()
        refs = M.reference_rows(dataset.captions(), txt2img, len(dataset), labels=labels)
        rows.update({f"[ref] {k}": v for k, v in refs.items()})
        for name, oracle in (oracles or {}).items():
            ref = oracle(dataset.records, dataset.captions(), txt2img)
            if ref is not None:
                rows[f"[ref] {name}"] = M.recall_at_k(ref, txt2img)
    return {
        "dataset": dataset.name, "images": len(dataset), "captions": int(len(txt2img)),
        "distinct_captions": len(enc.strings), "rerank_k": rerank_k, "blend": blend,
        "model_fingerprint": model.fingerprint(), "rows": rows,
        "k_sweep": {str(k): v for k, v in sweep.items()}, "timings": timings,
    }


def format_report(report: dict) -> str:
    lines = [f"{report['dataset']}: {report['images']} images, {report['captions']} captions "
             f"({report['distinct_captions']} distinct)", "", M.format_table(report["rows"])]
    if report.get("k_sweep"):
        lines += ["", "re-ranking depth k (expected under random ties):",
                  M.format_table({f"k={k}": v["expected"] for k, v in report["k_sweep"].items()})]
    t = report["timings"]
    lines += ["", "timings: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in t.items())]
    return "\n".join(lines)


