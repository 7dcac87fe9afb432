"""The Gradio app: handlers called directly, configuration, and the app served end to end
(gradio_client against demo.launch). Tiny random-weight model and index; no embedded default."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app_support import app_env, make_app_assets, make_backend, serving
from envlf.feedback.store import COLUMNS, read_feedback

QUERY = "a red square on the left"
# gradio's queue still uses pandas options that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_app_assets(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def backend(assets):
    return make_backend(assets)


@pytest.fixture(scope="module")
def handlers(backend):
    from demo.handlers import Handlers

    return Handlers(backend)


def feedback_rows(path: Path):
    if not path.exists():
        return 0, None
    df, report = read_feedback(path)
    assert report.clean, str(report)
    return len(df), df


def png(path: Path, size=(40, 30), colour=(30, 120, 200)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# -- handlers, called directly ---------------------------------------------------------------

def test_text_query_returns_k_results_with_both_scores(handlers, backend):
    out = handlers.text_to_image(QUERY, k=5, rerank=True, rerank_k=16)
    assert len(out.gallery) == 5 and len(out.table) == 5 and len(out.state["items"]) == 5
    assert out.table["#"].tolist() == [1, 2, 3, 4, 5]
    assert out.table["ITC cos"].notna().all() and out.table["ITM p"].notna().all()
    path, caption = out.gallery[0]
    assert Path(path).is_file() and caption.startswith("#1 · ITM ") and " · ITC " in caption
    assert backend.model_fingerprint in out.status and "re-rank" in out.status and "ms" in out.status
    assert out.scores_plot.data and out.map_plot.data  # plotly figures
    assert any(t.name == "query" for t in out.map_plot.data)
    # re-ranking off: ITC scores only
    off = handlers.text_to_image(QUERY, k=3, rerank=False, rerank_k=16)
    assert off.table["ITM p"].isna().all() and off.table["ITC rank"].tolist() == [1, 2, 3]
    assert off.gallery[0][1].startswith("#1 · ITC ")


def test_k_is_clamped_to_the_gallery(handlers, backend):
    out = handlers.text_to_image(QUERY, k=10_000, rerank=True, rerank_k=10_000)
    assert len(out.gallery) == len(backend.index)


def test_image_query_returns_captions(handlers, assets, tmp_path):
    tile = sorted((assets["data"] / "images").glob("*.png"))[0]
    out = handlers.image_to_text({"path": str(tile)}, "", k=5, rerank=True, rerank_k=8)  # as Gradio hands it over
    assert len(out.table) == 5 and out.table["ITC cos"].notna().all()
    assert out.table["caption"].is_unique  # identical captions appear once, with their counts
    assert (out.table["copies"] >= 1).all() and "images" in out.table
    assert out.state["direction"] == "i2t" and len(out.state["query_image_sha256"]) == 64
    by_id = handlers.image_to_text(None, "0", k=4, rerank=False, rerank_k=8)
    assert len(by_id.table) == 4 and by_id.state["query_image_id"] == "0" and by_id.table["ITM p"].isna().all()


def test_attention_map_has_the_tile_size(handlers):
    out = handlers.text_to_image(QUERY, k=3, rerank=True, rerank_k=8)
    ex = handlers.explain_t2i(out.state, 2, "sentence")
    assert isinstance(ex.overlay, Image.Image) and ex.overlay.size == ex.image.size == (48, 48)
    # the overlay colours the tile unless the map is empty, and an empty map is said so
    # (a random-weight model may have no positive evidence anywhere)
    empty = "this map is empty" in ex.details
    assert np.array_equal(np.asarray(ex.overlay), np.asarray(ex.image)) == empty
    values = [v for _, v in ex.words.choices]
    # the words that carry meaning get a chip (by their index in the query), stopwords do not
    assert QUERY == "a red square on the left" and values == ["sentence", "1", "2", "5"]
    word = handlers.explain_t2i(out.state, 2, "1")  # the map of one word ("red")
    assert word.overlay.size == (48, 48) and word.words.value == "1"
    tile, overlay = handlers.attention("a blue block", "4", "sentence")
    assert tile.size == overlay.size == (48, 48)


def test_attention_for_a_caption_of_an_upload(handlers, tmp_path):
    upload = png(tmp_path / "q.png", (64, 40))
    out = handlers.image_to_text(str(upload), "", k=3, rerank=True, rerank_k=4)
    ex = handlers.explain_i2t(out.state, 1, "sentence")
    assert ex.overlay.size == ex.image.size == (64, 40)
    assert out.table["caption"][0] in ex.details


def test_feedback_appends_one_well_formed_row(handlers, backend, assets):
    path = assets["feedback"]
    before, _ = feedback_rows(path)
    out = handlers.text_to_image(QUERY, k=4, rerank=True, rerank_k=8)
    msg, who = handlers.record_feedback(out.state, 2, "relevant", "2", None)
    assert "#2" in msg and who.startswith("anon-")
    after, df = feedback_rows(path)
    assert after == before + 1
    row = df.iloc[-1]
    hit = out.state["items"][1]
    assert list(df.columns) == list(COLUMNS)
    assert row["annotator"] == who and row["direction"] == "t2i" and row["query_text"] == QUERY
    assert row["item_id"] == hit["image_id"] and row["rank"] == 2
    # the image as <dataset>:<relative path>: the CSV is shared, the server's layout stays out of it
    dataset, _, rel = row["item_text"].partition(":")
    assert dataset and rel and not rel.startswith("/") and hit["path"].endswith("/" + rel)
    assert str(Path(hit["path"]).parent.parent) not in row["item_text"]
    assert row["itc_score"] == pytest.approx(hit["itc"]) and row["itm_score"] == pytest.approx(hit["itm"])
    assert row["label"] == "relevant" and row["grade"] == 2
    assert row["model_fingerprint"] == backend.model_fingerprint
    assert row["index_fingerprint"] == backend.index_fingerprint and row["app_version"].startswith("envlf-app/")
    # the same session keeps its annotator id; image -> text judgements carry the query image
    i2t = handlers.image_to_text(None, "0", k=3, rerank=False, rerank_k=0)
    handlers.record_feedback(i2t.state, 1, "not_relevant", "none", who)
    n, df = feedback_rows(path)
    assert n == before + 2
    row = df.iloc[-1]
    assert (row["annotator"], row["direction"], row["query_image_id"]) == (who, "i2t", "0")
    assert row["item_text"] == i2t.state["items"][0]["text"] and np.isnan(row["itm_score"])
    assert row["label"] == "not_relevant" and row["grade"] is pd_na()


def pd_na():
    import pandas as pd

    return pd.NA


def test_annotator_is_the_login_name_when_there_is_one():
    from demo.handlers import resolve_annotator

    assert resolve_annotator("anon-1", types.SimpleNamespace(username="alice")) == "alice"
    assert resolve_annotator("anon-1", types.SimpleNamespace(username=None)) == "anon-1"
    assert resolve_annotator(None, None, gr.OAuthProfile({"name": "B", "preferred_username": "bob", "profile": "",
                                                          "picture": ""})) == "bob"
    assert resolve_annotator(None).startswith("anon-")


@pytest.mark.parametrize("query, message", [
    ("", "query is empty"),
    ("   \n\t ", "query is empty"),
    ("x" * 10_000, "10,000 characters long; the limit is 1,000"),
])
def test_bad_queries_give_readable_errors(handlers, query, message):
    with pytest.raises(gr.Error, match=message):
        handlers.text_to_image(query, 5, True, 8)


def test_bad_uploads_give_readable_errors(handlers, tmp_path):
    text = tmp_path / "<b>notes<i>.png"
    text.write_text("this is not an image")
    with pytest.raises(gr.Error, match="not an image") as e:
        handlers.image_to_text(str(text), "", 5, True, 8)
    assert "<b>" not in e.value.message and str(tmp_path) not in e.value.message  # no server path, no markup
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:3000])
    with pytest.raises(gr.Error, match="truncated|corrupt"):
        handlers.image_to_text(str(truncated), "", 5, True, 8)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 5_000)).save(bomb)  # 50 MP of nothing: a few kB on disk
    with pytest.raises(gr.Error, match="exceeds the limit"):
        handlers.image_to_text(str(bomb), "", 5, True, 8)
    with pytest.raises(gr.Error, match="Upload an image"):
        handlers.image_to_text(None, "", 5, True, 8)
    with pytest.raises(gr.Error, match="no image '&lt;script&gt;' in this gallery"):  # toasts are HTML
        handlers.image_to_text(None, "<script>", 5, True, 8)


def test_bad_feedback_gives_readable_errors(handlers, assets):
    before, _ = feedback_rows(assets["feedback"])
    with pytest.raises(gr.Error, match="Search first"):
        handlers.record_feedback(None, 1, "relevant")
    out = handlers.text_to_image(QUERY, 3, True, 8)
    with pytest.raises(gr.Error, match="Select a result first"):
        handlers.record_feedback(out.state, None, "relevant")
    with pytest.raises(gr.Error, match="no result #9"):
        handlers.record_feedback(out.state, 9, "relevant")
    with pytest.raises(gr.Error, match="Grade 2 means relevant"):
        handlers.record_feedback(out.state, 1, "not_relevant", "2")
    with pytest.raises(gr.Error, match="Grade must be 0-3"):
        handlers.record_feedback(out.state, 1, "relevant", "7")
    assert feedback_rows(assets["feedback"])[0] == before  # nothing written


def test_a_selection_never_applies_to_newer_results(handlers, assets):
    """A click made in the old results while a new search runs must not judge the new #rank."""
    old = handlers.text_to_image(QUERY, 3, True, 4)
    rank, token = handlers.select_rank(old.state, types.SimpleNamespace(index=1))
    assert (rank, token) == (2, old.state["result_id"])
    new = handlers.text_to_image("a blue square", 3, True, 4)
    before = feedback_rows(assets["feedback"])[0]
    with pytest.raises(gr.Error, match="results changed"):
        handlers.record_feedback(new.state, rank, "relevant", None, "anon-z", token=token)
    with pytest.raises(gr.Error, match="results changed"):
        handlers.explain_t2i(new.state, rank, "sentence", token)
    assert feedback_rows(assets["feedback"])[0] == before
    handlers.record_feedback(old.state, rank, "relevant", None, "anon-z", token=token)  # its own list: fine
    assert handlers.select_rank(None, types.SimpleNamespace(index=[4, 1])) == (5, None)  # a table row


