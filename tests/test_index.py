"""Gallery index and two-stage search on a tiny model."""


import numpy as np
import pytest
import torch

from envlf.data.datasets import load_dataset
from envlf.search.index import GalleryIndex, IndexLoadError, IndexMismatchError
from envlf.search.cli import main as index_main
from envlf.model.core import create_model
from envlf.search.engine import QueryError, SearchEngine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture
def built(model, tiny_data, tmp_path):
    ds = load_dataset(tiny_data)
    idx = GalleryIndex.build(model, ds.split("train"), tmp_path / "idx", workers=0, progress=False)
    return idx, ds


def test_exact_itc_search_equals_brute_force(model, built):
    idx, _ = built
    engine = SearchEngine(model, idx)
    q = "a red square on the left"
    res = engine.text_to_image(q, k=len(idx), rerank=False)
    with torch.no_grad():
        qe = model.encode_text([q]).numpy()[0]
    scores = np.asarray(idx.embeddings) @ qe
    got = [h.row for h in res.items]
    assert np.allclose([h.itc for h in res.items], scores[got], atol=1e-5)
    assert np.all(np.diff([h.itc for h in res.items]) <= 1e-6)  # best first
    assert sorted(got) == list(range(len(idx)))
    assert [h.itc_rank for h in res.items] == list(range(1, len(idx) + 1))


def test_rerank_orders_top_k_by_itm(model, built):
    idx, _ = built
    engine = SearchEngine(model, idx)
    res = engine.text_to_image("a blue square on the right", k=6, rerank_k=4)
    assert res.reranked == 4 and len(res.items) == 6
    head = res.items[:4]
    assert all(h.itm is not None for h in head) and all(h.itm is None for h in res.items[4:])
    blend, scale = model.config.fusion.rerank_blend, float(model.temperature_scale().detach())
    final = [h.itm_margin + blend * scale * h.itc for h in head]  # written out: what rerank_score means
    assert final == sorted(final, reverse=True)
    assert {h.itc_rank for h in head} == {1, 2, 3, 4}  # re-ranking reorders the ITC top 4 only
    assert [h.rank for h in res.items] == list(range(1, 7))


def test_search_shows_the_order_evaluate_scores(model, built):
    """The agreement the README's figures rest on: for the same model and query, the re-ranked
    order text->image search returns is the order envlf.evaluation.evaluate scores (both rank by
    envlf.search.rerank.rerank_score over the same ITC top k)."""
    from envlf.evaluation import evaluate as E

    idx, ds = built
    split = ds.split("train")
    engine = SearchEngine(model, idx)
    enc = E.encode_dataset(model, split, batch_size=8, workers=0, features=None, progress=False)
    k = 5
    itm = E.itm_topk(model, enc, k, progress=False)
    _, t2i = E.reranked_matrices(model, enc, itm, k)  # (N images, M captions)
    first_caption = {s: int(np.flatnonzero(enc.caption_to_string == u)[0]) for u, s in enumerate(enc.strings)}
    ids = [r.image_id for r in split.records]
    checked = 0
    for string, m in list(first_caption.items())[:6]:
        col = t2i[:, m]
        res = engine.text_to_image(string, k=len(idx), rerank_k=k)
        assert res.reranked == k
        shown = [h.image_id for h in res.items]
        scored = [ids[i] for i in np.argsort(-col, kind="stable")]
        # near-ties (random tiny weights) may swap through float noise between a batch of one
        # and a batch of many: where the two orders differ, evaluate's scores must be equal
        for a, b in zip(shown, scored):
            if a != b:
                assert col[ids.index(a)] == pytest.approx(col[ids.index(b)], abs=1e-4)
        assert set(shown[:k]) == set(scored[:k])
        checked += 1
    assert checked == 6


def test_saved_index_reloads_to_identical_results(model, built):
    idx, _ = built
    a = SearchEngine(model, idx).text_to_image("green block", k=5)
    b = SearchEngine(model, GalleryIndex.load(idx.dir, model)).text_to_image("green block", k=5)
    assert a.as_dicts() == b.as_dicts()
    assert a.index_fingerprint == b.index_fingerprint


def test_index_of_another_model_is_refused(built):
    idx, _ = built
    other = create_model("tiny")
    with pytest.raises(IndexMismatchError, match="built with model"):
        GalleryIndex.load(idx.dir, other)
    with pytest.raises(IndexMismatchError):
        SearchEngine(other, idx)


