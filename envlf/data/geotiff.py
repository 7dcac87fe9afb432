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


def chip_scene(path: Path, out_dir: Path, opts: ChipOptions, crs=None,
               stem: str | None = None) -> Iterator[ImageRecord]:
    """Chip one scene: yields one record per kept chip (its PNG written under out_dir/stem)."""
    from PIL import Image
    from pyproj import Transformer
    from rasterio.errors import RasterioError
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    src, bands = open_scene(path, opts.bands, crs)
    with src:
        stem = stem or _safe(path.stem)
        try:
            limits = _limits(src, bands, opts.percentiles)
        except (RasterioError, OSError) as e:
            raise SceneError(f"{path}: unreadable (truncated?): {first_line(e)}") from None
        to_wgs84 = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        crs_id = src.crs.to_string()
        folder = out_dir / stem
        folder.mkdir(parents=True, exist_ok=True)
        for col, row, w, h in windows(src.width, src.height, opts.size, opts.overlap):
            win = Window(col, row, w, h)
            try:
                data = src.read(list(bands), window=win, masked=True)
            except (RasterioError, OSError) as e:
                raise SceneError(f"{path}: unreadable at pixels {col},{row} (truncated?): {first_line(e)}") from None
            valid = 1.0 - float(np.ma.getmaskarray(data).any(0).mean())
            if valid < opts.min_valid or valid == 0.0:
                continue
            image_path = folder / f"c{col}_r{row}.png"
            Image.fromarray(to_rgb8(data, limits)).save(image_path)
            minx, miny, maxx, maxy = window_bounds(win, src.transform)
            xs, ys = to_wgs84.transform([minx, maxx, maxx, minx], [miny, miny, maxy, maxy])
            cx, cy = to_wgs84.transform((minx + maxx) / 2, (miny + maxy) / 2)
            geo = {"scene": str(path), "window": [col, row, w, h], "crs": crs_id,
                   "bounds": [minx, miny, maxx, maxy], "lonlat": [min(xs), min(ys), max(xs), max(ys)],
                   "lon": cx, "lat": cy, "valid": round(valid, 4)}
            yield ImageRecord(f"{stem}/c{col}_r{row}", image_path, "all", [], None, {GEO_KEY: geo})


def chip_scenes(spec: str | Path, out_dir: str | Path, opts: ChipOptions | None = None, crs=None,
                known: dict[str, str] | None = None) -> CaptionDataset:
    """Every scene of a file or folder, chipped (see the module docstring). All scenes must share
    one CRS (the first scene's, or `crs`: that of the index they join). known: scene path ->
    the name its chips already carry in the index they join (a scene added again keeps its chip
    ids, so the index skips them; a new scene never takes a name in use). Raises SceneError."""
    import rasterio

    opts = opts or ChipOptions()
    files = scene_files(spec)
    if not files:
        raise SceneError(f"{spec}: no GeoTIFF scenes (*.tif, *.tiff)")
    out_dir = Path(out_dir)
    if isinstance(crs, str):
        crs = rasterio.crs.CRS.from_string(crs)
    known = dict(known or {})
    records: list[ImageRecord] = []
    stems: set[str] = set(known.values())
    for f in files:
        stem = known.get(str(f))
        if stem is None:
            stem = _safe(f.stem)
            while stem in stems:  # two folders holding scene.tif, or a name the index uses
                stem += "_"
        stems.add(stem)
        kept = list(chip_scene(f, out_dir, opts, crs, stem))
        if crs is None:
            with rasterio.open(f) as src:
                crs = src.crs
        log.info("%s: %d chips", f, len(kept))
        records += kept
    if not records:
        raise SceneError(f"{spec}: no chip has {opts.min_valid:.0%} valid pixels (all nodata?)")
    return CaptionDataset(Path(spec).name or "scenes", Path(spec).expanduser(), records)


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
