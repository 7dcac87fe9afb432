"""Train an EnVLF model: ITC + hard-negative ITM (+ MLM), validation each epoch, best by R-sum.

    python -m envlf.train --data ../shared/datasets/ucm-captions --model lite --out runs/ucm-lite
    python -m envlf.train --config my_run.json --epochs 5 --set fusion.layers=3 --set loss.mlm_weight=0.5
    torchrun --nproc_per_node 2 -m envlf.train --data ... --out ...      # DDP (nccl on GPUs, gloo on CPUs)

Frozen-trunk runs (the ``lite`` default) compute the trunk's feature maps once and train the
rest on the cached maps, with the dihedral augmentations applied to the maps themselves;
that is what makes CPU-only training take minutes instead of days. ``--no-cache`` (or
``--set vision.freeze_trunk=false``) trains end to end from pixels.

A run directory holds ``best/`` and ``last/`` (checkpoints: config.json + model.safetensors +
tokenizer; ``last/`` also has ``train_state.safetensors`` + ``train_state.json`` for
``--resume``), ``train_config.json`` and ``log.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import metrics as M
from .config import EnVLFConfig, get_config
from .data import CaptionDataset, ImageCaptionDataset, check_images, collate, load_dataset
from .negatives import WordSwapper
from .transforms import AUGMENTS, build_transform, dihedral

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str = ""  # dataset (any layout envlf.data.load_dataset reads)
    out: str = "runs/envlf"
    model: str = "lite"  # named config, config JSON, or a checkpoint directory to start from
    epochs: int = 20
    batch_size: int = 64  # pairs per optimiser step per process (before accumulation)
    grad_accum: int = 1  # optimiser step every this many batches
    lr: float = 3e-4  # new layers: ViT module, cross-attention, heads, projections
    lr_pretrained: float = 5e-5  # layers that start from pretrained weights (text model, fusion self-attn/FFN)
    weight_decay: float = 0.02
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay floor
    seed: int = 0
    augment: str = "d4"  # "none" | "flip" | "d4": symmetries of nadir tiles
    cache_trunk: bool = True  # frozen trunk: compute its features once (ignored when it trains)
    captions_per_image: int = 0  # per epoch: 0 = every caption once; n = n captions drawn per image
    # ITM negatives go from uniform over the batch to ALBEF-hard over this share of the
    # steps: once ITC knows the scene classes, its hardest negatives are all of the same
    # class, and a fusion encoder that has not yet learnt to look gets no signal from them.
    hard_negative_warmup: float = 0.0
    train_split: str = "train"
    val_split: str = "val"
    val_rerank_k: int = 16  # re-rank depth in validation (0: ITC only)
    val_every: int = 1
    workers: int = 2
    device: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on CUDA) | "bf16" | "fp16" | "off"
    resume: str | None = None  # a run's last/ directory
    max_steps: int = 0  # stop after this many optimiser steps (0: run all epochs); for smoke tests
    overrides: list[str] = field(default_factory=list)  # model config "a.b=value" edits
    progress: bool = True


# -- helpers ------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_overrides(cfg: EnVLFConfig, overrides: Sequence[str]) -> EnVLFConfig:
    """'vision.layers=3', 'loss.mlm_weight=0.5', 'fusion.init_from_text_layers=[4,5]' (JSON values)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form a.b=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # bare strings
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"override {key!r}: no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {key!r}: unknown field {parts[-1]!r}")
        node[parts[-1]] = value
    return EnVLFConfig.from_dict(d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a no-op otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' x concatenated along dim 0, keeping the gradient of the local part."""
        if not self.enabled:
            return x
        if x.requires_grad:
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(x), dim=0)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def string_keys(captions: Sequence[str]) -> np.ndarray:
    """Caption -> id of its normalised string (identical captions share one: ITC positives)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(M.normalize_caption(c), len(ids)) for c in captions], dtype=np.int64)


# -- trunk feature cache --------------------------------------------------------------------------

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
    from safetensors import safe_open

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
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    key = None
    out: list[torch.Tensor | None] = [None] * len(ds)
    if cache_dir is not None:
        trunk_hash = hashlib.sha256()
        for k, v in sorted(model.vision.trunk.state_dict().items()):
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


# -- optimiser ------------------------------------------------------------------------------------

def param_groups(model, tc: TrainConfig) -> list[dict]:
    """Pretrained weights (text model, fusion self-attention / FFN copied from it) get the
    small learning rate; new layers the large one. No weight decay on biases / norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pretrained = name.startswith("text.") or (
            name.startswith("fusion.layers.") and ".cross_" not in name and model.config.fusion.init_from_text_layers
            and model.config.text.weights is not None
        )
        no_decay = p.dim() < 2 or "norm" in name.lower() or name.endswith(".bias") or name in (
            "logit_scale", "vision.cls_token", "vision.pos_embed")
        groups.setdefault((pretrained, no_decay), []).append(p)
    return [{"params": ps, "lr": tc.lr_pretrained if pre else tc.lr, "base_lr": tc.lr_pretrained if pre else tc.lr,
             "weight_decay": 0.0 if nd else tc.weight_decay} for (pre, nd), ps in groups.items()]


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# -- resume state (safetensors + JSON: nothing pickled) ----------------------------------------------