def test_user_text_is_never_markup(handlers):
    query = "<img src=x onerror=alert(1)> **bold** [link](http://example.com)"
    out = handlers.text_to_image(query, 3, True, 4)
    assert out.state["query_text"] == query  # kept verbatim (for the feedback row) ...
    assert "<img" not in out.status and "bold" not in out.status  # ... but not put into Markdown
    assert all("<" not in cap for _, cap in out.gallery)


def test_feedback_summary_and_exports(handlers, assets):
    out = handlers.text_to_image("a blue square", 3, True, 4)
    handlers.record_feedback(out.state, 1, "relevant", None, "anon-x")
    handlers.record_feedback(out.state, 2, "not_relevant", "0", "anon-x")
    s = handlers.feedback_summary()
    n, df = feedback_rows(assets["feedback"])
    assert f"**{n} judgements**" in s.counts and "queries" in s.counts
    assert "a blue square" in s.per_query["query"].tolist() and "p@1" in s.per_query
    assert s.timeline.data and s.precision.data
    files = handlers.export_feedback()
    names = [Path(f).name for f in files]
    assert names == ["feedback.csv", "feedback.qrels", "feedback.queries.tsv", "feedback.jsonl"]
    assert read_feedback(files[0])[0].shape[0] == n
    assert all(Path(f).stat().st_size > 0 for f in files)


