"""The EnVLF model: vision encoder + text encoder (ITC), fusion encoder (ITM / MLM).

Public surface (what training, evaluation, search and the app use):

    model = EnVLF.from_pretrained("runs/ucm-lite")          # or create_model("lite")
    img = model.encode_image(pixels)                         # (B, E) L2-normalised
    txt = model.encode_text(["two planes beside a terminal"])  # (B, E)
    p = model.itm_score(image_tokens, text)                  # (k,) P(match) for re-ranking
    maps = attention_map(model, image, "two planes")          # envlf.explain.gradcam

Losses live in envlf.train.losses; `forward` only wires them together for a training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from envlf.data.transforms import build_transform
from envlf.model import checkpoint
from envlf.model.config import EnVLFConfig, get_config
from envlf.model.fusion import FusionEncoder
from envlf.model.openclip import Towers
from envlf.model.text import TextEncoder, load_tokenizer
from envlf.model.vision import VisionEncoder
from envlf.train import losses as L

TEMPERATURE_RANGE = (0.001, 0.5)  # ALBEF's clamp on the learned ITC temperature


@dataclass
class TextBatch:
    """Tokenised text on a device: ids and mask (B, T), plus, per token, the tokenizer's word
    id and character span in the caption (to turn word-piece attention maps into word and
    phrase maps)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: list[list[int | None]] | None = None
    offsets: list[list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "TextBatch":
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.word_ids, self.offsets)


