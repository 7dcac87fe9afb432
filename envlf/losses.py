"""Training objectives as plain functions (tested on their own in tests/test_losses.py).

Remote-sensing captions repeat a lot ("many buildings and green trees are in a dense
residential area" belongs to dozens of images). Pairs are therefore identified by keys:
``image_keys[i]`` names the image of pair i and ``text_keys[i]`` the (normalised) caption
string of pair i. Two pairs with the same image key or the same text key are positives
for each other in ITC, and are never drawn as ITM "hard negatives".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(image_keys: torch.Tensor, text_keys: torch.Tensor,
                  image_keys_all: torch.Tensor | None = None, text_keys_all: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) local keys vs (N,) keys of all candidates -> (B, N) bool.

    Pair i and candidate j match when they show the same image OR carry the same caption
    string: caption j then describes image i (and image j carries caption i)."""
    ik_all = image_keys if image_keys_all is None else image_keys_all
    tk_all = text_keys if text_keys_all is None else text_keys_all
    return (image_keys[:, None] == ik_all[None, :]) | (text_keys[:, None] == tk_all[None, :])


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             image_keys: torch.Tensor, text_keys: torch.Tensor,
             image_emb_all: torch.Tensor | None = None, text_emb_all: torch.Tensor | None = None,
             image_keys_all: torch.Tensor | None = None, text_keys_all: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings with multiple positives.

    image_emb, text_emb: (B, E) L2-normalised, pair i = (image i, text i).
    logit_scale: scalar, 1 / temperature (learned by the caller, clamped there).
    *_all: the candidates the local queries are scored against (the whole batch across DDP
    ranks); default: the local batch. Targets spread uniformly over every positive, so an
    identical caption in another pair is not pushed away as a negative.
    """
    img_all = image_emb if image_emb_all is None else image_emb_all
    txt_all = text_emb if text_emb_all is None else text_emb_all
    pos = positive_mask(image_keys, text_keys, image_keys_all, text_keys_all).to(image_emb.dtype)  # (B, N)
    targets = pos / pos.sum(dim=1, keepdim=True)
    logits_i2t = logit_scale * image_emb @ txt_all.t()  # (B, N)
    logits_t2i = logit_scale * text_emb @ img_all.t()  # (B, N)
    loss_i2t = -(targets * F.log_softmax(logits_i2t, dim=1)).sum(1).mean()
    loss_t2i = -(targets * F.log_softmax(logits_t2i, dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row, draw one column with probability softmax(sim[row]) over non-positives.

    sim: (B, C) similarities (logits); positives: (B, C) bool, True = never draw.
    Returns (B,) column indices, -1 where a row has no negative at all (every candidate is
    a positive: e.g. a batch of one caption string)."""
    w = torch.softmax(sim.float(), dim=1).masked_fill(positives, 0.0)
    has_neg = (~positives).any(dim=1)
    # softmax can underflow to exactly 0 for very dissimilar candidates: fall back to uniform
    # over the row's negatives so a valid negative is always drawn.
    dead = has_neg & (w.sum(dim=1) <= 0)
    w[dead] = (~positives[dead]).float()
    w[~has_neg] = 1.0  # placeholder so multinomial accepts the row; result is replaced below
    idx = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return torch.where(has_neg, idx, torch.full_like(idx, -1))


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits [no match, match], (N,) labels in {0, 1} -> mean cross-entropy."""
    return F.cross_entropy(logits, labels)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int],
                mask_id: int, vocab_size: int, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the real (non-special, non-pad) tokens; of those
    80% -> [MASK], 10% -> a random token, 10% unchanged. Returns (masked ids, labels) with
    labels = -100 everywhere except the picked positions."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    device = ids.device
    maskable = attention_mask.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=device))
    u = torch.rand(ids.shape, generator=generator, device=device)
    picked = maskable & (u < probability)
    labels[~picked] = -100
    r = torch.rand(ids.shape, generator=generator, device=device)
    ids[picked & (r < 0.8)] = mask_id
    rand_pos = picked & (r >= 0.8) & (r < 0.9)
    ids[rand_pos] = torch.randint(vocab_size, ids.shape, generator=generator, device=device)[rand_pos]
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels with -100 = ignore -> mean cross-entropy over picked tokens.
    Zero (with a graph) when nothing was picked, so a short batch cannot make it NaN."""
    picked = labels != -100
    if not picked.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[picked], labels[picked])
