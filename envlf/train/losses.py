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
                          generator: torch.Generator | None = None, num: int = 1) -> torch.Tensor:
    """For each row, draw `num` distinct columns with probability softmax(sim[row]) over the
    non-positives (without replacement).

    sim: (B, C) similarities (logits); positives: (B, C) bool, True = never draw.
    Returns (B,) column indices for num=1, else (B, num); -1 where a row has fewer
    negatives than asked (a row of only positives: e.g. a batch of one caption string)."""
    w = torch.softmax(sim.float(), dim=1).masked_fill(positives, 0.0)
    n_neg = (~positives).sum(dim=1)
    # softmax can underflow to exactly 0 for very dissimilar candidates: give every negative
    # a floor so a valid negative is always drawable.
    w = torch.where(positives, w, w + 1e-12)
    ok = n_neg >= num
    w[~ok] = 1.0  # placeholder so multinomial accepts the row; result is replaced below
    idx = torch.multinomial(w, num, replacement=False, generator=generator)
    idx[~ok] = -1
    return idx.squeeze(1) if num == 1 else idx


def itm_listwise_loss(match_margins: torch.Tensor) -> torch.Tensor:
    """(Q, 1 + n) ITM margins of each query's positive (column 0) and n hard negatives ->
    cross-entropy of picking the positive: the re-ranking objective itself."""
    target = torch.zeros(match_margins.shape[0], dtype=torch.long, device=match_margins.device)
    return F.cross_entropy(match_margins, target)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits [no match, match], (N,) labels in {0, 1} -> cross-entropy in which the
    positives and the negatives weigh half each, however many negatives each positive has."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    pos, neg = labels == 1, labels == 0
    if pos.any() and neg.any():
        return 0.5 * ce[pos].mean() + 0.5 * ce[neg].mean()
    return ce.mean()


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
    """(..., V) logits, (...) labels with -100 = ignore -> mean cross-entropy over picked tokens
    ((B, T, V) for a whole batch, or (N, V) for positions already picked).
    Zero (with a graph) when nothing was picked, so a short batch cannot make it NaN."""
    picked = labels != -100
    if not picked.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[picked], labels[picked])
