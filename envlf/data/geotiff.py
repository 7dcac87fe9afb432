"""GeoTIFF / Cloud-Optimised GeoTIFF scenes -> georeferenced chips the index can hold.

    envlf index build --checkpoint CKPT --source scenes/ --out indexes/county [--chip-size 256] \
        [--chip-overlap 32] [--bands 1,2,3] [--min-valid 0.5]

A scene is read window by window with rasterio (never whole: a 40,000-pixel COG costs one
chip's memory at a time). Each chip is one ``ImageRecord`` whose image is written once as a PNG
under ``<index>/chips/<scene>/`` (the app shows it, explains it and the index re-encodes it
from there), with its place in ``record.meta["geo"]``:

    scene      the scene file            window   [col_off, row_off, width, height] in pixels
    crs        the scene's CRS (WKT id)  bounds   [minx, miny, maxx, maxy] in that CRS
    lonlat     [west, south, east, north] in WGS84 (pyproj, the chip's four corners)
    lon, lat   the chip's centre in WGS84

Chips: ``size`` pixels a side (default 256, the size the ``lite`` model was trained on),
stepping by ``size - overlap``; the last row and column are moved inward to end on the scene's
edge, so every pixel is in a chip and no chip hangs over the edge (a scene smaller than one
chip is one chip of the scene's size). A chip whose share of valid pixels (rasterio's mask:
nodata value, alpha band or internal mask) is below ``min_valid`` is skipped; invalid pixels
of the chips kept are black. Bands: ``bands`` (1-based) or 1, 2, 3; 8-bit data is shown as
it is, any other type is stretched per band between the 2nd and 98th percentile of the
scene's valid pixels, read from its overview (a decimated read, at most `STATS_SIDE` pixels a
side: the pyramid of a COG, never the full resolution).

Bad scenes raise `SceneError` with one line that names the file: not readable as a raster
(or truncated: the first unreadable window says so), no CRS, fewer than 3 bands without
``--bands``, a band number the scene lacks, or a CRS other than the rest of the index's. Every
scene is chipped before the index is touched, so a bad scene leaves the index as it was.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from envlf.data.datasets import CaptionDataset, ImageRecord
from envlf.errors import first_line

log = logging.getLogger(__name__)

SCENE_SUFFIXES = (".tif", ".tiff")
STATS_SIDE = 1024  # longest side of the decimated read the stretch statistics come from
GEO_KEY = "geo"  # ImageRecord.meta key of a chip's place


class SceneError(ValueError):
    """A scene that cannot be chipped, with a one-line reason naming the file."""


@dataclass(frozen=True)
class ChipOptions:
    size: int = 256
    overlap: int = 0
    bands: tuple[int, ...] | None = None  # 1-based band numbers for R, G, B; None: 1, 2, 3
    min_valid: float = 0.5  # skip chips with a smaller share of valid pixels
    percentiles: tuple[float, float] = (2.0, 98.0)  # stretch of non-8-bit data

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"chip size must be at least 16 pixels, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"chip overlap must be in [0, chip size), got {self.overlap}")
        if not 0.0 <= self.min_valid <= 1.0:
            raise ValueError(f"min_valid must be in [0, 1], got {self.min_valid}")
        if self.bands is not None and len(self.bands) != 3:
            raise ValueError(f"bands takes three band numbers (R,G,B), got {list(self.bands)}")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """"3,2,1" -> (3, 2, 1); "" / None -> None."""
    if not text:
        return None
    try:
        bands = tuple(int(b) for b in str(text).split(","))
    except ValueError:
        raise ValueError(f"--bands takes three band numbers such as 1,2,3, got {text!r}") from None
    if len(bands) != 3 or min(bands) < 1:
        raise ValueError(f"--bands takes three band numbers (1-based) such as 1,2,3, got {text!r}")
    return bands


def is_scene_source(spec: str | Path) -> bool:
    """A GeoTIFF file, or a folder holding GeoTIFFs and no dataset file of another layout."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.suffix.lower() in SCENE_SUFFIXES
    if not p.is_dir() or (p / "dataset.json").exists() or any(p.glob("*_caps.txt")):
        return False
    return bool(scene_files(p))


