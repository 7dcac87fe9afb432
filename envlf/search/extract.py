"""Embedding extraction for an archive too large for one index build: a Ray Data job that
writes sharded embeddings + metadata (parquet), resumable, that an index then builds from.

    envlf index extract --checkpoint CKPT --source scenes/ --out shards/archive       # local Ray
    envlf index extract ... --address ray://head:10001                                 # a cluster
    envlf index build --checkpoint CKPT --from-shards shards/archive --out indexes/archive

The job: the driver resolves the source into records (a dataset's images, or the chip windows
of GeoTIFF scenes: only their headers and a decimated statistics read happen here), numbers
them, and cuts them into shards of ``shard_size`` consecutive records (the *plan*). Ray Data
maps the pending shards over a pool of actors (each loads the model once); an actor cuts its
shard's chips from their scenes (windowed reads, PNGs into ``<out>/chips/``; chips below
``--min-valid`` are left out as empty), encodes its shard's images and writes the shard. A shard is complete
when its parquet file and then its ``.done.json`` (row count, SHA-256 of the parquet file)
are in place, each written to a temporary name and renamed. A rerun of the same command reads
the plan, keeps every complete shard and redoes the rest, so a killed worker (Ray restarts the
actor and retries its task) or a killed driver (run the command again) neither loses nor
duplicates a chip: a shard is always written whole, by whoever finishes it last, with the
same rows.

Directory:

    plan.json            format, model fingerprint, source, shard size, shard count, tokens, encoder
    records.parquet      every planned record: item (0..N-1), shard, image_id, path, split,
                         label, captions, geo (JSON, "" for a plain image)
    shard-00000.parquet  item, image_id, path, split, label, captions, geo, embedding (E float32),
                         tokens ((1+P)*D float16 bytes; only with tokens)
    shard-00000.done.json
    chips/               the chips of GeoTIFF scenes (PNG), when the source was scenes

Unreadable images (and windows) are left out of their shard and listed in its ``.done.json``
(``skipped``; empty chips with ``"empty": true``).
A cluster's workers need envlf installed and the checkpoint, the source and ``--out`` on a
path they all see (a shared file system); the local default needs neither.

Fault injection for tests (environment): ``ENVLF_EXTRACT_CRASH_ONCE=<file>`` makes the first
worker to start a shard create <file> and die mid-shard (``os._exit``);
``ENVLF_EXTRACT_KILL_DRIVER_AFTER=<n>`` makes the driver SIGKILL itself after n shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from envlf.data.datasets import CaptionDataset, ImageCaptionDataset, ImageRecord, check_images, collate
from envlf.data.geotiff import GEO_KEY
from envlf.data.transforms import build_transform
from envlf.model.onnx import RUNTIMES
from envlf.search.ann import _sha256
from envlf.search.shards import (
    FORMAT, FORMAT_VERSION, PLAN, ShardError, done_file, pending_shards, read_plan, shard_done, shard_file)

log = logging.getLogger(__name__)

RECORDS = "records.parquet"
CRASH_ONCE_ENV = "ENVLF_EXTRACT_CRASH_ONCE"
KILL_DRIVER_ENV = "ENVLF_EXTRACT_KILL_DRIVER_AFTER"
ENCODERS = RUNTIMES  # what encodes the images (envlf.model.onnx)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _records_frame(records: list[ImageRecord], shard_size: int):
    import pandas as pd

    return pd.DataFrame({
        "item": np.arange(len(records), dtype=np.int64),
        "shard": np.arange(len(records), dtype=np.int64) // shard_size,
        "image_id": [r.image_id for r in records], "path": [str(r.path) for r in records],
        "split": [r.split for r in records], "label": [r.label or "" for r in records],
        "captions": [list(r.captions) for r in records],
        "geo": [json.dumps(r.meta[GEO_KEY]) if GEO_KEY in (r.meta or {}) else "" for r in records]})


def _records_of(frame) -> list[ImageRecord]:
    out = []
    for r in frame.itertuples(index=False):
        meta = {GEO_KEY: json.loads(r.geo)} if r.geo else {}
        out.append(ImageRecord(r.image_id, Path(r.path), r.split, list(r.captions), r.label or None, meta))
    return out


def _ids_sha(frame) -> str:
    return hashlib.sha256("\n".join(frame["image_id"].tolist()).encode()).hexdigest()


# -- plan -------------------------------------------------------------------------------------
def make_plan(out: str | Path, source: CaptionDataset, fingerprint: str, model_name: str, *,
              shard_size: int, tokens: bool, encoder: str, source_spec: str, chipping: dict | None = None) -> dict:
    """Write records.parquet and plan.json for a new job in `out` (created; it must be empty
    or absent). chipping: the recipe of scene chips planned but not cut
    (envlf.data.geotiff.plan_scenes), which the workers cut."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if not len(source):
        raise ValueError(f"{source_spec}: no images to extract")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = _records_frame(source.records, shard_size)
    _write_atomic(out / RECORDS, lambda p: frame.to_parquet(p, index=False))
    plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": fingerprint,
            "model_name": model_name, "source": source_spec, "name": source.name, "root": str(source.root),
            "n_items": len(frame), "shard_size": shard_size, "n_shards": int(frame["shard"].max()) + 1,
            "tokens": bool(tokens), "encoder": encoder, "ids_sha256": _ids_sha(frame), "chipping": chipping,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(out / PLAN, lambda p: p.write_text(json.dumps(plan, indent=2), encoding="utf-8"))
    return plan


