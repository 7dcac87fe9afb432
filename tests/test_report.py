"""What the model confuses: per-class R@1 and the worst queries (envlf evaluate --report)."""

import numpy as np
import pytest
from PIL import Image

from envlf.data.datasets import load_dataset
from envlf.evaluation import metrics as M
from envlf.evaluation import report as R


def test_expected_ranks_by_hand():
    # 3 images, 4 captions: captions 0,1 -> image 0, 2 -> image 1, 3 -> image 2
    txt2img = np.array([0, 0, 1, 2])
    s = np.array([[0.9, 0.1, 0.5, 0.5],
                  [0.2, 0.8, 0.9, 0.5],
                  [0.1, 0.7, 0.3, 0.5]])
    t2i, i2t = R.expected_ranks(s, s, txt2img)
    # caption 1: image 1 (0.8) and image 2 (0.7) above its own (0.1): rank 3; caption 3: a
    # three-way tie, expected rank 2
    np.testing.assert_allclose(t2i, [1, 3, 1, 2])
    # images 0 and 1: their own caption scores highest; image 2: caption 1 (0.7) above its own (0.5)
    np.testing.assert_allclose(i2t, [1, 1, 2])
    # image 0's two own captions tie with caption 2 at its best score: the first of the 2 own
    # among 3 tied comes at expected position (3 + 1) / (2 + 1)
    s[0] = [0.5, 0.5, 0.5, 0.1]
    _, i2t = R.expected_ranks(s, s, txt2img)
    assert i2t[0] == pytest.approx(4 / 3)


def test_per_class_of_perfect_scores_is_100_and_names_the_confusion(tiny_data):
    ds = load_dataset(tiny_data)
    t2i = ds.txt2img()
    perfect = np.zeros((len(ds), len(t2i)), np.float32)
    perfect[t2i, np.arange(len(t2i))] = 1.0
    rows = R.per_class(ds, perfect, perfect)
    assert {r["class"] for r in rows} == set(ds.labels()) and all(r["t2i_R@1"] == 100 == r["i2t_R@1"] for r in rows)
    assert all(r["top1_other_class"] == "-" for r in rows)
    # every caption of the first class's images now finds an image of another class first
    labels = np.array(ds.labels())
    cls, other = labels[0], next(lab for lab in labels if lab != labels[0])
    wrong = perfect.copy()
    wrong[np.flatnonzero(labels == other)[0], labels[t2i] == cls] = 2.0
    row = next(r for r in R.per_class(ds, wrong, wrong) if r["class"] == cls)
    assert row["t2i_R@1"] == 0 and row["top1_other_class"].startswith(f"{other} (100%")
    # the headline's own recall agrees with the per-class rows, weighted by captions
    rows = R.per_class(ds, wrong, wrong)
    total = sum(r["t2i_R@1"] * r["captions"] for r in rows) / sum(r["captions"] for r in rows)
    assert total == pytest.approx(M.recall_at_k(wrong, t2i, ks=(1,))["t2i_R@1"])


def test_worst_queries_come_worst_first_once_per_string(tiny_data, tmp_path):
    ds = load_dataset(tiny_data)
    t2i = ds.txt2img()
    rng = np.random.default_rng(0)
    s = rng.standard_normal((len(ds), len(t2i))).astype(np.float32)
    worst = R.worst_queries(ds, s, n=5, top=3)
    ranks = [q["rank"] for q in worst]
    assert ranks == sorted(ranks, reverse=True) and len(worst) <= 5
    assert len({M.normalize_caption(q["caption"]) for q in worst}) == len(worst)
    assert all(len(q["top"]) == 3 for q in worst)
    all_ranks, _ = R.expected_ranks(s, s, t2i)
    assert ranks[0] == all_ranks.max()
    files = R.write_report(tmp_path / "rep", ds, s, s, "tiny val")
    assert [f.name for f in files] == ["per_class.md", "per_class.csv", "worst.html", "worst.png"]
    page = (tmp_path / "rep" / "worst.html").read_text()
    assert worst[0]["caption"].split()[0] in page and page.count("<img") == len(R.worst_queries(ds, s)) * 6
    with Image.open(tmp_path / "rep" / "worst.png") as im:
        assert im.width > 6 * R.THUMB and im.height > R.THUMB
