"""Writing a demo world to disk in the Karpathy layout, and a contact sheet to look at it.

Layout written by `generate_world(out_dir, ...)`::

    out_dir/dataset.json      {"dataset": "envlf-world", "generator": V, "seed": S, "images": [...]}
    out_dir/images/000123.png RGB 256x256 tile
    out_dir/masks/000123.png  instance mask: pixel = object id, 0 = background
                              (8-bit when every id < 256, else 16-bit)
    out_dir/classes.csv       filename,class   (like UC Merced)

Each image entry is the UCM-Captions / RSICD entry (filename, imgid, split, sentids,
sentences with raw/tokens/imgid/sentid) plus ``class``, ``objects`` (id, category,
colour, size, bbox = visible [x0, y0, x1, y1), x1/y1 exclusive), ``mask`` and, per
sentence, ``phrases`` (text, start, end, object_ids) with ``raw[start:end] == text``.

Determinism: scene ``i`` draws from ``default_rng([seed, i, 0])`` (layout and pixels) and
``default_rng([seed, i, 1])`` (captions), so the output is byte-identical for a seed
whatever the number of workers; nothing depends on time or on set/dict ordering.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .captions import caption_scene, tokenize
from .render import render_scene
from .scenes import SCENE_TYPES

DATASET_NAME = "envlf-world"
# Bumped whenever the same seed writes different tiles or captions, so that a cached world (and the
# model and index made from it) is known to be stale: 2 = per-tile acquisition, new cars/trees;
# 3 = two facts per caption (images and masks as in 2).
GENERATOR_VERSION = 3
CAPTIONS_PER_IMAGE = 5
SPLITS = (("test", 0.15), ("val", 0.15))  # the rest is train
PNG_LEVEL = 1  # zlib level: the tiles are noisy, so higher levels save little and cost time


def scene_plan(n: int, seed: int) -> list[str]:
    """Scene type of each index: classes as balanced as ``n`` allows, order shuffled."""
    types = [SCENE_TYPES[i % len(SCENE_TYPES)] for i in range(n)]
    perm = np.random.default_rng([seed, 0xC1A55]).permutation(n)
    return [types[int(j)] for j in perm]


def assign_splits(classes: list[str], seed: int) -> list[str]:
    """Stratified test / val / train split, deterministic in ``seed``.

    Classes are visited in sorted order; for each of test and val a class gets
    round(cumulative count * 0.15) minus what earlier classes got, so the totals hit
    15 / 15 / 70 % and every class is within one image of its share, even in tiny worlds."""
    out = ["train"] * len(classes)
    names = sorted(set(classes))
    done = 0
    for ci, name in enumerate(names):
        idx = [i for i, c in enumerate(classes) if c == name]
        perm = np.random.default_rng([seed, 0x5EED, ci]).permutation(len(idx))
        members = [idx[int(p)] for p in perm]
        lo, hi = done, done + len(idx)
        start = 0
        for split, frac in SPLITS:
            take = int(hi * frac + 0.5) - int(lo * frac + 0.5)
            for i in members[start:start + take]:
                out[i] = split
            start += take
        done = hi
    return out


def save_mask(mask: np.ndarray, path: Path) -> None:
    """8-bit PNG when every id fits, else 16-bit; both read back with np.asarray(Image.open)."""
    arr = mask.astype(np.uint8) if int(mask.max()) < 256 else mask.astype(np.uint16)
    Image.fromarray(arr).save(path, compress_level=PNG_LEVEL)


def make_scene(out_dir: str, seed: int, index: int, scene_type: str) -> dict:
    """Render, caption and save scene ``index``; return its dataset.json entry (no split)."""
    out = Path(out_dir)
    image, mask, layout = render_scene(np.random.default_rng([seed, index, 0]), scene_type)
    captions = caption_scene(layout, mask, np.random.default_rng([seed, index, 1]),
                             n=CAPTIONS_PER_IMAGE)
    name = f"{index:06d}.png"
    image.save(out / "images" / name, compress_level=PNG_LEVEL)
    save_mask(mask, out / "masks" / name)
    sentences = []
    for k, cap in enumerate(captions):
        sentences.append({
            "raw": cap.raw, "tokens": tokenize(cap.raw), "imgid": index,
            "sentid": index * CAPTIONS_PER_IMAGE + k,
            "phrases": [p.to_json() for p in cap.phrases],
        })
    return {
        "filename": name, "imgid": index, "split": "", "class": scene_type,
        "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        "objects": [o.to_json() for o in layout.objects], "mask": f"masks/{name}",
    }


def _make_scene_star(args) -> dict:
    return make_scene(*args)


def generate_world(out_dir, n: int = 1500, seed: int = 0, workers: int | None = None,
                   progress: bool = True) -> Path:
    """Generate ``n`` captioned, masked scenes into ``out_dir``; returns its Path.

    ``workers``: processes (default: the CPUs this process may use). The output does not
    depend on it."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    plan = scene_plan(n, seed)
    jobs = [(str(out), seed, i, plan[i]) for i in range(n)]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(int(workers), n))
    bar = _progress(n, progress)
    records: list[dict] = []
    if workers == 1:
        for job in jobs:
            records.append(_make_scene_star(job))
            bar.update(1)
    else:
        # spawn: safe even when the caller has threads (torch, Gradio) running
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for rec in pool.imap(_make_scene_star, jobs, chunksize=8):
                records.append(rec)
                bar.update(1)
    bar.close()
    _remove_stale(out, {r["filename"] for r in records})
    splits = assign_splits([r["class"] for r in records], seed)
    for rec, split in zip(records, splits):
        rec["split"] = split
    data = {"dataset": DATASET_NAME, "generator": GENERATOR_VERSION, "seed": seed, "images": records}
    (out / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    with open(out / "classes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["filename", "class"])
        for rec in records:
            w.writerow([rec["filename"], rec["class"]])
    return out


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete tiles and masks of an earlier, larger world in the same directory, so the
    folder holds exactly what dataset.json lists. Only our own NNNNNN.png names."""
    for sub in ("images", "masks"):
        for p in sorted((out / sub).glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")):
            if p.name not in keep:
                p.unlink()


class _NoBar:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc="demo world", unit="scene")


def contact_sheet(dataset_dir, n: int = 16, out_png=None) -> Path:
    """A 4-column grid of ``n`` tiles (one per class first), each with its class and first
    caption underneath. Returns the PNG's path (default: dataset_dir/contact_sheet.png)."""
    root = Path(dataset_dir)
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    images = data["images"]
    picked, seen = [], set()
    for rec in images:  # one of each class first, then fill in order
        if rec["class"] not in seen and len(picked) < n:
            picked.append(rec)
            seen.add(rec["class"])
    for rec in images:
        if len(picked) >= n:
            break
        if rec not in picked:
            picked.append(rec)
    cols = 4
    rows = (len(picked) + cols - 1) // cols
    tile, text_h = 256, 80  # the class and name, then up to four lines of the first caption
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for k, rec in enumerate(picked):
        x, y = (k % cols) * tile, (k // cols) * (tile + text_h)
        sheet.paste(Image.open(root / "images" / rec["filename"]).convert("RGB"), (x, y))
        caption = rec["sentences"][0]["raw"] if rec["sentences"] else ""
        lines = [f"[{rec['class']}] {rec['filename']}"] + textwrap.wrap(caption, 40)[:4]
        for j, line in enumerate(lines):
            draw.text((x + 4, y + tile + 2 + 15 * j), line, fill=(0, 0, 0) if j else (30, 60, 160),
                      font=font)
    out = Path(out_png) if out_png is not None else root / "contact_sheet.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()
