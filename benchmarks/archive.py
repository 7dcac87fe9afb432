"""`envlf bench archive`: a large archive the way a user builds one, at sizes no real data here reach.

    envlf bench archive --n 1000000 --kinds ivf,ivfpq --work /tmp/archive

1. N synthetic chips become a finished `envlf index extract` job (plan.json, records.parquet,
   parquet shards with their .done.json), written by the extraction job's own shard writer.
   Their embeddings are clustered unit vectors (`clustered_embeddings`: 1,000 clusters around
   30 "scene classes"), since no model here can encode a million real chips in a session.
2. For each ANN kind, `envlf index build --from-shards ... --ann KIND` runs as a process, as a
   user runs it; its wall time and peak resident memory are measured (wait4).
3. The built gallery is loaded as the app loads it (the ANN from its files, the embeddings as
   a memmap) and its ANN answers queries drawn from the same mixture: recall@k against an
   exact scan of the same embeddings, single-query p50/p95 latency, index RAM per chip.

The model only has to exist (the shards carry its fingerprint): without --checkpoint a
random-weights model of the tiny configuration with 256-d embeddings is saved in the work
directory. The figures behind the 100M plan in docs/results.md come from this command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.ann import _latencies_ms
from envlf.search.ann import AnnIndex, clustered_embeddings, recall_at_k


def synthetic_checkpoint(work: Path, embed_dim: int = 256) -> Path:
    """A random-weights model whose only use is its fingerprint and embedding size."""
    import torch

    from envlf.model.config import get_config
    from envlf.model.core import create_model

    out = work / "model"
    if (out / "config.json").exists():
        return out
    cfg = get_config("tiny")
    cfg.embed_dim = embed_dim
    torch.manual_seed(0)
    return Path(create_model(cfg, pretrained=False).save_pretrained(out))


def synthetic_geo(i: int) -> dict:
    """A chip's place as chipping records it (envlf.data.geotiff): chip i of 4,096-chip scenes
    (64 x 64 chips of 256 px, 0.5 m pixels, UTM 33N) laid side by side."""
    scene, col, row = i // 4096, i % 64 * 256, i % 4096 // 64 * 256
    minx, maxy = 500_000.0 + scene * 8192 * 0.5 + col * 0.5, 5_000_000.0 - row * 0.5
    maxx, miny = minx + 128.0, maxy - 128.0
    lon0, lat0 = 15.0 + (minx - 500_000.0) / 78_850.0, 45.15 + (miny - 5_000_000.0) / 111_130.0
    return {"scene": f"/archive/scenes/scene{scene:05d}.tif", "window": [col, row, 256, 256], "crs": "EPSG:32633",
            "bounds": [minx, miny, maxx, maxy], "lonlat": [lon0, lat0, lon0 + 0.0016233, lat0 + 0.0011518],
            "lon": lon0 + 0.00081165, "lat": lat0 + 0.0005759, "valid": 1.0}


def write_synthetic_job(out: Path, checkpoint: Path, n: int, shard_size: int = 65_536, seed: int = 0) -> dict:
    """A finished extraction job of n synthetic chips in `out` (replaced); returns its plan."""
    import shutil

    from envlf.data.datasets import CaptionDataset, ImageRecord
    from envlf.data.geotiff import GEO_KEY
    from envlf.model.core import load_pretrained
    from envlf.search.extract import load_records, make_plan, write_shard

    if out.exists():
        shutil.rmtree(out)
    model = load_pretrained(checkpoint)
    records = [ImageRecord(f"scene{i // 4096:05d}/c{i % 64 * 256}_r{i % 4096 // 64 * 256}",
                           Path(f"/archive/chips/scene{i // 4096:05d}/c{i % 64 * 256}_r{i % 4096 // 64 * 256}.png"),
                           "archive", [], None, {GEO_KEY: synthetic_geo(i)}) for i in range(n)]
    plan = make_plan(out, CaptionDataset("synthetic-archive", out, records), model.fingerprint(), model.config.name,
                     shard_size=shard_size, tokens=False, encoder="torch", source_spec=f"synthetic:{n}")
    del records
    frame = load_records(out, plan)
    for i in range(plan["n_shards"]):
        rows = frame[frame["shard"] == i]
        emb = clustered_embeddings(len(rows), model.config.embed_dim, seed=seed * 100_003 + i)
        write_shard(out, i, rows, emb)
    return plan


def _run_measured(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS in GiB, result) of one process (its own rusage, from wait4)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    return wall, usage.ru_maxrss / 2 ** 20, result  # ru_maxrss: KiB on Linux


# long: one measured pass per kind (build as a process, load, score); each step is commented
def benchmark_archive(work: str | Path, n: int = 1_000_000, kinds: Sequence[str] = ("ivf", "ivfpq"),
                      checkpoint: str | Path | None = None, shard_size: int = 65_536, n_queries: int = 200,
                      k: int = 10, seed: int = 0, keep: bool = False) -> list[dict[str, Any]]:
    """One row per kind: N, kind, params, shards, extract-job write s, build s (process wall),
    build peak RSS GiB, index RAM bytes/chip, disk bytes/chip, p50/p95 ms, recall@k."""
    import shutil

    from envlf.search.index import GalleryIndex

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint) if checkpoint else synthetic_checkpoint(work)
    shards = work / "shards"
    t0 = time.perf_counter()
    plan = write_synthetic_job(shards, ckpt, n, shard_size, seed)
    write_s = time.perf_counter() - t0
    queries = None
    exact_ids = None
    rows = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for kind in kinds:
        out = work / f"index-{kind}"
        # the user's command, as a process
        cmd = [sys.executable, "-m", "envlf", "index", "build", "--checkpoint", str(ckpt), "--from-shards",
               str(shards), "--out", str(out), "--ann", kind, "--store-tokens", "no"]
        wall, peak_gib, r = _run_measured(cmd, env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
        # loading it as the app does, as a process: what serving the archive costs in RAM
        load_cmd = [sys.executable, "-c", "import sys; from envlf.search.index import GalleryIndex; "
                    "g = GalleryIndex.load(sys.argv[1]); g.geo_frame(); g.ann.search(g.embeddings[:1], 10)", str(out)]
        load_wall, load_gib, r = _run_measured(load_cmd, env)
        if r.returncode != 0:
            raise RuntimeError(f"loading {out} failed: {r.stderr.strip().splitlines()[-1:]}")
        gallery = GalleryIndex.load(out)
        if queries is None:  # ground truth: an exact scan of the embeddings the gallery holds
            queries = clustered_embeddings(n_queries, gallery.embeddings.shape[1], seed=seed + 1_000_003)
            _, exact_ids = AnnIndex.build(gallery.embeddings, "flat", device="cpu").search(queries, k)
        lat = _latencies_ms(gallery.ann, queries, k)
        _, ids = gallery.ann.search(queries, k)
        disk = sum(f.stat().st_size for f in (out / "ann").iterdir())
        rows.append({"N": len(gallery), "kind": gallery.ann.kind, "params": gallery.ann.params,
                     "shards": plan["n_shards"], "write_s": round(write_s, 1), "build_s": round(wall, 1),
                     "build_peak_rss_gib": round(peak_gib, 2), "load_s": round(load_wall, 1),
                     "load_peak_rss_gib": round(load_gib, 2),
                     "ram_bytes_per_chip": round(gallery.ann.memory_bytes() / len(gallery), 1),
                     "ann_disk_bytes_per_chip": round(disk / len(gallery), 1),
                     "p50_ms": round(float(np.percentile(lat, 50)), 3),
                     "p95_ms": round(float(np.percentile(lat, 95)), 3),
                     "recall_at_k": recall_at_k(ids, exact_ids, k), "k": k})
        del gallery
        if not keep:
            shutil.rmtree(out)
    if not keep:
        shutil.rmtree(shards)
    return rows


def format_archive_table(rows: Sequence[dict[str, Any]]) -> str:
    k = rows[0]["k"] if rows else 10
    head = (f"| N | kind | params | shards | build s (process) | build peak RSS GiB | load s | load peak RSS GiB "
            f"| index RAM B/chip | p50 ms | p95 ms | recall@{k} |\n"
            f"|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "-"
        lines.append(f"| {r['N']:,} | {r['kind']} | {params} | {r['shards']} | {r['build_s']:.1f} "
                     f"| {r['build_peak_rss_gib']:.2f} | {r['load_s']:.1f} | {r['load_peak_rss_gib']:.2f} "
                     f"| {r['ram_bytes_per_chip']:.0f} | {r['p50_ms']:.2f} "
                     f"| {r['p95_ms']:.2f} | {r['recall_at_k']:.3f} |")
    return head + "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    a = sub.add_parser("archive", help="N synthetic chips as extract shards -> index build --from-shards per ANN "
                                       "kind (a process): build time, memory, recall, latency")
    a.add_argument("--n", type=int, default=1_000_000)
    a.add_argument("--kinds", default="ivf,ivfpq", help="of flat, ivf, ivfpq, hnsw")
    a.add_argument("--work", required=True, help="scratch directory (about 1.2 kB a chip while it runs)")
    a.add_argument("--checkpoint", default=None, help="default: a random-weights 256-d model in --work")
    a.add_argument("--shard-size", type=int, default=65_536)
    a.add_argument("--queries", type=int, default=200)
    a.add_argument("--k", type=int, default=10)
    a.add_argument("--keep", action="store_true", help="keep the shards and the indexes")
    a.add_argument("--json", default=None, help="also write the rows here")


def cmd_archive(args) -> int:
    rows = benchmark_archive(args.work, args.n, [k for k in args.kinds.split(",") if k], args.checkpoint,
                             args.shard_size, args.queries, args.k, keep=args.keep)
    print(format_archive_table(rows))
    print(f"extract job of {rows[0]['N']:,} synthetic chips written in {rows[0]['write_s']:.0f} s" if rows else "")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0
