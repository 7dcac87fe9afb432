"""The frozen-trunk feature cache: every image's trunk feature map, computed once and kept on
disk (safetensors) in the features folder of the runtime paths (`envlf.paths.Paths.features`).
Training, fine-tuning, the index and the app's first start all read through
`compute_trunk_features`, so an image's trunk runs once per trunk, whichever needs it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from envlf.data.datasets import CaptionDataset, ImageCaptionDataset, collate
from envlf.data.transforms import build_transform

log = logging.getLogger(__name__)


def _record_key(r) -> str:
    st = r.path.stat() if r.path.exists() else None
    return f"{r.path}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}"


def dataset_digest(ds: CaptionDataset) -> str:
    h = hashlib.sha256()
    for r in ds.records:
        h.update(f"{_record_key(r)}\n".encode())
    return h.hexdigest()[:16]


def _cached_rows(cache_dir: Path, trunk_key: str, wanted: dict[str, int]) -> dict[int, torch.Tensor]:
    """Trunk maps of the records in ``wanted`` (record key -> index) found in other cache
    files of the same trunk (a split cached by training, reused by the whole-gallery index)."""
    found: dict[int, torch.Tensor] = {}
    for path in sorted(Path(cache_dir).glob("trunk-*.safetensors")):
        if len(found) == len(wanted):
            break
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("trunk") != trunk_key:
                    continue
                keys = json.loads(meta.get("records", "[]"))
                rows = [(wanted[k], n) for n, k in enumerate(keys) if k in wanted and wanted[k] not in found]
                if rows:
                    feats = f.get_tensor("features")
                    for i, n in rows:
                        found[i] = feats[n]
        except Exception as e:  # a damaged or foreign file is skipped, never trusted
            log.warning("ignoring unreadable feature cache %s: %s", path, e)
    return found


@torch.no_grad()
def compute_trunk_features(model, ds: CaptionDataset, batch_size: int = 32, workers: int = 2,
                           cache_dir: Path | None = None, progress: bool = True, on_batch=None) -> torch.Tensor:
    """(N, C, g, g) float16 trunk maps of every record, in record order. Cached on disk
    (safetensors) keyed by the trunk's weights, the image size and the image files; records
    already cached for another dataset view (a split) with the same trunk are reused, so only
    the rest are computed. on_batch(done, total) reports progress over the records computed."""
    key = None
    out: list[torch.Tensor | None] = [None] * len(ds)
    if cache_dir is not None:
        trunk_hash = hashlib.sha256()
        for k, v in sorted(model.vision.cached_trunk_state().items()):
            trunk_hash.update(k.encode() + v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        trunk_key = hashlib.sha256(f"{trunk_hash.hexdigest()}|{model.config.vision}".encode()).hexdigest()[:20]
        key = hashlib.sha256(f"{trunk_key}|{dataset_digest(ds)}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"trunk-{key}.safetensors"
        if path.exists():
            try:
                feats = load_file(str(path))["features"]
                if feats.shape[0] == len(ds):
                    log.info("trunk features from cache %s", path)
                    return feats
            except Exception as e:  # a damaged cache is recomputed, never trusted
                log.warning("ignoring unreadable feature cache %s: %s", path, e)
        record_keys = [_record_key(r) for r in ds.records]
        if Path(cache_dir).is_dir():
            for i, f in _cached_rows(Path(cache_dir), trunk_key, {k: i for i, k in enumerate(record_keys)}).items():
                out[i] = f
    todo = [i for i, f in enumerate(out) if f is None]
    t0 = time.perf_counter()
    if todo:
        model.eval()
        tf = build_transform(model.config.vision)
        sub = ds.subset(todo) if len(todo) < len(ds) else ds
        loader = torch.utils.data.DataLoader(ImageCaptionDataset(sub, tf, mode="images"), batch_size=batch_size,
                                             num_workers=workers, collate_fn=collate)
        done = 0
        for batch in tqdm(loader, desc="trunk features (once)", disable=not progress, unit="batch"):
            if batch is None:
                continue
            f = model.vision.trunk_features(batch["image"].to(model.device)).half().cpu()
            for i, idx in enumerate(batch["index"].tolist()):
                out[todo[idx]] = f[i]
            done += len(batch["index"])
            if on_batch is not None:
                on_batch(done, len(todo))
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise ValueError(f"{len(missing)} images could not be read, e.g. {ds.records[missing[0]].path}")
    feats = torch.stack(out)
    log.info("trunk features: %d images in %.1f s (%d from the cache of another view)", len(ds),
             time.perf_counter() - t0, len(ds) - len(todo))
    if key is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp),
                  metadata={"trunk": trunk_key, "records": json.dumps(record_keys)})
        tmp.replace(path)
    return feats