def test_damaged_index_is_refused(built, tmp_path):
    idx, _ = built
    (idx.dir / "manifest.json").write_text("{")
    with pytest.raises(IndexLoadError, match="damaged index manifest"):
        GalleryIndex.load(idx.dir)
    with pytest.raises(IndexLoadError, match="not an EnVLF index"):
        GalleryIndex.load(tmp_path)


def test_truncated_embeddings_are_refused(model, built):
    idx, _ = built
    p = idx.dir / "embeddings.f32"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(IndexLoadError, match="shorter than the manifest"):
        GalleryIndex.load(idx.dir, model)


def test_adding_images_finds_them(model, built):
    idx, ds = built
    n0 = len(idx)
    fp0 = idx.fingerprint
    idx2 = idx.add(model, ds.split("val"), progress=False, workers=0)
    assert len(idx2) == n0 + len(ds.split("val"))
    assert idx2.fingerprint != fp0
    engine = SearchEngine(model, idx2)
    new_id = ds.split("val").records[0].image_id
    # the added tile is its own nearest neighbour by ITC (identical embedding)
    res = engine.image_to_text(image_id=new_id, k=3)
    assert res.items
    row = idx2.row_of(new_id)
    emb = np.asarray(idx2.embeddings[row])
    scores, ids = idx2.ann.search(emb[None], 1)
    assert ids[0, 0] == row and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # adding the same images again is a no-op
    assert len(idx2.add(model, ds.split("val"), progress=False, workers=0)) == len(idx2)


def test_caption_index_deduplicates(model, tiny_data, tmp_path):
    corpus = tmp_path / "extra.txt"
    corpus.write_text("a red square on the left\nA red square on the left .\nsomething new\n")
    idx = GalleryIndex.build(model, load_dataset(tiny_data), tmp_path / "idx", caption_files=[corpus], workers=0,
                             progress=False)
    c = idx.corpus
    keys = [s.lower().rstrip(" .") for s in c.strings]
    assert len(keys) == len(set(keys))
    i = keys.index("a red square on the left")
    gallery = sum(cap.lower().rstrip(" .") == "a red square on the left" for r in load_dataset(tiny_data).records
                  for cap in r.captions)
    assert c.counts[i] == gallery + 2 and c.n_images[i] == gallery
    assert "extra.txt" in c.sources[i]
    j = keys.index("something new")
    assert c.counts[j] == 1 and c.n_images[j] == 0 and c.image_ids[j] == []
    res = SearchEngine(model, idx).image_to_text(image_id=load_dataset(tiny_data).records[0].image_id, k=50)
    texts = [h.text for h in res.items]
    assert len(texts) == len(set(texts)) == len(c.strings)


def test_tokens_recomputed_when_not_stored(model, tiny_data, tmp_path):
    ds = load_dataset(tiny_data).split("train")
    a = GalleryIndex.build(model, ds, tmp_path / "a", store_tokens="yes", workers=0, progress=False)
    b = GalleryIndex.build(model, ds, tmp_path / "b", store_tokens="no", workers=0, progress=False)
    assert b.tokens is None and not (tmp_path / "b" / "tokens.f16").exists()
    ra = SearchEngine(model, a).text_to_image("white block", k=5, rerank_k=5)
    rb = SearchEngine(model, b).text_to_image("white block", k=5, rerank_k=5)
    # same candidates, same fusion scores up to the float16 storage of the tokens
    ia, ib = {h.image_id: h.itm for h in ra.items}, {h.image_id: h.itm for h in rb.items}
    assert set(ia) == set(ib)
    assert all(abs(ia[i] - ib[i]) < 2e-3 for i in ia)


def test_bad_queries_get_clear_messages(model, built):
    engine = SearchEngine(model, built[0])
    for q in ("", "   \n\t", None):
        with pytest.raises(QueryError, match="empty"):
            engine.text_to_image(q)
    with pytest.raises(QueryError, match="10,000 characters"):
        engine.text_to_image("x" * 10_000)
    res = engine.text_to_image("red\x00 square\u200f \U0001F6E9")  # control chars dropped, emoji fine
    assert "\x00" not in res.query and res.items
    with pytest.raises(KeyError, match="no image"):
        engine.image_to_text(image_id="../../etc/passwd")


def test_image_to_image_excludes_the_query(model, built):
    idx, ds = built
    engine = SearchEngine(model, idx)
    qid = ds.split("train").records[0].image_id
    res = engine.image_to_image(image_id=qid, k=4)
    assert len(res.items) == 4 and qid not in [h.image_id for h in res.items]


