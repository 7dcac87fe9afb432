"""What the app serves: one model, one gallery index, one feedback file, loaded once.

`load_backend(config)` resolves the configuration (demo/config.py) into files:

- checkpoint: a local directory, or a Hugging Face hub id downloaded with
  ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE=1`` and the local cache);
- index: a local index directory; or, with ``--gallery``, an index built once into
  ``<home>/indexes/<key>`` and reused while the model and the gallery stay the same;
- nothing configured: the embedded default from ``envlf.bootstrap.prepare_default``
  (demo world + ``lite`` model + index), with its progress printed on the console.

Everything that can go wrong here raises `BackendError` with one readable line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ONNX_CHOICES, AppConfig, is_hub_id

log = logging.getLogger("envlf.app")

# what a checkpoint needs from a hub repository (config + weights + tokenizer files)
HUB_PATTERNS = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "added_tokens.json", "*.model"]
MAX_ALLOWED_DIRS = 64  # more distinct image folders than this: serve their common parent


class BackendError(RuntimeError):
    """The app cannot start with this configuration (one line, for the console)."""


@dataclass
class Backend:
    engine: object  # envlf.search.engine.SearchEngine
    store: object  # envlf.feedback.store.FeedbackStore
    checkpoint: Path
    index_dir: Path
    config: AppConfig
    image_dirs: list[Path] = field(default_factory=list)
    source: str = ""  # how the model and index were chosen, for the header
    _emap: object = None  # envlf.explain.viz.EmbeddingMap, built on first use
    _swap_lock: object = field(default_factory=threading.Lock)  # one model swap at a time
    _index_of: dict = field(default_factory=dict)  # model fingerprint -> index directory served with it

    @property
    def model(self):
        return self.engine.model

    @property
    def index(self):
        return self.engine.index

    @property
    def model_fingerprint(self) -> str:
        return self.engine.model_fingerprint

    @property
    def index_fingerprint(self) -> str:
        return self.engine.index.fingerprint

    def swap_model(self, spec: str, progress: Callable[[float, str], None] | None = None) -> str:
        """Serve another checkpoint (a directory or a hub id) without restarting: load it, and
        when the current index was built by another model, index the same gallery and caption
        corpus again for it (``<home>/indexes/model-<fingerprint>``, reused if already there).
        Searches keep running on the old model until the new one is ready; then one attribute
        assignment switches them over. Returns a one-line summary; raises BackendError."""
        from envlf.model.checkpoint import CheckpointError
        from envlf.model.core import load_pretrained
        from envlf.search.index import GalleryIndex, IndexLoadError
        from envlf.search.engine import SearchEngine

        say = progress or (lambda f, m: None)
        with self._swap_lock:
            spec = spec.strip() if spec else ""
            if not spec:
                raise BackendError("give a checkpoint directory or a hub id (user/repo)")
            say(0.05, f"loading {spec}")
            try:
                checkpoint = resolve_checkpoint(spec, self.config.home)
                model = load_pretrained(checkpoint, device=self.model.device)
            except (BackendError, CheckpointError) as e:
                # the reason (which may name a server path, or tell a missing path from a file) goes
                # to the server log; the visitor gets the same line whatever went wrong
                log.warning("load model %r refused: %s", spec, e)
                raise BackendError(unloadable(spec)) from None
            fp = model.fingerprint()
            if fp == self.model_fingerprint:
                return f"model {fp} is already being served"
            current = self.index
            self._index_of.setdefault(self.model_fingerprint, self.index_dir)
            if current.model_fingerprint == fp:
                index, index_dir = current, self.index_dir
            else:
                index_dir = self._index_of.get(fp, self.config.home / "indexes" / f"model-{fp}")
                try:
                    index = GalleryIndex.load(index_dir, model)
                    say(0.9, f"reusing the index built for model {fp}")
                except IndexLoadError:
                    say(0.1, f"indexing the {len(current)} gallery images for model {fp}")
                    index = current.rebuild(model, index_dir, workers=min(4, os.cpu_count() or 1))
            self.engine = SearchEngine(model, index, check=False,
                                       image_encoder=query_image_encoder(model, checkpoint, self.config))
            self.checkpoint, self.index_dir, self._emap = checkpoint, Path(index_dir), None
            self._index_of[fp] = self.index_dir
            self.source = f"checkpoint {spec}"
            say(1.0, "done")
            log.info("now serving model %s (%s) with index %s", fp, checkpoint, index.fingerprint)
            return f"now serving model {fp} from {spec} with index {index.fingerprint} ({len(index)} images)"

    def lineage(self) -> list[dict]:
        return list(getattr(self.model.config, "lineage", []) or [])

    def embedding_map(self):
        if self._emap is None:
            from envlf.explain.viz import EmbeddingMap

            meta = self.index.metadata
            self._emap = EmbeddingMap.fit(self.index.embeddings, meta["label"].tolist(), meta["image_id"].tolist())
        return self._emap


def console_progress(prefix: str = "envlf") -> Callable[[float, str], None]:
    """A progress callback (fraction, message) that prints a one-line bar per update."""
    last = {"msg": None, "pct": -1}

    def report(fraction: float, message: str) -> None:
        pct = int(round(100 * max(0.0, min(1.0, float(fraction)))))
        if message == last["msg"] and pct == last["pct"]:
            return
        last.update(msg=message, pct=pct)
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        print(f"[{prefix}] [{bar}] {pct:3d}% {message}", file=sys.stderr, flush=True)

    return report


def unloadable(spec: str) -> str:
    """What a web visitor is told when a checkpoint cannot be loaded: one line for every reason
    (missing, not a directory, corrupt, not on the hub), naming only what they typed."""
    shown = " ".join(spec.split())
    shown = shown if len(shown) <= 60 else shown[:59] + "…"
    return (f"cannot load a checkpoint from {shown!r}: give a checkpoint directory on this server "
            "(config.json + model.safetensors) or a hub id (user/repo); the server log says why")


def resolve_checkpoint(spec: str, home: Path) -> Path:
    """Local checkpoint directory for `spec` (a path or a hub id)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BackendError(f"checkpoint {p} is not a directory (expected config.json + model.safetensors)")
        return p
    if not is_hub_id(spec):
        raise BackendError(f"checkpoint {spec!r} not found (give a directory or a hub id such as user/repo)")
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, offline cache miss, unknown repo: one line for the console
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE=1: it must already be in the local cache)" \
            if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        raise BackendError(f"cannot fetch checkpoint {spec} from the Hugging Face hub{offline}: {first}") from None
    return Path(path)


