"""Why do the attention maps miss? Diagnostics behind the README's pointing-game paragraph.

    python -m experiments.map_diagnostics --checkpoint runs/world-lite8/best \\
        --data ~/.cache/envlf/world --split val --images 80 --probe-train 400

Four reports, each on the first ``--images`` tiles of ``--split`` (masks needed: demo worlds):

1. **Map recipes**, phrase given alone as the text, peak inside the named objects (the
   pointing game's "as the query" unit) on the ``--grid`` explain grid:
   ``shipped`` (`envlf.explain.gradcam.attention_maps`' whole-text map, HiResCAM on the image tokens
   the fusion reads, smoothed by ``fusion.gradcam_smooth``; ``shipped, no smoothing``
   without; the other recipes are not smoothed), ``word-rows`` (the sum of the words' first-layer cross-attention
   Grad-CAM, the whole-text map before), ``cls-rows`` (the [CLS] row's Grad-CAM of every
   fusion layer), ``hirescam@vit-in`` / ``@block-k`` (HiResCAM on the ViT module's input or
   after its block k instead of its output) and ``grad-norm`` (the gradient's norm alone).
   Choose recipes on ``val``, not on ``test``.
   The same for a phrase read in its caption: ``shipped`` (its words' shares of the caption's
   map) against ``gradcam word rows`` (ALBEF's Grad-CAM rows of its words, the word maps before).
2. **Cross-attention entropy** of the captions on their own tiles, per fusion layer, in nats,
   against a uniform distribution over the model's own grid.
3. **Swap test**: how often the ITM head prefers a tile's caption to the same caption with
   one object noun, count, colour, size or side swapped (`envlf.train.negatives`), per kind of word:
   whether the fusion encoder reads the details a map should point at.
4. **Linear probe** (``--probe-train N`` > 0): per category, a logistic regression from one
   image token (16x16 grid by default) to "this cell is covered at least 20% by the category",
   trained with the masks of N training tiles; its map for the phrase's category is scored
   like a model's map. This uses the masks, so it is no weakly supervised method: it says
   whether the tokens hold where things are, i.e. whether a miss is the features' or the
   fusion's.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from envlf.data.datasets import load_dataset, load_image
from envlf.explain.gradcam import _to_pixels, attention_maps
from envlf.evaluation.pointing import _resize, _score, cell_cover, grounded_records, load_mask, phrase_text


def _records(ds, split: str, n: int):
    recs = grounded_records(ds.split(split))
    return recs[:n] if n else recs


def _phrases(r) -> list[tuple[str, dict]]:
    """(phrase text, phrase) for every grounded phrase of a tile's captions."""
    return [(phrase_text(s["raw"], p), p) for s in r.meta["sentences"]
            for p in s.get("phrases", []) if p.get("object_ids")]


def _recipe_maps(model, pixels, texts: list[str], grid: int) -> dict[str, np.ndarray]:
    """name -> (len(texts), grid, grid) maps of each text alone, by every recipe."""
    v = model.vision
    with torch.no_grad():
        feats = v.trunk_features(pixels, grid=grid)
        hidden, batch = model.text_hidden(texts)
    B = len(texts)
    with torch.enable_grad():
        stages: list[torch.Tensor] = []  # the ViT module's input and each block's output
        tokens = v.tokens_from_features(feats.expand(B, -1, -1, -1), any_grid=True, stages=stages, grid=grid)
        stages.append(tokens)
        logits, attns = model.itm_logits(tokens, hidden, batch.attention_mask, output_attentions=True)
        grads = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), [*stages, *attns])
    g_stages, g_attns = grads[:len(stages)], grads[len(stages):]
    ids, real = batch.input_ids, batch.attention_mask.bool()
    tok = model.tokenizer
    words = (real & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)).float()[:, :, None]
    cls_row = (ids == tok.cls_token_id).float()[:, :, None]
    cams = [(g.clamp(min=0) * a).mean(1) for a, g in zip(attns, g_attns)]  # (B, T, 1+P) per layer
    layer = model.config.fusion.gradcam_layer
    out = {
        "shipped": np.stack([m.sentence_map for m in attention_maps(model, pixels[0], texts, grid=grid)]),
        "shipped, no smoothing": np.stack([m.sentence_map for m in attention_maps(model, pixels[0], texts, grid=grid,
                                                                                  smooth=0)]),
        "word-rows": (cams[layer] * words).sum(1)[:, 1:],
        "cls-rows": sum((c * cls_row).sum(1)[:, 1:] for c in cams),
        "hirescam@vit-in": (g_stages[0] * stages[0].detach()).sum(-1)[:, 1:].clamp(min=0),
        "grad-norm": g_stages[-1][:, 1:].norm(dim=-1),
    }
    for k in range(1, len(stages) - 1):
        out[f"hirescam@block-{k}"] = (g_stages[k] * stages[k].detach()).sum(-1)[:, 1:].clamp(min=0)
    return {k: (v_ if isinstance(v_, np.ndarray) else v_.detach().float().cpu().numpy()).reshape(B, grid, grid)
            for k, v_ in out.items()}


