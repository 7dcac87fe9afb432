"""The embedded default: everything the app needs, made on a fresh offline machine.

    assets = prepare_default()        # ~/.cache/envlf (or $ENVLF_HOME)

1. the demo world (envlf.world, 1,500 synthetic tiles with captions and masks),
2. a ``lite`` model trained on its train split (the recipe `WORLD_RECIPE`, the same one the
   README documents for the world table),
3. a gallery index of the whole world (train + val + test tiles, so every tile is searchable).

Each step is skipped when its result is already there and matches (world seed and size,
checkpoint present, index made by that checkpoint), so later starts only load. A file lock
keeps two processes starting at once from building twice. Progress goes to a callback
``progress(fraction, message)`` and to the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

WORLD_SIZE, WORLD_SEED = 1500, 0
# The world recipe (also the README command): the lite recipe (frozen Lite0 trunk with
# cached features, ITC + 3 hard ITM negatives + listwise term, curriculum over the first 20%)
# sized for the first start of the app (~10 minutes of training on 2 CPU cores): two of each
# tile's five captions per epoch, validation by ITC only (re-ranking 1,125 captions each
# epoch would cost a minute). No "d4" augmentation: world captions name directions
# ("in the top left corner", "on the left of").
WORLD_RECIPE = dict(model="lite", epochs=5, batch_size=64, captions_per_image=2, augment="none",
                    hard_negative_warmup=0.2, val_rerank_k=0, overrides=[])

Progress = Callable[[float, str], None]


@dataclass
class DefaultAssets:
    checkpoint: Path
    index: Path
    dataset: Path


def default_home() -> Path:
    return Path(os.environ.get("ENVLF_HOME", "~/.cache/envlf")).expanduser()


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _world_ok(d: Path) -> bool:
    from .world.store import GENERATOR_VERSION

    try:
        meta = json.loads((d / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (meta.get("seed") == WORLD_SEED and meta.get("generator") == GENERATOR_VERSION
            and len(meta.get("images", [])) == WORLD_SIZE)


def _recipe_ok(run: Path) -> bool:
    """The run was trained by this release's WORLD_RECIPE (its train_config.json says so)."""
    try:
        done = json.loads((run / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(done.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in WORLD_RECIPE.items())


def prepare_default(home: str | Path | None = None, progress: Progress | None = None,
                    workers: int = 2) -> DefaultAssets:
    """Make (or find) the default world, model and index under `home`."""
    home = Path(home).expanduser() if home else default_home()
    say = progress or (lambda f, m: None)

    def report(f: float, msg: str, fine: bool = False) -> None:
        # stage boundaries go to the log; the fine-grained ticks only to the callback
        (log.debug if fine else log.info)("[%3.0f%%] %s", 100 * f, msg)
        say(f, msg)

    world, run, index = home / "world", home / "models" / "world-lite", home / "indexes" / "world"
    ckpt = run / "best"
    with _lock(home / ".bootstrap.lock"):
        t0 = time.perf_counter()
        if not _world_ok(world):
            report(0.0, f"generating the demo world ({WORLD_SIZE} tiles) in {world}")
            from .world import generate_world

            # a model and index made from an older world (another generator version) are stale
            for stale in (run, index):
                if stale.exists():
                    log.info("removing %s: made from an older demo world", stale)
                    shutil.rmtree(stale)

            generate_world(world, n=WORLD_SIZE, seed=WORLD_SEED, workers=workers)
        report(0.05, "demo world ready")

        os.environ.setdefault("ENVLF_CACHE", str(home / "cache"))
        if run.exists() and not _recipe_ok(run):  # a model of an earlier release's recipe
            log.info("removing %s: not trained by this release's recipe", run)
            shutil.rmtree(run)  # (its index no longer matches the new model and is rebuilt)
        if not (ckpt / "model.safetensors").exists():
            from .train import TrainConfig, train

            tc = TrainConfig(data=str(world), out=str(run), workers=workers, progress=False, **WORLD_RECIPE)
            report(0.06, f"training the lite model on the demo world ({tc.epochs} epochs; cached trunk features)")

            def on_event(kind: str, info: dict) -> None:
                # trunk features 0.06 -> 0.25, training 0.25 -> 0.85
                if kind == "features":
                    report(0.06 + 0.19 * info["done"] / info["total"],
                           f"trunk features {info['done']}/{info['total']} (computed once, then cached)", fine=True)
                elif kind == "batch":
                    f = ((info["epoch"] - 1) + info["batch"] / info["batches"]) / info["epochs"]
                    report(0.25 + 0.6 * f, f"training epoch {info['epoch']}/{info['epochs']}, "
                                           f"batch {info['batch']}/{info['batches']}", fine=True)
                elif kind == "epoch":
                    mr = info.get("val_final", {}).get("mR", float("nan"))
                    report(0.25 + 0.6 * info["epoch"] / tc.epochs,
                           f"epoch {info['epoch']}/{tc.epochs} done: validation mR {mr:.1f}")

            train(tc, on_event=on_event)
        report(0.85, f"model ready: {ckpt}")

        from .checkpoint import load_pretrained
        from .data import load_dataset
        from .index import GalleryIndex, IndexLoadError

        model = load_pretrained(ckpt)
        try:
            GalleryIndex.load(index, model)
            report(1.0, f"index ready: {index} ({time.perf_counter() - t0:.0f} s)")
            return DefaultAssets(ckpt, index, world)
        except IndexLoadError:
            pass
        report(0.86, "indexing the demo world")
        ds = load_dataset(world)
        from .train import compute_trunk_features

        feats = None
        if model.config.vision.freeze_trunk:  # reuse the training run's cached trunk maps
            feats = compute_trunk_features(model, ds, workers=workers, cache_dir=Path(os.environ["ENVLF_CACHE"]) / "features",
                                           progress=False)
        GalleryIndex.build(model, ds, index, workers=workers, progress=False, trunk_features=feats)
        report(1.0, f"index ready: {index} ({time.perf_counter() - t0:.0f} s)")
    return DefaultAssets(ckpt, index, world)


def main(argv=None) -> int:
    """Make the embedded default now (what the app's first start does) and print its paths."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m envlf.bootstrap", description=main.__doc__)
    ap.add_argument("--home", default=None, help="default: $ENVLF_HOME or ~/.cache/envlf")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    assets = prepare_default(args.home, workers=args.workers)
    print(json.dumps({k: str(v) for k, v in assets.__dict__.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