def save_train_state(directory: Path, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
    for pid, st in sd["state"].items():
        meta["state_keys"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state_keys"][str(pid)][k] = "tensor"
            else:
                meta["state_keys"][str(pid)][k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(directory / "train_state.safetensors"))
    (directory / "train_state.json").write_text(json.dumps({"optimizer": meta, **state}, indent=1))


def load_train_state(directory: Path, optimizer) -> dict:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "train_state.json").read_text())
        tensors = load_file(str(directory / "train_state.safetensors"))
    except Exception as e:
        raise ValueError(f"cannot resume from {directory}: {e}") from None
    opt = meta.pop("optimizer")
    state = {}
    for pid, keys in opt["state_keys"].items():
        state[int(pid)] = {k: (tensors[f"opt.{pid}.{k}"] if v == "tensor" else v) for k, v in keys.items()}
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# -- the loop -------------------------------------------------------------------------------------

def build_model(tc: TrainConfig, device: torch.device):
    from .checkpoint import load_pretrained
    from .model import EnVLF

    src = Path(tc.model)
    if tc.resume:
        model = load_pretrained(tc.resume, device=device)
    elif src.is_dir() and (src / "config.json").exists():
        model = load_pretrained(src, device=device)  # fine-tune an existing checkpoint
        if tc.overrides:
            raise ValueError("--set cannot change the architecture of an existing checkpoint")
    else:
        cfg = apply_overrides(get_config(tc.model), tc.overrides)
        model = EnVLF(cfg, pretrained=True).to(device)
    # a frozen trunk that came from a checkpoint must stay frozen; trainable text layers etc.
    model.vision.set_trunk_trainable(not model.config.vision.freeze_trunk)
    model.text.set_trainable_layers(model.config.text.trainable_layers)
    return model


def _epoch_pairs(ds: CaptionDataset, per_image: int, rng: np.random.Generator) -> np.ndarray:
    pairs = np.array(ds.pairs(), dtype=np.int64)  # (P, 2): record, caption index
    if per_image > 0:
        keep = []
        by_img: dict[int, list[int]] = {}
        for n, (i, _) in enumerate(pairs):
            by_img.setdefault(int(i), []).append(n)
        for i, ns in by_img.items():
            keep.extend(rng.choice(ns, size=min(per_image, len(ns)), replace=False).tolist())
        pairs = pairs[np.array(sorted(keep))]
    return pairs[rng.permutation(len(pairs))]


