"""The embedded default: everything the app needs, made on a fresh offline machine.

    python -m envlf.bootstrap            # what `python app.py` runs in the background on a first start
    assets = prepare_default()           # the same, in-process (~/.cache/envlf or $ENVLF_HOME)

It is made in two stages, so that a first start serves searches within minutes and then
gets better without a restart:

1. **quick**: a small demo world (`QUICK_SIZE` tiles), a ``lite`` model trained briefly on it
   (`QUICK_RECIPE`: one hard ITM negative, three epochs of two captions per tile), an index of its tiles. ~2 minutes
   on two CPU cores.
2. **full**: the demo world (`WORLD_SIZE` tiles), the ``lite`` model of `WORLD_RECIPE` (the
   README's world recipe), an index of every tile. ~15 minutes more, in the background.

Each stage's result is published in ``<home>/default.json`` when its index is ready; the app
serves the newest published stage and switches to the next as soon as it appears. Each step
is skipped when its result is already there and matches (world seed and size, the recipe in
the run's train_config.json, an index made by that checkpoint), so later starts only load.

One build at a time per home: the builder holds ``<home>/.bootstrap.lock`` (flock) while it
works; a second builder started meanwhile (a second app, a reload) exits at once and the
apps follow the first one through ``<home>/build-status.json`` (stage, step, progress, time
left, or the error), which the builder rewrites atomically as it goes.

``ENVLF_DEMO_SIZE=tiny`` swaps in miniature stages (a few dozen tiles, one epoch) for tests
of the whole start-up path; the default is ``full``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from envlf.paths import Paths

log = logging.getLogger(__name__)

WORLD_SIZE, WORLD_SEED = 1500, 0
# The world recipe (also the README command): the lite recipe (frozen Lite0 trunk with
# cached features, ITC + 3 hard ITM negatives + listwise term, curriculum over the first 20%)
# sized for a background build (~10 minutes of training on 2 CPU cores): two of each tile's
# five captions per epoch, validation by ITC only (re-ranking 1,125 captions each epoch would
# cost a minute). No "d4" augmentation: world captions name directions ("in the top left
# corner", "on the left of").
WORLD_RECIPE = dict(model="lite", epochs=5, batch_size=64, captions_per_image=2, augment="none",
                    hard_negative_warmup=0.2, val_rerank_k=0, overrides=[])
# The quick stage: a smaller world and a shorter, cheaper recipe (one hard ITM negative per
# side instead of three: the fusion encoder is most of a step's cost), to serve in minutes.
QUICK_SIZE = 300
QUICK_RECIPE = dict(model="lite", epochs=3, batch_size=64, captions_per_image=2, augment="none",
                    hard_negative_warmup=0.2, val_rerank_k=0, overrides=["loss.itm_negatives=1"])

SIZE_ENV = "ENVLF_DEMO_SIZE"
STATUS_FILE, PUBLISHED_FILE, LOCK_FILE, LOG_FILE = "build-status.json", "default.json", ".bootstrap.lock", "build.log"

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Stage:
    name: str  # "quick" | "full"
    world: str  # <home>/<world>
    world_size: int
    run: str  # <home>/models/<run>
    index: str  # <home>/indexes/<index>
    recipe: dict = field(hash=False)
    about: str = ""  # for the page: what this model is


def stages(size: str | None = None) -> tuple[Stage, ...]:
    """The stages of the embedded default for `size` ("full", or "tiny" for tests;
    default: $ENVLF_DEMO_SIZE or "full")."""
    size = size or os.environ.get(SIZE_ENV, "full") or "full"
    if size == "full":
        return (Stage("quick", "world-quick", QUICK_SIZE, "world-quick", "world-quick", QUICK_RECIPE,
                      f"quick model: {QUICK_SIZE}-tile world, {QUICK_RECIPE['epochs']} short epochs"),
                Stage("full", "world", WORLD_SIZE, "world-lite", "world", WORLD_RECIPE,
                      f"full model: {WORLD_SIZE}-tile world, {WORLD_RECIPE['epochs']} epochs"))
    if size == "tiny":
        tiny = dict(model="lite", epochs=1, batch_size=16, captions_per_image=1, augment="none",
                    val_rerank_k=0, overrides=["loss.itm_negatives=1"])
        return (Stage("quick", "world-quick", 24, "world-quick", "world-quick", tiny, "tiny quick model (tests)"),
                Stage("full", "world", 32, "world-lite", "world", {**tiny, "captions_per_image": 2},
                      "tiny full model (tests)"))
    raise ValueError(f"{SIZE_ENV} must be 'full' or 'tiny', not {size!r}")


@dataclass
class DefaultAssets:
    checkpoint: Path
    index: Path
    dataset: Path
    stage: str = "full"


def default_home() -> Path:
    return Paths.resolve().home


class BuildBusy(RuntimeError):
    """Another process is building the default in this home."""


@contextlib.contextmanager
def _lock(path: Path, wait: bool = True):
    import fcntl  # POSIX only: deferred so that importing this module works on Windows

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise BuildBusy(f"another process is building in {path.parent}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class StatusWriter:
    """The builder's progress in a JSON file the apps poll: state (building / done / failed),
    stage, step, overall fraction of the stage, message, estimated seconds left."""

    def __init__(self, path: Path | None, n_stages: int):
        self.path, self.n_stages = path, n_stages
        self.data: dict = {"pid": os.getpid(), "state": "building", "started": time.time()}
        self._stage_t0 = time.time()
        self._last = 0.0

    def stage(self, k: int, stage: Stage) -> None:
        self._stage_t0 = time.time()
        self.data.update(stage=stage.name, stage_no=k + 1, stages=self.n_stages, about=stage.about,
                         fraction=0.0, eta_s=None)
        self.flush()

    def update(self, fraction: float, message: str, boundary: bool = False) -> None:
        now = time.time()
        elapsed = now - self._stage_t0
        eta = elapsed * (1 - fraction) / fraction if fraction >= 0.03 and elapsed > 3 else None
        self.data.update(fraction=round(float(fraction), 4), message=message,
                         eta_s=None if eta is None else round(eta), updated=now)
        if boundary or now - self._last > 0.5:
            self.flush()

    def finish(self, state: str, error: str | None = None) -> None:
        self.data.update(state=state, error=error, updated=time.time(), pid=None if state != "building" else os.getpid())
        if state == "done":
            self.data.update(fraction=1.0, eta_s=0)
        self.flush()

    def flush(self) -> None:
        self._last = time.time()
        if self.path is not None:
            write_json_atomic(self.path, self.data)


def _world_ok(d: Path, size: int) -> bool:
    from envlf.world.store import GENERATOR_VERSION

    meta = read_json(d / "dataset.json") or {}
    return (meta.get("seed") == WORLD_SEED and meta.get("generator") == GENERATOR_VERSION
            and len(meta.get("images", [])) == size)


def _recipe_ok(run: Path, recipe: dict) -> bool:
    """The run was trained by this recipe (its train_config.json says so)."""
    done = read_json(run / "train_config.json")
    if done is None:
        return False
    return all(done.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items())


def published(home: str | Path | None = None, size: str | None = None) -> tuple[Stage, DefaultAssets] | None:
    """The newest stage published in `home` that is still valid for this release (its world,
    recipe and files), or None. Cheap: reads JSON files only."""
    home = Path(home).expanduser() if home else default_home()
    pub = read_json(home / PUBLISHED_FILE)
    if not pub:
        return None
    by_name = {s.name: s for s in stages(size)}
    stage = by_name.get(pub.get("stage"))
    if stage is None or pub.get("size") != (size or os.environ.get(SIZE_ENV, "full") or "full"):
        return None
    assets = _assets(home, stage)
    if not (_world_ok(assets.dataset, stage.world_size) and _recipe_ok(assets.checkpoint.parent, stage.recipe)
            and (assets.checkpoint / "model.safetensors").is_file() and (assets.index / "manifest.json").is_file()):
        return None
    return stage, assets


def _assets(home: Path, stage: Stage) -> DefaultAssets:
    return DefaultAssets(home / "models" / stage.run / "best", home / "indexes" / stage.index, home / stage.world,
                         stage.name)


# The heavy imports below (the world generator, training, torch through the model and the
# index) are deferred on purpose: a start that finds the build done, or another builder
# holding the lock, answers without paying for them.

def _ensure_world(stage: Stage, a: DefaultAssets, report, workers: int) -> None:
    world, run, index = a.dataset, a.checkpoint.parent, a.index
    if _world_ok(world, stage.world_size):
        return
    report(0.0, f"generating a demo world of {stage.world_size} tiles")
    from envlf.world import generate_world

    # a model and index made from an older world (another generator version) are stale
    for stale in (run, index):
        if stale.exists():
            log.info("removing %s: made from an older demo world", stale)
            shutil.rmtree(stale)
    generate_world(world, n=stage.world_size, seed=WORLD_SEED, workers=workers, progress=False)


def _ensure_model(home: Path, stage: Stage, a: DefaultAssets, report, workers: int) -> None:
    run, ckpt = a.checkpoint.parent, a.checkpoint
    if run.exists() and not _recipe_ok(run, stage.recipe):  # a model of an earlier release's recipe
        log.info("removing %s: not trained by this release's recipe", run)
        shutil.rmtree(run)  # (its index no longer matches the new model and is rebuilt)
    if (ckpt / "model.safetensors").exists():
        return
    from envlf.train.recipe import TrainConfig, train

    tc = TrainConfig(data=str(a.dataset), out=str(run), workers=workers, progress=False, home=str(home),
                     **stage.recipe)
    report(0.08, f"training the {stage.name} model ({tc.epochs} epochs)")

    def on_event(kind: str, info: dict) -> None:
        # trunk features 0.08 -> 0.30, training 0.30 -> 0.88
        if kind == "features":
            report(0.08 + 0.22 * info["done"] / info["total"],
                   f"image features {info['done']}/{info['total']} (computed once, then cached)", fine=True)
        elif kind == "batch":
            f = ((info["epoch"] - 1) + info["batch"] / info["batches"]) / info["epochs"]
            report(0.30 + 0.58 * f, f"training epoch {info['epoch']}/{info['epochs']}, "
                                    f"batch {info['batch']}/{info['batches']}", fine=True)
        elif kind == "epoch":
            mr = info.get("val_final", {}).get("mR", float("nan"))
            report(0.30 + 0.58 * info["epoch"] / tc.epochs,
                   f"epoch {info['epoch']}/{tc.epochs} done: validation mR {mr:.1f}")

    train(tc, on_event=on_event)


def _ensure_index(home: Path, a: DefaultAssets, report, workers: int, t0: float) -> None:
    from envlf.data.datasets import load_dataset
    from envlf.data.features import compute_trunk_features
    from envlf.model.core import load_pretrained
    from envlf.search.index import GalleryIndex, IndexLoadError

    model = load_pretrained(a.checkpoint)
    try:
        GalleryIndex.load(a.index, model)
        report(1.0, f"index ready ({time.perf_counter() - t0:.0f} s)")
        return
    except IndexLoadError:
        pass
    report(0.89, "indexing the demo world")
    ds = load_dataset(a.dataset)
    feats = None
    if model.config.vision.freeze_trunk:  # reuse the training run's cached trunk maps
        feats = compute_trunk_features(model, ds, workers=workers, cache_dir=Paths(home).features, progress=False)
    GalleryIndex.build(model, ds, a.index, workers=workers, progress=False, trunk_features=feats)
    report(1.0, f"index ready ({time.perf_counter() - t0:.0f} s)")


def build_stage(home: Path, stage: Stage, progress: Progress | None = None, workers: int = 2) -> DefaultAssets:
    """Make (or find) one stage's world, model and index under `home` (no lock: the caller holds it)."""
    say = progress or (lambda f, m: None)

    def report(f: float, msg: str, fine: bool = False) -> None:
        # stage boundaries go to the log; the fine-grained ticks only to the callback
        (log.debug if fine else log.info)("[%s %3.0f%%] %s", stage.name, 100 * f, msg)
        say(f, msg)

    a = _assets(home, stage)
    t0 = time.perf_counter()
    _ensure_world(stage, a, report, workers)
    report(0.08, "demo world ready")
    _ensure_model(home, stage, a, report, workers)
    report(0.88, "model ready")
    _ensure_index(home, a, report, workers, t0)
    return a


