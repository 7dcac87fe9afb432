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


def _same_pad(x, k, s):
    """TensorFlow 'SAME' padding (the weights come from TF): extra pixel goes bottom/right."""
    ih, iw = x.shape[-2:]
    ph = max((-(-ih // s) - 1) * s + k - ih, 0)
    pw = max((-(-iw // s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=1e-3)


def reference_lite0(sd, x):
    """Independent forward of EfficientNet-Lite0 from the package's state dict."""
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    x = relu6(_bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    b, cin = 0, 32
    for repeats, k, stride, expand, cout in LITE0_STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"_blocks.{b}."
            h = x
            if expand != 1:
                h = relu6(_bn(F.conv2d(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
            w = sd[p + "_depthwise_conv.weight"]
            h = relu6(_bn(F.conv2d(_same_pad(h, k, s), w, stride=s, groups=w.shape[0]), sd, p + "_bn1"))
            h = _bn(F.conv2d(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
            x = x + h if (s == 1 and cin == cout) else h
            b, cin = b + 1, cout
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
    model.load_state_dict(weights.lite0_timm_state_dict(), strict=True)
    return model


def test_mapping_matches_independent_reference(mapped):
    from envlf.model import weights

    sd = weights.lite0_package_state_dict()
    x = _photos()
    with torch.no_grad():
        ref = reference_lite0(sd, x)
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

    sd = weights.lite0_package_state_dict()
    items = list(sd.items())
    shifted = dict(items[1:] + items[:1])  # every tensor one place off
    with pytest.raises(ValueError, match="does not fit"):
        weights.map_lite0_to_timm(shifted, timm.create_model("tf_efficientnet_lite0").state_dict())


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
