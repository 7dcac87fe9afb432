"""The demo world: determinism, dataset layout, masks, and captions that are true.

The caption checks re-derive everything from the mask and the object list with their own
small vocabulary tables (not the generator's), so a wording bug and a geometry bug in the
generator would have to agree to slip through.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from envlf.world import SCENE_TYPES, caption_scene, contact_sheet, generate_world, render_scene, tokenize
from envlf.world.__main__ import main as world_cli
from envlf.world.store import assign_splits, save_mask

N = 48  # three scenes per class
SEED = 0

NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
COLOURS = {"white", "grey", "black", "red", "blue", "green", "yellow", "brown", "beige"}
SIZES = {"large": "large", "big": "large", "small": "small", "little": "small"}
QUANTIFIERS = ("a few", "a great number of", "many", "lots of", "numerous", "some", "several")
HEADS = {  # words that may name each category (independent of the generator's table)
    "plane": {"plane", "planes", "airplane", "airplanes", "aircraft"},
    "terminal": {"terminal", "terminals"},
    "building": {"building", "buildings", "warehouse", "warehouses"},
    "house": {"house", "houses", "home", "homes"},
    "ship": {"ship", "ships", "vessel", "vessels"},
    "boat": {"boat", "boats", "yacht", "yachts"},
    "storage_tank": {"tank", "tanks"},
    "car": {"car", "cars", "vehicle", "vehicles"},
    "tree": {"tree", "trees"},
    "tennis_court": {"court", "courts"},
    "baseball_field": {"baseball"},
    "swimming_pool": {"pool", "pools"},
    "road": {"road", "roads", "street", "streets"},
    "freeway": {"freeway", "freeways", "highway", "highways", "motorway", "motorways"},
    "overpass": {"overpass", "overpasses", "flyover", "flyovers"},
    "bridge": {"bridge", "bridges"},
    "runway": {"runway", "runways"},
    "river": {"river", "rivers"},
    "lake": {"lake", "lakes", "pond", "ponds"},
    "sea": {"sea", "ocean"},
    "water": {"water"},
    "beach": {"beach", "beaches"},
    "field": {"field", "fields"},
    "forest": {"forest", "woodland"},
    "pier": {"pier", "piers", "jetty", "jetties"},
    "parking_lot": {"lot", "park"},
    "fairway": {"fairway", "fairways"},
    "putting_green": {"putting"},
    "bunker": {"bunker", "bunkers", "trap", "traps"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world2"), n=N, seed=SEED, workers=2,
                          progress=False)


@pytest.fixture(scope="module")
def data(world) -> dict:
    return json.loads((world / "dataset.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_whatever_the_workers(world, tmp_path):
    again = generate_world(tmp_path / "world1", n=N, seed=SEED, workers=1, progress=False)
    a, b = _files(world), _files(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("images/")]) == N
    different = [k for k in a if a[k] != b[k]]
    assert different == []


def test_another_seed_gives_another_world():
    img0, mask0, lay0 = render_scene([1, 0], "airport")
    img1, mask1, lay1 = render_scene([2, 0], "airport")
    assert np.asarray(img0).tobytes() != np.asarray(img1).tobytes()


def test_render_scene_api():
    img, mask, layout = render_scene(7, "harbor")
    assert img.mode == "RGB" and img.size == (256, 256)
    assert mask.shape == (256, 256) and np.issubdtype(mask.dtype, np.integer)
    assert layout.scene_type == "harbor"
    assert {int(i) for i in np.unique(mask)} - {0} == {o.id for o in layout.objects}
    rng_img, _, _ = render_scene(np.random.default_rng(7), "harbor")
    assert np.array_equal(np.asarray(rng_img), np.asarray(img))
    _, _, any_type = render_scene(3)
    assert any_type.scene_type in SCENE_TYPES
    with pytest.raises(ValueError, match="unknown scene type"):
        render_scene(0, "moon_base")


def test_dataset_json_follows_the_karpathy_layout(world, data):
    assert data["dataset"] == "envlf-world" and data["seed"] == SEED
    images = data["images"]
    assert [im["imgid"] for im in images] == list(range(N))
    assert {im["class"] for im in images} == set(SCENE_TYPES)
    sentids = []
    for im in images:
        assert im["filename"] == f"{im['imgid']:06d}.png"
        assert (world / "images" / im["filename"]).is_file()
        assert im["mask"] == f"masks/{im['filename']}" and (world / im["mask"]).is_file()
        assert im["split"] in ("train", "val", "test")
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == tokenize(s["raw"]) and s["tokens"]
            assert set(s) == {"raw", "tokens", "imgid", "sentid", "phrases"}
        for o in im["objects"]:
            assert set(o) == {"id", "category", "colour", "size", "bbox"}
            assert o["category"] in HEADS and o["size"] in ("small", "medium", "large")
            assert o["colour"] in COLOURS
        sentids += im["sentids"]
    assert len(set(sentids)) == len(sentids)
    with open(world / "classes.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "class"]
    assert rows[1:] == [[im["filename"], im["class"]] for im in images]
    img = Image.open(world / "images" / images[0]["filename"])
    assert img.mode == "RGB" and img.size == (256, 256)


def test_masks_match_the_objects(world, data):
    for im in data["images"]:
        mask = np.asarray(Image.open(world / im["mask"])).astype(np.int64)
        assert mask.shape == (256, 256)
        ids = {o["id"] for o in im["objects"]}
        assert len(ids) == len(im["objects"])
        assert {int(i) for i in np.unique(mask)} - {0} == ids, im["filename"]
        for o in im["objects"]:
            ys, xs = np.nonzero(mask == o["id"])
            assert len(xs) >= 16, (im["filename"], o)
            x0, y0, x1, y1 = o["bbox"]
            # bbox is the tight box of the visible pixels, x1/y1 exclusive
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_masks_with_many_objects_are_16_bit(tmp_path):
    mask = np.zeros((256, 256), np.int32)
    mask[10:20, 10:20], mask[30:40, 30:40] = 7, 300
    save_mask(mask, tmp_path / "m.png")
    back = np.asarray(Image.open(tmp_path / "m.png"))
    assert back.dtype == np.uint16 and np.array_equal(back, mask)
    save_mask(np.minimum(mask, 255), tmp_path / "m8.png")
    assert np.asarray(Image.open(tmp_path / "m8.png")).dtype == np.uint8


def test_phrase_spans_index_the_caption_exactly(data):
    for im in data["images"]:
        ids = {o["id"] for o in im["objects"]}
        for s in im["sentences"]:
            for p in s["phrases"]:
                assert s["raw"][p["start"]:p["end"]] == p["text"]
                assert p["object_ids"] and set(p["object_ids"]) <= ids


def _check_phrase(text: str, ids: list[int], objects: dict[int, dict]) -> None:
    """A phrase's count, colour, size and noun words hold for the objects it names."""
    named = [objects[i] for i in ids]
    cats = {o["category"] for o in named}
    assert len(cats) == 1, text
    cat = cats.pop()
    low = text.lower()
    words = re.findall(r"[a-z]+", low)
    assert HEADS[cat] & set(words), (text, cat)
    colour = next((w for w in words if w in COLOURS and not (w == "green" and cat in
                                                             ("tree", "putting_green"))), None)
    size = next((SIZES[w] for w in words if w in SIZES), None)
    if colour is not None:
        assert all(o["colour"] == colour for o in named), text
    if size is not None:
        assert all(o["size"] == size for o in named), text
    same = [o["id"] for o in objects.values() if o["category"] == cat
            and (colour is None or o["colour"] == colour) and (size is None or o["size"] == size)]
    if low.startswith(QUANTIFIERS):
        assert len(ids) >= 2, text
    elif words[0] in NUMBERS and words[0] != "one":
        # a number names all such objects, and that many
        assert len(ids) == NUMBERS[words[0]] and sorted(ids) == sorted(same), text
    elif words[0] in ("a", "an", "one"):
        assert len(ids) == 1, text
    elif words[0] == "the" and len(ids) == 1:
        assert same == ids, f"'{text}' but {len(same)} such objects"


