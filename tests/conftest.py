"""Shared test fixtures. Real-data tests skip cleanly when ../shared is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENVLF_SHARED", REPO.parent / "shared"))
UCM_DIR = SHARED / "datasets" / "ucm-captions"
RS_TEXT_DIR = SHARED / "datasets" / "rs-captions-text"


@pytest.fixture
def ucm_dir() -> Path:
    if not (UCM_DIR / "dataset.json").exists():
        pytest.skip(f"UCM-Captions not found at {UCM_DIR}")
    return UCM_DIR


@pytest.fixture
def rs_text_dir() -> Path:
    if not (RS_TEXT_DIR / "rsicd_precomp").exists():
        pytest.skip(f"RSICD/RSITMD caption files not found at {RS_TEXT_DIR}")
    return RS_TEXT_DIR


def make_tiny_karpathy(root: Path, n_per_class: int = 4, size: int = 48) -> Path:
    """A tiny dataset in the Karpathy layout (dataset.json + images/ + classes.csv): coloured
    squares on textured ground, two captions each, splits train/val. Seconds to make."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 170, 60), "white": (235, 235, 235)}
    images, lines = [], ["filename,class"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    n = 0
    for cname, rgb in colours.items():
        for k in range(n_per_class):
            a = rng.integers(60, 110, (size, size, 3)).astype(np.uint8)
            x, y = rng.integers(4, size - 20, 2)
            s = 10 + 3 * (k % 3)
            a[y:y + s, x:x + s] = rgb
            name = f"{n}.png"
            Image.fromarray(a).save(root / "images" / name)
            where = "left" if x < size / 2 - s / 2 else "right"
            sents = [f"a {cname} square on the {where}", f"there is one {'small' if s < 14 else 'large'} {cname} block"]
            images.append({"filename": name, "imgid": n, "split": "val" if k == n_per_class - 1 else "train",
                           "sentences": [{"raw": t} for t in sents]})
            lines.append(f"{name},{cname}")
            n += 1
    (root / "dataset.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    (root / "classes.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_tiny_karpathy(tmp_path / "tiny-data")