def test_more_like_this_is_image_to_image(handlers):
    out = handlers.text_to_image(QUERY, 3, True, 4)
    like = handlers.more_like_this(out.state, 1, 4)
    source = out.state["items"][0]["image_id"]
    assert like.state["direction"] == "i2i" and like.state["query_image_id"] == source
    assert source not in [h["image_id"] for h in like.state["items"]] and len(like.gallery) == 4
    msg, _ = handlers.record_feedback(like.state, 1, "relevant", None, "anon-y")
    assert "marked relevant" in msg


# -- envlf.explain.viz -------------------------------------------------------------------------------

def test_overlay_keeps_size_and_blends_where_the_map_is():
    from envlf.explain.viz import EmbeddingMap, colormap, overlay

    tile = Image.new("RGB", (30, 20), (100, 100, 100))
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    out = np.asarray(overlay(tile, heat, alpha=0.6))
    assert out.shape == (20, 30, 3)
    assert not np.array_equal(out[0, 0], [100, 100, 100]) and np.array_equal(out[-1, -1], [100, 100, 100])
    assert colormap(np.array([0.0, 1.0])).dtype == np.uint8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5, 2, 1, 1, 1, 1, 1, 1])
    emap = EmbeddingMap.fit(x.astype(np.float32), ["a"] * 500, max_points=200)
    assert emap.xy.shape == (200, 2) and emap.total == 500
    assert np.allclose(emap.components @ emap.components.T, np.eye(2), atol=1e-6)
    assert abs(emap.components[0, 0]) > 0.95  # the axis of largest variance first
    assert np.allclose(emap.project(emap.mean), 0, atol=1e-5)


