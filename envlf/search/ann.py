"""Nearest-neighbour search over embeddings: FAISS (CPU or GPU) or torch behind one small API.

The gallery index stores L2-normalised float32 ITC embeddings and asks for the top-k by
inner product (= cosine). `AnnIndex` hides which structure answers:

- ``flat``  exact (`IndexFlatIP`). On a host with faiss-gpu it moves to the GPU; on a CUDA
  host without faiss-gpu it runs as `TorchExact` (matmul + topk, fp16 on CUDA).
- ``hnsw``  `IndexHNSWFlat` graph (params ``M``, ``efConstruction``, ``efSearch``).
- ``ivf``   `IndexIVFFlat` (params ``nlist``, ``nprobe``), its coarse quantiser trained
  with k-means on a sample of the embeddings.
- ``ivfpq`` `IndexIVFPQ` (params ``nlist``, ``nprobe``, ``m`` sub-quantisers of ``nbits`` bits,
  ``refine``): each vector kept as an m-byte code (64 bytes at 256-d instead of 1,024), for
  archives whose vectors do not fit in RAM. With ``refine`` > 1 and the full vectors attached
  (`attach_vectors`, e.g. the gallery's memory-mapped ``embeddings.f32``), a search takes
  ``refine * k`` candidates from the codes and re-scores them exactly from those vectors.
- ``auto``  exact up to `AUTO_EXACT_MAX_N` (100k) vectors, `AUTO_ANN_KIND` ("ivf") above; always
  exact on a GPU. The thresholds and defaults come from `envlf bench ann` (see DEFAULT_PARAMS).

Ids are the int64 row numbers of the vectors in the order they were added: the first build
gets 0..N-1, each later `add` continues from there, so the gallery's row ids never change.
The index is append-only: nothing is ever removed (HNSW cannot remove at all; IVF and flat
could, but removal would renumber a flat index). To drop items, rebuild from the kept rows.
Vectors added after an IVF build go to the existing k-means cells (no re-training); after a
large share of new, differently distributed data, rebuild. ``auto`` decides once, at build
time: a gallery that grows far past `AUTO_EXACT_MAX_N` by `add` should be rebuilt.

`search` returns ``min(k, N)`` columns (k larger than N is trimmed, never padded with fake
hits). An approximate index may still find fewer than ``min(k, N)`` neighbours for a query
(rare: small ``efSearch``/``nprobe``); those slots hold id ``-1`` and score ``-inf`` (for
metric ``l2``: ``+inf``), sorted last. An empty index answers with ``(Q, 0)`` arrays.

Threads: FAISS parallelises with OpenMP. ``threads=`` on build/load (else the
``ENVLF_ANN_THREADS`` environment variable) sets the OpenMP thread count for this index's
build, add and search calls (for the calling thread only, restored afterwards). Left unset,
builds and batch searches use OpenMP's default (``OMP_NUM_THREADS``, else every core), and
searches of fewer than `SMALL_BATCH` (20) queries use one thread: FAISS splits a single
flat query across threads, which on a busy 2-core host (the app re-ranking with torch beside
it) made it 4x slower; IVF and HNSW single queries never used more than one thread anyway.

Files: ``save(dir)`` writes ``dir/ann.faiss`` (`faiss.write_index`, always a CPU index, so a
GPU-built index loads on a CPU host and back) and ``dir/ann.json`` (kind, metric, params,
N, D, FAISS version, SHA-256 of the index file). ``AnnIndex.load(dir)`` checks them and
raises ``ValueError("corrupt ANN index file ...")`` on a damaged or truncated file.

GPU: faiss-gpu comes from ``requirements-gpu.txt`` (it replaces faiss-cpu; both install the
same ``faiss`` module). Which one is installed is read at run time through
``faiss.get_num_gpus()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

INDEX_FILE = "ann.faiss"
META_FILE = "ann.json"
FORMAT_VERSION = 1
THREADS_ENV = "ENVLF_ANN_THREADS"
TRAIN_PER_LIST = 64  # IVF k-means sample size per cell (FAISS warns below 39)
GPU_MAX_K = 2048  # faiss-gpu's k-selection limit
SMALL_BATCH = 20  # searches of fewer queries run on one thread unless `threads` is set

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
METRICS = ("ip", "l2")

# Chosen from `envlf bench ann` (benchmarks/ann.py) on clustered 256-d embeddings, 2 CPU cores
# (table in docs/results.md):
# - exact up to AUTO_EXACT_MAX_N: a flat scan costs ~0.1 us per vector per query on one core
#   (p50 ~10 ms at 100k, ~100 ms at 1M), perfect recall, no build. 10 ms is far below the
#   fusion re-ranking that follows, so exactness is free up to here.
# - above: IVF-Flat. At 1M it kept recall@10 >= 0.95 on every clustered set tried at
#   p50 1-2 ms, built in ~40 s and adds 10 bytes/vector. HNSW (M=16..32) took 4+ minutes to
#   build at 1M on 2 cores, used 13-25% more memory and lost recall on well separated
#   clusters (0.46-0.77 at 1M, efSearch 32-256): graph search can miss the query's cluster.
AUTO_EXACT_MAX_N = 100_000
AUTO_ANN_KIND = "ivf"

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    # M: graph degree (memory +2*M*4 bytes/vector at level 0; recall rises with M).
    # efConstruction: build-time beam; efSearch: query-time beam (raised to k if smaller).
    # At 100k: recall@10 0.96-1.00 at p50 0.3-0.6 ms on the clustered sets.
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 128},
    # nlist None: 2*sqrt(N) cells (2000 at 1M; at least 39 training vectors per cell). Fewer,
    # larger cells than the usual 4..16*sqrt(N): k-means and assignment cost scale with
    # nlist and dominate the build on 2 cores; at 1M, 2000 cells x nprobe 32 matched 4000 x 64
    # (recall 0.975 vs 0.981 on the hardest set, p50 ~2 ms) at less than half the build time.
    # nprobe: cells scanned per query; raise it (search(..., nprobe=)) beyond ~1M vectors.
    "ivf": {"nlist": None, "nprobe": 32},
    # m None: dim // 4 sub-quantisers (64 one-byte codes at 256-d: 1/16 of the float32 vector).
    # refine: candidates per wanted hit re-scored from the attached full vectors (1: none).
    # At 1M clustered 256-d vectors (`envlf bench ann`, 2 cores): m=64 refine 8 recall@10 0.985,
    # p50 0.75 ms, 74 bytes/vector in RAM; m=32 needed refine 32 for 0.977 (codes alone: 0.26)
    # and so 4x the random reads of full vectors per query; refine 4 gave 0.56 (m=32) / 0.92.
    "ivfpq": {"nlist": None, "nprobe": 32, "m": None, "nbits": 8, "refine": 8},
}
IVF_KINDS = ("ivf", "ivfpq")

__all__ = [
    "AnnIndex",
    "TorchExact",
    "recall_at_k",
    "clustered_embeddings",
    "AUTO_EXACT_MAX_N",
    "AUTO_ANN_KIND",
    "DEFAULT_PARAMS",
]


# -- helpers --------------------------------------------------------------------------------

def _as_matrix(x: Any, dim: int | None, what: str) -> np.ndarray:
    """(N, D) float32 C-contiguous copy-if-needed of `x`; a 1-D vector becomes one row."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what} have dimension {a.shape[1]}, the index has {dim}")
    a = np.ascontiguousarray(a, dtype=np.float32)  # a float32 memmap stays one: nothing is read
    for i in range(0, len(a), 1 << 16):  # in blocks: a whole-array mask of a memmap costs N*D bytes
        if not np.isfinite(a[i : i + (1 << 16)]).all():
            raise ValueError(f"{what} contain NaN or infinite values")
    return a


