"""What a demo-world caption claims, checked against any tile: the world's content truth.

A caption is *true of* a tile when the tile is of the caption's scene type and every grounded
phrase of the caption holds there: the named category, with the colour / size the phrase
states, in the stated number (`phrase_demand`). Relations ("beside", "left of") and positions
("in the top left") are not checked, so this is a loose truth: a person reading only the nouns,
numbers and adjectives. "A forest." holds for every forest tile; "Three white planes are
parked at the airport." only for airports with exactly three white planes.

Two users: the simulated annotator of `experiments.label_loop` (relevance labels), and
the "content oracle" reference row of `envlf.evaluation.evaluate` (what reading that much is worth).

Vectorised: per (category, colour, size) key, one count per tile; a caption is a conjunction
of count ranges over those vectors, so `matches` answers for every tile at once.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from envlf.evaluation.metrics import normalize_caption as normalize
from .captions import NUMBER_WORDS, SIZE_WORDS

NUMBERS = {w: n for n, w in enumerate(NUMBER_WORDS)}
AT_LEAST = (("a great number of", 8), ("lots of", 8), ("numerous", 8), ("many", 8), ("several", 5),
            ("a few", 2), ("some", 2))

Demand = tuple[str, "str | None", "str | None", tuple[int, float]]


def phrase_demand(text: str, named: list[dict]) -> Demand:
    """What a grounded phrase asks of another tile, by the world's truth rules
    (`envlf.world.captions`): the named objects' category; their colour / size when the
    phrase says it; a count rule: a number word is exact ("three white planes": exactly three),
    "many" / "numerous" / "lots of" / "a great number of" mean at least 8, "several" at least
    5, "a few" / "some" / a bare plural at least 2, "a" / "one" / "the" at least 1."""
    low = text.lower()
    words = set(low.replace("-", " ").split())
    first = named[0]
    colour = first.get("colour") if first.get("colour") in words else None
    size = first.get("size") if words & set(SIZE_WORDS.get(first.get("size"), ())) else None
    head = low.split()[0]
    if head in NUMBERS and head != "one":
        rule = (NUMBERS[head], NUMBERS[head])
    elif head in ("a", "an", "one", "the"):
        rule = (1, math.inf)
    else:
        rule = next(((n, math.inf) for q, n in AT_LEAST if low.startswith(q + " ")), (2, math.inf))
    return first["category"], colour, size, rule


class ContentTruth:
    """The content truth of every caption of ``records`` (a CaptionDataset's records, with the
    demo world's ``objects`` and ``sentences[].phrases`` in their meta) against those records.

    Raises ValueError when a record has no objects or phrases (not a demo world)."""

    def __init__(self, records: Sequence):
        self.n = len(records)
        self.labels = np.array([str(r.label) for r in records])
        self.demands: dict[str, list[tuple[str, list[Demand]]]] = {}
        self._counts: dict[tuple, np.ndarray] = {}
        for i, r in enumerate(records):
            objs, sents = r.meta.get("objects"), r.meta.get("sentences")
            if objs is None or sents is None:
                raise ValueError(f"content truth needs a demo world (objects and grounded phrases); "
                                 f"{r.image_id} has none")
            for o in objs:
                cat, col, sz = o["category"], o.get("colour"), o.get("size")
                # a set: an object without a colour or size must not count twice under (cat, None, ...)
                for key in {(cat, None, None), (cat, col, None), (cat, None, sz), (cat, col, sz)}:
                    self._counts.setdefault(key, np.zeros(self.n, np.int32))[i] += 1
            by_id = {o["id"]: o for o in objs}
            for sent in sents:
                need = []
                for ph in sent.get("phrases", []):
                    named = [by_id[k] for k in ph["object_ids"] if k in by_id]
                    if named:
                        need.append(phrase_demand(ph["text"], named))
                self.demands.setdefault(normalize(sent["raw"]), []).append((r.label, need))

    @classmethod
    def of(cls, records: Sequence) -> "ContentTruth | None":
        """The truth when ``records`` are a demo world's, else None."""
        try:
            return cls(records)
        except ValueError:
            return None

    def _holds(self, cls: str, need: list[Demand]) -> np.ndarray:
        ok = self.labels == str(cls)
        zero = np.zeros(self.n, np.int32)
        for cat, colour, size, (lo, hi) in need:
            m = self._counts.get((cat, colour, size), zero)
            ok &= (m >= lo) & (m <= hi)
        return ok

    def matches(self, caption: str) -> np.ndarray | None:
        """(n,) bool: the tiles this caption's content holds for; None for a caption the
        world never wrote (its content is unknown)."""
        demands = self.demands.get(normalize(caption))
        if demands is None:
            return None
        out = np.zeros(self.n, bool)
        for cls, need in demands:
            out |= self._holds(cls, need)
        return out


def content_oracle_scores(records: Sequence, captions: Sequence[str], txt2img) -> np.ndarray | None:
    """(n_images, n_captions) float32 for the "content oracle" reference row: every tile the
    caption's content holds for first, then the rest of the caption's scene type, then the
    others; random within each group (score ties). What a reader of the nouns, numbers,
    colours and sizes, and of nothing else, can reach. None when ``records`` are not a world."""
    truth = ContentTruth.of(records)
    if truth is None:
        return None
    txt2img = np.asarray(txt2img, dtype=np.int64)
    same_type = truth.labels[:, None] == truth.labels[txt2img][None, :]
    holds = np.zeros(same_type.shape, bool)
    for j, c in enumerate(captions):
        m = truth.matches(c)
        if m is not None:
            holds[:, j] = m
    holds[txt2img, np.arange(len(txt2img))] = True  # a caption always holds for its own tile
    return (same_type.astype(np.float32) + 2.0 * holds).astype(np.float32)
