"""`envlf index extract`: the Ray Data job that writes sharded embeddings, run as a user runs it
(a process on an empty home, a local Ray with its actor pool), killed and resumed.

Each test starts a local Ray (tens of seconds on 2 cores); the data are the tiny dataset and
small synthetic GeoTIFF scenes, so the encoding itself takes well under a second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("ray")

from app_support import free_port  # noqa: E402
from envlf.data.datasets import load_dataset  # noqa: E402
from envlf.data.geotiff import make_demo_scenes  # noqa: E402
from envlf.model.core import create_model  # noqa: E402
from envlf.search.extract import done_file, shard_file  # noqa: E402
from envlf.search.index import GalleryIndex  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "ENVLF_HOME": str(home), "HOME": str(home), "PYTHONPATH": str(REPO),
            "RAY_ADDRESS": "", **extra}


def _envlf(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envlf", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # they run no task of ours, and linger a minute


def _session_workers(sid: int) -> list[str]:
    """The command lines of the processes in session `sid` that may still run a task: a killed
    driver's Ray workers go on for a few seconds, and one of them may finish (write) a shard."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[3]) == sid and not cmd.startswith(RAY_AGENTS):
            found.append(cmd or f"pid {pid}")
    return found


def _envlf_killed(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> int:
    """Run a command that kills itself, in its own session, and return once none of the Ray
    processes it started can write any more; its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "envlf", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    rc = proc.wait(timeout=timeout)
    for _ in range(timeout * 5):
        if not _session_workers(proc.pid):
            return rc
        time.sleep(0.2)
    raise AssertionError(f"the killed run's Ray workers are still alive: {_session_workers(proc.pid)}")


def _shard_ids(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("shard-*.parquet")) for i in pd.read_parquet(p)["image_id"]]


def _same_index(a: GalleryIndex, b: GalleryIndex) -> None:
    assert a.metadata["image_id"].tolist() == b.metadata["image_id"].tolist()
    assert a.metadata["geo"].tolist() == b.metadata["geo"].tolist()
    assert np.allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-5)
    assert np.allclose(np.asarray(a.tokens, np.float32), np.asarray(b.tokens, np.float32), atol=2e-3)


def test_extract_survives_a_killed_worker_and_the_index_from_shards_equals_a_direct_build(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    marker = tmp_path / "crashed"
    env = _env(tmp_path, ENVLF_EXTRACT_CRASH_ONCE=str(marker))
    out = tmp_path / "shards"
    r = _envlf(["index", "extract", "--checkpoint", str(ckpt), "--source", str(tiny_data), "--out", str(out),
                "--shard-size", "5", "--workers", "2"], env, tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # a worker did die mid-shard; Ray restarted it and retried the shard
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["shards"] == 4 and summary["chips"] == 16 and summary["shards_resumed"] == 0
    ids = _shard_ids(out)
    assert sorted(ids) == sorted(load_dataset(tiny_data).image_ids()) and len(set(ids)) == 16

    r = _envlf(["index", "build", "--checkpoint", str(ckpt), "--from-shards", str(out), "--out",
                str(tmp_path / "from-shards")], env, tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    direct = GalleryIndex.build(model, load_dataset(tiny_data), tmp_path / "direct", progress=False, workers=0)
    sharded = GalleryIndex.load(tmp_path / "from-shards", model)
    _same_index(sharded, direct)
    assert sharded.item_ref(0) == direct.item_ref(0)

    # shards from another model are refused, in one line
    other = create_model("tiny").save_pretrained(tmp_path / "other")
    r = _envlf(["index", "build", "--checkpoint", str(other), "--from-shards", str(out), "--out",
                str(tmp_path / "x")], env, tmp_path / "home")
    assert r.returncode == 2 and "were made by model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_killed_driver_resumes_without_losing_or_duplicating_a_chip(tiny_data, tmp_path):
    """Scenes: the driver plans each scene's windows and the workers cut them (their PNGs), so a
    killed driver leaves chips uncut; the rerun finishes them, and the index from the shards is
    the one `index build --source scenes` makes (ids, places, pixels, embeddings)."""
    scenes = tmp_path / "scenes"
    make_demo_scenes(tiny_data, scenes, n_scenes=4, grid=2)  # 4 windows, 2 valid chips per scene
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "shards"
    args = ["index", "extract", "--checkpoint", str(ckpt), "--source", str(scenes), "--out", str(out),
            "--shard-size", "2", "--workers", "1", "--chip-size", "48"]
    rc = _envlf_killed(args, _env(tmp_path, ENVLF_EXTRACT_KILL_DRIVER_AFTER="1"), tmp_path / "home")
    assert rc == -signal.SIGKILL
    done = [i for i in range(8) if done_file(out, i).exists()]
    assert done  # the kill came after the first shard was written
    assert len(list((out / "chips").rglob("*.png"))) < 8  # the workers cut the chips, shard by shard
    # what a kill can also leave: a half-written file, and a shard whose bytes no longer match
    (out / "shard-00003.parquet.tmp999").write_bytes(b"half a shard")
    victim = shard_file(out, done[0])
    victim.write_bytes(victim.read_bytes()[:100])

    r = _envlf(args, _env(tmp_path), tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["shards"] == 8 and summary["chips"] == 8 and summary["empty_chips"] == 8
    assert summary["skipped"] == 0
    assert summary["shards_resumed"] == len(done) - 1  # the damaged one was redone
    ids = _shard_ids(out)
    assert len(ids) == 8 and max(Counter(ids).values()) == 1
    assert not list(out.glob("*.tmp*")) and not list((out / "chips").rglob("*.tmp*"))

    r = _envlf(["index", "build", "--checkpoint", str(ckpt), "--from-shards", str(out), "--out",
                str(tmp_path / "from-shards")], _env(tmp_path), tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = GalleryIndex.load(tmp_path / "from-shards", model)
    assert sharded.crs == "EPSG:32633"
    geo = sharded.geo_frame()
    assert len(geo) == 8 and geo["lon"].between(-180, 180).all() and geo["lat"].between(-90, 90).all()
    r = _envlf(["index", "build", "--checkpoint", str(ckpt), "--source", str(scenes), "--out",
                str(tmp_path / "direct"), "--chip-size", "48"], _env(tmp_path), tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    direct = GalleryIndex.load(tmp_path / "direct", model)
    assert sharded.metadata["image_id"].tolist() == direct.metadata["image_id"].tolist()
    assert sharded.metadata["geo"].tolist() == direct.metadata["geo"].tolist()  # valid share included
    for a, b in zip(sharded.metadata["path"], direct.metadata["path"]):
        assert Path(a).is_relative_to(out / "chips") and Path(a).read_bytes() == Path(b).read_bytes()
    assert np.allclose(np.asarray(sharded.embeddings), np.asarray(direct.embeddings), atol=1e-5)

    # a rerun asking for another layout is another job: refused, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    r = _envlf([*args[:args.index("--shard-size")], "--shard-size", "3", "--chip-size", "48"], _env(tmp_path),
               tmp_path / "home")
    assert r.returncode == 2 and "holds another extraction job" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_an_archive_from_shards_gets_an_ivfpq_index_that_finds_what_exact_search_finds(tmp_path):
    """`envlf bench archive` as a process (small N): synthetic chips written as a finished
    extract job by its own shard writer, then `envlf index build --from-shards --ann ivfpq` (a
    process inside it). The gallery keeps PQ codes in RAM, re-scores from its memmap, and has no
    captions to train a caption index on (exact instead)."""
    env = _env(tmp_path)
    work = tmp_path / "archive"
    r = subprocess.run([sys.executable, "-m", "envlf", "bench", "archive", "--n", "3000", "--shard-size", "1000",
                        "--kinds", "ivfpq", "--work", str(work), "--keep", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| ivfpq |" in r.stdout
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["N"] == 3000 and row["shards"] == 3 and row["kind"] == "ivfpq"
    assert row["recall_at_k"] >= 0.9
    assert row["ram_bytes_per_chip"] < 100  # 64-byte codes + 8-byte ids (+ centroids), not 1,024 float bytes
    gallery = GalleryIndex.load(work / "index-ivfpq")
    assert gallery.caption_ann.kind == "flat" and len(gallery.caption_ann) == 0
    assert gallery.metadata["image_id"].tolist() == _shard_ids(work / "shards")
    # the index's own search path: a chip's own embedding finds that chip first
    probe = np.asarray(gallery.embeddings[[5, 1234, 2999]])
    _, ids = gallery.ann.search(probe, 1)
    assert ids[:, 0].tolist() == [5, 1234, 2999]


def test_extract_runs_on_a_ray_cluster_given_by_address_and_refuses_one_it_cannot_reach(tiny_data, tmp_path):
    """`--address`: the job connects to a Ray cluster started apart from it (`ray start --head`,
    one node here: no other machine can be reached) instead of starting its own; an address
    with nothing listening gets one line in seconds (ray.init alone retries for minutes)."""
    torch.manual_seed(0)
    ckpt = create_model("tiny").eval().save_pretrained(tmp_path / "ckpt")
    env = _env(tmp_path, RAY_AUTH_MODE="disabled")
    r = _envlf(["index", "extract", "--checkpoint", str(ckpt), "--source", str(tiny_data), "--out",
                str(tmp_path / "nowhere"), "--address", f"127.0.0.1:{free_port()}"], env, tmp_path / "home")
    assert r.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:" in r.stderr
    assert "Traceback" not in r.stderr
    import socket
    import tempfile
    import time

    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for _ in range(240):  # wait for the head's GCS port (seconds on a quiet machine)
            assert head.poll() is None, head.stdout.read()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "shards"
        r = _envlf(["index", "extract", "--checkpoint", str(ckpt), "--source", str(tiny_data), "--out", str(out),
                    "--shard-size", "5", "--workers", "2", "--address", f"127.0.0.1:{port}"], env, tmp_path / "home")
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout[r.stdout.index("{"):])
        assert summary["address"] == f"127.0.0.1:{port}" and summary["chips"] == 16 and summary["shards"] == 4
        assert sorted(_shard_ids(out)) == sorted(load_dataset(tiny_data).image_ids())
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: stopping it stops the head's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