def map_recipes(model, recs, grid: int) -> dict[str, float]:
    """Hit % of each recipe, phrases as the query; 'random point' the masks' mean share."""
    acc = defaultdict(list)
    for r in recs:
        mask = load_mask(r)
        pixels, _ = _to_pixels(model, load_image(r.path))
        items = _phrases(r)
        texts = sorted({t for t, _ in items if t})
        if mask is None or not texts:
            continue
        maps = _recipe_maps(model, pixels, texts, grid)
        H, W = mask.shape
        for text, p in items:
            target = np.isin(mask, p["object_ids"])
            if not text or not target.any():
                continue
            for name, m in maps.items():
                acc[name].append(_score(_resize(m[texts.index(text)], (W, H)), target)[0])
            acc["random point"].append(float(target.mean()))
    return {k: 100.0 * float(np.mean(v)) for k, v in acc.items()}


def caption_recipes(model, recs, grid: int) -> dict[str, float]:
    """Hit % of a phrase read in its caption: the words' shares of the shipped map against
    ALBEF's Grad-CAM rows of the words in the first fusion layer (the word maps before)."""
    from envlf.explain.gradcam import _merge_word_pieces

    layer = model.config.fusion.gradcam_layer
    acc = defaultdict(list)
    for r in recs:
        mask = load_mask(r)
        image = load_image(r.path)
        sents = [s for s in r.meta["sentences"] if any(p.get("object_ids") for p in s.get("phrases", []))]
        if mask is None or not sents:
            continue
        texts = [s["raw"] for s in sents]
        shipped = attention_maps(model, image, texts, grid=grid)
        unsmoothed = attention_maps(model, image, texts, grid=grid, smooth=0)
        pixels, _ = _to_pixels(model, image)
        with torch.no_grad():
            tokens = model.image_tokens(pixels, grid=grid)
            hidden, batch = model.text_hidden(texts)
        with torch.enable_grad():
            logits, attns = model.itm_logits(tokens, hidden, batch.attention_mask, output_attentions=True)
            g, = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), attns[layer])
        cam = (g.clamp(min=0) * attns[layer]).mean(1)[:, :, 1:].detach().float().reshape(len(texts), -1, grid, grid)
        H, W = mask.shape
        for i, s in enumerate(sents):
            _, spans, rows = _merge_word_pieces(model.tokenizer, batch, cam[i].numpy(), s["raw"], i)
            for p in s["phrases"]:
                target = np.isin(mask, p.get("object_ids") or [])
                if not target.any():
                    continue
                sel = [j for j, (a, b) in enumerate(spans) if a < p["end"] and b > p["start"]]
                old = rows[sel].sum(0) if sel else np.zeros((grid, grid), np.float32)
                acc["shipped"].append(_score(_resize(shipped[i].span_map(p["start"], p["end"]), (W, H)), target)[0])
                acc["shipped, no smoothing"].append(
                    _score(_resize(unsmoothed[i].span_map(p["start"], p["end"]), (W, H)), target)[0])
                acc["gradcam word rows"].append(_score(_resize(old, (W, H)), target)[0])
    return {k: 100.0 * float(np.mean(v)) for k, v in acc.items()}


def attention_entropy(model, recs) -> list[float]:
    """Mean entropy (nats) of the cross-attention rows of real text tokens, per fusion layer."""
    per_layer = defaultdict(list)
    for r in recs:
        pixels, _ = _to_pixels(model, load_image(r.path))
        with torch.no_grad():
            tokens = model.image_tokens(pixels)
            hidden, batch = model.text_hidden(list(r.captions))
            _, attns = model.itm_logits(tokens, hidden, batch.attention_mask, output_attentions=True)
        real = batch.attention_mask.bool()
        for i, a in enumerate(attns):
            ent = -(a * a.clamp_min(1e-12).log()).sum(-1).mean(1)  # (B, T), mean over heads
            per_layer[i].append(ent[real])
    return [float(torch.cat(per_layer[i]).mean()) for i in sorted(per_layer)]


def swap_test(model, recs, train_captions, seed: int = 0) -> dict[str, tuple[float, int]]:
    """How often the ITM head gives a tile's caption a higher match margin (log-odds: P(match)
    would tie where it saturates) than the same caption with one word swapped
    (envlf.train.negatives), per kind of word and 'all': (%, n)."""
    from envlf.train.negatives import KIND, WordSwapper

    swapper, rng = WordSwapper(train_captions), np.random.default_rng(seed)
    won = defaultdict(list)
    for r in recs:
        pairs = [(c, out) for c in r.captions for out in [swapper.swap(c, rng)] if out is not None]
        if not pairs:
            continue
        pixels, _ = _to_pixels(model, load_image(r.path))
        with torch.no_grad():
            tokens = model.image_tokens(pixels)
            p_true = model.itm_score(tokens, [c for c, _ in pairs], as_probability=False)
            p_swap = model.itm_score(tokens, [t for _, (t, _) in pairs], as_probability=False)
        for (_, (_, word)), a, b in zip(pairs, p_true.tolist(), p_swap.tolist()):
            won[KIND[word]].append(a > b)
            won["all"].append(a > b)
    return {k: (100.0 * float(np.mean(v)), len(v)) for k, v in sorted(won.items())}