def check_resume(plan: dict, fingerprint: str, source_spec: str, shard_size: int, tokens: bool, encoder: str,
                 out: Path) -> None:
    """A rerun must be the same job: same model, source and layout."""
    asked = {"model_fingerprint": fingerprint, "source": source_spec, "shard_size": shard_size, "tokens": bool(tokens),
             "encoder": encoder}
    diff = [f"{k} {plan.get(k)!r} (asked {v!r})" for k, v in asked.items() if plan.get(k) != v]
    if diff:
        raise ShardError(f"{out} holds another extraction job: {'; '.join(diff)}. "
                         f"Rerun it as it was, or give a new --out")


def load_records(out: str | Path, plan: dict):
    import pandas as pd

    try:
        frame = pd.read_parquet(Path(out) / RECORDS)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ShardError(f"damaged {Path(out) / RECORDS}: {e}") from None
    if len(frame) != plan["n_items"] or _ids_sha(frame) != plan["ids_sha256"]:
        raise ShardError(f"{Path(out) / RECORDS} does not match {PLAN}: the shard directory is damaged")
    return frame


# -- one shard --------------------------------------------------------------------------------
def encode_shard(model, encoder, frame, shard: int, out: Path, tokens: bool, batch_size: int = 32,
                 chipping: dict | None = None) -> dict:
    """Encode the images of one shard and write it (parquet, then .done.json); with a chipping
    recipe, cut its planned scene chips first (their PNGs). Returns the completion record."""
    from envlf.search.index import encode_images

    t0 = time.perf_counter()
    rows = frame[frame["shard"] == shard].reset_index(drop=True)
    skipped = []
    if chipping:
        from envlf.data.geotiff import cut_planned

        cut, geos, left = cut_planned(rows["geo"].tolist(), rows["path"].tolist(), chipping)
        skipped = [{"image_id": rows["image_id"].iat[x["position"]], **{k: v for k, v in x.items() if k != "position"}}
                   for x in left]
        rows = rows.iloc[cut].reset_index(drop=True)
        rows["geo"] = geos
    recs = _records_of(rows)
    good, problems = check_images(CaptionDataset("shard", out, recs), max_workers=1, decode=False)
    keep_at = {r.image_id: i for i, r in enumerate(recs)}
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(good, build_transform(model.config.vision), mode="images"),
                                         batch_size=batch_size, num_workers=0, collate_fn=collate)
    skipped += [{"image_id": p.image_id, "error": p.message} for p in problems]
    embs, toks, kept = [], [], []
    (encoder or model).eval()
    for batch in loader:
        if batch is None:
            continue
        e, t = encode_images(encoder or model, batch)
        embs.append(e.float().cpu().numpy())
        if tokens:
            toks.append(t.half().cpu().numpy())
        kept += [keep_at[good.records[j].image_id] for j in batch["index"].tolist()]
    got = {recs[k].image_id for k in kept}
    skipped += [{"image_id": r.image_id, "error": "unreadable"} for r in good.records if r.image_id not in got]
    emb = np.concatenate(embs) if embs else np.zeros((0, model.config.embed_dim), np.float32)
    tok = (np.concatenate(toks) if toks else np.zeros((0, 1), np.float16)) if tokens else None
    return write_shard(out, shard, rows.iloc[kept], emb, tok, skipped, t0)


