"""Where in the image did a word look? Grad-CAM on the fusion encoder's cross-attention.

A word's map, for the fusion layer named by ``config.fusion.gradcam_layer``:

    cam[t, p] = mean over heads of  relu(d ITM_margin / d attn[h, t, p]) * attn[h, t, p]

ALBEF's recipe, with ALBEF's match logit replaced by the margin match - no-match: the
log-odds of P(match), which re-ranking ranks by (the match logit alone also carries the sum of
both logits, which P(match) ignores). On the demo world's val split the margin pointed better
(phrase hits on the 16x16 grid 23.8% vs 23.4% for the 8-epoch model, 15.5% vs 13.9% for the
5-epoch default). Row t is word-piece t looking at image token p; the [CLS] image token is
dropped and the P patch columns are reshaped to the grid. Word pieces are summed into words
("storage" + "##tanks"). Only the first fusion layer has word rows to read: the ITM head reads
the last layer's [CLS] output, so in the last layer only the [CLS] row has a gradient.

The whole text's map is HiResCAM (Draelos & Carin 2020: Grad-CAM without averaging the
gradient over space) on the image tokens the fusion encoder reads:

    whole[p] = relu( sum over channels of  d ITM_margin / d x[p, c] * x[p, c] )

the first-order change of the match log-odds if patch p's token were removed, through every
fusion layer and every text position, the [CLS] one included. The sum of the word maps, used
before, misses what the last layer's [CLS] row reads; on the world's val split (80 tiles,
1,050 phrases each given alone as the text) it hit 29.9% against HiResCAM's 34.6% for the
8-epoch model and 21.3% against 34.0% for the default (16x16 grid).

The grid is ``config.fusion.gradcam_grid`` when set: a CNN trunk's tokens rebuilt on a finer
grid than the model trained on (lite: 16x16 cells of 16 px instead of 8x8 of 32 px, which are
larger than a car or a tree), with no retraining: the ViT module and fusion layers work on
any number of tokens and the position embeddings are resized. The attention tensors come
back from the fusion forward as values; nothing reads module state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class AttentionMaps:
    words: list[str]  # the caption's words, in order
    spans: list[tuple[int, int]]  # each word's character span in the caption
    word_maps: np.ndarray  # (W, g, g) float32 >= 0, one per word, on the patch grid
    sentence_map: np.ndarray  # (g, g) float32 >= 0, the whole caption (HiResCAM, see the module doc)
    itm_probability: float  # P(match) of the pair on the model's own grid (as re-ranking scores it)
    image_size: tuple[int, int]  # (width, height) of the image the maps are for

    def resized(self, which: str | int = "sentence", size: tuple[int, int] | None = None) -> np.ndarray:
        """One map bilinearly resized to the image (H, W), scaled to [0, 1].
        which: "sentence", a word index, or a word (its first occurrence)."""
        if which == "sentence":
            m = self.sentence_map
        else:
            i = which if isinstance(which, int) else self.words.index(which)
            m = self.word_maps[i]
        w, h = size or self.image_size
        t = torch.from_numpy(m)[None, None]
        up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        top = up.max()
        return (up / top if top > 0 else up).astype(np.float32)

    def span_map(self, start: int, end: int) -> np.ndarray:
        """(g, g) map of a phrase given by its character span: the sum of the maps of the
        words that overlap [start, end). Zeros when no word does (e.g. truncated away)."""
        sel = [i for i, (s, e) in enumerate(self.spans) if s < end and e > start]
        if not sel:
            return np.zeros_like(self.sentence_map)
        return self.word_maps[sel].sum(0)


def _to_pixels(model, image) -> tuple[torch.Tensor, tuple[int, int]]:
    if isinstance(image, Image.Image):
        from .transforms import build_transform

        size = image.size
        pixels = build_transform(model.config.vision)(image.convert("RGB"))[None]
    else:
        pixels = image if image.dim() == 4 else image[None]
        size = (pixels.shape[-1], pixels.shape[-2])
    return pixels.to(model.device), size


def attention_map(model, image, text: str, layer: int | None = None, grid: int | None = None) -> AttentionMaps:
    """Per-word and whole-sentence Grad-CAM maps of `text` on `image` (PIL or (3,S,S) pixels).
    grid: the maps' grid (default: config.fusion.gradcam_grid, else the model's own grid)."""
    return attention_maps(model, image, [text], layer=layer, grid=grid)[0]


def attention_maps(model, image, texts: Sequence[str], layer: int | None = None, grid: int | None = None,
                   batch_size: int = 32) -> list[AttentionMaps]:
    """`attention_map` of several texts on one image: the image is encoded once (both grids
    from one trunk pass) and the texts go through the fusion encoder in batches. Each pair's
    map is its own (no module mixes batch rows in eval mode), so the maps equal one-by-one calls."""
    texts = list(texts)
    if not texts or any(not t or not t.strip() for t in texts):
        raise ValueError("attention_map needs a non-empty caption")
    layer = model.config.fusion.gradcam_layer if layer is None else layer
    g = grid or model.config.fusion.gradcam_grid or model.grid_size
    pixels, size = _to_pixels(model, image)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            grids = [g] if g == model.grid_size else [g, None]  # P(match) as search scores it: own grid
            tokens, *own = model.image_tokens_on(pixels, grids)  # (1, 1+P, Dv)
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            with torch.no_grad():
                hidden, batch = model.text_hidden(chunk)  # (B, T, D)
            with torch.enable_grad():
                image = tokens.expand(len(chunk), -1, -1).clone().requires_grad_(True)  # a copy per row
                logits, attns = model.itm_logits(image, hidden, batch.attention_mask, output_attentions=True)
                attn = attns[layer]  # (B, H, T, 1+P)
                # d ITM log-odds; rows are independent, so the gradient of the sum is each row's own
                grad, grad_image = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), [attn, image])
            cam = (grad.clamp(min=0) * attn).mean(dim=1)[:, :, 1:].detach()  # (B, T, P)
            whole = (grad_image * image.detach()).sum(-1)[:, 1:].clamp(min=0)  # (B, P) HiResCAM
            if own:
                with torch.no_grad():
                    logits = model.itm_logits(own[0], hidden, batch.attention_mask)
            probs = logits.detach().softmax(-1)[:, 1].tolist()
            cam = cam.float().reshape(len(chunk), -1, g, g).cpu().numpy()  # (B, T, g, g)
            whole = whole.float().reshape(len(chunk), g, g).cpu().numpy()
            for row, text in enumerate(chunk):
                words, spans, word_maps = _merge_word_pieces(model.tokenizer, batch, cam[row], text, row)
                out.append(AttentionMaps(words, spans, word_maps.astype(np.float32), whole[row].astype(np.float32),
                                         float(probs[row]), size))
    finally:
        model.train(was_training)
    return out


def _merge_word_pieces(tokenizer, batch, cam: np.ndarray, text: str, row: int = 0):
    """Sum the maps of word pieces that belong to one word; skip [CLS] / [SEP] / padding.
    Words are taken from the caption itself (original case) through the character offsets.
    row: the caption's row in `batch`."""
    ids = batch.input_ids[row].tolist()
    word_ids = batch.word_ids[row] if batch.word_ids else None
    offsets = batch.offsets[row] if batch.offsets else None
    if word_ids is None:  # slow tokenizer: each non-special token is its own word
        special = set(tokenizer.all_special_ids)
        word_ids = [None if t in special else i for i, t in enumerate(ids)]
    groups: dict[int, list[int]] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and batch.attention_mask[row, pos]:
            groups.setdefault(w, []).append(pos)
    words, spans, maps = [], [], []
    for w in sorted(groups):
        positions = groups[w]
        if offsets:
            s, e = offsets[positions[0]][0], offsets[positions[-1]][1]
            words.append(text[s:e])
            spans.append((s, e))
        else:
            words.append(tokenizer.decode([ids[p] for p in positions]).replace(" ", ""))
            spans.append((-1, -1))
        maps.append(cam[positions].sum(0))
    stacked = np.stack(maps) if maps else np.zeros((0,) + cam.shape[1:], np.float32)
    return words, spans, stacked
