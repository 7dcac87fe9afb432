"""open_clip towers under EnVLF's fusion encoder: CLIP-family image and text encoders
(OpenAI CLIP, RemoteCLIP, GeoRSCLIP) with our ITM head and re-ranking on top.

The image tower gives [CLS] + P patch tokens after ``ln_post`` (what CLIP pools and projects);
the text tower gives every token's state after ``ln_final`` (CLIP pools the end-of-text one).
The model's ITC projections start as CLIP's own (``visual.proj``, ``text_projection``), so
before any training EnVLF's ITC ranking *is* the CLIP model's zero-shot ranking; the fusion
encoder reads those tokens and trains from random.

Architectures come from open_clip's own model configs (``ViT-B-32``, ``ViT-L-14``...;
``test-clip-tiny`` here is a small one for tests). Weights, when the model is built fresh:

- ``open_clip:<tag>``: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), which
  open_clip downloads from the hub;
- ``hub-file:<user>/<repo>/<path in repo>``: one file from a Hugging Face model repo
  (RemoteCLIP: ``hub-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt``);
- ``file:<path>``: a local ``.pt`` / ``.bin`` / ``.safetensors`` state dict.

A ``.pt`` is read with ``torch.load(weights_only=True)``: plain tensors only, no pickled code
runs. The tokenizer is CLIP's byte-level BPE built from the vocabulary that ships inside the
open_clip wheel, as a Hugging Face fast tokenizer (word ids and character offsets for the
attention maps; saved with every checkpoint), so nothing about text needs the hub.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from envlf.errors import first_line
from envlf.model.weights import WeightsUnavailable

# A CLIP of a few hundred thousand parameters, the architecture tests build with random weights.
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_BUILTIN = {"test-clip-tiny": TINY_ARCH}


def _open_clip():
    try:
        import open_clip  # deferred on purpose: only the open_clip configurations need it
    except ImportError:
        raise WeightsUnavailable("the open_clip towers need the package open_clip_torch "
                                 "(pip install open_clip_torch==3.3.0)") from None
    return open_clip


def _first_line(e: Exception) -> str:
    """"Type: first line of the message", for one-line errors about a weight source."""
    return first_line(e, typed=True, limit=10_000)


def architecture(name: str) -> dict:
    """open_clip's model config (embed_dim, vision_cfg, text_cfg) of a model name."""
    if name in _BUILTIN:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _BUILTIN[name].items()}
    arch = _open_clip().get_model_config(name)
    if arch is None:
        raise ValueError(f"open_clip has no model called {name!r} (open_clip.list_models() lists them)")
    if "hf_model_name" in arch.get("text_cfg", {}) or "timm_model_name" in arch.get("vision_cfg", {}):
        raise ValueError(f"open_clip model {name!r} uses a Hugging Face text or timm image tower; "
                         "EnVLF takes CLIP's own ViT + text transformer (ViT-B-32, ViT-L-14, ...)")
    return arch


