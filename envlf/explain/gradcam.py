"""Where in the image did a caption, and each of its words, find its match?

The match is the ITM margin (match - no-match logit: the log-odds of P(match), which
re-ranking ranks by). The whole text's map is HiResCAM (Draelos & Carin 2020: Grad-CAM without
averaging the gradient over space) on the image tokens the fusion encoder reads:

    whole[p] = relu( sum over channels c of  d margin / d x[p, c] * x[p, c] )

the first-order change of the margin if patch p's token were zeroed. The image tokens reach
the margin only through the cross-attention keys and values of each fusion layer, row by text
row, so the sum splits exactly into one share per text token (`token_contributions`): a word's
map is the clipped sum of its word pieces' shares ("storage" + "##tanks"), over every layer.
In the last layer only the [CLS] row has a share (the ITM head reads its output), so what that
row reads counts in the whole-text map and in no word's. The [CLS] image token is dropped and
the P patch columns are reshaped to the grid.

This replaced ALBEF's Grad-CAM on one layer's cross-attention, relu(d margin / d attn) * attn
averaged over heads, whose word rows were the word maps and whose sum over words was the
whole-text map. Chosen on the demo world's val split (80 tiles, 16x16 grid; `python -m
experiments.map_diagnostics`): phrases given alone as the text hit 34.6% against 29.9%
for the 8-epoch model and 34.0% against 21.3% for the default. Read in their caption, the
words' shares hit 23.3% against 23.8% (8-epoch model) and 16.9% against 15.5% (default): a
wash, kept because the word maps are now shares of the whole map, one attribution, not two.

The maps are then blurred by a Gaussian of ``config.fusion.gradcam_smooth`` cells of the
model's own grid (lite: half a 32 px training cell, one cell of the 16x16 explain grid; the
kernel is linear, so a phrase's map stays the sum of its words'). On a grid finer than the one
the model trained on, cell-to-cell swings below the training cell are detail the model never
learnt to resolve. Chosen on the same val tiles: phrases as the query 34.6 -> 38.6% (8-epoch
model) and 34.0 -> 35.0% (default), read in their caption 23.3 -> 25.7% and 16.9 -> 18.2%. The
map is wider: on test its energy inside the masks fell (8-epoch model, phrases as the query,
29.1 -> 24.5%) while its peak landed on the object more often (37.9 -> 42.6%). ``smooth=0``
gives the attribution itself.

The grid is ``config.fusion.gradcam_grid`` when set: a CNN trunk's tokens rebuilt on a finer
grid than the model trained on (lite: 16x16 cells of 16 px instead of 8x8 of 32 px, which are
larger than a car or a tree), with no retraining: the ViT module and fusion layers work on
any number of tokens and the position embeddings are resized. The attention tensors and the
heads' q, k, v come back from the fusion forward as values; nothing reads module state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from envlf.data.transforms import build_transform
from envlf.model.core import _broadcast


@dataclass
class AttentionMaps:
    words: list[str]  # the caption's words, in order
    spans: list[tuple[int, int]]  # each word's character span in the caption
    word_maps: np.ndarray  # (W, g, g) float32 >= 0, one per word, on the patch grid (its share)
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
        size = image.size
        pixels = build_transform(model.config.vision)(image.convert("RGB"))[None]
    else:
        pixels = image if image.dim() == 4 else image[None]
        size = (pixels.shape[-1], pixels.shape[-2])
    return pixels.to(model.device), size


def attention_map(model, image, text: str, layer: int | None = None, grid: int | None = None,
                  smooth: float | None = None) -> AttentionMaps:
    """Per-word and whole-sentence maps (HiResCAM of the ITM margin, see the module doc) of
    `text` on `image` (PIL or (3,S,S) pixels). grid: the maps' grid (default:
    config.fusion.gradcam_grid, else the model's own grid); layer: only that fusion layer's
    share (default: every layer); smooth: see `attention_maps`."""
    return attention_maps(model, image, [text], layer=layer, grid=grid, smooth=smooth)[0]


def attention_maps(model, image, texts: Sequence[str], layer: int | None = None, grid: int | None = None,
                   batch_size: int = 32, smooth: float | None = None) -> list[AttentionMaps]:
    """`attention_map` of several texts on one image: the image is encoded once (both grids
    from one trunk pass) and the texts go through the fusion encoder in batches. Each pair's
    map is its own (no module mixes batch rows in eval mode), so the maps equal one-by-one calls.
    smooth: Gaussian sigma in cells of the model's own grid (default config.fusion.gradcam_smooth;
    0 gives the attribution itself)."""
    texts = list(texts)
    if not texts or any(not t or not t.strip() for t in texts):
        raise ValueError("attention_map needs a non-empty caption")
    g = grid or model.config.fusion.gradcam_grid or model.grid_size
    smooth = model.config.fusion.gradcam_smooth if smooth is None else smooth
    sigma = smooth * g / model.grid_size  # in cells of the maps' grid
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
            contrib, logits = token_contributions(model, tokens, hidden, batch.attention_mask, layer)
            if own:
                with torch.no_grad():
                    logits = model.itm_logits(own[0], hidden, batch.attention_mask)
            probs = logits.detach().softmax(-1)[:, 1].tolist()
            contrib = contrib[:, :, 1:] * batch.attention_mask[:, :, None].to(contrib.dtype)  # patches; real tokens
            whole = gaussian_smooth(contrib.sum(1).clamp(min=0).float().reshape(len(chunk), g, g), sigma).cpu().numpy()
            contrib = contrib.float().reshape(len(chunk), -1, g, g).cpu().numpy()  # (B, T, g, g)
            for row, text in enumerate(chunk):
                words, spans, word_maps = _merge_word_pieces(model.tokenizer, batch, contrib[row], text, row)
                word_maps = gaussian_smooth(torch.from_numpy(np.clip(word_maps, 0, None)), sigma).numpy()
                out.append(AttentionMaps(words, spans, word_maps.astype(np.float32),
                                         whole[row].astype(np.float32), float(probs[row]), size))
    finally:
        model.train(was_training)
    return out


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., g, g) maps blurred by a Gaussian of `sigma` cells (edges repeated, the kernel cut
    at 3 sigma and normalised, so a constant map stays constant); sigma <= 0: unchanged."""
    if sigma <= 0 or maps.numel() == 0:
        return maps
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    shape = maps.shape
    m = maps.reshape(-1, 1, *shape[-2:])
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m.reshape(shape)


