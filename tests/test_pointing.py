"""The pointing game, and how hard the demo world is for a scene-type-only model."""

import numpy as np
import pytest
import torch

from envlf.evaluation import pointing as P
from envlf.data.datasets import load_dataset
from envlf.evaluation.metrics import recall_at_k, type_oracle_scores
from envlf.model.core import create_model
from envlf.world import generate_world


def test_score_by_hand():
    target = np.zeros((8, 8), bool)
    target[2:4, 5:7] = True
    cam = np.zeros((8, 8))
    cam[3, 6] = 3.0  # peak inside the object
    cam[0, 0] = 1.0
    hit, energy = P._score(cam, target)
    assert hit and energy == pytest.approx(0.75)
    cam[0, 0] = 5.0  # now the peak is outside
    hit, energy = P._score(cam, target)
    assert not hit and energy == pytest.approx(3 / 8)
    assert P._score(np.zeros((8, 8)), target) == (False, 0.0)  # an empty map points nowhere


def test_grid_ceiling_by_hand():
    """An 8x8-px object centred in a 16-px cell is found on a 16x16 grid of a 256-px tile, but
    not on 8x8, where the peak of its 32-px cell (after upsampling) is that cell's centre."""
    target = np.zeros((256, 256), bool)
    target[36:44, 36:44] = True  # 16-px cell (2, 2) is 32:48; 32-px cell (1, 1) is 32:64
    assert P._grid_ceiling(target, 16) and not P._grid_ceiling(target, 8)
    big = np.zeros((256, 256), bool)
    big[64:192, 64:192] = True
    assert all(P._grid_ceiling(big, g) for g in (4, 8, 16))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), n=24, seed=3, workers=1, progress=False)


def test_pointing_game_runs_on_the_world(small_world):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ds = load_dataset(small_world).split("all")
    res = P.pointing_game(model, ds, max_images=4, captions_per_image=2, progress=False)
    assert res["images"] == 4 and res["phrases"] > 0 and res["captions"] > 0
    for unit in ("phrase", "query", "caption"):
        r = res[unit]
        for key in ("model", "centre", "random", "energy_in_mask", "uniform_energy", "grid_ceiling"):
            assert 0.0 <= r[key] <= 100.0
        # a random point hits with exactly the masks' share of the image, which is small
        assert r["random"] < 60
    assert res["query"]["random"] == res["phrase"]["random"]  # the same phrases, two maps each
    assert all(0 <= v["query_hit"] <= 100 for v in res["per_category"].values())
    text = P.format_pointing(res)
    assert "| phrase in its caption |" in text and "| phrase as the query |" in text and "4x4 grid" in text


def test_pointing_game_scores_the_maps_of_one_by_one_calls(small_world):
    """The game encodes each image once and batches its texts; its hits are those of
    attention_map called for each caption and each phrase alone."""
    from envlf.data.datasets import load_image
    from envlf.explain.gradcam import attention_map

    torch.manual_seed(1)
    model = create_model("tiny").eval()
    ds = load_dataset(small_world).split("all")
    res = P.pointing_game(model, ds, max_images=3, captions_per_image=2, progress=False)
    hits = {"phrase": [], "query": []}
    for r in [r for r in ds.records if r.meta.get("mask")][:3]:
        mask, image = P.load_mask(r), load_image(r.path)
        for sent in r.meta["sentences"][:2]:
            maps = attention_map(model, image, sent["raw"])
            for p in [p for p in sent["phrases"] if p["object_ids"]]:
                target = np.isin(mask, p["object_ids"])
                if not target.any():
                    continue
                alone = attention_map(model, image, sent["raw"][p["start"]:p["end"]].strip()).sentence_map
                hits["phrase"].append(P._score(P._resize(maps.span_map(p["start"], p["end"]), (256, 256)), target)[0])
                hits["query"].append(P._score(P._resize(alone, (256, 256)), target)[0])
    assert res["phrases"] == len(hits["phrase"]) > 0
    for unit, h in hits.items():
        assert res[unit]["model"] == pytest.approx(100.0 * np.mean(h))


