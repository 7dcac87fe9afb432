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
