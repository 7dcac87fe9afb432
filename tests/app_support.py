"""Shared set-up of the app tests: a tiny random-weight model, an index of the tiny dataset,
and a backend pointed at them through the app's own configuration (never the embedded
default, which trains a model)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import torch

from conftest import make_tiny_karpathy


def make_app_assets(root: Path) -> dict[str, Path]:
    """tiny_data + a saved `tiny` checkpoint + an index of the train split, under root."""
    from envlf.data.datasets import load_dataset
    from envlf.search.index import GalleryIndex
    from envlf.model.core import create_model

    data = make_tiny_karpathy(root / "tiny-data")
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(root / "ckpt")
    index = root / "index"
    GalleryIndex.build(model, load_dataset(data).split("train"), index, workers=0, progress=False)
    return {"data": data, "checkpoint": ckpt, "index": index, "feedback": root / "feedback" / "feedback.csv",
            "home": root / "home"}


def app_env(assets: dict[str, Path]) -> dict[str, str]:
    return {"ENVLF_CHECKPOINT": str(assets["checkpoint"]), "ENVLF_INDEX": str(assets["index"]),
            "ENVLF_FEEDBACK": str(assets["feedback"]), "ENVLF_HOME": str(assets["home"]), "ENVLF_DEVICE": "cpu"}


def make_backend(assets: dict[str, Path], **env: str):
    """The backend app.py would load from these assets; env: more of its variables (ENVLF_BASEMAP=...)."""
    from demo.backend import load_backend
    from demo.config import load_config

    config = load_config(argv=[], env=app_env(assets) | env, data_dir=assets["home"] / "no-such-data-dir")
    return load_backend(config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(handlers):
    """The app as app.py serves it (demo.layout.make_app + launch) on a free local port."""
    from demo.layout import close_app, launch, make_app

    demo = make_app(handlers)
    launch(demo, handlers.backend, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
           quiet=True)
    try:
        yield demo
    finally:
        close_app(demo)