def test_captions_are_true_to_their_scenes(data):
    n_numbers = n_colours = 0
    for im in data["images"]:
        objects = {o["id"]: o for o in im["objects"]}
        for s in im["sentences"]:
            for p in s["phrases"]:
                _check_phrase(p["text"], p["object_ids"], objects)
                words = re.findall(r"[a-z]+", p["text"].lower())
                n_numbers += words[0] in NUMBERS and words[0] != "one"
                n_colours += bool(COLOURS & set(words))
    assert n_numbers >= 20 and n_colours >= 40  # the captions do say counts and colours


def test_captions_vary(data):
    raws = [s["raw"] for im in data["images"] for s in im["sentences"]]
    for im in data["images"]:
        assert len({s["raw"] for s in im["sentences"]}) == 5
    assert len(set(raws)) >= 0.85 * len(raws)
    firsts = [im["sentences"][0]["raw"] for im in data["images"]]
    assert len(set(firsts)) >= 0.8 * len(firsts)


# -- relations: each fact behind a caption, re-checked on the mask ----------------------

def _centroid(mask, i):
    ys, xs = np.nonzero(mask == i)
    return xs.mean(), ys.mean()


def _box(mask, i):
    ys, xs = np.nonzero(mask == i)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _ring(mask, i, r):
    x0, y0, x1, y1 = _box(mask, i)
    win = mask[max(y0 - r, 0):y1 + r, max(x0 - r, 0):x1 + r].copy()
    win[y0 - max(y0 - r, 0):y0 - max(y0 - r, 0) + (y1 - y0),
        x0 - max(x0 - r, 0):x0 - max(x0 - r, 0) + (x1 - x0)] = -1
    return win[win >= 0]


