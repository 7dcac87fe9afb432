"""Scene layouts: what is where in one synthetic aerial tile, before anything is drawn.

A layout is a list of `SceneObject` (every nameable thing: plane, house, river, field …,
each with an id, a category, a colour *name*, a size class and a polygon footprint) plus
unlabelled ground `Patch`es (lawns, tracks, sidewalks). Captions are written from the
layout and the rendered mask, never from the pixels, so they are true by construction.

Each scene type has a builder working in a canonical frame (runway horizontal, water at
the bottom …); `build_layout` then applies a random symmetry of the square, so one builder
gives eight orientations. The builders randomise counts, colours, sizes, positions and
which secondary objects appear, so that telling two tiles of one type apart takes the
details of a caption, not just its scene word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import geometry as G
from .geometry import SIZE

SCENE_TYPES: tuple[str, ...] = (
    "airport", "harbor", "dense_residential", "sparse_residential", "industrial",
    "farmland", "beach", "river", "parking_lot", "tennis_court", "baseball_diamond",
    "forest", "storage_tanks", "freeway", "overpass", "golf_course",
)

# Shadow-casting objects are drawn after the flat ground and after the shadows.
RAISED_Z = 50

# Colour names an object can have, by category, with relative weights. These names are
# the only colour words captions use, so they must read true on the rendered tile.
PALETTES: dict[str, tuple[tuple[str, float], ...]] = {
    "plane": (("white", 7), ("grey", 3), ("blue", 1), ("red", 1), ("yellow", 0.5)),
    "terminal": (("white", 1), ("grey", 1)),
    "building": (("white", 4), ("grey", 4), ("blue", 1), ("beige", 1.5), ("brown", 1)),
    "house": (("red", 3), ("grey", 4), ("brown", 3), ("white", 1.5), ("black", 1.5), ("beige", 1)),
    "ship": (("red", 2), ("blue", 2), ("grey", 2), ("black", 1), ("green", 1)),
    "boat": (("white", 8), ("blue", 1), ("red", 1), ("yellow", 0.5), ("grey", 1)),
    "storage_tank": (("white", 6), ("grey", 3), ("beige", 1), ("green", 0.5)),
    "car": (("white", 4), ("black", 3), ("grey", 4), ("red", 1.5), ("blue", 1.5)),
    "tennis_court": (("green", 4), ("blue", 3), ("red", 2)),
    "field": (("green", 4), ("yellow", 2), ("brown", 3)),
    "lake": (("blue", 2), ("green", 2)),
    "river": (("blue", 2), ("green", 2), ("brown", 1)),
    "pier": (("white", 2), ("grey", 2), ("brown", 1)),
}

# (lo, hi) of the characteristic length (px) per category: the lower third of the range
# is "small", the upper third "large". Captions only ever say "small" / "large".
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "plane": (36, 80), "ship": (55, 110), "boat": (14, 34), "storage_tank": (20, 64),
    "house": (18, 40), "building": (40, 110), "tree": (9, 28), "car": (12, 16),
    "tennis_court": (60, 80), "swimming_pool": (12, 24), "lake": (40, 120),
    "river": (20, 56), "field": (50, 200), "terminal": (100, 220), "bunker": (12, 34),
    "putting_green": (18, 34), "pier": (70, 170), "parking_lot": (80, 256),
    "baseball_field": (110, 170), "fairway": (30, 60), "road": (12, 24),
}


@dataclass
class SceneObject:
    """One nameable thing in a tile; its id is its pixel value in the instance mask."""

    id: int
    category: str
    colour: str  # caption colour name, e.g. "white"
    size: str  # "small" | "medium" | "large", relative to its category
    footprint: np.ndarray  # (K, 2) polygon, image px (x right, y down)
    height: float = 0.0  # px; > 0: raised, casts a shadow along the scene's sun
    centre: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0  # heading of the long axis / nose / bow (rad, image frame)
    length: float = 0.0  # px along `angle`
    width: float = 0.0  # px across
    style: str = ""  # render variant ("gable", "cargo", …)
    params: dict = field(default_factory=dict)  # render data; ndarray values are points
    z: int = 10  # draw order; >= RAISED_Z means raised
    bbox: list[int] | None = None  # visible [x0, y0, x1, y1), set after rendering
    area: int = 0  # visible pixels, set after rendering

    def to_json(self) -> dict:
        return {"id": self.id, "category": self.category, "colour": self.colour,
                "size": self.size, "bbox": list(self.bbox or [0, 0, 0, 0])}


@dataclass
class Patch:
    """Unlabelled ground (lawn, track, sidewalk): drawn, but mask 0 beneath it."""

    polygon: np.ndarray  # (K, 2)
    kind: str  # texture kind, see render.TEXTURES
    z: int = 5


@dataclass
class Layout:
    scene_type: str
    ground: str  # texture kind of the base ground
    objects: list[SceneObject]
    patches: list[Patch]
    sun: float  # direction shadows fall (rad, image frame)
    shadow_scale: float  # shadow length per px of object height (sun elevation)

    def by_category(self, category: str) -> list[SceneObject]:
        return [o for o in self.objects if o.category == category]


def size_of(category: str, value: float) -> str:
    lo, hi = SIZE_RANGES[category]
    t = (value - lo) / (hi - lo)
    return "small" if t < 1 / 3 else "large" if t > 2 / 3 else "medium"


def pick(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    names = [n for n, _ in options]
    w = np.array([w for _, w in options], float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


class SceneBuilder:
    """Collects objects and patches for one tile and keeps them from overlapping.

    ``occ`` (S, S) marks pixels already taken by raised objects (plus clearance), so a new
    house never lands on a tree; ``regions`` are named boolean masks (water, apron …) that
    restrict where a kind of object may go.
    """

    def __init__(self, scene_type: str, rng: np.random.Generator):
        self.scene_type = scene_type
        self.rng = rng
        self.objects: list[SceneObject] = []
        self.patches: list[Patch] = []
        self.occ = np.zeros((SIZE, SIZE), bool)
        self.ground = "grass"

    def by(self, category: str) -> list[SceneObject]:
        return [o for o in self.objects if o.category == category]

    # -- regions and collisions ---------------------------------------------------------
    @staticmethod
    def region(*polys: np.ndarray) -> np.ndarray:
        """Full-tile boolean mask of the union of polygons."""
        m = np.zeros((SIZE, SIZE), bool)
        for p in polys:
            m |= G.raster(p, (0, 0, SIZE, SIZE))
        return m

    def fits(self, poly: np.ndarray, margin: int = 2, region: np.ndarray | None = None,
             inside: bool = True) -> bool:
        """True if ``poly`` (grown by ``margin``) hits nothing placed and lies in ``region``.

        ``inside`` demands the whole shape within the tile, for anything a caption counts;
        otherwise only its centre must be inside."""
        x0, y0, x1, y1 = G.bbox(poly, pad=margin, clip=False)
        if inside and (x0 < 0 or y0 < 0 or x1 > SIZE or y1 > SIZE):
            return False
        c = poly.mean(axis=0)
        if not (0 <= c[0] < SIZE and 0 <= c[1] < SIZE):
            return False
        box = G.bbox(poly, pad=margin)
        bx0, by0, bx1, by1 = box
        if bx1 <= bx0 or by1 <= by0:
            return False
        # fast paths on the bounding box before rasterising the exact shape
        reg = region[by0:by1, bx0:bx1] if region is not None else None
        if reg is not None and not reg.any():
            return False
        if not self.occ[by0:by1, bx0:bx1].any() and (reg is None or reg.all()):
            return True
        grown = G.raster(poly, box, grow=margin)
        if (self.occ[by0:by1, bx0:bx1] & grown).any():
            return False
        if region is not None:
            core = G.raster(poly, box)
            if not region[by0:by1, bx0:bx1][core].all():
                return False
        return True

    def occupy(self, poly: np.ndarray, margin: int = 0) -> None:
        box = G.bbox(poly, pad=margin)
        x0, y0, x1, y1 = box
        if x1 > x0 and y1 > y0:
            self.occ[y0:y1, x0:x1] |= G.raster(poly, box, grow=margin)

    # -- adding things ------------------------------------------------------------------
    def add(self, category: str, footprint: np.ndarray, *, colour: str, size_value: float,
            height: float = 0.0, centre=None, angle: float = 0.0, length: float = 0.0,
            width: float = 0.0, style: str = "", z: int | None = None, block: bool | None = None,
            **params) -> SceneObject:
        """Register an object. Raised objects (height > 0) block later placements."""
        footprint = np.asarray(footprint, float)
        if centre is None:
            centre = tuple(footprint.mean(axis=0))
        obj = SceneObject(
            id=len(self.objects) + 1, category=category, colour=colour,
            size=size_of(category, size_value) if category in SIZE_RANGES else "medium",
            footprint=footprint, height=height, centre=(float(centre[0]), float(centre[1])),
            angle=angle, length=length, width=width, style=style, params=params,
            z=z if z is not None else (RAISED_Z + 10 if height > 0 else 10),
        )
        self.objects.append(obj)
        if block if block is not None else height > 0:
            self.occupy(footprint)
        return obj

    def patch(self, polygon: np.ndarray, kind: str, z: int = 5) -> None:
        self.patches.append(Patch(np.asarray(polygon, float), kind, z))

    def place(self, make: Callable[[], tuple[np.ndarray, dict]], tries: int = 40,
              margin: int = 2, region: np.ndarray | None = None, inside: bool = True,
              **fixed) -> SceneObject | None:
        """Rejection-sample a placement: ``make()`` proposes (footprint, add-kwargs)."""
        for _ in range(tries):
            poly, kw = make()
            if self.fits(poly, margin, region, inside):
                kw = {**kw, **fixed}
                return self.add(kw.pop("category"), poly, **kw)
        return None

    # -- common objects -------------------------------------------------------------------
    def tree(self, region=None, inside=False, r=None, tries=15, margin=0) -> SceneObject | None:
        rng = self.rng

        def make():
            rad = r if r is not None else rng.uniform(4.5, 11)
            cx, cy = rng.uniform(0, SIZE, 2)
            poly = G.blob(rng, cx, cy, rad, wobble=0.18, n=20)
            return poly, dict(category="tree", colour="green", size_value=2 * rad,
                              height=rad * 1.6, length=2 * rad, width=2 * rad,
                              centre=(cx, cy), z=RAISED_Z + 30)
        return self.place(make, tries=tries, margin=margin, region=region, inside=inside)

    def trees(self, n: int, region=None, inside=False, clump: float = 0.0) -> list[SceneObject]:
        """Up to ``n`` trees; with ``clump`` > 0 some grow next to earlier ones."""
        out: list[SceneObject] = []
        for _ in range(n):
            if out and self.rng.random() < clump:
                base = out[int(self.rng.integers(len(out)))]
                rad = self.rng.uniform(4.5, 10)
                ang = self.rng.uniform(0, 2 * math.pi)
                d = base.length / 2 + rad + 0.5
                cx, cy = base.centre[0] + d * math.cos(ang), base.centre[1] + d * math.sin(ang)
                poly = G.blob(self.rng, cx, cy, rad, wobble=0.18, n=20)
                if self.fits(poly, 0, region, inside):
                    out.append(self.add("tree", poly, colour="green", size_value=2 * rad,
                                        height=rad * 1.6, length=2 * rad, width=2 * rad,
                                        centre=(cx, cy), z=RAISED_Z + 30))
                    continue
            t = self.tree(region=region, inside=inside)
            if t is not None:
                out.append(t)
        return out

    def car_at(self, cx: float, cy: float, angle: float, colour: str | None = None,
               region=None, margin: int = 1) -> SceneObject | None:
        rng = self.rng
        length = rng.uniform(12, 16)
        width = length * rng.uniform(0.42, 0.48)
        poly = G.rect(cx, cy, length, width, angle)
        if not self.fits(poly, margin, region, inside=True):
            return None
        return self.add("car", poly, colour=colour or pick(rng, PALETTES["car"]),
                        size_value=length, height=2.5, centre=(cx, cy), angle=angle,
                        length=length, width=width, z=RAISED_Z + 5)

    def cars_along(self, path: np.ndarray, n: int, offsets: list[float], region=None,
                   spacing: float = 20.0) -> list[SceneObject]:
        """Up to ``n`` cars driving along ``path`` in lanes at the given sideways offsets.

        A negative offset means the opposite carriageway, so the car faces backwards."""
        pts = G.resample(path, spacing)
        if len(pts) < 3:
            return []
        slots = [(i, off) for i in range(1, len(pts) - 1) for off in offsets]
        order = self.rng.permutation(len(slots))
        out: list[SceneObject] = []
        for k in order:
            if len(out) >= n:
                break
            i, off = slots[k]
            head = G.path_direction(pts, i)
            nx, ny = -math.sin(head), math.cos(head)
            jitter = self.rng.uniform(-spacing / 4, spacing / 4)
            cx = pts[i, 0] + nx * off + math.cos(head) * jitter
            cy = pts[i, 1] + ny * off + math.sin(head) * jitter
            car = self.car_at(cx, cy, head + (math.pi if off < 0 else 0.0), region=region)
            if car is not None:
                out.append(car)
        return out

    def road(self, path: np.ndarray, width: float, *, category: str = "road", lanes: int = 2,
             z: int = 12, colour: str = "grey", style: str = "asphalt", **params) -> SceneObject:
        poly = G.ribbon(path, width)
        return self.add(category, poly, colour=colour, size_value=width, length=0.0,
                        width=width, z=z, style=style, path=path, lanes=lanes, **params)

    def house(self, cx, cy, angle, length, depth, *, colour=None, region=None, inside=True,
              margin=2) -> SceneObject | None:
        rng = self.rng
        hl, hd = length / 2, depth / 2
        main = np.array([[-hl, -hd], [hl, -hd], [hl, hd], [-hl, hd]])
        if rng.random() < 0.3:  # L-shaped: a wing on the back of one end
            wl, wd = length * rng.uniform(0.35, 0.5), depth * rng.uniform(0.45, 0.7)
            if rng.random() < 0.5:  # wing at the +x end
                xa = hl - wl
                outline = [[-hl, -hd], [hl, -hd], [hl, hd + wd], [xa, hd + wd], [xa, hd], [-hl, hd]]
                wing = [[xa, hd], [hl, hd], [hl, hd + wd], [xa, hd + wd]]
            else:
                xb = -hl + wl
                outline = [[-hl, -hd], [hl, -hd], [hl, hd], [xb, hd], [xb, hd + wd], [-hl, hd + wd]]
                wing = [[-hl, hd], [xb, hd], [xb, hd + wd], [-hl, hd + wd]]
            poly = G.place(np.array(outline), cx, cy, angle)
            parts = np.stack([G.place(main, cx, cy, angle), G.place(np.array(wing), cx, cy, angle)])
        else:
            poly = G.place(main, cx, cy, angle)
            parts = poly[None]
        if not self.fits(poly, margin, region, inside):
            return None
        roof = "gable" if rng.random() < 0.6 else "hip"
        return self.add("house", poly, colour=colour or pick(rng, PALETTES["house"]),
                        size_value=max(length, depth), height=rng.uniform(5, 8),
                        centre=(cx, cy), angle=angle, length=length, width=depth,
                        style=roof, parts=parts)  # parts: (P, 4, 2) roof rectangles

    def finish(self, sun: float, shadow_scale: float, turn: int) -> Layout:
        """Turn/mirror the whole scene by symmetry ``turn`` (0..7) and freeze it."""
        for o in self.objects:
            o.footprint = G.dihedral(o.footprint, turn)
            o.centre = tuple(G.dihedral(np.array([o.centre]), turn)[0])
            o.angle = G.dihedral_angle(o.angle, turn)
            for k, v in list(o.params.items()):
                if isinstance(v, np.ndarray) and v.ndim >= 2 and v.shape[-1] == 2:
                    o.params[k] = G.dihedral(v.reshape(-1, 2), turn).reshape(v.shape)
        for p in self.patches:
            p.polygon = G.dihedral(p.polygon, turn)
        return Layout(self.scene_type, self.ground, self.objects, self.patches, sun, shadow_scale)


# ---------------------------------------------------------------------------------------
# Scene builders: each fills a SceneBuilder in the canonical frame.
# ---------------------------------------------------------------------------------------

def _airport(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = "grass"
    has_runway = rng.random() < 0.65
    has_terminal = rng.random() < 0.75
    top = rng.uniform(34, 56) if has_terminal else rng.uniform(-10, 20)
    bottom = SIZE - (rng.uniform(52, 70) if has_runway else rng.uniform(-10, 30))
    apron = np.array([[-5, top - 8], [SIZE + 5, top - 8], [SIZE + 5, bottom], [-5, bottom]])
    b.patch(apron, "concrete", z=2)
    apron_mask = b.region(apron)
    if has_runway:
        rw = rng.uniform(34, 46)
        y = bottom + rng.uniform(10, 14) + rw / 2
        path = G.line_across(0.0, y - SIZE / 2)
        b.patch(G.ribbon(G.line_across(0.0, bottom + 4 - SIZE / 2), 8), "asphalt", z=3)
        b.road(path, rw, category="runway", lanes=1, style="runway", z=12,
               threshold=bool(rng.random() < 0.5), colour="grey")
    if has_terminal:
        x0 = rng.uniform(-20, 60)
        x1 = min(SIZE + 20, x0 + rng.uniform(130, 230))
        depth = top - rng.uniform(-10, 4)
        y0 = top - depth
        poly = np.array([[x0, y0], [x1, y0], [x1, top], [x0, top]])
        units = np.stack([rng.uniform(x0 + 8, x1 - 8, 8), rng.uniform(y0 + 6, top - 6, 8)], 1)
        b.add("terminal", poly, colour=pick(rng, PALETTES["terminal"]), size_value=x1 - x0,
              height=rng.uniform(10, 16), angle=0.0, length=x1 - x0, width=depth,
              style=str(rng.choice(["flat", "ribbed"])), units=units, z=RAISED_Z)
    n = int(rng.choice([1, 2, 2, 3, 3, 4, 4, 5, 6]))
    fleet = pick(rng, PALETTES["plane"])
    length_base = rng.uniform(38, 74)
    nose_in = has_terminal and rng.random() < 0.7
    park_angle = rng.uniform(0, 2 * math.pi) if rng.random() < 0.6 else None
    xs = rng.uniform(0, SIZE)
    for i in range(n):
        colour = fleet if rng.random() < 0.7 else pick(rng, PALETTES["plane"])

        def make(i=i, colour=colour):
            length = float(np.clip(length_base * rng.uniform(0.8, 1.2), 36, 80))
            if nose_in:
                ang = -math.pi / 2 + rng.uniform(-0.08, 0.08)
                cx = (xs + i * (length + 6) + rng.uniform(-10, 10)) % SIZE
                cy = top + 6 + length / 2 + rng.uniform(0, 12)
            else:  # parked in a loose row, or (general aviation) every which way
                ang = park_angle + rng.uniform(-0.1, 0.1) if park_angle is not None \
                    else rng.uniform(0, 2 * math.pi)
                cx, cy = rng.uniform(20, SIZE - 20), rng.uniform(top + 20, bottom + 5)
            return _plane(rng, cx, cy, length, ang, colour)
        b.place(make, tries=60, margin=3, inside=True)
    for _ in range(int(rng.integers(0, 4))):  # service vehicles on the apron
        cx, cy = rng.uniform(10, SIZE - 10), rng.uniform(top + 6, bottom - 6)
        b.car_at(cx, cy, rng.uniform(0, 2 * math.pi), region=apron_mask)
    grass = ~apron_mask
    b.trees(int(rng.integers(0, 4)), region=grass)


def _plane(rng, cx, cy, length, angle, colour) -> tuple[np.ndarray, dict]:
    """Airliner silhouette, nose along +x in the local frame. Returns (footprint, kwargs)."""
    L = length
    span = L * rng.uniform(0.85, 1.05)
    fw = L * 0.095  # fuselage width
    sweep = L * rng.uniform(0.12, 0.2)
    root = L * 0.2  # wing chord at the root
    tip = root * 0.35
    wx = L * rng.uniform(0.02, 0.1)  # wing root leading edge, from the centre
    ts = span * 0.36  # tailplane span
    h = fw / 2
    local = np.array([
        [L / 2, 0], [L / 2 - fw * 0.9, -h], [wx, -h], [wx - sweep, -span / 2],
        [wx - sweep - tip, -span / 2], [wx - root, -h], [-L / 2 + L * 0.14, -h],
        [-L / 2 + L * 0.03, -ts / 2], [-L / 2 - L * 0.01, -ts / 2], [-L / 2, -h * 0.5],
        [-L / 2, h * 0.5], [-L / 2 - L * 0.01, ts / 2], [-L / 2 + L * 0.03, ts / 2],
        [-L / 2 + L * 0.14, h], [wx - root, h], [wx - sweep - tip, span / 2],
        [wx - sweep, span / 2], [wx, h], [L / 2 - fw * 0.9, h],
    ])
    poly = G.place(local, cx, cy, angle)
    engines = int(rng.choice([2, 2, 2, 4]))
    return poly, dict(category="plane", colour=colour, size_value=L, height=4.0,
                      centre=(cx, cy), angle=angle, length=L, width=span, style="airliner",
                      engines=engines, sweep=sweep, wx=wx, root=root,
                      tail=str(rng.choice(["same", "blue", "red", "dark"])), shadow="offset")


def _harbor(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = "concrete"
    quay = rng.uniform(40, 100)
    water = np.array([[-10, quay], [SIZE + 10, quay], [SIZE + 10, SIZE + 10], [-10, SIZE + 10]])
    b.add("water", water, colour=pick(rng, (("blue", 1), ("green", 1))),
          size_value=0, z=4, style="harbor")
    wmask = b.region(water)
    b.patch(np.array([[-10, quay - 5], [SIZE + 10, quay - 5], [SIZE + 10, quay], [-10, quay]]),
            "gravel", z=3)  # quay edge
    n_piers = int(rng.integers(1, 5))
    xs: list[float] = []
    for x in rng.permutation(np.arange(24, SIZE - 23, 8)):  # greedy, >= 48 px apart
        if len(xs) < n_piers and all(abs(x - o) >= 48 for o in xs):
            xs.append(float(x))
    pier_colour = pick(rng, PALETTES["pier"])
    piers = []
    for x in xs:
        length = rng.uniform(70, min(170, SIZE - quay - 10))
        w = rng.uniform(4.5, 7)
        poly = G.rect(x, quay - 2 + length / 2, length + 4, w, math.pi / 2)
        piers.append(b.add("pier", poly, colour=pier_colour, size_value=length, height=2.0,
                           angle=math.pi / 2, length=length, width=w, z=RAISED_Z))
    # boats moored along the piers, parallel to them
    n_boats = int(rng.integers(len(piers), 5 * len(piers) + 1))
    fleet = pick(rng, PALETTES["boat"])
    for _ in range(n_boats * 3):
        if len(b.by("boat")) >= n_boats:
            break
        p = piers[int(rng.integers(len(piers)))]
        side = rng.choice([-1, 1])
        L = rng.uniform(14, 34)
        W = L * rng.uniform(0.3, 0.4)
        cx = p.centre[0] + side * (p.width / 2 + W / 2 + 1.5)
        cy = rng.uniform(quay + L / 2 + 4, quay + p.length - L / 2)
        ang = math.pi / 2 if rng.random() < 0.5 else -math.pi / 2
        colour = fleet if rng.random() < 0.6 else pick(rng, PALETTES["boat"])
        poly = _hull(cx, cy, L, W, ang)
        if b.fits(poly, 1, wmask, inside=True):
            b.add("boat", poly, colour=colour, size_value=L, height=2.5, centre=(cx, cy),
                  angle=ang, length=L, width=W, style="boat", z=RAISED_Z + 5)
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):  # ships at the quay or at anchor
        def make():
            L = rng.uniform(55, 110)
            W = L * rng.uniform(0.16, 0.2)
            if rng.random() < 0.6:
                cx, cy, ang = rng.uniform(L / 2, SIZE - L / 2), quay + W / 2 + 3, rng.choice([0, math.pi])
            else:
                cx, cy = rng.uniform(40, SIZE - 40), rng.uniform(quay + 40, SIZE - 30)
                ang = rng.uniform(0, 2 * math.pi)
            return _ship(rng, cx, cy, L, W, float(ang))
        b.place(make, margin=4, region=wmask, inside=True)
    land = ~wmask
    for _ in range(int(rng.integers(0, 3))):
        _building(b, region=land, inside=False, max_len=90)
    for _ in range(int(rng.integers(0, 5))):
        b.car_at(rng.uniform(8, SIZE - 8), rng.uniform(6, quay - 6),
                 float(rng.choice([0, math.pi / 2])), region=land)


def _hull(cx, cy, L, W, angle) -> np.ndarray:
    local = np.array([[L / 2, 0], [L / 2 - L * 0.28, -W / 2], [-L / 2, -W / 2 * 0.85],
                      [-L / 2, W / 2 * 0.85], [L / 2 - L * 0.28, W / 2]])
    return G.place(local, cx, cy, angle)


def _ship(rng, cx, cy, L, W, angle) -> tuple[np.ndarray, dict]:
    return _hull(cx, cy, L, W, angle), dict(
        category="ship", colour=pick(rng, PALETTES["ship"]), size_value=L, height=5.0,
        centre=(cx, cy), angle=angle, length=L, width=W,
        style=str(rng.choice(["cargo", "tanker", "ferry"])), z=RAISED_Z + 5)


def _building(b: SceneBuilder, region=None, inside=True, max_len=110, min_len=40,
              colour=None, angle=0.0) -> SceneObject | None:
    rng = b.rng

    def make():
        L = rng.uniform(min_len, max_len)
        W = L * rng.uniform(0.45, 0.9)
        cx, cy = rng.uniform(0, SIZE, 2)
        poly = G.rect(cx, cy, L, W, angle)
        units = rng.uniform(-0.4, 0.4, size=(int(rng.integers(0, 7)), 2)) * [L, W]
        return poly, dict(category="building", colour=colour or pick(rng, PALETTES["building"]),
                          size_value=L, height=rng.uniform(9, 20), centre=(cx, cy), angle=angle,
                          length=L, width=W, style=str(rng.choice(["flat", "ribbed", "flat"])),
                          units=G.place(units, cx, cy, angle) if len(units) else np.zeros((0, 2)),
                          z=RAISED_Z)
    return b.place(make, tries=40, margin=6, region=region, inside=inside)


def _street_grid(b: SceneBuilder) -> list[SceneObject]:
    rng = b.rng
    roads = []
    ys = [rng.uniform(60, 110)]
    if rng.random() < 0.6:
        ys.append(ys[0] + rng.uniform(100, 130))
    for y in ys:
        w = rng.uniform(13, 18)
        b.patch(G.ribbon(G.line_across(0.0, y - SIZE / 2), w + 6), "concrete", z=11)
        roads.append(b.road(G.line_across(0.0, y - SIZE / 2), w, lanes=2, z=12))
    if rng.random() < 0.5:
        x = rng.uniform(50, 200)
        w = rng.uniform(13, 18)
        b.patch(G.ribbon(G.line_across(math.pi / 2, SIZE / 2 - x), w + 6), "concrete", z=11)
        roads.append(b.road(G.line_across(math.pi / 2, SIZE / 2 - x), w, lanes=2, z=13))
    return roads


def _dense_residential(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass"]))
    roads = _street_grid(b)
    road_mask = b.region(*[r.footprint for r in roads])
    b.occ |= _grow(road_mask, 4)
    palette_bias = pick(rng, PALETTES["house"])
    for r in roads:
        path = r.params["path"]
        head = G.path_direction(path, 0)
        nx, ny = -math.sin(head), math.cos(head)
        for side in (-1, 1):
            s = rng.uniform(-5, 10)
            pts = G.resample(path, 1.0)
            while s < len(pts) - 1:
                L = rng.uniform(18, 30)
                D = rng.uniform(15, 24)
                set_back = r.width / 2 + rng.uniform(6, 12) + D / 2
                p = pts[int(s + L / 2)] if int(s + L / 2) < len(pts) else pts[-1]
                cx, cy = p[0] + side * nx * set_back, p[1] + side * ny * set_back
                colour = palette_bias if rng.random() < 0.35 else None
                b.house(cx, cy, head + rng.uniform(-0.04, 0.04), L, D, colour=colour,
                        inside=False, margin=2)
                s += L + rng.uniform(4, 12)
    # back-yard houses, pools and trees fill what is left
    for _ in range(int(rng.integers(4, 12))):
        b.house(*rng.uniform(0, SIZE, 2), rng.uniform(-0.05, 0.05), rng.uniform(18, 28),
                rng.uniform(15, 22), inside=False, margin=3)
    for _ in range(int(rng.integers(0, 3))):
        _pool(b)
    b.trees(int(rng.integers(4, 16)), clump=0.4)
    for r in roads:
        b.cars_along(r.params["path"], int(rng.integers(0, 5)),
                     [r.width / 4, -r.width / 4], region=road_mask)


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    return G.dilate(mask, r)


def _pool(b: SceneBuilder, near: SceneObject | None = None) -> SceneObject | None:
    rng = b.rng

    def make():
        L = rng.uniform(12, 24)
        W = L * rng.uniform(0.45, 0.7)
        if near is not None:
            ang = rng.uniform(0, 2 * math.pi)
            d = max(near.length, near.width) / 2 + L / 2 + rng.uniform(3, 10)
            cx, cy = near.centre[0] + d * math.cos(ang), near.centre[1] + d * math.sin(ang)
        else:
            cx, cy = rng.uniform(0, SIZE, 2)
        a = near.angle if near is not None else rng.uniform(-0.1, 0.1)
        if rng.random() < 0.7:
            poly = G.rect(cx, cy, L, W, a)
        else:  # kidney / oval pools
            poly = G.blob(rng, cx, cy, W / 2, wobble=0.12, aspect=L / W, angle=a, n=28)
        return poly, dict(category="swimming_pool", colour="blue", size_value=L, centre=(cx, cy),
                          angle=a, length=L, width=W, z=30)
    return b.place(make, tries=30, margin=3, inside=True, block=True)


def _sparse_residential(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass", "grass"]))
    y = rng.uniform(90, 166)
    path = G.meander(rng, (-30, y), (SIZE + 30, y + rng.uniform(-40, 40)), rng.uniform(5, 30))
    w = rng.uniform(12, 16)
    road = b.road(path, w, lanes=2, z=12)
    road_mask = b.region(road.footprint)
    b.occ |= _grow(road_mask, 3)
    n = int(rng.integers(2, 8))
    houses = []
    for _ in range(n * 4):
        if len(houses) >= n:
            break
        i = int(rng.integers(3, len(path) - 3))
        head = G.path_direction(path, i)
        side = rng.choice([-1, 1])
        L, D = rng.uniform(24, 40), rng.uniform(18, 28)
        back = w / 2 + rng.uniform(14, 30) + D / 2
        cx = path[i, 0] - side * math.sin(head) * back
        cy = path[i, 1] + side * math.cos(head) * back
        h = b.house(cx, cy, head + rng.uniform(-0.1, 0.1), L, D, inside=True, margin=10)
        if h is not None:
            houses.append(h)
            drive = np.array([h.centre, path[i]])
            b.patch(G.ribbon(drive, 5), "concrete", z=11)
            if rng.random() < 0.4:
                b.car_at(*(np.array(h.centre) * 0.45 + path[i] * 0.55),
                         math.atan2(*(path[i] - np.array(h.centre))[::-1]), region=None)
    for h in houses:
        if rng.random() < 0.4:
            _pool(b, near=h)
    b.trees(int(rng.integers(6, 26)), clump=0.5)


def _industrial(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["soil", "concrete", "dry_grass"]))
    y = rng.uniform(20, 60)
    w = rng.uniform(14, 20)
    road = b.road(G.line_across(0.0, y - SIZE / 2), w, lanes=2, z=12)
    road_mask = b.region(road.footprint)
    b.occ |= _grow(road_mask, 3)
    if rng.random() < 0.5:
        _parking(b, x0=rng.uniform(-20, 120), y0=y + w / 2 + 4, cols=int(rng.integers(5, 12)),
                 rows=1, fill=rng.uniform(0.2, 0.8))
    colour = pick(rng, PALETTES["building"]) if rng.random() < 0.5 else None
    for _ in range(int(rng.integers(2, 6))):
        _building(b, inside=True, max_len=110, min_len=40, colour=colour)
    for _ in range(int(rng.choice([0, 0, 1, 2, 3]))):
        _tank(b, rng.uniform(20, 236), rng.uniform(70, 236), rng.uniform(10, 20))
    b.cars_along(road.params["path"], int(rng.integers(0, 5)), [w / 4, -w / 4], region=road_mask)
    b.trees(int(rng.integers(0, 8)), clump=0.5)


def _tank(b: SceneBuilder, cx, cy, r, colour=None, inside=True) -> SceneObject | None:
    poly = G.circle(cx, cy, r)
    if not b.fits(poly, 3, None, inside):
        return None
    return b.add("storage_tank", poly, colour=colour or pick(b.rng, PALETTES["storage_tank"]),
                 size_value=2 * r, height=r * 0.55 + 4, centre=(cx, cy), length=2 * r,
                 width=2 * r, style=str(b.rng.choice(["floating", "fixed"])), z=RAISED_Z)


def _parking(b: SceneBuilder, x0, y0, cols, rows, fill, stall_w=9.5, stall_d=18.0,
             aisle=22.0, lot=True) -> tuple[SceneObject | None, list[SceneObject]]:
    """Parking lot of ``rows`` double rows of ``cols`` stalls; ``fill`` of them taken."""
    rng = b.rng
    W = cols * stall_w + 8
    H = rows * (2 * stall_d + aisle) + aisle
    poly = np.array([[x0, y0], [x0 + W, y0], [x0 + W, y0 + H], [x0, y0 + H]])
    lines = []
    stalls = []
    for r in range(rows):
        ym = y0 + aisle + r * (2 * stall_d + aisle) + stall_d  # divider between the pair
        for c in range(cols + 1):
            x = x0 + 4 + c * stall_w
            lines.append([[x, ym - stall_d], [x, ym + stall_d]])
        lines.append([[x0 + 4, ym], [x0 + 4 + cols * stall_w, ym]])
        for c in range(cols):
            x = x0 + 4 + (c + 0.5) * stall_w
            stalls += [(x, ym - stall_d / 2, -math.pi / 2), (x, ym + stall_d / 2, math.pi / 2)]
    obj = None
    if lot:
        obj = b.add("parking_lot", poly, colour="grey", size_value=max(W, H), z=14,
                    style="asphalt", lines=np.array(lines, float).reshape(-1, 2, 2))
    cars = []
    for k in rng.permutation(len(stalls)):
        if rng.random() < fill:
            x, y, a = stalls[k]
            a += rng.uniform(-0.06, 0.06) + (math.pi if rng.random() < 0.5 else 0.0)
            car = b.car_at(x + rng.uniform(-0.7, 0.7), y + rng.uniform(-1.5, 1.5), a, margin=0)
            if car is not None:
                cars.append(car)
    if obj is not None:
        obj.params["stalls"] = len(stalls)
    return obj, cars


def _farmland(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = "soil"
    a = rng.uniform(-0.6, 0.6)
    u_cuts = np.sort(rng.uniform(-150, 150, size=int(rng.integers(1, 4))))
    u_edges = np.concatenate([[-260], u_cuts, [260]])
    crop = pick(rng, PALETTES["field"])
    for i in range(len(u_edges) - 1):
        v_cuts = np.sort(rng.uniform(-150, 150, size=int(rng.integers(0, 3))))
        v_edges = np.concatenate([[-260], v_cuts, [260]])
        for j in range(len(v_edges) - 1):
            gap = rng.uniform(2, 4)
            u0, u1 = u_edges[i] + gap, u_edges[i + 1] - gap
            v0, v1 = v_edges[j] + gap, v_edges[j + 1] - gap
            local = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]])
            poly = G.clip_to_tile(G.place(local, SIZE / 2, SIZE / 2, a))
            if len(poly) < 3 or G.polygon_area(poly) < 1200:
                continue
            colour = crop if rng.random() < 0.3 else pick(rng, PALETTES["field"])
            row_angle = a + (0 if rng.random() < 0.6 else math.pi / 2)
            b.add("field", poly, colour=colour, size_value=math.sqrt(G.polygon_area(poly)),
                  z=8, angle=row_angle, style=str(rng.choice(["rows", "rows", "rows", "plain"])),
                  spacing=float(rng.uniform(3, 7)))
    if rng.random() < 0.4:  # a farmstead: house, trees, a track
        cx, cy = rng.uniform(40, 216, 2)
        yard = G.blob(rng, cx, cy, rng.uniform(26, 36), wobble=0.15)
        b.patch(yard, str(rng.choice(["dry_grass", "soil"])), z=9)
        h = b.house(cx, cy, a, rng.uniform(24, 36), rng.uniform(18, 24), inside=True, margin=3)
        if h is not None:
            b.trees(int(rng.integers(2, 7)), region=b.region(yard), clump=0.6)
    if rng.random() < 0.5:  # a row of trees along a field edge
        v = rng.uniform(-100, 100)
        for t in np.arange(-180, 180, rng.uniform(13, 18)):
            p = G.place(np.array([[t, v]]), SIZE / 2, SIZE / 2, a)[0]
            rad = rng.uniform(5, 8)
            poly = G.blob(rng, p[0], p[1], rad, wobble=0.15, n=20)
            if b.fits(poly, 0, None, inside=False):
                b.add("tree", poly, colour="green", size_value=2 * rad, height=rad * 1.6,
                      length=2 * rad, width=2 * rad, centre=tuple(p), z=RAISED_Z + 30)


def _shoreline(rng, y, amp) -> np.ndarray:
    return G.meander(rng, (-30, y), (SIZE + 30, y + rng.uniform(-30, 30)), amp, waves=1.2)


def _beach(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass", "chaparral"]))
    shore = _shoreline(rng, rng.uniform(140, 190), rng.uniform(5, 20))
    sand_w = rng.uniform(50, 90)  # > 1.45 * (both meander amplitudes): the edges never cross
    inland = G.meander(rng, (-30, shore[0, 1] - sand_w), (SIZE + 30, shore[-1, 1] - sand_w),
                       rng.uniform(4, 14), n=len(shore), waves=2.5)
    sea = np.concatenate([shore, [[SIZE + 40, SIZE + 40], [-40, SIZE + 40]]])
    beach = np.concatenate([inland, shore[::-1]])
    b.add("beach", beach, colour=pick(rng, (("white", 1), ("beige", 2), ("yellow", 1))),
          size_value=0, z=6, style="sand")
    sea_obj = b.add("sea", sea, colour=pick(rng, (("blue", 2), ("green", 1))), size_value=0,
                    z=7, style="sea", shore=shore)
    sea_mask = b.region(sea_obj.footprint)
    # boats sit on open water below the shoreline's lowest point; a shore that meanders down to
    # the tile's bottom edge leaves no such water (uniform(lo, hi) with lo > hi raised here)
    boat_y0 = float(shore[:, 1].max()) + 20
    n_boats = int(rng.choice([0, 0, 1, 1, 2, 3]))
    for _ in range(n_boats if boat_y0 < 246 else 0):
        def make():
            L = rng.uniform(14, 30)
            cx, cy = rng.uniform(20, 236), rng.uniform(boat_y0, 246)
            ang = rng.uniform(0, 2 * math.pi)
            return _hull(cx, cy, L, L * 0.35, ang), dict(
                category="boat", colour=pick(rng, PALETTES["boat"]), size_value=L, height=2.5,
                centre=(cx, cy), angle=ang, length=L, width=L * 0.35, style="boat",
                z=RAISED_Z + 5, wake=True)
        b.place(make, margin=4, region=sea_mask, inside=True)
    land = ~b.region(np.concatenate([inland, [[SIZE + 40, SIZE + 40], [-40, SIZE + 40]]]))
    if rng.random() < 0.5:
        y = float(inland[:, 1].min()) - rng.uniform(14, 24)
        if y > 20:
            r = b.road(inland - [0, inland[:, 1].mean() - y], rng.uniform(11, 15), z=12)
            b.occ |= _grow(b.region(r.footprint), 3)
    for _ in range(int(rng.choice([0, 0, 1, 2, 3, 4]))):
        b.house(rng.uniform(20, 236), rng.uniform(10, 80), rng.uniform(-0.1, 0.1),
                rng.uniform(22, 34), rng.uniform(16, 24), region=land, inside=True, margin=4)
    b.trees(int(rng.integers(0, 12)), region=land, clump=0.3)


def _river(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass", "soil", "grass"]))
    y0, y1 = rng.uniform(70, 186, 2)
    path = G.meander(rng, (-40, y0), (SIZE + 40, y1), rng.uniform(10, 45), n=60)
    w = rng.uniform(20, 56)
    widths = w * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(2, 6), len(path))))
    b.patch(G.ribbon(path, widths + rng.uniform(8, 20)), str(rng.choice(["sand", "soil"])), z=6)
    river = b.add("river", G.ribbon(path, widths), colour=pick(rng, PALETTES["river"]),
                  size_value=w, z=8, width=w, style="river", path=path)
    rmask = b.region(river.footprint)
    bank = _grow(rmask, 10)
    b.occ |= bank
    if rng.random() < 0.45:  # a road crossing on a bridge
        x = rng.uniform(60, 196)
        ang = math.pi / 2 + rng.uniform(-0.35, 0.35)
        rpath = G.line_across(ang, 0) + [x - SIZE / 2, 0]
        rw = rng.uniform(12, 16)
        road = b.road(rpath, rw, z=12)
        over = rmask & b.region(road.footprint)
        ys = np.nonzero(over.any(axis=1))[0]
        if len(ys):
            ymid = (ys.min() + ys.max()) / 2
            span = ys.max() - ys.min() + 16
            t = (ymid - SIZE / 2) / math.sin(ang)
            cx, cy = SIZE / 2 + (x - SIZE / 2) + t * math.cos(ang), ymid
            deck = G.rect(cx, cy, span / abs(math.sin(ang)), rw + 4, ang)
            b.add("bridge", deck, colour=pick(rng, (("grey", 2), ("white", 1))), size_value=0,
                  height=6.0, angle=ang, centre=(cx, cy), length=span, width=rw + 4,
                  z=RAISED_Z, block=True)
        b.occ |= _grow(b.region(road.footprint), 3)
    for _ in range(int(rng.choice([0, 0, 0, 1, 2]))):
        i = int(rng.integers(5, len(path) - 5))
        head = G.path_direction(path, i)
        L = rng.uniform(14, min(30, w * 1.2))
        cx, cy = path[i] + rng.uniform(-w / 5, w / 5) * np.array([-math.sin(head), math.cos(head)])
        poly = _hull(cx, cy, L, L * 0.35, head)
        if b.fits(poly, 2, rmask, inside=True):
            b.add("boat", poly, colour=pick(rng, PALETTES["boat"]), size_value=L, height=2.5,
                  centre=(cx, cy), angle=head, length=L, width=L * 0.35, style="boat",
                  z=RAISED_Z + 5, wake=True)
    b.occ &= ~bank  # trees may grow on the banks, not in the water
    b.occ |= rmask
    near = _grow(rmask, 22) & ~rmask
    b.trees(int(rng.integers(4, 22)), region=near, clump=0.5)
    b.trees(int(rng.integers(0, 10)), clump=0.5)


def _parking_lot(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "concrete"]))
    rows = int(rng.integers(2, 5))
    cols = int(rng.integers(12, 27))
    W = cols * 9.5 + 8
    H = rows * 58 + 22
    x0 = rng.uniform(min(0, SIZE - W), max(0, SIZE - W))
    y0 = rng.uniform(-20, max(-20, SIZE - H + 10))
    fill = float(rng.choice([rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.7), rng.uniform(0.8, 0.97)]))
    lot, cars = _parking(b, x0, y0, cols, rows, fill)
    lot_mask = b.region(lot.footprint)
    b.occ |= _grow(lot_mask, 2) & ~lot_mask
    free = ~_grow(lot_mask, 4)
    if rng.random() < 0.5:
        _building(b, region=free, inside=False, max_len=120, min_len=50)
    b.trees(int(rng.integers(0, 12)), region=free, clump=0.5)


def _tennis_court(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "grass", "dry_grass"]))
    n = int(rng.choice([1, 1, 2, 2, 3, 4]))
    cw, ch = rng.uniform(34, 38), rng.uniform(64, 76)
    colour = pick(rng, PALETTES["tennis_court"])
    surround = pick(rng, (("green", 2), ("red", 1), ("dark", 1)))
    x0 = rng.uniform(6, SIZE - n * cw - 6)
    y0 = rng.uniform(6, SIZE - ch - 6)
    pad = np.array([[x0 - 3, y0 - 3], [x0 + n * cw + 3, y0 - 3],
                    [x0 + n * cw + 3, y0 + ch + 3], [x0 - 3, y0 + ch + 3]])
    b.patch(pad, "concrete", z=9)
    for i in range(n):
        cx, cy = x0 + (i + 0.5) * cw, y0 + ch / 2
        poly = G.rect(cx, cy, ch, cw, math.pi / 2)
        b.add("tennis_court", poly, colour=colour, size_value=ch, centre=(cx, cy),
              angle=math.pi / 2, length=ch, width=cw, z=20, surround=surround, block=True)
    b.occupy(pad, margin=4)
    for _ in range(int(rng.choice([0, 1, 2, 3]))):
        b.house(*rng.uniform(20, 236, 2), rng.uniform(-0.1, 0.1), rng.uniform(22, 34),
                rng.uniform(16, 24), inside=True, margin=4)
    if rng.random() < 0.35:
        px = rng.uniform(-40, 200)
        py = y0 + ch + 10 if y0 + ch + 80 < SIZE else y0 - 80
        _parking(b, px, py, int(rng.integers(4, 9)), 1, rng.uniform(0.2, 0.8))
    b.trees(int(rng.integers(4, 24)), clump=0.5)


def _baseball_diamond(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass"]))
    R = rng.uniform(110, 170)
    hx, hy = rng.uniform(40, 110), rng.uniform(SIZE - 110, SIZE - 40)
    t = np.linspace(-math.pi / 2, 0, 24)
    arc = np.stack([hx + R * np.cos(t), hy + R * np.sin(t)], axis=1)
    back = np.array([[hx - 8, hy + 8]])
    fan = np.concatenate([back, [[hx - 6, hy - R * 0.05]], arc, [[hx + R * 0.05, hy + 6]]])
    base = R * rng.uniform(0.24, 0.28)
    f = b.add("baseball_field", fan, colour="green", size_value=R, centre=(hx + R * 0.35, hy - R * 0.35),
              z=20, home=np.array([[hx, hy]]), first=np.array([[hx + base, hy]]),
              third=np.array([[hx, hy - base]]),
              dirt=str(rng.choice(["full", "skinned", "full"])), block=True)
    b.occupy(f.footprint, margin=6)
    if rng.random() < 0.35:  # a second, smaller field
        R2 = rng.uniform(80, 110)
        hx2, hy2 = rng.uniform(SIZE - 50, SIZE - 20), rng.uniform(30, 80)
        t2 = np.linspace(math.pi / 2, math.pi, 20)
        arc2 = np.stack([hx2 + R2 * np.cos(t2), hy2 + R2 * np.sin(t2)], axis=1)
        fan2 = np.concatenate([[[hx2 + 8, hy2 - 8]], arc2])
        if b.fits(fan2, 4, None, inside=False):
            base2 = R2 * 0.27
            b.add("baseball_field", fan2, colour="green", size_value=R2, z=20,
                  home=np.array([[hx2, hy2]]), first=np.array([[hx2 - base2, hy2]]),
                  third=np.array([[hx2, hy2 + base2]]), dirt="full", block=True)
    if rng.random() < 0.4:
        _parking(b, rng.uniform(120, 200), rng.uniform(150, 200), int(rng.integers(4, 8)), 1,
                 rng.uniform(0.2, 0.9))
    b.trees(int(rng.integers(3, 20)), clump=0.5)


def _forest(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = "soil"
    tile = np.array([[-2, -2], [SIZE + 2, -2], [SIZE + 2, SIZE + 2], [-2, SIZE + 2]])
    b.add("forest", tile, colour="green", size_value=0, z=3,
          style=str(rng.choice(["broadleaf", "conifer"])))
    if rng.random() < 0.55:
        path = G.meander(rng, (-30, rng.uniform(30, 226)), (SIZE + 30, rng.uniform(30, 226)),
                         rng.uniform(5, 30))
        dirt = bool(rng.random() < 0.5)
        road = b.road(path, rng.uniform(7, 11), z=12, style="dirt" if dirt else "asphalt",
                      colour="brown" if dirt else "grey", lanes=1)
        b.occ |= _grow(b.region(road.footprint), 3)
    n_open = int(rng.choice([0, 1, 1, 2, 2, 3]))
    for _ in range(n_open * 6):
        if n_open <= 0:
            break
        c = rng.uniform(40, 216, 2)
        r = rng.uniform(18, 42)
        poly = G.blob(rng, c[0], c[1], r, wobble=0.3)
        if not b.fits(poly, 6, None, inside=True):
            continue
        n_open -= 1
        kind = rng.random()
        if kind < 0.45:
            b.add("lake", poly, colour=pick(rng, PALETTES["lake"]), size_value=2 * r, z=9,
                  length=2 * r, width=2 * r, block=True)
        elif kind < 0.6 and r > 26:  # a small field cut out of the forest
            b.add("field", poly, colour=pick(rng, PALETTES["field"]), size_value=2 * r, z=9,
                  angle=rng.uniform(0, math.pi), style="rows", spacing=float(rng.uniform(3, 5)),
                  block=True)
        else:  # a clearing with a house or two
            b.patch(poly, str(rng.choice(["grass", "dry_grass"])), z=9)
            for _ in range(int(rng.choice([1, 1, 2, 3]))):
                ang = rng.uniform(0, 2 * math.pi)
                d = rng.uniform(0, r * 0.4)
                b.house(c[0] + d * math.cos(ang), c[1] + d * math.sin(ang), rng.uniform(0, math.pi),
                        rng.uniform(16, 26), rng.uniform(12, 18), region=b.region(poly),
                        inside=True, margin=2)
            b.occupy(poly)


def _storage_tanks(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["soil", "concrete", "dry_grass"]))
    if rng.random() < 0.6:
        x = rng.uniform(20, 236)
        r = b.road(G.line_across(math.pi / 2, SIZE / 2 - x), rng.uniform(12, 16), z=12)
        b.occ |= _grow(b.region(r.footprint), 4)
    colour = pick(rng, PALETTES["storage_tank"]) if rng.random() < 0.6 else None
    if rng.random() < 0.55:  # a regular grid of equal tanks inside a gravel bund
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 5))
        gap = rng.uniform(8, 16)
        rad = min(rng.uniform(11, 30), (SIZE - 40 - (cols - 1) * gap) / cols / 2,
                  (SIZE - 40 - (rows - 1) * gap) / rows / 2)
        pitch = 2 * rad + gap
        x0 = rng.uniform(rad + 10, SIZE - (cols - 1) * pitch - rad - 10)
        y0 = rng.uniform(rad + 10, SIZE - (rows - 1) * pitch - rad - 10)
        e = rad + 6
        bund = np.array([[x0 - e, y0 - e], [x0 + (cols - 1) * pitch + e, y0 - e],
                         [x0 + (cols - 1) * pitch + e, y0 + (rows - 1) * pitch + e],
                         [x0 - e, y0 + (rows - 1) * pitch + e]])
        b.patch(bund, "gravel", z=9)
        for i in range(rows):
            for j in range(cols):
                _tank(b, x0 + j * pitch, y0 + i * pitch, rad, colour=colour)
    n = int(rng.integers(1, 7)) if b.by("storage_tank") else int(rng.integers(2, 9))
    for _ in range(n * 4):
        if len(b.by("storage_tank")) >= 12 or n <= 0:
            break
        if _tank(b, *rng.uniform(16, 240, 2), rng.uniform(10, 32), colour=colour) is not None:
            n -= 1
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        _building(b, inside=True, max_len=70, min_len=40)
    b.trees(int(rng.integers(0, 6)), clump=0.4)


def _freeway_geometry(b: SceneBuilder, angle: float, offset: float):
    """Divided highway across the tile; returns (object, lane offsets from its axis)."""
    rng = b.rng
    lanes = int(rng.integers(2, 5))
    lane_w = rng.uniform(9, 11)
    median = rng.uniform(6, 18)
    cw = lanes * lane_w + 4  # carriageway width incl. shoulders
    path = G.line_across(angle, offset, n=8)
    total = 2 * cw + median
    b.patch(G.ribbon(path, total + 10), str(rng.choice(["concrete", "dry_grass"])), z=10)
    fw = b.road(path, total, category="freeway", lanes=lanes, z=12, style="freeway",
                lane_w=lane_w, median=median)
    offsets = []
    for k in range(lanes):
        o = median / 2 + 2 + (k + 0.5) * lane_w
        offsets += [o, -o]
    return fw, offsets


def _freeway(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass", "soil"]))
    angle = rng.uniform(0, math.pi)
    offset = rng.uniform(-40, 40)
    fw, offsets = _freeway_geometry(b, angle, offset)
    fmask = b.region(fw.footprint)
    b.cars_along(fw.params["path"], int(rng.choice([2, 4, 6, 8, 12, 18, 25])), offsets,
                 region=fmask, spacing=18)
    b.occ |= _grow(fmask, 6)
    if rng.random() < 0.4:  # frontage road
        side = float(rng.choice([-1, 1]))
        off = offset + side * (fw.width / 2 + rng.uniform(30, 50))
        r = b.road(G.line_across(angle, off), rng.uniform(11, 14), z=11)
        b.occ |= _grow(b.region(r.footprint), 3)
    for _ in range(int(rng.choice([0, 0, 2, 4]))):
        b.house(*rng.uniform(10, 246, 2), angle + rng.uniform(-0.05, 0.05), rng.uniform(22, 32),
                rng.uniform(16, 22), inside=True, margin=4)
    b.trees(int(rng.integers(2, 20)), clump=0.5)


def _overpass(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = str(rng.choice(["grass", "dry_grass", "soil"]))
    angle = rng.uniform(0, math.pi)
    fw, offsets = _freeway_geometry(b, angle, rng.uniform(-30, 30))
    cross = angle + math.pi / 2 + rng.uniform(-0.4, 0.4)
    w = rng.uniform(16, 24)
    path = G.line_across(cross, rng.uniform(-40, 40), n=8)
    b.patch(G.ribbon(path, w + 8), "concrete", z=11)
    deck = b.add("overpass", G.ribbon(path, w), colour=pick(rng, (("grey", 2), ("white", 1))),
                 size_value=0, height=9.0, width=w, style="deck", z=RAISED_Z, path=path,
                 lanes=2, block=True)
    dmask = b.region(deck.footprint)
    fmask = b.region(fw.footprint) & ~_grow(dmask, 6)
    b.cars_along(fw.params["path"], int(rng.choice([2, 4, 6, 10, 16])), offsets,
                 region=fmask, spacing=18)
    b.occ &= ~dmask
    b.cars_along(path, int(rng.integers(0, 4)), [w / 4, -w / 4], region=dmask, spacing=20)
    for c in b.by("car"):
        if dmask[int(np.clip(c.centre[1], 0, SIZE - 1)), int(np.clip(c.centre[0], 0, SIZE - 1))]:
            c.z = RAISED_Z + 20  # cars on the deck draw over it
    b.occ |= _grow(b.region(fw.footprint) | dmask, 6)
    b.trees(int(rng.integers(2, 18)), clump=0.5)


def _golf_course(b: SceneBuilder) -> None:
    rng = b.rng
    b.ground = "rough"
    p0 = (rng.uniform(-20, 60), rng.uniform(30, 226))
    p1 = (rng.uniform(180, 240), rng.uniform(30, 226))
    path = G.meander(rng, p0, p1, rng.uniform(5, 25), n=30, waves=0.8)
    w = rng.uniform(30, 60)
    widths = w * (0.8 + 0.3 * np.sin(np.linspace(0, math.pi, len(path))))
    fair = b.add("fairway", G.ribbon(path, widths), colour="green", size_value=w, z=8,
                 style="stripes", angle=G.path_direction(path, len(path) // 2), path=path)
    gr = rng.uniform(9, 17)
    gc = path[-1] + rng.uniform(-4, 4, 2)
    green = b.add("putting_green", G.blob(rng, gc[0], gc[1], gr, wobble=0.2), colour="green",
                  size_value=2 * gr, z=9, centre=tuple(gc), length=2 * gr, width=2 * gr,
                  block=True)
    b.occupy(green.footprint, margin=2)
    fmask = b.region(fair.footprint)
    n_bunkers = int(rng.choice([0, 1, 1, 2, 3, 4]))
    for _ in range(n_bunkers * 5):
        if len(b.by("bunker")) >= n_bunkers:
            break
        near = gc if rng.random() < 0.5 else path[int(rng.integers(5, len(path) - 5))]
        r = rng.uniform(6, 15)
        ang = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(gr + r, gr + r + 18)
        poly = G.blob(rng, near[0] + d * math.cos(ang), near[1] + d * math.sin(ang), r,
                      wobble=0.3, aspect=rng.uniform(1, 1.8), angle=rng.uniform(0, math.pi))
        if b.fits(poly, 2, None, inside=True):
            b.add("bunker", poly, colour=pick(rng, (("white", 2), ("beige", 1))),
                  size_value=2 * r, z=10, length=2 * r, width=2 * r, block=True)
    if rng.random() < 0.45:
        for _ in range(20):
            c = rng.uniform(30, 226, 2)
            r = rng.uniform(18, 34)
            poly = G.blob(rng, c[0], c[1], r, wobble=0.3)
            inter = b.region(poly) & fmask
            if inter.sum() < 40 and b.fits(poly, 4, None, inside=True):
                b.add("lake", poly, colour=pick(rng, PALETTES["lake"]), size_value=2 * r, z=9,
                      length=2 * r, width=2 * r, block=True)
                break
    b.occ |= fmask
    b.trees(int(rng.integers(6, 30)), clump=0.6)
    b.patch(G.ribbon(G.meander(rng, (-20, rng.uniform(0, 256)), (276, rng.uniform(0, 256)),
                                10), 4), "path", z=9)


BUILDERS: dict[str, Callable[[SceneBuilder], None]] = {
    "airport": _airport, "harbor": _harbor, "dense_residential": _dense_residential,
    "sparse_residential": _sparse_residential, "industrial": _industrial,
    "farmland": _farmland, "beach": _beach, "river": _river, "parking_lot": _parking_lot,
    "tennis_court": _tennis_court, "baseball_diamond": _baseball_diamond, "forest": _forest,
    "storage_tanks": _storage_tanks, "freeway": _freeway, "overpass": _overpass,
    "golf_course": _golf_course,
}
assert tuple(BUILDERS) == SCENE_TYPES


def build_layout(rng: np.random.Generator, scene_type: str | None = None) -> Layout:
    """Random layout of one tile of ``scene_type`` (random type if None)."""
    if scene_type is None:
        scene_type = SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]
    if scene_type not in BUILDERS:
        raise ValueError(f"unknown scene type {scene_type!r}; choose from {', '.join(SCENE_TYPES)}")
    b = SceneBuilder(scene_type, rng)
    BUILDERS[scene_type](b)
    sun = float(rng.uniform(0, 2 * math.pi))
    shadow_scale = float(rng.uniform(0.5, 1.1))
    turn = int(rng.integers(8))
    return b.finish(sun, shadow_scale, turn)
