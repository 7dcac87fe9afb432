"""Data layer: each reader on a tiny fixture in its real layout, robust image loading, the
torch Dataset's skipping of bad images, and the real datasets in ../shared when present."""

from __future__ import annotations

import csv
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from envlf.data.datasets import (
    CaptionDataset,
    ImageCaptionDataset,
    ImageLoadError,
    ImageRecord,
    check_images,
    clean_caption,
    collate,
    load_dataset,
    load_image,
    read_csv,
    read_folder,
    read_karpathy,
    read_precomp,
    safe_id,
)


def _png(path: Path, color=(10, 200, 30), size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# -- captions and ids ------------------------------------------------------------------------------

def test_clean_caption():
    assert clean_caption("There is a piece of farmland .") == "There is a piece of farmland."
    assert clean_caption("  many   planes ,\tparked\n near a terminal . ") == "many planes, parked near a terminal."
    assert clean_caption("no full stop") == "no full stop"
    assert clean_caption("   ") == ""


def test_safe_id():
    assert safe_id("sub/dir/a.png") == "sub__dir__a"
    assert safe_id("sub/dir/a.png", keep_suffix=True) == "sub__dir__a.png"
    assert safe_id("../../etc/passwd") == "etc__passwd"
    assert safe_id("a\\b c.tif") == "a__b_c"
    for i in (safe_id("x/..y/..z.png"), safe_id("..hidden.png", keep_suffix=True)):
        assert "/" not in i and "\\" not in i and ".." not in i


# -- Karpathy ----------------------------------------------------------------------------------------

def _karpathy(root: Path, images_subdir: bool = True) -> Path:
    img_dir = root / "images" if images_subdir else root
    for n in (1, 2, 3):
        _png(img_dir / f"{n}.png")
    data = {
        "dataset": "tiny",
        "images": [
            {
                "filename": "1.png",
                "imgid": 0,
                "split": "train",
                "objects": [{"name": "plane", "box": [1, 2, 3, 4]}],
                "sentences": [
                    {"raw": "There is a piece of farmland .", "tokens": ["there"], "phrases": ["farmland"]},
                    {"raw": "   ", "tokens": []},
                    {"raw": "Two planes ,  parked .", "phrases": ["two planes"]},
                ],
            },
            {"filename": "2.png", "split": "val", "class": "harbor", "sentences": [{"raw": "ships ."}]},
            {"filename": "3.png", "split": "restval", "sentences": []},
        ],
    }
    (root / "dataset.json").write_text(json.dumps(data))
    (root / "classes.csv").write_text("filename,class\n1.png,agricultural\n")
    return root


def test_read_karpathy(tmp_path):
    ds = read_karpathy(_karpathy(tmp_path))
    assert ds.name == "tiny" and ds.has_images and len(ds) == 3
    r0, r1, r2 = ds.records
    assert r0.image_id == "1" and r0.path == (tmp_path / "images" / "1.png").resolve()
    assert r0.captions == ["There is a piece of farmland.", "Two planes, parked."]  # empty one dropped
    assert r0.label == "agricultural" and r1.label == "harbor" and r2.label is None
    # extra keys survive, sentences stay aligned with captions
    assert r0.meta["objects"][0]["name"] == "plane" and r0.meta["imgid"] == 0
    assert [s.get("phrases") for s in r0.meta["sentences"]] == [["farmland"], ["two planes"]]
    assert r2.split == "train" and r2.meta["orig_split"] == "restval"
    assert ds.splits() == ["train", "val"]


def test_karpathy_layouts_and_detection(tmp_path):
    flat = _karpathy(tmp_path / "flat", images_subdir=False)
    ds = load_dataset(flat)
    assert ds.records[0].path == (flat / "1.png").resolve() and ds.has_images
    # the JSON file itself, and an explicit image_dir
    other = tmp_path / "elsewhere"
    _png(other / "1.png")
    ds2 = load_dataset(flat / "dataset.json", image_dir=other, name="x")
    assert ds2.name == "x" and ds2.records[0].path == (other / "1.png").resolve()
    # image files missing: records still point where they would be
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "dataset.json").write_text((flat / "dataset.json").read_text())
    ds3 = load_dataset(tmp_path / "textonly")
    assert not ds3.has_images and ds3.records[0].path.name == "1.png"