def build_clip(name: str, source: str | None, pretrained: bool):
    """The open_clip CLIP of `name`, with the weights of `source` when pretrained."""
    open_clip = _open_clip()
    arch = architecture(name)
    quick_gelu = name.endswith("-quickgelu")  # OpenAI's own weights were trained with QuickGELU
    clip = open_clip.CLIP(**arch, quick_gelu=quick_gelu)
    visual = clip.visual
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(f"open_clip model {name!r} does not pool its [CLS] token; EnVLF needs one")
    if pretrained and source:
        missing, unexpected = clip.load_state_dict(clip_state_dict(name, source), strict=False)
        missing = [k for k in missing if k != "attn_mask"]
        if missing or unexpected:
            raise ValueError(f"weights {source!r} do not fit open_clip {name!r}: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return clip


def clip_state_dict(name: str, source: str) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a weight source string (see the module docstring)."""
    kind, _, rest = source.partition(":")
    if kind == "file":
        path = rest
    elif kind == "hub-file":
        parts = rest.split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"hub-file source must be hub-file:<user>/<repo>/<file>, not {source!r}")
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2])
        except Exception as e:  # offline, missing file, no access: one line either way
            raise WeightsUnavailable(f"cannot fetch {parts[2]} from the hub repo {parts[0]}/{parts[1]}: "
                                     f"{_first_line(e)}") from None
    elif kind == "open_clip":
        open_clip = _open_clip()
        cfg = open_clip.get_pretrained_cfg(name, rest)
        if not cfg:
            raise ValueError(f"open_clip has no pretrained tag {rest!r} for {name!r} "
                             f"(open_clip.list_pretrained() lists them)")
        try:
            path = open_clip.download_pretrained(cfg)
        except Exception as e:
            raise WeightsUnavailable(f"cannot download open_clip weights {name}/{rest}: {_first_line(e)}") from None
    else:
        raise ValueError(f"unknown open_clip weight source {source!r}: use open_clip:<tag>, "
                         "hub-file:<user>/<repo>/<file> or file:<path>")
    return read_state_dict(path)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt / .bin read with weights_only=True (a
    training checkpoint's "state_dict" entry and DDP's "module." prefix are unwrapped)."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"cannot read CLIP weights {path}: {_first_line(e)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip_tokenizer():
    """CLIP's BPE tokenizer (open_clip's vocabulary) as a Hugging Face fast tokenizer. Gives
    the same ids as ``open_clip.tokenize`` for plain-text captions (tests check on real ones);
    it does not run open_clip's ftfy clean-up of broken Unicode."""
    open_clip = _open_clip()
    from transformers import CLIPTokenizer

    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in bpe.encoder.items()}
    merges = [tuple(m) for m, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


class ClipImageTower(nn.Module):
    """CLIP's ViT -> (B, 1 + P, width) tokens after ln_post: the trunk of an open_clip model.
    CLIP's own image projection moves to EnVLF's image_proj (see `Towers`), so it is dropped here."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        visual.proj = None
        self.body = visual
        self.channels = visual.transformer.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.body
        x = v.conv1(x)  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, P, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        return v.ln_post(v.transformer(x))


class ClipTextTower(nn.Module):
    """CLIP's causal text transformer -> every token's state after ln_final, (B, T, width).

    Captions are padded to the batch's longest (not CLIP's 77): with the causal mask a token
    never sees the padding after it, so the end-of-text state equals CLIP's own."""

    def __init__(self, clip: nn.Module, trainable_layers: int):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.fusion_init: list = []  # CLIP's layers do not initialise BERT-style fusion layers
        block = clip.transformer.resblocks[0]
        self.hidden_size = clip.transformer.width
        self._dims = (self.hidden_size, block.attn.num_heads, block.mlp.c_fc.out_features, 1e-5,
                      self.token_embedding.num_embeddings)
        self.set_trainable_layers(trainable_layers)

    def dims(self) -> tuple[int, int, int, float, int]:
        """(hidden, heads, intermediate, layer-norm eps, vocabulary) for the fusion encoder."""
        return self._dims

    def set_trainable_layers(self, n: int) -> None:
        """Fine-tune the top n blocks (and ln_final with them); -1: everything."""
        everything = n < 0
        for p in self.parameters():
            p.requires_grad_(everything)
        if not everything and n:
            for block in list(self.transformer.resblocks)[-n:]:
                block.requires_grad_(True)
            self.ln_final.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.positional_embedding.shape[0]:
            raise ValueError(f"{T} tokens exceed CLIP's context of {self.positional_embedding.shape[0]}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:T]
        x = self.transformer(x, attn_mask=self.attn_mask[:T, :T].to(x.dtype))
        return self.ln_final(x)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The end-of-text token's state (the last attended position), CLIP's sentence vector."""
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.token_embedding


class Towers:
    """The two towers of one open_clip model, and what EnVLF's ITC head starts from: CLIP's
    image and text projections and temperature (None when built with random weights, which
    a checkpoint then fills)."""

    def __init__(self, cfg, pretrained: bool):
        v = cfg.vision
        clip = build_clip(v.trunk, v.trunk_weights, pretrained)
        self.start = None
        if pretrained and v.trunk_weights:
            self.start = {"image_proj": clip.visual.proj.detach().t().clone(),
                          "text_proj": clip.text_projection.detach().t().clone(),
                          "logit_scale": clip.logit_scale.detach().clone()}
        self.image = ClipImageTower(clip.visual)
        self.text = ClipTextTower(clip, cfg.text.trainable_layers)

    @torch.no_grad()
    def start_itc(self, model) -> None:
        """EnVLF's ITC projections and temperature as CLIP's: ITC = the CLIP model before training."""
        if self.start is None:
            return
        for name in ("image_proj", "text_proj"):
            linear, weight = getattr(model, name), self.start[name]
            if linear.weight.shape != weight.shape:
                raise ValueError(f"embed_dim {model.config.embed_dim} differs from {model.config.vision.trunk}'s "
                                 f"{weight.shape[0]}: set embed_dim to match")
            linear.weight.copy_(weight)
            linear.bias.zero_()
        model.logit_scale.copy_(self.start["logit_scale"])
        self.start = None