class EnVLF(nn.Module):
    def __init__(self, config: EnVLFConfig, pretrained: bool = True, tokenizer=None):
        """Build the model. pretrained=True loads the trunk / text weights named in the
        config (offline packages for ``lite``); False builds random weights of the same
        shapes (what `from_pretrained` fills from a checkpoint)."""
        super().__init__()
        self.config = config
        towers = Towers(config, pretrained) if config.vision.trunk_kind == "open_clip" else None
        self.vision = VisionEncoder(config, pretrained, trunk=towers.image if towers else None)
        # a Hugging Face text model (fills config.text.hf_config) or the open_clip model's own
        self.text = towers.text if towers else TextEncoder(config, pretrained)
        hidden, heads, intermediate, eps, vocab = self.text.dims()
        self.fusion = FusionEncoder(config, hidden, heads, intermediate, eps, vocab)
        if self.text.fusion_init:
            if len(self.text.fusion_init) > len(self.fusion.layers):
                raise ValueError("fusion.init_from_text_layers names more layers than fusion.layers")
            for layer, sd in zip(self.fusion.layers, self.text.fusion_init):
                layer.load_bert_layer(sd)
            self.text.fusion_init = []
        self.image_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.temperature)))
        if towers:
            towers.start_itc(self)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.text.tokenizer)
        n_layers = len(self.fusion.layers)
        if not -n_layers <= config.fusion.gradcam_layer < n_layers:
            raise ValueError(f"fusion.gradcam_layer {config.fusion.gradcam_layer} is outside 0..{n_layers - 1}")

    # -- helpers ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def temperature_scale(self) -> torch.Tensor:
        lo, hi = TEMPERATURE_RANGE
        return self.logit_scale.exp().clamp(1.0 / hi, 1.0 / lo)

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        if isinstance(texts, str):
            texts = [texts]
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.text.max_length,
                             return_tensors="pt", return_offsets_mapping=fast)
        word_ids = offsets = None
        if fast:
            word_ids = [enc.word_ids(i) for i in range(len(texts))]
            offsets = [[tuple(o) for o in row] for row in enc["offset_mapping"].tolist()]
        return TextBatch(enc["input_ids"], enc["attention_mask"], word_ids, offsets).to(self.device)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) -> (B, 3, S, S) pixels, resized and normalised as this model expects."""
        tf = build_transform(self.config.vision)
        images = [images] if isinstance(images, Image.Image) else list(images)
        return torch.stack([tf(im) for im in images]).to(self.device)

    def _as_text(self, text: Sequence[str] | TextBatch) -> TextBatch:
        return text if isinstance(text, TextBatch) else self.tokenize(text)

    # -- uni-modal encoders (ITC) ---------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                     grid: int | None = None) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) or cached trunk features -> (B, 1 + P, width).
        grid: tokens on a grid x grid grid instead of the config's (CNN trunks; explaining)."""
        if features is None:
            if pixels is None:
                raise ValueError("give pixels or trunk features")
            features = self.vision.trunk_features(pixels.to(self.device), grid=grid)
        return self.vision.tokens_from_features(features.to(self.device), any_grid=grid is not None, grid=grid)

    def image_tokens_on(self, pixels: torch.Tensor, grids) -> list[torch.Tensor]:
        """`image_tokens` on each of `grids` (None: the config's) from one pass of the trunk."""
        feats = self.vision.trunk_features_on(pixels.to(self.device), grids)
        return [self.vision.tokens_from_features(f, any_grid=g is not None, grid=g) for f, g in zip(feats, grids)]

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, width) -> (B, E) L2-normalised ITC embedding."""
        return F.normalize(self.image_proj(self.vision.pool(tokens)), dim=-1)

    def encode_image(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                     return_tokens: bool = False):
        tokens = self.image_tokens(pixels, features)
        emb = self.embed_image_tokens(tokens)
        return (emb, tokens) if return_tokens else emb

    def text_hidden(self, text: Sequence[str] | TextBatch) -> tuple[torch.Tensor, TextBatch]:
        batch = self._as_text(text)
        return self.text(batch.input_ids, batch.attention_mask), batch

    def embed_text_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text.pool(hidden, attention_mask)), dim=-1)

    def encode_text(self, text: Sequence[str] | TextBatch, return_hidden: bool = False):
        """Captions -> (B, E) L2-normalised ITC embedding (+ hidden states and the batch)."""
        hidden, batch = self.text_hidden(text)
        emb = self.embed_text_hidden(hidden, batch.attention_mask)
        return (emb, hidden, batch) if return_hidden else emb

    # -- fusion (ITM) -----------------------------------------------------------------------
    def itm_logits(self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                   output_attentions: bool = False):
        """Aligned pairs: image_tokens (B, 1+P, Dv), text_hidden (B, T, D) -> (B, 2) logits.
        Either side may have batch 1 and is then broadcast to the other's batch."""
        image_tokens, text_hidden, text_mask = _broadcast(image_tokens, text_hidden, text_mask)
        out = self.fusion(text_hidden, text_mask, image_tokens, output_attentions=output_attentions)
        logits = self.fusion.itm_logits(out.hidden)
        return (logits, out.cross_attentions) if output_attentions else logits

    def itm_score(self, image_tokens: torch.Tensor, text: Sequence[str] | TextBatch | tuple[torch.Tensor, torch.Tensor],
                  as_probability: bool = True, batch_size: int = 64) -> torch.Tensor:
        """Match scores for re-ranking: k image candidates of one caption, k captions of one
        image, or k aligned pairs. `text` is captions, a TextBatch or (hidden, mask).

        Returns (k,) P(match) or, with as_probability=False, the logit margin
        (match - no match), which ranks the same and does not saturate into ties."""
        if isinstance(text, tuple):
            hidden, mask = text
        else:
            hidden, batch = self.text_hidden(text)
            mask = batch.attention_mask
        k = max(image_tokens.shape[0], hidden.shape[0])
        out = []
        for s in range(0, k, batch_size):
            it = image_tokens if image_tokens.shape[0] == 1 else image_tokens[s:s + batch_size]
            th, tm = (hidden, mask) if hidden.shape[0] == 1 else (hidden[s:s + batch_size], mask[s:s + batch_size])
            logits = self.itm_logits(it, th, tm)
            out.append(logits.softmax(-1)[:, 1] if as_probability else logits[:, 1] - logits[:, 0])
        return torch.cat(out)

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every image against every caption: {'itc': (I, T) cosine, 'itm': (I, T) P(match)}.
        Convenience for small sets; search uses ITC for all and ITM for the top k only."""
        img_emb, tokens = self.encode_image(pixels, return_tokens=True)
        txt_emb, hidden, batch = self.encode_text(texts, return_hidden=True)
        itm = torch.stack([self.itm_score(tokens[i:i + 1], (hidden, batch.attention_mask))
                           for i in range(tokens.shape[0])])
        return {"itc": img_emb @ txt_emb.t(), "itm": itm}

    # -- training step ----------------------------------------------------------------------
    def forward(self, text: TextBatch, image_keys: torch.Tensor, text_keys: torch.Tensor,
                pixels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                generator: torch.Generator | None = None, hardness: float = 1.0,
                swap_rows: torch.Tensor | None = None, swap_text: TextBatch | None = None) -> dict[str, torch.Tensor]:
        """One training step's losses for B aligned (image, caption) pairs.

        image_keys / text_keys (B,): ids of the image and of the caption string of each pair
        (see envlf.train.losses). gather: all-gathers a tensor across DDP ranks (with gradient for
        embeddings), so ITC sees every rank's batch as candidates. swap_rows (S,) / swap_text
        (S captions): pair swap_rows[s]'s caption with one word swapped (envlf.train.negatives), an
        ITM negative for that pair's image."""
        lc = self.config.loss
        tokens = self.image_tokens(pixels, features)  # (B, 1+P, Dv)
        img_emb = self.embed_image_tokens(tokens)  # (B, E)
        hidden = self.text(text.input_ids, text.attention_mask)  # (B, T, D)
        txt_emb = self.embed_text_hidden(hidden, text.attention_mask)  # (B, E)
        scale = self.temperature_scale()
        out: dict[str, torch.Tensor] = {}

        if gather is not None:
            all_ = dict(image_emb_all=gather(img_emb), text_emb_all=gather(txt_emb),
                        image_keys_all=gather(image_keys), text_keys_all=gather(text_keys))
        else:
            all_ = {}
        out["itc"] = L.itc_loss(img_emb, txt_emb, scale, image_keys, text_keys, **all_)

        if lc.itm_weight > 0:
            swap = None
            if swap_rows is not None and len(swap_rows):
                swap = (swap_rows, self.text(swap_text.input_ids, swap_text.attention_mask), swap_text.attention_mask)
            out["itm"] = self._itm_step(tokens, hidden, text.attention_mask, img_emb, txt_emb, scale * hardness,
                                        image_keys, text_keys, generator, swap)
        if lc.mlm_weight > 0:
            out["mlm"] = self._mlm_step(tokens, text, generator)
        total = lc.itc_weight * out["itc"]
        total = total + lc.itm_weight * out.get("itm", 0.0) + lc.mlm_weight * out.get("mlm", 0.0)
        out["loss"] = total
        out["temperature"] = (1.0 / scale).detach()
        return out

    def _itm_step(self, tokens, hidden, mask, img_emb, txt_emb, scale, image_keys, text_keys, generator, swap=None):
        """Binary ITM on positives and hard negatives (+ the listwise term when asked).
        swap: (rows, hidden, mask) of swapped-word captions, negatives for those rows' images."""
        lc = self.config.loss
        B, n = tokens.shape[0], max(1, lc.itm_negatives)
        pos = L.positive_mask(image_keys, text_keys)  # (B, B), symmetric
        with torch.no_grad():
            sim = scale * img_emb @ txt_emb.t()  # (B, B) image x text
        ar = torch.arange(B, device=tokens.device)
        pairs = L.itm_pairs(sim, pos, sim.t(), pos.t(), ar, ar, ar, ar, generator, n)  # positives, then hard negatives
        logits = self.itm_logits(tokens[pairs.image], hidden[pairs.text], mask[pairs.text])  # (B + 2nQ, 2)
        swap_logits = None
        if swap is not None:  # (image, its caption with one word swapped)
            rows, s_hidden, s_mask = swap
            swap_logits = self.itm_logits(tokens[rows], s_hidden, s_mask)
            logits = torch.cat([logits, swap_logits])
        labels = torch.zeros(len(logits), dtype=torch.long, device=tokens.device)
        labels[:B] = 1
        loss = L.itm_loss(logits, labels)
        if lc.rank_weight > 0:
            margin = logits[:, 1] - logits[:, 0]
            terms = []
            if swap_logits is not None:  # each image: its caption vs the same with one word swapped
                terms.append(L.itm_listwise_loss(torch.stack([margin[:B][swap[0]], margin[len(pairs.image):]], 1)))
            terms += pairs.listwise_terms(margin)  # each image vs n hard captions, each caption vs n hard images
            if terms:
                loss = loss + lc.rank_weight * torch.stack(terms).mean()
        return loss

    def _mlm_step(self, tokens, text: TextBatch, generator):
        tok = self.tokenizer
        ids, labels = L.mask_tokens(text.input_ids, text.attention_mask, tok.all_special_ids, tok.mask_token_id,
                                    self.text.dims()[4], self.config.loss.mlm_probability, generator)
        hidden = self.text(ids, text.attention_mask)
        out = self.fusion(hidden, text.attention_mask, tokens)
        picked = labels != -100  # the vocabulary head only where a word was masked (~15%),
        logits = self.fusion.mlm_logits(out.hidden[picked], self.text.word_embeddings.weight)  # not (B, T, V)
        return L.mlm_loss(logits, labels[picked])

    # -- checkpoints (envlf.model.checkpoint does the file work) ------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return checkpoint.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "EnVLF":
        """Rebuild a model from a checkpoint directory, strictly. Raises CheckpointError."""
        config, state, tokenizer = checkpoint.read_checkpoint(directory)
        model = cls(config, pretrained=False, tokenizer=tokenizer)
        checkpoint.load_state_strict(model, state, source=str(Path(directory) / checkpoint.WEIGHTS_NAME))
        return model.to(device).eval()

    def fingerprint(self) -> str:
        return checkpoint.fingerprint(self)

    def num_parameters(self) -> dict[str, int]:
        parts = {"vision trunk": self.vision.trunk, "vision ViT module": None, "text": self.text,
                 "fusion": self.fusion}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}
        counts["vision ViT module"] = sum(p.numel() for n, p in self.vision.named_parameters()
                                          if not n.startswith("trunk."))
        counts["projections"] = sum(p.numel() for p in [*self.image_proj.parameters(), *self.text_proj.parameters()])
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def _broadcast(image_tokens, text_hidden, text_mask):
    bi, bt = image_tokens.shape[0], text_hidden.shape[0]
    if bi == bt:
        return image_tokens, text_hidden, text_mask
    if bi == 1:
        return image_tokens.expand(bt, -1, -1), text_hidden, text_mask
    if bt == 1:
        return image_tokens, text_hidden.expand(bi, -1, -1), text_mask.expand(bi, -1)
    raise ValueError(f"cannot pair {bi} images with {bt} captions")


def create_model(name_or_config: str | EnVLFConfig = "lite", pretrained: bool = True,
                 device: str | torch.device = "cpu", tokenizer=None) -> EnVLF:
    """A fresh model from a named config ('lite', 'base', 'tiny'), a config JSON or object.
    pretrained=False gives random weights of the same shapes (``base`` offline, tests)."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config.copy()
    return EnVLF(cfg, pretrained=pretrained, tokenizer=tokenizer).to(device)


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> EnVLF:
    """Rebuild a model from a checkpoint directory, strictly (= EnVLF.from_pretrained).
    Raises envlf.model.checkpoint.CheckpointError."""
    return EnVLF.from_pretrained(directory, device=device)
