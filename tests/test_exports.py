"""Label exports: TREC qrels + query file, JSONL with negatives, the CLI."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from envlf.feedback.exports import main, read_jsonl, read_qrels, read_queries, to_jsonl, to_qrels
from envlf.feedback.store import FeedbackRow, FeedbackStore, read_feedback

SHA = "cd" * 32


def row(**kw) -> FeedbackRow:
    base = dict(annotator="alice", direction="t2i", query_text="three white planes", item_id="img_1",
                item_text="img_1.png", rank=1, itc_score=0.4, label="relevant")
    base.update(kw)
    return FeedbackRow(**base)


def qid(direction: str, key: str) -> str:
    return "q" + hashlib.sha1(f"{direction}\t{key}".encode()).hexdigest()[:12]


@pytest.fixture
def judged(tmp_path):
    img_q = dict(direction="i2t", query_text="", query_image_id="airport_12")
    up_q = dict(direction="i2i", query_text="", query_image_sha256=SHA)
    rows = [
        row(item_id="img_1", rank=1, label="relevant", time_utc="2024-05-01T10:00:00Z"),
        row(item_id="img 2 (copy).tif", rank=2, label="not_relevant", time_utc="2024-05-01T10:00:01Z"),
        row(item_id="100%_field", rank=3, label="relevant", grade=3, time_utc="2024-05-01T10:00:02Z"),
        row(**img_q, item_id="cap_7", item_text="a plane on the apron", rank=1, label="relevant",
            time_utc="2024-05-01T10:01:00Z"),
        row(**img_q, item_id="cap_9", item_text="a harbour", rank=2, label="not_relevant",
            time_utc="2024-05-01T10:01:01Z"),
        row(**up_q, item_id="img_5", rank=4, label="relevant", grade=1, time_utc="2024-05-01T10:02:00Z"),
    ]
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append(rows)
    df, report = read_feedback(path)
    assert report.clean
    return df


def test_qid_is_stable_and_documented(judged, tmp_path):
    out = to_qrels(judged, tmp_path / "a.qrels")
    assert set(out["qid"]) == {qid("t2i", "three white planes"), qid("i2t", "image:airport_12"),
                               qid("i2i", f"image:sha256:{SHA}")}
    # whitespace in the query text does not change the qid
    df2 = judged.copy()
    df2["query_text"] = df2["query_text"].str.replace("three white", "  three   white ")
    assert set(to_qrels(df2, tmp_path / "b.qrels")["qid"]) == set(out["qid"])


def test_qrels_round_trip(judged, tmp_path):
    qrels, queries = tmp_path / "out.qrels", tmp_path / "out.tsv"
    written = to_qrels(judged, qrels, queries)
    lines = qrels.read_text().splitlines()
    assert len(lines) == 6
    assert all(len(line.split()) == 4 and line.split()[1] == "0" for line in lines)
    assert f"{qid('t2i', 'three white planes')} 0 img%202%20(copy).tif 0" in lines
    back = read_qrels(qrels)
    assert list(back.columns) == ["qid", "iteration", "docid", "rel"]
    expected = written[["qid", "iteration", "docid", "rel"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    got = {(q, d): r for q, d, r in zip(back["qid"], back["docid"], back["rel"])}
    t2i = qid("t2i", "three white planes")
    assert got[(t2i, "img_1")] == 1
    assert got[(t2i, "img 2 (copy).tif")] == 0
    assert got[(t2i, "100%_field")] == 3  # the grade when given
    assert got[(qid("i2i", f"image:sha256:{SHA}"), "img_5")] == 1
    assert read_queries(queries) == {
        t2i: "three white planes",
        qid("i2t", "image:airport_12"): "image:airport_12",
        qid("i2i", f"image:sha256:{SHA}"): f"image:sha256:{SHA}",
    }


def test_latest_judgement_wins(tmp_path):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    # Written out of time order: the later *time* wins, not the later line.
    store.append(row(item_id="x", label="not_relevant", annotator="bob", time_utc="2024-05-03T00:00:00Z"))
    store.append(row(item_id="x", label="relevant", annotator="ann", time_utc="2024-05-01T00:00:00Z"))
    # Equal times: the later line wins.
    store.append(row(item_id="y", label="relevant", time_utc="2024-05-01T00:00:00Z"))
    store.append(row(item_id="y", label="not_relevant", grade=0, time_utc="2024-05-01T00:00:00Z"))
    # Re-judged with a grade later on.
    store.append(row(item_id="z", label="not_relevant", time_utc="2024-05-01T00:00:00Z"))
    store.append(row(item_id="z", label="relevant", grade=2, time_utc="2024-05-02T00:00:00Z"))
    df, _ = read_feedback(path)
    to_qrels(df, tmp_path / "o.qrels", tmp_path / "o.tsv")
    got = dict(zip(read_qrels(tmp_path / "o.qrels")["docid"], read_qrels(tmp_path / "o.qrels")["rel"]))
    assert got == {"x": 0, "y": 0, "z": 2}
    to_jsonl(df, tmp_path / "o.jsonl")
    (rec,) = read_jsonl(tmp_path / "o.jsonl")
    assert [p["item_id"] for p in rec["positives"]] == ["z"]
    assert sorted(n["item_id"] for n in rec["negatives"]) == ["x", "y"]


def test_jsonl_positives_and_negatives(judged, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert to_jsonl(judged, out) == 3
    recs = read_jsonl(out)
    assert [r["direction"] for r in recs] == ["t2i", "i2t", "i2i"]  # order of first appearance
    t2i, i2t, i2i = recs
    assert t2i["query"] == "three white planes" and t2i["qid"] == qid("t2i", "three white planes")
    assert [p["item_id"] for p in t2i["positives"]] == ["img_1", "100%_field"]
    assert t2i["positives"][1]["grade"] == 3 and "grade" not in t2i["positives"][0]
    assert [n["item_id"] for n in t2i["negatives"]] == ["img 2 (copy).tif"]
    assert i2t["query"] == "image:airport_12" and i2t["query_image_id"] == "airport_12"
    assert i2t["positives"][0]["item_text"] == "a plane on the apron"
    assert i2t["negatives"][0]["item_text"] == "a harbour"
    assert i2i["query_image_sha256"] == SHA and i2i["negatives"] == []
    assert set(t2i) >= {"query", "direction", "positives", "negatives"}


def test_read_qrels_names_a_bad_line(tmp_path):
    p = tmp_path / "bad.qrels"
    p.write_text("q1 0 d1 1\nq1 0 d2\n")
    with pytest.raises(ValueError, match=r"bad.qrels:2: expected 'qid iteration docid rel'"):
        read_qrels(p)
    p.write_text("q1 0 d1 yes\n")
    with pytest.raises(ValueError, match="must be integers"):
        read_qrels(p)


def test_cli(judged, tmp_path, capsys):
    fb = tmp_path / "fb.csv"
    with open(fb, "a", encoding="utf-8") as f:  # a row the report must mention
        f.write("2024-05-01T10:00:00Z,alice,t2i,q,,,i,,1,,,maybe,,,,,,," + "0" * 32 + "\n")
    out = tmp_path / "out"
    rc = main(["--feedback", str(fb), "--qrels", str(out / "a.qrels"), "--queries", str(out / "a.tsv"),
               "--jsonl", str(out / "a.jsonl")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "read 6 rows" in printed and "bad label 'maybe'" in printed and f"{fb}:8" in printed
    assert len(read_qrels(out / "a.qrels")) == 6
    assert len(read_queries(out / "a.tsv")) == 3
    assert len(read_jsonl(out / "a.jsonl")) == 3


def test_cli_default_queries_path_and_foreign_file(judged, tmp_path, capsys):
    fb = tmp_path / "fb.csv"
    assert main(["--feedback", str(fb), "--qrels", str(tmp_path / "x.qrels")]) == 0
    assert (tmp_path / "x.queries.tsv").exists()
    foreign = tmp_path / "captions.csv"
    foreign.write_text("image,caption\n")
    assert main(["--feedback", str(foreign), "--qrels", str(tmp_path / "y.qrels")]) == 2
    assert "not an EnVLF feedback file: missing columns" in capsys.readouterr().err
