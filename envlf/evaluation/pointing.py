"""The pointing game: do the attention maps point at the objects a phrase names?

For every grounded phrase of a caption (the demo world stores, per caption, the character
span of each phrase and the ids of the objects it names, plus an instance mask per image),
take the attention map of the phrase for its own image (`envlf.explain.gradcam`), upsample it to the
image and ask: does its peak fall inside the mask of one of the named objects? And what share
of the map's energy lies inside those masks? The phrase's map is read two ways:

- *in its caption*: its words' shares of the whole caption's map (what the app shows for a
  word of a long query);
- *as the query*: the map of the phrase given alone as the text ("three white planes"),
  ALBEF's protocol for weakly supervised grounding (RefCOCO+), and what a user who types the
  phrase into the search sees.

The whole caption is scored against the union of every object it names.

Two baselines put the numbers in context: the image centre (a fixed point) and a random
point, whose hit rate is exactly the masks' share of the image (no sampling needed); a
uniform map's energy share is that same area fraction. And a ceiling: the *grid ceiling* is
the hit rate of the best map the grid can hold (each cell the share of its area the target
covers, upsampled the same way), so a miss above it is the model's, not the grid's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from envlf.data.datasets import CaptionDataset, load_image
from envlf.explain.gradcam import attention_maps


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


def grounded_records(ds: CaptionDataset) -> list:
    """The records the game can score: with a mask and grounded sentences."""
    return [r for r in ds.records if r.meta.get("mask") and r.meta.get("sentences")]


def phrase_text(raw: str, phrase: dict) -> str:
    """A grounded phrase's words, cut from its caption by the stored character span."""
    return raw[int(phrase["start"]):int(phrase["end"])].strip()


def cell_cover(target: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) share of each cell's area that the (H, W) bool `target` covers."""

    t = torch.from_numpy(target.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0].numpy()


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
    grid: the maps' grid (default: the model's explain grid, see envlf.explain.gradcam)."""
    grid = grid or model.config.fusion.gradcam_grid or model.grid_size

    recs = grounded_records(ds)
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
        items = _grounded_captions(r, captions_per_image)
        alone = sorted({text for _, phrases in items for _, text in phrases if text})  # phrases recur
        texts = [raw for raw, _ in items] + alone
        # One image encoding; the captions and each distinct phrase (as the query) batched.
        all_maps = attention_maps(model, image, texts, grid=grid) if texts else []
        alone_maps = {text: m.sentence_map for text, m in zip(alone, all_maps[len(items):])}
        for (raw, phrases), cmaps in zip(items, all_maps):
            union = np.isin(mask, [i for p, _ in phrases for i in p["object_ids"]])
            if union.any():
                hit, energy = _score(cmaps.resized("sentence"), union)
                acc["caption_hit"].append(hit)
                acc["caption_energy"].append(energy)
                acc["caption_centre"].append(bool(union[centre]))
                acc["caption_random"].append(float(union.mean()))
                acc["caption_ceiling"].append(_grid_ceiling(union, grid))
            for p, text in phrases:
                target = np.isin(mask, p["object_ids"])
                if not target.any():
                    continue
                m = cmaps.span_map(int(p["start"]), int(p["end"]))
                hit, energy = _score(_resize(m, (W, H)), target)
                q_hit, q_energy = _score(_resize(alone_maps[text], (W, H)), target) if text else (False, 0.0)
                ceiling = _grid_ceiling(target, grid)
                for unit, h, e in (("phrase", hit, energy), ("query", q_hit, q_energy)):
                    acc[f"{unit}_hit"].append(h)
                    acc[f"{unit}_energy"].append(e)
                    acc[f"{unit}_centre"].append(bool(target[centre]))
                    acc[f"{unit}_random"].append(float(target.mean()))
                    acc[f"{unit}_ceiling"].append(ceiling)
                per_cat[cats.get(p["object_ids"][0], "?")].append((hit, q_hit))
    return _summary(len(recs), acc, per_cat, grid)

def _grounded_captions(r, captions_per_image: int) -> list[tuple[str, list]]:
    """(caption as written, its grounded phrases, each with its text) of a record's first captions."""
    items = []
    for caption, sent in list(zip(r.captions, r.meta["sentences"]))[:captions_per_image]:
        raw = sent.get("raw", caption)
        phrases = [(p, phrase_text(raw, p)) for p in sent.get("phrases", []) if p.get("object_ids")]
        if phrases:
            items.append((raw, phrases))
    return items


def _summary(n_images: int, acc: dict, per_cat: dict, grid: int) -> dict:
    """The game's report from the per-target values (percentages)."""
    mean = lambda k: 100.0 * float(np.mean(acc[k])) if acc[k] else float("nan")  # noqa: E731
    return {
        "images": n_images, "phrases": len(acc["phrase_hit"]), "captions": len(acc["caption_hit"]), "grid": grid,
        **{unit: {"model": mean(f"{unit}_hit"), "centre": mean(f"{unit}_centre"), "random": mean(f"{unit}_random"),
                  "energy_in_mask": mean(f"{unit}_energy"), "uniform_energy": mean(f"{unit}_random"),
                  "grid_ceiling": mean(f"{unit}_ceiling")}
           for unit in UNITS},
        "per_category": {c: {"n": len(v), "hit": 100.0 * float(np.mean([h for h, _ in v])),
                             "query_hit": 100.0 * float(np.mean([q for _, q in v]))}
                         for c, v in sorted(per_cat.items())},
    }



UNITS = {"phrase": "phrase in its caption", "query": "phrase as the query", "caption": "whole caption"}


def _grid_ceiling(target: np.ndarray, grid: int) -> bool:
    """Does the best map on a grid x grid grid hit `target`? Each cell holds the share of its
    area the target covers (area pooling); upsampled and scored like a model's map."""
    return _score(_resize(cell_cover(target, grid), (target.shape[1], target.shape[0])), target)[0]


def _resize(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:

    w, h = size
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def format_pointing(res: dict) -> str:
    grid = f", maps on a {res['grid']}x{res['grid']} grid" if res.get("grid") else ""
    lines = [f"pointing game: {res['images']} images, {res['phrases']} phrases, {res['captions']} captions{grid}",
             "| unit | model hit % | centre % | random point % | grid ceiling % | energy in mask % | uniform map % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for unit, name in UNITS.items():
        r = res[unit]
        lines.append(f"| {name} | {r['model']:.1f} | {r['centre']:.1f} | {r['random']:.1f} | "
                     f"{r['grid_ceiling']:.1f} | {r['energy_in_mask']:.1f} | {r['uniform_energy']:.1f} |")
    if res.get("per_category"):
        lines.append("per category (phrase hit % in its caption / as the query): " + ", ".join(
            f"{c} {v['hit']:.0f} / {v['query_hit']:.0f} (n={v['n']})" for c, v in res["per_category"].items()))
    return "\n".join(lines)