def _faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _num_faiss_gpus() -> int:
    # faiss-cpu builds may lack the attribute altogether
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # a broken CUDA setup must not break CPU search
        return 0


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


DEVICES = ("auto", "cpu", "cuda", "torch", "faiss-gpu", "torch-cuda", "torch-cpu")


def _placement(kind: str, device: str) -> str:
    """Where an index of `kind` runs: "cpu", "faiss-gpu", "torch-cuda" or "torch-cpu".

    device: "auto" (a GPU if there is one), "cpu", "cuda" (a GPU or an error), "torch"
    (TorchExact, on CUDA if torch sees it), or a placement itself (an index's `.device`, so
    it can be passed back in). Only exact search leaves the CPU, faiss-gpu first, else torch
    on CUDA: other kinds always run on the CPU, whatever `device` says (HNSW has no FAISS GPU
    form, and an IVF on a GPU would gain little over an exact GPU scan at gallery sizes).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if kind != "flat" or device == "cpu":
        return "cpu"
    if device == "torch-cpu":
        return "torch-cpu"
    if device in ("torch", "torch-cuda"):
        if _torch_cuda_available():
            return "torch-cuda"
        if device == "torch-cuda":
            raise ValueError("device='torch-cuda' but torch sees no CUDA GPU")
        return "torch-cpu"
    if _num_faiss_gpus() > 0:
        return "faiss-gpu"
    if _torch_cuda_available():
        return "torch-cuda"
    if device in ("cuda", "faiss-gpu"):
        raise ValueError(f"device={device!r} but neither faiss-gpu nor torch sees a CUDA GPU")
    return "cpu"


def _resolve_threads(threads: int | None) -> int | None:
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return None
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be an integer, got {env!r}") from None
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` OpenMP threads (process-wide), restoring the old count."""
    if threads is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _default_nlist(n: int) -> int:
    # 2*sqrt(N) cells (see DEFAULT_PARAMS), never fewer than 39 training vectors per cell.
    return max(1, min(int(round(2 * math.sqrt(max(n, 1)))), n // 39))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Share of the exact top-k ids found in the approximate top-k, averaged over queries.

    Both arrays are (Q, >=k) id matrices; -1 entries (no result) never count as found. With
    ties at the k-th exact score this is a (slight) underestimate: compare scores if that
    matters.
    """
    a = np.asarray(approx_ids)[:, :k]
    e = np.asarray(exact_ids)[:, :k]
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"approx and exact ids have {a.shape[0]} vs {e.shape[0]} queries")
    if e.size == 0:
        return 1.0
    hits = 0
    total = 0
    for row_a, row_e in zip(a, e):
        want = row_e[row_e >= 0]
        total += len(want)
        hits += np.isin(want, row_a[row_a >= 0]).sum()
    return float(hits / total) if total else 1.0


# -- torch exact search -----------------------------------------------------------------------

class TorchExact:
    """Exact top-k by matmul + topk in torch: the flat index for CUDA hosts without faiss-gpu.

    Stores the vectors on `device` (fp16 on CUDA: half the memory, tensor cores; fp32 on
    CPU, where it matches `IndexFlatIP` to float rounding). Same `add` / `search` contract as
    a FAISS index: ids are row numbers, k is trimmed to N.
    """

    def __init__(self, dim: int, metric: str = "ip", device: str | None = None, dtype: Any = None):
        import torch

        _faiss_metric(metric)  # validates
        self.dim = int(dim)
        self.metric = metric
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self._data = torch.empty((0, self.dim), dtype=dtype, device=self.device)  # (cap, D)
        self._sqnorm = torch.empty((0,), dtype=torch.float32, device=self.device)  # (cap,) l2 only
        self.ntotal = 0

    def add(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = _as_matrix(x, self.dim, "embeddings")
        start = self.ntotal
        need = start + len(x)
        if need > self._data.shape[0]:  # grow geometrically: adds stay amortised O(1)
            cap = max(need, 2 * self._data.shape[0], 1024)
            grown = torch.empty((cap, self.dim), dtype=self.dtype, device=self.device)
            grown[:start] = self._data[:start]
            self._data = grown
            sq = torch.empty((cap,), dtype=torch.float32, device=self.device)
            sq[:start] = self._sqnorm[:start]
            self._sqnorm = sq
        t = torch.from_numpy(x).to(self.device)
        self._data[start:need] = t.to(self.dtype)
        self._sqnorm[start:need] = (t.float() ** 2).sum(1)
        self.ntotal = need
        return np.arange(start, need, dtype=np.int64)

    def vectors(self) -> np.ndarray:
        """(N, D) float32 copy of the stored vectors (fp16-rounded on CUDA)."""
        return self._data[: self.ntotal].float().cpu().numpy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = _as_matrix(queries, self.dim, "queries")
        k = min(int(k), self.ntotal)
        if k <= 0 or len(q) == 0:
            return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
        data = self._data[: self.ntotal]
        # Chunk the queries so the (chunk, N) score matrix stays near 256 MB.
        chunk = max(1, min(len(q), (64 << 20) // max(self.ntotal, 1)))
        out_s, out_i = [], []
        with torch.no_grad():
            for i in range(0, len(q), chunk):
                qt = torch.from_numpy(q[i : i + chunk]).to(self.device)
                s = (qt.to(self.dtype) @ data.T).float()  # (c, N)
                if self.metric == "l2":  # ||q - x||^2 = |q|^2 - 2 q.x + |x|^2; topk on -dist
                    s = -((qt.float() ** 2).sum(1, keepdim=True) - 2 * s + self._sqnorm[: self.ntotal])
                vals, idx = torch.topk(s, k, dim=1, largest=True, sorted=True)
                if self.metric == "l2":
                    vals = -vals
                out_s.append(vals.cpu())
                out_i.append(idx.cpu())
        return (
            torch.cat(out_s).numpy().astype(np.float32, copy=False),
            torch.cat(out_i).numpy().astype(np.int64, copy=False),
        )


# -- the index --------------------------------------------------------------------------------

def _choose_kind(kind: str, params: dict, n: int, device: str) -> tuple[str, dict]:
    """(the index kind, its full parameters) for `kind` ("auto" picks by size and device)."""
    if kind == "auto":
        known = set().union(*DEFAULT_PARAMS.values())
        if set(params) - known:
            raise ValueError(f"unknown index parameter(s) {sorted(set(params) - known)}")
        # On a GPU an exact scan of 1M x 256 reads 1 GB at GPU memory bandwidth (a few ms
        # at most): no reason to approximate. On CPU: exact up to the measured threshold.
        on_gpu = _placement("flat", device).endswith(("gpu", "cuda"))
        kind = "flat" if (on_gpu or n <= AUTO_EXACT_MAX_N) else AUTO_ANN_KIND
        params = {k: v for k, v in params.items() if k in DEFAULT_PARAMS[kind]}
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected 'auto' or one of {KINDS}")
    unknown = set(params) - set(DEFAULT_PARAMS[kind])
    if unknown:
        raise ValueError(f"unknown {kind} parameter(s) {sorted(unknown)}; expected {sorted(DEFAULT_PARAMS[kind])}")
    return kind, {**DEFAULT_PARAMS[kind], **params}


def min_train(kind: str, params: dict | None = None) -> int:
    """The fewest vectors an index of `kind` can be trained on (0: no training)."""
    if kind == "ivf":
        return 1
    if kind == "ivfpq":
        return 2 ** int({**DEFAULT_PARAMS["ivfpq"], **(params or {})}["nbits"])
    return 0


def _faiss_index(kind: str, p: dict, x: np.ndarray, fmetric, seed: int, n_total: int | None = None):
    """An empty FAISS index of `kind` (IVF trained on a seeded sample of x); p is completed in
    place. n_total: how many vectors it will hold (sets the default nlist; default len(x))."""
    n, dim = x.shape
    if kind == "flat":
        return faiss.IndexFlat(dim, fmetric)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(p["M"]), fmetric)
        index.hnsw.efConstruction = int(p["efConstruction"])
        index.hnsw.efSearch = int(p["efSearch"])
        return index
    if n < min_train(kind, p):
        if kind == "ivf":
            raise ValueError("an 'ivf' index needs training vectors; build 'flat' for an empty index")
        raise ValueError(f"an 'ivfpq' index needs at least {min_train(kind, p)} vectors to train its codebooks, "
                         f"got {n}; build 'flat' or 'ivf' for so few")
    nlist = max(1, min(int(p["nlist"]) if p["nlist"] else _default_nlist(max(n, n_total or 0)), n))
    p["nlist"] = nlist
    p["nprobe"] = int(min(int(p["nprobe"]), nlist))
    if kind == "ivfpq":
        m = int(p["m"]) if p["m"] else max(1, dim // 4)
        if dim % m:
            raise ValueError(f"ivfpq: m={m} sub-quantisers must divide the dimension {dim}")
        p["m"], p["nbits"], p["refine"] = m, int(p["nbits"]), max(1, int(p["refine"]))
        # "np": no polysemous training (an O(256^2) code permutation search, 25 s at any N, unused here)
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{p['nbits']}np", fmetric)
    else:
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", fmetric)
    # k-means on a seeded sample of TRAIN_PER_LIST points per cell (FAISS itself would take up
    # to 256, 4x the k-means work): same data, same cells. PQ codebooks: 64 per centroid too.
    n_train = min(n, max(TRAIN_PER_LIST * nlist, 64 * min_train(kind, p) if kind == "ivfpq" else 0))
    rng = np.random.default_rng(seed)
    sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.verbose = False
    if kind == "ivfpq":
        pq = faiss.downcast_index(ivf).pq  # its 256-centroid k-means on 64 points per centroid too
        pq.cp.seed, pq.cp.verbose, pq.cp.max_points_per_centroid = seed, False, 64
    index.train(sample)
    ivf.nprobe = p["nprobe"]
    return index


class AnnIndex:
    """Top-k search over an append-only set of embeddings. Build with `AnnIndex.build`."""

    def __init__(
        self,
        index: Any,
        kind: str,
        metric: str,
        params: dict[str, Any],
        dim: int,
        device: str = "cpu",
        threads: int | None = None,
    ):
        # Use `build` / `load`; this wraps an already made FAISS index or TorchExact.
        self._index = index
        self.kind = kind
        self.metric = metric
        self.params = dict(params)
        self.dim = int(dim)
        self.device = device  # placement: "cpu", "faiss-gpu", "torch-cuda" or "torch-cpu"
        self.threads = threads
        self._vectors: Any = None  # full vectors for ivfpq's exact re-scoring (attach_vectors)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        kind: str = "auto",
        metric: str = "ip",
        *,
        device: str = "auto",
        threads: int | None = None,
        seed: int = 0,
        n_total: int | None = None,
        add: bool = True,
        **params: Any,
    ) -> "AnnIndex":
        """Index `embeddings` (N, D) float32; row i gets id i.

        kind: "flat" | "hnsw" | "ivf" | "ivfpq" | "auto" (exact up to AUTO_EXACT_MAX_N, else
        AUTO_ANN_KIND; exact on GPU). params override DEFAULT_PARAMS[kind] (M,
        efConstruction, efSearch / nlist, nprobe / m, nbits, refine). device: "auto" (GPU if
        there is one), "cpu", "cuda" (requires one), "torch" (TorchExact) or an index's
        `.device`; it only moves exact (flat) indexes, the others stay on the CPU. threads:
        OpenMP threads (else $ENVLF_ANN_THREADS, else OpenMP's default). seed: IVF training
        sample.

        Past RAM (vectors read shard by shard): pass a sample as `embeddings` with
        ``add=False`` and ``n_total`` = the final count (it picks the kind and nlist), then
        `add` the shards in order; ids still follow the order of those `add` calls.
        """
        x = _as_matrix(embeddings, None, "embeddings")
        n, dim = x.shape
        if dim < 1:
            raise ValueError("embeddings must have at least one dimension")
        fmetric = _faiss_metric(metric)
        threads = _resolve_threads(threads)
        kind, p = _choose_kind(kind, params, max(n, n_total or 0), device)
        where = _placement(kind, device)
        if where.startswith("torch"):
            index: Any = TorchExact(dim, metric, device=where.split("-")[1])
            if add:
                index.add(x)
            return cls(index, kind, metric, p, dim, where, threads)
        with _omp_threads(threads):
            index = _faiss_index(kind, p, x, fmetric, seed, n_total)
            if n and add:
                index.add(x)
        if where == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        return cls(index, kind, metric, p, dim, where, threads)

    # -- use ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def ntotal(self) -> int:
        return len(self)

    def attach_vectors(self, vectors: Any) -> "AnnIndex":
        """The full (N, D) vectors behind the ids (a memmap is fine: only candidates are read),
        which an ivfpq index with ``refine`` > 1 re-scores its candidates from. Returns self."""
        if vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != self.dim):
            raise ValueError(f"vectors must be (N, {self.dim}), got {tuple(vectors.shape)}")
        self._vectors = vectors
        return self

    def add(self, embeddings: np.ndarray) -> np.ndarray:
        """Append vectors; returns their ids (int64), continuing after the last id."""
        x = _as_matrix(embeddings, self.dim, "embeddings")
        start = len(self)
        if len(x):
            with _omp_threads(self.threads):
                self._index.add(x)
        return np.arange(start, start + len(x), dtype=np.int64)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        efSearch: int | None = None,
        nprobe: int | None = None,
        refine: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query: (scores (Q, min(k, N)) float32, ids (Q, min(k, N)) int64).

        Rows are best first (ip: highest score; l2: smallest squared distance). Queries may
        be any (Q, D) array (converted to float32 C-contiguous) or one (D,) vector. efSearch /
        nprobe / refine override the stored search parameters for this call only (refine
        needs `attach_vectors`; without them an ivfpq index answers from its codes alone).
        Slots an ANN index could not fill hold id -1 and score -inf (l2: +inf), last in their
        row.
        """
        q = _as_matrix(queries, self.dim, "queries")
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        k = min(k, len(self))
        if k == 0 or len(q) == 0:
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
        if isinstance(self._index, TorchExact):
            return self._index.search(q, k)
        sp = None
        if self.kind == "hnsw":
            # A beam narrower than k cannot return k results.
            sp = faiss.SearchParametersHNSW(efSearch=max(int(efSearch or self.params["efSearch"]), k))
        elif self.kind in IVF_KINDS:
            sp = faiss.SearchParametersIVF(nprobe=int(nprobe or self.params["nprobe"]))
        want = k
        if self.kind == "ivfpq" and self._vectors is not None:
            k = min(len(self), k * max(1, int(refine or self.params["refine"])))
        if self.device == "faiss-gpu" and k > GPU_MAX_K:
            raise ValueError(f"faiss-gpu returns at most k={GPU_MAX_K} per query, asked for {k}")
        threads = self.threads
        if threads is None and len(q) < SMALL_BATCH:
            # FAISS splits one query's flat scan across OpenMP threads; on a busy 2-core host
            # that made it 4x slower (45 vs 12 ms at 100k), and ANN kinds gain nothing.
            threads = 1
        with _omp_threads(threads):
            scores, ids = self._index.search(q, k, params=sp) if sp is not None else self._index.search(q, k)
        ids = ids.astype(np.int64, copy=False)
        if self.kind == "ivfpq" and self._vectors is not None:
            step = 1024  # query blocks: the candidates' vectors take (block, refine*k, D) floats
            scores = np.concatenate([self._exact_scores(q[i : i + step], ids[i : i + step])
                                     for i in range(0, len(q), step)])
            order = np.argsort(-scores if self.metric == "ip" else scores, axis=1, kind="stable")[:, :want]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
            ids = np.where(np.isfinite(scores), ids, -1)  # rows past the vectors count as not found
        missing = ids < 0
        if missing.any():  # FAISS pads with -FLT_MAX / FLT_MAX: make it an honest +-inf
            scores[missing] = -np.inf if self.metric == "ip" else np.inf
        return scores, ids

    def _exact_scores(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of each query against its candidate ids (-1: worst), from the attached
        vectors, read once per distinct candidate in row order (kind to a memmap)."""
        valid = (ids >= 0) & (ids < len(self._vectors))  # rows past the vectors: not committed yet
        uniq, inverse = np.unique(ids[valid], return_inverse=True)
        rows = np.asarray(self._vectors[uniq], dtype=np.float32) if len(uniq) else np.zeros((0, self.dim), np.float32)
        cand = np.zeros(ids.shape + (self.dim,), np.float32)
        cand[valid] = rows[inverse]
        if self.metric == "ip":
            s = np.einsum("qd,qkd->qk", q, cand)
            s[~valid] = -np.inf
        else:
            s = ((cand - q[:, None, :]) ** 2).sum(-1)
            s[~valid] = np.inf
        return s.astype(np.float32, copy=False)

    # -- files --------------------------------------------------------------------------------
    def _cpu_index(self) -> Any:
        if isinstance(self._index, TorchExact):
            flat = faiss.IndexFlat(self.dim, _faiss_metric(self.metric))
            if self._index.ntotal:
                flat.add(self._index.vectors())
            return flat
        if self.device == "faiss-gpu":
            return faiss.index_gpu_to_cpu(self._index)
        return self._index

    def save(self, directory: str | Path) -> Path:
        """Write ``ann.faiss`` and ``ann.json`` into `directory` (created); returns it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / INDEX_FILE
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._cpu_index(), str(tmp))
        os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "params": self.params,
            "ntotal": len(self),
            "dim": self.dim,
            "faiss_version": faiss.__version__,
            "sha256": _sha256(path),
        }
        tmp_meta = d / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp_meta, d / META_FILE)
        return d

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        device: str = "auto",
        threads: int | None = None,
        verify: bool = True,
    ) -> "AnnIndex":
        """Read an index written by `save`. verify: check the file's SHA-256 first.

        device as in `build` ("auto": a flat index goes to the GPU when there is one).
        Raises FileNotFoundError if a file is missing, ValueError if one is damaged.
        """
        d = Path(directory)
        path, meta_path = d / INDEX_FILE, d / META_FILE
        for f in (path, meta_path):
            if not f.is_file():
                raise FileNotFoundError(f"ANN index file missing: {f}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind, metric, params = meta["kind"], meta["metric"], dict(meta["params"])
            ntotal, dim = int(meta["ntotal"]), int(meta["dim"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt ANN metadata file {meta_path}: {e}") from None
        if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta['format_version']}; upgrade envlf")
        if kind not in KINDS or metric not in METRICS:
            raise ValueError(f"corrupt ANN metadata file {meta_path}: kind={kind!r}, metric={metric!r}")
        if verify and meta.get("sha256") and _sha256(path) != meta["sha256"]:
            raise ValueError(f"corrupt ANN index file {path}: checksum does not match {meta_path.name}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"corrupt ANN index file {path} (written by faiss {meta.get('faiss_version')}, "
                f"this is faiss {faiss.__version__}): {msg}"
            ) from None
        if index.ntotal != ntotal or index.d != dim:
            raise ValueError(
                f"corrupt ANN index file {path}: holds {index.ntotal} x {index.d}, "
                f"{meta_path.name} says {ntotal} x {dim}"
            )
        threads = _resolve_threads(threads)
        where = _placement(kind, device)
        if where.startswith("torch"):
            te = TorchExact(dim, metric, device=where.split("-")[1])
            if ntotal:
                te.add(index.reconstruct_n(0, ntotal))
            index = te
        elif where == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        return cls(index, kind, metric, params, dim, where, threads)

    def __repr__(self) -> str:
        return (
            f"AnnIndex(kind={self.kind!r}, metric={self.metric!r}, N={len(self)}, D={self.dim}, "
            f"device={self.device!r}, params={self.params})"
        )

    def memory_bytes(self) -> int:
        """Approximate RAM held by the index (vectors + graph links / lists + centroids)."""
        return _index_bytes(self._index, self.dim)


def _index_bytes(index: Any, dim: int) -> int:
    if isinstance(index, TorchExact):
        return index.ntotal * dim * index._data.element_size()
    index = faiss.downcast_index(index)
    n = int(index.ntotal)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        links = h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4
        return n * dim * 4 + int(links)
    if isinstance(index, faiss.IndexIVF):
        invl = index.invlists
        stored = sum(invl.list_size(i) for i in range(index.nlist))
        return int(stored * (index.code_size + 8) + index.nlist * dim * 4)
    return n * dim * 4


# -- measuring ---------------------------------------------------------------------------------

def clustered_embeddings(
    n: int,
    dim: int = 256,
    *,
    n_centres: int = 1000,
    n_classes: int | None = 30,
    spread: float = 1.0,
    class_spread: float = 1.0,
    seed: int = 0,
    centres_seed: int = 1234,
    chunk: int = 100_000,
) -> np.ndarray:
    """(n, dim) L2-normalised float32 vectors from a mixture of `n_centres` Gaussians.

    Stand-in for ITC embeddings, which cluster by scene class. Each vector is a unit centre
    plus isotropic noise of norm ~`spread`, renormalised (spread 1: cosine ~0.7 to its centre,
    ~0.5 to its cluster mates). With `n_classes`, the centres themselves cluster around that
    many "scene classes" (noise `class_spread`), so neighbouring clusters overlap as scenes
    of one class do; with None they are independent random directions (cosine ~0 across
    clusters: separated islands). The centres depend only on `centres_seed`, so gallery and
    queries drawn with different `seed`s share them.
    """
    crng = np.random.default_rng(centres_seed)
    centres = crng.standard_normal((n_centres, dim), dtype=np.float32)
    if n_classes:
        classes = crng.standard_normal((n_classes, dim), dtype=np.float32)
        classes /= np.linalg.norm(classes, axis=1, keepdims=True)
        centres *= np.float32(class_spread / math.sqrt(dim))
        centres += classes[crng.integers(0, n_classes, n_centres)]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):  # chunks keep the temporary noise small at 1M
        m = min(chunk, n - i)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        block *= np.float32(spread / math.sqrt(dim))
        block += centres[rng.integers(0, n_centres, m)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[i : i + m] = block
    return out
