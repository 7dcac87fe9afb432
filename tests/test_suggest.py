"""Label suggestions: the score on hand-made results, worked out by hand, and the API shape."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from envlf.search.engine import CaptionHit, ImageHit, SearchResult
from envlf.feedback.suggest import Suggestion, judged_pairs, rank_result, score_hit, suggest, suggest_queries


def img(rank, itc_rank, margin, image_id=None):
    return ImageHit(rank=rank, row=itc_rank - 1, image_id=image_id or f"img{itc_rank}", path=f"/x/{itc_rank}.png",
                    label="", captions=[], itc=1.0 - 0.01 * itc_rank, itc_rank=itc_rank,
                    itm=None if margin is None else 1 / (1 + math.exp(-margin)), itm_margin=margin)


def result(query, hits, reranked, direction="t2i"):
    return SearchResult(direction, query, hits, reranked, "m" * 16, "i" * 16)


def test_score_is_uncertainty_plus_rank_displacement():
    # R = 5 re-ranked: d = |itc_rank - rank| / 4, u = exp(-|margin|)
    s, u, d = score_hit(img(rank=1, itc_rank=5, margin=3.0), n_reranked=5)
    assert d == pytest.approx(1.0) and u == pytest.approx(math.exp(-3)) and s == pytest.approx(1 + math.exp(-3))
    s, u, d = score_hit(img(rank=2, itc_rank=2, margin=0.0), n_reranked=5)
    assert (s, u, d) == pytest.approx((1.0, 1.0, 0.0))
    assert score_hit(img(rank=6, itc_rank=6, margin=None), n_reranked=5) is None  # not re-ranked
    s, u, d = score_hit(img(rank=1, itc_rank=1, margin=-0.5), 1)
    assert d == 0.0 and u == pytest.approx(math.exp(-0.5))


def test_disagreement_ranks_first():
    # re-ranking moved img5 from ITC #5 to #1 with a confident margin (d = 1, u ~ 0.05);
    # the others agree (d = 0) and are confident (u <= 0.05)
    hits = [img(1, 5, 3.0), img(2, 1, 4.0), img(3, 2, -3.5), img(4, 3, -4.0), img(5, 4, -5.0),
            img(6, 6, None)]
    ranked = rank_result(result("two planes", hits, reranked=5))
    assert ranked[0].hit.image_id == "img5"
    assert "ITC #5 -> ITM #1" in ranked[0].reason and ranked[0].reason.startswith("stages disagree")
    assert all(s.hit.itm_margin is not None for s in ranked)  # the un-re-ranked hit is never suggested
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)


def test_margin_nearest_zero_ranks_first_when_stages_agree():
    hits = [img(1, 1, 2.5), img(2, 2, 0.1), img(3, 3, -0.2), img(4, 4, -3.0)]
    ranked = rank_result(result("a harbour", hits, reranked=4))
    assert [s.hit.image_id for s in ranked][:2] == ["img2", "img3"]
    assert ranked[0].reason.startswith("ITM unsure: margin +0.10 (P=0.52)")
    assert ranked[0].uncertainty == pytest.approx(math.exp(-0.1))


def test_suggest_across_queries_with_exclusions_and_caps():
    r1 = result("two planes", [img(1, 1, 4.0), img(2, 2, 0.05), img(3, 3, -4.0)], reranked=3)
    r2 = result("a harbour", [img(1, 2, 0.0, "h2"), img(2, 1, 0.3, "h1")], reranked=2)
    out = suggest(None, [r1, r2], n=3)
    assert all(isinstance(s, Suggestion) for s in out) and len(out) == 3
    query, hit, score, reason = out[0]  # unpacks as the 4-tuple the app expects
    assert (query, hit.image_id) == ("a harbour", "h2")  # u = 1 and d = 1: the largest possible score
    assert score == pytest.approx(2.0) and reason
    # already judged pairs are skipped; per_query spreads the picks
    out = suggest(None, [r1, r2], n=5, exclude=[("a harbour", "h2")], per_query=1)
    assert [(s.query, s.item_id) for s in out] == [("a harbour", "h1"), ("two planes", "img2")]
    assert suggest(None, [r1], n=0) == []
    with pytest.raises(ValueError, match="direction"):
        suggest(None, [r1], direction="i2i")


def test_caption_hits_and_judged_pairs_from_feedback():
    hits = [CaptionHit(1, 7, "a ship in a harbour", 1, 1, ["a"], 0.5, 2, 0.5, 0.0),
            CaptionHit(2, 3, "many planes", 1, 1, ["b"], 0.6, 1, 0.1, -2.0)]
    res = result("image:a", hits, reranked=2, direction="i2t")
    df = pd.DataFrame({"direction": ["i2t"], "query_text": [""], "query_image_id": ["a"],
                       "query_image_sha256": [""], "item_id": ["7"]})
    assert judged_pairs(df) == {("image:a", "7")}
    out = suggest(None, [res], n=2, direction="i2t", exclude=judged_pairs(df))
    assert [s.item_id for s in out] == ["3"] and out[0].direction == "i2t"


def test_suggest_searches_through_the_engine():
    class FakeEngine:
        def __init__(self):
            self.calls = []

        def text_to_image(self, text, k, rerank_k):
            self.calls.append(("t2i", text, k, rerank_k))
            return result(text, [img(1, 2, 0.2), img(2, 1, 1.0)], reranked=2)

        def image_to_text(self, image_id, k, rerank_k):
            self.calls.append(("i2t", image_id, k, rerank_k))
            return result(f"image:{image_id}", [CaptionHit(1, 0, "x", 1, 1, [], 0.1, 1, 0.5, 0.0)], 1, "i2t")

    eng = FakeEngine()
    out = suggest(eng, ["two planes"], n=1, k=10, rerank_k=16)
    assert eng.calls == [("t2i", "two planes", 16, 16)] and out[0].hit.image_id == "img2"
    out = suggest(eng, ["a"], n=1, direction="i2t")
    assert out[0].query == "image:a" and eng.calls[-1][0] == "i2t"


def test_query_blocks_pick_uncertain_queries_that_cover_new_images():
    """Worth = mean hit score over the block; a query whose top images repeat a taken one's
    is worth (1 - Jaccard) as much. Hand-worked: unsure A (margins 0: worth 1) first; B has the
    same images as A (overlap 1: value 0) although it is as unsure; C (confident, other images,
    worth exp(-3) ~ 0.05) comes before B."""
    a = result("planes on an apron", [img(1, 1, 0.0, "x1"), img(2, 2, 0.0, "x2")], reranked=2)
    b = result("planes beside an apron", [img(1, 1, 0.0, "x1"), img(2, 2, 0.0, "x2")], reranked=2)
    c = result("a harbour", [img(1, 1, 3.0, "h1"), img(2, 2, -3.0, "h2"), img(3, 3, None, "h3")], reranked=2)
    out = suggest_queries([a, b, c], n=5, depth=2)
    assert [(s.query, s.item_id) for s in out] == [
        ("planes on an apron", "x1"), ("planes on an apron", "x2"), ("a harbour", "h1"), ("a harbour", "h2"),
        ("planes beside an apron", "x1")]  # blocks in rank order; n cuts the last block
    assert out[0].reason.startswith("query block (worth 1.00)")
    # judged pairs are skipped, and a block with nothing left to judge is not offered
    out = suggest_queries([a, c], n=4, depth=2, exclude=[("planes on an apron", "x1"), ("planes on an apron", "x2")])
    assert [s.query for s in out] == ["a harbour", "a harbour"]
    assert suggest_queries([a], n=0) == []
