"""The image side through ONNX Runtime: the same embeddings and tokens as torch, and an index
built with `--onnx` (as a process) that holds the same numbers as one built with torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from envlf.model.core import create_model  # noqa: E402
from envlf.model.onnx import load_image_encoder, onnx_path  # noqa: E402
from envlf.search.index import GalleryIndex  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_onnx_image_side_equals_torch_and_is_exported_once_per_model(tmp_path, runtime):
    """The ONNX export run by ONNX Runtime or compiled by OpenVINO (fp32) gives torch's numbers."""
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    enc = load_image_encoder(model, ckpt, runtime)
    size = model.config.vision.image_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        e, t = model.encode_image(x, return_tokens=True)
    e2, t2 = enc.encode_image(x, return_tokens=True)
    assert e2.shape == e.shape and t2.shape == t.shape
    assert torch.allclose(e, e2, atol=1e-5) and torch.allclose(t, t2, atol=1e-4)
    stamp = onnx_path(ckpt).with_suffix(".json")
    assert json.loads(stamp.read_text())["model_fingerprint"] == model.fingerprint()
    mtime = onnx_path(ckpt).stat().st_mtime_ns
    load_image_encoder(model, ckpt)
    assert onnx_path(ckpt).stat().st_mtime_ns == mtime  # the same model: not exported again
    with torch.no_grad():
        model.image_proj.weight.mul_(2)  # another model: exported again
    load_image_encoder(model, ckpt)
    assert json.loads(stamp.read_text())["model_fingerprint"] == model.fingerprint()
    with pytest.raises(ValueError, match="takes pixels"):
        enc.encode_image(features=torch.zeros(1))


def test_index_build_with_onnx_as_a_process_holds_the_torch_numbers(tiny_data, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    torch.manual_seed(0)
    ckpt = create_model("tiny").save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "ENVLF_HOME": str(home), "HOME": str(home), "PYTHONPATH": str(REPO)}
    for name, extra in (("torch", []), ("onnx", ["--onnx"]), ("openvino", ["--runtime", "openvino"])):
        r = subprocess.run([sys.executable, "-m", "envlf", "index", "build", "--checkpoint", str(ckpt), "--source",
                            str(tiny_data), "--out", str(tmp_path / name), "--workers", "2", *extra],
                           capture_output=True, text=True, env=env, cwd=home, timeout=600)
        assert r.returncode == 0, r.stderr
    a = GalleryIndex.load(tmp_path / "torch")
    for name in ("onnx", "openvino"):
        b = GalleryIndex.load(tmp_path / name)
        assert len(a) == len(b) == 16 and a.metadata["image_id"].tolist() == b.metadata["image_id"].tolist()
        assert np.abs(np.asarray(a.embeddings) - np.asarray(b.embeddings)).max() < 1e-5
        assert np.abs(np.asarray(a.tokens, np.float32) - np.asarray(b.tokens, np.float32)).max() < 2e-3  # float16
    assert onnx_path(ckpt).is_file()
    # query time: an uploaded image searched with --onnx gets the torch answer (same captions in
    # the same order, ITC and ITM within print rounding of float noise)
    from envlf.data.datasets import load_dataset

    image = str(load_dataset(tiny_data).records[3].path)
    answers = {}
    for name, extra in (("torch", []), ("onnx", ["--onnx"]), ("openvino", ["--runtime", "openvino"])):
        r = subprocess.run([sys.executable, "-m", "envlf", "search", "--checkpoint", str(ckpt), "--index",
                            str(tmp_path / "torch"), "--image", image, "-k", "8", *extra],
                           capture_output=True, text=True, env=env, cwd=home, timeout=600)
        assert r.returncode == 0, r.stderr
        answers[name] = [line.split() for line in r.stdout.splitlines() if "itc=" in line]
    assert len(answers["torch"]) == 8
    for name in ("onnx", "openvino"):
        assert len(answers[name]) == 8
        for t, o in zip(answers["torch"], answers[name]):
            assert t[0] == o[0] and t[3:] == o[3:]  # rank, count, caption
            for a_, b_ in zip(t[1:3], o[1:3]):  # itc=..., itm=...
                assert abs(float(a_.split("=")[1]) - float(b_.split("=")[1])) <= 0.002