# -- configuration -----------------------------------------------------------------------------

def test_flags_win_over_environment(tmp_path):
    import os

    from demo.config import load_config

    env = {"ENVLF_CHECKPOINT": "env-ckpt", "ENVLF_INDEX": "env-index", "GRADIO_SERVER_PORT": "8001",
           "GRADIO_SERVER_NAME": "0.0.0.0", "ENVLF_CAPTIONS": os.pathsep.join(["a.json", "b.txt"]),
           "ENVLF_HOME": str(tmp_path / "home"), "ENVLF_DEVICE": "cpu"}
    cfg = load_config(["--checkpoint", "flag-ckpt", "--port", "9002", "-q", "tests/x.py", "--unknown"], env,
                      data_dir=tmp_path / "none")
    assert cfg.checkpoint == "flag-ckpt" and cfg.index == Path("env-index")
    assert cfg.port == 9002 and cfg.host == "0.0.0.0" and cfg.captions == ["a.json", "b.txt"]
    assert cfg.device == "cpu" and cfg.home == tmp_path / "home"
    assert cfg.feedback == tmp_path / "home" / "feedback.csv"  # no writable /data
    (tmp_path / "data").mkdir()
    spaces = load_config([], {"ENVLF_HOME": str(tmp_path / "home")}, data_dir=tmp_path / "data")
    assert spaces.feedback == tmp_path / "data" / "envlf" / "feedback.csv"
    assert spaces.port == 7860 and spaces.device == "auto" and spaces.max_file_size == "20MB"
    assert load_config(["--max-file-size", "5 mb"], {}).max_file_size == "5mb"
    with pytest.raises(SystemExit, match="expected a number and a unit"):
        load_config([], {"ENVLF_MAX_FILE_SIZE": "lots"})