def write_shard(out: Path, shard: int, rows, emb: np.ndarray, tok: np.ndarray | None = None,
                skipped: list[dict] = (), t0: float | None = None) -> dict:
    """Write one shard: its records' rows (of records.parquet) with their embeddings (and
    tokens), the parquet file first, then its .done.json (size and SHA-256). Returns the
    completion record."""
    import pandas as pd

    table = rows.drop(columns=["shard"]).reset_index(drop=True)
    table["embedding"] = list(np.asarray(emb, np.float32))
    if tok is not None:
        table["tokens"] = [t.tobytes() for t in tok]
    path = shard_file(out, shard)
    _write_atomic(path, lambda p: pd.DataFrame(table).to_parquet(p, index=False))
    done = {"shard": shard, "rows": len(table), "skipped": list(skipped), "bytes": path.stat().st_size,
            "sha256": _sha256(path), "seconds": round(time.perf_counter() - (t0 or time.perf_counter()), 3)}
    if tok is not None:
        done["token_shape"] = list(tok.shape[1:])
    _write_atomic(done_file(out, shard), lambda p: p.write_text(json.dumps(done), encoding="utf-8"))
    return done


class ShardWorker:
    """A Ray Data actor: loads the model once, then encodes the shards it is given."""

    def __init__(self, checkpoint: str, out: str, threads: int, batch_size: int, device: str = "cpu"):
        from envlf.model.core import load_pretrained

        torch.set_num_threads(max(1, threads))
        self.out = Path(out)
        self.plan = read_plan(self.out)
        self.frame = load_records(self.out, self.plan)
        self.model = load_pretrained(checkpoint, device=device)
        self.encoder = None
        if self.plan["encoder"] != "torch":
            from envlf.model.onnx import load_image_encoder  # exported by the driver already

            self.encoder = load_image_encoder(self.model, checkpoint, self.plan["encoder"], threads=max(1, threads))
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        done = []
        for shard in np.asarray(batch["shard"]).tolist():
            marker = os.environ.get(CRASH_ONCE_ENV)
            if marker:
                try:
                    with open(marker, "x"):  # the first worker to get here dies, once
                        pass
                    os._exit(1)
                except FileExistsError:
                    pass
            done.append(encode_shard(self.model, self.encoder, self.frame, shard, self.out, self.plan["tokens"],
                                     self.batch_size, self.plan.get("chipping")))
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done]),
                "skipped": np.array([len(d["skipped"]) for d in done])}