def gallery_index_dir(home: Path, model_fp: str, gallery: str, captions: list[str]) -> Path:
    key = json.dumps({"model": model_fp, "gallery": str(Path(gallery).expanduser().resolve()),
                      "captions": [str(Path(c).expanduser().resolve()) for c in captions]}, sort_keys=True)
    return home / "indexes" / hashlib.sha256(key.encode()).hexdigest()[:16]


def build_or_reuse_index(model, gallery: str, captions: list[str], home: Path, progress: bool = True) -> Path:
    """Index `gallery` into <home>/indexes/<key> once; reuse it while model and inputs match."""
    from envlf.data.datasets import load_dataset
    from envlf.search.index import GalleryIndex, IndexLoadError

    out = gallery_index_dir(home, model.fingerprint(), gallery, captions)
    if (out / "manifest.json").is_file():
        try:
            GalleryIndex.load(out, model)
            print(f"[envlf] reusing the index of {gallery} at {out}", file=sys.stderr)
            return out
        except IndexLoadError as e:
            print(f"[envlf] rebuilding the index at {out}: {e}", file=sys.stderr)
    try:
        ds = load_dataset(gallery)
    except ValueError as e:
        raise BackendError(f"gallery: {e}") from None
    print(f"[envlf] indexing {len(ds)} images of {gallery} into {out} (once)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    GalleryIndex.build(model, ds, out, caption_files=captions, progress=progress,
                       workers=min(4, os.cpu_count() or 1))
    return out


