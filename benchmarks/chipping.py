"""`envlf bench chipping`: what cutting GeoTIFF scenes into chips costs, and who pays it.

    envlf bench chipping --side 8192 --scenes 2 --work /tmp/chipping

`index build --source scenes/` chips in its own process (`chip_scenes`: read each window, write
its PNG); `index extract` plans in the driver (`plan_scenes`: the scenes' headers and a
decimated statistics read, the windows' places) and the workers cut (`cut_planned`). This
writes `--scenes` synthetic COG-like scenes (`--side` pixels a side, 16-bit, 4 bands, tiled,
deflate, overviews; the bottom eighth nodata) and times each step in this one process (one
core: `--threads 1` for GDAL), so the table reads as chips/s per core: how many workers'
worth of chips the driver can plan, against how many one core can cut.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def write_scene(path: Path, side: int, seed: int, x0: float = 500_000.0) -> Path:
    """A side x side 16-bit 4-band scene in EPSG:32633 (0.5 m pixels): smooth fields plus noise,
    the bottom eighth nodata (0), tiled 256, deflate, overviews 2..16: a COG's layout."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 4, "dtype": "uint16",
               "crs": "EPSG:32633", "transform": from_origin(x0, 5_000_000.0, 0.5, 0.5), "nodata": 0,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    yy, xx = np.mgrid[0:256, 0:side].astype(np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, side, 256):  # strip by strip: never the whole scene in memory
            h = min(256, side - row)
            base = 2000 + 800 * np.sin((xx[:h] + seed * 97) / 300.0) * np.cos((yy[:h] + row) / 210.0)
            strip = np.stack([base + 300 * b + rng.normal(0, 120, base.shape) for b in range(4)])
            strip = np.clip(strip, 1, 65535).astype(np.uint16)
            if row + h > side * 7 // 8:
                strip[:, max(0, side * 7 // 8 - row):, :] = 0
            dst.write(strip, window=rasterio.windows.Window(0, row, side, h))
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return path


def benchmark_chipping(work: str | Path, side: int = 8192, n_scenes: int = 2, size: int = 256,
                       overlap: int = 0) -> list[dict[str, Any]]:
    import rasterio

    from envlf.data.geotiff import GEO_KEY, ChipOptions, chip_scenes, cut_planned, plan_scenes

    work = Path(work)
    scenes = work / "scenes"
    shutil.rmtree(work, ignore_errors=True)
    scenes.mkdir(parents=True)
    t = time.perf_counter()
    for s in range(n_scenes):
        write_scene(scenes / f"scene{s}.tif", side, s, x0=500_000.0 + s * side * 0.5)
    write_s = time.perf_counter() - t
    opts = ChipOptions(size=size, overlap=overlap, bands=(3, 2, 1))
    with rasterio.Env(GDAL_NUM_THREADS="1"):
        t = time.perf_counter()
        planned, recipe = plan_scenes(scenes, work / "planned", opts)
        plan_s = time.perf_counter() - t
        t = time.perf_counter()
        geos = [json.dumps(r.meta[GEO_KEY]) for r in planned.records]
        kept, _, left = cut_planned(geos, [str(r.path) for r in planned.records], recipe)
        cut_s = time.perf_counter() - t
        t = time.perf_counter()
        serial = chip_scenes(scenes, work / "serial", opts)
        serial_s = time.perf_counter() - t
    assert len(serial) == len(kept), (len(serial), len(kept))  # the two paths keep the same chips
    n = len(planned)
    row = {"scenes": n_scenes, "side": side, "chip": size, "overlap": overlap, "windows": n, "chips": len(kept),
           "empty": len(left), "write_scenes_s": round(write_s, 2),
           "plan_s": round(plan_s, 3), "plan_windows_per_s": round(n / plan_s, 1),
           "cut_s": round(cut_s, 3), "cut_windows_per_s": round(n / cut_s, 1),
           "serial_s": round(serial_s, 3), "serial_windows_per_s": round(n / serial_s, 1),
           "cores_the_driver_feeds": round((n / plan_s) / (n / cut_s), 1)}
    return [row]


def format_chipping_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| scenes × side | chip | windows | chips kept | driver: plan windows/s | worker: cut windows/s "
            "| serial chip_scenes windows/s | cores one driver keeps cutting |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['scenes']} × {r['side']:,} px | {r['chip']} | {r['windows']:,} | {r['chips']:,} "
        f"| {r['plan_windows_per_s']:,.0f} | {r['cut_windows_per_s']:,.0f} | {r['serial_windows_per_s']:,.0f} "
        f"| {r['cores_the_driver_feeds']:,.0f} |" for r in rows) + "\n"


def add_parser(sub) -> None:
    c = sub.add_parser("chipping", help="GeoTIFF chipping per core: plan in the driver vs cut in a worker "
                                        "vs index build's serial chipping")
    c.add_argument("--work", required=True, help="scratch directory (scenes + two sets of chip PNGs)")
    c.add_argument("--side", type=int, default=8192, help="scene side in pixels")
    c.add_argument("--scenes", type=int, default=2)
    c.add_argument("--chip-size", type=int, default=256)
    c.add_argument("--chip-overlap", type=int, default=0)
    c.add_argument("--keep", action="store_true", help="keep the scenes and chips")
    c.add_argument("--json", default=None)


def cmd_chipping(args) -> int:
    os.environ.setdefault("GDAL_NUM_THREADS", "1")
    rows = benchmark_chipping(args.work, args.side, args.scenes, args.chip_size, args.chip_overlap)
    print(format_chipping_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0
