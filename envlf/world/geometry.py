"""Plane geometry for the demo world: shapes as vertex arrays, rasterised with Pillow.

Every footprint in the world is a polygon: an ``(K, 2)`` float array of ``(x, y)`` pixel
coordinates, x to the right and y down, the image's own frame. One representation keeps
rasterising, collision tests, the dihedral re-orientation of a whole scene and the mask
(which must match the drawing pixel for pixel) in one code path.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256  # tile side in pixels, like UC Merced (0.3 m/px) and most RSICD tiles


def rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    """Rotated rectangle, ``length`` along ``angle`` (radians). Returns (4, 2)."""
    local = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * [length, width]
    return place(local, cx, cy, angle)


def place(local: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotate local (K, 2) points by ``angle`` then move their origin to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])  # row vectors: p @ rot == R p
    return np.asarray(local, dtype=np.float64) @ rot + [cx, cy]


def circle(cx: float, cy: float, r: float, n: int = 0) -> np.ndarray:
    """Regular polygon close enough to a circle at pixel scale. Returns (n, 2)."""
    n = n or max(12, int(2.2 * r))
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def blob(rng: np.random.Generator, cx: float, cy: float, r: float, wobble: float = 0.25,
         aspect: float = 1.0, angle: float = 0.0, n: int = 48) -> np.ndarray:
    """Smooth irregular closed shape (lakes, bunkers, tree clumps): a circle whose radius
    is modulated by a few low harmonics, so the outline stays organic but never self-crosses
    while ``wobble`` < ~0.4."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in range(2, 6):
        rad += wobble / k * rng.uniform(-1, 1) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    local = np.stack([r * aspect * rad * np.cos(t), r * rad * np.sin(t)], axis=1)
    return place(local, cx, cy, angle)


def meander(rng: np.random.Generator, p0, p1, amplitude: float, n: int = 40,
            waves: float = 1.5) -> np.ndarray:
    """Polyline from p0 to p1 that swings sideways like a river or country road.

    Returns (n, 2). The sideways offset is a sum of two sines with random phase, zero at
    both ends so the path enters and leaves where it was asked to."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    t = np.linspace(0, 1, n)
    d = p1 - p0
    normal = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
    off = np.zeros(n)
    for k, w in ((1.0, waves), (0.45, waves * 2.3)):
        off += k * np.sin(math.pi * w * t + rng.uniform(0, 2 * math.pi))
    off -= off[0] + (off[-1] - off[0]) * t  # pin the ends
    return p0 + t[:, None] * d + (amplitude * off)[:, None] * normal


def ribbon(path: np.ndarray, width) -> np.ndarray:
    """Polygon of a thick polyline (road, river). ``width`` is a scalar or one per vertex.

    Returns (2N, 2): the left edge forwards, then the right edge backwards."""
    path = np.asarray(path, float)
    w = np.broadcast_to(np.asarray(width, float), (len(path),))
    tang = np.gradient(path, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    left = path + normal * (w / 2)[:, None]
    right = path - normal * (w / 2)[:, None]
    return np.concatenate([left, right[::-1]])


def line_across(angle: float, offset: float = 0.0, n: int = 2, margin: float = 60) -> np.ndarray:
    """Straight polyline through the tile at ``angle``, shifted sideways by ``offset`` px
    from the centre, long enough to leave the tile on both sides. Returns (n, 2)."""
    c = SIZE / 2
    d = np.array([math.cos(angle), math.sin(angle)])
    nrm = np.array([-d[1], d[0]])
    half = SIZE / 2 * math.sqrt(2) + margin
    t = np.linspace(-half, half, n)
    return c + nrm * offset + t[:, None] * d


def resample(path: np.ndarray, step: float = 4.0) -> np.ndarray:
    """Points every ``step`` px along a polyline (for dashes, rows of cars, distances)."""
    seg = np.diff(path, axis=0)
    length = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0], np.cumsum(length)])
    s = np.arange(0, cum[-1], step)
    x = np.interp(s, cum, path[:, 0])
    y = np.interp(s, cum, path[:, 1])
    return np.stack([x, y], axis=1)


def path_direction(path: np.ndarray, i: int) -> float:
    """Heading (radians) of a polyline at vertex ``i``."""
    a = path[max(i - 1, 0)]
    b = path[min(i + 1, len(path) - 1)]
    return math.atan2(b[1] - a[1], b[0] - a[0])


def clip_to_tile(poly: np.ndarray, lo: float = 0.0, hi: float = SIZE) -> np.ndarray:
    """Sutherland–Hodgman clip of a convex-or-not polygon to the square [lo, hi]^2."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_less in ((0, lo, False), (0, hi, True), (1, lo, False), (1, hi, True)):
        if not pts:
            break
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cur_in = cur[axis] <= bound if keep_less else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_less else prev[axis] >= bound
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(prev[k] + t * (cur[k] - prev[k]) for k in range(2)))
            if cur_in:
                out.append(cur)
        pts = out
    return np.array(pts, dtype=float).reshape(-1, 2)


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area in px^2 (absolute)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def bbox(poly: np.ndarray, pad: float = 0.0, clip: bool = True) -> tuple[int, int, int, int]:
    """Integer box [x0, y0, x1, y1) covering the polygon plus ``pad``, clipped to the tile."""
    x0, y0 = np.floor(poly.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0) + pad).astype(int) + 1
    if clip:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, SIZE), min(y1, SIZE)
    return int(x0), int(y0), int(x1), int(y1)


def raster(poly: np.ndarray, box: tuple[int, int, int, int], grow: int = 0) -> np.ndarray:
    """Boolean mask of ``poly`` inside the window ``box`` = (x0, y0, x1, y1).

    ``grow`` > 0 thickens the outline by that many pixels (a cheap dilation, used as the
    clearance between objects). Returns (y1 - y0, x1 - x0)."""
    x0, y0, x1, y1 = box
    img = Image.new("L", (max(x1 - x0, 1), max(y1 - y0, 1)), 0)
    pts = [(float(x - x0), float(y - y0)) for x, y in poly]
    draw = ImageDraw.Draw(img)
    if grow > 0:
        draw.polygon(pts, fill=1, outline=1, width=2 * grow)
    else:
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)[: y1 - y0, : x1 - x0]


def dihedral(points: np.ndarray, k: int) -> np.ndarray:
    """Apply one of the 8 symmetries of the tile (k in 0..7) to (K, 2) points.

    Scenes are built in a canonical frame (e.g. the runway horizontal) and then turned or
    mirrored, which multiplies the variety of orientations at no cost to the builders."""
    p = np.asarray(points, float) - SIZE / 2
    if k & 4:
        p = p * [-1, 1]
    for _ in range(k & 3):
        p = np.stack([-p[:, 1], p[:, 0]], axis=1)  # +90 degrees in image coordinates
    return p + SIZE / 2


def dihedral_angle(angle: float, k: int) -> float:
    """Heading after the same symmetry as `dihedral` (a mirror flips the heading)."""
    v = dihedral(np.array([[math.cos(angle), math.sin(angle)], [0.0, 0.0]]) + SIZE / 2, k)
    d = v[0] - v[1]
    return math.atan2(d[1], d[0])


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, numpy only, no wrap-around at the edges."""
    out = mask.copy()
    for axis in (0, 1):
        acc = out.copy()
        for k in range(1, r + 1):
            if axis == 0:
                acc[k:] |= out[:-k]
                acc[:-k] |= out[k:]
            else:
                acc[:, k:] |= out[:, :-k]
                acc[:, :-k] |= out[:, k:]
        out = acc
    return out
