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
