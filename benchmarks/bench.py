"""Benchmarks that print a table (targets are measured here, never asserted in tests).

    envlf bench search [--checkpoint DIR] [--sizes 1000,10000,100000,1000000]
    envlf bench load   [--url http://127.0.0.1:7860] [--users 20] [--seconds 60]
                                 [--checkpoint DIR --index DIR] [--json out.json]
    envlf bench first-start [--until quick|full] [--size tiny] [--home EMPTY_DIR]
    envlf bench ann    [--sizes 1000,...,1000000] [--sweep-ivf 16,32,64]   (benchmarks/ann.py)

``search``: the latency of one text->image query per stage (encode the query, ANN, fusion
re-rank of the top k, total) for galleries of 1k to 1M images, ANN recall@10 against exact,
memory per image, index-build throughput, and the cost of re-ranking relative to ITC only.
Gallery embeddings are clustered random vectors (the ANN stage does not care where they
come from; real ITC embeddings cluster by scene class the same way), the query encoder and
the re-ranker are the real model, and the re-rank stage reads the top k tokens from a
memory-mapped token file as the index does. Build throughput is measured on real tiles.

``load``: N simulated users, each with its own ``gradio_client.Client`` (its own session),
issue a realistic mix against the app until the time is up: text->image with re-ranking
(70%), the attention map of a result (15%), image->text of a gallery tile (10%), a relevance
judgement (5%) (``--mix``). Without ``--url`` the app is started in this process the way
app.py builds it (same backend, queue and launch settings), with ``--checkpoint`` /
``--index`` (default: the app's own configuration) and a throw-away feedback file. Against
a ``--url`` the judgements land in that server's feedback file: use ``--mix 70,15,10,0``
against an app whose labels matter. Prints one table (requests, errors, req/s, p50/p95/p99
latency per endpoint and overall); ``--json`` writes it too. Exit code 1 when any request
failed.

``first-start``: the README's ``python app.py`` as a subprocess on an empty ``ENVLF_HOME``
(envlf.appprocess, the process the first-start tests drive): seconds to the page, to the
first answered search, search latency while the full model builds beside it, the full model
served, then a second start on the same home (page, search, whether anything was rebuilt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks import ann as ann_bench
from benchmarks import archive as archive_bench
from benchmarks import chipping as chipping_bench

QUERIES = [
    "many planes are parked next to a long building in an airport",
    "several white storage tanks are beside a road",
    "some boats are docked in the harbour near the pier",
    "a river with a bridge crossing it surrounded by green trees",
    "two tennis courts are surrounded by trees and a parking lot",
    "lots of cars are parked in the parking lot",
    "a baseball field is next to some houses and trees",
    "dense residential area with many houses and roads",
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"{cpu}; {dev}; torch {torch.__version__}, threads {torch.get_num_threads()}"


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def build_throughput(model, source, n: int = 256, batch_size: int = 32, workers: int = 2) -> dict:
    """Images/s of the whole index path (decode + resize + trunk + ViT module) on real tiles,
    and of the trunk alone on a fixed batch (the compute ceiling)."""
    from envlf.data.datasets import ImageCaptionDataset, collate
    from envlf.data.transforms import build_transform

    ds = source.subset(range(min(n, len(source))))
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(ds, build_transform(model.config.vision)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model.eval()
    t0 = time.perf_counter()
    count = 0
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        for batch in loader:
            model.encode_image(batch["image"].to(model.device), return_tokens=True)
            count += len(batch["image"])
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        full = count / (time.perf_counter() - t0)
        x = torch.randn(batch_size, 3, model.config.vision.image_size, model.config.vision.image_size,
                        device=model.device)
        model.vision.trunk_features(x)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            model.vision.trunk_features(x)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        trunk = reps * batch_size / (time.perf_counter() - t0)
        # re-ranking without stored tokens: decode + trunk + ViT module for the top 16 tiles
        from envlf.data.datasets import load_image

        tf = build_transform(model.config.vision)
        paths = [r.path for r in ds.records[:16]]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            px = torch.stack([tf(load_image(p_)) for p_ in paths]).to(model.device)
            model.image_tokens(px)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
    return {"images": count, "index_images_per_s": full, "trunk_images_per_s": trunk,
            "recompute_16_tokens_ms": float(np.median(times))}


@torch.no_grad()
def search_latency(model, n: int, n_queries: int = 40, k: int = 10, rerank_k: int = 16,
                   token_rows: int = 4096, seed: int = 0) -> dict:
    """Per-stage latency of text->image search over an n-image gallery (see module doc)."""
    from envlf.search.ann import AnnIndex, clustered_embeddings, recall_at_k

    E = model.config.embed_dim
    tok_shape = (1 + model.grid_size ** 2, model.config.vision.width)
    x = clustered_embeddings(n, E, seed=seed)
    t0 = time.perf_counter()
    ann = AnnIndex.build(x, "auto")
    ann_build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        rows = min(n, token_rows)
        path = Path(tmp) / "tokens.f16"
        rng = np.random.default_rng(seed)
        mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, *tok_shape))
        mm[:] = rng.standard_normal(mm.shape).astype(np.float16)
        mm.flush()
        tokens = np.memmap(path, dtype=np.float16, mode="r", shape=(rows, *tok_shape))
        stages = {"encode": [], "ann": [], "rerank": [], "total_rerank": [], "total_itc": []}
        queries = [QUERIES[i % len(QUERIES)] for i in range(n_queries + 2)]
        qemb = []
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            emb, hidden, batch = model.encode_text([q], return_hidden=True)
            emb.float().cpu().numpy()  # the copy to the host belongs to the encode stage
            t1 = time.perf_counter()
            # the query vector is placed in the gallery's space: a fresh draw of its mixture
            qv = clustered_embeddings(1, E, seed=seed + 1000 + i)
            scores, ids = ann.search(qv, max(k, rerank_k))
            t2 = time.perf_counter()
            top = ids[0, :rerank_k] % rows
            tok = torch.from_numpy(np.array(tokens[np.sort(top)], dtype=np.float32)).to(model.device)
            model.itm_score(tok, (hidden, batch.attention_mask), as_probability=False)
            t3 = time.perf_counter()
            if i < 2:  # warm-up
                continue
            qemb.append(qv[0])
            stages["encode"].append(1e3 * (t1 - t0))
            stages["ann"].append(1e3 * (t2 - t1))
            stages["rerank"].append(1e3 * (t3 - t2))
            stages["total_rerank"].append(1e3 * (t3 - t0))
            stages["total_itc"].append(1e3 * (t2 - t0))
        del tokens, mm
    recall = 1.0
    if ann.kind != "flat":
        exact = AnnIndex.build(x, "flat", device="cpu")
        q = np.stack(qemb)
        recall = recall_at_k(ann.search(q, 10)[1], exact.search(q, 10)[1], 10)
    row = {"N": n, "ann": ann.kind, "ann_build_s": ann_build_s, "recall@10": recall,
           "ram_bytes_per_image": ann.memory_bytes() / n,  # the ANN index holds the vectors
           "disk_bytes_per_image": E * 4 + int(np.prod(tok_shape)) * 2}  # embeddings.f32 + tokens.f16
    for s, v in stages.items():
        row[f"{s}_p50_ms"] = _pct(v, 50)
        row[f"{s}_p95_ms"] = _pct(v, 95)
    row["rerank_cost_ratio"] = row["total_rerank_p50_ms"] / row["total_itc_p50_ms"]
    return row


def format_search_table(rows: list[dict]) -> str:
    head = ("| gallery | ANN | recall@10 | encode p50/p95 ms | ANN p50/p95 ms | re-rank 16 p50/p95 ms | "
            "total p50/p95 ms | ITC-only total p50 ms | re-rank cost × | RAM / disk bytes per image |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['N']:,} | {r['ann']} | {r['recall@10']:.3f} | {r['encode_p50_ms']:.1f} / {r['encode_p95_ms']:.1f} | "
            f"{r['ann_p50_ms']:.2f} / {r['ann_p95_ms']:.2f} | {r['rerank_p50_ms']:.1f} / {r['rerank_p95_ms']:.1f} | "
            f"{r['total_rerank_p50_ms']:.1f} / {r['total_rerank_p95_ms']:.1f} | {r['total_itc_p50_ms']:.1f} | "
            f"{r['rerank_cost_ratio']:.1f} | {r['ram_bytes_per_image']:,.0f} / {r['disk_bytes_per_image']:,} |")
    return "\n".join(lines)


def cmd_search(args) -> int:
    from envlf.model.core import load_pretrained
    from envlf.runtime import resolve_device
    from envlf.model.core import create_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = resolve_device(args.device)
    model = load_pretrained(args.checkpoint, device=device) if args.checkpoint else create_model("lite", device=device)
    model.eval()
    out = {"machine": machine(), "rows": []}
    print(f"machine: {out['machine']}")
    if args.source:
        from envlf.data.datasets import load_dataset

        bt = build_throughput(model, load_dataset(args.source), n=args.build_images, workers=args.workers)
        out["build"] = bt
        print(f"index build: {bt['index_images_per_s']:.1f} images/s (decode+trunk+ViT, {bt['images']} tiles); "
              f"trunk alone: {bt['trunk_images_per_s']:.1f} images/s; recomputing the tokens of 16 tiles for "
              f"a re-rank without stored tokens: {bt['recompute_16_tokens_ms']:.0f} ms")
    for n in [int(s) for s in args.sizes.split(",") if s]:
        row = search_latency(model, n, n_queries=args.queries, rerank_k=args.rerank_k)
        out["rows"].append(row)
        print(f"  N={n:,}: total p50 {row['total_rerank_p50_ms']:.1f} ms ({row['ann']})", file=sys.stderr)
    print(format_search_table(out["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


# -- load: concurrent users against the app -------------------------------------------------

LOAD_OPS = ("t2i", "attention", "i2t", "judge")
REQUEST_TIMEOUT_S = 120  # a request that takes longer counts as an error (a hung server ends the run)
LOAD_NAMES = {"t2i": "text→image + re-rank (/text_to_image)", "attention": "attention map (/t2i_attention)",
              "i2t": "image→text of a tile (/image_to_text)", "judge": "relevance judgement (/t2i_relevant, /t2i_not_relevant)"}


def parse_mix(text: str) -> dict[str, float]:
    """"70,15,10,5" (t2i, attention, i2t, judge) -> shares summing to 1."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --mix {text!r}: expected four numbers, e.g. 70,15,10,5") from None
    if len(parts) != len(LOAD_OPS) or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise SystemExit(f"error: --mix {text!r}: four shares (t2i, attention, i2t, judge), t2i above 0")
    return {op: x / sum(parts) for op, x in zip(LOAD_OPS, parts)}


