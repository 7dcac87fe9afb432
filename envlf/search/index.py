"""Gallery index: what two-stage search needs, on disk, tied to the model that made it.

    envlf index build --checkpoint runs/ucm-lite4/best --source ../shared/datasets/ucm-captions \
        --out indexes/ucm --captions ../shared/datasets/rs-captions-text/rsicd_precomp
    envlf index add    --index indexes/ucm --checkpoint runs/ucm-lite4/best --source more_tiles/
    envlf index info   --index indexes/ucm
    envlf index search --index indexes/ucm --checkpoint runs/ucm-lite4/best --text "two planes" -k 5

An index is a directory:

    manifest.json        format, model fingerprint, sizes, token layout, build history
    metadata.parquet     one row per image: row, image_id, path, split, label, captions, source,
                         geo (a chip's place as JSON, envlf.data.geotiff; "" for a plain image)
    embeddings.f32       (N, E) ITC image embeddings, raw little-endian float32, append-only
    tokens.f16           (N, 1+P, D) ViT-module tokens for re-ranking, float16 (when stored)
    ann/                 FAISS index over the embeddings (envlf.search.ann)
    captions.parquet     the caption corpus for image->text: distinct strings, counts, images, sources
    caption_emb.f32      (U, E) their ITC text embeddings
    caption_ann/         FAISS index over them

Patch tokens: storing them makes re-ranking a lookup (50 KB per image for ``lite``: 65 x 384
float16); recomputing them means decoding k images and running the trunk per query (about
1 s for 16 tiles on 2 CPU cores), so tokens are stored unless the gallery would need more
than `TOKENS_AUTO_MAX_BYTES` (then they are recomputed from the image files). The arrays are
memory-mapped, so a large token file costs disk, not RAM. README "Search" has the numbers.

Raw append-only files + a manifest written last (atomically) make `add` cheap and safe: a
crash mid-add leaves extra bytes beyond the manifest's counts, which loading ignores and the
next add truncates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from envlf.data.datasets import (
    CaptionDataset,
    ImageCaptionDataset,
    ImageRecord,
    check_images,
    clean_caption,
    collate,
    load_dataset,
)
from envlf.data.geotiff import GEO_KEY
from envlf.data.transforms import build_transform
from envlf.evaluation.evaluate import encode_strings
from envlf.evaluation.metrics import normalize_caption
from envlf.search.ann import IVF_KINDS, AnnIndex, min_train

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_AUTO_MAX_BYTES = 64 * 2**30  # store tokens up to 64 GiB of disk (~1.3M lite images)


def _meta_schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("image_id", pa.string()), ("path", pa.string()), ("split", pa.string()),
                      ("label", pa.string()), ("captions", pa.list_(pa.string())), ("source", pa.string()),
                      ("geo", pa.string())] + [(c, pa.float64()) for c in GEO_COLUMNS[:6]] + [("scene", pa.string())])


class IndexLoadError(ValueError):
    """An index that cannot be used: missing or damaged, with a one-line reason."""


class IndexMismatchError(IndexLoadError):
    """An index built by a different model than the one loaded."""


def _append(path: Path, arr: np.ndarray, keep_bytes: int) -> None:
    """Truncate `path` to keep_bytes (drops a crashed add's leftovers), then append arr."""
    with open(path, "ab") as f:
        f.truncate(keep_bytes)
        f.write(np.ascontiguousarray(arr).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _new_ann(x: np.ndarray, kind: str, what: str = "images") -> AnnIndex:
    """The first ANN over `x`; a kind that must be trained falls back to exact (flat) when
    there are too few vectors to train it on (a small gallery, or no captions yet)."""
    if kind in IVF_KINDS and len(x) < min_train(kind):
        if len(x):
            log.warning("%d %s are too few to train an %r index (%d needed): exact search instead",
                        len(x), what, kind, min_train(kind))
        kind = "flat"
    return AnnIndex.build(x, kind=kind)


def _memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if n == 0:
        return np.zeros(shape, dtype)
    need = n * np.dtype(dtype).itemsize
    if not path.exists() or path.stat().st_size < need:
        raise IndexLoadError(f"{path} is shorter than the manifest says ({need} bytes): the index is damaged")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _geo(value) -> dict | None:
    """The metadata's "geo" cell (JSON text, "" for an image without a place) as a dict."""
    return json.loads(value) if isinstance(value, str) and value else None


# a chip's place as columns of metadata.parquet beside its "geo" JSON, so the map and the box
# filter read numbers instead of parsing a million JSON cells (NaN / "" for a plain image)
GEO_COLUMNS = ("lon", "lat", "west", "south", "east", "north", "scene")


def _geo_columns(geos: Sequence[str]) -> dict[str, np.ndarray]:
    """The GEO_COLUMNS of "geo" cells (JSON text or "")."""
    n = len(geos)
    num = np.full((n, 6), np.nan)
    scene = np.full(n, "", dtype=object)
    for i, g in enumerate(geos):
        if g:
            d = json.loads(g)
            num[i] = (d["lon"], d["lat"], *d["lonlat"])
            scene[i] = d["scene"]
    return {**{c: num[:, j] for j, c in enumerate(GEO_COLUMNS[:6])}, "scene": scene}


def _write_parquet_atomic(df, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def read_caption_files(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """Caption corpora -> [(caption, source)]. Anything `load_dataset` reads (Karpathy JSON,
    precomp, CSV), or a .txt file with one caption per line. Images are not needed."""
    out: list[tuple[str, str]] = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".txt" and p.is_file():
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            out += [(clean_caption(line), p.name) for line in lines if line.strip()]
            continue
        ds = load_dataset(p)
        out += [(c, ds.name) for c in ds.captions()]
    return out


@dataclass
class CaptionCorpus:
    """Distinct caption strings for image->text search."""

    strings: list[str]  # display form (first seen)
    counts: np.ndarray  # (U,) occurrences over gallery + corpora
    n_images: np.ndarray  # (U,) gallery images carrying the string
    image_ids: list[list[str]]  # gallery images carrying it (empty for corpus-only strings)
    sources: list[str]  # comma-separated sources


def _image_batches(model, source: CaptionDataset, fresh: list[int], trunk_features, batch_size: int, workers: int):
    """The images to add (source's records at `fresh`) as batches: slices of precomputed trunk
    features, or a DataLoader of decoded images (unreadable ones dropped and returned)."""
    new, problems = source.subset(fresh), []
    if trunk_features is not None:
        if len(trunk_features) != len(source):
            raise ValueError(f"trunk_features has {len(trunk_features)} rows for {len(source)} images")
        feats = trunk_features[torch.as_tensor(fresh, dtype=torch.long)] if fresh else trunk_features[:0]
        loader = [{"features": feats[s:s + batch_size], "index": torch.arange(s, min(s + batch_size, len(feats)))}
                  for s in range(0, len(feats), batch_size)]
        return new, problems, loader
    new, problems = check_images(new, max_workers=max(1, workers), decode=False)
    for p in problems:
        log.warning("skipped unreadable image: %s", p)
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(new, build_transform(model.config.vision), mode="images"),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return new, problems, loader


def encode_images(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of decoded images (``image``) or trunk maps (``features``) -> (ITC
    embeddings, ViT-module tokens). model: an EnVLF model or an image encoder standing in for
    its image side (envlf.model.onnx)."""
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        if "features" in batch:
            return model.encode_image(features=batch["features"].float(), return_tokens=True)
        return model.encode_image(batch["image"].to(model.device), return_tokens=True)


class GalleryIndex:
    """A loaded index directory. Use `build`, `load`, `add`."""

    def __init__(self, directory: Path, manifest: dict, metadata, embeddings: np.ndarray,
                 tokens: np.ndarray | None, ann: AnnIndex, corpus: CaptionCorpus, caption_emb: np.ndarray,
                 caption_ann: AnnIndex):
        self.dir = directory
        self.manifest = manifest
        self.metadata = metadata  # pandas DataFrame, row order = embedding rows
        self.embeddings = embeddings  # (N, E) float32 (memmap)
        self.tokens = tokens  # (N, 1+P, D) float16 memmap, or None (recompute)
        self.ann = ann
        self.corpus = corpus
        self.caption_emb = caption_emb
        self.caption_ann = caption_ann
        self._row_of = {iid: i for i, iid in enumerate(metadata["image_id"].tolist())}

    # -- properties ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def fingerprint(self) -> str:
        """Changes whenever the index content changes (build or add)."""
        m = self.manifest
        key = f"{m['model_fingerprint']}|{m['n_images']}|{m['n_captions']}|{m['history'][-1]['time']}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def row_of(self, image_id: str) -> int:
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"no image {image_id!r} in this index") from None

    def record(self, row: int) -> dict:
        r = self.metadata.iloc[int(row)]
        return {"row": int(row), "image_id": r["image_id"], "path": r["path"], "split": r["split"],
                "label": r["label"], "captions": list(r["captions"]), "geo": _geo(r.get("geo"))}

    @property
    def crs(self) -> str | None:
        """The CRS of the index's georeferenced chips (one per index), or None."""
        if not hasattr(self, "_crs"):
            first = next((g for g in self.metadata["geo"] if g), "")
            self._crs = json.loads(first)["crs"] if first else None
        return self._crs

    def rows_in_bbox(self, bbox: Sequence[float]) -> np.ndarray:
        """Index rows of the chips whose centre lies in (west, south, east, north), WGS84 degrees."""
        west, south, east, north = (float(v) for v in bbox)
        if not (west < east and south < north):
            raise ValueError(f"bounding box needs west < east and south < north, got {list(bbox)}")
        g = self.geo_frame()
        inside = (g["lon"] >= west) & (g["lon"] <= east) & (g["lat"] >= south) & (g["lat"] <= north)
        return g["row"][inside].to_numpy(dtype=np.int64)

    def geo_frame(self):
        """Rows with a place: row, image_id, lon, lat, west, south, east, north, scene (a
        DataFrame made once per loaded index: `add` returns a new one)."""
        if getattr(self, "_geo_frame", None) is None:
            m = self.metadata
            self._geo_frame = m.loc[m["scene"] != "", ["row", "image_id", *GEO_COLUMNS]].reset_index(drop=True)
        return self._geo_frame

    def item_ref(self, row: int) -> str:
        """A name for a gallery image that holds on another machine: ``<dataset>:<path relative
        to the folder it was indexed from>`` (``ucm:images/1.tif``), never the server's absolute
        path. The feedback CSV stores it for image results, beside the image id."""
        r = self.metadata.iloc[int(row)]
        path = Path(r["path"])
        rel = path.name
        for event in reversed(self.manifest.get("history", [])):
            root = event.get("source")
            if root and path.is_relative_to(root):
                rel = path.relative_to(root).as_posix()
                break
        return f"{r['source']}:{rel}"

    def check_model(self, model) -> None:
        fp = model.fingerprint()
        if fp != self.model_fingerprint:
            raise IndexMismatchError(
                f"index {self.dir} was built with model {self.model_fingerprint}, but the loaded model is {fp}: "
                f"rebuild it (envlf index build --checkpoint ... --out {self.dir})")

    # -- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, model=None, device: str = "auto") -> "GalleryIndex":
        import pandas as pd

        d = Path(directory)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise IndexLoadError(f"{d} is not an EnVLF index (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexLoadError(f"damaged index manifest {mpath}: {e}") from None
        if m.get("format") != "envlf-index" or m.get("format_version", 0) > FORMAT_VERSION:
            raise IndexLoadError(f"{mpath} is not an EnVLF index of a version this envlf reads")
        if model is not None and model.fingerprint() != m["model_fingerprint"]:
            raise IndexMismatchError(
                f"index {d} was built with model {m['model_fingerprint']}, but the loaded model is "
                f"{model.fingerprint()}: rebuild it (envlf index build --checkpoint ... --out {d})")
        n, u, e = int(m["n_images"]), int(m["n_captions"]), int(m["embed_dim"])
        try:
            meta = pd.read_parquet(d / "metadata.parquet")
            cap = pd.read_parquet(d / "captions.parquet")
        except Exception as ex:  # pyarrow raises several types for damaged files
            raise IndexLoadError(f"damaged index tables in {d}: {ex}") from None
        meta = meta.iloc[:n].reset_index(drop=True)
        if "geo" not in meta.columns:  # indexes from before chips had a place
            meta["geo"] = ""
        if "scene" not in meta.columns:  # indexes from before the place had columns
            for c, v in _geo_columns(meta["geo"].tolist()).items():
                meta[c] = v
        cap = cap.iloc[:u].reset_index(drop=True)
        if len(meta) != n or len(cap) != u:
            raise IndexLoadError(f"index {d}: tables hold {len(meta)} images / {len(cap)} captions, "
                              f"the manifest says {n} / {u}")
        emb = _memmap(d / "embeddings.f32", np.float32, (n, e))
        tokens = None
        if m.get("tokens_stored"):
            tokens = _memmap(d / "tokens.f16", np.float16, (n, *m["token_shape"]))
        cemb = _memmap(d / "caption_emb.f32", np.float32, (u, e))
        try:
            ann = AnnIndex.load(d / "ann", device=device)
            cann = AnnIndex.load(d / "caption_ann", device=device)
        except (ValueError, FileNotFoundError) as ex:
            raise IndexLoadError(f"index {d}: {ex}") from None
        if len(ann) < n or len(cann) < u:
            raise IndexLoadError(f"index {d}: the ANN files hold fewer vectors than the manifest says")
        ann.attach_vectors(emb)  # ivfpq re-scores its candidates from them
        cann.attach_vectors(cemb)
        corpus = CaptionCorpus(cap["string"].tolist(), cap["count"].to_numpy(), cap["n_images"].to_numpy(),
                               [list(x) for x in cap["image_ids"]], cap["sources"].tolist())
        return cls(d, m, meta, emb, tokens, ann, corpus, cemb, cann)

    # -- build / add --------------------------------------------------------------------------
    @classmethod
    def build(cls, model, source: CaptionDataset | None, out: str | Path, caption_files: Sequence[str | Path] = (),
              store_tokens: str = "auto", batch_size: int = 32, workers: int = 2, ann_kind: str = "auto",
              progress: bool = True, trunk_features: torch.Tensor | None = None,
              on_batch=None, image_encoder=None, shards: str | Path | None = None) -> "GalleryIndex":
        """Encode every readable image of `source` and its captions (plus caption corpora) into
        a new index directory `out` (replaced if it exists). trunk_features: the frozen
        trunk's maps of exactly `source`'s records (from a training run's cache), which
        skips decoding and the trunk. on_batch(done, total): called after each batch of images.
        image_encoder: what encodes the images instead of the model (envlf.model.onnx).
        shards: instead of `source`, a finished extraction job (envlf.search.extract) whose
        embeddings (and tokens) are taken as they are (`add_shards`)."""
        out = Path(out)
        if out.exists():
            if not (out / MANIFEST).exists() and any(out.iterdir()):
                raise IndexLoadError(f"{out} exists and is not an EnVLF index: refusing to overwrite it")
            shutil.rmtree(out)
        out.mkdir(parents=True)
        tok_shape = (1 + model.grid_size ** 2, model.config.vision.width)
        per_image = int(np.prod(tok_shape)) * 2
        plan = None
        if shards is not None:
            from envlf.search.shards import finished_plan

            plan = finished_plan(shards, model)
        n_images = plan["n_items"] if plan is not None else len(source)
        if store_tokens == "auto":
            store = n_images * per_image <= TOKENS_AUTO_MAX_BYTES and (plan is None or plan["tokens"])
        else:
            store = store_tokens in ("yes", "true", True)
        manifest = {
            "format": "envlf-index", "format_version": FORMAT_VERSION,
            "model_fingerprint": model.fingerprint(), "model_name": model.config.name,
            "embed_dim": model.config.embed_dim, "grid_size": model.grid_size,
            "tokens_stored": bool(store), "token_shape": list(tok_shape), "token_bytes_per_image": per_image,
            "n_images": 0, "n_captions": 0, "ann_kind": ann_kind, "history": [],
        }
        import pandas as pd

        empty_meta = pd.DataFrame({"row": pd.Series(dtype="int64"), "image_id": pd.Series(dtype="str"),
                                   "path": pd.Series(dtype="str"), "split": pd.Series(dtype="str"),
                                   "label": pd.Series(dtype="str"), "captions": pd.Series(dtype="object"),
                                   "geo": pd.Series(dtype="str"), "source": pd.Series(dtype="str"),
                                   **{c: pd.Series(dtype="float64") for c in GEO_COLUMNS[:6]},
                                   "scene": pd.Series(dtype="str")})
        for name in ("embeddings.f32", "caption_emb.f32") + (("tokens.f16",) if store else ()):
            (out / name).touch()
        idx = cls(out, manifest, empty_meta, np.zeros((0, manifest["embed_dim"]), np.float32), None,
                  None, CaptionCorpus([], np.zeros(0, np.int64), np.zeros(0, np.int64), [], []),
                  np.zeros((0, manifest["embed_dim"]), np.float32), None)
        if shards is not None:
            return idx.add_shards(model, shards, caption_files, progress, _first=True)
        return idx.add(model, source, caption_files, batch_size, workers, progress, _first=True,
                       trunk_features=trunk_features, on_batch=on_batch, image_encoder=image_encoder)

    def add(self, model, source: CaptionDataset, caption_files: Sequence[str | Path] = (), batch_size: int = 32,
            workers: int = 2, progress: bool = True, _first: bool = False,
            trunk_features: torch.Tensor | None = None, on_batch=None, image_encoder=None) -> "GalleryIndex":
        """Append images (and their captions, plus caption corpora) without a rebuild.
        Image ids already in the index are skipped. Returns the reloaded index. image_encoder:
        see `build`."""
        import pandas as pd  # deferred on purpose: pandas costs ~0.5 s to import

        if not _first:
            self.check_model(model)
        m = self.manifest
        t0 = time.perf_counter()
        known = set(self.metadata["image_id"].tolist())
        fresh = [i for i, r in enumerate(source.records) if r.image_id not in known]
        new, problems, loader = _image_batches(model, source, fresh, trunk_features, batch_size, workers)
        n0 = int(m["n_images"])
        keep = self._encode_append(image_encoder or model, loader, len(new), progress, on_batch)
        rows = [new.records[i] for i in keep]
        add_meta = pd.DataFrame({
            "row": np.arange(n0, n0 + len(rows), dtype=np.int64),
            "image_id": [r.image_id for r in rows], "path": [str(r.path) for r in rows],
            "split": [r.split for r in rows], "label": [r.label or "" for r in rows],
            "captions": [list(r.captions) for r in rows], "source": [source.name] * len(rows),
            "geo": [json.dumps(r.meta[GEO_KEY]) if GEO_KEY in (r.meta or {}) else "" for r in rows]})
        for c, v in _geo_columns(add_meta["geo"].tolist()).items():
            add_meta[c] = v
        meta = pd.concat([self.metadata, add_meta], ignore_index=True) if n0 else add_meta
        pairs = [(c, source.name, r.image_id) for r in rows for c in r.captions]

        def write_meta(path: Path) -> None:
            _write_parquet_atomic(meta, path)

        return self._commit(model, write_meta, len(rows), pairs, caption_files, progress, _first, t0,
                            {"source": str(source.root), "images_skipped": len(new) - len(keep) + len(problems)})

    def add_shards(self, model, shards: str | Path, caption_files: Sequence[str | Path] = (), progress: bool = True,
                   _first: bool = False) -> "GalleryIndex":
        """Append a finished extraction job (envlf.search.extract) shard by shard and column by
        column: its embeddings (and tokens) as they are, its metadata columns streamed into
        metadata.parquet by pyarrow. No per-chip Python object outlives its shard (an archive's
        build holds one shard at a time), except the captions of chips that carry some. Image ids
        already in the index are skipped. Returns the reloaded index."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from envlf.search.shards import finished_plan, shard_file

        if not _first:
            self.check_model(model)
        t0 = time.perf_counter()
        plan = finished_plan(shards, model)
        m = self.manifest
        if m["tokens_stored"] and not plan["tokens"]:
            raise ValueError(f"shards {shards} hold no patch tokens, and this index stores them: extract with "
                             "--store-tokens yes, or build with --store-tokens no")
        n0, dim = int(m["n_images"]), int(m["embed_dim"])
        known = pa.array(self.metadata["image_id"].to_numpy(), pa.string()) if n0 else None
        emb_bytes, tok_bytes = n0 * dim * 4, n0 * m["token_bytes_per_image"]
        at, skipped, pairs = n0, 0, []
        tmp = self.dir / f"metadata.parquet.tmp{os.getpid()}"
        schema = _meta_schema()
        writer = pq.ParquetWriter(tmp, schema)
        try:
            if n0:
                writer.write_table(pa.Table.from_pandas(self.metadata[schema.names], schema=schema,
                                                        preserve_index=False))
            for i in tqdm(range(plan["n_shards"]), desc="index shards", disable=not progress, unit="shard"):
                t = pq.read_table(shard_file(Path(shards), i))
                if known is not None:
                    seen = pc.is_in(t["image_id"], value_set=known)
                    skipped += pc.sum(seen).as_py() or 0
                    t = t.filter(pc.invert(seen))
                n = t.num_rows
                if not n:
                    continue
                e = np.asarray(pc.list_flatten(t["embedding"]), np.float32).reshape(n, dim)
                tok = None
                if m["tokens_stored"]:
                    tok = np.frombuffer(b"".join(t["tokens"].to_pylist()), np.float16).reshape(n, *m["token_shape"])
                emb_bytes, tok_bytes = self._append_rows(e, tok, emb_bytes, tok_bytes)
                captions = t["captions"].cast(pa.list_(pa.string()))
                writer.write_table(pa.table({
                    "row": pa.array(np.arange(at, at + n, dtype=np.int64)), "image_id": t["image_id"],
                    "path": t["path"], "split": t["split"], "label": t["label"], "captions": captions,
                    "source": pa.array(np.full(n, plan["name"], dtype=object), pa.string()), "geo": t["geo"],
                    **{c: pa.array(v) for c, v in _geo_columns(t["geo"].to_pylist()).items()}}, schema=schema))
                has = pc.greater(pc.list_value_length(captions), 0)
                if pc.any(has).as_py():
                    for iid, caps in zip(t["image_id"].filter(has).to_pylist(), captions.filter(has).to_pylist()):
                        pairs += [(c, plan["name"], iid) for c in caps]
                at += n
            writer.close()
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise

        def write_meta(path: Path) -> None:
            os.replace(tmp, path)

        return self._commit(model, write_meta, at - n0, pairs, caption_files, progress, _first, t0,
                            {"source": plan["root"], "shards": str(Path(shards).resolve()),
                             "images_skipped": skipped})

    def _append_rows(self, e: np.ndarray, t: np.ndarray | None, emb_bytes: int, tok_bytes: int) -> tuple[int, int]:
        """Append embeddings (and tokens, when the index stores them) past the given byte counts."""
        _append(self.dir / "embeddings.f32", e, emb_bytes)
        if self.manifest["tokens_stored"]:
            _append(self.dir / "tokens.f16", t, tok_bytes)
            tok_bytes += t.nbytes
        return emb_bytes + e.nbytes, tok_bytes

    def _commit(self, model, write_meta, n_added: int, pairs: list, caption_files, progress: bool, first: bool,
                t0: float, event: dict) -> "GalleryIndex":
        """After the new rows' vectors are appended: the ANN over them, the caption corpus, then
        the tables, the ANN files and the manifest (the commit point). Returns the reloaded index."""
        m = self.manifest
        n0 = int(m["n_images"])
        # the new rows as written (a memmap: an archive's vectors need not fit in RAM)
        new_e = _memmap(self.dir / "embeddings.f32", np.float32, (n0 + n_added, m["embed_dim"]))[n0:]
        # ANN over images: built on first use, appended afterwards
        if self.ann is None:
            ann = _new_ann(new_e, m["ann_kind"])
        else:
            ann = self.ann
            ann.add(new_e)
        # caption corpus: merge the new images' captions and the corpora
        pairs = list(pairs) + [(c, src, None) for c, src in read_caption_files(caption_files)]
        corpus, _, _ = self._merge_captions(model, pairs, progress)
        # commit: tables, ANN files, then the manifest (the commit point)
        write_meta(self.dir / "metadata.parquet")
        ann.save(self.dir / "ann")
        m["n_images"] = int(n0 + n_added)
        m["n_captions"] = len(corpus.strings)
        m["history"].append({"event": "build" if first else "add", "source": event.pop("source"),
                             "images_added": n_added, **event, "captions_total": len(corpus.strings),
                             "seconds": round(time.perf_counter() - t0, 2),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _write_json_atomic(self.dir / MANIFEST, m)
        return GalleryIndex.load(self.dir, device=self.ann.device if self.ann is not None else "auto")

    def _encode_append(self, model, loader, n_new: int, progress: bool, on_batch) -> list[int]:
        """Encode the batches and append their embeddings (and tokens, when stored) to the
        index files past the committed rows. Returns the indices in the new images of those
        written, in file order (an unreadable one has none)."""
        m = self.manifest
        keep = []
        model.eval()
        n0 = int(m["n_images"])
        emb_bytes, tok_bytes = n0 * m["embed_dim"] * 4, n0 * m["token_bytes_per_image"]
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"index {n_new} images", disable=not progress, unit="batch"):
                if batch is None:
                    continue
                e, t = encode_images(model, batch)
                e, t = e.float().cpu().numpy(), t.half().cpu().numpy() if m["tokens_stored"] else None
                emb_bytes, tok_bytes = self._append_rows(e, t, emb_bytes, tok_bytes)
                keep.extend(batch["index"].tolist())
                if on_batch is not None:
                    on_batch(len(keep), n_new)
        return keep

    def _merge_captions(self, model, pairs: list[tuple[str, str, str | None]], progress: bool):
        import pandas as pd

        c = self.corpus
        key_of = {normalize_caption(s): i for i, s in enumerate(c.strings)}
        strings, counts = list(c.strings), list(c.counts.tolist())
        image_ids = [list(x) for x in c.image_ids]
        sources = [set(s.split(",")) if s else set() for s in c.sources]
        for text, src, iid in pairs:
            k = normalize_caption(text)
            if not k:
                continue
            i = key_of.get(k)
            if i is None:
                i = key_of[k] = len(strings)
                strings.append(text)
                counts.append(0)
                image_ids.append([])
                sources.append(set())
            counts[i] += 1
            sources[i].add(src)
            if iid is not None and iid not in image_ids[i]:
                image_ids[i].append(iid)
        u0 = len(c.strings)
        new_strings = strings[u0:]
        cap_path = self.dir / "caption_emb.f32"
        if new_strings:
            emb, _, _ = encode_strings(model, new_strings, progress=progress)
            _append(cap_path, emb.numpy().astype(np.float32), u0 * self.manifest["embed_dim"] * 4)
            new_emb = emb.numpy().astype(np.float32)
        else:
            new_emb = np.zeros((0, self.manifest["embed_dim"]), np.float32)
        if self.caption_ann is None:
            cann = _new_ann(new_emb, self.manifest["ann_kind"], "captions")
        else:
            cann = self.caption_ann
            cann.add(new_emb)
        table = pd.DataFrame({"string": strings, "count": np.asarray(counts, np.int64),
                              "n_images": np.asarray([len(x) for x in image_ids], np.int64),
                              "image_ids": image_ids, "sources": [",".join(sorted(s)) for s in sources]})
        _write_parquet_atomic(table, self.dir / "captions.parquet")
        cann.save(self.dir / "caption_ann")
        corpus = CaptionCorpus(strings, table["count"].to_numpy(), table["n_images"].to_numpy(), image_ids,
                               table["sources"].tolist())
        return corpus, new_emb, cann

    # -- the same gallery for another model ------------------------------------------------------
    def as_dataset(self) -> CaptionDataset:
        """The indexed images with their captions, labels and splits, as a dataset."""
        records = [ImageRecord(r.image_id, Path(r.path), r.split, list(r.captions), r.label or None,
                               {GEO_KEY: _geo(r.geo)} if r.geo else {})
                   for r in self.metadata.itertuples(index=False)]
        return CaptionDataset(self.dir.name, self.dir, records)

    def corpus_only_captions(self) -> list[str]:
        """Caption strings that came from caption corpora rather than gallery images, each as
        many times as the corpora held it (so counts survive a rebuild)."""
        gallery = Counter(normalize_caption(c) for caps in self.metadata["captions"] for c in caps)
        out: list[str] = []
        for s, count in zip(self.corpus.strings, self.corpus.counts.tolist()):
            out += [s] * max(0, int(count) - gallery.get(normalize_caption(s), 0))
        return out

    def rebuild(self, model, out: str | Path, batch_size: int = 32, workers: int = 2,
                progress: bool = True) -> "GalleryIndex":
        """The same gallery and caption corpus, indexed by another model (e.g. a fine-tuned
        one) into `out`. This index stays as it is."""
        out = Path(out)
        if out.resolve() == self.dir.resolve():
            raise ValueError("rebuild into a new directory: this index is still in use")
        with tempfile.TemporaryDirectory() as tmp:
            extra = Path(tmp) / "corpus.txt"
            extra.write_text("\n".join(self.corpus_only_captions()) + "\n", encoding="utf-8")
            return GalleryIndex.build(model, self.as_dataset(), out, caption_files=[extra],
                                      store_tokens="yes" if self.manifest["tokens_stored"] else "no",
                                      batch_size=batch_size, workers=workers, ann_kind=self.manifest["ann_kind"],
                                      progress=progress)

    def info(self) -> dict:
        m = self.manifest
        d = self.dir
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        return {"directory": str(d), "images": m["n_images"], "distinct_captions": m["n_captions"],
                "model_fingerprint": m["model_fingerprint"], "model": m["model_name"],
                "index_fingerprint": self.fingerprint, "tokens_stored": m["tokens_stored"],
                "token_bytes_per_image": m["token_bytes_per_image"], "ann": repr(self.ann),
                "caption_ann": repr(self.caption_ann), "disk_bytes": size,
                "labels": dict(Counter(self.metadata["label"].tolist()).most_common(30)),
                "history": m["history"]}
