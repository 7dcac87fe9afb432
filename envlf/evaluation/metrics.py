"""Ranking metrics for cross-modal retrieval (pure numpy), with honest handling of ties.

The standard protocol of the remote-sensing retrieval literature:

- image→text R@K: share of images with at least one of their own captions in the top K;
- text→image R@K: share of captions whose own image is in the top K;
- mR: mean of the six recalls (R@1, R@5, R@10 both ways); everything in percent.

Everything here takes a score matrix ``sims`` of shape (n_images, n_captions), higher =
better, and ``txt2img`` (caption j → index of its image). Any score matrix works, so a
re-ranked evaluation (only each query's top-k re-scored by the fusion encoder) is measured by
passing the matrix whose top-k entries were replaced.

Ties never help the query
-------------------------
Remote-sensing captions repeat a lot, and a model that scores a caption *string* gives every
copy the same score, so ties are common. ``ties=`` chooses what a tie is worth:

- ``"expected"`` (default): the expectation under a uniformly random tie-breaking;
- ``"pessimistic"``: every tied competitor is ranked ahead of the query's relevant items;
- ``"optimistic"``: the opposite, for reference only (never report it as a result).

Per query, three integers decide everything. Let s* be the best score among the query's
relevant items (its own image, or its own captions), then

    a = number of candidates scoring strictly above s*  (all irrelevant, by definition of s*)
    t = number of candidates scoring exactly s*          (the tied group, relevant ones included)
    r = number of relevant candidates scoring exactly s* (1 <= r <= t)

Relevant items scoring below s* never matter: the first relevant item in the ranking always
comes from the tied group. Random tie-breaking puts the tied group at ranks a+1 .. a+t in a
uniformly random order, so the top K contains n = K - a positions of the group, and those n
positions hold a uniformly random n-subset of the group. The query misses iff none of the r
relevant items is in that subset (hypergeometric with zero successes):

    n <= 0:      P(hit) = 0
    n >= t:      P(hit) = 1
    otherwise:   P(hit) = 1 - C(t - r, n) / C(t, n) = 1 - prod_{j=0}^{n-1} (t - r - j) / (t - j)

(the product is 0 once t - r - j reaches 0, i.e. when n > t - r there are not enough
irrelevant tied items to fill the n slots). For text→image r = 1 and this is exactly
min(1, max(0, (K - a) / t)). Pessimistic: the first relevant item sits at rank a + (t - r) + 1;
optimistic: at rank a + 1. The product has at most K factors, so the whole computation is a
couple of comparisons over the matrix plus O(K) vectorised work per query.

Reference rows computed from the data itself
--------------------------------------------
- ``type_oracle_scores``: 1 where a caption's image has the image's scene class, else 0.
  Its expected recalls are what "get the scene class right and nothing else" is worth.
- ``ceiling_scores``: 1 where the caption's *string* (see ``normalize_caption``) is one of
  the image's own caption strings. The natural achievable "caption-string oracle".
- ``ceiling_bound``: the exact best recalls, direction by direction, of ANY model that gives
  identical caption strings identical scores (see its docstring for the derivation). It is
  higher than ``ceiling_scores`` because that construction ties images' own strings together.

``reference_rows`` computes all three ("type oracle", "string oracle", "string ceiling").
On UCM-Captions val (210 images, 1,050 captions, 391 distinct strings), mR with expected
(pessimistic) ties: type oracle 46.62 (15.63), ``ceiling_scores`` 73.05 (41.97),
``ceiling_bound`` 78.06 (72.27).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

TIES = ("expected", "pessimistic", "optimistic")
DEFAULT_KS = (1, 5, 10)

# Largest number of matrix entries compared in one go (bounds temporary memory: ~16 MB bools).
_CHUNK = 1 << 24


# -- caption identity ----------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_caption(text: str) -> str:
    """The identity under which two captions count as "the same string".

    Lowercase, every run of characters other than ASCII letters and digits (punctuation,
    whitespace, apostrophes, hyphens) becomes one space, then strip. So
    "There is a piece of farmland ." == "there is a piece of farmland" and
    "A two-lane road" == "a two lane road". Spelling differences ("formland") stay different.
    """
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


# -- per-query tie statistics -----------------------------------------------------------------

def _check(sims, txt2img) -> tuple[np.ndarray, np.ndarray]:
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be a 2-D (n_images, n_captions) matrix, got shape {sims.shape}")
    if not np.issubdtype(sims.dtype, np.number) or np.issubdtype(sims.dtype, np.complexfloating):
        raise ValueError(f"sims must be real numbers, got dtype {sims.dtype}")
    txt2img = np.asarray(txt2img)
    if txt2img.ndim != 1 or txt2img.shape[0] != sims.shape[1]:
        raise ValueError(
            f"txt2img must have one entry per caption ({sims.shape[1]}), got shape {txt2img.shape}"
        )
    if txt2img.size and not np.issubdtype(txt2img.dtype, np.integer):
        raise ValueError(f"txt2img must hold integer image indices, got dtype {txt2img.dtype}")
    txt2img = txt2img.astype(np.int64, copy=False)
    if txt2img.size and (txt2img.min() < 0 or txt2img.max() >= sims.shape[0]):
        raise ValueError(f"txt2img has image indices outside [0, {sims.shape[0]})")
    if np.issubdtype(sims.dtype, np.floating) and np.isnan(sims).any():
        raise ValueError("sims contains NaN: a NaN score cannot be ranked")
    return sims, txt2img


def tie_stats(sims, txt2img) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(a, t, r) per query for both directions (see the module docstring).

    Returns ``((a_i2t, t_i2t, r_i2t), (a_t2i, t_t2i, r_t2i))``; each array has one entry per
    image (i2t) or caption (t2i). Images without any caption get r = 0 (they cannot be hit).
    """
    sims, txt2img = _check(sims, txt2img)
    n_img, n_cap = sims.shape
    cols = np.arange(n_cap)
    rel = sims[txt2img, cols]  # (n_cap,) score of each caption with its own image

    # text→image: compare each column with its relevant entry, a few columns at a time.
    a_t = np.empty(n_cap, dtype=np.int64)
    t_t = np.empty(n_cap, dtype=np.int64)
    step = max(1, _CHUNK // max(n_img, 1))
    for lo in range(0, n_cap, step):
        block, r = sims[:, lo : lo + step], rel[lo : lo + step]  # (n_img, c), (c,)
        a_t[lo : lo + step] = (block > r).sum(0)
        t_t[lo : lo + step] = (block == r).sum(0)

    # image→text: s* = best own-caption score per image, r = own captions tied at s*.
    best = np.full(n_img, -np.inf)
    np.maximum.at(best, txt2img, rel.astype(np.float64))
    has = np.zeros(n_img, dtype=bool)
    has[txt2img] = True
    r_i = np.bincount(txt2img[rel == best[txt2img]], minlength=n_img).astype(np.int64)
    a_i = np.zeros(n_img, dtype=np.int64)
    t_i = np.zeros(n_img, dtype=np.int64)
    step = max(1, _CHUNK // max(n_cap, 1))
    for lo in range(0, n_img, step):
        block, b = sims[lo : lo + step], best[lo : lo + step, None]  # (c, n_cap), (c, 1)
        a_i[lo : lo + step] = (block > b).sum(1)
        t_i[lo : lo + step] = (block == b).sum(1)
    a_i[~has] = 0
    t_i[~has] = 0
    return (a_i, t_i, r_i), (a_t, t_t, np.ones(n_cap, dtype=np.int64))


def hit_probability(a, t, r, k: int, ties: str = "expected") -> np.ndarray:
    """P(at least one relevant item in the top k) per query, from its (a, t, r).

    Queries with r = 0 (nothing relevant) get 0. See the module docstring for the formula.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    a, t, r = (np.asarray(x, dtype=np.int64) for x in (a, t, r))
    valid = r > 0
    if ties == "optimistic":
        return ((a + 1 <= k) & valid).astype(np.float64)
    if ties == "pessimistic":
        return ((a + (t - r) + 1 <= k) & valid).astype(np.float64)
    n = k - a  # positions of the tied group that fall inside the top k
    miss = np.ones(a.shape, dtype=np.float64)
    for j in range(k):  # miss = prod_{j<n} (t - r - j) / (t - j), only where 0 < n < t
        active = (j < n) & (n < t)
        num = np.maximum(t - r - j, 0).astype(np.float64)
        den = np.where(active, t - j, 1).astype(np.float64)
        miss = np.where(active, miss * num / den, miss)
    p = np.where(n <= 0, 0.0, np.where(n >= t, 1.0, 1.0 - miss))
    return np.where(valid, p, 0.0)


def hit_probabilities(
    sims, txt2img, ks: Sequence[int] = DEFAULT_KS, ties: str = "expected"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hit probabilities: (i2t (n_images, len(ks)), t2i (n_captions, len(ks))).

    Rows of images without captions are NaN (they are no image→text query).
    """
    (ai, ti, ri), (at, tt, rt) = tie_stats(sims, txt2img)
    i2t = np.stack([hit_probability(ai, ti, ri, k, ties) for k in ks], axis=1) if len(ks) else np.zeros((ai.size, 0))
    t2i = np.stack([hit_probability(at, tt, rt, k, ties) for k in ks], axis=1) if len(ks) else np.zeros((at.size, 0))
    i2t[ri == 0] = np.nan
    return i2t, t2i


def _summarise(i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Mean hit rates (percent) → the usual result dict; i2t ignores NaN rows."""
    out: dict[str, float] = {}
    q = i2t[~np.isnan(i2t).any(axis=1)] if i2t.size else i2t
    for c, k in enumerate(ks):
        out[f"i2t_R@{k}"] = float(100.0 * q[:, c].mean()) if len(q) else float("nan")
    for c, k in enumerate(ks):
        out[f"t2i_R@{k}"] = float(100.0 * t2i[:, c].mean()) if len(t2i) else float("nan")
    recalls = [out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]
    out["rsum"] = float(sum(recalls))
    out["mR"] = float(np.mean(recalls)) if recalls else float("nan")
    return out


def recall_at_k(
    sims, txt2img, ks: Sequence[int] = DEFAULT_KS, ties: str = "expected"
) -> dict[str, float]:
    """Recall@K both ways, in percent.

    Keys: ``i2t_R@{k}`` and ``t2i_R@{k}`` for each k, ``rsum`` (sum of those) and ``mR``
    (their mean; with the default ks, the mean of the six recalls). Image→text recalls average
    over images that have at least one caption; images without captions are distractors only.
    """
    ks = tuple(int(k) for k in ks)
    i2t, t2i = hit_probabilities(sims, txt2img, ks, ties)
    return _summarise(i2t, t2i, ks)


# -- reference rows ---------------------------------------------------------------------------

def type_oracle_scores(labels: Sequence, txt2img) -> np.ndarray:
    """(n_images, n_captions) float32: 1 where the caption's image has the image's class.

    Everything of the right scene class first, random inside it: evaluate it with the
    expected-ties metric (``recall_at_k(type_oracle_scores(...), txt2img)``).
    """
    labels = list(labels)
    if any(lab is None for lab in labels):
        raise ValueError("type oracle needs a class label for every image")
    codes = {lab: c for c, lab in enumerate(dict.fromkeys(labels))}
    img_cls = np.array([codes[lab] for lab in labels], dtype=np.int64)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    return (img_cls[:, None] == img_cls[txt2img][None, :]).astype(np.float32)


def _string_ids(captions: Sequence[str], key) -> np.ndarray:
    keys = [key(c) for c in captions]
    ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    return np.array([ids[k] for k in keys], dtype=np.int64)


def ceiling_scores(
    captions: Sequence[str], txt2img, n_images: int | None = None, key=normalize_caption
) -> np.ndarray:
    """(n_images, n_captions) float32: 1 where the caption's string is one of the image's own.

    An achievable scorer that gives identical strings identical scores (the "caption-string
    oracle"). It is NOT the best such scorer (see ``ceiling_bound``): in each image's row it
    ties all the image's own strings with every copy of them, and in each column it ties all
    images owning the string whatever their multiplicity.
    """
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if len(captions) != txt2img.size:
        raise ValueError("captions and txt2img must have the same length")
    n_images = int(txt2img.max()) + 1 if n_images is None else int(n_images)
    sid = _string_ids(captions, key)
    owns = np.zeros((n_images, int(sid.max()) + 1 if sid.size else 0), dtype=bool)
    owns[txt2img, sid] = True  # image i owns string s
    return owns[:, sid].astype(np.float32)


# long: half of it is the docstring that derives the bound; the code is ~37 lines
def ceiling_bound(
    captions: Sequence[str],
    txt2img,
    n_images: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
    key=normalize_caption,
) -> dict[str, float]:
    """Exact best recalls of any model that scores identical caption strings identically.

    The constraint: if captions c1, c2 have the same string (``key``), then
    sims[i, c1] == sims[i, c2] for every image i. Rows and columns are otherwise free. Let
    n(s, i) = copies of string s among image i's captions and g(s) = sum_i n(s, i).

    text→image. All copies of s share one column. In any (tie-broken) ranking exactly K images
    sit in the top K, so the expected number of copies of s that hit is
    sum_i n(s, i) P(i in top K) with sum_i P(i in top K) = K and each P <= 1: at most the sum
    of the K largest n(s, i). Scoring column s by n(s, i) + i / (2 n_images) (a strict order
    by multiplicity) reaches it under every tie rule. Bound = sum_s topK_i n(s, i) / n_captions.

    image→text. Row i is a weak order over strings; copies of one string always tie. Placing
    one own string s alone on top gives P(hit) = 1 - C(g - n, K) / C(g, K) with g = g(s),
    n = n(s, i) (1 if g <= K). No weak order does better: if the first block holding an own
    caption starts after a > 0 items, the miss probability only grows; and a block that merges
    several strings draws its top-K slots as a hypergeometric split k_s over the strings,
    missing with probability E[prod_s q_s(k_s)], where q_s(k) = C(g_s - n_s, k) / C(g_s, k)
    is log-concave in k with q_s(0) = 1, so log q_s(k_s) >= (k_s / K) log q_s(K) and the
    product is >= min_s q_s(K). Bound per image = max over its own strings. Pessimistic ties:
    hit iff g - n + 1 <= K for some own string; optimistic: always a hit.

    The two directions are bounded separately (each is reached by its own scorer; one scorer
    need not reach both), so the mR of this row is an upper bound for every such model.
    Returns the ``recall_at_k`` dict.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    ks = tuple(int(k) for k in ks)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if len(captions) != txt2img.size:
        raise ValueError("captions and txt2img must have the same length")
    n_images = int(txt2img.max()) + 1 if n_images is None else int(n_images)
    sid = _string_ids(captions, key)
    n_cap = sid.size

    mult = Counter(zip(sid.tolist(), txt2img.tolist()))  # (string, image) -> n(s, i)
    g = np.bincount(sid) if n_cap else np.zeros(0, dtype=np.int64)
    per_string: dict[int, list[int]] = defaultdict(list)
    for (s, _i), n in mult.items():
        per_string[s].append(n)

    # text→image: the K largest multiplicities of each string, spread over its copies.
    # Only the mean over copies is defined (which copies hit is the scorer's choice), so every
    # row carries the mean: hits of string s = sum of its K largest n(s, i).
    t2i = np.zeros((n_cap, len(ks)))
    for c, k in enumerate(ks):
        if ties == "optimistic":
            t2i[:, c] = 1.0  # every owner tied on top counts as rank 1
        elif n_cap:
            hits = sum(sum(sorted(ns, reverse=True)[:k]) for ns in per_string.values())
            t2i[:, c] = hits / n_cap

    # image→text: best single own string per image, alone on top: a = 0, t = g(s), r = n(s, i).
    i2t = np.full((n_images, len(ks)), np.nan)
    if mult:
        s_arr = np.fromiter((s for s, _ in mult), dtype=np.int64, count=len(mult))
        i_arr = np.fromiter((i for _, i in mult), dtype=np.int64, count=len(mult))
        n_arr = np.fromiter(mult.values(), dtype=np.int64, count=len(mult))
        g_arr = g[s_arr]
        for c, k in enumerate(ks):
            p = hit_probability(np.zeros_like(g_arr), g_arr, n_arr, k, ties)
            best = np.full(n_images, -1.0)
            np.maximum.at(best, i_arr, p)
            i2t[:, c] = np.where(best >= 0, best, np.nan)
    return _summarise(i2t, t2i, ks)


def reference_rows(
    captions: Sequence[str],
    txt2img,
    n_images: int | None = None,
    labels: Sequence | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
) -> dict[str, dict[str, float]]:
    """The reference rows of a results table, computed from the evaluation data alone.

    "type oracle" (only when every image has a label), "string oracle" (``ceiling_scores``)
    and "string ceiling" (``ceiling_bound``). Pass the result to ``format_table``.
    """
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_images = int(txt2img.max()) + 1 if n_images is None else int(n_images)
    rows: dict[str, dict[str, float]] = {}
    if labels is not None and len(labels) == n_images and all(lab is not None for lab in labels):
        rows["type oracle"] = recall_at_k(type_oracle_scores(labels, txt2img), txt2img, ks, ties)
    rows["string oracle"] = recall_at_k(ceiling_scores(captions, txt2img, n_images), txt2img, ks, ties)
    rows["string ceiling"] = ceiling_bound(captions, txt2img, n_images, ks, ties)
    return rows


# -- presentation -----------------------------------------------------------------------------

def format_table(
    rows: dict[str, dict[str, float]], ks: Sequence[int] = DEFAULT_KS, digits: int = 2
) -> str:
    """A markdown table: one row per method, columns i2t R@k, t2i R@k, mR.

    ``rows`` maps a method name to a ``recall_at_k``-style dict; missing entries print "–".
    """
    cols = [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["mR"]
    heads = ["method"] + [c.replace("_", " ") for c in cols]
    body = []
    for name, res in rows.items():
        cells = [str(name)]
        for c in cols:
            v = res.get(c) if isinstance(res, dict) else None
            cells.append("–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}")
        body.append(cells)
    widths = [max(len(r[j]) for r in [heads] + body) for j in range(len(heads))]

    def line(cells: Iterable[str]) -> str:
        cells = list(cells)
        return "| " + " | ".join(
            cells[j].ljust(widths[j]) if j == 0 else cells[j].rjust(widths[j]) for j in range(len(cells))
        ) + " |"

    sep = "|" + "|".join(
        ("-" * (widths[j] + 2)) if j == 0 else ("-" * (widths[j] + 1) + ":") for j in range(len(heads))
    ) + "|"
    return "\n".join([line(heads), sep] + [line(r) for r in body])