def scene_files(spec: str | Path) -> list[Path]:
    """The scene files of a file or folder (the folder and its sub-folders), sorted."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SCENE_SUFFIXES)


def windows(width: int, height: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(col_off, row_off, w, h) of every chip of a width x height scene: a grid stepping by
    size - overlap, the last row / column moved inward to end on the edge."""

    def offsets(n: int) -> list[int]:
        if n <= size:
            return [0]
        step = size - overlap
        out = list(range(0, n - size + 1, step))
        if out[-1] != n - size:
            out.append(n - size)
        return out

    w, h = min(size, width), min(size, height)
    return [(c, r, w, h) for r in offsets(height) for c in offsets(width)]


def _limits(src, bands: Sequence[int], percentiles: tuple[float, float]) -> list[tuple[float, float]] | None:
    """None for 8-bit bands (shown as they are), else their stretch limits (`_stretch_limits`)."""
    if all(src.dtypes[b - 1] == "uint8" for b in bands):
        return None
    return _stretch_limits(src, bands, percentiles)


def _stretch_limits(src, bands: Sequence[int], percentiles: tuple[float, float]) -> list[tuple[float, float]]:
    """Per band (lo, hi) from a decimated read of the scene (its overviews when it has them)."""
    scale = max(1.0, max(src.width, src.height) / STATS_SIDE)
    shape = (len(bands), max(1, int(src.height / scale)), max(1, int(src.width / scale)))
    data = src.read(list(bands), out_shape=shape, masked=True)
    limits = []
    for b in range(len(bands)):
        valid = data[b].compressed()
        if valid.size == 0:
            limits.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(valid.astype(np.float64), percentiles)
        limits.append((float(lo), float(hi) if hi > lo else float(lo) + 1.0))
    return limits


def to_rgb8(data: np.ma.MaskedArray, limits: list[tuple[float, float]] | None) -> np.ndarray:
    """(3, h, w) masked band data -> (h, w, 3) uint8; invalid pixels black. limits None: the
    data are 8-bit already."""
    if limits is None:
        out = np.asarray(data.filled(0), dtype=np.uint8)
    else:
        out = np.empty(data.shape, np.uint8)
        for b, (lo, hi) in enumerate(limits):
            x = (np.asarray(data[b].filled(lo), np.float64) - lo) / (hi - lo)
            out[b] = np.clip(np.round(255.0 * x), 0, 255).astype(np.uint8)
        out[:, np.ma.getmaskarray(data).any(0)] = 0
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scene"


