"""Train an EnVLF model: ITC + hard-negative ITM (+ MLM), validation each epoch, best by R-sum.

    envlf train --data ../shared/datasets/ucm-captions --model lite --out runs/ucm-lite
    envlf train --config my_run.json --epochs 5 --set fusion.layers=3 --set loss.mlm_weight=0.5
    torchrun --nproc_per_node 2 -m envlf.train.recipe --data ... --out ...      # DDP (nccl on GPUs, gloo on CPUs)

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
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from envlf.data.datasets import CaptionDataset, check_images, load_dataset, load_image
from envlf.data.features import compute_trunk_features
from envlf.data.transforms import AUGMENTS, build_transform, dihedral
from envlf.evaluation import metrics as M
from envlf.evaluation.evaluate import evaluate
from envlf.model.config import EnVLFConfig, get_config
from envlf.model.core import EnVLF, load_pretrained
from envlf.paths import Paths
from envlf.runtime import resolve_device
from envlf.train.loop import FitState, Schedule, fit, make_optimizer
from envlf.train.negatives import WordSwapper

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str = ""  # dataset (any layout envlf.data.datasets.load_dataset reads)
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
    home: str | None = None  # runtime home (envlf.paths); its cache/features keeps the trunk cache


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


# -- resume state (safetensors + JSON: nothing pickled) ----------------------------------------------

def save_train_state(directory: Path, optimizer, state: dict) -> None:
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


def _splits(tc: TrainConfig) -> tuple[CaptionDataset, CaptionDataset | None]:
    """The train split and the val split (None when the data has none), unreadable images skipped."""
    full = load_dataset(tc.data)
    train_ds = full.split(tc.train_split)
    val_ds = full.split(tc.val_split) if tc.val_split and tc.val_split in full.splits() else None
    train_ds, bad = check_images(train_ds, max_workers=max(1, tc.workers), decode=False)
    if val_ds is not None:
        val_ds, bad_v = check_images(val_ds, max_workers=max(1, tc.workers), decode=False)
        bad += bad_v
    for p in bad:
        log.warning("skipped unreadable image: %s", p)
    return train_ds, val_ds


def _trunk_features(tc: TrainConfig, model: EnVLF, train_ds, val_ds, main: bool, notify):
    """The frozen trunk's maps of both splits from the feature cache (computed once), or
    (None, None) when the trunk trains or the cache is off."""
    if not (tc.cache_trunk and model.config.vision.freeze_trunk):
        return None, None
    cache_dir = Paths.resolve(tc.home).features
    train_feats = compute_trunk_features(model, train_ds, workers=tc.workers, cache_dir=cache_dir,
                                         progress=tc.progress and main,
                                         on_batch=(lambda d, t: notify("features", {"done": d, "total": t}))
                                         if main else None)
    val_feats = None
    if val_ds is not None:
        val_feats = compute_trunk_features(model, val_ds, workers=tc.workers, cache_dir=cache_dir,
                                           progress=tc.progress and main)
    return train_feats, val_feats


class PairLoss:
    """The loss_fn that `fit` calls: one batch of (record, caption) pairs -> the model's ITC /
    ITM / MLM losses. It owns the batch's inputs: cached trunk maps (dihedral-augmented) or
    decoded pixels, word-swap ITM negatives, and the hard-negative warm-up."""

    def __init__(self, tc: TrainConfig, model: EnVLF, net, train_ds: CaptionDataset, features, device,
                 dist: "Dist", state: FitState, total_steps: int, start_epoch: int):
        self.tc, self.model, self.net, self.ds, self.features = tc, model, net, train_ds, features
        self.device, self.dist, self.state, self.total_steps = device, dist, state, total_steps
        if features is not None and features.dim() != 4 and tc.augment != "none":
            raise ValueError(f"--augment {tc.augment} flips cached CNN maps; a ViT / open_clip trunk's cached "
                             "tokens cannot be flipped: use --augment none, or train the trunk from pixels "
                             "(--set vision.freeze_trunk=false)")
        self.text_keys = string_keys(train_ds.captions())
        self.cap_offsets = np.cumsum([0] + [len(r.captions) for r in train_ds.records])
        self.transform = None if features is not None else build_transform(model.config.vision, train=True,
                                                                            augment=tc.augment)
        self.gen = torch.Generator().manual_seed(tc.seed + dist.rank)
        # its own stream, so turning the swaps on leaves the pairs' order as it was
        self.swap_rng = np.random.default_rng([tc.seed, dist.rank, start_epoch, 7])
        # no side swaps when the tiles are flipped: "on the left" is then true of either side
        loss = model.config.loss
        self.swapper = WordSwapper(train_ds.captions(), positions=tc.augment == "none") \
            if loss.itm_swap_negatives and loss.itm_weight > 0 else None
        self.choices = (0, 2, 4, 6) if tc.augment == "flip" else tuple(range(8))

    def hardness(self) -> float:
        warm = self.tc.hard_negative_warmup
        return min(1.0, self.state.step / max(1.0, warm * self.total_steps)) if warm > 0 else 1.0

    def __call__(self, chunk: np.ndarray) -> dict[str, torch.Tensor]:
        recs, caps = chunk[:, 0], chunk[:, 1]
        captions = [self.ds.records[i].captions[j] for i, j in chunk]
        kwargs: dict[str, Any] = {}
        if self.swapper is not None:
            rows, swapped = self.swapper.batch(captions, self.swap_rng)
            if rows:
                kwargs["swap_rows"] = torch.as_tensor(rows, device=self.device)
                kwargs["swap_text"] = self.model.tokenize(swapped)
        if self.features is not None:
            feats = self.features[torch.as_tensor(recs)].to(self.device).float()
            if self.tc.augment != "none":
                pick = torch.randint(len(self.choices), (len(recs),), generator=self.gen)
                feats = dihedral(feats, torch.as_tensor(self.choices)[pick])
            kwargs["features"] = feats
        else:
            kwargs["pixels"] = torch.stack([self.transform(load_image(self.ds.records[i].path))
                                            for i in recs]).to(self.device)
        out = self.net(self.model.tokenize(captions), torch.as_tensor(recs, device=self.device),
                       torch.as_tensor(self.text_keys[self.cap_offsets[recs] + caps], device=self.device),
                       gather=self.dist.gather if self.dist.enabled else None, generator=self.gen,
                       hardness=self.hardness(), **kwargs)
        return {k: out[k] for k in ("loss", "itc", "itm", "mlm") if k in out}


def _start_run_dir(tc: TrainConfig, out: Path, model: EnVLF, train_ds: CaptionDataset, n_pairs: int) -> None:
    """The run directory of a fresh or resumed run: an earlier run's log moved aside, the
    config written, the lineage entry of this training added to the model's config."""
    out.mkdir(parents=True, exist_ok=True)
    old_log = out / "log.jsonl"
    if not tc.resume and old_log.exists():  # a fresh run in a used directory: its own log
        log.warning("%s holds an earlier run; its log.jsonl becomes log.previous.jsonl", out)
        old_log.replace(out / "log.previous.jsonl")
    model.config.lineage.append({"event": "train", "data": str(tc.data), "train_split": tc.train_split,
                                 "train_images": len(train_ds), "train_pairs": int(n_pairs),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "train_config": dataclasses.asdict(tc)})
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))


