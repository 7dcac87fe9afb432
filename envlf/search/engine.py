"""Two-stage search: ITC nearest neighbours from the index, fusion re-ranking of the top k.

The one API the app and the CLI use:

    engine = SearchEngine(model, GalleryIndex.load("indexes/ucm", model))
    res = engine.text_to_image("storage tanks beside a harbour", k=10, rerank_k=16)
    res = engine.image_to_text(pil_image, k=10)          # or image_id="123" for a gallery tile
    res = engine.image_to_image(image_id="123", k=10)
    maps = engine.attention(image_id="123", text="storage tanks")

Each result list is ranked by the final score: the re-ranked candidates first, ordered by
the fusion encoder's ITM margin plus ``config.fusion.rerank_blend`` x the ITC logit (ties
broken by ITC), then the rest by ITC. Every item
carries both scores and both ranks, so a UI can show how re-ranking moved it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from envlf.data.datasets import load_image
from envlf.data.transforms import build_transform
from envlf.explain.gradcam import attention_map
from envlf.search.index import GalleryIndex
from envlf.search.rerank import rerank_order

MAX_QUERY_CHARS = 1000  # longer queries are refused (the text encoder reads 40 word pieces anyway)


class QueryError(ValueError):
    """A query that cannot be answered, with a message fit for the user."""


@dataclass
class ImageHit:
    rank: int  # final rank, 1-based
    row: int  # row in the index
    image_id: str
    path: str
    label: str
    captions: list[str]
    itc: float  # cosine similarity of the ITC embeddings
    itc_rank: int  # rank by ITC alone
    itm: float | None = None  # P(match) from the fusion encoder (None: not re-ranked)
    itm_margin: float | None = None  # its logit margin (what the ranking uses)
    geo: dict | None = None  # a GeoTIFF chip's place (envlf.data.geotiff: lon, lat, lonlat, scene, ...)


@dataclass
class CaptionHit:
    rank: int
    caption_id: int  # row in the caption corpus
    text: str
    count: int  # occurrences of this string in gallery + corpora
    n_images: int  # gallery images that carry it
    image_ids: list[str]
    itc: float
    itc_rank: int
    itm: float | None = None
    itm_margin: float | None = None


@dataclass
class SearchResult:
    direction: str  # "t2i" | "i2t" | "i2i"
    query: str  # query text, or "image:<id>" / "image:sha256:<hex>"
    items: list
    reranked: int  # how many candidates the fusion encoder scored
    model_fingerprint: str
    index_fingerprint: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    # (E,) float32 ITC embedding of the query, as searched (the app places it on the embedding
    # map without encoding the query a second time)
    query_embedding: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dicts(self) -> list[dict]:
        return [asdict(i) for i in self.items]


def image_sha256(image: Image.Image) -> str:
    """A stable id for an uploaded image: SHA-256 of its RGB pixels and size."""
    h = hashlib.sha256(f"{image.size}".encode())
    h.update(np.asarray(image.convert("RGB")).tobytes())
    return h.hexdigest()


def clean_query(text: str | None, max_chars: int = MAX_QUERY_CHARS) -> str:
    """Strip and check a text query; raises QueryError with a readable message."""
    if text is None or not str(text).strip():
        raise QueryError("Type a description to search for (the query is empty).")
    text = " ".join(str(text).split())  # collapses newlines, tabs, control whitespace
    text = "".join(ch for ch in text if ch.isprintable())
    if not text:
        raise QueryError("The query has no printable characters.")
    if len(text) > max_chars:
        raise QueryError(f"The query is {len(text):,} characters long; the limit is {max_chars:,}.")
    return text


class SearchEngine:
    def __init__(self, model, index: GalleryIndex, check: bool = True, image_encoder=None):
        """image_encoder: what encodes query images (uploads) and recomputed tiles instead of the
        model's own image side, e.g. its ONNX Runtime export (envlf.model.onnx)."""
        if check:
            index.check_model(model)
        self.model = model.eval()
        self.image_encoder = image_encoder.eval() if image_encoder is not None else None
        self.index = index
        self.model_fingerprint = index.model_fingerprint
        self._tf = None

    # -- shared pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def _tokens(self, rows: Sequence[int]) -> torch.Tensor:
        """(k, 1+P, D) image tokens of index rows: stored, or recomputed from the files."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.index.tokens is not None:
            return torch.from_numpy(np.array(self.index.tokens[rows], dtype=np.float32)).to(self.device)

        pixels = torch.stack([self._transform(load_image(self.index.metadata.iloc[int(r)]["path"])) for r in rows])
        if self.image_encoder is not None:
            return self.image_encoder.encode_image(pixels, return_tokens=True)[1].to(self.device)
        return self.model.image_tokens(pixels.to(self.device))

    def _transform(self, image):
        if self._tf is None:
            self._tf = build_transform(self.model.config.vision)
        return self._tf(image)

    def _result(self, direction, query, items, reranked, timings, emb=None) -> SearchResult:
        return SearchResult(direction, query, items, reranked, self.model_fingerprint, self.index.fingerprint,
                            {k: round(v * 1e3, 3) for k, v in timings.items()},
                            None if emb is None else emb.float().cpu().numpy()[0])

    def _order(self, itc: np.ndarray, margins: np.ndarray | None, n_rerank: int) -> np.ndarray:
        return rerank_order(self.model, itc, margins, n_rerank)

    # -- text -> image ------------------------------------------------------------------------
    @torch.no_grad()
    def text_to_image(self, text: str, k: int = 10, rerank_k: int = 16, rerank: bool = True,
                      bbox: Sequence[float] | None = None) -> SearchResult:
        """The top k images for `text`; bbox (west, south, east, north in WGS84 degrees): only
        georeferenced chips whose centre lies inside (exact ITC search over those rows)."""
        text = clean_query(text)
        k = max(1, int(k))
        n_rr = max(0, int(rerank_k)) if rerank else 0
        rows = self.index.rows_in_bbox(bbox) if bbox is not None else None
        t = {}
        t0 = time.perf_counter()
        emb, hidden, batch = self.model.encode_text([text], return_hidden=True)
        t["encode_query"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = emb.float().cpu().numpy()
        if rows is None:
            scores, ids = self.index.ann.search(q, max(k, n_rr))
            scores, ids = scores[0], ids[0]
        else:  # the rows inside the box, scored exactly
            sims = np.asarray(self.index.embeddings[rows], dtype=np.float32) @ q[0]
            top = np.argsort(-sims, kind="stable")[:max(k, n_rr)]
            scores, ids = sims[top], rows[top]
        ok = (ids >= 0) & (ids < len(self.index))  # rows past the manifest: an add that did not commit
        scores, ids = scores[ok], ids[ok]
        t["ann"] = time.perf_counter() - t0
        n_rr = min(n_rr, len(ids))
        margins = probs = None
        t0 = time.perf_counter()
        if n_rr:
            tokens = self._tokens(ids[:n_rr])
            m = self.model.itm_score(tokens, (hidden, batch.attention_mask), as_probability=False)
            margins = m.float().cpu().numpy()
            probs = 1.0 / (1.0 + np.exp(-margins))
        t["rerank"] = time.perf_counter() - t0
        order = self._order(scores, margins, n_rr)[:k]
        items = []
        for rank, j in enumerate(order, 1):
            rec = self.index.record(int(ids[j]))
            items.append(ImageHit(rank, rec["row"], rec["image_id"], rec["path"], rec["label"], rec["captions"],
                                  float(scores[j]), int(j) + 1,
                                  float(probs[j]) if probs is not None and j < n_rr else None,
                                  float(margins[j]) if margins is not None and j < n_rr else None, rec["geo"]))
        t["total"] = sum(t.values())
        return self._result("t2i", text, items, n_rr, t, emb)

    # -- image -> text ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_query_image(self, image: Image.Image | None = None, image_id: str | None = None):
        """(embedding (1, E), tokens (1, 1+P, D), query label) of an upload or a gallery tile."""
        if image_id is not None:
            row = self.index.row_of(image_id)
            emb = torch.from_numpy(np.array(self.index.embeddings[row:row + 1], dtype=np.float32)).to(self.device)
            return emb, self._tokens([row]), f"image:{image_id}"
        if image is None:
            raise QueryError("Upload an image or pick one from the gallery.")
        pixels = self._transform(image.convert("RGB"))[None].to(self.device)
        emb, tokens = (self.image_encoder or self.model).encode_image(pixels, return_tokens=True)
        return emb.to(self.device), tokens.to(self.device), f"image:sha256:{image_sha256(image)}"

    @torch.no_grad()
    def image_to_text(self, image: Image.Image | None = None, image_id: str | None = None, k: int = 10,
                      rerank_k: int = 16, rerank: bool = True) -> SearchResult:
        k = max(1, int(k))
        n_rr = max(0, int(rerank_k)) if rerank else 0
        t = {}
        t0 = time.perf_counter()
        emb, tokens, label = self.encode_query_image(image, image_id)
        t["encode_query"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, ids = self.index.caption_ann.search(emb.float().cpu().numpy(), max(k, n_rr))
        ok = (ids[0] >= 0) & (ids[0] < len(self.index.corpus.strings))
        scores, ids = scores[0][ok], ids[0][ok]
        t["ann"] = time.perf_counter() - t0
        n_rr = min(n_rr, len(ids))
        margins = probs = None
        t0 = time.perf_counter()
        if n_rr:
            strings = [self.index.corpus.strings[int(i)] for i in ids[:n_rr]]
            m = self.model.itm_score(tokens, strings, as_probability=False)
            margins = m.float().cpu().numpy()
            probs = 1.0 / (1.0 + np.exp(-margins))
        t["rerank"] = time.perf_counter() - t0
        order = self._order(scores, margins, n_rr)[:k]
        c = self.index.corpus
        items = []
        for rank, j in enumerate(order, 1):
            u = int(ids[j])
            items.append(CaptionHit(rank, u, c.strings[u], int(c.counts[u]), int(c.n_images[u]), list(c.image_ids[u]),
                                    float(scores[j]), int(j) + 1,
                                    float(probs[j]) if probs is not None and j < n_rr else None,
                                    float(margins[j]) if margins is not None and j < n_rr else None))
        t["total"] = sum(t.values())
        return self._result("i2t", label, items, n_rr, t, emb)

    # -- image -> image (ITC only) ----------------------------------------------------------
    @torch.no_grad()
    def image_to_image(self, image: Image.Image | None = None, image_id: str | None = None, k: int = 10) -> SearchResult:
        t = {}
        t0 = time.perf_counter()
        emb, _, label = self.encode_query_image(image, image_id)
        t["encode_query"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, ids = self.index.ann.search(emb.float().cpu().numpy(), int(k) + (1 if image_id else 0))
        t["ann"] = time.perf_counter() - t0
        items = []
        for j, (s, i) in enumerate(zip(scores[0], ids[0])):
            if i < 0 or i >= len(self.index):
                continue
            rec = self.index.record(int(i))
            if image_id is not None and rec["image_id"] == image_id:
                continue  # the query itself
            items.append(ImageHit(len(items) + 1, rec["row"], rec["image_id"], rec["path"], rec["label"],
                                  rec["captions"], float(s), len(items) + 1, geo=rec["geo"]))
        t["total"] = sum(t.values())
        return self._result("i2i", label, items[:k], 0, t, emb)

    # -- explanation ------------------------------------------------------------------------
    def attention(self, text: str, image: Image.Image | None = None, image_id: str | None = None):
        """Grad-CAM maps (envlf.explain.gradcam.AttentionMaps) of `text` on a gallery tile or an upload."""

        text = clean_query(text)
        if image_id is not None:
            image = load_image(self.index.metadata.iloc[self.index.row_of(image_id)]["path"])
        if image is None:
            raise QueryError("No image to explain.")
        return attention_map(self.model, image, text)

    def gallery_image(self, image_id: str) -> Image.Image:
        return load_image(self.index.metadata.iloc[self.index.row_of(image_id)]["path"])