def _gap(mask, a, b):
    ax0, ay0, ax1, ay1 = _box(mask, a)
    bx0, by0, bx1, by1 = _box(mask, b)
    return max(0, bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


REGION_WORDS = {0: ("left",), 2: ("right",)}
VROW_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}


def _check_fact(fact, raw, mask, objects):
    kind, subj, other = fact.kind, fact.subject, fact.other
    low = raw.lower()
    if kind == "region":
        cx, cy = int(fact.detail.split(",")[0]), int(fact.detail.split(",")[1])
        for i in subj:
            x, y = _centroid(mask, i)
            assert (min(int(x * 3 // 256), 2), min(int(y * 3 // 256), 2)) == (cx, cy), raw
        if cx in REGION_WORDS:
            assert any(w in low for w in REGION_WORDS[cx]), raw
        if cy in VROW_WORDS:
            assert any(w in low for w in VROW_WORDS[cy]), raw
        if (cx, cy) == (1, 1):
            assert "middle" in low or "centre" in low, raw
    elif kind == "near":
        assert all(_gap(mask, i, other[0]) <= 10 for i in subj), raw
        assert any(w in low for w in ("beside", "next to", "near", "close to")), raw
    elif kind in ("left_of", "right_of", "above", "below"):
        a, b = _box(mask, subj[0]), _box(mask, other[0])
        ok = {"left_of": a[2] <= b[0], "right_of": b[2] <= a[0], "above": a[3] <= b[1],
              "below": b[3] <= a[1]}[kind]
        assert ok, raw
        assert {"left_of": "left", "right_of": "right", "above": "above", "below": "below"}[kind] in low
    elif kind == "on":
        for i in subj:
            ring = _ring(mask, i, 2)
            assert np.mean(ring == other[0]) >= 0.5, raw
    elif kind == "along":
        ys, xs = np.nonzero(mask == other[0])
        for i in subj:
            x, y = _centroid(mask, i)
            assert np.sqrt((xs - x) ** 2 + (ys - y) ** 2).min() <= 24, raw
        assert "along" in low, raw
    elif kind == "surrounded":
        x, y = _centroid(mask, subj[0])
        sides = set()
        for t in other:
            assert objects[t]["category"] == "tree"
            assert _gap(mask, subj[0], t) <= 40
            tx, ty = _centroid(mask, t)
            sides.add(int(((math.atan2(ty - y, tx - x) + math.pi / 4) % (2 * math.pi)) // (math.pi / 2)))
        assert sides == {0, 1, 2, 3} and len(other) >= 5, raw
        assert "surrounded" in low or "among" in low, raw
    elif kind == "enclosed":
        assert np.mean(_ring(mask, subj[0], 3) == other[0]) >= 0.6, raw
    elif kind == "through":
        own = mask == subj[0]
        near = np.zeros_like(own)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near |= np.roll(np.roll(own, dy, 0), dx, 1)
        ring = near & ~own
        assert np.mean(mask[ring] == other[0]) >= 0.45, raw
        assert "through" in low or "crossed" in low, raw
    elif kind == "crosses":
        assert np.sum(_ring(mask, subj[0], 3) == other[0]) >= 6, raw
        assert "cross" in low or "spans" in low, raw
    elif kind in ("full", "empty"):
        for i in subj:
            assert np.mean(_ring(mask, i, 2) == other[0]) >= 0.5, raw
        if kind == "empty":
            cars = [o for o in objects.values() if o["category"] == "car"]
            assert len(cars) == len(subj) <= 12


def test_relations_in_captions_hold_on_the_mask():
    kinds = set()
    for i in range(40):
        scene_type = SCENE_TYPES[i % len(SCENE_TYPES)]
        _, mask, layout = render_scene([11, i], scene_type)
        objects = {o.id: o.to_json() for o in layout.objects}
        for cap in caption_scene(layout, mask, np.random.default_rng([11, i, 1]), n=5):
            for fact in cap.facts:
                kinds.add(fact.kind)
                _check_fact(fact, cap.raw, mask, objects)
            for p in cap.phrases:
                _check_phrase(p.text, list(p.object_ids), objects)
    assert {"region", "near", "count"} <= kinds


# -- splits ----------------------------------------------------------------------------

def test_splits_are_disjoint_and_stratified(data):
    images = data["images"]
    names = [im["filename"] for im in images]
    assert len(set(names)) == len(names)  # each image in exactly one split
    by_split = {s: [im for im in images if im["split"] == s] for s in ("train", "val", "test")}
    assert sum(len(v) for v in by_split.values()) == N
    assert abs(len(by_split["test"]) - 0.15 * N) <= 1 and abs(len(by_split["val"]) - 0.15 * N) <= 1
    for cls in SCENE_TYPES:
        k = sum(im["class"] == cls for im in images)
        for s, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            got = sum(im["class"] == cls for im in by_split[s])
            assert abs(got - frac * k) <= 1.5, (cls, s, got, k)


def test_split_assignment_at_full_size():
    classes = [SCENE_TYPES[i % 16] for i in range(1500)]
    splits = assign_splits(classes, seed=3)
    assert splits == assign_splits(classes, seed=3)
    assert splits != assign_splits(classes, seed=4)
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 1050, "val": 225, "test": 225}
    for cls in SCENE_TYPES:
        own = [s for c, s in zip(classes, splits) if c == cls]
        assert abs(own.count("test") - 0.15 * len(own)) <= 1
        assert abs(own.count("val") - 0.15 * len(own)) <= 1


# -- acquisition (sensor pass) --------------------------------------------------------

def test_every_tile_gets_its_own_acquisition():
    """One drawing through 24 random acquisitions: brightness, colour balance and sharpness
    must differ between tiles as an archive's do (a constant or missing pass fails), and the
    same rng gives the same pixels."""
    from envlf.world.render import sensor

    yy, xx = np.mgrid[0:256, 0:256]
    canvas = np.full((256, 256, 3), 0.45, np.float32)
    canvas[(xx // 16 + yy // 16) % 2 == 0] = (0.30, 0.42, 0.22)  # a sharp checkerboard
    outs = [np.asarray(sensor(canvas, np.random.default_rng(k)), np.float32) / 255 for k in range(24)]
    brightness = np.array([o.mean() for o in outs])
    balance = np.array([o[..., 2].mean() / o[..., 0].mean() for o in outs])
    edge = np.array([np.abs(np.diff(o.mean(-1), axis=1))[:, 15::16].mean() for o in outs])
    assert brightness.max() - brightness.min() > 0.12
    assert balance.max() / balance.min() > 1.08
    assert edge.max() / edge.min() > 1.8  # some tiles sharp, some soft
    again = np.asarray(sensor(canvas, np.random.default_rng(3)), np.float32) / 255
    assert np.array_equal(again, outs[3])


# -- contact sheet and CLI -------------------------------------------------------------

def test_contact_sheet(world, tmp_path):
    out = contact_sheet(world, n=16, out_png=tmp_path / "sheet.png")
    img = Image.open(out)
    assert img.size[0] == 4 * 256 and img.size[1] >= 4 * 256


def test_cli_generate_and_sheet(tmp_path, capsys):
    assert world_cli(["generate", "--out", str(tmp_path / "w"), "--n", "3", "--seed", "5",
                      "--workers", "1", "--quiet"]) == 0
    assert len(list((tmp_path / "w" / "images").glob("*.png"))) == 3
    assert world_cli(["sheet", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert world_cli(["generate", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert "error:" in capsys.readouterr().err