def start_app(checkpoint: str | None, index: str | None, feedback: str, device: str = "cpu"):
    """The app as app.py builds it (backend from the app's configuration, demo.layout.make_app
    and launch), launched on a free local port without blocking. Returns the running gr.Blocks
    (close() it)."""
    import socket

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from demo.backend import BackendError, load_backend
    from demo.config import load_config
    from demo.handlers import Handlers
    from demo.layout import launch, make_app

    argv = ["--feedback", feedback, "--device", device]
    argv += ["--checkpoint", checkpoint] if checkpoint else []
    argv += ["--index", index] if index else []
    try:
        backend = load_backend(load_config(argv))
    except BackendError as e:
        raise SystemExit(f"error: {e}") from None
    demo = make_app(Handlers(backend))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, backend, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo


class _Recorder:
    """Latencies and errors per operation, from many threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ms: dict[str, list[float]] = {op: [] for op in LOAD_OPS}
        self.errors: dict[str, int] = {op: 0 for op in LOAD_OPS}
        self.messages: list[str] = []

    def add(self, op: str, ms: float, error: BaseException | None = None) -> None:
        with self.lock:
            self.ms[op].append(ms)
            if error is not None:
                self.errors[op] += 1
                if len(self.messages) < 5:
                    text = " ".join(str(error).split())[:200] or type(error).__name__
                    self.messages.append(f"{op}: {type(error).__name__}: {text}")


def _user(n: int, client, start: threading.Barrier, stop_at: list[float], mix: dict[str, float],
          rec: _Recorder, seed: int, requests: int = 0) -> None:
    """One user's session: search first, then the mix until the time is up. Attention maps
    and judgements refer to the user's last text->image results, as in the UI.
    requests > 0: exactly that many requests instead (time ignored): a search, then one of
    each kind in the mix, then the mix (what a test can count on on any machine)."""
    rng = random.Random(seed * 1000 + n)
    ops, weights = list(mix), list(mix.values())
    kinds = [o for o, w in mix.items() if w > 0]
    ids: list[str] = []
    query, n_results = "", 0
    start.wait()
    done = 0
    while (done < requests) if requests > 0 else (time.perf_counter() < stop_at[0]):
        op = kinds[(done - 1) % len(kinds)] if requests > 0 and 1 <= done <= len(kinds) else rng.choices(ops, weights)[0]
        done += 1
        if not n_results:  # nothing to explain, judge or take a tile from yet
            op = "t2i"
        t0 = time.perf_counter()
        error = None
        def call(*args, api_name: str):
            return client.submit(*args, api_name=api_name).result(timeout=REQUEST_TIMEOUT_S)

        try:
            if op == "t2i":
                query = rng.choice(QUERIES)
                _, table, *_ = call(query, 12, True, 16, api_name="/text_to_image")
                rows = table["data"]
                n_results = len(rows)
                ids = [str(r[1]) for r in rows] or ids
            elif op == "attention":
                which = "sentence" if rng.random() < 0.5 else str(rng.randrange(len(query.split())))
                call(rng.randint(1, n_results), which, api_name="/t2i_attention")
            elif op == "i2t":
                call(None, rng.choice(ids), 10, True, 16, api_name="/image_to_text")
            else:
                label = "t2i_relevant" if rng.random() < 0.5 else "t2i_not_relevant"
                call(rng.randint(1, n_results), "none", api_name=f"/{label}")
        except Exception as e:  # noqa: BLE001 - counted and reported, the user goes on
            error = e
        rec.add(op, 1e3 * (time.perf_counter() - t0), error)


def run_load(url: str, users: int = 20, seconds: float = 60.0, mix: dict[str, float] | None = None,
             seed: int = 0, requests: int = 0) -> dict:
    """N users against `url` for `seconds` (or `requests` each); returns the table as a dict
    (see format_load_table)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    mix = mix or parse_mix("70,15,10,5")
    with ThreadPoolExecutor(max_workers=min(users, 8)) as pool:  # connecting is not what is measured
        clients = list(pool.map(lambda _: Client(url, verbose=False, download_files=False,
                                                 analytics_enabled=False), range(users)))
    rec = _Recorder()
    stop_at = [float("inf")]
    start = threading.Barrier(users + 1)
    threads = [threading.Thread(target=_user, args=(i, c, start, stop_at, mix, rec, seed, requests), daemon=True)
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests in flight when the time was up
    for c in clients:
        c.close()

    def row(name: str, ms: list[float], errors: int) -> dict:
        return {"endpoint": name, "users": users, "seconds": round(wall, 1), "requests": len(ms), "errors": errors,
                "req_per_s": len(ms) / wall if wall else 0.0, "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95),
                "p99_ms": _pct(ms, 99)}

    rows = [row(LOAD_NAMES[op], rec.ms[op], rec.errors[op]) for op in LOAD_OPS if rec.ms[op]]
    everything = [x for op in LOAD_OPS for x in rec.ms[op]]
    rows.append(row("all", everything, sum(rec.errors.values())))
    return {"url": url, "users": users, "seconds": seconds, "wall_s": wall, "mix": mix, "rows": rows,
            "errors": sum(rec.errors.values()), "error_messages": rec.messages, "machine": machine()}


def format_load_table(result: dict) -> str:
    lines = ["| endpoint | users | seconds | requests | errors | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = f"**{r['endpoint']}**" if r["endpoint"] == "all" else r["endpoint"]
        lines.append(f"| {name} | {r['users']} | {r['seconds']:.0f} | {r['requests']:,} | {r['errors']} | "
                     f"{r['req_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    return "\n".join(lines)


def cmd_load(args) -> int:
    mix = parse_mix(args.mix)
    demo, tmp = None, None
    url = args.url
    if not url:
        if args.threads:
            torch.set_num_threads(args.threads)
        tmp = tempfile.TemporaryDirectory(prefix="envlf-load-")
        feedback = args.feedback or str(Path(tmp.name) / "feedback.csv")
        demo = start_app(args.checkpoint, args.index, feedback, args.device)
        url = demo.local_url
        print(f"app started in-process at {url} (judgements -> {feedback})", file=sys.stderr)
    try:
        print(f"load: {args.users} users x {args.seconds:g} s against {url} ...", file=sys.stderr, flush=True)
        result = run_load(url, args.users, args.seconds, mix, args.seed, args.requests)
    finally:
        if demo is not None:
            from demo.layout import close_app

            close_app(demo)
        if tmp is not None and not args.feedback:
            tmp.cleanup()
    result["in_process"] = demo is not None
    print(f"machine: {result['machine']}; {'in-process app' if demo is not None else url}")
    print(format_load_table(result))
    if result["error_messages"]:
        print("first errors:\n" + "\n".join(f"  {m}" for m in result["error_messages"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


# -- first start ------------------------------------------------------------------------------

# long: one timed scenario (start, page, first search, the build, a second start) read top to bottom
def cmd_first_start(args) -> int:
    """`python app.py` on an empty home, as a user starts it: seconds to the page, to the first
    answered search, and (--until full) to the full model; searches while the build runs in
    the background; then a second start on the same home."""
    from envlf.appprocess import AppProcess
    from envlf.bootstrap import STATUS_FILE, read_json

    tmp = None  # a temporary home of ours, removed at the end unless a builder may still use it
    if args.home:
        home = Path(args.home)
        if home.exists() and any(home.iterdir()):
            print(f"--home {home} is not empty: a first start needs an empty home", file=sys.stderr)
            return 2
    else:
        tmp = Path(tempfile.mkdtemp(prefix="envlf-first-start-"))
        home = tmp / "home"
    env = {"ENVLF_DEVICE": args.device}
    if args.size:
        env["ENVLF_DEMO_SIZE"] = args.size
    rows: list[tuple[str, str]] = []
    lat: list[tuple[float, float | None]] = []
    print(f"machine: {machine()}; home {home}; console in {home.parent / 'first-start-console.txt'}", flush=True)
    app = AppProcess(home, home.parent / "first-start-console.txt", **env)
    try:
        rows.append(("page up (HTTP 200)", f"{app.wait_page():.1f} s"))
        app.search_when_ready(limit_s=args.limit)
        rows.append(("first answered search", f"{app.elapsed():.1f} s"))
        # searches while the full model is built beside the app (its 2 workers + the page)
        for i in range(args.searches):
            _, rtt, total = app.search(QUERIES[i % len(QUERIES)])
            lat.append((rtt, total))
        if lat:
            building = (read_json(home / STATUS_FILE) or {}).get("state") == "building"
            rtts = np.array([r for r, _ in lat]) * 1000
            totals = np.array([t for _, t in lat if t is not None])
            rows.append((f"search round trip, p50 / max ({len(lat)} queries{', build running' if building else ''})",
                         f"{np.median(rtts):.0f} / {rtts.max():.0f} ms"))
            if len(totals):
                rows.append(("  of which the server's search, p50 / max", f"{np.median(totals):.0f} / {totals.max():.0f} ms"))
        if args.until == "full":
            app.search_when_ready(final=True, limit_s=args.limit, poll_s=5.0)
            rows.append(("full model served", f"{app.elapsed():.1f} s"))
    finally:
        app.stop()
    if args.until == "full":
        second = AppProcess(home, home.parent / "second-start-console.txt", **env)
        try:
            rows.append(("second start: page up", f"{second.wait_page():.1f} s"))
            second.search_when_ready(limit_s=args.limit)
            rows.append(("second start: first answered search", f"{second.elapsed():.1f} s"))
            rebuilt = "first start" in second.console()
            rows.append(("second start rebuilt anything", "yes" if rebuilt else "no"))
        finally:
            second.stop()
    print(f"\n| python app.py, empty ENVLF_HOME{' (ENVLF_DEMO_SIZE=' + args.size + ')' if args.size else ''} | |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if tmp is not None and args.until == "full":
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"\n(the full model goes on building in the background in {home}; the temporary folder is "
              "left for it)")
    return 0


IMAGE_PATHS = {"torch": "torch", "onnx": "onnx fp32", "onnx-int8": "onnx int8",
               "openvino": "openvino fp32", "openvino-bf16": "openvino bf16"}


def image_encoder_row(checkpoint: str, source: str, split: str, runtime: str, n: int = 256, batch_size: int = 32,
                      workers: int = 2, rerank_k: int = 16, threads: int = 0) -> dict:
    """One image-side path in this process: images/s of the index path (decode + resize + image
    side, `workers` loader processes) on `n` tiles, and the split's ITC / re-ranked mR with that
    path's embeddings and tokens (the text side is torch)."""
    from envlf.data.datasets import ImageCaptionDataset, check_images, collate, load_dataset
    from envlf.data.transforms import build_transform
    from envlf.evaluation.evaluate import evaluate
    from envlf.model.core import load_pretrained
    from envlf.model.onnx import load_image_encoder

    if threads:
        torch.set_num_threads(threads)
    model = load_pretrained(checkpoint, device="cpu").eval()
    ds, _ = check_images(load_dataset(source), max_workers=2, decode=False)
    tiles = ds.subset(range(min(n, len(ds))))
    enc = load_image_encoder(model, checkpoint, runtime, threads=threads) or model
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(tiles, build_transform(model.config.vision)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate)
    with torch.no_grad():
        enc.encode_image(torch.zeros(2, 3, model.config.vision.image_size, model.config.vision.image_size))
        t0 = time.perf_counter()
        count = 0
        for batch in loader:
            enc.encode_image(batch["image"], return_tokens=True)
            count += len(batch["image"])
        rate = count / (time.perf_counter() - t0)
    rep = evaluate(model, ds.split(split), rerank_k=rerank_k, references=False, progress=False,
                   image_encoder=None if enc is model else enc)
    r = rep["rows"]
    rr = r.get(f"ITC + ITM top{rerank_k} (expected)")
    return {"path": IMAGE_PATHS[runtime], "runtime": runtime, "images_per_s": rate, "itc_mR": r["ITC (expected)"]["mR"],
            "reranked_mR": rr["mR"] if rr else float("nan")}


def image_encoder_table(checkpoint: str, source: str, split: str, n: int = 256, batch_size: int = 32,
                        workers: int = 2, rerank_k: int = 16, threads: int = 0,
                        runtimes: Sequence[str] = tuple(IMAGE_PATHS)) -> list[dict]:
    """`image_encoder_row` per runtime, each in a fresh process: one runtime's thread pools and
    allocations do not share a process with (or slow down) the next one's, as in an index build,
    which runs one runtime. A path whose process fails is reported and the others still run."""
    rows = []
    for runtime in runtimes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "benchmarks.bench", "image-encoder",
                   "--checkpoint", str(Path(checkpoint).expanduser().resolve()),
                   "--source", str(Path(source).expanduser().resolve()),
                   "--split", split, "--images", str(n), "--batch-size", str(batch_size), "--workers", str(workers), "--rerank-k", str(rerank_k), "--threads", str(threads),
                   "--runtimes", runtime, "--one", str(out)]
            # the repository root as the working folder, so `-m benchmarks.bench` is found; paths made absolute
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
            if proc.returncode or not out.exists():
                tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                print(f"{runtime}: failed (exit status {proc.returncode}): {tail}", file=sys.stderr)
                continue
            rows.append(json.loads(out.read_text()))
    return rows


def format_image_encoder_table(rows: list[dict], split: str) -> str:
    base = rows[0]
    lines = [f"| image side | tiles/s (index path) | speed-up | {split} mR ITC | change | re-ranked | change |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base['images_per_s']:.2f}x | "
                     f"{r['itc_mR']:.2f} | {r['itc_mR'] - base['itc_mR']:+.2f} | {r['reranked_mR']:.2f} | "
                     f"{r['reranked_mR'] - base['reranked_mR']:+.2f} |")
    return "\n".join(lines)


def cmd_image_encoder(args) -> int:
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in IMAGE_PATHS]
    if bad or not runtimes:
        print(f"envlf bench: --runtimes takes {', '.join(IMAGE_PATHS)}, got {args.runtimes!r}", file=sys.stderr)
        return 2
    if args.one:  # the child of image_encoder_table: one runtime, its row to a file
        row = image_encoder_row(args.checkpoint, args.source, args.split, runtimes[0], args.images,
                                args.batch_size, args.workers, args.rerank_k, args.threads)
        Path(args.one).write_text(json.dumps(row))
        return 0
    rows = image_encoder_table(args.checkpoint, args.source, args.split, args.images, args.batch_size,
                               args.workers, args.rerank_k, args.threads, runtimes)
    if not rows:
        print("envlf bench: no image-side path finished", file=sys.stderr)
        return 1
    print(f"machine: {machine()}; {args.images} tiles of {args.source}; mR on its {args.split} split")
    print(format_image_encoder_table(rows, args.split))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="envlf bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf bench search --source ~/.cache/envlf/world --sizes 1000,10000")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="search latency per stage, ANN recall, memory, build throughput")
    s.add_argument("--checkpoint", help="model checkpoint (default: a fresh lite model: latency does not depend on training)")
    s.add_argument("--source", help="dataset whose tiles measure index-build throughput")
    s.add_argument("--build-images", type=int, default=256)
    s.add_argument("--sizes", default="1000,10000,100000,1000000")
    s.add_argument("--queries", type=int, default=40)
    s.add_argument("--rerank-k", type=int, default=16)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--json")
    ld = sub.add_parser("load", help="concurrent gradio_client users against the app: errors and latency")
    ld.add_argument("--url", help="a running app (default: start one in this process)")
    ld.add_argument("--users", type=int, default=20)
    ld.add_argument("--seconds", type=float, default=60.0)
    ld.add_argument("--checkpoint", help="in-process app: model checkpoint [ENVLF_CHECKPOINT]")
    ld.add_argument("--index", help="in-process app: gallery index [ENVLF_INDEX]")
    ld.add_argument("--feedback", help="in-process app: feedback CSV to keep (default: a temporary one)")
    ld.add_argument("--device", default="cpu", help="in-process app: device (default cpu)")
    ld.add_argument("--threads", type=int, default=0, help="in-process app: torch threads (default: torch's)")
    ld.add_argument("--mix", default="70,15,10,5", help="shares of t2i, attention, i2t, judge (default 70,15,10,5)")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--requests", type=int, default=0,
                    help="requests per user instead of --seconds: a search, one of each kind, then the mix (tests)")
    ld.add_argument("--json")
    ie = sub.add_parser("image-encoder", help="index throughput and mR of the image side: torch vs ONNX Runtime fp32 / int8 "
                                               "vs OpenVINO fp32 / bf16")
    ie.add_argument("--checkpoint", required=True)
    ie.add_argument("--source", required=True, help="dataset: its first --images tiles are timed")
    ie.add_argument("--split", default="val", help="the split whose mR each path is scored on")
    ie.add_argument("--images", type=int, default=256)
    ie.add_argument("--batch-size", type=int, default=32)
    ie.add_argument("--workers", type=int, default=2)
    ie.add_argument("--rerank-k", type=int, default=16)
    ie.add_argument("--threads", type=int, default=0)
    ie.add_argument("--runtimes", default=",".join(IMAGE_PATHS),
                    help="comma-separated paths, each run in its own process; the first is the baseline "
                         f"(default {','.join(IMAGE_PATHS)})")
    ie.add_argument("--one", help=argparse.SUPPRESS)
    ie.add_argument("--json")
    ann_bench.add_parser(sub)
    archive_bench.add_parser(sub)
    chipping_bench.add_parser(sub)
    fs = sub.add_parser("first-start", help="python app.py on an empty home: page, first search, full model")
    fs.add_argument("--home", help="an empty folder to start in (default: a temporary one)")
    fs.add_argument("--size", choices=["full", "tiny"], help="ENVLF_DEMO_SIZE (default: the app's, full)")
    fs.add_argument("--until", choices=["quick", "full"], default="full",
                    help="stop after the first answered search, or wait for the full model and start again")
    fs.add_argument("--searches", type=int, default=20, help="searches timed while the build runs")
    fs.add_argument("--device", default="cpu")
    fs.add_argument("--limit", type=float, default=3600, help="seconds before a stage counts as stuck")
    args = p.parse_args(argv)
    if args.cmd == "search":
        return cmd_search(args)
    if args.cmd == "image-encoder":
        return cmd_image_encoder(args)
    if args.cmd == "ann":
        return ann_bench.cmd_ann(args)
    if args.cmd == "archive":
        return archive_bench.cmd_archive(args)
    if args.cmd == "chipping":
        return chipping_bench.cmd_chipping(args)
    if args.cmd == "first-start":
        return cmd_first_start(args)
    if args.cmd == "load":
        if args.users < 1 or args.seconds <= 0:
            p.error("--users must be at least 1 and --seconds above 0")
        return cmd_load(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
