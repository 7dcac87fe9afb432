"""Vision encoder: a trunk (CNN feature maps or ViT tokens) + a ViT module -> [CLS] + P tokens.

CNN trunk (``lite``): timm ``features_only`` gives maps at several strides; the coarser ones
are upsampled to the finest selected grid and concatenated (B, C, g, g). This map is what a
frozen-trunk run caches once. The ViT module projects it to tokens, prepends [CLS], adds
learned position embeddings and runs a few transformer blocks, like the ViT "hybrid".

ViT trunk (``base``): timm's VisionTransformer gives [CLS] + P tokens itself; the ViT module
then adds ``layers`` extra blocks (zero for the paper-size model).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EnVLFConfig, VisionConfig


def _blocks(v: VisionConfig) -> nn.ModuleList:
    from timm.models.vision_transformer import Block

    return nn.ModuleList(
        Block(v.width, v.heads, mlp_ratio=v.mlp_ratio, qkv_bias=True, proj_drop=v.dropout)
        for _ in range(v.layers)
    )


class CNNTrunk(nn.Module):
    """timm CNN -> multi-level feature map at the finest selected stride, (B, C, g, g)."""

    def __init__(self, v: VisionConfig, pretrained: bool):
        super().__init__()
        import timm

        self.body = timm.create_model(v.trunk, pretrained=pretrained and v.trunk_weights == "timm",
                                      features_only=True, out_indices=tuple(v.feature_levels))
        self.channels = sum(self.body.feature_info.channels())
        if v.level_grid not in ("finest", "coarsest"):
            raise ValueError(f"vision.level_grid must be 'finest' or 'coarsest', not {v.level_grid!r}")
        self.level_grid = v.level_grid
        if pretrained and v.trunk_weights and v.trunk_weights.startswith("package:"):
            self._load_package_weights(v.trunk_weights)

    def _load_package_weights(self, source: str) -> None:
        from . import weights

        if source != f"package:{weights.LITE0_PACKAGE}":
            raise weights.WeightsUnavailable(f"no packaged weights for trunk source {source!r}")
        full = weights.lite0_timm_state_dict()
        own = self.body.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise ValueError(f"packaged Lite0 weights lack {len(missing)} trunk tensors, e.g. {missing[:3]}")
        self.body.load_state_dict({k: full[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.body(x)  # list of (B, C_i, H_i, W_i), finest first
        if self.level_grid == "coarsest":
            size = maps[-1].shape[-2:]
            maps = [F.adaptive_avg_pool2d(m, size) for m in maps[:-1]] + [maps[-1]]
        else:
            size = maps[0].shape[-2:]
            maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, dim=1)  # (B, C, g, g)


class ViTTrunk(nn.Module):
    """timm VisionTransformer -> (B, 1 + P, D) tokens after its final norm."""

    def __init__(self, v: VisionConfig, pretrained: bool):
        super().__init__()
        import timm

        self.body = timm.create_model(v.trunk, pretrained=pretrained and v.trunk_weights == "timm",
                                      img_size=v.image_size, num_classes=0)
        if getattr(self.body, "num_prefix_tokens", 1) != 1:
            raise ValueError(f"ViT trunk {v.trunk!r} must have exactly one prefix ([CLS]) token")
        self.channels = self.body.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)  # (B, 1 + P, D)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EnVLFConfig, pretrained: bool = True):
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.grid = cfg.grid_size
        if v.trunk_kind == "cnn":
            if v.layers < 1:
                raise ValueError("a CNN trunk needs at least one ViT-module layer to form its [CLS] token")
            self.trunk = CNNTrunk(v, pretrained)
            self.proj_in = nn.Linear(self.trunk.channels, v.width)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, v.width))
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, v.width) * 0.02)
        elif v.trunk_kind == "vit":
            self.trunk = ViTTrunk(v, pretrained)
            self.proj_in = nn.Identity() if self.trunk.channels == v.width else nn.Linear(self.trunk.channels, v.width)
        else:
            raise ValueError(f"vision.trunk_kind must be 'cnn' or 'vit', not {v.trunk_kind!r}")
        self.blocks = _blocks(v)
        self.norm = nn.LayerNorm(v.width) if v.layers else nn.Identity()
        self.set_trunk_trainable(not v.freeze_trunk)

    # -- trunk ------------------------------------------------------------------------------
    def set_trunk_trainable(self, trainable: bool) -> None:
        self.trunk_trainable = trainable
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        self.trunk.train(self.training and trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen trunk stays in eval mode: its BatchNorm statistics must not drift.
        self.trunk.train(mode and self.trunk_trainable)
        return self

    def trunk_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> trunk output: (B, C, g, g) map or (B, 1+P, D) tokens.

        This is the tensor a frozen-trunk run caches."""
        if self.trunk_trainable:
            return self.trunk(pixels)
        with torch.no_grad():
            return self.trunk(pixels)

    # -- ViT module ---------------------------------------------------------------------------
    def tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Trunk output -> (B, 1 + P, width) tokens, [CLS] first, P = grid**2 (row-major)."""
        if self.cfg.trunk_kind == "cnn":
            B, C, H, W = feats.shape
            if H * W != self.grid**2:
                raise ValueError(f"trunk map is {H}x{W}, the config expects a {self.grid}x{self.grid} grid")
            x = self.proj_in(feats.flatten(2).transpose(1, 2).to(self.proj_in.weight.dtype))  # (B, P, width)
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        else:
            x = self.proj_in(feats)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_features(self.trunk_features(pixels))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, width) -> (B, width) for the ITC embedding."""
        return tokens[:, 0] if self.cfg.pooling == "cls" else tokens.mean(dim=1)
