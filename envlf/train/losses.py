"""Training objectives as plain functions (tested on their own in tests/test_losses.py).

Remote-sensing captions repeat a lot ("many buildings and green trees are in a dense
residential area" belongs to dozens of images). Pairs are therefore identified by keys:
``image_keys[i]`` names the image of pair i and ``text_keys[i]`` the (normalised) caption
string of pair i. Two pairs with the same image key or the same text key are positives
for each other in ITC, and are never drawn as ITM "hard negatives".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    pos = positive_mask(image_keys, text_keys, image_keys_all, text_keys_all)  # (B, N)
    logits_i2t = logit_scale * image_emb @ txt_all.t()  # (B, N)
    logits_t2i = logit_scale * text_emb @ img_all.t()  # (B, N)
    return (soft_target_nce(logits_i2t, pos) + soft_target_nce(logits_t2i, pos)) / 2


def soft_target_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(B, C) logits, (B, C) bool positives (>= 1 per row) -> mean cross-entropy against the
    uniform distribution over each row's positives (targets in float32 whatever the logits')."""
    pos = positives.float()
    targets = pos / pos.sum(1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


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


@dataclass
class ItmPairs:
    """The (image, text) pairs binary ITM scores for B query rows, in this order: the B rows'
    own pairs (positives), then n ITC-hard captions for each row whose image found n, then n
    hard images for each row whose caption found n. image / text index the caller's tokens."""

    image: torch.Tensor
    text: torch.Tensor
    ok_t: torch.Tensor  # (B,) bool: the row's image found n hard captions
    ok_i: torch.Tensor  # (B,) bool: the row's caption found n hard images
    n: int

    @property
    def counts(self) -> tuple[int, int, int]:
        """(positives, hard-caption negatives, hard-image negatives)."""
        return len(self.ok_t), int(self.ok_t.sum()) * self.n, int(self.ok_i.sum()) * self.n

    def listwise_terms(self, margins: torch.Tensor) -> list[torch.Tensor]:
        """The re-ranking objective on these pairs' ITM margins (the first len(image) of
        ``margins``): each row's positive against its n hard captions, and against its n hard images."""
        B, nt, ni = self.counts
        m_pos, terms = margins[:B], []
        if nt:
            terms.append(itm_listwise_loss(torch.cat([m_pos[self.ok_t, None], margins[B:B + nt].view(-1, self.n)], 1)))
        if ni:
            terms.append(itm_listwise_loss(torch.cat([m_pos[self.ok_i, None],
                                                      margins[B + nt:B + nt + ni].view(-1, self.n)], 1)))
        return terms


def itm_pairs(sim_i2t: torch.Tensor, pos_i2t: torch.Tensor, sim_t2i: torch.Tensor, pos_t2i: torch.Tensor,
              row_image: torch.Tensor, row_text: torch.Tensor, col_image: torch.Tensor, col_text: torch.Tensor,
              generator: torch.Generator | None, n: int) -> ItmPairs:
    """Positives and ITC-hard negatives for binary ITM (ALBEF's sampling), shared by training
    (EnVLF._itm_step) and fine-tuning from labels (batch_losses).

    sim_i2t (B, Tc) / pos_i2t: each row's image against the text columns col_text; sim_t2i
    (B, Ic) / pos_t2i: each row's caption against the image columns col_image. row_image /
    row_text: (B,) the rows' own image / text index. Captions are drawn before images."""
    B = len(row_image)
    neg_t = sample_hard_negatives(sim_i2t.detach(), pos_i2t, generator, n).view(B, n)  # into col_text
    neg_i = sample_hard_negatives(sim_t2i.detach(), pos_t2i, generator, n).view(B, n)  # into col_image
    ok_t, ok_i = (neg_t >= 0).all(1), (neg_i >= 0).all(1)
    image = torch.cat([row_image, row_image[ok_t].repeat_interleave(n), col_image[neg_i[ok_i].reshape(-1)]])
    text = torch.cat([row_text, col_text[neg_t[ok_t].reshape(-1)], row_text[ok_i].repeat_interleave(n)])
    return ItmPairs(image, text, ok_t, ok_i, n)


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


# -- fine-tuning from relevance labels: the losses of one step of judged pairs ----------------------

JUDGED_LOSSES = ("rank", "ce")

Pair = tuple[int, str, int]  # (image id, caption, string key)


@dataclass
class StepSlots:
    """The unique images and caption strings of one fine-tuning step, each encoded once.
    ITC columns are the rows' own plus, when enabled, the judged negatives attached to a row."""

    image_ids: dict[int, int]  # image id -> image slot
    text_keys: dict[int, int]  # string key -> text slot
    texts: list[str]  # text slot -> caption
    rows_img: list[int]  # row -> image slot
    rows_txt: list[int]  # row -> text slot
    img_cols: list[int]  # image slots of the t2i ITC columns
    txt_cols: list[int]  # text slots of the i2t ITC columns
    judged: list[tuple[int, int, int]]  # (image slot, text slot, row of its query or -1)
    anchor: dict[int, int]  # image slot -> text slot of its anchor caption ("rank" only)

    def image(self, i: int) -> int:
        return self.image_ids.setdefault(int(i), len(self.image_ids))

    def text(self, k: int, caption: str) -> int:
        if k not in self.text_keys:
            self.text_keys[k] = len(self.text_keys)
            self.texts.append(caption)
        return self.text_keys[k]

    @classmethod
    def of(cls, rows: Sequence[Pair], row_negatives: Sequence[Sequence[Pair]], row_directions: Sequence[str],
           itm_only_negatives: Sequence[Pair], itc_judged_negatives: bool, anchors: dict[int, Pair],
           judged_loss: str) -> "StepSlots":
        s = cls({}, {}, [], [], [], [], [], [], {})
        s.rows_img = [s.image(i) for i, _, _ in rows]
        s.rows_txt = [s.text(k, c) for _, c, k in rows]
        s.img_cols, s.txt_cols = list(dict.fromkeys(s.rows_img)), list(dict.fromkeys(s.rows_txt))
        for b, (negs, d) in enumerate(zip(row_negatives, row_directions)):
            for i, c, k in negs:
                a, t = s.image(i), s.text(k, c)
                s.judged.append((a, t, b))
                if itc_judged_negatives and d == "t2i" and a not in s.img_cols:
                    s.img_cols.append(a)  # a certain negative image for the t2i query's caption row
                if itc_judged_negatives and d == "i2t" and t not in s.txt_cols:
                    s.txt_cols.append(t)  # a certain negative caption for the i2t query's image row
        for i, c, k in itm_only_negatives:
            s.judged.append((s.image(i), s.text(k, c), -1))
        slot_image = list(s.image_ids)
        for a, _, _ in s.judged if judged_loss == "rank" else ():
            image = slot_image[a]
            if image in anchors and a not in s.anchor:
                ai, ac, ak = anchors[image]
                if ai != image:
                    raise ValueError("an anchor must be a pair of the same image")
                s.anchor[a] = s.text(ak, ac)
        return s


# long: the docstring states the objective and why "rank" exists; the code (~40 lines) is
# the embeddings, ITC and the ITM call, with the slots and the ITM terms in helpers
def batch_losses(model, features: torch.Tensor, known, rows: Sequence[Pair],
                 row_negatives: Sequence[Sequence[Pair]] = (),
                 row_directions: Sequence[str] = (), itm_only_negatives: Sequence[Pair] = (),
                 itc_judged_negatives: bool = True, generator: torch.Generator | None = None,
                 anchors: dict[int, Pair] | None = None, judged_loss: str = "ce",
                 judged_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Losses of one fine-tuning step (see envlf.train.finetune's docstring).

    features: (N, C, g, g) cached trunk maps indexed by image id. known: ``.mask(images, keys)``
    -> (I, T) bool of known-positive pairs (envlf.train.finetune.KnownPairs). rows: B known-positive
    (image, caption, key) pairs. row_negatives[b]: judged-negative pairs of row b's query
    (for a t2i row they share its caption, for an i2t row its image); row_directions[b]:
    "t2i" | "i2t" | "replay". itm_only_negatives: judged negatives of queries with no
    relevant judgement. anchors: image id -> one known-positive pair of that image (drawn by
    the caller for this step) to rank a judged negative of the same image against.
    judged_loss: "rank" (pairwise, below) or "ce" (judged negatives as label 0 in the ITM
    cross-entropy). Returns {"itc", "itm", "itm_judged", "loss"}.

    "rank": each judged-negative pair (A, c) must score a lower ITM margin than (a) the same
    image with a caption known to fit it (its anchor: softplus(m(A, c) - m(A, c_A)), where
    the image's own bias cancels) and (b) its query's relevant pair in the step (t2i: the
    relevant image for the same caption; i2t: the same image with the relevant caption).
    Why it exists: on the tiny model, "ce" labels changed ITM mostly by a per-image offset
    (images that collect many "not relevant" labels sink for every query, their own included:
    the offset's spread over gallery images was 6x the query-specific change). "rank" cut that
    offset to ~2x but did not turn it into held-out gains there (see the experiment), so it is
    an option, not the default.
    """
    if judged_loss not in JUDGED_LOSSES:
        raise ValueError(f"judged_loss must be one of {JUDGED_LOSSES}")
    dev = model.device
    s = StepSlots.of(rows, list(row_negatives) or [[] for _ in rows], list(row_directions) or ["replay"] * len(rows),
                     itm_only_negatives, itc_judged_negatives, anchors or {}, judged_loss)
    image_index = torch.tensor(list(s.image_ids), dtype=torch.long)  # slot -> image id
    text_keys = torch.tensor(list(s.text_keys), dtype=torch.long)  # slot -> string key
    tokens = model.image_tokens(features=features[image_index].to(dev).float())  # (I, 1+P, Dv)
    img_emb = model.embed_image_tokens(tokens)  # (I, E)
    hidden, batch = model.text_hidden(s.texts)  # (T, L, D)
    mask = batch.attention_mask
    txt_emb = model.embed_text_hidden(hidden, mask)  # (T, E)
    pos = known.mask(image_index, text_keys).to(dev)  # (I, T): image slot matches text slot
    scale = model.temperature_scale()

    ri_t, rt_t = torch.tensor(s.rows_img, device=dev), torch.tensor(s.rows_txt, device=dev)
    ic_t, tc_t = torch.tensor(s.img_cols, device=dev), torch.tensor(s.txt_cols, device=dev)
    if not bool(pos[ri_t, rt_t].all()):
        raise ValueError("a row of the step is not a known positive pair")
    if any(not bool(pos[a, t]) for a, t in s.anchor.items()):
        raise ValueError("an anchor is not a known positive pair")
    pos_i2t = pos[ri_t][:, tc_t]  # (B, Tc)
    pos_t2i = pos[ic_t][:, rt_t].t()  # (B, Ic)
    logits_i2t = scale * img_emb[ri_t] @ txt_emb[tc_t].t()
    logits_t2i = scale * txt_emb[rt_t] @ img_emb[ic_t].t()
    itc = (soft_target_nce(logits_i2t, pos_i2t) + soft_target_nce(logits_t2i, pos_t2i)) / 2

    # ITM cross-entropy: rows (1), loss.itm_negatives ITC-hard negatives each way per row (0),
    # as in training (EnVLF._itm_step); judged negatives join it as 0s ("ce") or are ranked
    # below their comparators ("rank")
    lc = model.config.loss
    pairs = itm_pairs(logits_i2t, pos_i2t, logits_t2i, pos_t2i, ri_t, rt_t, ic_t, tc_t, generator,
                      max(1, lc.itm_negatives))
    itm, judged_term, margins = _judged_itm(model, tokens, hidden, mask, pairs, s, judged_loss, judged_weight)
    if lc.rank_weight > 0:  # training's listwise term: each row's pair against its hard negatives
        terms = pairs.listwise_terms(margins)
        if terms:
            itm = itm + lc.rank_weight * torch.stack(terms).mean()
    return {"itc": itc, "itm": itm, "itm_judged": judged_term.detach(),
            "loss": lc.itc_weight * itc + lc.itm_weight * itm}


def _judged_itm(model, tokens, hidden, mask, pairs: ItmPairs, s: StepSlots, judged_loss: str,
                judged_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ITM loss of the step's pairs and its judged pairs: (itm, the judged term, margins)."""
    dev = tokens.device
    n_pos, nt, ni = pairs.counts
    n_ce = n_pos + nt + ni
    pi, pt = [pairs.image], [pairs.text]
    cmp_a, cmp_b = [], []  # ranking terms: index of the negative pair, of its comparator pair
    if s.judged:
        anchor_pair = {a: n_ce + len(s.judged) + n for n, a in enumerate(s.anchor)}
        for n, (a, _, row) in enumerate(s.judged):
            if a in anchor_pair:
                cmp_a.append(n_ce + n)
                cmp_b.append(anchor_pair[a])
            if row >= 0:
                cmp_a.append(n_ce + n)
                cmp_b.append(row)  # the first B pairs are the rows
        pi.append(torch.tensor([a for a, _, _ in s.judged] + list(s.anchor), device=dev))
        pt.append(torch.tensor([t for _, t, _ in s.judged] + list(s.anchor.values()), device=dev))
    pi_t, pt_t = torch.cat(pi), torch.cat(pt)
    logits = model.itm_logits(tokens[pi_t], hidden[pt_t], mask[pt_t])
    margins = logits[:, 1] - logits[:, 0]
    labels = torch.cat([torch.ones(n_pos), torch.zeros(nt + ni)]).long().to(dev)
    judged_term = logits.sum() * 0.0  # keeps a graph when there is nothing to rank
    if s.judged and judged_loss == "ce":
        labels = torch.cat([labels, torch.zeros(len(s.judged), dtype=torch.long, device=dev)])
        itm = itm_loss(logits[:n_ce + len(s.judged)], labels)
    else:
        itm = itm_loss(logits[:n_ce], labels)
        if cmp_a:
            ia, ib = torch.tensor(cmp_a, device=dev), torch.tensor(cmp_b, device=dev)
            judged_term = F.softplus(margins[ia] - margins[ib]).mean()
            itm = itm + judged_weight * judged_term
    return itm, judged_term, margins
