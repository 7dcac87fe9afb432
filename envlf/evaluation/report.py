"""What the model confuses: per-class R@1 and the worst queries, as files a reader opens.

    envlf evaluate --checkpoint runs/ucm-lite4/best --data ../shared/datasets/ucm-captions \
        --split val --report runs/ucm-lite4/report-val

writes into the folder:

- ``per_class.md`` / ``per_class.csv``: per scene class, text->image R@1 over the captions of
  its images, image->text R@1 over its images (both expected under random ties, as the
  headline mR), and the class whose images most often come first instead;
- ``worst.html`` / ``worst.png``: the text->image queries whose own image ranks lowest, each
  with that image and the top results (class and score under each tile). The HTML holds its
  thumbnails inline (one file to send); the PNG is the same contact sheet as one picture.

The scores are the ones the report's recalls come from: the re-ranked ones when the
evaluation re-ranks, else ITC. Identical caption strings are one query here (the same
string ranks the same images), counted once.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from envlf.data.datasets import CaptionDataset, ImageLoadError, load_image
from envlf.evaluation import metrics as M

THUMB = 112  # px, contact-sheet tiles


def expected_ranks(s_i2t: np.ndarray, s_t2i: np.ndarray, txt2img) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each caption's own image in its text->image list, rank of each image's first
    own caption in its image->text list), 1 = first, expected under random tie-breaking
    (NaN for an image without captions)."""
    (_, _, _), (a_t, t_t, _) = M.tie_stats(s_t2i, txt2img)
    (a_i, t_i, r_i), _ = M.tie_stats(s_i2t, txt2img)
    t2i = a_t + (t_t + 1) / 2.0  # t counts the own image among the ties
    with np.errstate(invalid="ignore", divide="ignore"):
        i2t = np.where(r_i > 0, a_i + (t_i + 1) / (r_i + 1.0), np.nan)  # first of r relevant among t tied
    return t2i, i2t


def per_class(ds: CaptionDataset, s_i2t: np.ndarray, s_t2i: np.ndarray) -> list[dict]:
    """One row per scene class (records without a label are class "?"), worst t2i R@1 first."""
    txt2img = ds.txt2img()
    labels = np.array([r.label or "?" for r in ds.records], dtype=object)
    i2t_hit, _ = M.hit_probabilities(s_i2t, txt2img, (1,))
    _, t2i_hit = M.hit_probabilities(s_t2i, txt2img, (1,))
    top1 = s_t2i.argmax(0)  # each caption's first image
    rows = []
    for cls in dict.fromkeys(labels):
        imgs = labels == cls
        caps = imgs[txt2img]
        wrong = caps & (labels[top1] != cls)
        confused = Counter(labels[top1[wrong]]).most_common(1)
        rows.append({"class": str(cls), "images": int(imgs.sum()), "captions": int(caps.sum()),
                     "t2i_R@1": 100.0 * float(t2i_hit[caps, 0].mean()) if caps.any() else float("nan"),
                     "i2t_R@1": 100.0 * float(np.nanmean(i2t_hit[imgs, 0])) if imgs.any() else float("nan"),
                     "top1_other_class": (f"{confused[0][0]} ({100.0 * confused[0][1] / caps.sum():.0f}% of "
                                          "its captions)") if confused else "-"})
    return sorted(rows, key=lambda r: (r["t2i_R@1"], r["class"]))


def worst_queries(ds: CaptionDataset, s_t2i: np.ndarray, n: int = 20, top: int = 5) -> list[dict]:
    """The n distinct caption strings whose own image ranks lowest (their worst copy), each
    with the top results."""
    txt2img = ds.txt2img()
    ranks, _ = expected_ranks(s_t2i, s_t2i, txt2img)
    captions = ds.captions()
    worst: dict[str, int] = {}
    for j in np.argsort(-ranks, kind="stable"):
        key = M.normalize_caption(captions[j])
        if key not in worst:
            worst[key] = int(j)
        if len(worst) == n:
            break
    out = []
    for j in worst.values():
        own = int(txt2img[j])
        order = np.argsort(-s_t2i[:, j], kind="stable")[:top]
        out.append({"caption": captions[j], "rank": float(ranks[j]), "own": _tile(ds, own, s_t2i[own, j]),
                    "top": [_tile(ds, int(i), s_t2i[i, j], own=int(i) == own) for i in order]})
    return out