def test_evaluate_refuses_a_grid_the_trunk_cannot_give_before_retrieval(tmp_path, small_world, monkeypatch, capsys):
    from envlf.evaluation import cli as C
    from envlf.evaluation import evaluate as E
    from envlf.model.config import get_config

    cfg = get_config("tiny")
    cfg.vision.trunk, cfg.vision.trunk_kind, cfg.vision.layers = "test_vit", "vit", 0
    cfg.vision.image_size, cfg.vision.width = 160, 64
    create_model(cfg, pretrained=False).save_pretrained(tmp_path / "vit")
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("retrieval ran before the grid was checked"))
    rc = C.main(["--checkpoint", str(tmp_path / "vit"), "--data", str(small_world), "--split", "test", "--pointing",
                 "--pointing-grid", "20"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: a ViT trunk") and "\n" not in err


def test_content_oracle_row_comes_from_the_cli_not_the_library(small_world, tiny_data, tmp_path):
    """evaluate() knows nothing of the demo world: the content-oracle reference row is added
    by `envlf evaluate` (envlf.evaluation.cli), and only on a world's split."""
    import json

    from envlf.evaluation import cli as C
    from envlf.evaluation import evaluate as E

    torch.manual_seed(0)
    create_model("tiny", pretrained=False).save_pretrained(tmp_path / "m")
    test = load_dataset(small_world).split("test")
    model = create_model("tiny", pretrained=False).eval()
    assert not [k for k in E.evaluate(model, test, rerank_k=0, progress=False)["rows"] if "content" in k]
    for data, split, expect in ((small_world, "test", True), (tiny_data, "val", False)):
        out = tmp_path / f"{split}.json"
        assert C.main(["--checkpoint", str(tmp_path / "m"), "--data", str(data), "--split", split,
                       "--rerank-k", "0", "--workers", "0", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert ("[ref] content oracle" in rows) is expect, list(rows)


def test_masks_load_beside_images(small_world):
    ds = load_dataset(small_world)
    rec = ds.records[0]
    mask = P.load_mask(rec)
    assert mask is not None and mask.shape == (256, 256)
    ids = {o["id"] for o in rec.meta["objects"]}
    assert set(np.unique(mask)) - {0} <= ids


@pytest.mark.slow
def test_world_type_oracle_is_at_most_50_and_the_details_can_pay(tmp_path):
    """The world is hard in the right way: ranking the right scene type first, at random
    inside it, scores mR <= 50 on the test split, so matching needs the caption's details;
    and the details are there to read: ranking first every tile the caption's stated content
    (categories, numbers, colours, sizes) holds for beats the type oracle by more than 25 mR
    (one-fact captions gave 21: too few to tell a tile from the others of its type)."""
    from envlf.world.truth import content_oracle_scores

    root = generate_world(tmp_path / "world", n=1500, seed=0, workers=2, progress=False)
    test = load_dataset(root).split("test")
    t2i = test.txt2img()
    r = recall_at_k(type_oracle_scores(test.labels(), t2i), t2i)
    assert r["mR"] <= 50.0, r
    content = recall_at_k(content_oracle_scores(test.records, test.captions(), t2i), t2i)
    assert content["mR"] >= r["mR"] + 25.0, (content, r)


def test_map_diagnostics_agree_with_the_pointing_game(small_world, tmp_path, capsys):
    """The diagnostics' 'shipped' recipe is the pointing game's phrase-as-the-query figure on
    the same tiles; the command prints its four reports."""
    from experiments import map_diagnostics as D

    torch.manual_seed(2)
    model = create_model("tiny").eval()
    ds = load_dataset(small_world)
    recs = D._records(ds, "all", 3)
    got = D.map_recipes(model, recs, grid=4)
    want = P.pointing_game(model, ds.split("all"), max_images=3, progress=False, grid=4)
    assert got["shipped"] == pytest.approx(want["query"]["model"])
    assert got["random point"] == pytest.approx(want["query"]["random"])
    assert {"word-rows", "cls-rows", "hirescam@vit-in", "grad-norm"} <= set(got)
    model.save_pretrained(tmp_path / "tiny")
    rc = D.main(["--checkpoint", str(tmp_path / "tiny"), "--data", str(small_world), "--split", "train",
                 "--images", "3", "--grid", "4", "--probe-train", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("| shipped |") == 2 and "cross-attention entropy" in out and "linear probe" in out
    assert "with one word swapped" in out


def test_swap_test_counts_which_caption_the_itm_head_prefers(small_world, monkeypatch):
    """A head that knows the true captions wins every swap; one that prefers the swapped
    words loses every swap; each swap is counted once under its kind of word."""
    from experiments import map_diagnostics as D

    model = create_model("tiny").eval()
    ds = load_dataset(small_world)
    recs = D._records(ds, "all", 3)
    true = {c for r in recs for c in r.captions}
    for sign, want in ((1.0, 100.0), (-1.0, 0.0)):
        monkeypatch.setattr(model, "itm_score", lambda tokens, texts, as_probability=True, s=sign:
                            torch.tensor([s if t in true else -s for t in texts]))
        res = D.swap_test(model, recs, ds.split("train").captions())
        overall, n = res.pop("all")
        assert overall == want and n > 0 and sum(m for _, m in res.values()) == n
        assert set(res) <= {"noun", "count", "colour", "size", "position"}
        assert all(v == want for v, _ in res.values())