# -- the job ----------------------------------------------------------------------------------
def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port (or ray://host:port) with nothing listening fails here in seconds: ray.init
    itself keeps retrying for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ShardError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _start_ray(address: str | None, workers: int) -> bool:
    """Connect to `address`, or start a local Ray with `workers` CPUs. True when started here."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, ray's AuthenticationError, a bad address ...
            from envlf.errors import first_line

            hint = (" (the cluster uses token authentication: give this process its token, RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token)") if "auth" in str(e).lower() else ""
            raise ShardError(f"cannot use the Ray cluster at {address}: {first_line(e)}{hint}") from None
    else:
        ray.init(num_cpus=workers, object_store_memory=256 * 2**20, **kwargs)
    return True


def run_extract(checkpoint: str | Path, source_spec: str, out: str | Path, source_fn=None, *, shard_size: int = 1024,
                address: str | None = None, workers: int = 2, threads: int | None = None, batch_size: int = 32,
                tokens: bool = True, encoder: str = "torch", device="cpu", progress: bool = True) -> dict:
    """Plan (or resume) and run an extraction job; returns a summary. source_fn(): the
    CaptionDataset to extract, or (it, the chipping recipe of its scene chips, planned and not
    cut: envlf.data.geotiff.plan_scenes, so the workers cut them); called only for a new job (a
    rerun keeps its plan)."""
    import ray
    from tqdm.auto import tqdm

    from envlf.model.core import load_pretrained

    out, device = Path(out).resolve(), str(device)
    checkpoint = Path(checkpoint).resolve()  # the workers' working directory is not ours
    t0 = time.perf_counter()
    model = load_pretrained(checkpoint, device="cpu")
    fp = model.fingerprint()
    plan = read_plan(out)
    if plan is None:
        if out.exists() and any(p.name != "chips" for p in out.iterdir()):
            raise ShardError(f"{out} exists and is not an EnVLF shard directory: refusing to write into it")
        source = source_fn()
        source, chipping = source if isinstance(source, tuple) else (source, None)
        plan = make_plan(out, source, fp, model.config.name, shard_size=shard_size, tokens=tokens,
                         encoder=encoder, source_spec=source_spec, chipping=chipping)
    else:
        check_resume(plan, fp, source_spec, shard_size, tokens, encoder, out)
        load_records(out, plan)
    for stale in out.glob("*.tmp*"):  # a killed writer's leftovers
        stale.unlink(missing_ok=True)
    if encoder != "torch":  # export once here, not in every worker at the same time
        from envlf.model.onnx import export_image_side, onnx_path

        export_image_side(model, onnx_path(checkpoint, encoder == "onnx-int8"), encoder == "onnx-int8")
    pending = pending_shards(out, plan)
    resumed = plan["n_shards"] - len(pending)
    log.info("%d shards: %d done already, %d to do", plan["n_shards"], resumed, len(pending))
    t_run = time.perf_counter()
    if pending:
        started = _start_ray(address, workers)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.verbose_stats_logs = False
            cpus = max(1, (os.cpu_count() or 1) // workers) if threads is None else threads
            ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
            ds = ds.map_batches(ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                                num_gpus=1 if device.startswith("cuda") else 0,
                                fn_constructor_kwargs={"checkpoint": str(checkpoint), "out": str(out), "threads": cpus,
                                                       "batch_size": batch_size, "device": device})
            kill_after = int(os.environ.get(KILL_DRIVER_ENV, "0") or 0)
            bar = tqdm(total=len(pending), desc="extract", unit="shard", disable=not progress)
            for n, _ in enumerate(ds.iter_rows(), 1):
                bar.update(1)
                if kill_after and n >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.close()
        finally:
            if started:
                ray.shutdown()
    left = pending_shards(out, plan)
    if left:
        raise ShardError(f"{out}: shards {left[:10]} did not complete; run the same command again to finish them")
    dones = [shard_done(out, i) for i in range(plan["n_shards"])]
    chips = sum(d["rows"] for d in dones)
    bad = [f"{x['image_id']}: {x['error']}" for d in dones for x in d["skipped"] if not x.get("empty")]
    if not chips:
        why = bad[0] if bad else "every chip is empty (less valid data than --min-valid: all nodata?)"
        raise ShardError(f"{source_spec}: nothing to index: {why}")
    done_now = sum(dones[i]["rows"] for i in pending)
    run_s = time.perf_counter() - t_run
    return {"out": str(out), "shards": plan["n_shards"], "shards_resumed": resumed, "chips": chips,
            "chips_this_run": done_now, "skipped": len(bad), "skipped_first": bad[:3],
            "empty_chips": sum(1 for d in dones for x in d["skipped"] if x.get("empty")),
            "seconds": round(time.perf_counter() - t0, 2), "extract_seconds": round(run_s, 2),
            "chips_per_s": round(done_now / run_s, 2) if pending and run_s > 0 else None,
            "workers": workers, "address": address or "local", "encoder": plan["encoder"]}