def _within(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(folder)
        return True
    except ValueError:
        return False


def image_dirs_of(index, private: list[Path] | tuple[Path, ...] = ()) -> list[Path]:
    """Folders the gallery's image files are in (what the web server may serve).

    More than MAX_ALLOWED_DIRS folders are served as their common parent (Gradio checks
    every request against every allowed folder), but never when that parent is the file
    system's root or holds one of the `private` paths (feedback file, app home, checkpoint,
    index): images spread over the disk must not expose everything between them."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in index.metadata["path"].tolist()}  # no syscalls
    parents = sorted({str(Path(f).resolve()) for f in folders})
    if len(parents) > MAX_ALLOWED_DIRS:
        common = Path(os.path.commonpath(parents))
        exposed = [str(p) for p in private if _within(Path(p).expanduser().resolve(), common)]
        if common.parent != common and not exposed:
            return [common]
        log.warning("gallery images are in %d folders whose common parent %s %s: serving the %d folders one "
                    "by one", len(parents), common, f"holds {exposed[0]}" if exposed else "is the root",
                    len(parents))
    return [Path(p) for p in parents]


def check_feedback_file(path: Path) -> None:
    """The feedback CSV must be ours and writable before anyone spends time judging results:
    a file that is not an EnVLF feedback file (other columns, UTF-16) is refused, not
    modified; a torn last row (a writer killed mid-row) is repaired now, its bytes kept
    beside the file, with a warning on the console."""
    from envlf.feedback.store import repair

    if path.exists() and not path.is_file():
        raise BackendError(f"feedback file {path} is not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the feedback folder {path.parent}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BackendError(f"feedback file {path} is not writable; give another --feedback (ENVLF_FEEDBACK)")
    try:
        fixed = repair(path)
    except ValueError as e:
        raise BackendError(f"{e}; give another --feedback (ENVLF_FEEDBACK)") from None
    except OSError as e:
        raise BackendError(f"cannot use feedback file {path}: {e.strerror or e}") from None
    if fixed.action != "none":
        print(f"[envlf] warning: feedback file {path}: {fixed}", file=sys.stderr, flush=True)


def query_image_encoder(model, checkpoint: Path, config: AppConfig):
    """The exported image side for query images when config.onnx asks for it (ONNX Runtime fp32
    or int8, OpenVINO fp32 or bf16), else None (the model's torch image side). It runs on the CPU
    only; an export (or a runtime) that fails is logged and torch serves."""
    if config.onnx == "off":
        return None
    if model.device.type != "cpu":
        log.warning("--onnx %s ignored: the model runs on %s", config.onnx, model.device)
        return None
    try:
        from envlf.model.onnx import load_image_encoder

        return load_image_encoder(model, checkpoint, ONNX_CHOICES[config.onnx])
    except Exception as e:  # onnxruntime missing, an export the model's ops refuse, a read-only folder
        from envlf.errors import first_line

        log.warning("--onnx %s unavailable (%s): query images are encoded with torch", config.onnx, first_line(e))
        return None


def load_backend(config: AppConfig, progress: Callable[[float, str], None] | None = None,
                 quiet: bool = False) -> Backend:
    """Load (and when needed, download / build / bootstrap) the model, index and feedback store,
    in this process. (The app does the building in child processes: demo.startup.)"""
    from envlf.model.checkpoint import CheckpointError
    from envlf.model.core import load_pretrained
    from envlf.runtime import resolve_device
    from envlf.feedback.store import FeedbackStore
    from envlf.search.index import GalleryIndex, IndexLoadError
    from envlf.search.engine import SearchEngine

    t0 = time.perf_counter()
    config.home.mkdir(parents=True, exist_ok=True)
    check_feedback_file(config.feedback)  # first: before minutes of loading (or bootstrapping) a model
    if config.checkpoint is None:
        if config.index is not None or config.gallery is not None:
            raise BackendError("--index / --gallery need --checkpoint (ENVLF_CHECKPOINT): the model that "
                               "encodes the queries must be the one that built the index")
        try:
            from envlf.bootstrap import prepare_default
        except ImportError as e:
            raise BackendError(f"no checkpoint configured and the embedded default is unavailable ({e}); "
                               "set ENVLF_CHECKPOINT and ENVLF_INDEX") from None
        print(f"[envlf] no checkpoint configured: the embedded demo in {config.home} "
              "(built there once, then loaded)", file=sys.stderr, flush=True)
        assets = prepare_default(config.home, progress=progress or console_progress())
        checkpoint, index_dir, source = Path(assets.checkpoint), Path(assets.index), "embedded demo world"
    else:
        checkpoint = resolve_checkpoint(config.checkpoint, config.home)
        index_dir, source = config.index, f"checkpoint {config.checkpoint}"
    try:
        device = resolve_device(config.device)
    except RuntimeError as e:
        raise BackendError(f"device {config.device!r}: {e}") from None
    try:
        model = load_pretrained(checkpoint, device=device)
    except CheckpointError as e:
        raise BackendError(str(e)) from None
    if index_dir is None:
        if config.gallery is None:
            raise BackendError("give --index (ENVLF_INDEX) or --gallery (ENVLF_GALLERY) with --checkpoint")
        index_dir = build_or_reuse_index(model, config.gallery, config.captions, config.home)
    try:
        index = GalleryIndex.load(index_dir, model)
    except IndexLoadError as e:
        raise BackendError(str(e)) from None
    if len(index) == 0:
        raise BackendError(f"index {index_dir} holds no images")
    engine = SearchEngine(model, index, check=False,  # GalleryIndex.load(dir, model) checked it
                          image_encoder=query_image_encoder(model, checkpoint, config))
    store = FeedbackStore(config.feedback)
    private = (config.feedback, config.home, checkpoint, Path(index_dir))
    backend = Backend(engine=engine, store=store, checkpoint=checkpoint, index_dir=Path(index_dir), config=config,
                      image_dirs=image_dirs_of(index, private), source=source)
    (log.info if quiet else print)(f"[envlf] model {backend.model_fingerprint} ({model.config.name}) on {device}, index "
          f"{backend.index_fingerprint}: {len(index)} images, {len(index.corpus.strings)} captions; feedback -> "
          f"{config.feedback} ({time.perf_counter() - t0:.1f} s)", **({} if quiet else dict(file=sys.stderr, flush=True)))
    return backend