def publish(home: Path, stage: Stage, size: str | None = None) -> None:
    a = _assets(home, stage)
    write_json_atomic(home / PUBLISHED_FILE, {
        "stage": stage.name, "size": size or os.environ.get(SIZE_ENV, "full") or "full", "about": stage.about,
        "checkpoint": str(a.checkpoint), "index": str(a.index), "world": str(a.dataset),
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def prepare_default(home: str | Path | None = None, progress: Progress | None = None, workers: int = 2,
                    status: Path | None = None, wait: bool = True, size: str | None = None) -> DefaultAssets:
    """Make (or find) every stage of the default under `home`, publishing each; returns the
    last stage's assets. wait=False: raise BuildBusy at once when another process builds."""
    home = Path(home).expanduser() if home else default_home()
    home.mkdir(parents=True, exist_ok=True)
    plan = stages(size)
    say = progress or (lambda f, m: None)
    with _lock(home / LOCK_FILE, wait=wait):
        writer = StatusWriter(status, len(plan))
        try:
            for k, stage in enumerate(plan):
                writer.stage(k, stage)
                done = published(home, size)

                def report(f: float, msg: str, k=k, stage=stage) -> None:
                    writer.update(f, msg, boundary=not msg.startswith(("image features", "training epoch")))
                    say((k + f) / len(plan), f"{stage.name} ({k + 1}/{len(plan)}): {msg}")

                assets = build_stage(home, stage, report, workers)
                if done is None or [s.name for s in plan].index(done[0].name) < k:
                    publish(home, stage, size)
                    log.info("published the %s stage: %s", stage.name, assets.checkpoint)
        except BaseException as e:
            writer.finish("failed", f"{type(e).__name__}: {e}".splitlines()[0][:300])
            raise
        writer.finish("done")
    return assets


def main(argv=None) -> int:
    """Make the embedded default now (what the app's first start runs) and print its paths."""

    from envlf.runtime import background

    ap = argparse.ArgumentParser(prog="python -m envlf.bootstrap", description=main.__doc__)
    ap.add_argument("--home", default=None, help="default: $ENVLF_HOME or ~/.cache/envlf")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--background", action="store_true",
                    help="lower priority (the app starts it so; searches come first)")
    ap.add_argument("--no-wait", action="store_true", help="exit at once (code 0) when another process builds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.background:
        background()
    home = Path(args.home).expanduser() if args.home else default_home()
    try:
        assets = prepare_default(home, workers=args.workers, status=home / STATUS_FILE, wait=not args.no_wait)
    except BuildBusy as e:
        print(f"{e}: leaving it to that process", file=sys.stderr)
        return 0
    print(json.dumps({k: str(v) for k, v in asdict(assets).items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
