"""The open_clip route (issue 20): CLIP-family towers under EnVLF's fusion encoder. No hub is
reachable here, so every test builds open_clip architectures with random weights and loads
them through the real weight-source code (file:, hub-file: with the download replaced)."""

import json
import pickle
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from envlf.model import openclip as oc  # noqa: E402
from envlf.model.config import OPEN_CLIP, get_config  # noqa: E402
from envlf.model.core import create_model, load_pretrained  # noqa: E402
from envlf.model.weights import WeightsUnavailable  # noqa: E402

from test_cli import run  # noqa: E402

CAPTIONS = [
    "Many planes are parked next to a long building in an airport.",
    "there are two  tennis courts, arranged neatly!",
    "A storage-tank's 3 white tanks beside a road 25m wide",
    "lots of green trees and a river with a bridge over it",
]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A random tiny CLIP saved the way RemoteCLIP publishes its .pt: a plain state dict."""
    torch.manual_seed(0)
    clip = oc.build_clip("test-clip-tiny", None, False).eval()
    path = tmp_path_factory.mktemp("clip") / "RemoteCLIP-test.pt"
    torch.save(clip.state_dict(), path)
    return clip, path


def _with_weights(source: str):
    cfg = get_config("clip-tiny")
    cfg.vision.trunk_weights = source
    return create_model(cfg).eval()


def test_tokenizer_gives_open_clips_ids(tiny_data):
    captions = CAPTIONS + [c for r in json.loads((tiny_data / "dataset.json").read_text())["images"][:10]
                           for c in (s["raw"] for s in r["sentences"])]
    tok = oc.load_clip_tokenizer()
    enc = tok(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ref = open_clip.tokenize(captions)
    for i in range(len(captions)):
        n = int(enc["attention_mask"][i].sum())
        assert enc["input_ids"][i, :n].tolist() == ref[i, :n].tolist(), captions[i]
        assert ref[i, n:].eq(0).all()  # open_clip pads after its end-of-text token


def test_itc_before_training_is_the_clip_models_own(clip_file):
    """Weights through file:, and EnVLF's embeddings equal CLIP's encode_image / encode_text."""
    clip, path = clip_file
    model = _with_weights(f"file:{path}")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        img, ref_img = model.encode_image(x), clip.encode_image(x, normalize=True)
        txt, ref_txt = model.encode_text(CAPTIONS), clip.encode_text(open_clip.tokenize(CAPTIONS), normalize=True)
    assert torch.allclose(img, ref_img, atol=1e-5) and torch.allclose(txt, ref_txt, atol=1e-5)
    assert model.temperature_scale().item() == pytest.approx(clip.logit_scale.exp().item(), rel=1e-5)
    # the checkpoint rebuilds without open_clip weights or the hub: same embeddings, same tokenizer
    again = load_pretrained(model.save_pretrained(path.parent / "ckpt"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(CAPTIONS), txt)
    assert again.tokenizer(CAPTIONS[0])["input_ids"] == model.tokenizer(CAPTIONS[0])["input_ids"]


def test_hub_file_source_downloads_then_loads(clip_file, monkeypatch):
    """hub-file:<user>/<repo>/<file> asks huggingface_hub for that file (replaced here: no hub)."""
    clip, path = clip_file
    asked = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: asked.append((repo, name)) or str(path))
    model = _with_weights("hub-file:chendelong/RemoteCLIP/RemoteCLIP-test.pt")
    assert asked == [("chendelong/RemoteCLIP", "RemoteCLIP-test.pt")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), clip.encode_image(x, normalize=True), atol=1e-5)


def test_hub_file_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="cannot fetch RemoteCLIP-ViT-B-32.pt") as e:
        oc.clip_state_dict("ViT-B-32", "hub-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt")
    assert "\n" not in str(e.value)


class _Payload:
    def __reduce__(self):  # what a hostile pickle does: run code on load
        return (print, ("pickle ran",))


def test_weights_only_a_pickle_with_code_is_refused(tmp_path, capsys, clip_file):
    bad = tmp_path / "bad.pt"
    with bad.open("wb") as f:
        pickle.dump({"visual.proj": _Payload()}, f)
    with pytest.raises(ValueError, match="cannot read CLIP weights"):
        oc.read_state_dict(bad)
    assert "pickle ran" not in capsys.readouterr().out
    # a DDP-wrapped training checkpoint and a .safetensors copy read as the plain state dict
    clip, path = clip_file
    sd = clip.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    assert set(oc.read_state_dict(tmp_path / "ddp.pt")) == set(sd)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(oc.read_state_dict(tmp_path / "w.safetensors")["visual.conv1.weight"], sd["visual.conv1.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = oc.build_clip("test-clip-tiny", None, False).state_dict()
    other.pop("visual.conv1.weight")
    torch.save(other, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="do not fit open_clip 'test-clip-tiny': 1 missing"):
        _with_weights(f"file:{tmp_path / 'w.pt'}")
    with pytest.raises(ValueError, match="unknown open_clip weight source"):
        _with_weights("s3://bucket/w.pt")


@pytest.mark.parametrize("name", sorted(OPEN_CLIP))
def test_named_configs_match_open_clips_architectures(name):
    """Each preset's embed_dim, token width and patch are those of its open_clip model."""
    cfg = get_config(name)
    arch = oc.architecture(cfg.vision.trunk)
    assert cfg.embed_dim == arch["embed_dim"]
    assert cfg.vision.width == arch["vision_cfg"]["width"]
    assert cfg.vision.patch_size == arch["vision_cfg"]["patch_size"]
    assert cfg.vision.image_size == arch["vision_cfg"]["image_size"]