def train(tc: TrainConfig, on_event=None) -> dict:
    """Run training; returns the summary (best metrics, paths, timings).

    on_event(kind, info): optional progress callback (main process only): "features"
    {"done", "total"} while trunk features are cached, "batch" {"epoch", "batch",
    "batches", "epochs"} every few percent of an epoch, "epoch" {the epoch's log record}."""
    notify = on_event if on_event is not None else (lambda kind, info: None)
    from tqdm.auto import tqdm

    from .evaluate import evaluate

    if tc.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}")
    device = resolve_device(tc.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist = Dist(device)
    seed_everything(tc.seed + dist.rank)
    out = Path(tc.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    full = load_dataset(tc.data)
    train_ds = full.split(tc.train_split)
    val_ds = full.split(tc.val_split) if tc.val_split and tc.val_split in full.splits() else None
    train_ds, bad = check_images(train_ds, max_workers=max(1, tc.workers), decode=False)
    if val_ds is not None:
        val_ds, bad_v = check_images(val_ds, max_workers=max(1, tc.workers), decode=False)
        bad += bad_v
    for p in bad:
        log.warning("skipped unreadable image: %s", p)

    model = build_model(tc, device)
    cfg = model.config
    use_cache = tc.cache_trunk and cfg.vision.freeze_trunk
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
    if tc.amp == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if dist.main:
        log.info("model %s: %s", cfg.name, {k: f"{v / 1e6:.2f}M" for k, v in model.num_parameters().items()})

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_feats = val_feats = None
    if use_cache:
        cache_dir = Path(os.environ.get("ENVLF_CACHE", "cache")) / "features"
        train_feats = compute_trunk_features(model, train_ds, workers=tc.workers, cache_dir=cache_dir,
                                             progress=tc.progress and dist.main,
                                             on_batch=(lambda d, t: notify("features", {"done": d, "total": t}))
                                             if dist.main else None)
        if val_ds is not None:
            val_feats = compute_trunk_features(model, val_ds, workers=tc.workers, cache_dir=cache_dir,
                                               progress=tc.progress and dist.main)
    timings["trunk_cache_s"] = time.perf_counter() - t0

    text_keys_all = string_keys(train_ds.captions())
    cap_offsets = np.cumsum([0] + [len(r.captions) for r in train_ds.records])
    train_tf = None if use_cache else build_transform(cfg.vision, train=True, augment=tc.augment)

    optimizer = torch.optim.AdamW(param_groups(model, tc), betas=(0.9, 0.98), eps=1e-6)
    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    rng = np.random.default_rng(tc.seed)
    n_pairs = len(_epoch_pairs(train_ds, tc.captions_per_image, np.random.default_rng(0)))
    per_rank = n_pairs // dist.world
    steps_per_epoch = max(1, per_rank // (tc.batch_size * tc.grad_accum))
    total_steps = steps_per_epoch * tc.epochs if not tc.max_steps else min(tc.max_steps, steps_per_epoch * tc.epochs)

    start_epoch, step, best, history = 0, 0, -1.0, []
    if tc.resume:
        st = load_train_state(Path(tc.resume), optimizer)
        start_epoch, step, best, history = st["epoch"] + 1, st["step"], st["best"], st.get("history", [])
        rng = np.random.default_rng(tc.seed + 1000 * start_epoch)
        log.info("resumed from %s at epoch %d, step %d", tc.resume, start_epoch, step)

    if dist.main:
        old_log = out / "log.jsonl"
        if not tc.resume and old_log.exists():  # a fresh run in a used directory: its own log
            log.warning("%s holds an earlier run; its log.jsonl becomes log.previous.jsonl", out)
            old_log.replace(out / "log.previous.jsonl")
        cfg.lineage.append({"event": "train", "data": str(tc.data), "train_split": tc.train_split,
                            "train_images": len(train_ds), "train_pairs": int(n_pairs),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "train_config": dataclasses.asdict(tc)})
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
    gen = torch.Generator().manual_seed(tc.seed + dist.rank)
    # its own stream, so turning the swaps on leaves the pairs' order as it was
    swap_rng = np.random.default_rng([tc.seed, dist.rank, start_epoch, 7])
    # no side swaps when the tiles are flipped: "on the left" is then true of either side
    swapper = WordSwapper(train_ds.captions(), positions=tc.augment == "none") \
        if cfg.loss.itm_swap_negatives and cfg.loss.itm_weight > 0 else None
    t_train = time.perf_counter()
    stop = False
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        pairs = _epoch_pairs(train_ds, tc.captions_per_image, rng)
        pairs = pairs[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        n_batches = steps_per_epoch * tc.grad_accum
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not (tc.progress and dist.main),
                   unit="batch")
        t_ep, seen, running = time.perf_counter(), 0, {}
        for b in bar:
            chunk = pairs[b * tc.batch_size:(b + 1) * tc.batch_size]
            recs, caps = chunk[:, 0], chunk[:, 1]
            captions = [train_ds.records[i].captions[j] for i, j in chunk]
            text = model.tokenize(captions)
            image_keys = torch.as_tensor(recs, device=device)
            text_keys = torch.as_tensor(text_keys_all[cap_offsets[recs] + caps], device=device)
            kwargs: dict[str, Any] = {}
            if swapper is not None:
                rows, swapped = swapper.batch(captions, swap_rng)
                if rows:
                    kwargs["swap_rows"] = torch.as_tensor(rows, device=device)
                    kwargs["swap_text"] = model.tokenize(swapped)
            if use_cache:
                feats = train_feats[torch.as_tensor(recs)].to(device).float()
                if tc.augment != "none":
                    choices = (0, 2, 4, 6) if tc.augment == "flip" else tuple(range(8))
                    ks = torch.as_tensor(choices)[torch.randint(len(choices), (len(recs),), generator=gen)]
                    feats = dihedral(feats, ks)
                kwargs["features"] = feats
            else:
                from .data import load_image

                kwargs["pixels"] = torch.stack([train_tf(load_image(train_ds.records[i].path)) for i in recs]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                hardness = min(1.0, step / max(1.0, tc.hard_negative_warmup * total_steps)) \
                    if tc.hard_negative_warmup > 0 else 1.0
                losses = ddp_model(text, image_keys, text_keys, gather=dist.gather if dist.enabled else None,
                                   generator=gen, hardness=hardness, **kwargs)
            (losses["loss"] / tc.grad_accum).backward()
            if (b + 1) % tc.grad_accum == 0:
                f = lr_factor(step, total_steps, tc.warmup_steps, tc.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * f
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            seen += len(recs)
            for k in ("loss", "itc", "itm", "mlm"):
                if k in losses:
                    v = float(losses[k].detach())
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in running.items()},
                             "pairs/s": f"{seen * dist.world / (time.perf_counter() - t_ep):.0f}"})
            if dist.main and (b + 1) % max(1, n_batches // 20) == 0:
                notify("batch", {"epoch": epoch + 1, "batch": b + 1, "batches": n_batches, "epochs": tc.epochs})
            if not tc.progress and dist.main and (b + 1) % max(1, n_batches // 5) == 0:
                log.info("epoch %d: batch %d/%d, %s", epoch + 1, b + 1, n_batches,
                         ", ".join(f"{k} {v:.3f}" for k, v in running.items()))
            if tc.max_steps and step >= tc.max_steps:
                stop = True
                break
        bar.close()
        record = {"epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t_ep,
                  "pairs_per_s": seen * dist.world / (time.perf_counter() - t_ep),
                  **{f"train_{k}": dist.mean(v) for k, v in running.items()},
                  "temperature": float(1.0 / model.temperature_scale().detach())}
        is_last = stop or epoch + 1 == tc.epochs
        if val_ds is not None and dist.main and ((epoch + 1) % tc.val_every == 0 or is_last):
            rep = evaluate(model, val_ds, rerank_k=tc.val_rerank_k, features=val_feats, references=False,
                           workers=tc.workers, progress=False)
            key = f"ITC + ITM top{tc.val_rerank_k} (expected)" if tc.val_rerank_k else "ITC (expected)"
            record["val_itc"] = rep["rows"]["ITC (expected)"]
            record["val_final"] = rep["rows"][key]
            score = record["val_final"]["rsum"]
            log.info("epoch %d: val ITC mR %.2f, final mR %.2f (rsum %.1f)", epoch + 1,
                     record["val_itc"]["mR"], record["val_final"]["mR"], score)
            if score > best:
                best = score
                model.save_pretrained(out / "best")
                record["best"] = True
        history.append(record)
        if dist.main:
            notify("epoch", record)
        if dist.main:
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            model.save_pretrained(out / "last")
            save_train_state(out / "last", optimizer, {"epoch": epoch, "step": step, "best": best,
                                                       "history": history})
            if val_ds is None:  # nothing to select on: the last is the best
                model.save_pretrained(out / "best")
        dist.barrier()
        if stop:
            break
    timings["train_s"] = time.perf_counter() - t_train
    summary = {"out": str(out), "best_rsum": best, "steps": step, "epochs_run": len(history),
               "timings": timings, "history": history}
    if dist.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m envlf.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags given here override it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = type(default) if default is not None else str
            p.add_argument(flag, dest=f.name, type=typ, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --set fusion.layers=3 (repeatable)")
    p.add_argument("--no-cache", dest="cache_trunk", action="store_false", default=None,
                   help="do not cache trunk features (same as --no-cache-trunk)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    base: dict[str, Any] = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --config {args.config}: {e}") from None
        unknown = set(base) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"--config {args.config}: unknown fields {sorted(unknown)}")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if f.name == "overrides":
            base["overrides"] = list(base.get("overrides", [])) + list(v or [])
        elif v is not None:
            base[f.name] = v
    tc = TrainConfig(**base)
    if not tc.data:
        raise ValueError("--data is required (or 'data' in --config)")
    return tc


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        tc = config_from_args(argv)
        summary = train(tc)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("history"):
        last = summary["history"][-1]
        print(json.dumps({k: last[k] for k in last if k.startswith("val_") or k in ("epoch", "step")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
