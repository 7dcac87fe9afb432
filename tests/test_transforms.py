"""Preprocessing: size, normalisation, round trip for display, and the dihedral group."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from envlf.model.config import VisionConfig, tiny
from envlf.data.transforms import RandomDihedral, build_transform, denormalize, dihedral, dihedral_inverse


def _gradient(w=40, h=30) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = 77
    return Image.fromarray(a)


def test_shape_dtype_and_normalisation():
    cfg = VisionConfig(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    t = build_transform(cfg)
    x = t(Image.new("RGB", (50, 20), (255, 0, 128)))  # non-square input: resized, not cropped
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    expect = [(1.0 - 0.5) / 0.2, (0.0 - 0.4) / 0.25, (128 / 255 - 0.3) / 0.5]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 32), expect[c]), atol=1e-4)


def test_other_modes_become_rgb():
    t = build_transform(tiny().vision)
    assert t(Image.new("L", (10, 10), 100)).shape == (3, 64, 64)
    assert t(Image.new("RGBA", (10, 10), (1, 2, 3, 0))).shape == (3, 64, 64)


def test_denormalize_round_trip():
    cfg = VisionConfig(image_size=24)
    img = _gradient(24, 24)
    x = build_transform(cfg)(img)
    back = denormalize(x, cfg)
    assert back.dtype == np.uint8 and back.shape == (24, 24, 3)
    assert np.abs(back.astype(int) - np.asarray(img).astype(int)).max() <= 1
    batch = denormalize(torch.stack([x, x]), cfg)
    assert batch.shape == (2, 24, 24, 3)
    with pytest.raises(ValueError):
        denormalize(torch.zeros(4, 8, 8), cfg)


def test_eval_transform_is_deterministic_and_ignores_augment():
    cfg = VisionConfig(image_size=16)
    img = _gradient()
    t = build_transform(cfg, train=False, augment="d4")
    assert t.augment == "none"
    assert torch.equal(t(img), t(img))


@pytest.mark.parametrize("augment,allowed", [("flip", (0, 2, 4, 6)), ("d4", tuple(range(8)))])
def test_train_augment_outputs_are_group_elements(augment, allowed):
    cfg = VisionConfig(image_size=16)
    img = _gradient(16, 16)
    plain = build_transform(cfg)(img)
    t = build_transform(cfg, train=True, augment=augment)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        y = t(img)
        ks = [k for k in range(8) if torch.allclose(y, dihedral(plain, k))]
        assert ks and set(ks) <= set(allowed)
        seen.add(ks[0])
    assert seen == set(allowed)


def test_bad_augment_name():
    with pytest.raises(ValueError, match="augment"):
        build_transform(VisionConfig(), train=True, augment="rotate")


def test_transform_pickles():
    t = build_transform(VisionConfig(image_size=8), train=True, augment="d4")
    t2 = pickle.loads(pickle.dumps(t))
    assert t2(_gradient()).shape == (3, 8, 8)


def test_dihedral_group():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    # 8 distinct transforms
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(outs[0], x)
    assert torch.equal(outs[1], torch.rot90(x, 1, dims=(-2, -1)))  # 90° counter-clockwise
    assert torch.equal(outs[4], torch.flip(x, dims=(-1,)))  # horizontal flip
    assert torch.equal(outs[6], torch.flip(x, dims=(-2,)))  # vertical flip
    for k in range(8):
        assert torch.equal(dihedral(outs[k], dihedral_inverse(k)), x)
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_dihedral_on_feature_maps_and_per_sample():
    fmap = torch.randn(3, 5, 6, 6)  # (B, C, H, W) cached trunk features
    ks = [0, 3, 5]
    y = dihedral(fmap, ks)
    for b, k in enumerate(ks):
        assert torch.equal(y[b], dihedral(fmap[b], k))
    assert torch.equal(dihedral(fmap, torch.tensor(ks)), y)
    # non-square map: flips fine, mixed rotations refused
    rect = torch.randn(2, 4, 3, 5)
    assert dihedral(rect, [0, 4]).shape == rect.shape
    with pytest.raises(ValueError, match="square"):
        dihedral(rect, [0, 1])


def test_random_dihedral_module():
    torch.manual_seed(0)
    m = RandomDihedral("flip")
    x = torch.randn(3, 4, 4)
    for _ in range(10):
        y = m(x)
        assert any(torch.equal(y, dihedral(x, k)) for k in (0, 2, 4, 6))