def test_remoteclip_b32_builds_with_random_weights():
    """The README's online model, built offline without its weights: ViT-B/32 tokens (7x7 + CLS)
    into the fusion encoder, 512-d ITC."""
    model = create_model("remoteclip-b32", pretrained=False).eval()
    with torch.no_grad():
        out = model.score(torch.randn(1, 3, 224, 224), ["a harbour with boats"])
        tokens = model.image_tokens(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 50, 768) and model.config.grid_size == 7
    assert out["itm"].shape == (1, 1) and model.encode_text(["x"]).shape == (1, 512)


def test_the_route_trains_and_evaluates_through_the_scripts(tiny_data, tmp_path):
    """`envlf train --model clip-tiny` and `envlf evaluate` as processes on an empty home, with
    their worker pools: the frozen CLIP image tower's tokens are cached like Lite0's maps."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "run"
    common = ["--data", str(tiny_data), "--out", str(out), "--model", "clip-tiny", "--epochs", "1",
              "--batch-size", "8", "--workers", "2", "--no-progress", "--val-rerank-k", "4", "--device", "cpu"]
    refused = run(["train", *common], home)
    assert refused.returncode != 0 and "use --augment none" in refused.stderr.strip().splitlines()[-1]
    got = run(["train", *common, "--augment", "none"], home)
    assert got.returncode == 0, got.stderr[-3000:]
    assert list((home / "envlf" / "cache" / "features").glob("trunk-*.safetensors"))
    model = load_pretrained(out / "best")
    assert model.config.vision.trunk_kind == "open_clip" and model.config.lineage[-1]["event"] == "train"
    ev = run(["evaluate", "--checkpoint", str(out / "best"), "--data", str(tiny_data), "--split", "val",
              "--rerank-k", "4", "--workers", "2", "--device", "cpu"], home)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "ITC + ITM top4 (expected)" in ev.stdout
    assert Path(out / "best" / "config.json").exists()


def test_the_app_serves_a_clip_checkpoint(tmp_path):
    """A trained open_clip model is served like any checkpoint: load it in the running app,
    search, its attention map per word, image -> text."""
    from app_support import make_app_assets, make_backend
    from demo.handlers import Handlers

    assets = make_app_assets(tmp_path)
    handlers = Handlers(make_backend(assets))
    torch.manual_seed(0)
    model = create_model("clip-tiny").eval()
    md = handlers.load_model(str(model.save_pretrained(tmp_path / "clip")), progress=lambda *a, **k: None)
    assert model.fingerprint() in md
    out = handlers.text_to_image("a red square on the left", k=3, rerank=True, rerank_k=4)
    assert model.fingerprint() in out.status and len(out.state["items"]) == 3 and out.table["ITM p"].notna().all()
    ex = handlers.explain_t2i(out.state, 1, "1")  # the map of "red"
    assert ex.overlay.size == ex.image.size and ex.words.value == "1"
    i2t = handlers.image_to_text(str(next(Path(assets["data"]).rglob("*.png"))), "", k=3, rerank=True, rerank_k=4)
    assert len(i2t.table) == 3
