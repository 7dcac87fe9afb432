"""Fine-tuning from relevance labels: reading and joining feedback, hold-out, losses, lineage, the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from envlf.train import finetune as FT
from envlf.train import losses as L
from envlf.model.core import load_pretrained
from envlf.data.datasets import load_dataset
from envlf.feedback.store import COLUMNS, FeedbackRow, FeedbackStore, query_id
from envlf.evaluation.metrics import normalize_caption
from envlf.model.core import create_model

SHA = "cd" * 32


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small for 2 threads: on 2 shared cores one thread is ~3x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def row(**kw) -> FeedbackRow:
    base = dict(annotator="tester", direction="t2i", query_text="a red square on the right", item_id="0",
                item_text="images/0.png", rank=1, itc_score=0.5, itm_score=0.7, label="relevant")
    base.update(kw)
    return FeedbackRow(**base)


def csv_line(values: dict) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([values[c] for c in values])
    return buf.getvalue()


def gt_feedback(ds, path: Path, per_query: int = 6) -> Path:
    """t2i judgements labelled from the data: relevant iff the image carries the query string."""
    strings = sorted({c for r in ds.records for c in r.captions})
    rows = []
    for qn, q in enumerate(strings):
        for k in range(per_query):
            i = (qn * 5 + k * 3) % len(ds)
            rel = normalize_caption(q) in {normalize_caption(c) for c in ds.records[i].captions}
            rows.append(row(query_text=q, item_id=ds.records[i].image_id, rank=k + 1,
                            label="relevant" if rel else "not_relevant"))
        # the query's own image, so every query has a positive
        own = next(i for i, r in enumerate(ds.records) if q in r.captions)
        rows.append(row(query_text=q, item_id=ds.records[own].image_id, rank=per_query + 1, label="relevant"))
    FeedbackStore(path, fsync=False).append(rows)
    return path


# -- reading and joining ----------------------------------------------------------------------------

def test_image_rows_of_old_and_new_files_are_both_used(tiny_data, tmp_path):
    """t2i rows name their image by item_id; item_text is the absolute server path in old files
    and <dataset>:<relative path> in new ones: both join the same image."""
    ds = load_dataset(tiny_data)
    path = tmp_path / "fb.csv"
    FeedbackStore(path, fsync=False).append([
        row(item_id="0", item_text=str(tiny_data.resolve() / "images" / "0.png")),  # an old row
        row(query_text="a white square on the left", item_id="13", item_text="tiny:images/13.png"),  # new
    ])
    strings = FT.StringTable()
    known = {(i, strings.key(c)) for i, r in enumerate(ds.records) for c in r.captions}
    fb = FT.load_feedback([path], ds, strings, known)
    assert not fb.unresolved
    assert {(ds.records[j.image].image_id, j.caption) for j in fb.judgements} == {
        ("0", "a red square on the right"), ("13", "a white square on the left")}


def test_bad_rows_are_reported_and_good_rows_used(tiny_data, tmp_path):
    ds = load_dataset(tiny_data)
    f1 = tmp_path / "fb1.csv"
    store = FeedbackStore(f1, fsync=False)
    store.append([
        row(),  # good t2i
        row(query_text="a blue square", item_id="404", label="not_relevant"),  # unknown image id
        row(direction="i2t", query_text="", query_image_id="5", item_id="17", item_text="a blue square on the left",
            label="relevant"),  # good i2t: caption joined by its text
        row(direction="i2t", query_text="", query_image_sha256=SHA, item_id="3", item_text="a red block",
            label="relevant"),  # an upload: no gallery id
        row(direction="i2i", query_text="", query_image_id="1", item_id="2", label="relevant"),  # no caption
        row(query_text="a red square on the right", item_id="2", label="not_relevant"),  # the data pairs them
    ])
    good = row(query_text="a green square on the left", item_id="9", label="not_relevant").as_dict()
    with open(f1, "a", encoding="utf-8") as fh:
        bad = dict(good, row_id="e" * 32, label="maybe")  # bad label
        fh.write(csv_line({c: "" if bad[c] is None else bad[c] for c in COLUMNS}))
        torn = dict(good, row_id="f" * 32)
        fh.write(csv_line({c: "" if torn[c] is None else torn[c] for c in COLUMNS})[:-40])  # torn last line
    # a second file with a foreign column (a spreadsheet added "notes"): warned about, rows used
    f2 = tmp_path / "fb2.csv"
    header = list(COLUMNS) + ["notes"]
    ok = row(query_text="a white square on the left", item_id="13", label="relevant").as_dict()
    with open(f2, "w", encoding="utf-8") as fh:
        fh.write(",".join(header) + "\n")
        fh.write(csv_line({**{c: "" if ok[c] is None else ok[c] for c in COLUMNS}, "notes": "checked twice"}))
    # a third file that is not a feedback file at all: refused whole, the others still used
    f3 = tmp_path / "other.csv"
    f3.write_text("image,caption\n0.png,a red square\n")

    strings = FT.StringTable()
    known = {(i, strings.key(c)) for i, r in enumerate(ds.records) for c in r.captions}
    fb = FT.load_feedback([f1, f2, f3], ds, strings, known)
    by_path = {f["path"]: f for f in fb.files}
    e1, e2, e3 = by_path[str(f1)], by_path[str(f2)], by_path[str(f3)]
    assert e1["rows_read"] == 6 and e1["rows_skipped"] == 2
    assert any("bad label 'maybe'" in r for r in e1["skipped_reasons"])
    assert any("torn last line" in r for r in e1["skipped_reasons"])
    assert e2["rows_read"] == 1 and e2["used"] == 1 and any("extra columns" in w for w in e2["warnings"])
    assert e3["status"].startswith("refused") and "not an EnVLF feedback file" in e3["status"]
    reasons = " | ".join(u.reason for u in fb.unresolved)
    for expected in ("'404' is not in the dataset", "uploaded image", "i2i judgement",
                     "judged not relevant, but the dataset pairs this caption with this image"):
        assert expected in reasons
    assert e1["unresolved"] == 4 and e1["used"] == 2
    used = {(j.direction, ds.records[j.image].image_id, j.caption, j.relevant) for j in fb.judgements}
    assert used == {("t2i", "0", "a red square on the right", True), ("i2t", "5", "a blue square on the left", True),
                    ("t2i", "13", "a white square on the left", True)}
    for f in (f1, f2, f3):
        assert by_path[str(f)]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    text = fb.report()
    assert "torn last line" in text and "'404' is not in the dataset" in text and "refused" in text


def test_latest_judgement_wins_and_duplicates_across_files(tiny_data, tmp_path):
    ds = load_dataset(tiny_data)
    first = row(query_text="a red square on the left", item_id="5", label="relevant",
                time_utc="2024-01-01T00:00:00Z")
    later = row(query_text="a red square on the left", item_id="5", label="not_relevant",
                time_utc="2024-01-02T00:00:00Z")
    FeedbackStore(tmp_path / "a.csv", fsync=False).append([first, later])
    FeedbackStore(tmp_path / "b.csv", fsync=False).append([first])  # the same row_id again
    strings = FT.StringTable()
    fb = FT.load_feedback([tmp_path / "a.csv", tmp_path / "b.csv"], ds, strings, set())
    assert fb.superseded == 1 and fb.duplicates == 1
    assert [(j.relevant, j.rank) for j in fb.judgements] == [(False, 1)]


def test_holdout_split_is_deterministic_and_order_free():
    qids = [f"q{i:03d}" for i in range(50)]
    a = FT.split_holdout(qids, 0.2, seed=3)
    assert len(a) == 10 and a == FT.split_holdout(list(reversed(qids)) + qids[:5], 0.2, seed=3)
    assert a != FT.split_holdout(qids, 0.2, seed=4)
    assert FT.split_holdout(qids[:3], 0.1, 0) and not FT.split_holdout(qids, 0.0, 0)
    with pytest.raises(ValueError):
        FT.split_holdout(qids, 1.0, 0)


# -- losses ---------------------------------------------------------------------------------------------

def _model_and_features(ds):
    torch.manual_seed(0)
    model = create_model("tiny", pretrained=False).eval()
    feats = torch.randn(len(ds), *model.vision.trunk_features(torch.zeros(1, 3, 64, 64)).shape[1:])
    return model, feats


def test_itc_matches_the_library_loss_without_judged_negatives(tiny_data):
    ds = load_dataset(tiny_data)
    model, feats = _model_and_features(ds)
    strings = FT.StringTable()
    known = FT.KnownPairs({(i, strings.key(c)) for i, r in enumerate(ds.records) for c in r.captions}, 10_000)
    # rows where no image carries another row's caption: there, "known positive" (from the
    # data) and the library's rule (same image or same string) coincide. Where they differ,
    # ours is the right one: an image carrying a row's caption string is not its negative.
    rows, carried = [], [{normalize_caption(c) for c in r.captions} for r in ds.records]
    for i, r in enumerate(ds.records):
        for c in r.captions:
            k = normalize_caption(c)
            if all(k not in carried[j] and normalize_caption(d) not in carried[i] for j, d, _ in rows):
                rows.append((i, c, strings.key(c)))
    assert len(rows) >= 4
    with torch.no_grad():
        ours = FT.batch_losses(model, feats, known, rows)["itc"]
        img = model.encode_image(features=feats[torch.tensor([r[0] for r in rows])])
        txt = model.encode_text([r[1] for r in rows])
        ref = L.itc_loss(img, txt, model.temperature_scale(), torch.tensor([r[0] for r in rows]),
                         torch.tensor([r[2] for r in rows]))
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    # a judged negative image of a t2i row's query joins its candidates: the loss can only grow
    with torch.no_grad():
        other = next(i for i in range(len(ds)) if i not in {r[0] for r in rows} and rows[0][2] not in
                     {strings.key(c) for c in ds.records[i].captions})
        neg = [[(other, rows[0][1], rows[0][2])]] + [[] for _ in rows[1:]]
        dirs = ["t2i"] + ["replay"] * (len(rows) - 1)
        with_neg = FT.batch_losses(model, feats, known, rows, neg, dirs)["itc"]
        without = FT.batch_losses(model, feats, known, rows, neg, dirs, itc_judged_negatives=False)["itc"]
    assert float(without) == pytest.approx(float(ref), rel=1e-5) and float(with_neg) > float(without)


def test_judged_negatives_rank_below_their_image_anchor_and_query_positive(tiny_data):
    ds = load_dataset(tiny_data)
    model, feats = _model_and_features(ds)
    strings = FT.StringTable()
    pairs = {(i, strings.key(c)) for i, r in enumerate(ds.records) for c in r.captions}
    known = FT.KnownPairs(pairs, 10_000)
    q = "a red square on the right"
    rows = [(0, q, strings.key(q)), (5, ds.records[5].captions[0], strings.key(ds.records[5].captions[0]))]
    neg = (9, q, strings.key(q))  # a green image judged not relevant to the red query
    anchor = (9, ds.records[9].captions[1], strings.key(ds.records[9].captions[1]))
    args = (model, feats, known, rows, [[neg], []], ["t2i", "replay"])
    torch.manual_seed(0)
    out = FT.batch_losses(*args, anchors={9: anchor}, judged_loss="rank", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the pairwise term by hand: softplus(m(neg) - m(anchor)), softplus(m(neg) - m(row))
        _, (m_neg, m_anchor, m_row) = FT.score_pairs(model, feats, [(9, q), anchor[:2], (0, q)])
    expected = (F.softplus(torch.tensor(m_neg - m_anchor)) + F.softplus(torch.tensor(m_neg - m_row))) / 2
    assert float(out["itm_judged"]) == pytest.approx(float(expected), rel=1e-4)
    ce = FT.batch_losses(*args, anchors={9: anchor}, judged_loss="ce", generator=torch.Generator().manual_seed(0))
    assert ce["itm_judged"].item() == 0.0 and ce["itm"].item() != pytest.approx(out["itm"].item())
    with pytest.raises(ValueError, match="same image"):
        FT.batch_losses(*args, anchors={9: (3, anchor[1], anchor[2])}, judged_loss="rank")
    with pytest.raises(ValueError, match="judged_loss"):
        FT.batch_losses(*args, judged_loss="hinge")


def test_a_row_that_is_not_a_known_positive_is_refused(tiny_data):
    ds = load_dataset(tiny_data)
    model, feats = _model_and_features(ds)
    known = FT.KnownPairs({(0, 0)}, 10)
    with pytest.raises(ValueError, match="not a known positive"):
        FT.batch_losses(model, feats, known, [(0, "x", 0), (1, "y", 1)])


# -- the whole run ------------------------------------------------------------------------------------

@pytest.fixture
def parent(tmp_path):
    torch.manual_seed(0)
    return create_model("tiny", pretrained=False).save_pretrained(tmp_path / "parent")


def test_finetune_lowers_labelled_loss_records_lineage_and_never_trains_on_holdout(tiny_data, parent, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    ds = load_dataset(tiny_data)
    fb = gt_feedback(ds, tmp_path / "feedback.csv")
    seen_rows: list = []
    real = FT.batch_losses

    def spy(model, features, known, rows, row_negatives=(), row_directions=(), itm_only_negatives=(), *a, **kw):
        anchors = kw.get("anchors", a[2] if len(a) > 2 else None) or {}
        seen_rows.append((list(rows), [list(n) for n in row_negatives], list(row_directions), list(itm_only_negatives),
                          list(anchors.values())))
        return real(model, features, known, rows, row_negatives, row_directions, itm_only_negatives, *a, **kw)

    monkeypatch.setattr(FT, "batch_losses", spy)
    out = tmp_path / "ft"
    rc = FT.main(["--checkpoint", str(parent), "--feedback", str(fb), "--data", str(tiny_data), "--out", str(out),
                  "--holdout", "0.25", "--steps", "150", "--epochs", "100", "--batch-size", "8", "--replay-ratio",
                  "0.25", "--lr", "3e-3", "--lr-pretrained", "3e-3", "--workers", "0", "--no-progress",
                  "--rerank-k", "4", "--json", str(tmp_path / "r.json"), "--scope", "all"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out queries" in printed and "before" in printed and "val split, evaluate()" in printed
    report = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["fingerprint"] == report["fingerprint"]

    # the labelled pairs' ITM loss went down, class-balanced (most judged pairs are "not
    # relevant": a model that only learns to say "no" more often must not pass), below chance
    before, after = report["before"]["labelled"], report["after"]["labelled"]
    assert after["itm_loss_balanced"] < min(before["itm_loss_balanced"] - 0.03, 0.68)
    assert {"ITC mR", "re-ranked top4 mR"} <= set(report["before"]["eval"])

    # hold-out: by query id, deterministic, and nothing of it reached a training step
    held, trained = set(report["holdout_qids"]), set(report["train_qids"])
    assert held and trained and not held & trained
    qid_of = {normalize_caption(q): query_id("t2i", q) for q in {c for r in ds.records for c in r.captions}}
    from envlf.feedback.store import latest_judgements, read_feedback

    judged = latest_judgements(read_feedback(fb)[0])
    held_pairs = {(ds.index_of(i), normalize_caption(q)) for q, i, qid in
                  zip(judged["query_text"], judged["item_id"], judged["qid"]) if qid in held}
    assert held_pairs and len(seen_rows) == 150
    n_anchors = 0
    for rows, negs, dirs, itm_only, anchors in seen_rows:
        for (i, caption, _), d in zip(rows, dirs):
            if d != "replay":  # a labelled query: never a held-out one
                assert qid_of[normalize_caption(caption)] not in held
        for i, caption, _ in [p for n in negs for p in n] + itm_only:
            assert qid_of[normalize_caption(caption)] not in held
        for i, caption, _ in rows + anchors:  # replay and anchors never repeat a held-out pair
            assert (i, normalize_caption(caption)) not in held_pairs
        n_anchors += len(anchors)
    assert n_anchors > 0

    # lineage: parent, files with hashes and counts, held-out qids, hyper-parameters
    model = load_pretrained(out / "model")
    entry = model.config.lineage[-1]
    assert entry["event"] == "finetune"
    assert entry["parent"] == {"path": str(parent), "fingerprint": load_pretrained(parent).fingerprint()}
    (f,) = entry["feedback"]
    assert f["sha256"] == hashlib.sha256(fb.read_bytes()).hexdigest() and f["path"] == str(fb)
    assert f["rows_read"] == len(fb.read_text().splitlines()) - 1 and f["rows_skipped"] == 0
    assert f["used"] > 0 and f["rows_read"] == f["used"] + f["superseded"] + f["unresolved"] + f["duplicates"]
    assert f["used_train"] + f["used_holdout"] == f["used"] and f["used_holdout"] > 0
    assert sorted(entry["holdout"]["qids"]) == sorted(held) and entry["holdout"]["fraction"] == 0.25
    hp = entry["hyperparameters"]
    assert hp["steps_run"] == 150 and hp["replay_ratio"] == 0.25 and hp["lr"] == 3e-3 and hp["units_per_step"] == 8
    assert entry["started"] <= entry["finished"] and model.fingerprint() == report["fingerprint"]
    assert model.fingerprint() != load_pretrained(parent).fingerprint()


def test_scope_fusion_moves_only_the_fusion_encoder_and_l2sp_pulls_toward_the_parent(tiny_data, parent, tmp_path,
                                                                                      monkeypatch):
    """scope=fusion: every weight outside fusion.* is bit-identical to the parent's (ITC, and so
    any index built with the parent, unchanged) and fusion.* moved; a strong L2-SP pull keeps the
    moved weights closer to the parent than the same run without it."""
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    ds = load_dataset(tiny_data)
    fb = gt_feedback(ds, tmp_path / "feedback.csv")
    ref = load_pretrained(parent).state_dict()

    def run(name: str, *extra: str) -> dict:
        assert FT.main(["--checkpoint", str(parent), "--feedback", str(fb), "--data", str(tiny_data), "--out",
                        str(tmp_path / name), "--steps", "12", "--lr", "3e-3", "--lr-pretrained", "3e-3",
                        "--workers", "0", "--no-progress", "--eval-split", "", *extra]) == 0
        return load_pretrained(tmp_path / name / "model").state_dict()

    def distance(sd: dict, prefix: str) -> float:
        return sum(float(((sd[k].float() - ref[k].float()) ** 2).sum()) for k in ref if k.startswith(prefix))

    free = run("free", "--scope", "fusion")
    for k, v in ref.items():
        if not k.startswith("fusion."):
            assert torch.equal(free[k], v), k
    assert distance(free, "fusion.") > 0
    pulled = run("pulled", "--scope", "fusion", "--l2sp", "10")
    assert distance(pulled, "fusion.") < 0.5 * distance(free, "fusion.")
    assert distance(run("all", "--scope", "all"), "text_proj.") > 0  # scope all moves ITC too
    default = run("default")  # the default scope is the fusion encoder: ITC as the parent's
    assert all(torch.equal(default[k], v) for k, v in ref.items() if not k.startswith("fusion."))
    with pytest.raises(ValueError, match="scope must be one of"):
        FT.finetune(FT.FinetuneConfig(checkpoint=str(parent), feedback=[str(fb)], data=str(tiny_data),
                                      scope="everything"))


def test_cli_errors_are_one_line(tiny_data, parent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    assert FT.main(["--checkpoint", str(parent), "--feedback", str(tmp_path / "missing.csv"), "--data",
                    str(tiny_data), "--out", str(tmp_path / "o"), "--workers", "0", "--no-progress"]) == 2
    assert "missing.csv not found" in capsys.readouterr().err
    only_bad = tmp_path / "bad.csv"
    FeedbackStore(only_bad, fsync=False).append(row(item_id="404"))
    assert FT.main(["--checkpoint", str(parent), "--feedback", str(only_bad), "--data", str(tiny_data), "--out",
                    str(tmp_path / "o"), "--workers", "0", "--no-progress"]) == 2
    assert "no usable judgements" in capsys.readouterr().err


# -- the simulated label loop ------------------------------------------------------------------------

def test_label_loop_experiment_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from experiments import label_loop

    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    out = tmp_path / "loop"
    assert label_loop.main(["--out", str(out), "--world-size", "40", "--parent-epochs", "2", "--budgets", "20",
                            "--strategies", "top,suggested", "--steps", "4", "--batch-size", "4",
                            "--rerank-k", "6", "--depth", "3", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "label effect = change - the replay-only control's change" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["strategy"], r["budget"]) for r in summary["runs"]] == [("control", 0), ("top", 20), ("suggested", 20)]
    held = set(summary["heldout_qids"])
    for r in summary["runs"]:
        assert r["labelled"] == r["budget"] and r["steps"] == 4
        assert {"re-ranked R@1", "ITC R@5"} <= set(r["heldout_after"]) and "ITC mR" in r["eval_after"]
        rep = json.loads((out / "runs" / f"{r['strategy']}-{r['budget']}" / "report.json").read_text())
        assert set(rep["holdout_qids"]) == held and not held & set(rep["train_qids"])
        assert rep["lineage_entry"]["holdout"]["explicit"] is True
    # "top" labels each query's results in rank order, `--depth` per query
    top = (out / "runs" / "top-20" / "feedback.csv").read_text().splitlines()
    assert sum(",sim-top," in line for line in top) == 20


def test_content_annotator_judges_like_a_person_from_the_worlds_phrases(tmp_path, tiny_data):
    """--relevance content: a caption fits its own image, never an image of another scene type,
    and another image of its type exactly when the counts, colours and sizes its phrases state
    hold there (re-counted here from dataset.json's objects, not from the annotator's tables)."""
    import math

    from experiments.label_loop import Annotator
    from envlf.world.truth import phrase_demand
    from envlf.world import generate_world

    assert phrase_demand("three white planes", [{"category": "plane", "colour": "white", "size": "medium"}]) \
        == ("plane", "white", None, (3, 3))
    assert phrase_demand("numerous boats", [{"category": "boat", "colour": "red", "size": "small"}]) \
        == ("boat", None, None, (8, math.inf))
    assert phrase_demand("a little grey-roofed house", [{"category": "house", "colour": "grey", "size": "small"}]) \
        == ("house", "grey", "small", (1, math.inf))
    assert phrase_demand("some yachts", [{"category": "boat", "colour": "red", "size": "small"}])[3] == (2, math.inf)

    ds = load_dataset(generate_world(tmp_path / "w", n=64, seed=3, workers=1, progress=False))
    content, exact = Annotator(ds, "content"), Annotator(ds, "caption")
    numbered = other_type = fits_other = 0
    for i, r in enumerate(ds.records):
        for sent in r.meta["sentences"]:
            q = sent["raw"]
            assert content.relevant(q, i)
            for j, other in enumerate(ds.records):
                if exact.relevant(q, j):
                    assert content.relevant(q, j)  # identical strings fit both ways
                elif other.label != r.label:
                    assert not content.relevant(q, j)
                    other_type += 1
                else:
                    fits_other += content.relevant(q, j)
            by_id = {o["id"]: o for o in r.meta["objects"]}
            for ph in sent["phrases"]:
                n = ph["text"].split()[0].lower()
                if n not in ("two", "three", "four", "five"):
                    continue
                first = by_id[ph["object_ids"][0]]
                cat, colour, size = first["category"], first["colour"], first["size"]
                words = ph["text"].lower().replace("-", " ").split()
                said_colour = colour in words
                said_size = any({"big": "large", "little": "small"}.get(w, w) == size for w in words)
                for j, other in enumerate(ds.records):
                    if other.label != r.label or exact.relevant(q, j):
                        continue
                    have = sum(o["category"] == cat and (not said_colour or o["colour"] == colour)
                               and (not said_size or o["size"] == size) for o in other.meta["objects"])
                    if have != len(ph["object_ids"]):
                        assert not content.relevant(q, j), (q, other.image_id)
                        numbered += 1
    assert numbered > 10 and other_type > 1000 and fits_other > 50
    with pytest.raises(ValueError, match="demo world"):
        Annotator(load_dataset(tiny_data), "content")  # no objects, no phrases


def test_training_and_fine_tuning_step_through_the_one_loop(tiny_data, tmp_path, monkeypatch):
    """Both recipes' optimiser steps go through envlf.train.loop.fit: its schedule is asked
    once per step, with each run's own total."""
    from envlf.train import loop
    from envlf.train import recipe as T

    calls: list[tuple[int, int]] = []
    real = loop.lr_factor
    monkeypatch.setattr(loop, "lr_factor", lambda step, total, *a: calls.append((step, total)) or real(step, total, *a))
    home, out = tmp_path / "home", tmp_path / "run"
    assert T.main(["--data", str(tiny_data), "--out", str(out), "--model", "tiny", "--epochs", "1", "--max-steps", "2",
                   "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--home", str(home)]) == 0
    assert [s for s, _ in calls] == [0, 1]
    assert list((home / "cache" / "features").glob("trunk-*.safetensors"))  # the runtime paths, not the cwd

    fb = gt_feedback(load_dataset(tiny_data), tmp_path / "feedback.csv")
    calls.clear()
    assert FT.main(["--checkpoint", str(out / "last"), "--feedback", str(fb), "--data", str(tiny_data),
                    "--out", str(tmp_path / "ft"), "--steps", "3", "--workers", "0", "--no-progress",
                    "--rerank-k", "0", "--home", str(home)]) == 0
    assert calls == [(0, 3), (1, 3), (2, 3)]