def _validate(tc: TrainConfig, model: EnVLF, val_ds: CaptionDataset, val_feats, record: dict) -> float:
    """evaluate() on val into the epoch's record; returns the rsum that selects the best."""
    rep = evaluate(model, val_ds, rerank_k=tc.val_rerank_k, features=val_feats, references=False,
                   workers=tc.workers, progress=False)
    key = f"ITC + ITM top{tc.val_rerank_k} (expected)" if tc.val_rerank_k else "ITC (expected)"
    record["val_itc"] = rep["rows"]["ITC (expected)"]
    record["val_final"] = rep["rows"][key]
    log.info("epoch %d: val ITC mR %.2f, final mR %.2f (rsum %.1f)", record["epoch"],
             record["val_itc"]["mR"], record["val_final"]["mR"], record["val_final"]["rsum"])
    return record["val_final"]["rsum"]


def _batch_reporter(tc: TrainConfig, dist: "Dist", notify, epoch: int, n_batches: int):
    """fit's on_batch for one epoch: the progress bar's losses and pairs/s, the caller's
    "batch" events (every 5% of the epoch) and, without a bar, a log line every 20%."""
    t_ep = time.perf_counter()

    def on_batch(b: int, losses: dict, st: FitState, bar) -> None:
        seen = (b + 1) * tc.batch_size
        bar.set_postfix({**{k: f"{v:.3f}" for k, v in st.running.items()},
                         "pairs/s": f"{seen * dist.world / (time.perf_counter() - t_ep):.0f}"})
        if dist.main and (b + 1) % max(1, n_batches // 20) == 0:
            notify("batch", {"epoch": epoch + 1, "batch": b + 1, "batches": n_batches, "epochs": tc.epochs})
        if not tc.progress and dist.main and (b + 1) % max(1, n_batches // 5) == 0:
            log.info("epoch %d: batch %d/%d, %s", epoch + 1, b + 1, n_batches,
                     ", ".join(f"{k} {v:.3f}" for k, v in st.running.items()))
    return on_batch


def _amp_dtype(tc: TrainConfig, device: torch.device):
    if tc.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)


def _plan(tc: TrainConfig, train_ds: CaptionDataset, world: int) -> tuple[int, int, int, int]:
    """(pairs per epoch, pairs per rank, optimizer steps per epoch, total steps)."""
    n_pairs = len(_epoch_pairs(train_ds, tc.captions_per_image, np.random.default_rng(0)))
    per_rank = n_pairs // world
    steps_per_epoch = max(1, per_rank // (tc.batch_size * tc.grad_accum))
    total_steps = steps_per_epoch * tc.epochs if not tc.max_steps else min(tc.max_steps, steps_per_epoch * tc.epochs)
    return n_pairs, per_rank, steps_per_epoch, total_steps


def _resume(tc: TrainConfig, optimizer) -> tuple[int, int, float, list, np.random.Generator]:
    """(first epoch, step, best val rsum, history, the pairs' RNG): a fresh run's, or those
    saved in --resume's train state (the optimizer's state is loaded in place)."""
    if not tc.resume:
        return 0, 0, -1.0, [], np.random.default_rng(tc.seed)
    st = load_train_state(Path(tc.resume), optimizer)
    start_epoch = st["epoch"] + 1
    log.info("resumed from %s at epoch %d, step %d", tc.resume, start_epoch, st["step"])
    return start_epoch, st["step"], st["best"], st.get("history", []), np.random.default_rng(tc.seed + 1000 * start_epoch)


# long: the run reads top to bottom as one story (set up, cache, the epochs through fit, the
# epoch's record, checkpoints); each step of it is one of the helpers above.
def train(tc: TrainConfig, on_event=None) -> dict:
    """Run training; returns the summary (best metrics, paths, timings).

    on_event(kind, info): optional progress callback (main process only): "features"
    {"done", "total"} while trunk features are cached, "batch" {"epoch", "batch",
    "batches", "epochs"} every few percent of an epoch, "epoch" {the epoch's log record}."""
    notify = on_event if on_event is not None else (lambda kind, info: None)
    if tc.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}")
    device = resolve_device(tc.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist = Dist(device)
    seed_everything(tc.seed + dist.rank)
    out = Path(tc.out)
    train_ds, val_ds = _splits(tc)
    model = build_model(tc, device)
    if dist.main:
        log.info("model %s: %s", model.config.name, {k: f"{v / 1e6:.2f}M" for k, v in model.num_parameters().items()})

    t0 = time.perf_counter()
    train_feats, val_feats = _trunk_features(tc, model, train_ds, val_ds, dist.main, notify)
    timings = {"trunk_cache_s": time.perf_counter() - t0}

    optimizer = make_optimizer(model, tc.lr, tc.lr_pretrained, tc.weight_decay)
    net = model if not dist.enabled else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    n_pairs, per_rank, steps_per_epoch, total_steps = _plan(tc, train_ds, dist.world)
    start_epoch, step, best, history, rng = _resume(tc, optimizer)
    if dist.main:
        _start_run_dir(tc, out, model, train_ds, n_pairs)
    t_train = time.perf_counter()
    sched = Schedule(total_steps, tc.warmup_steps, tc.min_lr_ratio, tc.grad_accum, tc.max_steps)
    state = FitState(step=step)
    loss_fn = PairLoss(tc, model, net, train_ds, train_feats, device, dist, state, total_steps, start_epoch)
    n_batches = steps_per_epoch * tc.grad_accum
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        pairs = _epoch_pairs(train_ds, tc.captions_per_image, rng)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        t_ep = time.perf_counter()
        state.running = {}
        batches = (pairs[b * tc.batch_size:(b + 1) * tc.batch_size] for b in range(n_batches))
        fit(net, optimizer, batches, loss_fn, sched, state, device_type=device.type, amp_dtype=_amp_dtype(tc, device),
            desc=f"epoch {epoch + 1}/{tc.epochs}", progress=tc.progress and dist.main, total=n_batches,
            on_batch=_batch_reporter(tc, dist, notify, epoch, n_batches))
        step = state.step
        record = {"epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t_ep,
                  "pairs_per_s": state.batches * tc.batch_size * dist.world / (time.perf_counter() - t_ep),
                  **{f"train_{k}": dist.mean(v) for k, v in state.running.items()},
                  "temperature": float(1.0 / model.temperature_scale().detach())}
        is_last = state.stopped or epoch + 1 == tc.epochs
        if val_ds is not None and dist.main and ((epoch + 1) % tc.val_every == 0 or is_last):
            score = _validate(tc, model, val_ds, val_feats, record)
            if score > best:
                best, record["best"] = score, True
                model.save_pretrained(out / "best")
        history.append(record)
        if dist.main:
            notify("epoch", record)
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            model.save_pretrained(out / "last")
            save_train_state(out / "last", optimizer, {"epoch": epoch, "step": step, "best": best, "history": history})
            if val_ds is None:  # nothing to select on: the last is the best
                model.save_pretrained(out / "best")
        dist.barrier()
        if state.stopped:
            break
    timings["train_s"] = time.perf_counter() - t_train
    summary = {"out": str(out), "best_rsum": best, "steps": step, "epochs_run": len(history),
               "timings": timings, "history": history}
    if dist.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="envlf train", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf train --data ../shared/datasets/ucm-captions --out runs/ucm-lite4 --epochs 4")
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
