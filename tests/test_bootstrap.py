"""The embedded default, on a miniature recipe: made once, then only loaded."""

import pytest

from envlf import bootstrap as B
from envlf.search.index import GalleryIndex


@pytest.fixture
def mini(monkeypatch, tmp_path):
    recipe = dict(model="tiny", epochs=1, batch_size=8, val_rerank_k=2, overrides=[])
    plan = (B.Stage("quick", "world-quick", 12, "world-quick", "world-quick", recipe, "quick"),
            B.Stage("full", "world", 20, "world-lite", "world", recipe, "full"))
    monkeypatch.setattr(B, "stages", lambda size=None: plan)
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    return tmp_path / "home"


def test_each_stage_is_published_and_a_second_builder_leaves(mini):
    import json
    import threading

    a = B.prepare_default(mini, workers=0, status=mini / B.STATUS_FILE)
    assert B.published(mini)[0].name == "full" and B.published(mini)[1] == a
    assert json.loads((mini / B.STATUS_FILE).read_text())["state"] == "done"
    assert len(GalleryIndex.load(mini / "indexes" / "world-quick")) == 12  # the quick stage stays servable
    held, release = threading.Event(), threading.Event()

    def hold():
        with B._lock(mini / B.LOCK_FILE):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(30)
        with pytest.raises(B.BuildBusy):
            B.prepare_default(mini, workers=0, wait=False)
    finally:
        release.set()
        t.join()


def test_a_failed_build_says_so_in_its_status(mini, monkeypatch):
    import json

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(B, "build_stage", boom)
    with pytest.raises(OSError):
        B.prepare_default(mini, workers=0, status=mini / B.STATUS_FILE)
    st = json.loads((mini / B.STATUS_FILE).read_text())
    assert st["state"] == "failed" and "disk full" in st["error"] and st["pid"] is None
    assert B.published(mini) is None


def test_prepare_default_builds_then_reuses(mini):
    seen = []
    a = B.prepare_default(mini, progress=lambda f, m: seen.append((f, m)), workers=0)
    assert (a.checkpoint / "model.safetensors").exists() and (a.dataset / "dataset.json").exists()
    idx = GalleryIndex.load(a.index)
    assert len(idx) == 20  # every tile of the world, all splits
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    mtime = (a.checkpoint / "model.safetensors").stat().st_mtime_ns
    seen.clear()
    b = B.prepare_default(mini, progress=lambda f, m: seen.append((f, m)), workers=0)
    assert b == a and (a.checkpoint / "model.safetensors").stat().st_mtime_ns == mtime
    assert not any("training" in m or "generating" in m or "indexing" in m for _, m in seen)


def test_index_of_an_older_model_is_rebuilt(mini):
    a = B.prepare_default(mini, workers=0)
    fp = GalleryIndex.load(a.index).fingerprint
    (a.index / "manifest.json").write_text((a.index / "manifest.json").read_text().replace(
        GalleryIndex.load(a.index).model_fingerprint, "0" * 16))
    B.prepare_default(mini, workers=0)
    idx = GalleryIndex.load(a.index)
    assert idx.model_fingerprint != "0" * 16 and len(idx) == 20
    assert fp  # the old one existed


def test_world_of_an_older_generator_is_remade_with_its_model(mini):
    import json

    a = B.prepare_default(mini, workers=0)
    meta = json.loads((a.dataset / "dataset.json").read_text())
    meta["generator"] -= 1  # as a cache left by the previous release would say
    (a.dataset / "dataset.json").write_text(json.dumps(meta))
    mtime = (a.checkpoint / "model.safetensors").stat().st_mtime_ns
    seen = []
    b = B.prepare_default(mini, progress=lambda f, m: seen.append(m), workers=0)
    assert any("generating" in m for m in seen) and any("training" in m for m in seen)
    assert json.loads((b.dataset / "dataset.json").read_text())["generator"] == meta["generator"] + 1
    assert (b.checkpoint / "model.safetensors").stat().st_mtime_ns != mtime
    assert len(GalleryIndex.load(b.index)) == 20


def test_model_of_another_recipe_is_retrained(mini):
    import json

    a = B.prepare_default(mini, workers=0)
    tc = json.loads((a.checkpoint.parent / "train_config.json").read_text())
    tc["epochs"] += 1  # as a model trained by an earlier release's recipe would say
    (a.checkpoint.parent / "train_config.json").write_text(json.dumps(tc))
    mtime = (a.checkpoint / "model.safetensors").stat().st_mtime_ns
    seen = []
    b = B.prepare_default(mini, progress=lambda f, m: seen.append(m), workers=0)
    assert any("training" in m for m in seen) and not any("generating" in m for m in seen)
    assert (b.checkpoint / "model.safetensors").stat().st_mtime_ns != mtime
    assert json.loads((b.checkpoint.parent / "train_config.json").read_text())["epochs"] == tc["epochs"] - 1
    from envlf.model.core import load_pretrained

    assert len(GalleryIndex.load(b.index, load_pretrained(b.checkpoint))) == 20  # the index is the new model's