def test_label_loop_diverse_strategy_fusion_scope_and_an_untouched_split(tmp_path, monkeypatch, capsys):
    """--ft scope=fusion leaves every ITC figure exactly where it was (held-out ITC recall and the
    untouched split's ITC mR change by 0); --untouched moves a share of the gallery's images
    out of reach of labels and replay and evaluates there; 'diverse' labels blocks of --depth."""
    from experiments import label_loop

    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    out = tmp_path / "loop"
    assert label_loop.main(["--out", str(out), "--world-size", "40", "--parent-epochs", "2", "--budgets", "12",
                            "--strategies", "diverse", "--steps", "3", "--batch-size", "4", "--rerank-k", "6",
                            "--depth", "3", "--repeats", "1", "--untouched", "0.4", "--ft", "scope=fusion"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "untouched" and "fine-tune scope=fusion" in summary["table"]
    for r in summary["runs"]:
        d = label_loop.run_deltas(r, 6)
        assert d["ITC R@1"] == d["ITC R@5"] == d["ITC R@10"] == 0.0 and d["eval ITC mR"] == 0.0
    diverse = (out / "runs" / "diverse-12" / "feedback.csv").read_text().splitlines()
    picked = [line for line in diverse if ",sim-diverse," in line]
    assert len(picked) == 12  # four blocks of a query's top 3
    assert capsys.readouterr().err == ""
    assert label_loop.main(["--out", str(out), "--ft", "no_such_field=1"]) == 2
    assert "expected KEY=VALUE with KEY a FinetuneConfig field" in capsys.readouterr().err


def test_objects_annotator_reads_scene_class_and_named_objects():
    from types import SimpleNamespace

    from experiments.label_loop import Annotator, caption_objects

    assert caption_objects("Two planes are parked beside the runway.") == {"airplane", "runway"}
    recs = [SimpleNamespace(label="airport", captions=["two airplanes beside a runway"]),
            SimpleNamespace(label="airport", captions=["an empty runway"]),
            SimpleNamespace(label="harbor", captions=["many boats and planes near the water"])]
    a = Annotator(SimpleNamespace(records=recs), "objects")
    q = "some planes on the runway"  # of no image: its class is unknown, so only string matches count
    assert [a.relevant(q, i) for i in range(3)] == [False, False, False]
    q = "two airplanes beside a runway"  # image 0's caption: class airport, objects {airplane, runway}
    assert [a.relevant(q, i) for i in range(3)] == [True, False, False]  # image 1 names no airplane; 2 is a harbor


def test_envlf_finetune_as_a_user_runs_it(tiny_data, parent, tmp_path):
    """The README's fine-tune command as a process on an empty home, with its worker pool: a
    before/after table, a checkpoint whose ITC weights are the parent's (the default scope)."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    fb = gt_feedback(load_dataset(tiny_data), tmp_path / "feedback.csv")
    env = {**os.environ, "ENVLF_HOME": str(home), "HOME": str(home),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "envlf", "finetune", "--checkpoint", str(parent), "--feedback", str(fb),
                        "--data", str(tiny_data), "--out", str(tmp_path / "ft"), "--holdout", "0.2", "--steps", "4",
                        "--workers", "2", "--no-progress"], capture_output=True, text=True, env=env, cwd=home,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "before" in r.stdout and "held-out queries" in r.stdout and "checkpoint: " in r.stdout
    tuned, ref = load_pretrained(tmp_path / "ft" / "model").state_dict(), load_pretrained(parent).state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in ref.items() if not k.startswith("fusion."))
    assert any(not torch.equal(tuned[k], v) for k, v in ref.items() if k.startswith("fusion."))
