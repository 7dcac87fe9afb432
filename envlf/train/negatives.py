"""Swapped-word captions: ITM negatives that differ from a true caption in one detail.

An image's own caption with one object noun, count, colour, size or side swapped ("four
white planes" -> "four white boats", "three cars" -> "six cars", "on the left" -> "on the
right") is false for that image, yet shares the scene's words with the truth. Batch hard
negatives (captions of other images of the same scene type) can often be told apart by the
scene's look; the hope with these is that the fusion encoder has to find the named object
(the "NegCLIP" idea, Yuksekgonul et al. 2023, here for the ITM head). The swap reads only
the caption's text: no boxes or masks, so a model trained with it stays weakly supervised.
On the demo world the ITM head learnt the swapped nouns but little else, and its maps
pointed worse (README, demo world): the option is off by default.

Swaps stay grammatical (a plural noun becomes a plural noun, a number above one another
number above one), so grammar does not give a swapped caption away; a swap never trades a
word for its synonym (little -> small, car -> vehicle), which would leave the caption true.
A swapped caption can still happen to be true (a tile with red and white roofs): label
noise the loss tolerates.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

# Each group: classes of interchangeable words. A word is swapped for a word of another
# class of its group, never of its own (its synonyms).
_COUNTS = [[w] for w in ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                         "eleven", "twelve")]
_COLOURS = [["white"], ["black"], ["grey", "gray"], ["red"], ["blue"], ["green"], ["brown"],
            ["beige"], ["yellow"], ["orange"]]
_SIZES = [["small", "little", "tiny"], ["large", "big", "huge"]]
_SIDES = [["left"], ["right"]]
_VERTICAL = [["top", "upper"], ["bottom", "lower"]]
_ABOVE = [["above"], ["below"]]
_COMPASS = [["north", "northern"], ["south", "southern"]], [["east", "eastern"], ["west", "western"]]
_GROUPS = {"count": [_COUNTS], "colour": [_COLOURS], "size": [_SIZES],
           "position": [_SIDES, _VERTICAL, _ABOVE, *_COMPASS]}  # kind of detail -> its groups
# Object nouns (singular, plural) in families of things found in the same places: a noun
# becomes one of another class of its family ("cars" -> "boats", not "cars" -> "courts",
# which the text alone would give away as unlikely).
_NOUNS = [
    [  # vehicles
        [("plane", "planes"), ("airplane", "airplanes"), ("aeroplane", "aeroplanes")],
        [("boat", "boats"), ("ship", "ships"), ("yacht", "yachts"), ("vessel", "vessels")],
        [("car", "cars"), ("vehicle", "vehicles")],
    ],
    [  # what stands on the ground
        [("house", "houses"), ("home", "homes")],
        [("building", "buildings")],
        [("warehouse", "warehouses")],
        [("tank", "tanks")],
        [("tree", "trees")],
    ],
    [  # flat grounds
        [("pool", "pools")],
        [("court", "courts")],
        [("pond", "ponds"), ("lake", "lakes")],
    ],
    [  # lines
        [("bridge", "bridges")],
        [("road", "roads"), ("street", "streets")],
    ],
]


def _table() -> dict[str, list[str]]:
    """word -> the words it may become."""
    out: dict[str, list[str]] = {}
    for group in (g for groups in _GROUPS.values() for g in groups):
        for i, cls in enumerate(group):
            others = [w for j, c in enumerate(group) if j != i for w in c]
            for w in cls:
                out[w] = others
    for family in _NOUNS:
        for form in (0, 1):  # singular nouns become singular ones, plurals plurals
            for i, cls in enumerate(family):
                others = [pair[form] for j, c in enumerate(family) if j != i for pair in c]
                for pair in cls:
                    out[pair[form]] = others
    return out


SWAPS = _table()
# what kind of detail a swapped word is (for reports: which details the ITM head tells apart)
KIND = {**{w: "noun" for f in _NOUNS for c in f for pair in c for w in pair},
        **{w: kind for kind, groups in _GROUPS.items() for g in groups for c in g for w in c}}
_POSITION_WORDS = {w for w, kind in KIND.items() if kind == "position"}
_WORD = re.compile(r"[A-Za-z]+")


def _recase(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class WordSwapper:
    """Makes swapped-word captions. Given the training captions, it only uses their words and
    only makes word pairs they contain: a replacement the true captions never use ("gray"
    where they say "grey"), or never next to that neighbour ("yellow trees", "building
    farm"), would tell a swapped caption from a true one by its text alone."""

    def __init__(self, captions: Iterable[str] | None = None, positions: bool = True):
        self.table, self.pairs = SWAPS, None
        if not positions:  # flips and rotations of the tile change which side is which
            self.table = {w: c for w, c in SWAPS.items() if w not in _POSITION_WORDS}
        if captions is not None:
            words = [[w.lower() for w in _WORD.findall(c)] for c in captions]
            vocab = {w for ws in words for w in ws}
            self.pairs = {(a, b) for ws in words for a, b in zip(ws, ws[1:])}
            table = {w: [c for c in choices if c in vocab] for w, choices in self.table.items() if w in vocab}
            self.table = {w: choices for w, choices in table.items() if choices}

    def _fits(self, words: list[str], i: int, new: str) -> bool:
        if self.pairs is None:
            return True
        return ((i == 0 or (words[i - 1], new) in self.pairs)
                and (i + 1 == len(words) or (new, words[i + 1]) in self.pairs))

    def swap(self, caption: str, rng: np.random.Generator) -> tuple[str, str] | None:
        """(the caption with one word, a random one of those that can be, replaced by a word
        of another class of its group; that word as it was, lower case), or None when no
        word can be."""
        found = list(_WORD.finditer(caption))
        words = [m.group().lower() for m in found]
        spots = [i for i, w in enumerate(words) if w in self.table]
        for i in rng.permutation(spots) if spots else ():
            choices = self.table[words[i]]
            for k in rng.permutation(len(choices)):
                if self._fits(words, i, choices[k]):
                    m = found[i]
                    return caption[:m.start()] + _recase(choices[k], m.group()) + caption[m.end():], words[i]
        return None

    def __call__(self, caption: str, rng: np.random.Generator) -> str | None:
        """The swapped caption alone (see `swap`)."""
        out = self.swap(caption, rng)
        return None if out is None else out[0]

    def batch(self, captions: Sequence[str], rng: np.random.Generator) -> tuple[list[int], list[str]]:
        """(rows of the captions that have a swapped version, those versions)."""
        rows, texts = [], []
        for i, c in enumerate(captions):
            s = self(c, rng)
            if s is not None:
                rows.append(i)
                texts.append(s)
        return rows, texts
