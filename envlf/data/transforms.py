"""Image preprocessing: PIL image → normalised tensor, plus the dihedral augmentations.

Nadir (top-down) imagery has no "up": a field rotated by 90° or mirrored is still a field, so
the useful augmentations are the 8 symmetries of the square (the dihedral group D4), not the
crops and colour jitter of natural-image training. ``dihedral(x, k)`` applies one of them to
any (..., H, W) tensor, so the trainer can use it on cached trunk feature maps as well.

Beware: captions that name directions ("a road on the left of the river") become wrong under
a flip or rotation; "none" stays the default.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from envlf.model.config import VisionConfig

AUGMENTS = ("none", "flip", "d4")


def dihedral(x: torch.Tensor, k: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Apply dihedral transform k ∈ [0, 8) over the last two dims of x (..., H, W).

    k % 4 = number of 90° counter-clockwise rotations, k >= 4 = mirror left-right first:
    k=0 identity, 1..3 rotations, 4 horizontal flip, 5..7 flip then rotate. k=6 is the
    vertical flip. ``k`` may also be one value per sample (a length-B sequence or tensor for a
    (B, ...) batch), which needs square maps when rotations are mixed.
    """
    if isinstance(k, torch.Tensor) and k.ndim == 0:
        k = int(k)
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if not 0 <= k < 8:
            raise ValueError(f"dihedral index must be in [0, 8), got {k}")
        if k >= 4:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    ks = [int(v) for v in (k.tolist() if isinstance(k, torch.Tensor) else k)]
    if x.ndim < 3 or len(ks) != x.shape[0]:
        raise ValueError(f"per-sample dihedral needs one k per sample: {len(ks)} for shape {tuple(x.shape)}")
    if x.shape[-1] != x.shape[-2] and any(v % 2 for v in ks):
        raise ValueError("per-sample 90° rotations need square maps (H == W)")
    out = torch.empty_like(x)
    for v in set(ks):  # one call per distinct transform, not per sample
        idx = torch.tensor([i for i, kv in enumerate(ks) if kv == v], device=x.device)
        out[idx] = dihedral(x[idx], v)
    return out


def dihedral_inverse(k: int) -> int:
    """The index of the inverse transform: dihedral(dihedral(x, k), dihedral_inverse(k)) == x."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in [0, 8), got {k}")
    return (4 - k) % 4 if k < 4 else k  # mirrors are their own inverse


class RandomDihedral(torch.nn.Module):
    """Random symmetry of the square for a (C, H, W) tensor.

    group "flip": identity, horizontal, vertical flip, both (= 180° rotation), i.e. k in
    {0, 2, 4, 6}; group "d4": all 8.
    """

    def __init__(self, group: str = "d4"):
        super().__init__()
        if group not in ("flip", "d4"):
            raise ValueError(f"group must be 'flip' or 'd4', got {group!r}")
        self.group = group
        self.choices = (0, 2, 4, 6) if group == "flip" else tuple(range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.choices[int(torch.randint(len(self.choices), ()))]
        return dihedral(x, k)

    def extra_repr(self) -> str:
        return f"group={self.group!r}"


class ImageTransform:
    """PIL image (any mode) → float32 tensor (3, S, S), normalised with the config's mean/std.

    The image is resized, not cropped, to image_size × image_size (bilinear, antialiased):
    remote-sensing tiles are square already, and a crop could cut away the objects a caption
    names. Picklable, so DataLoader workers can use it.
    """

    def __init__(self, vision_cfg: VisionConfig, train: bool = False, augment: str = "none"):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        size = int(vision_cfg.image_size)
        self.image_size = size
        self.train = bool(train)
        # Augmentation only in training: evaluation and search must be deterministic.
        self.augment = augment if train else "none"
        steps: list = [
            v2.ToImage(),
            v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
        if self.augment != "none":
            steps.append(RandomDihedral(self.augment))
        steps.append(v2.Normalize(mean=list(vision_cfg.mean), std=list(vision_cfg.std)))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")  # callers should use data.load_image; be safe anyway
        return self.pipeline(image).as_subclass(torch.Tensor)  # plain tensor, not a tv_tensors.Image

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.image_size}, train={self.train}, augment={self.augment!r})"


def build_transform(vision_cfg: VisionConfig, train: bool = False, augment: str = "none") -> ImageTransform:
    """The preprocessing that goes with a model's vision config.

    ``augment`` ("none", "flip", "d4") applies only when ``train`` is true.
    """
    return ImageTransform(vision_cfg, train=train, augment=augment)


def denormalize(tensor: torch.Tensor, vision_cfg: VisionConfig) -> np.ndarray:
    """Normalised (3, H, W) or (B, 3, H, W) tensor → uint8 (H, W, 3) or (B, H, W, 3) for display."""
    x = tensor.detach().to("cpu", torch.float32)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    mean = torch.tensor(vision_cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(vision_cfg.std, dtype=torch.float32).view(3, 1, 1)
    x = (x * std + mean).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()
