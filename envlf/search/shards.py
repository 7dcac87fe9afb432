"""The on-disk format of an extraction job's shards (envlf.search.extract writes them,
`GalleryIndex.build/add_shards` reads them): the plan, the shard files and what makes a shard
complete. See envlf.search.extract for the directory layout."""

from __future__ import annotations

import json
from pathlib import Path

from envlf.search.ann import _sha256

FORMAT = "envlf-shards"
FORMAT_VERSION = 1
PLAN = "plan.json"


class ShardError(ValueError):
    """A shard directory that cannot be used as asked (another job's plan, incomplete shards)."""


def shard_file(out: Path, i: int) -> Path:
    return Path(out) / f"shard-{i:05d}.parquet"


def done_file(out: Path, i: int) -> Path:
    return Path(out) / f"shard-{i:05d}.done.json"


def read_plan(out: str | Path) -> dict | None:
    path = Path(out) / PLAN
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"damaged shard plan {path}: {e}") from None
    if plan.get("format") != FORMAT or plan.get("format_version", 0) > FORMAT_VERSION:
        raise ShardError(f"{path} is not an EnVLF shard plan of a version this envlf reads")
    return plan


def shard_done(out: Path, i: int) -> dict | None:
    """The shard's completion record when its parquet file is whole, else None."""
    try:
        done = json.loads(done_file(out, i).read_text(encoding="utf-8"))
        path = shard_file(out, i)
        if path.stat().st_size == done["bytes"] and _sha256(path) == done["sha256"]:
            return done
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def pending_shards(out: str | Path, plan: dict) -> list[int]:
    return [i for i in range(plan["n_shards"]) if shard_done(Path(out), i) is None]


def finished_plan(out: str | Path, model=None) -> dict:
    """The plan of a finished job, for `GalleryIndex.build/add_shards`: checks that every shard
    is complete and, given a model, that it made them."""
    out = Path(out)
    plan = read_plan(out)
    if plan is None:
        raise ShardError(f"{out} is not an EnVLF shard directory (no {PLAN}): run envlf index extract first")
    if model is not None and model.fingerprint() != plan["model_fingerprint"]:
        raise ShardError(f"shards {out} were made by model {plan['model_fingerprint']}, but the loaded model is "
                         f"{model.fingerprint()}: extract again with this checkpoint")
    left = pending_shards(out, plan)
    if left:
        raise ShardError(f"{out}: {len(left)} of {plan['n_shards']} shards are not complete (first: {left[0]}): "
                         f"run the same envlf index extract command again to finish them")
    return plan
