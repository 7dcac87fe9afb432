"""The app's model versions and label suggestions: load a newer checkpoint without
restarting (re-indexing the gallery for it), results and judgements carry the model that
made them, and "label these next" offers the re-ranked results worth judging."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from app_support import make_app_assets, make_backend
from envlf.feedback.store import read_feedback

QUERY = "a red square on the left"
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


@pytest.fixture
def app(tmp_path):
    from demo.handlers import Handlers

    assets = make_app_assets(tmp_path)
    backend = make_backend(assets)
    return SimpleNamespace(assets=assets, backend=backend, handlers=Handlers(backend), root=tmp_path)


def _new_checkpoint(root, lineage_note="finetune"):
    from envlf.model.core import create_model

    torch.manual_seed(123)
    model = create_model("tiny").eval()
    model.config.lineage.append({"event": lineage_note, "parent": {"fingerprint": "abc123"},
                                 "feedback": [{"path": "f.csv", "used": 7}], "finished": "2026-11-27T00:00:00Z"})
    return model.save_pretrained(root / "ckpt-new"), model.fingerprint()


def test_load_a_newer_checkpoint_without_restarting(app):
    h, b = app.handlers, app.backend
    old_fp, old_index = b.model_fingerprint, b.index_dir
    before = h.text_to_image(QUERY, k=4)
    ckpt, new_fp = _new_checkpoint(app.root)
    ticks = []
    md = h.load_model(str(ckpt), progress=lambda f, desc=None: ticks.append((f, desc)))
    assert new_fp in md and "finetune" in md and "abc123" in md and "7 judgements used" in md
    assert b.model_fingerprint == new_fp != old_fp
    assert b.index_dir != old_index and b.index.model_fingerprint == new_fp  # re-indexed for the new model
    assert len(b.index) == 12 and ticks and ticks[-1][0] == 1.0
    after = h.text_to_image(QUERY, k=4)
    assert new_fp in after.status and old_fp not in after.status
    # a judgement of a result made before the swap keeps the model that produced that result
    h.record_feedback(before.state, 1, "relevant", None, "tester")
    h.record_feedback(after.state, 1, "relevant", None, "tester")
    df, _ = read_feedback(app.assets["feedback"])
    assert df["model_fingerprint"].tolist() == [old_fp, new_fp]
    # loading it again is a no-op; a second swap back reuses the original index
    assert "already being served" in h.load_model(str(ckpt), progress=lambda *a, **k: None)
    h.load_model(str(app.assets["checkpoint"]), progress=lambda *a, **k: None)
    assert b.model_fingerprint == old_fp and b.index_dir == old_index


def test_bad_checkpoint_leaves_the_served_model_alone(app):
    h, b = app.handlers, app.backend
    fp = b.model_fingerprint
    bad = app.root / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(gr.Error, match="cannot load a checkpoint"):
        h.load_model(str(bad), progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="checkpoint"):
        h.load_model("", progress=lambda *a, **k: None)
    assert b.model_fingerprint == fp
    assert h.text_to_image(QUERY, k=2).state["model_fingerprint"] == fp


def test_load_model_errors_say_the_same_for_every_reason(app, caplog):
    """A visitor must not learn which server paths exist: missing, a file, a corrupt checkpoint
    and an unreachable hub id all get one line naming only what was typed; the log has why."""
    h = app.handlers
    (app.root / "a-file").write_text("x")
    corrupt = app.root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    messages = {}
    for name in ("missing", "a-file", "corrupt"):
        with caplog.at_level("WARNING", logger="envlf.app"), pytest.raises(gr.Error) as e:
            h.load_model(str(app.root / name), progress=lambda *a, **k: None)
        messages[name] = str(e.value).replace(str(app.root / name), "SPEC")
    assert len(set(messages.values())) == 1, messages
    assert "the server log says why" in messages["missing"]
    assert str(app.root) not in messages["missing"].replace("SPEC", "")
    assert "not a directory" in caplog.text and "not found" in caplog.text  # the operator sees why


def test_model_reload_can_be_turned_off(app):
    h, b = app.handlers, app.backend
    b.config.model_reload = "off"
    with pytest.raises(gr.Error, match="turned off"):
        h.load_model(str(app.assets["checkpoint"]), progress=lambda *a, **k: None)
    b.config.model_reload = "auto"
    assert b.config.allow_model_reload  # not on Spaces here


def test_label_these_next_suggests_reranked_unjudged_results(app):
    h = app.handlers
    out = h.text_to_image(QUERY, k=8, rerank=True, rerank_k=6)
    table = h.suggest_next(out.state, n=4)
    assert 1 <= len(table) <= 4 and list(table.columns) == ["#", "result", "score", "why"]
    assert table["#"].between(1, 6).all()  # only re-ranked results carry ITM evidence
    assert table["score"].is_monotonic_decreasing and table["why"].str.len().gt(0).all()
    first = int(table["#"].iloc[0])
    # selecting the row selects that result; once judged, it is no longer suggested
    rank, token = h.select_suggestion(out.state, SimpleNamespace(row_value=table.iloc[0].tolist()))
    assert rank == first and token == out.state["result_id"]
    h.record_feedback(out.state, rank, "not_relevant", None, "tester", token=token)
    again = h.suggest_next(out.state, n=8)
    assert first not in again["#"].tolist()


def test_suggestions_need_reranked_results(app):
    h = app.handlers
    with pytest.raises(gr.Error, match="Search first"):
        h.suggest_next(None)
    off = h.text_to_image(QUERY, k=4, rerank=False)
    with pytest.raises(gr.Error, match="re-ranking on"):
        h.suggest_next(off.state)


def test_the_model_tab_shows_a_fine_tunes_before_and_after(app, monkeypatch):
    """A checkpoint made by `envlf finetune` from the app's own model: loading it shows the
    fine-tune's before / after / change on its held-out queries and its eval split, the same
    figures as the run's report."""
    import json

    from envlf.data.datasets import load_dataset
    from envlf.train import finetune as FT
    from test_finetune import gt_feedback

    monkeypatch.setenv("ENVLF_HOME", str(app.root / "home"))
    fb = gt_feedback(load_dataset(app.assets["data"]), app.root / "labels.csv")
    out = app.root / "ft"
    assert FT.main(["--checkpoint", str(app.assets["checkpoint"]), "--feedback", str(fb), "--data",
                    str(app.assets["data"]), "--out", str(out), "--steps", "3", "--workers", "0", "--no-progress",
                    "--rerank-k", "4", "--holdout", "0.3"]) == 0
    report = json.loads((out / "report.json").read_text())
    md = app.handlers.load_model(str(out / "model"), progress=lambda *a, **k: None)
    assert "Did the labels help?" in md and f"{len(report['holdout_qids'])} held-out queries" in md
    table = {line.split("|")[1].strip(): line.split("|")[2:5] for line in md.splitlines() if line.startswith("| ")}
    b, a = report["before"], report["after"]
    auc = table["held-out labelled queries: ITM AUC (relevant above not relevant)"]
    assert [float(x) for x in auc] == pytest.approx([b["holdout"]["itm_auc"], a["holdout"]["itm_auc"],
                                                     a["holdout"]["itm_auc"] - b["holdout"]["itm_auc"]], abs=2e-3)
    assert [float(x) for x in table["val split: re-ranked mR"][:2]] == pytest.approx(
        [b["eval"]["re-ranked top4 mR"], a["eval"]["re-ranked top4 mR"]], abs=2e-3)
