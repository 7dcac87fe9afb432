"""Ranking metrics: hand-worked cases (ties included), Monte-Carlo check of the expected-ties
formula, reference rows (type oracle, caption-string ceiling) and UCM val reference values."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from envlf.evaluation import metrics as M

# 3 images x 6 captions, two captions per image; worked by hand below.
SIMS = np.array(
    [
        [3, 1, 3, 0, 2, 2],  # own 0,1: s*=3, a=0, t=2, r=1
        [1, 1, 1, 1, 1, 1],  # own 2,3: s*=1, a=0, t=6, r=2
        [0, 0, 0, 5, 4, 4],  # own 4,5: s*=4, a=1, t=2, r=2
    ],
    dtype=float,
)
T2I = np.array([0, 0, 1, 1, 2, 2])


def test_tie_stats_by_hand():
    (ai, ti, ri), (at, tt, rt) = M.tie_stats(SIMS, T2I)
    assert ai.tolist() == [0, 0, 1] and ti.tolist() == [2, 6, 2] and ri.tolist() == [1, 2, 2]
    assert at.tolist() == [0, 0, 1, 1, 0, 0] and tt.tolist() == [1, 2, 1, 1, 1, 1] and rt.tolist() == [1] * 6


def test_recall_expected_by_hand():
    r = M.recall_at_k(SIMS, T2I, ks=(1, 2), ties="expected")
    # i2t R@1: row0 1 of 2 tied is own -> 1/2; row1 2 of 6 -> 1/3; row2 one better -> 0
    assert r["i2t_R@1"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)
    # i2t R@2: row0 1; row1 1 - C(4,2)/C(6,2) = 1 - 6/15; row2 n=1 of t=2, both own -> 1
    assert r["i2t_R@2"] == pytest.approx(100 * (1 + (1 - 6 / 15) + 1) / 3)
    # t2i R@1: cols 1, 1/2 (tie of 2), 0, 0, 1, 1; R@2: all hit
    assert r["t2i_R@1"] == pytest.approx(100 * 3.5 / 6)
    assert r["t2i_R@2"] == pytest.approx(100.0)
    recalls = [r[k] for k in ("i2t_R@1", "i2t_R@2", "t2i_R@1", "t2i_R@2")]
    assert r["rsum"] == pytest.approx(sum(recalls))
    assert r["mR"] == pytest.approx(np.mean(recalls))


def test_recall_pessimistic_and_optimistic_by_hand():
    p = M.recall_at_k(SIMS, T2I, ks=(1, 2), ties="pessimistic")
    # first own caption at rank a + (t - r) + 1: rows 2, 5, 2
    assert p["i2t_R@1"] == pytest.approx(0.0)
    assert p["i2t_R@2"] == pytest.approx(100 * 2 / 3)
    # own image at rank a + t: 1, 2, 2, 2, 1, 1
    assert p["t2i_R@1"] == pytest.approx(100 * 3 / 6)
    assert p["t2i_R@2"] == pytest.approx(100.0)
    o = M.recall_at_k(SIMS, T2I, ks=(1, 2), ties="optimistic")
    assert o["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert o["t2i_R@1"] == pytest.approx(100 * 4 / 6)
    e = M.recall_at_k(SIMS, T2I, ks=(1, 2))
    for key in e:
        assert p[key] <= e[key] + 1e-9 <= o[key] + 2e-9


def test_all_tied_text_to_image():
    sims = np.zeros((4, 4))  # every caption sees 4 tied images
    r = M.recall_at_k(sims, np.arange(4), ks=(1, 2, 3, 4))
    for k in (1, 2, 3, 4):
        assert r[f"t2i_R@{k}"] == pytest.approx(100 * k / 4)
        assert r[f"i2t_R@{k}"] == pytest.approx(100 * k / 4)
    p = M.recall_at_k(sims, np.arange(4), ks=(1, 4), ties="pessimistic")
    assert p["t2i_R@1"] == 0 and p["t2i_R@4"] == 100


def test_perfect_and_default_keys():
    rng = np.random.default_rng(0)
    t2i = np.repeat(np.arange(5), 3)
    sims = rng.random((5, 15)) * 0.1
    sims[t2i, np.arange(15)] += 1.0
    r = M.recall_at_k(sims, t2i)
    assert set(r) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "mR"}
    assert r["mR"] == pytest.approx(100.0) and r["rsum"] == pytest.approx(600.0)


def test_image_without_captions_is_only_a_distractor():
    sims = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # image 2 has no caption, beats all
    r = M.recall_at_k(sims, np.array([0, 1]), ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(100.0)  # averaged over images 0, 1 only
    assert r["t2i_R@1"] == pytest.approx(0.0) and r["t2i_R@2"] == pytest.approx(100.0)
    i2t, _ = M.hit_probabilities(sims, np.array([0, 1]), ks=(1,))
    assert np.isnan(i2t[2, 0])


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="NaN"):
        M.recall_at_k(np.array([[np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="one entry per caption"):
        M.recall_at_k(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        M.recall_at_k(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="ties"):
        M.recall_at_k(np.zeros((2, 2)), np.array([0, 1]), ties="random")


def test_infinite_scores_rank_like_numbers():
    # a re-ranked matrix may mark "not re-scored" entries with -inf
    sims = np.array([[5.0, -np.inf], [-np.inf, -np.inf]])
    r = M.recall_at_k(sims, np.array([0, 1]), ks=(1,))
    assert r["i2t_R@1"] == pytest.approx(50 * (1 + 0.5))  # image 1: its caption tied with 1 other
    assert r["t2i_R@1"] == pytest.approx(50 * (1 + 0.5))


def _noisy_hits(sims, t2i, ks, rng, trials):
    """Monte-Carlo: break ties at random (noise < half the integer step), count hits."""
    acc_i = acc_t = 0
    for _ in range(trials):
        noisy = sims + rng.random(sims.shape) * 0.5
        hi, ht = M.hit_probabilities(noisy, t2i, ks, ties="pessimistic")  # no ties left
        acc_i, acc_t = acc_i + hi, acc_t + ht
    return acc_i / trials, acc_t / trials


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_ties_match_monte_carlo(seed):
    rng = np.random.default_rng(seed)
    n_img, per = 6, rng.integers(1, 4)
    t2i = np.repeat(np.arange(n_img), per)
    t2i = np.concatenate([t2i, rng.integers(0, n_img, 3)])  # some images with extra captions
    sims = rng.integers(0, 3, (n_img, t2i.size)).astype(float)  # values 0..2: many ties
    ks = (1, 2, 3, 5)
    ei, et = M.hit_probabilities(sims, t2i, ks, ties="expected")
    trials = 3000
    mi, mt = _noisy_hits(sims, t2i, ks, rng, trials)
    # per-query std of a mean of Bernoulli trials <= 0.5/sqrt(3000) ~ 0.009
    np.testing.assert_allclose(ei, mi, atol=0.05)
    np.testing.assert_allclose(et, mt, atol=0.05)
    pi, pt = M.hit_probabilities(sims, t2i, ks, ties="pessimistic")
    assert (pi <= ei + 1e-12).all() and (pt <= et + 1e-12).all()


def test_expected_i2t_matches_exact_enumeration():
    # one image row, t = 5 tied captions of which r = 2 own, a = 1 better: enumerate all orders
    row = np.array([[9, 4, 4, 4, 4, 4, 0]], dtype=float)
    own = {2, 5}
    txt = np.array([0 if j in own else 1 for j in range(7)])
    sims = np.vstack([row, np.zeros((1, 7))])
    tied = [1, 2, 3, 4, 5]
    for k in (1, 2, 3, 4):
        hits = 0
        perms = list(itertools.permutations(tied))
        for perm in perms:
            ranking = [0, *perm, 6]
            hits += any(j in own for j in ranking[:k])
        i2t, _ = M.hit_probabilities(sims, txt, ks=(k,))
        assert i2t[0, 0] == pytest.approx(hits / len(perms))


def test_full_size_2000_by_10000_matches_a_plain_count():
    """The benchmark's size (2,000 images x 10,000 captions), distinct scores (no ties): the
    recalls equal a plain argsort count. (How fast it runs is for the benchmark, not a test.)"""
    rng = np.random.default_rng(0)
    sims = rng.permutation(2000 * 10000).reshape(2000, 10000).astype(np.float64)
    txt2img = np.repeat(np.arange(2000), 5)
    r = M.recall_at_k(sims, txt2img, ks=(1, 5, 10))
    t2i_rank = (sims > sims[txt2img, np.arange(10000)][None, :]).sum(0)  # images above the right one
    own = sims.reshape(2000, 2000, 5)[np.arange(2000), np.arange(2000)].max(1)  # each image's best caption
    i2t_rank = (sims > own[:, None]).sum(1)
    for k in (1, 5, 10):
        assert r[f"t2i_R@{k}"] == pytest.approx(100 * (t2i_rank < k).mean())
        assert r[f"i2t_R@{k}"] == pytest.approx(100 * (i2t_rank < k).mean())


# -- reference rows ------------------------------------------------------------------------------

def test_normalize_caption():
    assert M.normalize_caption("There is a piece of farmland .") == "there is a piece of farmland"
    assert M.normalize_caption("  A two-lane  road,  trees!") == "a two lane road trees"
    assert M.normalize_caption("formland") != M.normalize_caption("farmland")


def test_type_oracle_by_hand():
    labels = ["a", "a", "b", "b"]
    t2i = np.array([0, 1, 2, 3])
    s = M.type_oracle_scores(labels, t2i)
    assert s.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    r = M.recall_at_k(s, t2i, ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(50.0) and r["t2i_R@1"] == pytest.approx(50.0)
    assert r["i2t_R@2"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="label"):
        M.type_oracle_scores(["a", None], t2i[:2])


# image 0: "a","a","b"; image 1: "a","c"; image 2: "c","d"  (g: a=3, b=1, c=2, d=1)
CAPS = ["a", "A .", "b", "a", "c", "c", "d"]
CAP_T2I = np.array([0, 0, 0, 1, 1, 2, 2])


def test_ceiling_scores_by_hand():
    s = M.ceiling_scores(CAPS, CAP_T2I)
    assert s.shape == (3, 7)
    assert s[0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # owns "a" and "b"
    assert s[1].tolist() == [1, 1, 0, 1, 1, 1, 0]
    r = M.recall_at_k(s, CAP_T2I, ks=(1,))
    # i2t: row0 3 own of 4 tied; row1 2 of 5; row2 2 of 3
    assert r["i2t_R@1"] == pytest.approx(100 * (3 / 4 + 2 / 5 + 2 / 3) / 3)
    # t2i: "a" 3 copies at 1/2, "b" 1, "c" 2 copies at 1/2, "d" 1
    assert r["t2i_R@1"] == pytest.approx(100 * 4.5 / 7)


def test_ceiling_bound_by_hand():
    b = M.ceiling_bound(CAPS, CAP_T2I, ks=(1, 2))
    # i2t R@1: image0 "b" alone -> 1; image1 best of a (1/3), c (1/2); image2 "d" alone -> 1
    assert b["i2t_R@1"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert b["i2t_R@2"] == pytest.approx(100.0)
    # t2i R@1: best image per string: a -> image0 (2 copies), b 1, c 1, d 1 => 5 of 7
    assert b["t2i_R@1"] == pytest.approx(100 * 5 / 7)
    assert b["t2i_R@2"] == pytest.approx(100.0)
    p = M.ceiling_bound(CAPS, CAP_T2I, ks=(1,), ties="pessimistic")
    assert p["i2t_R@1"] == pytest.approx(100 * 2 / 3)  # image1: no string of its own alone
    assert p["t2i_R@1"] == pytest.approx(100 * 5 / 7)


def _random_corpus(rng, n_img=5, vocab=4, per=3):
    caps = [f"s{int(v)}" for v in rng.integers(0, vocab, n_img * per)]
    return caps, np.repeat(np.arange(n_img), per)


@pytest.mark.parametrize("seed", range(4))
def test_ceiling_bound_is_reached_and_never_beaten(seed):
    rng = np.random.default_rng(seed)
    caps, t2i = _random_corpus(rng)
    n_img, ks = 5, (1, 2, 3)
    sid = np.unique(caps, return_inverse=True)[1]
    mult = Counter(zip(sid.tolist(), t2i.tolist()))
    g = np.bincount(sid)
    for ties in ("expected", "pessimistic"):
        bound = M.ceiling_bound(caps, t2i, ks=ks, ties=ties)
        # t2i reached by score(i, c) = n(string(c), i) + a small offset that orders images strictly
        t_opt = np.array([[mult[(s, i)] + i / 10 for s in sid] for i in range(n_img)], dtype=float)
        r = M.recall_at_k(t_opt, t2i, ks=ks, ties=ties)
        for k in ks:
            assert r[f"t2i_R@{k}"] == pytest.approx(bound[f"t2i_R@{k}"])
        # i2t reached, for each k, by putting each image's best own string alone on top
        for k in ks:
            i_opt = np.zeros((n_img, len(caps)))
            for i in range(n_img):
                own = {s for (s, j) in mult if j == i}
                p = {s: M.hit_probability([0], [g[s]], [mult[(s, i)]], k, ties)[0] for s in own}
                i_opt[i, sid == max(own, key=p.get)] = 1.0
            r = M.recall_at_k(i_opt, t2i, ks=(k,), ties=ties)
            assert r[f"i2t_R@{k}"] == pytest.approx(bound[f"i2t_R@{k}"])
        # random string-consistent scorers never beat it
        for _ in range(200):
            table = rng.integers(0, 3, (n_img, sid.max() + 1)).astype(float)
            r = M.recall_at_k(table[:, sid], t2i, ks=ks, ties=ties)
            for key in r:
                if key.endswith(tuple(f"@{k}" for k in ks)):
                    assert r[key] <= bound[key] + 1e-9, key


def test_format_table():
    rows = {"model": M.recall_at_k(SIMS, T2I), "empty": {}}
    text = M.format_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| method") and "mR" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    assert len(lines) == 4 and "–" in lines[3]
    assert len({len(x) for x in lines}) == 1  # aligned columns


# -- real data -------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_ucm_val_reference_rows(ucm_dir):
    from envlf.data.datasets import read_karpathy

    val = read_karpathy(ucm_dir).split("val")
    t2i, caps = val.txt2img(), val.captions()
    assert len(val) == 210 and len(caps) == 1050
    oracle = M.recall_at_k(M.type_oracle_scores(val.labels(), t2i), t2i)
    ceiling = M.recall_at_k(M.ceiling_scores(caps, t2i, len(val)), t2i)
    bound = M.ceiling_bound(caps, t2i, len(val))
    assert oracle["mR"] == pytest.approx(46.6, abs=0.1)
    assert ceiling["mR"] == pytest.approx(73.1, abs=0.1)
    assert bound["mR"] == pytest.approx(78.06, abs=0.01)
    assert bound["mR"] >= ceiling["mR"]
    assert len({M.normalize_caption(c) for c in caps}) == 391
    rows = M.reference_rows(caps, t2i, len(val), val.labels(), ties="pessimistic")
    assert list(rows) == ["type oracle", "string oracle", "string ceiling"]
    assert rows["string oracle"]["mR"] == pytest.approx(41.97, abs=0.01)
    assert rows["string ceiling"]["mR"] == pytest.approx(72.27, abs=0.01)
    assert rows["type oracle"]["mR"] == pytest.approx(15.63, abs=0.01)
    assert "string ceiling" in M.format_table(rows)
