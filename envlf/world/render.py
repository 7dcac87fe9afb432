"""Drawing a layout as an aerial tile: ground textures, objects, shadows, sensor effects.

The canvas is a float32 (S, S, 3) array in [0, 1]; the instance mask an (S, S) int array
drawn with the *same* rasterised polygons, so a mask pixel is exactly where its object's
colour went. Order, bottom to top: base ground, flat items (patches and ground objects by
z), all shadows at once (one sun per scene), raised objects by z, then a random acquisition
per tile (`sensor`: exposure, white balance, saturation, haze, a brightness gradient, blur,
noise, JPEG) so that tiles differ as an archive's do and hard polygon edges read as imagery.

Textures are built from value noise (random grids upsampled bicubically by Pillow), which
is cheap and gives the multi-scale blotchiness of real fields, canopy and water.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import geometry as G
from .geometry import SIZE
from .scenes import RAISED_Z, Layout, Patch, SceneObject, build_layout

# Base colours (linear-ish RGB in [0, 1]) of the caption colour names.
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.90, 0.90, 0.88), "grey": (0.56, 0.57, 0.58), "black": (0.13, 0.13, 0.14),
    "red": (0.70, 0.18, 0.15), "blue": (0.20, 0.36, 0.66), "green": (0.26, 0.45, 0.22),
    "yellow": (0.86, 0.76, 0.26), "brown": (0.46, 0.33, 0.22), "beige": (0.80, 0.72, 0.57),
}
# Where a colour name looks different on a given material (a "red" roof is terracotta).
CATEGORY_COLOURS: dict[tuple[str, str], tuple[float, float, float]] = {
    ("house", "red"): (0.64, 0.30, 0.22), ("house", "grey"): (0.47, 0.48, 0.50),
    ("house", "brown"): (0.44, 0.32, 0.23), ("house", "black"): (0.20, 0.20, 0.21),
    ("house", "white"): (0.84, 0.83, 0.80), ("building", "white"): (0.86, 0.86, 0.84),
    ("building", "grey"): (0.60, 0.61, 0.62), ("building", "brown"): (0.52, 0.38, 0.28),
    ("building", "blue"): (0.36, 0.48, 0.66), ("tennis_court", "green"): (0.30, 0.52, 0.34),
    ("tennis_court", "blue"): (0.22, 0.40, 0.62), ("tennis_court", "red"): (0.66, 0.30, 0.22),
    ("field", "green"): (0.30, 0.44, 0.19), ("field", "yellow"): (0.74, 0.64, 0.38),
    ("field", "brown"): (0.47, 0.36, 0.25), ("tree", "green"): (0.17, 0.29, 0.12),
    ("swimming_pool", "blue"): (0.28, 0.66, 0.82), ("bunker", "white"): (0.92, 0.90, 0.84),
    ("bunker", "beige"): (0.86, 0.79, 0.63), ("beach", "white"): (0.90, 0.88, 0.82),
    ("beach", "beige"): (0.84, 0.77, 0.63), ("beach", "yellow"): (0.87, 0.77, 0.52),
    ("forest", "green"): (0.15, 0.27, 0.12), ("fairway", "green"): (0.40, 0.58, 0.26),
    ("putting_green", "green"): (0.42, 0.64, 0.30), ("road", "grey"): (0.33, 0.33, 0.34),
    ("road", "brown"): (0.55, 0.45, 0.34), ("freeway", "grey"): (0.40, 0.40, 0.40),
    ("runway", "grey"): (0.42, 0.42, 0.42), ("parking_lot", "grey"): (0.32, 0.32, 0.33),
    ("overpass", "grey"): (0.62, 0.62, 0.60), ("overpass", "white"): (0.78, 0.78, 0.76),
    ("bridge", "grey"): (0.60, 0.60, 0.58), ("bridge", "white"): (0.78, 0.78, 0.76),
    ("baseball_field", "green"): (0.34, 0.52, 0.22), ("pier", "brown"): (0.50, 0.40, 0.30),
    ("pier", "grey"): (0.60, 0.60, 0.60), ("pier", "white"): (0.82, 0.82, 0.80),
    ("terminal", "white"): (0.85, 0.85, 0.84), ("terminal", "grey"): (0.60, 0.61, 0.63),
    ("storage_tank", "beige"): (0.82, 0.76, 0.62), ("storage_tank", "green"): (0.40, 0.52, 0.36),
}
WATER = {"blue": (0.10, 0.21, 0.33), "green": (0.13, 0.26, 0.22), "brown": (0.30, 0.27, 0.18)}
GROUND = {  # texture kind -> base colour
    "grass": (0.33, 0.45, 0.22), "dry_grass": (0.60, 0.56, 0.40), "chaparral": (0.64, 0.56, 0.40),
    "soil": (0.56, 0.46, 0.35), "sand": (0.84, 0.78, 0.65), "concrete": (0.68, 0.68, 0.67),
    "asphalt": (0.30, 0.30, 0.31), "gravel": (0.62, 0.59, 0.54), "rough": (0.28, 0.41, 0.19),
    "path": (0.74, 0.73, 0.70),
}
SHADOW_TINT = np.array([0.36, 0.39, 0.47], np.float32)  # shadows are dark and bluish


@dataclass
class Ctx:
    """Per-scene drawing state: canvas, mask, sun, shared noise; nothing global."""

    rng: np.random.Generator
    canvas: np.ndarray  # (S, S, 3) float32
    mask: np.ndarray  # (S, S) int32 object ids
    sun: np.ndarray  # (2,) unit vector along which shadows fall
    fine: np.ndarray  # (S, S) float32 pixel-scale noise, ~N(0, 1)
    mid: np.ndarray  # (S + 128, S + 128) float32 noise at ~8 px scale
    low: np.ndarray  # (S + 128, S + 128) float32 noise at ~60 px scale
    small: np.ndarray  # (S, S) float32 noise at ~3 px scale (tufts, clods)
    textures: dict = field(default_factory=dict)

    @property
    def light(self) -> np.ndarray:  # direction towards the sun, image plane
        return -self.sun

    def crop(self, field_: np.ndarray) -> np.ndarray:
        """A random (S, S) window of one of the oversized shared noise fields."""
        y, x = self.rng.integers(0, field_.shape[0] - SIZE + 1, 2)
        return field_[y:y + SIZE, x:x + SIZE]

    def blotches(self) -> np.ndarray:
        """Fresh-looking multi-scale noise (S, S): random crops (and signs) of the shared
        oversized `low` / `mid` fields cost a slice, where new noise costs a resampling."""
        ay, ax, by, bx = self.rng.integers(0, self.low.shape[0] - SIZE + 1, 4)
        a, b = self.rng.choice([-1.0, 1.0], 2)
        return (a * self.low[ay:ay + SIZE, ax:ax + SIZE]
                + b * 0.45 * self.mid[by:by + SIZE, bx:bx + SIZE]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Noise and textures
# ---------------------------------------------------------------------------------------

def value_noise(rng: np.random.Generator, cells: int, size: int = SIZE) -> np.ndarray:
    """Smooth noise with features ``size / cells`` px wide. Returns (size, size), ~N(0, 1).

    A (cells+3)^2 grid of N(0, 1) is upsampled bicubically; one cell is trimmed on each
    side, where the interpolation has too few neighbours. Features wider than 6 px are
    made at half resolution and doubled bilinearly, a quarter of the cost, same look."""
    half = size / cells >= 6
    n = size // 2 if half else size
    step = n / cells
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    full = int(round(step * (cells + 3)))
    big = Image.fromarray(grid, "F").resize((full, full), Image.BICUBIC)
    off = int(round(step))
    out = np.asarray(big, dtype=np.float32)[off:off + n, off:off + n]
    if half:
        out = np.asarray(Image.fromarray(np.ascontiguousarray(out), "F").resize((size, size), Image.BILINEAR))
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _rgb(base, variation: np.ndarray, amount: float) -> np.ndarray:
    """Colour (3,) modulated by a (S, S) field: brightness *= 1 + amount * variation."""
    return np.asarray(base, np.float32)[None, None, :] * (1 + amount * variation)[..., None]


def _jitter(rng, base, amount=0.06) -> np.ndarray:
    """A colour varied mostly in brightness: hue shifts would make greys read as mauve."""
    c = np.asarray(base, np.float32) * rng.uniform(1 - amount, 1 + amount)
    return np.clip(c + rng.normal(0, amount / 8, 3), 0, 1).astype(np.float32)


def ground_texture(kind: str, ctx: Ctx) -> np.ndarray:
    """Full-tile texture of a ground kind, cached per scene. Returns (S, S, 3) float32."""
    if kind in ctx.textures:
        return ctx.textures[kind]
    rng = ctx.rng
    base = _jitter(rng, GROUND[kind], 0.08)
    n = ctx.blotches()
    small = ctx.small[: SIZE, : SIZE] if kind != "concrete" else 0.0
    if kind in ("grass", "rough"):
        tex = _rgb(base, n + 0.5 * small, 0.10)
        patch = np.clip(ctx.blotches() * 0.6, -1, 1)[..., None]
        tex = tex * (1 - 0.12 * patch) + 0.12 * patch * np.float32([0.50, 0.48, 0.30])
        tex *= (1 + 0.05 * ctx.fine)[..., None]
    elif kind in ("dry_grass", "chaparral"):
        tex = _rgb(base, n + 0.6 * small, 0.08) * (1 + 0.06 * ctx.fine)[..., None]
        shrubs = ctx.small[:SIZE, :SIZE] if kind == "chaparral" else ctx.crop(ctx.mid)
        thr = 1.3 if kind == "chaparral" else 1.8
        s = np.clip((shrubs - thr) * 2.5, 0, 1)[..., None]
        tex = tex * (1 - s) + s * np.float32([0.24, 0.29, 0.17])
    elif kind in ("concrete", "gravel", "path"):
        tex = _rgb(base, n, 0.04) * (1 + (0.03 if kind != "gravel" else 0.09) * ctx.fine)[..., None]
        if kind == "concrete":  # expansion joints every few metres
            step = int(rng.integers(18, 30))
            tex[::step] *= 0.93
            tex[:, ::step] *= 0.93
            stains = np.clip(ctx.crop(ctx.low) * 0.7 + 0.7 * ctx.crop(ctx.mid) - 1.2, 0, 1)[..., None]
            tex *= 1 - 0.15 * stains
    elif kind == "asphalt":
        tex = _rgb(base, n, 0.05) * (1 + 0.05 * ctx.fine)[..., None]
    else:  # soil, sand
        tex = _rgb(base, n + 0.4 * small, 0.07 if kind == "sand" else 0.10) * (1 + 0.05 * ctx.fine)[..., None]
    tex = np.clip(tex, 0, 1).astype(np.float32)
    ctx.textures[kind] = tex
    return tex


# ---------------------------------------------------------------------------------------
# Painting helpers
# ---------------------------------------------------------------------------------------

def _window(poly: np.ndarray, pad: int = 0):
    """(box, local bool mask) of a polygon clipped to the tile, or None if off-tile."""
    box = G.bbox(poly, pad)
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None
    return box, G.raster(poly, box)


def _paint(ctx: Ctx, box, m: np.ndarray, values, obj_id: int | None = None) -> None:
    """Write ``values`` ((h, w, 3) window or (3,) colour) where ``m``; set mask ids too."""
    x0, y0, x1, y1 = box
    win = ctx.canvas[y0:y1, x0:x1]
    if np.ndim(values) == 1:
        win[m] = values
    else:
        win[m] = values[m]
    if obj_id is not None:
        ctx.mask[y0:y1, x0:x1][m] = obj_id


def _paint_on(ctx: Ctx, poly: np.ndarray, values, obj_id: int) -> None:
    """Paint detail (engines, infield, rooftop units) only where ``obj_id`` already is,
    so decoration never spills outside the object's mask."""
    w = _window(poly)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    m &= ctx.mask[y0:y1, x0:x1] == obj_id
    if np.ndim(values) == 3:
        values = values[y0:y1, x0:x1]
    _paint(ctx, box, m, values)


