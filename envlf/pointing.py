"""The pointing game: do the attention maps point at the objects a phrase names?

For every grounded phrase of a caption (the demo world stores, per caption, the character
span of each phrase and the ids of the objects it names, plus an instance mask per image),
take the Grad-CAM map of the phrase's words for its own image, upsample it to the image and
ask: does its peak fall inside the mask of one of the named objects? And what share of the
map's energy lies inside those masks? The whole caption is scored the same way against the
union of every object it names.

Two baselines put the numbers in context: the image centre (a fixed point) and a random
point, whose hit rate is exactly the masks' share of the image (no sampling needed); a
uniform map's energy share is that same area fraction.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from .data import CaptionDataset, load_image
from .gradcam import attention_map


def load_mask(record) -> np.ndarray | None:
    """(H, W) int instance ids (0 = background) of a record, or None when it has none."""
    rel = record.meta.get("mask")
    if not rel:
        return None
    path = Path(rel)
    if not path.is_absolute():
        path = record.path.parent.parent / rel  # masks/ beside images/ (Karpathy layout)
    if not path.exists():
        return None
    return np.asarray(Image.open(path)).astype(np.int64)


def _score(cam: np.ndarray, target: np.ndarray) -> tuple[bool, float]:
    """cam (H, W) >= 0 resized map, target (H, W) bool -> (peak inside, energy share inside)."""
    total = cam.sum()
    if total <= 0:
        return False, 0.0
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(target[peak]), float(cam[target].sum() / total)


def pointing_game(model, ds: CaptionDataset, max_images: int | None = None, captions_per_image: int = 5,
                  progress: bool = True, grid: int | None = None) -> dict:
    """Run the game over the records that carry masks and grounded phrases.
    grid: the Grad-CAM grid (default: the model's explain grid, see envlf.gradcam)."""
    grid = grid or model.config.fusion.gradcam_grid or model.grid_size
    from tqdm.auto import tqdm

    recs = [r for r in ds.records if r.meta.get("mask") and r.meta.get("sentences")]
    if max_images:
        recs = recs[:max_images]
    acc = defaultdict(list)  # name -> list of values
    per_cat = defaultdict(list)
    for r in tqdm(recs, desc="pointing game", disable=not progress, leave=False):
        mask = load_mask(r)
        if mask is None:
            continue
        image = load_image(r.path)
        if image.size != (mask.shape[1], mask.shape[0]):
            continue
        H, W = mask.shape
        centre = (H // 2, W // 2)
        cats = {o["id"]: o.get("category", "?") for o in r.meta.get("objects", [])}
        for caption, sent in list(zip(r.captions, r.meta["sentences"]))[:captions_per_image]:
            phrases = [p for p in sent.get("phrases", []) if p.get("object_ids")]
            if not phrases:
                continue
            raw = sent.get("raw", caption)
            maps = attention_map(model, image, raw, grid=grid)
            union = np.isin(mask, [i for p in phrases for i in p["object_ids"]])
            if union.any():
                hit, energy = _score(maps.resized("sentence"), union)
                acc["caption_hit"].append(hit)
                acc["caption_energy"].append(energy)
                acc["caption_centre"].append(bool(union[centre]))
                acc["caption_random"].append(float(union.mean()))
            for p in phrases:
                target = np.isin(mask, p["object_ids"])
                if not target.any():
                    continue
                m = maps.span_map(int(p["start"]), int(p["end"]))
                up = _resize(m, (W, H))
                hit, energy = _score(up, target)
                acc["phrase_hit"].append(hit)
                acc["phrase_energy"].append(energy)
                acc["phrase_centre"].append(bool(target[centre]))
                acc["phrase_random"].append(float(target.mean()))
                per_cat[cats.get(p["object_ids"][0], "?")].append(hit)
    mean = lambda k: 100.0 * float(np.mean(acc[k])) if acc[k] else float("nan")  # noqa: E731
    return {
        "images": len(recs), "phrases": len(acc["phrase_hit"]), "captions": len(acc["caption_hit"]), "grid": grid,
        "phrase": {"model": mean("phrase_hit"), "centre": mean("phrase_centre"), "random": mean("phrase_random"),
                   "energy_in_mask": mean("phrase_energy"), "uniform_energy": mean("phrase_random")},
        "caption": {"model": mean("caption_hit"), "centre": mean("caption_centre"), "random": mean("caption_random"),
                    "energy_in_mask": mean("caption_energy"), "uniform_energy": mean("caption_random")},
        "per_category": {c: {"n": len(v), "hit": 100.0 * float(np.mean(v))} for c, v in sorted(per_cat.items())},
    }


def _resize(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    w, h = size
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def format_pointing(res: dict) -> str:
    grid = f", Grad-CAM on a {res['grid']}x{res['grid']} grid" if res.get("grid") else ""
    lines = [f"pointing game: {res['images']} images, {res['phrases']} phrases, {res['captions']} captions{grid}",
             "| unit | model hit % | centre % | random point % | energy in mask % | uniform map % |",
             "|---|---:|---:|---:|---:|---:|"]
    for unit in ("phrase", "caption"):
        r = res[unit]
        lines.append(f"| {unit} | {r['model']:.1f} | {r['centre']:.1f} | {r['random']:.1f} | "
                     f"{r['energy_in_mask']:.1f} | {r['uniform_energy']:.1f} |")
    if res.get("per_category"):
        lines.append("per category (phrase hit %): " + ", ".join(
            f"{c} {v['hit']:.0f} (n={v['n']})" for c, v in res["per_category"].items()))
    return "\n".join(lines)
