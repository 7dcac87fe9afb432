"""Pictures of what the model did: attention overlays and a 2-D map of the gallery embeddings.

The app (``demo/``) draws with these and never touches tensors itself:

    from envlf.explain.viz import attention_overlay, EmbeddingMap, query_embedding
    maps = engine.attention("two white planes", image_id="123")      # envlf.explain.gradcam.AttentionMaps
    tile = engine.gallery_image("123")
    heat = attention_overlay(tile, maps, which="planes")              # PIL, same size as the tile
    emap = EmbeddingMap.fit(index.embeddings, index.metadata["label"], index.metadata["image_id"])
    xy = emap.project(query_embedding(engine, text="two white planes"))  # (1, 2)

Colour map: "turbo" (Google's rainbow made perceptually smoother), from the polynomial fit
published with it (Mikhailov 2019, Apache-2.0), so no plotting library is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from envlf.search.engine import clean_query

MAX_MAP_POINTS = 20_000  # above this the embedding map shows a random subsample

# Polynomial approximation of the turbo colour map (Anton Mikhailov, Google, 2019, Apache-2.0):
# channel = c0 + c1 x + ... + c5 x^5 for x in [0, 1].
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],  # red
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],  # green
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],  # blue
], dtype=np.float64)


def colormap(values: np.ndarray, name: str = "turbo") -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)). name: "turbo" or "grey"."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    if name == "grey":
        rgb = np.repeat(x[..., None], 3, axis=-1)
    elif name == "turbo":
        powers = np.stack([x ** i for i in range(6)], axis=-1)  # (..., 6)
        rgb = powers @ _TURBO.T  # (..., 3)
    else:
        raise ValueError(f"unknown colour map {name!r} (turbo, grey)")
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _heat_to_size(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float in [0, 1] for size = (W, H), bilinear, scaled by its max."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    if heat.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {heat.shape}")
    heat = np.clip(heat, 0.0, None)
    w, h = size
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32)).resize((w, h), Image.BILINEAR))
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6, cmap: str = "turbo",
            gamma: float = 0.8) -> Image.Image:
    """Blend a heat map over an image; returns an RGB image of the image's size.

    heat: (h, w) non-negative map on any grid (resized bilinearly to the image, scaled to
    [0, 1] by its maximum). Each pixel is mixed with its colour in proportion to
    alpha * heat**gamma, so where the model did not look the tile stays as it was.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h01 = _heat_to_size(heat, image.size)  # (H, W)
    colour = colormap(h01, cmap).astype(np.float32)
    weight = (alpha * h01 ** gamma)[..., None]
    out = base * (1.0 - weight) + colour * weight
    return Image.fromarray(np.round(out).astype(np.uint8))


SENTENCE = "sentence"


def attention_overlay(image: Image.Image, maps, which: str | int = SENTENCE, alpha: float = 0.6,
                      cmap: str = "turbo") -> Image.Image:
    """Overlay of one Grad-CAM map (`envlf.explain.gradcam.AttentionMaps`) on `image`, at its size.

    which: "sentence", a word index, or a word (its first occurrence)."""
    if which != SENTENCE and isinstance(which, str) and which not in maps.words:
        raise KeyError(f"{which!r} is not a word of the caption ({' '.join(maps.words)})")
    if isinstance(which, int) and not 0 <= which < len(maps.words):
        raise KeyError(f"word index {which} is outside 0..{len(maps.words) - 1}")
    return overlay(image, maps.resized(which, image.size), alpha=alpha, cmap=cmap)


def map_peak(maps, which: str | int = SENTENCE) -> float:
    """Largest value of one map before scaling: 0 means the map is empty (no patch would raise
    the match, see envlf.explain.gradcam), so its overlay shows the bare image."""
    m = maps.sentence_map if which == SENTENCE else maps.word_maps[
        which if isinstance(which, int) else maps.words.index(which)]
    return float(np.max(m)) if m.size else 0.0


# Words whose map says nothing of their own: articles, prepositions, auxiliaries, conjunctions
# (a caption's content is its nouns, counts, colours, sizes and places). Their maps stay
# reachable by index through the API; the picker leaves them out.
STOPWORDS = frozenset("""
a an the this that these those there here it its is are was were be been being am has have
had do does did of in on at to from by with without for into onto over under near beside
besides next and or but as while which who whom whose what where when than then so such
some any each every very also too not no nor can could may might will would shall should
""".split())


