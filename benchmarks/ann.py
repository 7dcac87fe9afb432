"""`envlf bench ann`: index kinds (flat, HNSW, IVF) on clustered embeddings, one table.

    envlf bench ann --sizes 1000,10000,100000,1000000 --sweep-ivf 16,32,64 --sweep-hnsw 64,128

The measurement behind envlf.search.ann's defaults (AUTO_EXACT_MAX_N, AUTO_ANN_KIND,
DEFAULT_PARAMS): build seconds, bytes per vector, single-query p50/p95, batch queries per
second and recall@k against an exact scan, per (N, kind, search setting).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from envlf.search.ann import AnnIndex, _resolve_threads, clustered_embeddings, recall_at_k


def _latencies_ms(index: AnnIndex, queries: np.ndarray, k: int, **sp: Any) -> np.ndarray:
    index.search(queries[:1], k, **sp)  # warm-up (page faults, lazy GPU init)
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k, **sp)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


# long: one measurement loop over (N, kind, setting); the docstring says what each column means
def benchmark_ann(
    sizes: Sequence[int] = (1_000, 10_000, 100_000, 1_000_000),
    dim: int = 256,
    kinds: Iterable[str | tuple[str, dict[str, Any]]] = ("flat", "hnsw", "ivf"),
    n_queries: int = 200,
    k: int = 10,
    seed: int = 0,
    *,
    sweep: dict[str, dict[str, Sequence[int]]] | None = None,
    max_n: dict[str, int] | None = None,
    exact_latency_queries: int = 20,
    threads: int | None = None,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure index kinds on clustered embeddings; one dict per (N, kind, setting).

    kinds: names or (name, build params), defaults from DEFAULT_PARAMS. sweep: search-time
    settings tried on one built index, e.g. {"hnsw": {"efSearch": [64, 128]}, "ivf":
    {"nprobe": [16, 32, 64]}}. max_n: skip a kind above that N (default {"hnsw": 100_000}:
    an HNSW build at 1M takes 4+ minutes on 2 cores; pass {} to include it). data:
    `clustered_embeddings` options. The whole default 1M step takes about 2 minutes on 2
    cores.

    Ground truth is one exact batch search of all queries (BLAS; ~10 s at 1M); above 100k
    the exact single-query latency is timed on `exact_latency_queries` queries only. Queries
    are fresh draws from the gallery's mixture (a text query lands near its class's
    images), not gallery members.

    Row keys: N, kind, params, build_s, bytes_per_vector (index RAM / N), p50_ms, p95_ms
    (single-query latency), latency_queries, batch_qps (all queries in one call),
    recall_at_k (vs exact), k, threads.
    """
    threads = _resolve_threads(threads)
    sweep = sweep or {}
    max_n = {"hnsw": 100_000} if max_n is None else max_n
    specs = [(s, {}) if isinstance(s, str) else (s[0], dict(s[1])) for s in kinds]
    data = data or {}
    queries = clustered_embeddings(n_queries, dim, seed=seed + 1_000_003, **data)
    rows: list[dict[str, Any]] = []
    todo = [(n, kind, bp) for n in sizes for kind, bp in specs if n <= max_n.get(kind, n)]
    bar = tqdm(total=len(todo), desc="benchmark_ann", disable=not progress)
    for n in sizes:
        x = clustered_embeddings(n, dim, seed=seed, **data)
        t0 = time.perf_counter()
        exact = AnnIndex.build(x, "flat", device="cpu", threads=threads)
        exact_build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, exact_ids = exact.search(queries, k)
        exact_batch_s = time.perf_counter() - t0
        for kind, bparams in specs:
            if n > max_n.get(kind, n):
                continue
            reuse = kind == "flat" and not bparams
            t0 = time.perf_counter()
            index = exact if reuse else AnnIndex.build(x, kind, device="cpu", threads=threads, seed=seed, **bparams)
            build_s = exact_build_s if reuse else time.perf_counter() - t0
            if kind == "ivfpq":  # as in a gallery: candidates re-scored from the full vectors
                index.attach_vectors(x)
            bytes_per_vector = index.memory_bytes() / max(n, 1)
            settings: list[dict[str, Any]] = [{}]
            for name, values in sweep.get(kind, {}).items():
                settings = [{name: v} for v in values]
            for sp in settings:
                nq_lat = min(n_queries, exact_latency_queries) if kind == "flat" and n > 100_000 else n_queries
                lat = _latencies_ms(index, queries[:nq_lat], k, **sp)
                if reuse:
                    ids, batch_s = exact_ids, exact_batch_s
                else:
                    t0 = time.perf_counter()
                    _, ids = index.search(queries, k, **sp)
                    batch_s = time.perf_counter() - t0
                rows.append(
                    {
                        "N": n,
                        "kind": kind,
                        "params": {**index.params, **sp},
                        "build_s": round(build_s, 3),
                        "bytes_per_vector": round(bytes_per_vector, 1),
                        "p50_ms": float(np.percentile(lat, 50)),
                        "p95_ms": float(np.percentile(lat, 95)),
                        "latency_queries": int(nq_lat),
                        "batch_qps": n_queries / batch_s,
                        "recall_at_k": recall_at_k(ids, exact_ids, k),
                        "k": k,
                        "threads": threads or faiss.omp_get_max_threads(),
                    }
                )
            if not reuse:
                del index
            bar.update(1)
        del exact, x
    bar.close()
    return rows


def format_benchmark_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of `benchmark_ann` rows."""
    k = rows[0]["k"] if rows else 10
    head = (
        f"| N | kind | params | build s | bytes/vec | p50 ms | p95 ms | batch q/s | recall@{k} |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "-"
        lines.append(
            f"| {r['N']:,} | {r['kind']} | {params} | {r['build_s']:.2f} | {r['bytes_per_vector']:.0f} "
            f"| {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['batch_qps']:,.0f} | {r['recall_at_k']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    a = sub.add_parser("ann", help="ANN index kinds on clustered vectors: build, memory, latency, recall")
    a.add_argument("--sizes", default="1000,10000,100000,1000000")
    a.add_argument("--dim", type=int, default=256)
    a.add_argument("--kinds", default="flat,hnsw,ivf", help="of flat, hnsw, ivf, ivfpq")
    a.add_argument("--queries", type=int, default=200)
    a.add_argument("--k", type=int, default=10)
    a.add_argument("--sweep-ivf", default="", help="nprobe values, e.g. 16,32,64")
    a.add_argument("--sweep-hnsw", default="", help="efSearch values, e.g. 64,128")
    a.add_argument("--sweep-refine", default="", help="ivfpq refine values, e.g. 1,4,8 (1: codes only)")
    a.add_argument("--hnsw-max-n", type=int, default=100_000, help="skip HNSW above this N (its 1M build is slow)")
    a.add_argument("--threads", type=int, default=0)


def cmd_ann(args) -> int:
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    sweep = {kind: {name: ints(values)} for kind, name, values in
             (("ivf", "nprobe", args.sweep_ivf), ("hnsw", "efSearch", args.sweep_hnsw),
              ("ivfpq", "refine", args.sweep_refine)) if ints(values)}
    rows = benchmark_ann(ints(args.sizes), dim=args.dim, kinds=[k for k in args.kinds.split(",") if k],
                         n_queries=args.queries, k=args.k, sweep=sweep, max_n={"hnsw": args.hnsw_max_n},
                         threads=args.threads or None)
    print(format_benchmark_table(rows))
    return 0
