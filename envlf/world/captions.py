"""Captions written from a rendered scene's layout and mask, true by construction.

Pipeline: `scene_facts` reads the scene (objects plus the instance mask, for positions and
relations) into `Fact`s: counts, colour and size splits, positions in the 3x3 grid of the
tile, and relations (beside, left of / above, surrounded by, along, on/in, crosses, how
full a parking lot is). `caption_scene` writes five captions of two facts each (two short
sentences), every fact worded by a random template.
Every noun phrase that names objects is recorded as a `Phrase` with its character span
and the ids it names; those ids are the mask's pixel values.

Truth rules the noun phrases follow (tests check them):
- a number word ("three white planes") names *all* objects of that category with those
  attributes in the tile, and exactly that many;
- "the X" is used only when the tile holds exactly one X with those attributes;
- "a X" / "one X" names one object; "many", "some", "a few", "several" name a set
  without promising its size;
- colour and size words are the objects' own `colour` / `size`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .geometry import SIZE, clip_to_tile, dilate, polygon_area
from .scenes import Layout, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve")

# (singular forms, plural forms); the first form is the usual one.
NOUNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plane": (("plane", "airplane", "aircraft"), ("planes", "airplanes", "aircraft")),
    "terminal": (("terminal", "terminal building"), ("terminals", "terminal buildings")),
    "building": (("building", "warehouse", "factory building"),
                 ("buildings", "warehouses", "factory buildings")),
    "house": (("house", "home"), ("houses", "homes")),
    "ship": (("ship", "vessel"), ("ships", "vessels")),
    "boat": (("boat", "yacht"), ("boats", "yachts")),
    "storage_tank": (("storage tank", "oil tank", "tank"), ("storage tanks", "oil tanks", "tanks")),
    "car": (("car", "vehicle"), ("cars", "vehicles")),
    "tree": (("tree",), ("trees", "green trees")),
    "tennis_court": (("tennis court", "court"), ("tennis courts", "courts")),
    "baseball_field": (("baseball field", "baseball diamond"), ("baseball fields", "baseball diamonds")),
    "swimming_pool": (("swimming pool", "pool"), ("swimming pools", "pools")),
    "road": (("road", "street"), ("roads", "streets")),
    "freeway": (("freeway", "highway", "motorway"), ("freeways", "highways", "motorways")),
    "overpass": (("overpass", "flyover"), ("overpasses", "flyovers")),
    "bridge": (("bridge",), ("bridges",)),
    "runway": (("runway",), ("runways",)),
    "river": (("river",), ("rivers",)),
    "lake": (("lake", "pond"), ("lakes", "ponds")),
    "sea": (("sea", "ocean"), ("seas", "oceans")),
    "water": (("water",), ("waters",)),
    "beach": (("beach", "sandy beach"), ("beaches", "sandy beaches")),
    "field": (("field", "crop field"), ("fields", "crop fields")),
    "forest": (("forest", "woodland"), ("forests", "woodlands")),
    "pier": (("pier", "jetty"), ("piers", "jetties")),
    "parking_lot": (("parking lot", "car park"), ("parking lots", "car parks")),
    "fairway": (("fairway",), ("fairways",)),
    "putting_green": (("putting green",), ("putting greens",)),
    "bunker": (("bunker", "sand trap"), ("bunkers", "sand traps")),
}
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
# Categories whose colour / size a caption may mention (a "grey road" says nothing).
COLOURED = {"plane", "terminal", "building", "house", "ship", "boat", "storage_tank", "car",
            "tennis_court", "field", "pier", "lake", "river", "sea", "water", "beach"}
SIZED = {"plane", "ship", "boat", "storage_tank", "house", "building", "lake", "tennis_court",
         "swimming_pool", "bunker", "river"}
# Never counted with a number: too many, or parts cut by the tile edge make a count moot.
UNCOUNTED = {"tree", "road", "forest", "sea", "water", "beach", "river", "fairway",
             "freeway"}
ROOFED = {"house", "building", "terminal"}
MASS = {"water"}  # always "the water", never "a water"  # colour is the roof's: "a red-roofed house"
VERBS = {
    "plane": ("parked",), "car": ("parked",), "moving_car": ("driving", "moving"),
    "boat": ("moored", "docked"),
    "ship": ("moored", "docked", "anchored"), "house": ("located", "built"),
    "building": ("located", "standing"), "storage_tank": ("located", "standing"),
    "tree": ("growing", "planted"), "terminal": ("located",),
}

# Scene intro: (indefinite, definite, category it names or None, preposition for "in the X").
# Intros that name an object ("a river") become phrases; sentences that place other things
# "in" the scene use only the area intros (trees are *beside* a river, not in it).
INTROS: dict[str, tuple[tuple[str, str, str | None, str], ...]] = {
    "airport": (("an airport", "the airport", None, "at"), ("an airfield", "the airfield", None, "at")),
    "harbor": (("a harbor", "the harbor", None, "in"), ("a marina", "the marina", None, "in"),
               ("a port", "the port", None, "in")),
    "dense_residential": (("a dense residential area", "the dense residential area", None, "in"),
                          ("a crowded neighbourhood", "the neighbourhood", None, "in")),
    "sparse_residential": (("a sparse residential area", "the residential area", None, "in"),
                           ("a quiet suburb", "the suburb", None, "in")),
    "industrial": (("an industrial area", "the industrial area", None, "in"),
                   ("an industrial zone", "the industrial zone", None, "in")),
    "farmland": (("farmland", "the farmland", None, "on"),
                 ("an agricultural area", "the agricultural area", None, "in")),
    "beach": (("a beach", "the beach", "beach", "on"), ("a stretch of coast", "the coast", None, "on")),
    "river": (("a river", "the river", "river", "on"), ("a riverside landscape", "the riverside", None, "in")),
    "parking_lot": (("a parking lot", "the parking lot", "parking_lot", "in"),
                    ("a car park", "the car park", "parking_lot", "in"),
                    ("a parking area", "the parking area", None, "in")),
    "tennis_court": (("a sports ground", "the sports ground", None, "in"),
                     ("a tennis facility", "the tennis facility", None, "in")),
    "baseball_diamond": (("a sports park", "the park", None, "in"),
                         ("a playing field", "the playing field", None, "in")),
    "forest": (("a forest", "the forest", "forest", "in"), ("a dense woodland", "the woodland", "forest", "in"),
               ("a wooded area", "the wooded area", None, "in")),
    "storage_tanks": (("an oil depot", "the depot", None, "in"), ("a tank farm", "the tank farm", None, "in")),
    "freeway": (("a freeway", "the freeway", "freeway", "on"), ("a highway", "the highway", "freeway", "on"),
                ("a highway corridor", "the corridor", None, "in")),
    "overpass": (("an interchange", "the interchange", None, "at"),
                 ("a highway crossing", "the crossing", None, "at")),
    "golf_course": (("a golf course", "the golf course", None, "on"),),
}
# What the first caption is about, by scene type (first category present wins).
MAIN: dict[str, tuple[str, ...]] = {
    "airport": ("plane",), "harbor": ("boat", "ship", "pier"), "dense_residential": ("house",),
    "sparse_residential": ("house",), "industrial": ("building",), "farmland": ("field",),
    "beach": ("sea", "beach"), "river": ("river",), "parking_lot": ("car",),
    "tennis_court": ("tennis_court",), "baseball_diamond": ("baseball_field",),
    "forest": ("forest",), "storage_tanks": ("storage_tank",), "freeway": ("car", "freeway"),
    "overpass": ("overpass",), "golf_course": ("bunker", "putting_green", "fairway"),
}
# Single objects that are the scene itself: their count fact reads "It is a wide river."
MAIN_SELF = {"sea", "beach", "river", "forest", "freeway", "water"}
# Relations worth saying: subject category -> anchor categories.
NEAR = {
    "plane": ("terminal", "plane"), "car": ("terminal", "building", "house"),
    "boat": ("pier",), "ship": ("pier", "ship"), "swimming_pool": ("house",),
    "storage_tank": ("building", "storage_tank"), "building": ("parking_lot", "storage_tank", "road"),
    "house": ("road", "swimming_pool", "tennis_court", "lake"), "tennis_court": ("parking_lot", "house"),
    "bunker": ("putting_green",), "baseball_field": ("parking_lot",), "putting_green": ("lake",),
    "terminal": ("runway",),
}
ALONG = {"tree": ("river", "road", "fairway", "freeway"), "house": ("road", "river", "beach"),
         "boat": ("pier",), "car": ("road", "freeway")}
ON = {"car": ("parking_lot", "road", "freeway", "overpass"), "plane": ("runway",),
      "boat": ("sea", "river", "water"), "ship": ("water", "sea")}
CROSS = {"bridge": ("river",), "overpass": ("freeway",), "road": ("river",)}
THROUGH = {"road": ("forest",), "river": ("forest",)}  # a line mostly flanked by the area
SURROUNDING_AREAS = ("forest",)  # "a lake surrounded by the forest"
ENCLOSABLE = {"lake", "field", "house"}
REGIONS = {
    (0, 0): ("in the top left corner", "at the upper left"), (1, 0): ("at the top", "in the upper part"),
    (2, 0): ("in the top right corner", "at the upper right"), (0, 1): ("on the left", "on the left side"),
    (1, 1): ("in the middle", "in the centre"), (2, 1): ("on the right", "on the right side"),
    (0, 2): ("in the bottom left corner", "at the lower left"), (1, 2): ("at the bottom", "in the lower part"),
    (2, 2): ("in the bottom right corner", "at the lower right"),
}
NEAR_GAP = 10  # px between visible bboxes for "beside"
ALONG_DIST = 24  # px from an object's centroid to the line for "along"


@dataclass(frozen=True)
class Fact:
    """One true statement about the tile, before wording. ids are object ids."""

    kind: str  # count | split | region | near | left_of | right_of | above | below |
    #            surrounded | enclosed | along | on | crosses | through | full | empty | scene
    subject: tuple[int, ...] = ()
    other: tuple[int, ...] = ()
    detail: str = ""  # region key "x,y" etc.
    groups: tuple[tuple[int, ...], ...] = ()  # split: one id tuple per phrase


@dataclass(frozen=True)
class Phrase:
    text: str
    start: int
    end: int
    object_ids: tuple[int, ...]

    def to_json(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end,
                "object_ids": list(self.object_ids)}


@dataclass
class Caption:
    raw: str
    phrases: list[Phrase]
    facts: list[Fact] = field(default_factory=list)


@dataclass
class NP:
    """A noun phrase before it is placed in a sentence."""

    text: str
    ids: tuple[int, ...]
    plural: bool


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", raw.lower())


# ---------------------------------------------------------------------------------------
# Reading the scene
# ---------------------------------------------------------------------------------------

class SceneView:
    """Objects plus what the mask says about them: centroids, visible fraction, relations."""

    def __init__(self, layout: Layout, mask: np.ndarray):
        self.layout = layout
        self.mask = mask
        self.objects = {o.id: o for o in layout.objects}
        n = int(mask.max()) + 1
        ys, xs = np.indices(mask.shape)
        area = np.bincount(mask.ravel(), minlength=n).astype(float)
        cx = np.bincount(mask.ravel(), weights=xs.ravel(), minlength=n) / np.maximum(area, 1)
        cy = np.bincount(mask.ravel(), weights=ys.ravel(), minlength=n) / np.maximum(area, 1)
        self.centroid = {i: (float(cx[i]), float(cy[i])) for i in self.objects}
        self.visible = {}
        for o in layout.objects:
            full = polygon_area(clip_to_tile(o.footprint, -SIZE, 2 * SIZE))
            self.visible[o.id] = o.area / max(full, 1.0)

    def of(self, category: str) -> list[SceneObject]:
        return [o for o in self.layout.objects if o.category == category]

    def matching(self, obj: SceneObject, colour: bool, size: bool) -> list[SceneObject]:
        return [o for o in self.of(obj.category)
                if (not colour or o.colour == obj.colour) and (not size or o.size == obj.size)]

    def countable(self, objs: list[SceneObject]) -> bool:
        """A number is honest only if every member is mostly inside the tile."""
        return (objs[0].category not in UNCOUNTED and len(objs) <= 12
                and all(self.visible[o.id] >= 0.6 for o in objs))

    def region(self, ids) -> tuple[int, int] | None:
        """3x3 cell holding every centroid in ``ids``, if they share one, else None."""
        cells = set()
        for i in ids:
            x, y = self.centroid[i]
            cells.add((min(int(x * 3 // SIZE), 2), min(int(y * 3 // SIZE), 2)))
        return cells.pop() if len(cells) == 1 else None

    def gap(self, a: SceneObject, b: SceneObject) -> float:
        """Chebyshev gap between two visible bboxes (0 if they touch or overlap)."""
        ax0, ay0, ax1, ay1 = a.bbox
        bx0, by0, bx1, by1 = b.bbox
        return max(0, bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)

    def direction(self, a: SceneObject, b: SceneObject) -> str | None:
        """'left_of' / 'right_of' / 'above' / 'below' when a is clearly so from b: their
        boxes are apart on one axis and overlap by half the smaller extent on the other."""
        ax0, ay0, ax1, ay1 = a.bbox
        bx0, by0, bx1, by1 = b.bbox
        ov_y = min(ay1, by1) - max(ay0, by0)
        ov_x = min(ax1, bx1) - max(ax0, bx0)
        if ov_y >= 0.5 * min(ay1 - ay0, by1 - by0):
            if ax1 <= bx0:
                return "left_of"
            if bx1 <= ax0:
                return "right_of"
        if ov_x >= 0.5 * min(ax1 - ax0, bx1 - bx0):
            if ay1 <= by0:
                return "above"
            if by1 <= ay0:
                return "below"
        return None

    def border(self, o: SceneObject, ring: int = 2) -> np.ndarray:
        """Mask ids in a ring ``ring`` px wide around the object's visible bbox."""
        x0, y0, x1, y1 = o.bbox
        X0, Y0 = max(x0 - ring, 0), max(y0 - ring, 0)
        X1, Y1 = min(x1 + ring, SIZE), min(y1 + ring, SIZE)
        win = self.mask[Y0:Y1, X0:X1]
        inner = np.zeros(win.shape, bool)
        inner[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = True
        return win[~inner]

    def on(self, o: SceneObject, surface: SceneObject) -> bool:
        """Most of the ring around ``o`` belongs to ``surface``."""
        ring = self.border(o)
        return len(ring) > 0 and float(np.mean(ring == surface.id)) >= 0.5

    def flanked_by(self, line: SceneObject, area: SceneObject, share: float = 0.5) -> bool:
        """At least ``share`` of the pixels just beside ``line`` belong to ``area``."""
        own = self.mask == line.id
        ring = dilate(own, 2) & ~own
        return bool(ring.any()) and float(np.mean(self.mask[ring] == area.id)) >= share

    def distance_to(self, ids, line: SceneObject) -> np.ndarray:
        """Distance (px) from each centroid in ``ids`` to the nearest pixel of ``line``."""
        ys, xs = np.nonzero(self.mask == line.id)
        pts = np.stack([xs, ys], axis=1)[::3].astype(float)
        c = np.array([self.centroid[i] for i in ids])
        if len(pts) == 0:
            return np.full(len(ids), np.inf)
        d = np.sqrt(((c[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        return d.min(axis=1)

    def surrounding(self, o: SceneObject, ring: list[SceneObject], reach: float = 40) -> list[SceneObject]:
        """Members of ``ring`` within ``reach`` px of o's box, if they cover all four sides."""
        x0, y0, x1, y1 = o.bbox
        cx, cy = self.centroid[o.id]
        near = [t for t in ring if self.gap(o, t) <= reach]
        sides = set()
        for t in near:
            tx, ty = self.centroid[t.id]
            ang = math.atan2(ty - cy, tx - cx)
            sides.add(int(((ang + math.pi / 4) % (2 * math.pi)) // (math.pi / 2)))
        return near if len(sides) == 4 and len(near) >= 5 else []


def scene_facts(view: SceneView) -> list[Fact]:
    """Every fact worth saying about the tile, in a fixed (deterministic) order."""
    facts: list[Fact] = []
    cats: list[str] = []
    for o in view.layout.objects:
        if o.category not in cats:
            cats.append(o.category)
    for cat in cats:
        objs = view.of(cat)
        ids = tuple(o.id for o in objs)
        if cat not in MASS:
            facts.append(Fact("count", ids))
        if cat in COLOURED and len(objs) > 1 and view.countable(objs):
            # most common first; the name breaks ties (set order varies with PYTHONHASHSEED)
            colours = sorted({o.colour for o in objs},
                             key=lambda c: (-sum(o.colour == c for o in objs), c))
            if 2 <= len(colours) <= 3:
                groups = tuple(tuple(o.id for o in objs if o.colour == c) for c in colours)
                facts.append(Fact("split", ids, detail="colour", groups=groups))
        if cat in SIZED and len(objs) > 1 and view.countable(objs):
            sizes = [s for s in ("large", "small") if any(o.size == s for o in objs)]
            if len(sizes) == 2:
                groups = tuple(tuple(o.id for o in objs if o.size == s) for s in sizes)
                facts.append(Fact("split", tuple(i for g in groups for i in g), detail="size",
                                  groups=groups))
        if len(objs) <= 6 and cat not in UNCOUNTED:
            cell = view.region(ids)
            if cell is not None:
                facts.append(Fact("region", ids, detail=f"{cell[0]},{cell[1]}"))
        if len(objs) > 1 and cat not in UNCOUNTED:
            for o in objs:  # a distinctive single object and where it is
                if len(view.matching(o, True, False)) == 1 and cat in COLOURED:
                    cell = view.region([o.id])
                    if cell is not None:
                        facts.append(Fact("region", (o.id,), detail=f"{cell[0]},{cell[1]}"))
    facts += _relations(view, cats)
    lots = view.of("parking_lot")
    if len(lots) == 1 and "stalls" in lots[0].params:
        cars = [c for c in view.of("car") if view.on(c, lots[0])]
        ratio = len(cars) / max(lots[0].params["stalls"], 1)
        if cars and ratio >= 0.75:
            facts.append(Fact("full", tuple(c.id for c in cars), (lots[0].id,)))
        elif cars and ratio <= 0.3 and len(cars) == len(view.of("car")) and view.countable(cars):
            facts.append(Fact("empty", tuple(c.id for c in cars), (lots[0].id,)))
    facts.append(Fact("scene"))
    return facts


def _relations(view: SceneView, cats: list[str]) -> list[Fact]:
    facts = [f for cat in cats for f in _object_relations(view, cat)]
    return facts + _directions(view)[:4]  # enough to vary the captions, not to crowd them


def _object_relations(view: SceneView, cat: str) -> list[Fact]:
    """The relations of the objects of one category to their anchors: near, along, on,
    crosses, through, enclosed, surrounded (in this order)."""
    facts: list[Fact] = []
    objs = view.of(cat)
    for anchor_cat in NEAR.get(cat, ()):
        anchors = view.of(anchor_cat)
        if not anchors:
            continue
        for a in anchors:
            close = [o for o in objs if o.id != a.id and view.gap(o, a) <= NEAR_GAP
                     and not view.on(o, a)
                     and (o.category != a.category or (o.colour, o.size) != (a.colour, a.size))]
            if close and len(close) == len(objs) and view.countable(objs):
                facts.append(Fact("near", tuple(o.id for o in close), (a.id,)))
            elif close:
                facts.append(Fact("near", (close[0].id,), (a.id,)))
    for anchor_cat in ALONG.get(cat, ()):
        for line in view.of(anchor_cat):
            d = view.distance_to([o.id for o in objs], line)
            along = [o for o, di in zip(objs, d) if di <= ALONG_DIST and not view.on(o, line)]
            if len(along) >= 3:
                facts.append(Fact("along", tuple(o.id for o in along), (line.id,)))
    for surf_cat in ON.get(cat, ()):
        for surf in view.of(surf_cat):
            on = [o for o in objs if view.on(o, surf)]
            if on:
                facts.append(Fact("on", tuple(o.id for o in on), (surf.id,)))
    for other_cat in CROSS.get(cat, ()):
        for o in objs:
            for other in view.of(other_cat):
                if _crosses(view, o, other):
                    facts.append(Fact("crosses", (o.id,), (other.id,)))
    for area_cat in THROUGH.get(cat, ()):
        for o in objs:
            for area in view.of(area_cat):
                if view.flanked_by(o, area):
                    facts.append(Fact("through", (o.id,), (area.id,)))
    for o in objs if cat in ENCLOSABLE else ():
        for area in (a for c_ in SURROUNDING_AREAS for a in view.of(c_)):
            ring = view.border(o, 3)
            if len(ring) and float(np.mean(ring == area.id)) >= 0.6:
                facts.append(Fact("enclosed", (o.id,), (area.id,)))
    if cat in ("house", "tennis_court", "swimming_pool", "building", "lake", "storage_tank",
               "baseball_field", "putting_green"):
        trees = view.of("tree")
        for o in objs[:6]:
            ring = view.surrounding(o, trees)
            if ring:
                facts.append(Fact("surrounded", (o.id,), tuple(t.id for t in ring)))
    return facts


def _directions(view: SceneView) -> list[Fact]:
    # directions between distinguishable single objects of the salient kinds
    singles = [o for o in view.layout.objects
               if o.category in ("building", "storage_tank", "house", "tennis_court", "swimming_pool",
                                 "plane", "ship", "terminal", "parking_lot", "lake", "bunker")
               and view.visible[o.id] >= 0.6]
    directions = []
    for a in singles[:12]:
        for b in singles[:12]:
            if a.id == b.id:
                continue
            if a.category == b.category and a.colour == b.colour and a.size == b.size:
                continue
            d = view.direction(a, b)
            if d is not None:
                directions.append(Fact(d, (a.id,), (b.id,)))
    return directions


def _crosses(view: SceneView, o: SceneObject, other: SceneObject) -> bool:
    """o runs over ``other``: pixels of ``other`` border o on two opposite sides."""
    x0, y0, x1, y1 = o.bbox
    m = view.mask
    sides = [m[max(y0 - 3, 0):y0, x0:x1], m[y1:y1 + 3, x0:x1],
             m[y0:y1, max(x0 - 3, 0):x0], m[y0:y1, x1:x1 + 3]]
    hit = [int(np.sum(s == other.id)) >= 3 for s in sides]
    return (hit[0] and hit[1]) or (hit[2] and hit[3]) or (o.category != "road" and sum(hit) >= 2)


# ---------------------------------------------------------------------------------------
# Wording
# ---------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def noun_phrase(view: SceneView, objs: list[SceneObject], rng: np.random.Generator, *,
                colour: bool | None = None, size: bool | None = None,
                definite: bool | None = None) -> NP:
    """Describe ``objs`` (one category) following the truth rules in the module doc."""
    cat = objs[0].category
    n = len(objs)
    same_colour = len({o.colour for o in objs}) == 1 and cat in COLOURED
    same_size = len({o.size for o in objs}) == 1 and objs[0].size in SIZE_WORDS and cat in SIZED
    use_colour = same_colour and (colour if colour is not None else rng.random() < 0.7)
    use_size = same_size and (size if size is not None else rng.random() < 0.5)
    sel = {o.id for o in view.matching(objs[0], use_colour, use_size)}
    complete = sel == {o.id for o in objs}
    sing, plur = NOUNS[cat]
    noun = (sing if n == 1 else plur)[int(rng.integers(len(sing if n == 1 else plur)))]
    adjs = []
    if use_size:
        adjs.append(SIZE_WORDS[objs[0].size][int(rng.integers(2))])
    c = objs[0].colour
    tail = ""
    if use_colour:
        if cat in ROOFED and rng.random() < 0.6:
            if rng.random() < 0.5:
                adjs.append(f"{c}-roofed")
            else:
                tail = f" with {'a ' + c + ' roof' if n == 1 else c + ' roofs'}"
        else:
            adjs.append(c)
    body = " ".join(adjs + [noun]) + tail
    if n == 1:
        the = complete and (cat in MASS or (definite if definite is not None else rng.random() < 0.4))
        # "one" only where it contrasts with others of the kind ("one red car" of five)
        one = len(view.of(cat)) > 1 and rng.random() < 0.15
        det = "the" if the else ("one" if one else _article(body))
        return NP(f"{det} {body}", (objs[0].id,), False)
    if complete and view.countable(objs):
        return NP(f"{NUMBER_WORDS[n]} {body}", tuple(o.id for o in objs), True)
    if n >= 8:
        q = ("many", "lots of", "numerous", "a great number of")[int(rng.integers(4))]
    elif n <= 4:
        q = ("a few", "some")[int(rng.integers(2))]
    else:
        q = ("several", "some")[int(rng.integers(2))]
    return NP(f"{q} {body}", tuple(o.id for o in objs), True)


TEMPLATES: dict[str, tuple[str, ...]] = {
    "scene": ("{Pa}.", "This is {Pa}.", "It is {Pa}.", "An aerial image of {Pa}.", "Here is {Pa}."),
    "count": ("{Pa} with {S}.", "There {be} {S} {in} {Pt}.", "{S} {be} {verb} {in} {Pt}.",
              "{in} {Pt}, there {be} {S}.", "{S} can be seen {in} {Pt}.", "This is {Pa} with {S}.",
              "An aerial view of {Pa} with {S}."),
    "split": ("{Pa} with {S}.", "There are {S} {in} {Pt}.", "{S} are {verb} {in} {Pt}.",
              "{in} {Pt} we can see {S}."),
    "region": ("{S} {be} {verb} {R}.", "{R}, there {be} {S}.", "{Pa} with {S} {R}.",
               "{S} {be} {R} of the image.", "{R} of {Pt}, there {be} {S}."),
    "near": ("{S} {be} {verb} beside {O}.", "{S} {be} next to {O}.", "Beside {O}, there {be} {S}.",
             "{Pa} with {S} near {O}.", "{S} {be} {verb} close to {O}."),
    "left_of": ("{S} {be} to the left of {O}.", "{S} {be} on the left of {O}.",
                "To the left of {O}, there {be} {S}."),
    "right_of": ("{S} {be} to the right of {O}.", "{S} {be} on the right of {O}.",
                 "To the right of {O}, there {be} {S}."),
    "above": ("{S} {be} above {O}.", "{S} {be} {verb} above {O} in the image.",
              "Above {O}, there {be} {S}."),
    "below": ("{S} {be} below {O}.", "{S} {be} {verb} below {O} in the image.",
              "Below {O}, there {be} {S}."),
    "surrounded": ("{S} {be} surrounded by {O}.", "{Pa} with {S} surrounded by {O}.",
                   "{S} {be} {verb} among {O}."),
    "along": ("{S} {be} {verb} along {O}.", "Along {O}, there {be} {S}.", "{Pa} with {S} along {O}."),
    "crosses": ("{S} crosses {O}.", "{S} spans {O}.", "{Pa} where {S} crosses {O}."),
    "enclosed": ("{S} {be} surrounded by {O}.", "{S} lies in the middle of {O}.",
                 "{S} {be} {verb} deep in {O}."),
    "through": ("{S} runs through {O}.", "{S} winds through {O}.", "{O} is crossed by {S}."),
    "full": ("{O} is almost full of {S}.", "{O} is packed with {S}.", "{S} fill {O}."),
    "empty": ("{O} is nearly empty, with only {S}.", "Only {S} {be} parked in {O}."),
}
ON_TEMPLATES = {
    "parking_lot": ("{S} {be} parked in {O}.", "{O} holds {S}.", "{Pa} with {S} parked in {O}."),
    "road": ("{S} {be} driving on {O}.", "{S} {be} on {O}."),
    "freeway": ("{S} {be} driving on {O}.", "{S} {be} running on {O}.", "{Pa} with {S} on {O}."),
    "overpass": ("{S} {be} crossing {O}.", "{S} {be} driving over {O}."),
    "runway": ("{S} {be} on {O}.", "{S} {be} {verb} on {O}."),
    "sea": ("{S} {be} sailing on {O}.", "{S} {be} floating on {O}."),
    "river": ("{S} {be} sailing on {O}.", "{S} {be} floating on {O}."),
    "water": ("{S} {be} floating on {O}.", "{S} {be} {verb} in {O}."),
}


def _fill(template: str, slots: dict) -> tuple[str, list[Phrase]]:
    """Substitute ``{name}`` slots. An NP slot becomes a Phrase; a list of NPs is joined
    "A, B and C" with one Phrase each. The first letter of the sentence is capitalised."""
    pieces: list[tuple[str, tuple[int, ...] | None]] = []
    pos = 0
    for m in re.finditer(r"\{(\w+)\}", template):
        pieces.append((template[pos:m.start()], None))
        val = slots[m.group(1)]
        if isinstance(val, NP):
            pieces.append((val.text, val.ids))
        elif isinstance(val, list):
            for k, np_ in enumerate(val):
                if k:
                    pieces.append((" and " if k == len(val) - 1 else ", ", None))
                pieces.append((np_.text, np_.ids))
        else:
            pieces.append((str(val), None))
        pos = m.end()
    pieces.append((template[pos:], None))
    pieces = [p for p in pieces if p[0]]
    first = pieces[0]
    pieces[0] = (first[0][:1].upper() + first[0][1:], first[1])
    raw, phrases, at = "", [], 0
    for text, ids in pieces:
        if ids:
            phrases.append(Phrase(text, at, at + len(text), ids))
        raw += text
        at += len(text)
    return raw, phrases


def _intro(view: SceneView, rng, area_only: bool, avoid: set[int]):
    """The scene's name (indefinite, definite, preposition). It is a phrase when it names
    an object, unless ``area_only`` or that object is already in the sentence (``avoid``)."""
    options = []
    for ia, it, cat, prep in INTROS[view.layout.scene_type]:
        if cat is None:
            options.append((ia, it, prep))
        elif not area_only and len(view.of(cat)) == 1 and view.of(cat)[0].id not in avoid:
            ids = (view.of(cat)[0].id,)
            options.append((NP(ia, ids, False), NP(it, ids, False), prep))
    return options[int(rng.integers(len(options)))]


def _verb(view: SceneView, objs: list[SceneObject], rng) -> str:
    cat = objs[0].category
    if cat == "car" and any(view.on(o, s) for o in objs
                            for s in view.of("road") + view.of("freeway") + view.of("overpass")):
        cat = "moving_car"
    return _choice(rng, VERBS.get(cat, ("located", "situated")))


def realise(fact: Fact, view: SceneView, rng: np.random.Generator) -> tuple[str, list[Phrase]]:
    """One sentence for one fact, with a random template and random wording."""
    objs = [view.objects[i] for i in fact.subject]
    kind = fact.kind
    named = set(fact.subject) | set(fact.other)
    if kind == "count" and len(objs) == 1 and objs[0].category in MAIN_SELF:
        # the scene's own main object (a river, a forest): name it with its attributes
        slots = {"Pa": noun_phrase(view, objs, rng, definite=False)}
        return _fill(_choice(rng, TEMPLATES["scene"]), slots)
    if kind == "scene":
        pa, _, _ = _intro(view, rng, False, set())
        return _fill(_choice(rng, TEMPLATES["scene"]), {"Pa": pa})
    if kind == "on":
        template = _choice(rng, ON_TEMPLATES[view.objects[fact.other[0]].category])
    else:
        template = _choice(rng, TEMPLATES[kind])
    pa, pt, prep = _intro(view, rng, "{Pt}" in template, named)
    slots: dict = {"Pa": pa, "Pt": pt, "in": prep, "verb": _verb(view, objs, rng)}
    # "there is the X" reads badly: existential templates take an indefinite subject
    definite = False if "there {be} {s}" in template.lower() else None
    if kind == "split":
        by = fact.detail
        slots["S"] = [noun_phrase(view, [view.objects[i] for i in g], rng, colour=(by == "colour"),
                                  size=(by == "size"), definite=False) for g in fact.groups]
        return _fill(template, slots)
    others = [view.objects[i] for i in fact.other]
    # two things of one kind ("a large tank left of a small tank"): say what tells them apart
    force: dict = {}
    if others and len(objs) == 1 and objs[0].category == others[0].category:
        a, b = objs[0], others[0]
        if a.colour != b.colour and a.category in COLOURED:
            force["colour"] = True
        if a.size != b.size and a.category in SIZED:
            force["size"] = True
    if kind == "full":
        subj = NP(_choice(rng, ("cars", "vehicles", "parked cars")), fact.subject, True)
    else:
        subj = noun_phrase(view, objs, rng, definite=definite, **force)
    slots["S"] = subj
    slots["be"] = "are" if subj.plural else "is"
    if others:
        slots["O"] = noun_phrase(view, others, rng, **force,
                                 definite=True if kind in ("enclosed", "through") else None)
    if kind == "region":
        x, y = map(int, fact.detail.split(","))
        slots["R"] = _choice(rng, REGIONS[(x, y)])
    return _fill(template, slots)


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


# How much each kind of fact is favoured for captions 2..5 (the first is the main count).
FACT_WEIGHTS = {"count": 1.0, "split": 2.5, "region": 2.0, "near": 3.0, "left_of": 1.5,
                "right_of": 1.5, "above": 1.5, "below": 1.5, "surrounded": 2.5, "along": 2.5,
                "on": 2.0, "crosses": 3.0, "through": 3.0, "enclosed": 3.0, "full": 3.0,
                "empty": 3.0, "scene": 0.3}


# Facts per caption. A single fact ("There is a white terminal at the airport.") is true of
# about eight of the 225 tiles in a test split, so no reader, however good, could tell its
# tile from the others (the content oracle of envlf.world.truth, a perfect reader of nouns,
# numbers, colours and sizes: mR 55.6 with one-fact captions, 67.0 with two). Two facts, two
# short sentences, narrow a caption down to its tile the way a RSITMD caption's details do.
FACTS_PER_CAPTION = 2
MAX_WORDS = 26  # two sentences stay inside the text model's 40 word pieces


def _partner(first: Fact, chosen: list[Fact], used: set[int], view: SceneView) -> Fact | None:
    """The fact to say after ``first``: the earliest in ``chosen`` not yet used as a second
    fact, preferring one about other objects (it adds more), never a bare scene fact."""
    cat = view.objects[first.subject[0]].category if first.subject else None
    candidates = [(k, f) for k, f in enumerate(chosen) if f is not first and f.kind != "scene"]
    for k, f in candidates:
        if k not in used and (not f.subject or view.objects[f.subject[0]].category != cat):
            used.add(k)
            return f
    for k, f in candidates:
        if k not in used:
            used.add(k)
            return f
    return candidates[0][1] if candidates else None


def _join(a: tuple[str, list[Phrase]], b: tuple[str, list[Phrase]]) -> tuple[str, list[Phrase]]:
    """Two sentences -> one caption; the second's phrase spans shift with it."""
    shift = len(a[0]) + 1
    return f"{a[0]} {b[0]}", a[1] + [Phrase(p.text, p.start + shift, p.end + shift, p.object_ids) for p in b[1]]


def caption_scene(layout: Layout, mask: np.ndarray, rng: np.random.Generator,
                  n: int = 5) -> list[Caption]:
    """``n`` distinct true captions of one rendered scene.

    Each caption says FACTS_PER_CAPTION facts, one short sentence each (one where the tile
    has too few facts or two would be too long). The first caption opens with the scene's
    main subject (its planes, its tanks ...); the others draw facts in a weighted random
    order that favours relations and details, each worded by a random template.
    ``layout`` must have been measured against ``mask`` (as `render_scene` returns them)."""
    view = SceneView(layout, mask)
    facts = scene_facts(view)
    main = next((c for c in MAIN[layout.scene_type] if view.of(c)), None)
    first = [f for f in facts if f.kind == "count" and main
             and view.objects[f.subject[0]].category == main][:1]
    rest = [f for f in facts if not (first and f is first[0])]
    w = np.array([FACT_WEIGHTS[f.kind] for f in rest], float)
    # weighted order without replacement: relations and details before bare counts
    order = rng.choice(len(rest), size=len(rest), replace=False, p=w / w.sum())
    chosen = first + [rest[int(i)] for i in order]
    out: list[Caption] = []
    seen: set[str] = set()
    used: set[int] = set()

    def say(fact: Fact) -> None:
        if len(out) >= n:
            return
        text, said = realise(fact, view, rng), [fact]
        other = _partner(fact, chosen, used, view) if FACTS_PER_CAPTION > 1 and fact.kind != "scene" else None
        if other is not None:
            joined = _join(text, realise(other, view, rng))
            if len(tokenize(joined[0])) <= MAX_WORDS:
                text, said = joined, [fact, other]
        if text[0] not in seen:
            seen.add(text[0])
            out.append(Caption(text[0], text[1], said))

    for fact in chosen:  # each fact once as an opening, then re-worded ones
        say(fact)
    for _ in range(8 * n):
        if len(out) >= n:
            break
        say(chosen[int(rng.integers(len(chosen)))])
    scene = Fact("scene")
    for template in TEMPLATES["scene"]:  # last resort: every plain wording of the scene
        for intro in INTROS[layout.scene_type]:
            if len(out) < n and (raw := _fill(template, {"Pa": intro[0]}))[0] not in seen:
                seen.add(raw[0])
                out.append(Caption(raw[0], raw[1], [scene]))
    return out