def _tile(ds: CaptionDataset, i: int, score: float, own: bool = False) -> dict:
    r = ds.records[i]
    return {"image_id": r.image_id, "label": r.label or "?", "path": str(r.path), "score": float(score), "own": own}


def _thumb(path: str) -> Image.Image:
    try:
        im = load_image(path)
    except ImageLoadError:
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    im.thumbnail((THUMB, THUMB))
    canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    canvas.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return canvas


def contact_sheet(queries: Sequence[dict]) -> Image.Image:
    """One row per query: its caption, then its own image and the top results (own image framed green)."""
    cols = 1 + max((len(q["top"]) for q in queries), default=0)
    head, label, gap = 18, 14, 6
    row_h = head + THUMB + label + gap
    sheet = Image.new("RGB", (cols * (THUMB + gap) + gap, max(1, len(queries)) * row_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, q in enumerate(queries):
        y = gap + n * row_h
        draw.text((gap, y), f"rank {q['rank']:.0f}: {q['caption']}"[:150], fill=(0, 0, 0))
        for c, t in enumerate([q["own"], *q["top"]]):
            x = gap + c * (THUMB + gap)
            sheet.paste(_thumb(t["path"]), (x, y + head))
            if c == 0 or t["own"]:
                draw.rectangle([x - 2, y + head - 2, x + THUMB + 1, y + head + THUMB + 1],
                               outline=(0, 150, 0) if c else (0, 90, 200), width=2)
            draw.text((x, y + head + THUMB + 1), f"{'own ' if c == 0 else ''}{t['label']} {t['score']:.2f}"[:22],
                      fill=(60, 60, 60))
    return sheet


def _data_uri(path: str) -> str:
    buf = io.BytesIO()
    _thumb(path).save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def worst_html(queries: Sequence[dict], title: str) -> str:
    cells = []
    for q in queries:
        tiles = "".join(
            f'<figure class="{"own" if i == 0 else "hit" if t["own"] else ""}"><img src="{_data_uri(t["path"])}" '
            f'alt="{html.escape(t["image_id"])}"><figcaption>{"own image · " if i == 0 else ""}'
            f'{html.escape(t["label"])} {t["score"]:.2f}</figcaption></figure>'
            for i, t in enumerate([q["own"], *q["top"]]))
        cells.append(f'<section><p><b>rank {q["rank"]:.0f}</b> {html.escape(q["caption"])}</p>{tiles}</section>')
    style = ("body{font-family:sans-serif}figure{display:inline-block;margin:4px;font-size:12px}"
             "figure.own img{outline:3px solid #005ac8}figure.hit img{outline:3px solid #009600}")
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
            f"<h1>{html.escape(title)}</h1><p>The text&rarr;image queries whose own image (blue) ranks lowest, "
            "with the top results (green: the own image).</p>" + "".join(cells))


def write_report(out: str | Path, ds: CaptionDataset, s_i2t: np.ndarray, s_t2i: np.ndarray, title: str,
                 n_worst: int = 20, top: int = 5) -> list[Path]:
    """Write per_class.md/.csv and worst.html/.png into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class(ds, s_i2t, s_t2i)
    fields = ["class", "images", "captions", "t2i_R@1", "i2t_R@1", "top1_other_class"]
    with open(out / "per_class.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(rows)
    md = [f"# {title}: per-class R@1 (expected under random ties), worst text->image first", "",
          "| class | images | captions | t2i R@1 | i2t R@1 | first result of another class, most often |",
          "|---|---:|---:|---:|---:|---|"]
    md += [f"| {r['class']} | {r['images']} | {r['captions']} | {r['t2i_R@1']:.1f} | {r['i2t_R@1']:.1f} | "
           f"{r['top1_other_class']} |" for r in rows]
    (out / "per_class.md").write_text("\n".join(md) + "\n")
    queries = worst_queries(ds, s_t2i, n_worst, top)
    (out / "worst.html").write_text(worst_html(queries, title))
    contact_sheet(queries).save(out / "worst.png")
    return [out / n for n in ("per_class.md", "per_class.csv", "worst.html", "worst.png")]