def open_scene(path: Path, bands: tuple[int, ...] | None, crs=None):
    """rasterio dataset of a scene that can be chipped (raises SceneError otherwise) and its bands."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        src = rasterio.open(path)
    except (RasterioError, OSError) as e:
        raise SceneError(f"{path}: not readable as a GeoTIFF ({first_line(e)})") from None
    try:
        if src.crs is None:
            raise SceneError(f"{path}: no coordinate reference system (CRS), so its chips cannot be placed on a "
                             "map; assign one first (gdal_edit.py -a_srs EPSG:xxxx)")
        use = bands or (1, 2, 3)
        if bands is None and src.count < 3:
            raise SceneError(f"{path}: {src.count} band(s), RGB needs 3; choose them with --bands "
                             "(e.g. --bands 1,1,1 for a single-band scene)")
        if max(use) > src.count:
            raise SceneError(f"{path}: has {src.count} band(s), --bands asks for band {max(use)}")
        if crs is not None and src.crs != crs:
            raise SceneError(f"{path}: CRS {src.crs.to_string()} differs from the other scenes' "
                             f"{crs.to_string()}; reproject it first (gdalwarp -t_srs {crs.to_string()})")
    except SceneError:
        src.close()
        raise
    return src, use


def _scene_limits(src, path: Path, bands: Sequence[int], opts: ChipOptions):
    from rasterio.errors import RasterioError

    try:
        return _limits(src, bands, opts.percentiles)
    except (RasterioError, OSError) as e:
        raise SceneError(f"{path}: unreadable (truncated?): {first_line(e)}") from None


def _planned_chips(src, path: Path, stem: str, out_dir: Path, opts: ChipOptions) -> list[ImageRecord]:
    """One record per window of the scene, its place in ``meta["geo"]`` (no ``valid`` yet: that
    needs the pixels), its PNG path under out_dir/stem (not written). All windows at once: the
    bounds as rasterio.windows.bounds computes them (the affine's order of operations), one
    pyproj call for every corner and centre."""
    from pyproj import Transformer

    wins = windows(src.width, src.height, opts.size, opts.overlap)
    col, row, w, h = (np.array(v, np.float64) for v in zip(*wins))
    t = src.transform

    def apply(x, y):  # affine.Affine.__mul__, elementwise
        return x * t.a + y * t.b + t.c, x * t.d + y * t.e + t.f

    left, bottom = apply(col, row + h)
    right, top = apply(col + w, row)
    to_wgs84 = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
    xs, ys = to_wgs84.transform(np.stack([left, right, right, left]), np.stack([bottom, bottom, top, top]))
    cx, cy = to_wgs84.transform((left + right) / 2, (bottom + top) / 2)
    lonlat = np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], 1).tolist()
    bounds = np.stack([left, bottom, right, top], 1).tolist()
    crs_id = src.crs.to_string()
    scene = str(path)
    out = []
    for i, (c, r, ww, hh) in enumerate(wins):
        geo = {"scene": scene, "window": [c, r, ww, hh], "crs": crs_id, "bounds": bounds[i], "lonlat": lonlat[i],
               "lon": float(cx[i]), "lat": float(cy[i])}
        out.append(ImageRecord(f"{stem}/c{c}_r{r}", out_dir / stem / f"c{c}_r{r}.png", "all", [], None, {GEO_KEY: geo}))
    return out


def cut_chip(src, path: Path, bands: Sequence[int], limits, window: Sequence[int],
             min_valid: float) -> tuple[np.ndarray | None, float]:
    """The chip's RGB pixels ((h, w, 3) uint8) and its share of valid pixels; None for the pixels
    when that share is below min_valid (or nothing is valid). Raises SceneError when the window
    cannot be read."""
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    col, row, w, h = window
    try:
        data = src.read(list(bands), window=Window(col, row, w, h), masked=True)
    except (RasterioError, OSError) as e:
        raise SceneError(f"{path}: unreadable at pixels {col},{row} (truncated?): {first_line(e)}") from None
    valid = 1.0 - float(np.ma.getmaskarray(data).any(0).mean())
    if valid < min_valid or valid == 0.0:
        return None, valid
    return to_rgb8(data, limits), valid


def save_chip(rgb: np.ndarray, path: Path) -> None:
    """Write a chip's PNG whole (a temporary name, then renamed: two writers of one chip, such
    as a retried extraction task, leave one whole file)."""
    import os

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)


def chip_scene(path: Path, out_dir: Path, opts: ChipOptions, crs=None,
               stem: str | None = None) -> Iterator[ImageRecord]:
    """Chip one scene: yields one record per kept chip (its PNG written under out_dir/stem)."""
    src, bands = open_scene(path, opts.bands, crs)
    with src:
        stem = stem or _safe(path.stem)
        limits = _scene_limits(src, path, bands, opts)
        (out_dir / stem).mkdir(parents=True, exist_ok=True)
        for rec in _planned_chips(src, path, stem, out_dir, opts):
            geo = rec.meta[GEO_KEY]
            rgb, valid = cut_chip(src, path, bands, limits, geo["window"], opts.min_valid)
            if rgb is None:
                continue
            save_chip(rgb, rec.path)
            geo["valid"] = round(valid, 4)
            yield rec


def _named_scenes(spec: str | Path, known: dict[str, str] | None) -> list[tuple[Path, str]]:
    """(file, the name its chips' ids start with) of every scene of a file or folder: the name
    `known` gives (the index it joins holds it already), else its stem made unique."""
    files = scene_files(spec)
    if not files:
        raise SceneError(f"{spec}: no GeoTIFF scenes (*.tif, *.tiff)")
    known = dict(known or {})
    stems: set[str] = set(known.values())
    out = []
    for f in files:
        stem = known.get(str(f))
        if stem is None:
            stem = _safe(f.stem)
            while stem in stems:  # two folders holding scene.tif, or a name the index uses
                stem += "_"
        stems.add(stem)
        out.append((f, stem))
    return out


def chip_scenes(spec: str | Path, out_dir: str | Path, opts: ChipOptions | None = None, crs=None,
                known: dict[str, str] | None = None) -> CaptionDataset:
    """Every scene of a file or folder, chipped (see the module docstring). All scenes must share
    one CRS (the first scene's, or `crs`: that of the index they join). known: scene path ->
    the name its chips already carry in the index they join (a scene added again keeps its chip
    ids, so the index skips them; a new scene never takes a name in use). Raises SceneError."""
    import rasterio

    opts = opts or ChipOptions()
    out_dir = Path(out_dir)
    if isinstance(crs, str):
        crs = rasterio.crs.CRS.from_string(crs)
    records: list[ImageRecord] = []
    for f, stem in _named_scenes(spec, known):
        kept = list(chip_scene(f, out_dir, opts, crs, stem))
        if crs is None:
            with rasterio.open(f) as src:
                crs = src.crs
        log.info("%s: %d chips", f, len(kept))
        records += kept
    if not records:
        raise SceneError(f"{spec}: no chip has {opts.min_valid:.0%} valid pixels (all nodata?)")
    return CaptionDataset(Path(spec).name or "scenes", Path(spec).expanduser(), records)


def plan_scenes(spec: str | Path, out_dir: str | Path, opts: ChipOptions | None = None
                ) -> tuple[CaptionDataset, dict]:
    """The chips of every scene of a file or folder, planned but not cut: what a distributed job
    (envlf.search.extract) hands to its workers, which read the windows (`cut_planned`). Only the
    scenes' headers and their decimated statistics reads happen here; every check of
    `chip_scenes` that needs no chip's pixels too (readable, CRS, bands, one CRS). Returns the
    planned records (their PNG paths not written yet) and the chipping recipe:
    ``{"size", "overlap", "min_valid", "scenes": {scene path: {"bands", "limits"}}}``."""
    opts = opts or ChipOptions()
    out_dir = Path(out_dir)
    records: list[ImageRecord] = []
    recipe = {"size": opts.size, "overlap": opts.overlap, "min_valid": opts.min_valid, "scenes": {}}
    crs = None
    for f, stem in _named_scenes(spec, None):
        src, bands = open_scene(f, opts.bands, crs)
        with src:
            crs = src.crs
            limits = _scene_limits(src, f, bands, opts)
            records += _planned_chips(src, f, stem, out_dir, opts)
        recipe["scenes"][str(f)] = {"bands": list(bands), "limits": limits}
    return CaptionDataset(Path(spec).name or "scenes", Path(spec).expanduser(), records), recipe


def cut_planned(geos: Sequence[str], paths: Sequence[str | Path], recipe: dict
                ) -> tuple[list[int], list[str], list[dict]]:
    """Cut the planned chips (`plan_scenes`): each chip's JSON place and PNG path -> (the
    positions of the chips kept, their places with ``valid`` added as `chip_scene` records it,
    ``{"position", "error", "empty"?}`` for each one left out: mostly nodata (``empty``), or an
    unreadable window).
    A place whose scene the recipe does not list (a plain image) is kept as it is."""
    import json

    kept, out, left = [], [], []
    open_scenes: dict[str, tuple] = {}
    try:
        for i, (g, path) in enumerate(zip(geos, paths)):
            geo = json.loads(g) if g else None
            scene = recipe["scenes"].get(geo["scene"]) if geo else None
            if scene is None:
                kept.append(i)
                out.append(g)
                continue
            try:
                if geo["scene"] not in open_scenes:  # None: moved or damaged since it was planned
                    open_scenes[geo["scene"]] = None
                    open_scenes[geo["scene"]] = open_scene(Path(geo["scene"]), tuple(scene["bands"]))
                if open_scenes[geo["scene"]] is None:
                    raise SceneError(f"{geo['scene']}: cannot be opened (moved or damaged since it was planned)")
                src, bands = open_scenes[geo["scene"]]
                rgb, valid = cut_chip(src, Path(geo["scene"]), bands, scene["limits"], geo["window"],
                                      recipe["min_valid"])
            except SceneError as e:
                left.append({"position": i, "error": str(e)})
                continue
            if rgb is None:
                left.append({"position": i, "error": f"{valid:.0%} valid pixels (below {recipe['min_valid']:.0%})",
                             "empty": True})
                continue
            save_chip(rgb, Path(path))
            geo["valid"] = round(valid, 4)
            kept.append(i)
            out.append(json.dumps(geo))
    finally:
        for opened in open_scenes.values():
            if opened is not None:
                opened[0].close()
    return kept, out, left


def scene_overview(path: str | Path, max_side: int = 512, bands: tuple[int, ...] | None = None):
    """A scene's downsampled RGB picture ((h, w, 3) uint8, from its overviews: a decimated read)
    and its WGS84 bounds [west, south, east, north]: the map's offline background."""
    from rasterio.warp import transform_bounds

    src, use = open_scene(Path(path), bands)
    with src:
        scale = max(1.0, max(src.width, src.height) / max_side)
        shape = (3, max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        data = src.read(list(use), out_shape=shape, masked=True)
        limits = _limits(src, use, ChipOptions().percentiles)
        bounds = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))
    return to_rgb8(data, limits), bounds


