"""envlf.search.ann: exact search against numpy, ANN recall, files, growth, edge cases, torch path."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from envlf.search import ann
from envlf.search.ann import AnnIndex, TorchExact, clustered_embeddings, recall_at_k

DIM = 32


def _brute(data: np.ndarray, queries: np.ndarray, metric: str = "ip") -> np.ndarray:
    """(Q, N) scores where larger is better (ip: q.x; l2: -||q - x||^2), in float64."""
    d, q = data.astype(np.float64), queries.astype(np.float64)
    if metric == "ip":
        return q @ d.T
    return -(((q[:, None, :] - d[None, :, :]) ** 2).sum(-1))


def assert_exact_topk(scores, ids, data, queries, k, metric="ip", atol=1e-5):
    """Tie-safe check of an exact top-k: the score sequence equals numpy's, every returned id
    really has its returned score, and no id repeats. Among tied items any order is fine."""
    full = _brute(data, queries, metric)  # (Q, N)
    sign = 1.0 if metric == "ip" else -1.0
    k = min(k, data.shape[0])
    assert scores.shape == ids.shape == (len(queries), k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref = -np.sort(-full, axis=1)[:, :k]  # best-first reference scores
    np.testing.assert_allclose(sign * scores, ref, rtol=0, atol=atol)
    np.testing.assert_allclose(sign * scores, np.take_along_axis(full, ids, 1), rtol=0, atol=atol)
    for row in ids:
        assert len(set(row.tolist())) == k


@pytest.fixture(scope="module")
def data():
    return clustered_embeddings(2000, DIM, n_centres=40, seed=0)


@pytest.fixture(scope="module")
def queries():
    return clustered_embeddings(25, DIM, n_centres=40, seed=1)


# -- exact search ------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy(data, queries, metric):
    index = AnnIndex.build(data, "flat", metric=metric, device="cpu")
    assert index.kind == "flat" and len(index) == len(data) and index.device == "cpu"
    scores, ids = index.search(queries, 10)
    assert_exact_topk(scores, ids, data, queries, 10, metric)


def test_flat_with_exact_ties():
    # Every vector three times: ids may come in any order among equals, scores may not.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    data = np.concatenate([base, base, base])
    q = base[:7] + 0.01
    scores, ids = AnnIndex.build(data, "flat", device="cpu").search(q, 6)
    assert_exact_topk(scores, ids, data, q, 6)
    # The best three hits of query i are the three copies of row i.
    assert all(set(ids[i, :3] % 50) == {i} for i in range(7))


def test_queries_are_converted(data):
    index = AnnIndex.build(data, "flat", device="cpu")
    q64 = np.asfortranarray(data[:5].astype(np.float64))  # float64, not C-contiguous
    s1, i1 = index.search(q64, 3)
    s2, i2 = index.search(np.ascontiguousarray(data[:5]), 3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    s, i = index.search(data[7], 1)  # one (D,) vector = one query
    assert i.shape == (1, 1) and i[0, 0] == 7
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((2, DIM + 1), np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(data[:1], -1)


# -- approximate search ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clustered_5k():
    x = clustered_embeddings(5000, 64, n_centres=50, seed=0)
    q = clustered_embeddings(100, 64, n_centres=50, seed=1)
    _, exact = AnnIndex.build(x, "flat", device="cpu").search(q, 10)
    return x, q, exact


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_with_defaults(clustered_5k, kind):
    x, q, exact = clustered_5k
    index = AnnIndex.build(x, kind, device="cpu")
    scores, ids = index.search(q, 10)
    assert recall_at_k(ids, exact, 10) >= 0.9
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_search_params_override(clustered_5k):
    x, q, exact = clustered_5k
    ivf = AnnIndex.build(x, "ivf", device="cpu", nlist=64, nprobe=1)
    assert ivf.params == {"nlist": 64, "nprobe": 1}
    _, narrow = ivf.search(q, 10)
    _, wide = ivf.search(q, 10, nprobe=64)  # every cell: exact
    assert recall_at_k(wide, exact, 10) == 1.0
    assert recall_at_k(narrow, exact, 10) < 1.0
    hnsw = AnnIndex.build(x[:500], "hnsw", device="cpu", efSearch=4)
    _, ids = hnsw.search(q, 20)  # efSearch is raised to k: 20 real results
    assert (ids >= 0).all()


def test_unknown_kind_and_params(data):
    with pytest.raises(ValueError, match="unknown index kind"):
        AnnIndex.build(data, "lsh")
    with pytest.raises(ValueError, match="unknown hnsw parameter"):
        AnnIndex.build(data, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="unknown index parameter"):
        AnnIndex.build(data, "auto", efsearch=3)
    with pytest.raises(ValueError, match="metric"):
        AnnIndex.build(data, "flat", metric="cos")


def test_auto_picks_by_size(data, monkeypatch):
    assert AnnIndex.build(data, device="cpu").kind == "flat"
    monkeypatch.setattr(ann, "AUTO_EXACT_MAX_N", 1000)
    index = AnnIndex.build(data, device="cpu", efSearch=200, nprobe=7)  # both may be given
    assert index.kind == ann.AUTO_ANN_KIND
    assert index.params[{"hnsw": "efSearch", "ivf": "nprobe"}[index.kind]] in (200, 7)


# -- growth ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_after_build(data, kind):
    index = AnnIndex.build(data[:1500], kind, device="cpu")
    ids = index.add(data[1500:])
    np.testing.assert_array_equal(ids, np.arange(1500, 2000))
    assert ids.dtype == np.int64 and len(index) == 2000
    probe = data[1500:1540]
    _, found = index.search(probe, 1, nprobe=index.params.get("nlist"))
    np.testing.assert_array_equal(found[:, 0], np.arange(1500, 1540))
    assert len(index.add(np.zeros((0, DIM), np.float32))) == 0


# -- edge cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_k_larger_than_n_is_trimmed(kind):
    x = clustered_embeddings(6, DIM, n_centres=3)
    scores, ids = AnnIndex.build(x, kind, device="cpu").search(x[:2], 50)
    assert scores.shape == ids.shape == (2, 6)
    for row in ids:
        assert sorted(row.tolist()) == list(range(6))
    assert np.isfinite(scores).all()


def test_empty_index():
    index = AnnIndex.build(np.zeros((0, DIM), np.float32), "auto", device="cpu")
    assert len(index) == 0 and index.kind == "flat"
    scores, ids = index.search(np.ones((3, DIM), np.float32), 5)
    assert scores.shape == ids.shape == (3, 0)
    assert index.search(np.zeros((0, DIM), np.float32), 5)[1].shape == (0, 0)
    x = clustered_embeddings(4, DIM)
    np.testing.assert_array_equal(index.add(x), [0, 1, 2, 3])
    assert index.search(x[2], 1)[1][0, 0] == 2
    with pytest.raises(ValueError, match="ivf"):
        AnnIndex.build(np.zeros((0, DIM), np.float32), "ivf")


def test_missing_results_are_minus_one_and_inf():
    # IVF with one probed cell out of several cannot always fill k: padding is explicit.
    x = clustered_embeddings(400, DIM, n_centres=8)
    index = AnnIndex.build(x, "ivf", device="cpu", nlist=8, nprobe=1)
    scores, ids = index.search(x[:20], 300)
    pad = ids < 0
    assert pad.any()
    assert np.isneginf(scores[pad]).all() and np.isfinite(scores[~pad]).all()


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 9, 1], [-1, -1, 6]])
    assert recall_at_k(approx, exact, 3) == pytest.approx(3 / 6)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0 / 2)
    assert recall_at_k(exact, exact, 3) == 1.0


# -- files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_identical(tmp_path, data, queries, kind):
    index = AnnIndex.build(data, kind, device="cpu")
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "ann.json").read_text())
    assert meta["kind"] == kind and meta["ntotal"] == 2000 and meta["dim"] == DIM
    assert meta["faiss_version"] == faiss.__version__ and meta["params"] == index.params
    loaded = AnnIndex.load(tmp_path / "idx", device="cpu")
    assert (loaded.kind, loaded.metric, loaded.params, len(loaded)) == (kind, "ip", index.params, 2000)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.add(queries[:2]), [2000, 2001])  # ids continue


def test_corrupt_files_raise_value_error(tmp_path, data):
    d = AnnIndex.build(data[:300], "hnsw", device="cpu").save(tmp_path / "idx")
    path = d / "ann.faiss"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt ANN index file"):
        AnnIndex.load(d)
    with pytest.raises(ValueError, match="corrupt ANN index file"):  # FAISS's own check
        AnnIndex.load(d, verify=False)
    path.write_bytes(b"not an index at all")
    with pytest.raises(ValueError, match="corrupt ANN index file"):
        AnnIndex.load(d, verify=False)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # same length, one byte changed: only the checksum sees it
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt ANN index file.*checksum"):
        AnnIndex.load(d)
    path.write_bytes(good)
    (d / "ann.json").write_text("{ half")
    with pytest.raises(ValueError, match="corrupt ANN metadata"):
        AnnIndex.load(d)
    (d / "ann.json").unlink()
    with pytest.raises(FileNotFoundError):
        AnnIndex.load(d)


# -- torch path and devices ----------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_exact_equals_flat(data, queries, metric):
    te = TorchExact(DIM, metric, device="cpu")
    np.testing.assert_array_equal(te.add(data[:1200]), np.arange(1200))
    np.testing.assert_array_equal(te.add(data[1200:]), np.arange(1200, 2000))  # grows
    s_t, i_t = te.search(queries, 10)
    s_f, i_f = AnnIndex.build(data, "flat", metric=metric, device="cpu").search(queries, 10)
    assert_exact_topk(s_t, i_t, data, queries, 10, metric)
    np.testing.assert_allclose(s_t, s_f, rtol=0, atol=1e-5)
    # Same ids wherever the k-th score is not tied with the next one.
    assert (i_t == i_f).mean() > 0.99
    assert te.search(queries, 5000)[1].shape == (25, 2000)


def test_torch_device_roundtrip(tmp_path, data, queries):
    index = AnnIndex.build(data, "flat", device="torch")
    assert index.device.startswith("torch")
    s, i = index.search(queries, 10)
    assert_exact_topk(s, i, data, queries, 10)
    loaded = AnnIndex.load(index.save(tmp_path / "t"), device="cpu")  # a plain faiss flat file
    s2, i2 = loaded.search(queries, 10)
    np.testing.assert_allclose(s, s2, atol=1e-5)
    assert AnnIndex.build(data[:300], "hnsw", device="torch").device == "cpu"  # only exact moves
    again = AnnIndex.load(tmp_path / "t", device=index.device)  # a placement is a valid device
    assert again.device == index.device
    with pytest.raises(ValueError, match="device"):
        AnnIndex.build(data, "flat", device="gpu0")


def test_gpu_placement_is_chosen_at_run_time(tmp_path, data, queries, monkeypatch):
    # Pretend faiss-gpu sees one GPU; the "GPU index" stays the CPU one.
    moved = []
    monkeypatch.setattr(ann, "_num_faiss_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda i: moved.append(i) or i)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda i: i, raising=False)  # GPU builds only
    monkeypatch.setattr(ann, "AUTO_EXACT_MAX_N", 10)
    index = AnnIndex.build(data, "auto")  # large for CPU, but a GPU scans it exactly
    assert (index.kind, index.device, len(moved)) == ("flat", "faiss-gpu", 1)
    assert AnnIndex.build(data, "hnsw").device == "cpu"  # only exact search moves
    assert AnnIndex.load(index.save(tmp_path / "g")).device == "faiss-gpu"
    assert AnnIndex.load(tmp_path / "g", device=index.device).device == "faiss-gpu"
    assert AnnIndex.load(tmp_path / "g", device="cpu").device == "cpu"
    monkeypatch.setattr(ann, "GPU_MAX_K", 5)
    with pytest.raises(ValueError, match="at most k=5"):
        index.search(queries, 6)
    monkeypatch.setattr(ann, "_num_faiss_gpus", lambda: 0)
    monkeypatch.setattr(ann, "_torch_cuda_available", lambda: False)
    with pytest.raises(ValueError, match="cuda"):
        AnnIndex.build(data, "flat", device="cuda")
    assert AnnIndex.build(data, "auto").device == "cpu"


@pytest.mark.skipif(ann._num_faiss_gpus() == 0, reason="needs faiss-gpu and a CUDA GPU")
def test_faiss_gpu_flat_matches_cpu(data, queries):
    gpu = AnnIndex.build(data, "flat", device="cuda")
    assert gpu.device == "faiss-gpu"
    s, i = gpu.search(queries, 10)
    assert_exact_topk(s, i, data, queries, 10, atol=1e-4)


def test_torch_cuda_fp16_close_to_flat(data, queries):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    te = TorchExact(DIM, device="cuda")
    te.add(data)
    s, i = te.search(queries, 10)
    ref = -np.sort(-(queries @ data.T), axis=1)[:, :10]
    np.testing.assert_allclose(s, ref, atol=2e-3)  # fp16 storage


# -- threads and benchmark ---------------------------------------------------------------------

def test_threads_from_argument_and_env(data, monkeypatch):
    before = faiss.omp_get_max_threads()
    index = AnnIndex.build(data[:200], "flat", device="cpu", threads=1)
    assert index.threads == 1
    index.search(data[:3], 2)
    assert faiss.omp_get_max_threads() == before  # restored after the call
    calls = []
    real_set = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: calls.append(n) or real_set(n))
    free = AnnIndex.build(data[:200], "flat", device="cpu")
    free.search(data[:1], 2)  # a single query runs on one thread (then the count is restored)
    assert calls == [1, before]
    calls.clear()
    free.search(data[:ann.SMALL_BATCH], 2)  # a batch keeps OpenMP's default
    assert calls == []
    monkeypatch.setenv(ann.THREADS_ENV, "1")
    assert AnnIndex.build(data[:200], "flat", device="cpu").threads == 1
    monkeypatch.setenv(ann.THREADS_ENV, "many")
    with pytest.raises(ValueError, match=ann.THREADS_ENV):
        AnnIndex.build(data[:200], "flat", device="cpu")
    monkeypatch.delenv(ann.THREADS_ENV)
    assert AnnIndex.build(data[:200], "flat", device="cpu").threads is None


def test_clustered_embeddings_are_normalised_and_seeded():
    a = clustered_embeddings(300, 16, n_centres=10, seed=5)
    assert a.dtype == np.float32 and a.shape == (300, 16)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(a, clustered_embeddings(300, 16, n_centres=10, seed=5))


def test_benchmark_smoke():
    from benchmarks import ann as ann_bench

    rows = ann_bench.benchmark_ann(
        [600], dim=16, kinds=["flat", ("hnsw", {"M": 8})], n_queries=12, k=5,
        sweep={"hnsw": {"efSearch": [8, 32]}}, progress=False,
    )
    assert [(r["kind"], r["params"].get("efSearch")) for r in rows] == [("flat", None), ("hnsw", 8), ("hnsw", 32)]
    assert rows[0]["recall_at_k"] == 1.0 and rows[0]["bytes_per_vector"] == 64
    assert all(r["p50_ms"] > 0 and r["batch_qps"] > 0 for r in rows)
    table = ann_bench.format_benchmark_table(rows)
    assert table.count("\n") == 2 + len(rows) and "recall@5" in table


# -- ivfpq -------------------------------------------------------------------------------------

def test_ivfpq_codes_then_exact_refine(clustered_5k, tmp_path):
    x, q, exact = clustered_5k
    index = AnnIndex.build(x, "ivfpq", device="cpu", m=8)
    assert index.params == {"nlist": index.params["nlist"], "nprobe": 32, "m": 8, "nbits": 8, "refine": 8}
    assert index.memory_bytes() < len(x) * (8 + 8) + index.params["nlist"] * 64 * 4 + 1  # codes + ids + centroids
    codes_s, codes_ids = index.search(q, 10)  # no vectors attached: answers from the codes
    index.attach_vectors(x)
    s, ids = index.search(q, 10)
    assert recall_at_k(ids, exact, 10) > recall_at_k(codes_ids, exact, 10)
    assert recall_at_k(ids, exact, 10) >= 0.9
    # re-scored: every returned score is the exact inner product, best first
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)
    assert (np.diff(s, axis=1) <= 1e-6).all()
    _, wide = index.search(q, 10, nprobe=index.params["nlist"], refine=len(x))  # every cell, every code
    assert recall_at_k(wide, exact, 10) == 1.0
    # a memmap works as the vectors, and files round-trip (vectors are not part of them)
    np.asarray(x, np.float32).tofile(tmp_path / "v.f32")
    mm = np.memmap(tmp_path / "v.f32", np.float32, mode="r", shape=x.shape)
    loaded = AnnIndex.load(index.save(tmp_path / "ann"))
    assert loaded.kind == "ivfpq" and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(q, 10)[1], codes_ids)
    np.testing.assert_array_equal(loaded.attach_vectors(mm).search(q, 10)[1], ids)


def test_ivfpq_trained_on_a_sample_then_added_in_shards(clustered_5k):
    x, q, exact = clustered_5k
    index = AnnIndex.build(x[:2000], "ivfpq", device="cpu", n_total=len(x), add=False, m=8)
    assert len(index) == 0 and index.params["nlist"] == ann._default_nlist(len(x))
    for i in range(0, len(x), 1000):
        np.testing.assert_array_equal(index.add(x[i : i + 1000]), np.arange(i, i + 1000))
    _, ids = index.attach_vectors(x).search(q, 10)
    assert recall_at_k(ids, exact, 10) >= 0.9


def test_ivfpq_refuses_what_it_cannot_train(data):
    with pytest.raises(ValueError, match="at least 256 vectors"):
        AnnIndex.build(data[:100], "ivfpq")
    with pytest.raises(ValueError, match="must divide"):
        AnnIndex.build(data, "ivfpq", m=5)
    index = AnnIndex.build(data, "ivfpq", m=4, nlist=4)
    with pytest.raises(ValueError, match=r"vectors must be \(N, 32\)"):
        index.attach_vectors(np.zeros((3, 7), np.float32))