def _uv(box, centre, angle):
    """Pixel centres of a window in an object's frame: u along ``angle``, v across."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xx - centre[0], yy - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def obj_rgb(ctx: Ctx, obj: SceneObject) -> np.ndarray:
    base = CATEGORY_COLOURS.get((obj.category, obj.colour), COLOURS.get(obj.colour, (0.5, 0.5, 0.5)))
    return _jitter(ctx.rng, base, 0.05)


def _draw_lines(ctx: Ctx, segments, colour, width: int = 1, alpha: float = 0.85,
                clip: np.ndarray | None = None) -> None:
    """Paint polylines (paint markings, court lines) onto the canvas only, not the mask."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    for seg in segments:
        d.line([tuple(map(float, p)) for p in seg], fill=255, width=width)
    a8 = np.asarray(img)
    ys, xs = np.nonzero(a8)  # markings cover a few % of the tile: blend only there
    a = a8[ys, xs].astype(np.float32) * (alpha / 255)
    if clip is not None:
        a *= clip[ys, xs]
    a = a[:, None]
    ctx.canvas[ys, xs] = ctx.canvas[ys, xs] * (1 - a) + a * np.asarray(colour, np.float32)


def _offset_path(path: np.ndarray, off: float) -> np.ndarray:
    tang = np.gradient(path, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-9
    return path + off * np.stack([-tang[:, 1], tang[:, 0]], axis=1)


def _dashes(path: np.ndarray, dash: float, gap: float) -> list[np.ndarray]:
    pts = G.resample(path, 1.0)
    period = int(dash + gap)
    return [pts[i:i + int(dash)] for i in range(0, len(pts) - int(dash), period)]


# ---------------------------------------------------------------------------------------
# Flat objects
# ---------------------------------------------------------------------------------------

def draw_patch(ctx: Ctx, patch: Patch) -> None:
    w = _window(patch.polygon)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    _paint(ctx, box, m, ground_texture(patch.kind, ctx)[y0:y1, x0:x1], obj_id=0)


def draw_water(ctx: Ctx, obj: SceneObject) -> None:
    """Water with depth (darker away from the shore), ripples, a wet margin on the land
    around it and, for the sea, surf lines along the shore."""
    pad = 14
    x0, y0, x1, y1 = G.bbox(obj.footprint, 0)
    if x1 <= x0 or y1 <= y0:
        return
    big = (x0 - pad, y0 - pad, x1 + pad, y1 + pad)
    mbig = G.raster(obj.footprint, big)
    soft = np.asarray(Image.fromarray((mbig * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(6)), np.float32)[pad:-pad, pad:-pad] / 255  # 1 deep, 0 land
    m = mbig[pad:-pad, pad:-pad]
    box = (x0, y0, x1, y1)
    base = np.asarray(WATER.get(obj.colour, WATER["blue"]), np.float32) * ctx.rng.uniform(0.85, 1.15)
    shallow = np.float32([0.30, 0.42, 0.38]) if obj.category != "sea" else np.float32([0.30, 0.50, 0.52])
    depth = np.clip((soft - 0.5) * 2, 0, 1)[..., None]  # 0 at the shore, 1 well inside
    ripple = ctx.mid[y0:y1, x0:x1] * 0.04 + ctx.fine[y0:y1, x0:x1] * 0.02
    water = (shallow * (1 - depth) + base * depth) * (1 + ripple)[..., None]
    if obj.category == "sea":  # surf: broken white lines parallel to the shore
        surf = np.zeros_like(soft)
        for lvl, width in ((0.52, 0.05), (0.62, 0.03), (0.72, 0.02)):
            surf = np.maximum(surf, np.clip(1 - np.abs(soft - lvl) / width, 0, 1))
        surf *= np.clip(0.6 + 0.5 * ctx.mid[y0:y1, x0:x1], 0, 1)
        water = water * (1 - surf[..., None]) + surf[..., None] * np.float32([0.88, 0.90, 0.90])
    _paint(ctx, box, m, water, obj.id)
    # wet margin just outside the water (not part of the object's mask)
    wet = np.clip(soft * 2.2, 0, 1) * (~m)
    win = ctx.canvas[y0:y1, x0:x1]
    win *= (1 - 0.28 * wet)[..., None]


def draw_field(ctx: Ctx, obj: SceneObject) -> None:
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    u, v = _uv(box, (0, 0), obj.angle)
    n = ctx.mid[y0:y1, x0:x1]
    tex = rgb * (1 + 0.07 * n + 0.04 * ctx.fine[y0:y1, x0:x1])[..., None]
    if obj.style == "rows":  # crop rows, slightly irregular, over soil showing between
        spacing = obj.params.get("spacing", 4.0)
        rows = np.sin(2 * math.pi * v / spacing + 0.6 * ctx.mid[y0:y1, x0:x1])
        tex *= (1 + 0.16 * rows)[..., None]
    else:  # pasture / stubble: mottled, with the tramlines of the sprayer every ~20 px
        tex *= (1 + 0.10 * ctx.blotches()[y0:y1, x0:x1])[..., None]
        tram = np.abs(((v / 20.0) % 1.0) - 0.5) > 0.47
        tex[tram] *= 0.86
    # headland: a slightly different band along the field edge
    edge = _edge_band(m, 3)
    tex = tex * (1 - 0.35 * edge[..., None]) + 0.35 * edge[..., None] * np.float32([0.50, 0.45, 0.33])
    _paint(ctx, box, m, np.clip(tex, 0, 1), obj.id)


def _edge_band(m: np.ndarray, width: int) -> np.ndarray:
    """1 on the inner ``width``-px rim of a local mask, fading inwards. (h, w) float32."""
    img = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(2 * width + 1))
    inner = np.asarray(img, np.float32) / 255
    return (m & (inner < 0.5)).astype(np.float32)


def draw_forest(ctx: Ctx, obj: SceneObject) -> None:
    """Closed canopy: crowns are bumps of small-scale noise, lit from the sun's side, with
    dark gaps where the canopy opens."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rng = ctx.rng
    conifer = obj.style == "conifer"
    cells = 44 if conifer else 26
    h = value_noise(rng, cells) + 0.4 * value_noise(rng, cells * 2) + 0.3 * ctx.blotches()
    gy, gx = np.gradient(h)
    lit = -(gx * ctx.light[0] + gy * ctx.light[1])  # normal ~ (-grad, 1): sun-facing slopes
    lit = lit / (np.percentile(np.abs(lit), 98) + 1e-6)
    rgb = obj_rgb(ctx, obj) * (0.8 if conifer else 1.0)
    tone = 0.08 * ctx.blotches()[..., None] * np.float32([1.0, 0.6, 0.2])  # yellower patches
    tex = rgb * (1 + 0.35 * np.clip(lit, -1.5, 1.5) + 0.12 * h)[..., None] + tone * rgb
    gaps = np.clip((-h - 1.2) * 1.2, 0, 1)[..., None]  # shaded holes between crowns
    tex = tex * (1 - 0.45 * gaps)
    tex = np.clip(tex, 0, 1)[y0:y1, x0:x1]
    _paint(ctx, box, m, tex, obj.id)


def draw_road(ctx: Ctx, obj: SceneObject) -> None:
    """Roads, freeways and runways: surface, then paint markings along the centreline."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    tex = _rgb(rgb, ctx.mid[y0:y1, x0:x1], 0.05) * (1 + 0.05 * ctx.fine[y0:y1, x0:x1])[..., None]
    _paint(ctx, box, m, tex, obj.id)
    path = obj.params["path"]
    full = np.zeros((SIZE, SIZE), np.float32)
    full[y0:y1, x0:x1] = m
    white, yellow = (0.92, 0.92, 0.90), (0.86, 0.74, 0.30)
    half = obj.width / 2
    if obj.category == "runway":
        _draw_lines(ctx, _dashes(path, 18, 14), white, width=2, clip=full)
        _draw_lines(ctx, [_offset_path(path, half - 3), _offset_path(path, -half + 3)], white, 1, clip=full)
        skid = np.clip(ctx.mid[:SIZE, :SIZE] * 0.7, 0, 1) * np.exp(-((_dist_map(path) / (half * 0.5)) ** 2))
        ctx.canvas *= (1 - 0.25 * skid * full)[..., None]
        if obj.params.get("threshold"):
            pts = G.resample(path, 1.0)
            i = int(ctx.rng.integers(len(pts) // 3, 2 * len(pts) // 3))
            stripes = []
            for k in np.linspace(-half + 6, half - 6, 8):
                seg = _offset_path(pts[i:i + 26], k)
                stripes.append(seg)
            _draw_lines(ctx, stripes, white, width=2, clip=full)
    elif obj.category == "freeway":
        lanes, lw, med = obj.params["lanes"], obj.params["lane_w"], obj.params["median"]
        lines = []
        for side in (-1, 1):
            for k in range(1, lanes):
                lines += _dashes(_offset_path(path, side * (med / 2 + 2 + k * lw)), 8, 10)
        _draw_lines(ctx, lines, white, 1, alpha=0.7, clip=full)
        edges = [_offset_path(path, s * (med / 2 + 1)) for s in (-1, 1)]
        edges += [_offset_path(path, s * (half - 1.5)) for s in (-1, 1)]
        _draw_lines(ctx, edges, white, 1, alpha=0.6, clip=full)
        strip = G.ribbon(path, med - 2)
        sw = _window(strip)
        if sw is not None:  # median: planted or a concrete barrier
            sbox, sm = sw
            sx0, sy0, sx1, sy1 = sbox
            kind = "rough" if med > 10 else "concrete"
            ctx.canvas[sy0:sy1, sx0:sx1][sm] = ground_texture(kind, ctx)[sy0:sy1, sx0:sx1][sm]
    elif obj.style == "asphalt" and obj.params.get("lanes", 2) >= 2:
        _draw_lines(ctx, _dashes(path, 7, 7), yellow if ctx.rng.random() < 0.5 else white,
                    1, alpha=0.7, clip=full)
    elif obj.style == "dirt":
        ruts = [_offset_path(path, s * obj.width * 0.22) for s in (-1, 1)]
        _draw_lines(ctx, ruts, (0.40, 0.33, 0.25), 1, alpha=0.5, clip=full)


def _dist_map(path: np.ndarray) -> np.ndarray:
    """Distance (px) of every pixel to a straight-ish path: (S, S). Uses its end points."""
    p0, p1 = path[0], path[-1]
    d = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-9)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return np.abs((xx - p0[0]) * -d[1] + (yy - p0[1]) * d[0])


def draw_parking_lot(ctx: Ctx, obj: SceneObject) -> None:
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    tex = _rgb(rgb, ctx.mid[y0:y1, x0:x1], 0.06) * (1 + 0.05 * ctx.fine[y0:y1, x0:x1])[..., None]
    oil = np.clip(ctx.mid[y0:y1, x0:x1] - 1.0, 0, 1)[..., None]
    _paint(ctx, box, m, tex * (1 - 0.2 * oil), obj.id)
    _draw_lines(ctx, list(obj.params["lines"]), (0.88, 0.88, 0.86), 1, alpha=0.75)


def draw_tennis_court(ctx: Ctx, obj: SceneObject) -> None:
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    surround = {"green": (0.25, 0.42, 0.28), "red": (0.55, 0.27, 0.20), "dark": (0.18, 0.24, 0.20)}
    s_rgb = _jitter(ctx.rng, surround[obj.params.get("surround", "green")], 0.05)
    _paint(ctx, box, m, s_rgb, obj.id)
    L, W = obj.length, obj.width
    cl, cw = L * 0.70, W * 0.62  # playing area inside the run-off
    inner = G.rect(*obj.centre, cl, cw, obj.angle)
    iw = _window(inner)
    if iw is not None:
        _paint(ctx, iw[0], iw[1], obj_rgb(ctx, obj))
    loc = []
    hl, hw, sw = cl / 2, cw / 2, cw / 2 * 0.75  # sw: singles sideline
    sv = cl / 2 * 0.54  # service line from the net
    for a, b in (((-hl, -hw), (hl, -hw)), ((hl, -hw), (hl, hw)), ((hl, hw), (-hl, hw)),
                 ((-hl, hw), (-hl, -hw)), ((-hl, -sw), (hl, -sw)), ((-hl, sw), (hl, sw)),
                 ((-sv, -sw), (-sv, sw)), ((sv, -sw), (sv, sw)), ((-sv, 0), (sv, 0))):
        loc.append(G.place(np.array([a, b]), *obj.centre, obj.angle))
    _draw_lines(ctx, loc, (0.95, 0.95, 0.93), 1, alpha=0.9)
    net = G.place(np.array([[0, -hw - 2], [0, hw + 2]]), *obj.centre, obj.angle)
    _draw_lines(ctx, [net], (0.15, 0.15, 0.15), 1, alpha=0.7)


def draw_baseball(ctx: Ctx, obj: SceneObject) -> None:
    """Baseball field in the basis of its foul lines: striped outfield grass, a dirt
    infield bounded by an arc around the pitcher's mound (95 ft around a mound 60.5 ft
    from home, bases 90 ft apart), a grass square inside the base paths, white lines."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    H = obj.params["home"][0]
    F = obj.params["first"][0]
    T = obj.params["third"][0]
    base = float(np.linalg.norm(F - H))
    u1, u3 = (F - H) / base, (T - H) / base
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    a = ((xx - H[0]) * u1[0] + (yy - H[1]) * u1[1]) / base  # along the first-base line
    b = ((xx - H[0]) * u3[0] + (yy - H[1]) * u3[1]) / base  # along the third-base line
    rgb = obj_rgb(ctx, obj)
    stripes = np.sign(np.sin(2 * math.pi * (a + b) * base / 18))
    col = rgb * (1 + 0.05 * stripes + 0.05 * ctx.mid[y0:y1, x0:x1])[..., None]
    dirt = _jitter(ctx.rng, (0.66, 0.46, 0.32), 0.05)
    mound_d = 0.672 / math.sqrt(2)  # mound position in (a, b) units
    r_mound = np.sqrt((a - mound_d) ** 2 + (b - mound_d) ** 2)
    infield = (r_mound < 1.056) & (a > -0.06) & (b > -0.06)
    grass_sq = (a > 0.1) & (b > 0.1) & (a < 0.9) & (b < 0.9)
    if obj.params.get("dirt") == "skinned":
        grass_sq &= False
    home = np.sqrt(a ** 2 + b ** 2) < 0.15
    mound = r_mound < 0.1
    is_dirt = (infield & ~grass_sq) | home | mound
    col = np.where(is_dirt[..., None], dirt * (1 + 0.04 * ctx.fine[y0:y1, x0:x1])[..., None], col)
    lines = ((np.abs(a) < 0.9 / base) & (b > 0)) | ((np.abs(b) < 0.9 / base) & (a > 0))
    bases = ((np.abs(a - 1) < 0.04) & (np.abs(b) < 0.04)) | ((np.abs(b - 1) < 0.04) & (np.abs(a) < 0.04)) \
        | ((np.abs(a - 1) < 0.04) & (np.abs(b - 1) < 0.04))
    col = np.where((lines | bases)[..., None], np.float32([0.93, 0.93, 0.9]), col)
    edge = _edge_band(m, 1)[..., None]  # the outfield fence
    col = col * (1 - 0.45 * edge)
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)


def _full(box, m) -> np.ndarray:
    x0, y0, x1, y1 = box
    f = np.zeros((SIZE, SIZE), np.float32)
    f[y0:y1, x0:x1] = m
    return f


def draw_plain(ctx: Ctx, obj: SceneObject) -> None:
    """Flat object of one textured colour (beach, fairway, green, bunker, pool, pier…)."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    cat = obj.category
    amount = {"beach": 0.05, "bunker": 0.03, "swimming_pool": 0.02, "fairway": 0.04}.get(cat, 0.05)
    tex = rgb * (1 + amount * ctx.mid[y0:y1, x0:x1] + 0.03 * ctx.fine[y0:y1, x0:x1])[..., None]
    if cat == "fairway":  # mowing stripes
        u, v = _uv(box, obj.centre, obj.angle)
        tex *= (1 + 0.05 * np.sign(np.sin(2 * math.pi * u / 14)))[..., None]
    if cat == "swimming_pool":  # brighter shallow end, pale coping
        u, _ = _uv(box, obj.centre, obj.angle)
        tex *= (1 + 0.15 * u / max(obj.length, 1))[..., None]
        edge = _edge_band(m, 1)[..., None]
        tex = tex * (1 - edge) + edge * np.float32([0.85, 0.85, 0.82])
    if cat in ("bunker", "putting_green"):
        edge = _edge_band(m, 2)[..., None]
        tex = tex * (1 - 0.12 * edge)
    _paint(ctx, box, m, np.clip(tex, 0, 1), obj.id)
    if cat == "putting_green":  # the flag
        fw = _window(G.circle(obj.centre[0], obj.centre[1], 1.2, 6))
        if fw is not None:
            _paint(ctx, fw[0], fw[1], np.float32([0.9, 0.9, 0.85]))


# ---------------------------------------------------------------------------------------
# Raised objects
# ---------------------------------------------------------------------------------------

def _shade(rgb, normal, light, k=0.28) -> np.ndarray:
    """Lambert-ish brightness of a facet whose horizontal normal is ``normal``."""
    return np.clip(np.asarray(rgb) * (1 + k * float(np.dot(normal, light))), 0, 1).astype(np.float32)


def draw_house(ctx: Ctx, obj: SceneObject) -> None:
    rgb = obj_rgb(ctx, obj)
    for part in obj.params["parts"]:  # (4, 2) corners: tl, tr, br, bl in the local frame
        tl, tr, br, bl = part
        ax = (tr - tl) / (np.linalg.norm(tr - tl) + 1e-9)  # along the length
        ay = (bl - tl) / (np.linalg.norm(bl - tl) + 1e-9)  # across
        L, D = np.linalg.norm(tr - tl), np.linalg.norm(bl - tl)
        if L < D:  # ridge always along the longer side
            tl, tr, br, bl = tr, br, bl, tl
            ax, ay, L, D = ay, -ax, D, L
        ml, mr = (tl + bl) / 2, (tr + br) / 2
        if obj.style == "hip":
            r0, r1 = ml + ax * D / 2, mr - ax * D / 2
            facets = [(np.array([tl, tr, r1, r0]), -ay), (np.array([bl, br, r1, r0]), ay),
                      (np.array([tl, r0, bl]), -ax), (np.array([tr, r1, br]), ax)]
        else:
            facets = [(np.array([tl, tr, mr, ml]), -ay), (np.array([ml, mr, br, bl]), ay)]
        for poly, normal in facets:
            w = _window(poly)
            if w is None:
                continue
            box, m = w
            x0, y0, x1, y1 = box
            col = _shade(rgb, normal, ctx.light)
            tex = col * (1 + 0.05 * ctx.fine[y0:y1, x0:x1] + 0.04 * ctx.mid[y0:y1, x0:x1])[..., None]
            _paint(ctx, box, m, np.clip(tex, 0, 1), obj.id)
        ridge = [np.array([ml + ax * (D / 2 if obj.style == "hip" else 0),
                           mr - ax * (D / 2 if obj.style == "hip" else 0)])]
        _draw_lines(ctx, ridge, np.clip(rgb * 1.25, 0, 1), 1, alpha=0.5)
    # id over the whole footprint (covers the joins between facets)
    w = _window(obj.footprint)
    if w is not None:
        box, m = w
        ctx.mask[box[1]:box[3], box[0]:box[2]][m] = obj.id


def draw_building(ctx: Ctx, obj: SceneObject) -> None:
    """Flat roof: parapet rim, roof texture or metal ribs, rooftop units with shadows."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    tex = rgb * (1 + 0.04 * ctx.mid[y0:y1, x0:x1] + 0.03 * ctx.fine[y0:y1, x0:x1])[..., None]
    if obj.style == "ribbed":
        u, v = _uv(box, obj.centre, obj.angle)
        tex *= (1 + 0.05 * np.sin(2 * math.pi * u / 3.0))[..., None]
    rim = _edge_band(m, 2)[..., None]
    tex = tex * (1 - rim) + rim * np.clip(rgb * 1.12, 0, 1)
    _paint(ctx, box, m, np.clip(tex, 0, 1), obj.id)
    for c in obj.params.get("units", np.zeros((0, 2))):
        s = float(ctx.rng.uniform(3, 7))
        sh = G.rect(c[0] + ctx.sun[0] * 2.5, c[1] + ctx.sun[1] * 2.5, s, s, obj.angle)
        unit = G.rect(c[0], c[1], s, s, obj.angle)
        for poly, col in ((sh, rgb * 0.55), (unit, np.clip(rgb * 0.85 + 0.1, 0, 1))):
            _paint_on(ctx, poly, np.asarray(col, np.float32), obj.id)


def draw_plane(ctx: Ctx, obj: SceneObject) -> None:
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    u, v = _uv(box, obj.centre, obj.angle)
    L, fw = obj.length, obj.length * 0.095
    body = np.abs(v) < fw / 2
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    light_v = -s * ctx.light[0] + c * ctx.light[1]  # light component across the fuselage
    # the fuselage is a lit cylinder; the wings a touch darker and flat
    shade = np.where(body, 1 + 0.18 * np.clip(v / (fw / 2), -1, 1) * light_v, 0.9)
    col = rgb * shade[..., None]
    tail = obj.params.get("tail", "same")
    if tail != "same":
        tc = {"blue": (0.18, 0.28, 0.55), "red": (0.65, 0.16, 0.14), "dark": (0.22, 0.22, 0.25)}[tail]
        fin = (u < -L / 2 + L * 0.16) & body
        col = np.where(fin[..., None], np.float32(tc), col)
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)
    # engines under the wings: small dark ellipses just behind the leading edge
    span, wx, sweep, root = obj.width, obj.params["wx"], obj.params["sweep"], obj.params["root"]
    positions = [0.33] if obj.params["engines"] == 2 else [0.28, 0.6]
    for f in positions:
        for side in (-1, 1):
            yv = side * (fw / 2 + f * (span / 2 - fw / 2))
            xu = wx - sweep * f - root * 0.25 * (1 - f)
            ell = G.place(np.array([[xu + np.cos(t) * L * 0.06, yv + np.sin(t) * L * 0.018]
                                    for t in np.linspace(0, 2 * math.pi, 10, endpoint=False)]),
                          *obj.centre, obj.angle)
            _paint_on(ctx, ell, np.float32([0.45, 0.46, 0.48]), obj.id)


def draw_vessel(ctx: Ctx, obj: SceneObject) -> None:
    """Ships and boats: hull, deck detail (containers, pipes, cabin), optional wake."""
    if obj.params.get("wake"):
        back = G.place(np.array([[-obj.length / 2, 0], [-obj.length * 2.2, -obj.width * 1.6],
                                 [-obj.length * 2.2, obj.width * 1.6]]), *obj.centre, obj.angle)
        ww = _window(back)
        if ww is not None:
            box, m = ww
            u, v = _uv(box, obj.centre, obj.angle)
            fade = np.clip(1 + (u + obj.length / 2) / (obj.length * 1.7), 0, 1)
            a = (m * fade * 0.45 * np.clip(0.7 + 0.4 * ctx.fine[box[1]:box[3], box[0]:box[2]], 0, 1))
            win = ctx.canvas[box[1]:box[3], box[0]:box[2]]
            win[:] = win * (1 - a[..., None]) + a[..., None] * np.float32([0.85, 0.88, 0.88])
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    u, v = _uv(box, obj.centre, obj.angle)
    L, W = obj.length, obj.width
    col = np.broadcast_to(rgb, m.shape + (3,)).copy()
    rim = _edge_band(m, 1)[..., None]
    col = col * (1 - 0.3 * rim)
    if obj.category == "boat":
        cabin = (np.abs(v) < W * 0.25) & (u > -L * 0.25) & (u < L * 0.1)
        col[cabin] = np.clip(rgb * 0.75 + 0.12, 0, 1)
        if obj.colour != "white":
            deck = (np.abs(v) < W * 0.32) & (u > -L * 0.45) & (u < L * 0.3) & ~cabin
            col[deck] = np.float32([0.88, 0.88, 0.86])
    else:
        bridge = (u < -L * 0.32) & (u > -L * 0.45) & (np.abs(v) < W * 0.42)
        if obj.style == "cargo":
            bays = (u > -L * 0.3) & (u < L * 0.28) & (np.abs(v) < W * 0.4)
            cid = (np.floor((u + L) / 5).astype(int) * 7 + np.floor((v + W) / 3).astype(int) * 3) % 5
            palette = np.float32([[0.7, 0.2, 0.15], [0.2, 0.35, 0.6], [0.8, 0.8, 0.78],
                                  [0.3, 0.5, 0.3], [0.75, 0.55, 0.2]])
            col[bays] = palette[cid[bays]]
        elif obj.style == "tanker":
            pipe = (np.abs(v) < 1.0) & (u > -L * 0.3) & (u < L * 0.3)
            col[pipe] = np.float32([0.75, 0.75, 0.7])
        col[bridge] = np.float32([0.9, 0.9, 0.88])
    col *= (1 + 0.03 * ctx.fine[y0:y1, x0:x1])[..., None]
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)


def draw_tank(ctx: Ctx, obj: SceneObject) -> None:
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    r = obj.length / 2
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = (xx - obj.centre[0]) / r, (yy - obj.centre[1]) / r
    if obj.style == "fixed":  # shallow dome: brighter on the sun side
        col = rgb * (1 + 0.22 * (dx * ctx.light[0] + dy * ctx.light[1]))[..., None]
    else:  # floating roof sunk below the rim: the rim shades a crescent of the roof
        col = np.broadcast_to(rgb * 0.92, m.shape + (3,)).copy()
        shift = 0.18
        sx, sy = dx + ctx.light[0] * shift, dy + ctx.light[1] * shift
        crescent = (sx * sx + sy * sy) > 0.86 ** 2
        col[crescent & (dx * dx + dy * dy < 0.9 ** 2)] *= 0.55
    rr = np.sqrt(dx * dx + dy * dy)
    ring = (rr > 0.88)[..., None]
    col = np.where(ring, np.clip(rgb * 1.08, 0, 1), col)
    col = col * (1 + 0.02 * ctx.fine[y0:y1, x0:x1])[..., None]
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)
    cw = _window(G.circle(obj.centre[0], obj.centre[1], max(1.0, r * 0.07), 8))
    if cw is not None:
        _paint(ctx, cw[0], cw[1], np.clip(rgb * 0.7, 0, 1))


def draw_car(ctx: Ctx, obj: SceneObject) -> None:
    """A car from above: body with rounded corners, shaded towards the sun, a tinted
    windscreen and rear window inset from the sides, and a lighter roof between them."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    rgb = obj_rgb(ctx, obj)
    u, v = _uv(box, obj.centre, obj.angle)
    L, W = obj.length, obj.width
    corner = (np.abs(u) > L / 2 - 1.6) & (np.abs(v) > W / 2 - 1.2)
    m = m & ~corner
    side = np.clip(np.abs(v) / (W / 2), 0, 1)  # 0 on the roof line, 1 at the sides
    col = rgb[None, None, :] * (1.08 - 0.22 * side ** 2)[..., None]
    inset = np.abs(v) < W * 0.36
    glass = inset & (((u > L * 0.1) & (u < L * 0.27)) | ((u < -L * 0.22) & (u > -L * 0.32)))
    col[glass] = 0.35 * col[glass] + 0.65 * np.float32([0.16, 0.18, 0.21])
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)


def draw_tree(ctx: Ctx, obj: SceneObject) -> None:
    """A crown: lit on the sun side, clumpy (small-scale noise), darker at its rim."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj) * ctx.rng.uniform(0.8, 1.2)
    r = obj.length / 2
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = (xx - obj.centre[0]) / r, (yy - obj.centre[1]) / r
    lit = dx * ctx.light[0] + dy * ctx.light[1]
    rim = np.clip(np.hypot(dx, dy) - 0.6, 0, 1)
    col = rgb * (1 + 0.3 * lit + 0.16 * ctx.small[y0:y1, x0:x1] + 0.08 * ctx.fine[y0:y1, x0:x1]
                 - 0.3 * rim)[..., None]
    _paint(ctx, box, m, np.clip(col, 0, 1).astype(np.float32), obj.id)


def draw_deck(ctx: Ctx, obj: SceneObject) -> None:
    """Bridges, overpasses and piers: a light deck with darker edges (parapets)."""
    w = _window(obj.footprint)
    if w is None:
        return
    box, m = w
    x0, y0, x1, y1 = box
    rgb = obj_rgb(ctx, obj)
    tex = rgb * (1 + 0.04 * ctx.mid[y0:y1, x0:x1] + 0.03 * ctx.fine[y0:y1, x0:x1])[..., None]
    rim = _edge_band(m, 1)[..., None]
    tex = tex * (1 - 0.25 * rim)
    _paint(ctx, box, m, np.clip(tex, 0, 1), obj.id)
    if obj.category == "overpass":
        _draw_lines(ctx, _dashes(obj.params["path"], 6, 6), (0.95, 0.95, 0.9), 1, alpha=0.6,
                    clip=_full(box, m))


DRAWERS = {
    "water": draw_water, "sea": draw_water, "lake": draw_water, "river": draw_water,
    "field": draw_field, "forest": draw_forest, "road": draw_road, "freeway": draw_road,
    "runway": draw_road, "parking_lot": draw_parking_lot, "tennis_court": draw_tennis_court,
    "baseball_field": draw_baseball, "beach": draw_plain, "fairway": draw_plain,
    "putting_green": draw_plain, "bunker": draw_plain, "swimming_pool": draw_plain,
    "house": draw_house, "building": draw_building, "terminal": draw_building,
    "plane": draw_plane, "ship": draw_vessel, "boat": draw_vessel, "storage_tank": draw_tank,
    "car": draw_car, "tree": draw_tree, "bridge": draw_deck, "overpass": draw_deck,
    "pier": draw_deck,
}


# ---------------------------------------------------------------------------------------
# Shadows, sensor, and the whole tile
# ---------------------------------------------------------------------------------------

def shadow_map(layout: Layout) -> np.ndarray:
    """Soft shadow coverage (S, S) in [0, 1] of every raised object.

    Buildings and trees sweep their footprint along the sun direction (an extruded prism);
    planes, hovering above their own shadow, cast an offset silhouette."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    sun = np.array([math.cos(layout.sun), math.sin(layout.sun)])
    for o in layout.objects:
        if o.height <= 0:
            continue
        length = o.height * layout.shadow_scale
        if o.params.get("shadow") == "offset":
            offsets = [length * 1.5]
        else:
            offsets = np.linspace(0, length, max(2, int(length / 1.5) + 1))
        for t in offsets:
            d.polygon([tuple(p) for p in (o.footprint + sun * t)], fill=255)
    img = img.filter(ImageFilter.GaussianBlur(1.1))
    return np.asarray(img, np.float32) / 255


# The acquisition of each tile is drawn at random, as an archive mixes sensors, dates and
# processing chains: exposure and white balance, saturation, haze, a brightness gradient
# across the tile (mosaicking, view angle), sharpness, noise and JPEG compression.
JPEG_SHARE = 0.8  # share of tiles stored after a JPEG round trip (RSICD / RSITMD are JPEG)


def sensor(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """From a drawing to imagery: one random acquisition per tile (see above).

    Colour operations run on the float canvas; blur and JPEG on the 8-bit image (Pillow)."""
    S = canvas.shape[0]
    gain = rng.uniform(0.86, 1.1) * (1 + rng.normal(0, 0.025, 3))  # exposure, white balance
    sat = rng.uniform(0.72, 1.12)
    haze = rng.uniform(0.0, 0.06) if rng.random() < 0.7 else rng.uniform(0.08, 0.2)
    airlight = np.float32([0.74, 0.78, 0.84])  # scattered light is bluish
    gamma = rng.uniform(0.88, 1.12)
    ang, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.07)
    ramp = np.linspace(-1, 1, S, dtype=np.float32)
    grad = 1 + amp * (math.cos(ang) * ramp[None, :] + math.sin(ang) * ramp[:, None])
    img = canvas * (gain.astype(np.float32) * grad[..., None])
    lum = img @ np.float32([0.299, 0.587, 0.114])
    img = lum[..., None] + np.float32(sat) * (img - lum[..., None])
    img = img * np.float32(1 - haze) + np.float32(haze) * airlight
    img = np.clip(img, 0, 1) ** np.float32(gamma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.006, 0.022))
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.1))))
    if rng.random() < JPEG_SHARE:
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(rng.integers(55, 93)))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def render_layout(layout: Layout, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw a layout. Returns (RGB tile, instance mask (S, S) int32, 0 = background)."""
    sun = np.array([math.cos(layout.sun), math.sin(layout.sun)], np.float32)
    ctx = Ctx(rng=rng, canvas=np.zeros((SIZE, SIZE, 3), np.float32),
              mask=np.zeros((SIZE, SIZE), np.int32), sun=sun,
              fine=rng.standard_normal((SIZE, SIZE)).astype(np.float32),
              mid=value_noise(rng, 48, SIZE + 128), low=value_noise(rng, 6, SIZE + 128),
              small=value_noise(rng, 90))
    ctx.canvas[:] = ground_texture(layout.ground, ctx)
    flat: list = [p for p in layout.patches] + [o for o in layout.objects if o.z < RAISED_Z]
    flat.sort(key=lambda it: (it.z, getattr(it, "id", 0)))
    for it in flat:
        if isinstance(it, Patch):
            draw_patch(ctx, it)
        else:
            DRAWERS[it.category](ctx, it)
    shade = shadow_map(layout)
    ctx.canvas *= 1 - shade[..., None] * (1 - SHADOW_TINT)
    for o in sorted((o for o in layout.objects if o.z >= RAISED_Z), key=lambda o: (o.z, o.id)):
        DRAWERS[o.category](ctx, o)
    return sensor(ctx.canvas, rng), ctx.mask


MIN_AREA = 16  # px; slivers of objects cut by the tile edge are not worth a label


def measure(layout: Layout, mask: np.ndarray) -> None:
    """Set each object's visible ``area`` and ``bbox`` from the mask, in place.

    Objects with fewer than MIN_AREA visible pixels (a tree crown clipped by the tile edge)
    are dropped and their pixels set to background, so every id in the mask is a listed
    object. bbox is [x0, y0, x1, y1) of the visible pixels, x1/y1 exclusive."""
    flat = mask.ravel()
    order = np.argsort(flat, kind="stable")
    ids = flat[order]
    wanted = [o.id for o in layout.objects]
    starts = np.searchsorted(ids, wanted, side="left")
    ends = np.searchsorted(ids, wanted, side="right")
    ys, xs = order // SIZE, order % SIZE
    keep = []
    for o, a, b in zip(layout.objects, starts, ends):
        if b - a < MIN_AREA:
            flat[order[a:b]] = 0
            continue
        o.area = int(b - a)
        o.bbox = [int(xs[a:b].min()), int(ys[a:b].min()), int(xs[a:b].max()) + 1,
                  int(ys[a:b].max()) + 1]
        keep.append(o)
    layout.objects = keep


def render_scene(seed_or_rng, scene_type: str | None = None) -> tuple[Image.Image, np.ndarray, Layout]:
    """One synthetic aerial tile.

    ``seed_or_rng``: an int / sequence of ints (seeded) or a numpy Generator.
    Returns (RGB 256x256 PIL image, instance mask (256, 256) int32 with object ids and 0
    for background, the Layout whose objects carry their visible bbox and area)."""
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    layout = build_layout(rng, scene_type)
    image, mask = render_layout(layout, rng)
    measure(layout, mask)
    return image, mask, layout