def test_hub_checkpoint_is_downloaded_with_the_checkpoint_files_only(monkeypatch, assets, tmp_path):
    import huggingface_hub

    from demo.backend import BackendError, resolve_checkpoint
    from demo.config import is_hub_id

    assert is_hub_id("someone/envlf-ucm") and is_hub_id("someone/envlf-ucm@v1")
    assert not is_hub_id(str(assets["checkpoint"])) and not is_hub_id("a/b/c")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(assets["checkpoint"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_checkpoint("someone/envlf-ucm@v1", tmp_path) == assets["checkpoint"]
    repo, rev, patterns = calls[0]
    assert (repo, rev) == ("someone/envlf-ucm", "v1")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(patterns)

    def offline(*a, **kw):
        raise OSError("Cannot find the requested files in the local cache.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackendError, match="HF_HUB_OFFLINE=1.*local cache"):
        resolve_checkpoint("someone/envlf-ucm", tmp_path)


def test_gallery_is_indexed_once_and_reused(assets, tmp_path, capsys):
    from demo.backend import load_backend
    from demo.config import load_config

    env = {"ENVLF_CHECKPOINT": str(assets["checkpoint"]), "ENVLF_GALLERY": str(assets["data"]),
           "ENVLF_HOME": str(tmp_path / "home"), "ENVLF_FEEDBACK": str(tmp_path / "fb.csv")}
    first = load_backend(load_config([], env))
    assert first.index_dir.parent == tmp_path / "home" / "indexes" and len(first.index) == 16
    stamp = (first.index_dir / "manifest.json").stat().st_mtime_ns
    second = load_backend(load_config([], env))
    assert second.index_dir == first.index_dir
    assert (second.index_dir / "manifest.json").stat().st_mtime_ns == stamp
    assert "reusing the index" in capsys.readouterr().err


def test_configuration_errors_are_one_line(assets, tmp_path):
    from demo.backend import BackendError, load_backend
    from demo.config import load_config

    home = {"ENVLF_HOME": str(tmp_path / "home")}
    with pytest.raises(BackendError, match="need --checkpoint"):
        load_backend(load_config([], {**home, "ENVLF_INDEX": str(assets["index"])}))
    with pytest.raises(BackendError, match="give --index"):
        load_backend(load_config([], {**home, "ENVLF_CHECKPOINT": str(assets["checkpoint"])}))
    with pytest.raises(BackendError, match="not found"):
        load_backend(load_config([], {**home, "ENVLF_CHECKPOINT": str(tmp_path / "nope")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="cannot read model config"):
        load_backend(load_config([], {**home, "ENVLF_CHECKPOINT": str(tmp_path / "empty"),
                                      "ENVLF_INDEX": str(assets["index"])}))


def test_embedded_default_comes_from_bootstrap(monkeypatch, assets, tmp_path, capsys):
    """Nothing configured: envlf.bootstrap.prepare_default(home, progress) supplies the
    checkpoint and index (faked here: the real one trains a model)."""
    from dataclasses import dataclass

    from demo.backend import console_progress, load_backend
    from demo.config import load_config

    @dataclass
    class DefaultAssets:
        checkpoint: Path
        index: Path
        dataset: Path

    seen = {}

    def prepare_default(home, progress=None):
        seen["home"] = home
        progress(0.5, "training the lite model")
        progress(1.0, "done")
        return DefaultAssets(assets["checkpoint"], assets["index"], assets["data"])

    monkeypatch.setitem(sys.modules, "envlf.bootstrap", types.SimpleNamespace(prepare_default=prepare_default))
    b = load_backend(load_config([], {"ENVLF_HOME": str(tmp_path / "home")}, data_dir=tmp_path / "none"),
                     progress=console_progress())
    assert seen["home"] == tmp_path / "home" and b.source == "embedded demo world" and len(b.index) == 12
    err = capsys.readouterr().err
    assert "embedded demo" in err and " 50% training the lite model" in err


def test_app_module_builds_demo_from_the_environment(monkeypatch, assets):
    for key, value in app_env(assets).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    for name in ("app", "demo.serve"):  # both build the page from the environment on import
        sys.modules.pop(name, None)
    try:
        app = importlib.import_module("app")
        assert isinstance(app.demo, gr.Blocks) and not app.demo.is_running
        assert app.startup.state == "waiting" and app.startup.backend is None  # the import started nothing
        assert app.startup.start().wait(timeout=120)
        assert app.startup.backend.index_dir == assets["index"] and app.startup.final
    finally:
        for name in ("app", "demo.serve"):
            sys.modules.pop(name, None)


def test_launch_serves_only_the_gallery_and_assets(backend, assets):
    from demo.layout import ASSETS, launch_kwargs

    kw = launch_kwargs(backend)
    assert kw["allowed_paths"] == [str((assets["data"] / "images").resolve()), str(ASSETS)]
    assert kw["max_file_size"] == "20MB" and kw["theme"] is not None


# -- served end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(handlers):
    with serving(handlers) as demo:
        yield demo


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.local_url, verbose=False)


def test_client_text_query_returns_k_results_with_both_scores(client, served):
    assert served.max_file_size == 20 * gr.FileSize.MB  # uploads above 20 MB are refused
    gallery, table, status, scores, emap, _geo = client.predict(QUERY, 5, True, 16, api_name="/text_to_image")
    assert len(gallery) == 5 and all(Path(g["image"]).is_file() for g in gallery)
    assert gallery[0]["caption"].startswith("#1 · ITM ")
    assert table["headers"][:5] == ["#", "image", "class", "ITC cos", "ITM p"]
    assert len(table["data"]) == 5 and all(r[3] is not None and r[4] is not None for r in table["data"])
    assert "re-rank" in status and scores["type"] == "plotly" and emap["type"] == "plotly"


def test_client_attention_map_has_the_tile_size(client):
    client.predict(QUERY, 4, True, 8, api_name="/text_to_image")  # results live in the client's session
    tile, overlay, words, details = client.predict(1, "sentence", api_name="/t2i_attention")
    assert Image.open(tile).size == Image.open(overlay).size == (48, 48)
    assert words["choices"][0] == ["whole sentence", "sentence"] and details.startswith("#1 · image ")
    tile, overlay = client.predict("a green block", "8", "sentence", api_name="/attention")
    assert Image.open(overlay).size == (48, 48)


def test_client_feedback_appends_one_row(client, assets):
    before, _ = feedback_rows(assets["feedback"])
    client.predict(QUERY, 4, True, 8, api_name="/text_to_image")
    message = client.predict(3, "3", api_name="/t2i_relevant")
    assert message.startswith("Saved: result #3")
    n, df = feedback_rows(assets["feedback"])
    assert n == before + 1
    row = df.iloc[-1]
    assert (row["query_text"], row["rank"], row["label"], row["grade"]) == (QUERY, 3, "relevant", 3)
    assert row["annotator"].startswith("anon-") and not np.isnan(row["itm_score"])


def test_client_more_like_this(client):
    client.predict(QUERY, 4, True, 8, api_name="/text_to_image")
    gallery, table, status, _, _, _ = client.predict(1, 5, api_name="/more_like_this")
    assert len(gallery) == 5 and "images like" in status and all(r[4] is None for r in table["data"])


def test_client_image_query_returns_captions(client, assets):
    from gradio_client import handle_file

    tile = assets["data"] / "images" / "5.png"
    table, status, emap = client.predict(handle_file(str(tile)), "", 4, True, 8, api_name="/image_to_text")
    assert len(table["data"]) == 4 and "captions" in status
    table, _, _ = client.predict(None, "5", 3, False, 0, api_name="/image_to_text")
    assert len(table["data"]) == 3


def test_client_gets_readable_errors(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="query is empty"):
        client.predict("", 5, True, 8, api_name="/text_to_image")
    with pytest.raises(AppError, match="10,000 characters"):
        client.predict("y" * 10_000, 5, True, 8, api_name="/text_to_image")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a definitely not a picture")
    with pytest.raises(AppError, match="Cannot use this upload"):
        client.predict(handle_file(str(bad)), "", 4, True, 8, api_name="/image_to_text")
