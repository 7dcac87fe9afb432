"""GeoTIFF scenes -> georeferenced chips -> an index whose hits know where they are.

Scenes are made from the tiny dataset's tiles (`make_demo_scenes`: 48-px tiles, 2 x 2 per scene,
the last tile row nodata), so every chip's pixels and place can be checked exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio")
import rasterio.transform  # noqa: E402
import rasterio.warp  # noqa: E402
import rasterio.windows  # noqa: E402

from envlf.data.datasets import load_dataset  # noqa: E402
from envlf.data.geotiff import (  # noqa: E402
    DEMO_PIXEL, ChipOptions, SceneError, chip_scenes, is_scene_source, make_demo_scenes, windows)

REPO = Path(__file__).resolve().parents[1]
TILE = 48


@pytest.fixture
def scenes(tiny_data, tmp_path) -> Path:
    make_demo_scenes(tiny_data, tmp_path / "scenes", n_scenes=2, grid=2)
    return tmp_path / "scenes"


def test_windows_cover_the_scene_and_end_on_its_edges():
    assert windows(100, 60, 40, 0) == [(c, r, 40, 40) for r in (0, 20) for c in (0, 40, 60)]
    assert windows(100, 40, 40, 10) == [(0, 0, 40, 40), (30, 0, 40, 40), (60, 0, 40, 40)]
    assert windows(30, 20, 40, 0) == [(0, 0, 30, 20)]  # smaller than a chip: the scene is one chip
    for col, row, w, h in windows(1000, 777, 256, 32):
        assert col + w <= 1000 and row + h <= 777
    with pytest.raises(ValueError, match="overlap"):
        ChipOptions(size=64, overlap=64)


def test_chips_hold_the_scene_pixels_their_place_and_skip_nodata(scenes, tiny_data, tmp_path):
    ds = chip_scenes(scenes, tmp_path / "chips", ChipOptions(size=TILE))
    # 2 scenes of 2 x 2 tiles, the bottom row nodata: 2 chips each
    assert [r.image_id for r in ds.records] == ["scene0/c0_r0", "scene0/c48_r0", "scene1/c0_r0", "scene1/c48_r0"]
    world = load_dataset(tiny_data).records
    for r, source in zip(ds.records, [world[0], world[1], world[4], world[5]]):
        # 8-bit data: the chip is the tile, pixel for pixel
        assert np.array_equal(np.asarray(Image.open(r.path)), np.asarray(Image.open(source.path).convert("RGB")))
    for r in ds.records:
        geo = r.meta["geo"]
        col, row, w, h = geo["window"]
        with rasterio.open(geo["scene"]) as src:
            assert src.crs.to_string() == geo["crs"] == "EPSG:32633"
            assert geo["bounds"] == pytest.approx(list(rasterio.windows.bounds(
                rasterio.windows.Window(col, row, w, h), src.transform)))
            # the centre in WGS84 by GDAL's own transform (rasterio.warp), not pyproj's
            cx, cy = src.xy(row + h / 2, col + w / 2, offset="ul")
            (lon,), (lat,) = rasterio.warp.transform(src.crs, "EPSG:4326", [cx], [cy])
        assert (geo["lon"], geo["lat"]) == pytest.approx((lon, lat), abs=1e-9)
        west, south, east, north = geo["lonlat"]
        assert west < geo["lon"] < east and south < geo["lat"] < north
        assert (geo["bounds"][2] - geo["bounds"][0]) == pytest.approx(TILE * DEMO_PIXEL)
    # overlapping chips over the nodata edge: a chip half valid is kept at min_valid 0.5, not at 0.6
    half = chip_scenes(scenes / "scene0.tif", tmp_path / "c2", ChipOptions(size=TILE, overlap=24))
    assert {r.image_id for r in half.records} == {f"scene0/c{c}_r{r}" for c in (0, 24, 48) for r in (0, 24)}
    fewer = chip_scenes(scenes / "scene0.tif", tmp_path / "c3", ChipOptions(size=TILE, overlap=24, min_valid=0.6))
    assert {r.image_id for r in fewer.records} == {f"scene0/c{c}_r0" for c in (0, 24, 48)}
    chip = np.asarray(Image.open(next(r.path for r in half.records if r.image_id == "scene0/c0_r24")))
    assert not chip[TILE // 2:].any() and chip[:TILE // 2].any()  # the nodata half is black


def test_sixteen_bit_scenes_are_stretched_back_to_the_tiles(tiny_data, tmp_path):
    make_demo_scenes(tiny_data, tmp_path / "s16", n_scenes=1, grid=2, dtype="uint16")
    ds = chip_scenes(tmp_path / "s16", tmp_path / "chips", ChipOptions(size=TILE))
    tile = np.asarray(Image.open(load_dataset(tiny_data).records[0].path).convert("RGB")).astype(float)
    chip = np.asarray(Image.open(ds.records[0].path)).astype(float)
    assert chip.max() == 255 and chip.min() == 0  # stretched over the 2nd-98th percentile
    for b in range(3):  # per band, the pixels not clipped are a linear map of the tile's, to rounding
        x, y = tile[..., b].ravel(), chip[..., b].ravel()
        inside = (y > 0) & (y < 255)
        assert inside.mean() > 0.5
        slope, offset = np.polyfit(x[inside], y[inside], 1)
        assert slope > 0 and np.abs(slope * x[inside] + offset - y[inside]).max() <= 1.0


def _write(path: Path, count: int = 3, crs: str | None = "EPSG:32633", size: int = 64):
    profile = {"driver": "GTiff", "width": size, "height": size, "count": count, "dtype": "uint8",
               "transform": rasterio.transform.from_origin(0, 0, 1, 1)}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((count, size, size), 100, np.uint8))
    return path


def test_bad_scenes_get_one_line_that_names_the_file(tmp_path):
    out = tmp_path / "chips"

    def error(path, **kw) -> str:
        with pytest.raises(SceneError) as e:
            chip_scenes(path, out, ChipOptions(size=32), **kw)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "no coordinate reference system" in error(_write(tmp_path / "nocrs.tif", crs=None))
    assert "1 band(s), RGB needs 3" in error(_write(tmp_path / "grey.tif", count=1))
    assert chip_scenes(tmp_path / "grey.tif", out, ChipOptions(size=32, bands=(1, 1, 1))).records  # --bands 1,1,1
    with pytest.raises(SceneError, match="asks for band 4"):
        chip_scenes(tmp_path / "grey.tif", out, ChipOptions(size=32, bands=(1, 2, 4)))
    assert "differs from the other scenes' EPSG:32633" in error(_write(tmp_path / "wgs.tif", crs="EPSG:4326"),
                                                                crs="EPSG:32633")
    (tmp_path / "text.tif").write_text("not a raster")
    assert "not readable as a GeoTIFF" in error(tmp_path / "text.tif")
    whole = _write(tmp_path / "whole.tif", size=512)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # truncated: the header says 512 x 512
    assert "cut.tif" in error(cut)


def _run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENVLF_HOME": str(home), "HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "envlf", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=600)


def test_index_build_add_and_search_scenes_as_a_user_runs_them(tiny_data, tmp_path):
    """The README's commands as processes on an empty home: scenes from a world, an index of
    their chips (with its worker pool), search hits with lon/lat, a second scene added, and a
    scene in another CRS refused in one line with the index as it was."""
    import torch

    from envlf.model.core import create_model
    from envlf.search.index import GalleryIndex

    home = tmp_path / "home"
    home.mkdir()
    torch.manual_seed(0)
    ckpt = str(create_model("tiny").save_pretrained(tmp_path / "ckpt"))
    r = _run("world", "scenes", "--data", str(tiny_data), "--out", str(tmp_path / "scenes"), "--n", "2", "--grid", "2",
             home=home)
    assert r.returncode == 0, r.stderr
    (tmp_path / "later").mkdir()
    (tmp_path / "scenes" / "scene1.tif").rename(tmp_path / "later" / "scene1.tif")
    assert is_scene_source(tmp_path / "scenes") and not is_scene_source(tiny_data)
    index = tmp_path / "idx"
    r = _run("index", "build", "--checkpoint", ckpt, "--source", str(tmp_path / "scenes"), "--out", str(index),
             "--chip-size", str(TILE), "--workers", "2", home=home)
    assert r.returncode == 0, r.stderr
    assert GalleryIndex.load(index).crs == "EPSG:32633" and len(GalleryIndex.load(index)) == 2
    r = _run("index", "add", "--index", str(index), "--checkpoint", ckpt, "--source", str(tmp_path / "later"),
             "--chip-size", str(TILE), home=home)
    assert r.returncode == 0, r.stderr
    idx = GalleryIndex.load(index)
    assert len(idx) == 4 and sorted(idx.geo_frame()["scene"].unique()) == sorted(
        [str(tmp_path / "scenes" / "scene0.tif"), str(tmp_path / "later" / "scene1.tif")])
    assert (tmp_path / "idx.chips" / "scene1" / "c48_r0.png").is_file()
    r = _run("index", "search", "--index", str(index), "--checkpoint", ckpt, "--text", "a red square", "-k", "4",
             home=home)
    assert r.returncode == 0, r.stderr
    hits = [line for line in r.stdout.splitlines() if "lon=" in line]
    assert len(hits) == 4 and all("lat=45.15" in h and "lon=15.00" in h for h in hits)
    # a scene in another CRS: one line, and the index keeps its four chips
    (tmp_path / "wgs").mkdir()
    _write(tmp_path / "wgs" / "other.tif", crs="EPSG:4326")
    r = _run("index", "add", "--index", str(index), "--checkpoint", ckpt, "--source", str(tmp_path / "wgs"),
             "--chip-size", "32", home=home)
    assert r.returncode == 2 and "differs from the other scenes' EPSG:32633" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert len(GalleryIndex.load(index)) == 4
    manifest = json.loads((index / "manifest.json").read_text())
    assert [e["event"] for e in manifest["history"]] == ["build", "add"]


def test_the_app_shows_hits_on_the_scene_map_and_a_box_narrows_them(scenes, tmp_path):
    """A gallery of chips: the text -> image tab's map has each scene's overview as background,
    every chip's footprint and the hits labelled by rank; a bounding box keeps only the chips
    centred inside it; the hits carry lon/lat."""
    import torch

    from app_support import make_backend
    from demo.handlers import Handlers
    from envlf.model.core import create_model
    from envlf.search.index import GalleryIndex

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    ds = chip_scenes(scenes, tmp_path / "chips", ChipOptions(size=TILE, overlap=24))
    GalleryIndex.build(model, ds, tmp_path / "index", workers=0, progress=False)
    backend = make_backend({"checkpoint": ckpt, "index": tmp_path / "index", "feedback": tmp_path / "fb.csv",
                            "home": tmp_path / "home"})
    h = Handlers(backend)
    out = h.text_to_image("a red square", k=50, rerank=True, rerank_k=4)
    assert len(out.state["items"]) == len(ds) == 12
    fig = out.geo_plot
    assert len(fig.layout.images) == 2  # the two scenes' overviews, offline
    (ranks,) = [t for t in fig.data if t.name == "rank"]
    assert list(ranks.text) == [f"#{i}" for i in range(1, 13)]
    # the box around scene 0's upper-left chip centres only
    g = {r.image_id: r.meta["geo"] for r in ds.records}
    a, b = g["scene0/c0_r0"], g["scene0/c24_r0"]
    box = f"{a['lon'] - 1e-6}, {a['lat'] - 1e-6}, {b['lon'] + 1e-6}, {b['lat'] + 1e-6}"
    boxed = h.text_to_image("a red square", k=50, rerank=True, rerank_k=4, bbox=box)
    assert sorted(i["image_id"] for i in boxed.state["items"]) == ["scene0/c0_r0", "scene0/c24_r0"]
    assert all(i["geo"]["lon"] == g[i["image_id"]]["lon"] for i in boxed.state["items"])
    assert any(t.name == "search box" for t in boxed.geo_plot.data)
    # a judgement of a chip keeps its place in the feedback CSV and in the JSONL export
    from envlf.feedback.exports import jsonl_records
    from envlf.feedback.store import read_feedback

    h.record_feedback(boxed.state, 1, "relevant", annotator="alice")
    df, _ = read_feedback(tmp_path / "fb.csv")
    first = boxed.state["items"][0]
    assert df["lon"].tolist() == [first["geo"]["lon"]] and df["lat"].tolist() == [first["geo"]["lat"]]
    (rec,) = jsonl_records(df)
    assert rec["positives"][0]["lon"] == first["geo"]["lon"]


def test_a_web_basemap_puts_the_overviews_and_footprints_on_a_tile_map(tmp_path):
    """--basemap: the same map as a MapLibre figure over the tile URL (the overviews as image
    layers at their corners, the rank markers keep their ranks); a bad value gets one line."""
    import numpy as np

    from demo.config import BASEMAPS, load_config
    from demo.plots import geo_figure

    rgb = np.zeros((8, 16, 3), np.uint8)
    scene = [15.0, 45.0, 15.002, 45.001]
    hits = [(1, [15.0, 45.0, 15.001, 45.001], "s/c0_r0"), (2, [15.001, 45.0, 15.002, 45.001], "s/c1_r0")]
    url = "http://tiles.example/{z}/{x}/{y}.png"
    fig = geo_figure([(rgb, scene)], [h[1] for h in hits], hits, bbox=[15.0, 45.0, 15.0015, 45.001],
                     tiles=(url, "© tiles"))
    raster, image = fig.layout.map.layers
    assert raster.sourcetype == "raster" and list(raster.source) == [url] and raster.sourceattribution == "© tiles"
    assert image.sourcetype == "image" and image.source.startswith("data:image/png;base64,")
    assert [list(c) for c in image.coordinates] == [[15.0, 45.001], [15.002, 45.001], [15.002, 45.0], [15.0, 45.0]]
    (ranks,) = [t for t in fig.data if t.name == "rank"]
    assert ranks.type == "scattermap" and list(ranks.customdata) == [1, 2]
    assert np.allclose(ranks.lon, [15.0005, 15.0015]) and np.allclose(ranks.lat, [45.0005, 45.0005])
    assert {t.name for t in fig.data} == {"indexed chips", "search box", "results", "rank"}
    assert abs(fig.layout.map.center.lon - 15.001) < 1e-9 and 15 < fig.layout.map.zoom < 21
    assert not fig.layout.images  # nothing drawn twice
    # offline (the default): a lon/lat plot, no map, nothing fetched
    assert geo_figure([(rgb, scene)], [h[1] for h in hits], hits).layout.map.layers == ()

    cfg = load_config(argv=["--basemap", "osm"], env={}, data_dir=tmp_path / "none")
    assert cfg.basemap_tiles == BASEMAPS["osm"]
    assert load_config(argv=[], env={"ENVLF_BASEMAP": url}, data_dir=tmp_path / "none").basemap_tiles == (url, "")
    assert load_config(argv=[], env={}, data_dir=tmp_path / "none").basemap_tiles is None
    with pytest.raises(SystemExit, match="basemap 'tiles.example/1.png'"):
        load_config(argv=["--basemap", "tiles.example/1.png"], env={}, data_dir=tmp_path / "none")


def test_planned_then_cut_chips_are_the_chips_chip_scenes_makes(tmp_path):
    """`index extract` plans scenes in the driver and cuts them in workers (plan_scenes +
    cut_planned); that must give chip_scenes's chips exactly: the same ids, places (a rotated
    affine too), valid shares, pixels; a window that cannot be read, or a scene gone since it was
    planned, is left out with its reason instead of failing the shard."""
    import shutil

    from benchmarks.chipping import write_scene
    from envlf.data.geotiff import GEO_KEY, cut_planned, plan_scenes

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_scene(scenes / "a.tif", 320, seed=0)  # 16-bit, 4 bands, the bottom eighth nodata
    rotated = rasterio.transform.Affine(0.5, 0.1, 500_000.0, 0.1, -0.5, 5_000_000.0)
    with rasterio.open(scenes / "a.tif") as src:
        profile, data = src.profile, src.read()
    profile.update(transform=rotated)
    with rasterio.open(scenes / "b.tif", "w", **profile) as dst:
        dst.write(data)
    opts = ChipOptions(size=64, overlap=16, bands=(3, 2, 1))
    serial = chip_scenes(scenes, tmp_path / "serial", opts)
    planned, recipe = plan_scenes(scenes, tmp_path / "planned", opts)
    assert not (tmp_path / "planned").exists()  # planning reads no chip
    assert len(planned) == 2 * len(windows(320, 320, 64, 16)) > len(serial)
    geos = [json.dumps(r.meta[GEO_KEY]) for r in planned.records]
    kept, placed, left = cut_planned(geos, [str(r.path) for r in planned.records], recipe)
    assert [planned.records[i].image_id for i in kept] == serial.image_ids()
    assert placed == [json.dumps(r.meta[GEO_KEY]) for r in serial.records]
    assert all(x["empty"] for x in left) and len(left) == len(planned) - len(serial)
    for i, r in zip(kept, serial.records):
        assert planned.records[i].path.read_bytes() == r.path.read_bytes()
    with rasterio.open(scenes / "b.tif") as src:  # the rotated scene's bounds are rasterio's
        g = next(json.loads(p) for p in placed if json.loads(p)["scene"].endswith("b.tif"))
        assert g["bounds"] == list(rasterio.windows.bounds(rasterio.windows.Window(*g["window"]), src.transform))
    # a scene gone since it was planned: its chips are left out, each with one line
    shutil.move(scenes / "b.tif", tmp_path / "b-moved.tif")
    kept2, _, left2 = cut_planned(geos, [str(r.path) for r in planned.records], recipe)
    gone = [x for x in left2 if not x.get("empty")]
    assert gone and all("b.tif" in x["error"] and "\n" not in x["error"] for x in gone)
    assert kept2 == [i for i in kept if "b.tif" not in geos[i]]


def test_bench_chipping_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "envlf", "bench", "chipping", "--side", "512", "--scenes", "1",
                        "--chip-size", "64", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "c.json")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads((tmp_path / "c.json").read_text())
    assert row["windows"] == 64 and row["chips"] == 56 and row["empty"] == 8  # the bottom eighth is nodata
    assert "| 1 × 512 px | 64 | 64 | 56 |" in r.stdout
    assert not (tmp_path / "w").exists()