def geo_of(record: ImageRecord) -> dict | None:
    return (record.meta or {}).get(GEO_KEY)


# -- synthetic georeferenced scenes from the demo world ------------------------------------------

DEMO_CRS = "EPSG:32633"  # UTM zone 33N
DEMO_ORIGIN = (500_000.0, 5_000_000.0)  # upper-left corner of the first scene, metres
DEMO_PIXEL = 0.5  # metres per pixel


def make_demo_scenes(world: str | Path, out_dir: str | Path, n_scenes: int = 2, grid: int = 3,
                     dtype: str = "uint8", nodata_rows: int = 1, crs: str = DEMO_CRS) -> list[Path]:
    """Write `n_scenes` GeoTIFFs (tiled, deflate, with overviews: COG-like) of grid x grid demo
    world tiles each, side by side in `crs`, 0.5 m pixels; the last `nodata_rows` tile rows of
    each scene are nodata (0), as a scene's edge often is. dtype "uint16": 16-bit values (x 40 +
    100), which chipping must stretch back. Returns the files; the tile of scene s at grid (r, c)
    is world record s * grid * grid + r * grid + c."""
    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    from envlf.data.datasets import load_dataset

    ds = load_dataset(world)
    tile = Image.open(ds.records[0].path).size[0]
    need = n_scenes * grid * grid
    if len(ds) < need:
        raise ValueError(f"{world}: {len(ds)} tiles, {need} needed for {n_scenes} scenes of {grid}x{grid}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(n_scenes):
        side = grid * tile
        mosaic = np.zeros((3, side, side), np.uint16 if dtype == "uint16" else np.uint8)
        for r in range(grid - nodata_rows):
            for c in range(grid):
                im = np.asarray(Image.open(ds.records[s * grid * grid + r * grid + c].path).convert("RGB"))
                px = im.transpose(2, 0, 1).astype(mosaic.dtype)
                if dtype == "uint16":
                    px = px * 40 + 100
                mosaic[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = px
        x0 = DEMO_ORIGIN[0] + s * side * DEMO_PIXEL
        path = out_dir / f"scene{s}.tif"
        profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": dtype, "crs": crs,
                   "transform": from_origin(x0, DEMO_ORIGIN[1], DEMO_PIXEL, DEMO_PIXEL), "nodata": 0,
                   "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(mosaic)
            dst.build_overviews([2, 4], Resampling.average)
        files.append(path)
    return files