def test_karpathy_errors(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"images": [{"filename": "a.png"}, {"filename": "a.png"}]}))
    with pytest.raises(ValueError, match="more than once"):
        read_karpathy(tmp_path)
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="images"):
        read_karpathy(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        read_karpathy(tmp_path)


# -- CaptionDataset ------------------------------------------------------------------------------------

def test_caption_dataset_views(tmp_path):
    ds = read_karpathy(_karpathy(tmp_path))
    assert ds.num_captions == 3
    assert ds.pairs() == [(0, 0), (0, 1), (1, 0)]
    assert ds.captions() == ["There is a piece of farmland.", "Two planes, parked.", "ships."]
    assert ds.txt2img().tolist() == [0, 0, 1]
    assert ds.labels() == ["agricultural", "harbor", None]
    tr = ds.split("train")
    assert [r.image_id for r in tr] == ["1", "3"] and tr.name == "tiny/train"
    assert ds.split("all") is ds
    with pytest.raises(ValueError, match="no 'test' split"):
        ds.split("test")
    assert ds.index_of("2") == 1
    with pytest.raises(ValueError, match="duplicate"):
        CaptionDataset("d", tmp_path, [ImageRecord("a", tmp_path, "all", []), ImageRecord("a", tmp_path, "all", [])])
    assert "images=3" in repr(ds)


# -- precomp -------------------------------------------------------------------------------------------

def _precomp(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # train: each image once, 5 caption lines per image in order (one image's lines all empty)
    (root / "train_filename.txt").write_text("a_1.jpg\nb_2.jpg\nc_3.jpg\n")
    caps = [f"a caption {i} ." for i in range(5)] + [f"b caption {i}" for i in range(5)] + [""] * 5
    (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    # test: the file name repeats once per caption line
    (root / "test_filename.txt").write_text("t_9.jpg\nt_9.jpg\nu_8.jpg\nu_8.jpg\nu_8.jpg\n")
    (root / "test_caps.txt").write_text("t one\nt two\nu one\nu two\nu three\n")
    return root


def test_read_precomp_both_line_layouts(tmp_path):
    root = _precomp(tmp_path / "rsx_precomp")
    ds = load_dataset(root)
    assert ds.name == "rsx_precomp" and not ds.has_images
    assert ds.splits() == ["train", "test"]
    tr, te = ds.split("train"), ds.split("test")
    assert [r.image_id for r in tr] == ["a_1", "b_2", "c_3"]
    assert tr.records[0].captions == [f"a caption {i}." for i in range(5)]
    assert tr.records[1].captions[4] == "b caption 4"
    assert tr.records[2].captions == [] and tr.records[2].meta["empty_caption_lines"] == 5
    assert [r.image_id for r in te] == ["t_9", "u_8"]
    assert [len(r.captions) for r in te] == [2, 3]
    assert te.records[1].captions == ["u one", "u two", "u three"]
    assert te.records[0].path == (root / "t_9.jpg").resolve()
    assert read_precomp(root, splits=["test"]).splits() == ["test"]


def test_precomp_with_images(tmp_path):
    root = _precomp(tmp_path / "p")
    imgs = tmp_path / "imgs"
    _png(imgs / "a_1.jpg")
    ds = read_precomp(root, image_dir=imgs)
    assert ds.has_images and ds.records[0].path == (imgs / "a_1.jpg").resolve()
    ok, problems = check_images(ds, max_workers=2)
    assert [r.image_id for r in ok] == ["a_1"] and len(problems) == 4
    assert all("file not found" in p.message for p in problems)


def test_precomp_mismatch_fails_clearly(tmp_path):
    root = _precomp(tmp_path / "p")
    (root / "train_caps.txt").write_text("\n".join(["x"] * 14) + "\n")
    with pytest.raises(ValueError, match=r"train: 3 file names but 14 caption lines"):
        read_precomp(root)
    # a stray blank line at the end is tolerated when the counts then fit
    (root / "train_caps.txt").write_text("\n".join(["x"] * 15) + "\n\n\n")
    assert read_precomp(root).split("train").num_captions == 15
    (root / "train_filename.txt").unlink()
    with pytest.raises(ValueError, match="no matching train_filename.txt"):
        read_precomp(root)


# -- CSV -------------------------------------------------------------------------------------------

def test_read_csv(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    rows = [
        ["Image", "Caption", "split", "class", "annotator"],
        ["img/a.png", "a red roof .", "train", "residential", "ann1"],
        ["img/b.png", "two ships", "test", "harbor", "ann2"],
        ["img/a.png", "  a  roof", "train", "", "ann3"],
        ["img/c.png", "", "", "", ""],
    ]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ds = load_dataset(tmp_path / "pairs.csv")
    assert ds.name == "pairs" and ds.has_images
    a, b, c = ds.records
    assert a.image_id == "a" and a.path == (tmp_path / "img" / "a.png").resolve()
    assert a.captions == ["a red roof.", "a roof"] and a.split == "train" and a.label == "residential"
    assert [s["annotator"] for s in a.meta["sentences"]] == ["ann1", "ann3"]
    assert b.split == "test" and b.label == "harbor"
    assert c.captions == [] and c.split == "all"
    assert ds.txt2img().tolist() == [0, 0, 1]


def test_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("image,caption,split\na.png,one,train\na.png,two,test\n")
    with pytest.raises(ValueError, match="split 'test' here but 'train' on line 2"):
        read_csv(p)
    p.write_text("picture,caption\na.png,one\n")
    with pytest.raises(ValueError, match="no 'image' column"):
        read_csv(p)


# -- folder ----------------------------------------------------------------------------------------

def test_read_folder(tmp_path):
    g = tmp_path / "gallery"
    for rel in ("b.png", "a.JPG", "sub/x.tif", "sub/deeper/y.png", "dup.png", "dup.jpg", ".hidden/z.png"):
        _png(g / rel)
    (g / "notes.txt").write_text("not an image")
    ds = load_dataset(g)
    assert ds.name == "gallery" and ds.splits() == ["all"]
    rels = [r.meta["filename"] for r in ds]
    assert rels == sorted(rels) and "notes.txt" not in rels and not any(".hidden" in r for r in rels)
    ids = {r.meta["filename"]: r.image_id for r in ds}
    assert ids["sub/deeper/y.png"] == "sub__deeper__y"
    assert ids["a.JPG"] == "a" and ids["dup.png"] == "dup.png" and ids["dup.jpg"] == "dup.jpg"
    assert all(r.captions == [] and r.path.is_absolute() for r in ds)
    assert read_folder(g).image_ids() == ds.image_ids()  # deterministic


def test_load_dataset_nothing_there(tmp_path):
    with pytest.raises(ValueError, match="no dataset found"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_dataset(tmp_path / "missing")


# -- load_image ----------------------------------------------------------------------------------------

def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _one_line_error(src, match, **kw):
    with pytest.raises(ImageLoadError, match=match) as e:
        load_image(src, **kw)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_load_image_sources(tmp_path):
    p = _png(tmp_path / "ok.png", color=(1, 2, 3), size=(5, 4))
    with Image.open(p) as opened:
        for src in (p, str(p), p.read_bytes(), io.BytesIO(p.read_bytes()), opened):
            im = load_image(src)
            assert im.mode == "RGB" and im.size == (5, 4) and im.getpixel((0, 0)) == (1, 2, 3)
    arr = np.zeros((4, 5, 3), dtype=np.uint8)
    assert load_image(arr).size == (5, 4)
    assert load_image(np.ones((4, 5), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_bad_files(tmp_path):
    _one_line_error(tmp_path / "nope.png", "file not found")
    _one_line_error(tmp_path, "is a directory")
    txt = tmp_path / "text.png"
    txt.write_text("hello, I am text")
    _one_line_error(txt, "not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _one_line_error(empty, "not an image")
    _one_line_error(b"\x89PNG\r\n\x1a\n garbage", "image")
    # truncated PNG and JPEG
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = _bytes(noise, fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(data[: len(data) // 2])
        _one_line_error(cut, "truncated|corrupt")
    _one_line_error(np.zeros((2, 3, 5)), "not an image")


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (IHDR patched, CRC fixed)."""
    data = bytearray(_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_load_image_decompression_bombs():
    _one_line_error(_png_claiming(5000, 5000), r"25\.0 MP exceeds the limit of 1\.0 MP", max_pixels=1_000_000)
    # beyond even Pillow's own limit: refused from the header, nothing decoded
    _one_line_error(_png_claiming(100_000, 100_000), "MP|too many pixels")
    _one_line_error(_png_claiming(100_000, 100_000), "MP|too many pixels", max_pixels=None)
    _one_line_error(Image.new("L", (100, 100)), "exceeds", max_pixels=500)


def test_load_image_modes(tmp_path):
    # 16-bit greyscale: own min..max stretched to 0..255
    a16 = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(a16).save(p16)
    with Image.open(p16) as raw:
        assert raw.mode.startswith("I")
    im = load_image(p16)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)
    assert load_image(a16).getpixel((1, 0)) == (85, 85, 85)
    # CMYK JPEG
    im = load_image(_bytes(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"))
    assert im.mode == "RGB" and min(im.getpixel((1, 1))) > 240
    # greyscale and 1-bit
    assert load_image(_bytes(Image.new("L", (3, 3), 90), "PNG")).getpixel((0, 0)) == (90, 90, 90)
    assert load_image(_bytes(Image.new("1", (3, 3), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    # palette, with and without transparency
    pal = Image.new("RGB", (4, 4), (200, 10, 10)).convert("P")
    assert pal.mode == "P"
    assert load_image(_bytes(pal, "PNG")).getpixel((0, 0)) == pal.convert("RGB").getpixel((0, 0))
    assert load_image(_bytes(pal, "PNG", transparency=pal.getpixel((0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    # alpha: composited over white
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    im = load_image(_bytes(rgba, "PNG"))
    assert im.getpixel((0, 0)) == (0, 0, 255) and im.getpixel((1, 0)) == (255, 255, 255)
    half = load_image(Image.new("LA", (1, 1), (0, 128))).getpixel((0, 0))
    assert all(abs(v - 127) <= 1 for v in half)


def test_load_image_animated_and_exif(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(gif) as raw:
        assert raw.n_frames == 2
    r, g, b = load_image(gif).getpixel((2, 2))
    assert r > 200 and b < 50
    # EXIF orientation 6 (rotate 90° clockwise to display): a 20x10 image comes out 10x20
    exif = Image.Exif()
    exif[0x0112] = 6
    im = load_image(_bytes(Image.new("RGB", (20, 10)), "JPEG", exif=exif.tobytes()))
    assert im.size == (10, 20)


# -- check_images and the torch Dataset ----------------------------------------------------------------

def _mixed_dataset(tmp_path) -> CaptionDataset:
    _png(tmp_path / "good1.png", size=(12, 12))
    _png(tmp_path / "good2.png", size=(10, 14))
    (tmp_path / "bad.png").write_text("this is not a png")
    recs = [
        ImageRecord("good1", tmp_path / "good1.png", "train", ["one", "uno"]),
        ImageRecord("bad", tmp_path / "bad.png", "train", ["broken"]),
        ImageRecord("gone", tmp_path / "gone.png", "train", ["missing"]),
        ImageRecord("good2", tmp_path / "good2.png", "train", ["two"]),
    ]
    return CaptionDataset("mixed", tmp_path, recs)


def test_check_images(tmp_path):
    ds = _mixed_dataset(tmp_path)
    ok, problems = check_images(ds, max_workers=2)
    assert ok.image_ids() == ["good1", "good2"]
    assert {p.image_id for p in problems} == {"bad", "gone"}
    assert all("\n" not in p.message for p in problems)
    ok2, problems2 = check_images(ds, decode=False)
    assert ok2.image_ids() == ["good1", "good2"] and len(problems2) == 2


def test_torch_dataset_skips_unreadable(tmp_path, caplog):
    from envlf.model.config import VisionConfig
    from envlf.data.transforms import build_transform

    ds = _mixed_dataset(tmp_path)
    tds = ImageCaptionDataset(ds, build_transform(VisionConfig(image_size=16)), mode="images")
    assert len(tds) == 4
    with caplog.at_level(logging.WARNING, logger="envlf.data.datasets"):
        assert tds[1] is None and tds[1] is None and tds[2] is None
    assert sum("bad" in r.getMessage() for r in caplog.records) == 1  # warned once per image
    batch = collate([tds[i] for i in range(4)])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 3]
    assert batch["image_id"] == ["good1", "good2"] and batch["dropped"] == 2
    assert collate([None, None]) is None

    pairs = ImageCaptionDataset(ds, build_transform(VisionConfig(image_size=16)), mode="pairs")
    assert len(pairs) == 5
    loader = torch.utils.data.DataLoader(pairs, batch_size=5, collate_fn=collate)
    (b,) = list(loader)
    assert b["caption"] == ["one", "uno", "two"] and b["caption_index"].tolist() == [0, 1, 0]
    assert b["image"].shape == (3, 3, 16, 16)

    raw = ImageCaptionDataset(ds, transform=None)
    assert isinstance(raw[0]["image"], Image.Image)
    with pytest.raises(ValueError, match="mode"):
        ImageCaptionDataset(ds, mode="triplets")


# -- real data -------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_real_ucm(ucm_dir):
    ds = load_dataset(ucm_dir)
    assert ds.has_images
    assert len(ds.split("train")) == 1680 and len(ds.split("val")) == 210
    assert all(len(r.captions) == 5 for r in ds)
    assert len(set(ds.labels())) == 21 and None not in ds.labels()
    r = ds.records[0]
    assert r.image_id == "1" and r.captions[0] == "There is a piece of farmland." and r.label == "agricultural"
    assert r.meta["sentences"][0]["raw"] == "There is a piece of farmland ."
    assert len(set(ds.image_ids())) == 1890
    im = load_image(r.path)
    assert im.mode == "RGB" and im.size == (256, 256)


@pytest.mark.real_data
@pytest.mark.parametrize("name,n_train,n_test", [("rsicd", 9828, 1093), ("rsitmd", 4291, 452)])
def test_real_precomp(rs_text_dir, name, n_train, n_test):
    ds = load_dataset(rs_text_dir / f"{name}_precomp")
    assert not ds.has_images
    tr, te = ds.split("train"), ds.split("test")
    assert len(tr) == n_train and len(te) == n_test
    assert all(len(r.captions) == 5 for r in te)  # test: one file-name line per caption
    assert te.num_captions == 5 * n_test
    assert sum(len(r.captions) == 5 for r in tr) >= n_train - 5  # RSITMD has 4 all-empty images
    assert len(set(ds.image_ids())) == n_train + n_test
    assert not any(c.endswith(" .") for c in tr.captions()[:1000])