def test_cli_build_info_search(model, tiny_data, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert index_main(["build", "--checkpoint", str(ckpt), "--source", str(tiny_data), "--out",
                       str(tmp_path / "idx"), "--workers", "0"]) == 0
    assert index_main(["info", "--index", str(tmp_path / "idx")]) == 0
    info = capsys.readouterr().out
    assert '"images": 16' in info
    assert index_main(["search", "--index", str(tmp_path / "idx"), "--checkpoint", str(ckpt), "--text",
                       "red square", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("itc=") == 3 and "timings" in out
    # an index of another model is refused with a one-line error and exit code 2
    other = create_model("tiny").save_pretrained(tmp_path / "other")
    assert index_main(["search", "--index", str(tmp_path / "idx"), "--checkpoint", str(other), "--text", "x"]) == 2
    assert "built with model" in capsys.readouterr().err


def test_build_from_cached_trunk_features_equals_build_from_images(model, tiny_data, tmp_path):
    ds = load_dataset(tiny_data).split("train")
    from envlf.data.features import compute_trunk_features

    feats = compute_trunk_features(model, ds, workers=0, progress=False)
    a = GalleryIndex.build(model, ds, tmp_path / "a", workers=0, progress=False)
    b = GalleryIndex.build(model, ds, tmp_path / "b", workers=0, progress=False, trunk_features=feats)
    assert a.metadata["image_id"].tolist() == b.metadata["image_id"].tolist()
    # features are cached in float16: embeddings agree to that precision
    assert np.allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=5e-3)


def test_rebuild_for_another_model_keeps_gallery_and_corpus(model, tiny_data, tmp_path):
    corpus = tmp_path / "extra.txt"
    corpus.write_text("something new\nsomething new\na red square on the left\n")
    idx = GalleryIndex.build(model, load_dataset(tiny_data), tmp_path / "a", caption_files=[corpus], workers=0,
                             progress=False)
    other = create_model("tiny").eval()
    new = idx.rebuild(other, tmp_path / "b", workers=0, progress=False)
    assert new.model_fingerprint == other.fingerprint() != idx.model_fingerprint
    assert new.metadata["image_id"].tolist() == idx.metadata["image_id"].tolist()
    assert new.metadata["captions"].map(list).tolist() == idx.metadata["captions"].map(list).tolist()
    assert new.corpus.strings == idx.corpus.strings
    assert new.corpus.counts.tolist() == idx.corpus.counts.tolist()
    assert new.corpus.n_images.tolist() == idx.corpus.n_images.tolist()
    with pytest.raises(ValueError, match="new directory"):
        idx.rebuild(other, tmp_path / "a")


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_an_add_that_died_before_its_commit_never_shows_its_rows(model, tiny_data, tmp_path, kind):
    """An add saves the ANN files before the manifest (the commit point): killed in between, the
    ANN holds rows the manifest does not. Searches must not return them (they have no metadata)."""
    from envlf.search.ann import AnnIndex

    ds = load_dataset(tiny_data)
    idx = GalleryIndex.build(model, ds.split("train"), tmp_path / "idx", workers=0, progress=False)
    n = len(idx)
    e = np.asarray(idx.embeddings)
    if kind == "ivfpq":  # an archive-sized kind over the same rows: 256 vectors to train on
        tiled = np.concatenate([e] * (256 // n + 1))
        ann = AnnIndex.build(tiled[:256], "ivfpq", m=4, nlist=1, add=False)
        ann.add(e)
    else:
        ann = AnnIndex.build(e, "flat", device="cpu")
    ann.add(-e)  # the uncommitted rows (2n of them): the manifest does not hold them
    ann.add(e)
    ann.save(tmp_path / "idx" / "ann")
    idx = GalleryIndex.load(tmp_path / "idx", model)
    assert len(idx) == n and len(idx.ann) == 3 * n
    engine = SearchEngine(model, idx)
    res = engine.text_to_image("a red square", k=3 * n)
    assert sorted(h.row for h in res.items) == list(range(n))
    res = engine.image_to_image(image_id=idx.metadata["image_id"][0], k=3 * n)
    assert all(h.row < n for h in res.items)


def _shard_job(model, ds, out, direct, shard_size=5):
    """A finished extraction job of `ds` whose embeddings and tokens are `direct`'s (by image id),
    written by the job's own writer (no Ray needed)."""
    from envlf.search.extract import load_records, make_plan, write_shard

    plan = make_plan(out, ds, model.fingerprint(), model.config.name, shard_size=shard_size, tokens=True,
                     encoder="torch", source_spec="test")
    frame = load_records(out, plan)
    for i in range(plan["n_shards"]):
        rows = frame[frame["shard"] == i]
        at = [direct.row_of(iid) for iid in rows["image_id"]]
        write_shard(out, i, rows, np.asarray(direct.embeddings)[at], np.asarray(direct.tokens)[at])
    return plan


def test_an_index_from_shards_streams_columns_and_an_add_skips_what_it_holds(model, tiny_data, tmp_path):
    """build/add_shards: the embeddings, tokens, metadata and caption corpus of a direct build,
    columns streamed from the shards; adding shards to an index that holds some of their images
    appends only the others."""
    ds = load_dataset(tiny_data)
    direct = GalleryIndex.build(model, ds, tmp_path / "direct", workers=0, progress=False)
    _shard_job(model, ds, tmp_path / "job", direct)
    sharded = GalleryIndex.build(model, None, tmp_path / "sharded", shards=tmp_path / "job", progress=False)
    cols = ["row", "image_id", "path", "split", "label", "source", "geo"]
    assert sharded.metadata[cols].equals(direct.metadata[cols])
    assert [list(c) for c in sharded.metadata["captions"]] == [list(c) for c in direct.metadata["captions"]]
    assert np.array_equal(np.asarray(sharded.embeddings), np.asarray(direct.embeddings))
    assert np.array_equal(np.asarray(sharded.tokens), np.asarray(direct.tokens))
    assert sharded.corpus.strings == direct.corpus.strings and sharded.corpus.image_ids == direct.corpus.image_ids

    half = GalleryIndex.build(model, ds.split("train"), tmp_path / "half", workers=0, progress=False)
    n_half = len(half)
    grown = half.add_shards(model, tmp_path / "job", progress=False)
    event = grown.manifest["history"][-1]
    assert event["images_added"] == len(ds) - n_half and event["images_skipped"] == n_half > 0
    assert sorted(grown.metadata["image_id"]) == sorted(ds.image_ids())
    assert grown.metadata["row"].tolist() == list(range(len(ds)))
    for iid in ds.image_ids():
        assert np.allclose(grown.embeddings[grown.row_of(iid)], direct.embeddings[direct.row_of(iid)], atol=1e-6)
    # shards without tokens cannot join an index that stores them: one line, the index unchanged
    from envlf.search.extract import load_records, make_plan, write_shard

    plan = make_plan(tmp_path / "no-tok", ds, model.fingerprint(), model.config.name, shard_size=50, tokens=False,
                     encoder="torch", source_spec="test")
    write_shard(tmp_path / "no-tok", 0, load_records(tmp_path / "no-tok", plan), np.asarray(direct.embeddings))
    with pytest.raises(ValueError, match="hold no patch tokens"):
        grown.add_shards(model, tmp_path / "no-tok", progress=False)
    assert len(GalleryIndex.load(tmp_path / "half")) == len(ds)


def test_an_index_from_before_the_place_columns_loads_its_map(model, tiny_data, tmp_path):
    """metadata.parquet without the lon/lat/... columns (an index made before them): loading
    derives them from the geo JSON, so the map and the box filter work as before."""
    import pandas as pd

    from envlf.data.geotiff import ChipOptions, chip_scenes, make_demo_scenes
    from envlf.search.index import GEO_COLUMNS

    make_demo_scenes(tiny_data, tmp_path / "scenes", n_scenes=2, grid=2)
    ds = chip_scenes(tmp_path / "scenes", tmp_path / "chips", ChipOptions(size=48))
    idx = GalleryIndex.build(model, ds, tmp_path / "geo", workers=0, progress=False)
    new = idx.geo_frame()
    assert len(new) == len(ds) and new["lon"].notna().all()
    box = [new["west"].min(), new["south"].min(), new["lon"].median(), new["north"].max()]
    meta = pd.read_parquet(tmp_path / "geo" / "metadata.parquet")
    meta.drop(columns=list(GEO_COLUMNS)).to_parquet(tmp_path / "geo" / "metadata.parquet", index=False)
    old = GalleryIndex.load(tmp_path / "geo")
    pd.testing.assert_frame_equal(old.geo_frame(), new, check_dtype=False)
    assert old.rows_in_bbox(box).tolist() == idx.rows_in_bbox(box).tolist() and len(idx.rows_in_bbox(box))