def token_contributions(model, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                        layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HiResCAM of the ITM margin on the image tokens, split by the text token whose
    cross-attention row carried it: (B, T, 1+P) contributions whose sum over T (all layers)
    is sum_c d margin / d x[p, c] * x[p, c], and the (B, 2) ITM logits.

    The image tokens reach the margin only through each layer's cross-attention keys and
    values, so x . dM/dx = sum over layers, heads and rows t of
        attn[t, p] * (dM/d ctx[t] . (v[p] - b_v))                     (the value path)
      + attn[t, p] * (g[t, p] - sum_p' attn[t, p'] g[t, p']) * q[t] . (k[p] - b_k) / sqrt(d)   (keys)
    with g = dM/d attn, ctx = attn @ v. layer: only that fusion layer's rows (default: all).
    image_tokens (1 or B, 1+P, Dv); text_hidden (B, T, D)."""
    image, hidden, mask = _broadcast(image_tokens, text_hidden, text_mask)
    image = image.detach().clone().requires_grad_(True)  # a graph even when no weight trains
    with torch.enable_grad():
        out = model.fusion(hidden, mask, image, output_attentions=True)
        logits = model.fusion.itm_logits(out.hidden)
        attns, parts = out.cross_attentions, out.cross_parts
        grads = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), [*attns, *[p["ctx"] for p in parts]])
    n = len(attns)
    total = torch.zeros(attns[0].shape[0], attns[0].shape[2], attns[0].shape[3], dtype=attns[0].dtype,
                        device=attns[0].device)
    for i, (fl, a, part, g_attn, g_ctx) in enumerate(zip(model.fusion.layers, attns, parts, grads[:n], grads[n:])):
        if layer is not None and i != layer % n:
            continue
        m = fl.cross_attn
        heads = lambda b: 0.0 if b is None else b.view(1, m.heads, 1, m.head_dim)  # noqa: E731
        a, q = a.detach(), part["q"].detach()
        k, v = part["k"].detach() - heads(m.k.bias), part["v"].detach() - heads(m.v.bias)
        value = a * (g_ctx @ v.transpose(-2, -1))
        d_scores = a * (g_attn - (a * g_attn).sum(-1, keepdim=True))  # through the softmax
        key = d_scores * (q @ k.transpose(-2, -1)) / math.sqrt(m.head_dim)
        total = total + (value + key).sum(1)  # (B, T, 1+P), heads summed
    return total.detach(), logits.detach()


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