def is_content_word(word: str) -> bool:
    """A word worth its own attention map: has a letter or digit and is not a stopword."""
    w = word.strip().lower().strip(".,;:!?'\"()[]{}-")
    return bool(w) and any(ch.isalnum() for ch in w) and w not in STOPWORDS


def word_choices(maps) -> list[tuple[str, str]]:
    """(label, value) pairs to pick a map: the whole sentence, then each word that carries
    meaning (no stopwords or punctuation) as "3: tanks". Values are "sentence" or the word's
    index in maps.words as text, so repeated words stay distinct."""
    return [("whole sentence", SENTENCE)] + [(f"{i + 1}: {w}", str(i)) for i, w in enumerate(maps.words)
                                             if is_content_word(w)]


def parse_choice(value: str | int | None) -> str | int:
    """Inverse of `word_choices`' values: "sentence" or an int word index."""
    if value is None or value == "" or value == SENTENCE:
        return SENTENCE
    try:
        return int(value)
    except (TypeError, ValueError):
        raise KeyError(f"unknown attention map {value!r}") from None


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """The two images next to each other on white, the right one resized to the left's height."""
    if right.height != left.height:
        right = right.resize((max(1, round(right.width * left.height / right.height)), left.height))
    out = Image.new("RGB", (left.width + gap + right.width, left.height), "white")
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right.convert("RGB"), (left.width + gap, 0))
    return out


# -- embedding map ----------------------------------------------------------------------------

@dataclass
class EmbeddingMap:
    """2-D PCA of a gallery's ITC embeddings, for a scatter plot with the query placed in it.

    The principal axes come from an SVD of the centred (sub)sample; `project` puts any vector
    of the same space (a query's embedding) on the same axes."""

    mean: np.ndarray  # (E,)
    components: np.ndarray  # (2, E) principal axes
    explained: np.ndarray  # (2,) share of variance along each axis
    xy: np.ndarray  # (n, 2) projected sample
    rows: np.ndarray  # (n,) index rows of the sample
    labels: list[str]  # (n,) class label per sampled point ("" unknown)
    ids: list[str]  # (n,) image ids
    total: int  # gallery size before subsampling

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
            max_points: int = MAX_MAP_POINTS, seed: int = 0) -> "EmbeddingMap":
        n = int(embeddings.shape[0])
        rows = np.arange(n)
        if n > max_points:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        x = np.asarray(embeddings[rows], dtype=np.float64)  # (n, E), copied out of a memmap
        mean = x.mean(axis=0) if len(x) else np.zeros(embeddings.shape[1])
        xc = x - mean
        comps = np.zeros((2, embeddings.shape[1]))
        explained = np.zeros(2)
        if len(x) >= 2:
            _, s, vt = np.linalg.svd(xc, full_matrices=False)  # rows of vt: axes by variance
            k = min(2, vt.shape[0])
            comps[:k] = vt[:k]
            # fix each axis' sign (SVD leaves it arbitrary) so the map is the same every run
            for i in range(k):
                j = int(np.argmax(np.abs(comps[i])))
                if comps[i, j] < 0:
                    comps[i] = -comps[i]
            var = s ** 2
            explained[:k] = var[:k] / var.sum() if var.sum() > 0 else 0.0
        labels = ["" if v is None else str(v) for v in labels] if labels is not None else [""] * n
        ids = [str(v) for v in ids] if ids is not None else [str(i) for i in range(n)]
        return cls(mean=mean, components=comps, explained=explained, xy=(xc @ comps.T).astype(np.float32),
                   rows=rows, labels=[labels[i] for i in rows], ids=[ids[i] for i in rows], total=n)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(M, E) or (E,) -> (M, 2) coordinates on the map."""
        v = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        return ((v - self.mean) @ self.components.T).astype(np.float32)


def query_embedding(engine, text: str | None = None, image: Image.Image | None = None,
                    image_id: str | None = None) -> np.ndarray:
    """(E,) ITC embedding of a text query, an uploaded image or a gallery tile, as the engine
    (envlf.search.engine.SearchEngine) computes it for search."""
    with torch.no_grad():
        if text is not None:
            emb = engine.model.encode_text([clean_query(text)])
        else:
            emb, _, _ = engine.encode_query_image(image=image, image_id=image_id)
    return emb.float().cpu().numpy()[0]