def linear_probe(model, train_recs, test_recs, grid: int) -> dict[str, float]:
    """Hit % per category (and 'all') of per-category logistic probes on single image tokens."""
    from sklearn.linear_model import LogisticRegression

    def tokens_of(r):
        pixels, _ = _to_pixels(model, load_image(r.path))
        with torch.no_grad():
            return model.image_tokens(pixels, grid=grid)[0, 1:].float().cpu().numpy()  # (P, D)

    def categories(r):
        return {o["id"]: o.get("category", "?") for o in r.meta.get("objects", [])}

    train = [(tokens_of(r), load_mask(r), categories(r)) for r in train_recs]
    X = np.concatenate([t for t, _, _ in train])
    probes = {}
    for c in sorted({c for _, _, cats in train for c in cats.values()}):
        y = np.concatenate([cell_cover(np.isin(m, [i for i, cc in cats.items() if cc == c]), grid).ravel() >= 0.2
                            for _, m, cats in train])
        if 5 <= y.sum() < len(y):
            probes[c] = LogisticRegression(max_iter=300).fit(X, y)
    hits = defaultdict(list)
    for r in test_recs:
        mask, cats, x = load_mask(r), categories(r), tokens_of(r)
        H, W = mask.shape
        for _, p in _phrases(r):
            c, target = cats.get(p["object_ids"][0], "?"), np.isin(mask, p["object_ids"])
            if c in probes and target.any():
                m = probes[c].predict_proba(x)[:, 1].reshape(grid, grid)
                hits[c].append(_score(_resize(m, (W, H)), target)[0])
    out = {c: 100.0 * float(np.mean(v)) for c, v in sorted(hits.items())}
    out["all"] = 100.0 * float(np.mean([h for v in hits.values() for h in v])) if hits else float("nan")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a demo world (masks beside the images)")
    p.add_argument("--split", default="val", help="the tiles diagnosed (choose recipes on val)")
    p.add_argument("--images", type=int, default=80, help="first N tiles of the split (0 = all)")
    p.add_argument("--grid", type=int, default=16, help="explain grid of the maps and the probe")
    p.add_argument("--probe-train", type=int, default=0, help="train tiles for the linear probe (0 = no probe)")
    args = p.parse_args(argv)
    from envlf.model.checkpoint import CheckpointError
    from envlf.model.core import load_pretrained

    try:
        model = load_pretrained(args.checkpoint).eval()
        if model.config.vision.trunk_kind != "cnn":
            raise ValueError("the diagnostics read a CNN trunk's feature map; this model has a ViT trunk")
        model.vision.check_grid(args.grid)
        ds = load_dataset(args.data)
        recs = _records(ds, args.split, args.images)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not recs:
        print(f"error: no tiles with masks and grounded phrases in split {args.split!r}", file=sys.stderr)
        return 2
    n_phr = sum(1 for r in recs for t, _ in _phrases(r) if t)
    print(f"{args.checkpoint}: {len(recs)} {args.split} tiles, {n_phr} phrases, {args.grid}x{args.grid} grid")
    print("\n| map recipe (phrase as the query) | hit % |\n|---|---:|")
    for name, v in map_recipes(model, recs, args.grid).items():
        print(f"| {name} | {v:.1f} |")
    print("\n| map recipe (phrase in its caption) | hit % |\n|---|---:|")
    for name, v in caption_recipes(model, recs, args.grid).items():
        print(f"| {name} | {v:.1f} |")
    ents = attention_entropy(model, recs[:20])
    print(f"\ncross-attention entropy on 20 tiles' captions (nats; uniform over {model.grid_size ** 2} patches + "
          f"[CLS] = {math.log(model.grid_size ** 2 + 1):.2f}): " + ", ".join(f"layer {i} {e:.2f}" for i, e in enumerate(ents)))
    swaps = swap_test(model, recs, ds.split("train").captions())
    overall, n = swaps.pop("all")
    print(f"\ncaption against itself with one word swapped (envlf.train.negatives): the true one wins {overall:.1f}% "
          f"of {n}; " + ", ".join(f"{k} {v:.0f}% of {m}" for k, (v, m) in swaps.items()))
    if args.probe_train:
        train = _records(ds, "train", args.probe_train)
        res = linear_probe(model, train, recs, args.grid)
        print(f"\nlinear probe with masks ({len(train)} train tiles): {res.pop('all'):.1f}% of phrases; "
              + ", ".join(f"{c} {v:.0f}" for c, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