def test_the_lite_model_exports_matches_torch_and_is_left_as_it_was(tmp_path):
    """The shipped architecture (multi-level trunk maps pooled to one grid) exports too, and the
    export leaves the torch model in eval mode: it once left dropout on everywhere (the index's
    caption embeddings were then noisy) and, before that, failed on the lite trunk's pooling."""
    torch.manual_seed(0)
    model = create_model("lite").eval()
    x = torch.rand(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.no_grad():
        before = model.encode_image(x)
    enc = load_image_encoder(model, model.save_pretrained(tmp_path / "ckpt"))
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        e, t = model.encode_image(x, return_tokens=True)
    e2, t2 = enc.encode_image(x, return_tokens=True)
    assert torch.equal(e, before)
    assert torch.allclose(e, e2, atol=1e-4) and torch.allclose(t, t2, atol=1e-3)


def test_the_app_encodes_uploads_with_onnx_when_asked_and_answers_as_torch(tmp_path):
    """`python app.py --onnx fp32` (ENVLF_ONNX): an uploaded query image goes through the ONNX
    image side, and image -> text gives the captions torch gives, in the same order."""
    from PIL import Image

    from app_support import app_env, make_app_assets
    from demo.backend import load_backend
    from demo.config import load_config
    from demo.handlers import Handlers
    from envlf.data.datasets import load_dataset
    from envlf.model.onnx import OnnxImageEncoder, OpenVinoImageEncoder

    assets = make_app_assets(tmp_path / "assets")
    upload = Image.open(load_dataset(assets["data"]).records[5].path).convert("RGB")
    tables = {}
    for choice, kind in (("off", type(None)), ("fp32", OnnxImageEncoder), ("openvino", OpenVinoImageEncoder)):
        config = load_config(argv=["--onnx", choice], env=app_env(assets), data_dir=tmp_path / "no-data")
        backend = load_backend(config)
        assert type(backend.engine.image_encoder) is kind
        tables[choice] = Handlers(backend).image_to_text(upload, "", k=8, rerank=True, rerank_k=4).table
    assert tables["off"].iloc[:, 1].tolist() == tables["fp32"].iloc[:, 1].tolist() == \
        tables["openvino"].iloc[:, 1].tolist()
    with pytest.raises(SystemExit, match="ENVLF_ONNX"):
        load_config(argv=[], env={**app_env(assets), "ENVLF_ONNX": "yes"}, data_dir=tmp_path / "no-data")


def test_openvino_bf16_is_close_to_torch_and_a_bad_runtime_gets_one_line(tmp_path):
    """openvino-bf16 computes in bfloat16 where the CPU can (elsewhere in fp32): the embeddings
    stay close to torch's (the ranking check is `envlf bench image-encoder`'s mR); an unknown
    runtime is refused by name."""
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    x = torch.randn(4, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.no_grad():
        e = model.encode_image(x)
    e2 = load_image_encoder(model, ckpt, "openvino-bf16").encode_image(x)
    assert e2.shape == e.shape and torch.nn.functional.cosine_similarity(e, e2).min() > 0.99
    assert load_image_encoder(model, ckpt, "torch") is None
    with pytest.raises(ValueError, match="image runtime must be one of"):
        load_image_encoder(model, ckpt, "tensorrt")


def test_bench_image_encoder_runs_each_path_in_its_own_process_and_fp32_keeps_the_ranking(tiny_data, tmp_path):
    """`envlf bench image-encoder` as a process: each runtime is measured in a child process of
    its own (all five in one process crashed at exit once, heap corrupted), fp32 OpenVINO gives
    torch's mR on the split, and a bad --runtimes gets one line."""
    home = tmp_path / "home"
    home.mkdir()
    torch.manual_seed(0)
    ckpt = create_model("tiny").save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "ENVLF_HOME": str(home), "HOME": str(home), "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "envlf", "bench", "image-encoder", "--checkpoint", str(ckpt), "--source",
            str(tiny_data), "--split", "val", "--images", "8", "--batch-size", "4"]
    out = tmp_path / "rows.json"
    r = subprocess.run([*base, "--runtimes", "torch,openvino", "--json", str(out)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["runtime"] for row in rows] == ["torch", "openvino"]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert rows[1]["itc_mR"] == pytest.approx(rows[0]["itc_mR"], abs=1e-6)
    assert rows[1]["reranked_mR"] == pytest.approx(rows[0]["reranked_mR"], abs=1e-6)
    assert "| openvino fp32 |" in r.stdout and "| torch |" in r.stdout
    bad = subprocess.run([*base, "--runtimes", "torch,tensorrt"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "tensorrt" in bad.stderr


def test_openvino_given_a_thread_share_does_not_pin_its_threads(tmp_path):
    """An encoder told its thread count (a Ray actor's share of the machine) leaves core pinning
    off: pinned, two 1-thread actors both sat on core 0 and each ran at half speed; untold, it
    keeps OpenVINO's default. In a child process, as an actor is: compiling models of two thread
    settings in the pytest process corrupted its heap (a later test's subprocess spawn crashed)."""
    torch.manual_seed(0)
    ckpt = create_model("tiny").eval().save_pretrained(tmp_path / "ckpt")
    script = f"""
import json, openvino as ov
from envlf.model.core import load_pretrained
from envlf.model.onnx import load_image_encoder
model = load_pretrained({str(ckpt)!r}).eval()
kind = __import__("sys").argv[1]
c = load_image_encoder(model, {str(ckpt)!r}, "openvino", threads=1 if kind == "shared" else 0).compiled
print(json.dumps({{"pin": c.get_property("ENABLE_CPU_PINNING"), "threads": int(c.get_property("INFERENCE_NUM_THREADS")),
                   "default_pin": ov.Core().get_property("CPU", "ENABLE_CPU_PINNING")}}))
"""
    got = {}
    for kind in ("shared", "alone"):
        r = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-2000:]
        got[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["shared"]["pin"] is False and got["shared"]["threads"] == 1
    assert got["alone"]["pin"] == got["alone"]["default_pin"]
