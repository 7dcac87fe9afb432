"""Losses against hand-worked cases and naive references."""

import math

import pytest
import torch
import torch.nn.functional as F

from envlf.train import losses as L


def test_itc_two_orthogonal_pairs_by_hand():
    e = torch.eye(2)
    loss = L.itc_loss(e, e, torch.tensor(1.0), torch.tensor([0, 1]), torch.tensor([0, 1]))
    # each row: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_itc_identical_captions_are_positives_by_hand():
    e = torch.eye(2)
    # two different images whose captions are the same string: each row has two positives
    loss = L.itc_loss(e, e, torch.tensor(1.0), torch.tensor([0, 1]), torch.tensor([7, 7]))
    # -(0.5 log(e/(e+1)) + 0.5 log(1/(e+1))) = log(1 + e) - 0.5
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 0.5, abs=1e-6)


def test_itc_identical_images_are_positives():
    e = torch.eye(3)
    a = L.itc_loss(e, e, torch.tensor(5.0), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))
    b = L.itc_loss(e, e, torch.tensor(5.0), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert a.item() != pytest.approx(b.item())


def _naive_itc(img, txt, scale, ik, tk):
    B = img.shape[0]
    total = 0.0
    for direction in (0, 1):
        q, c = (img, txt) if direction == 0 else (txt, img)
        for i in range(B):
            logits = [scale * float(q[i] @ c[j]) for j in range(B)]
            lse = math.log(sum(math.exp(x) for x in logits))
            pos = [j for j in range(B) if ik[i] == ik[j] or tk[i] == tk[j]]
            total += -sum(logits[j] - lse for j in pos) / len(pos) / B
    return total / 2


def test_itc_matches_naive_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ik, tk = torch.tensor([0, 1, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 3, 5])
    got = L.itc_loss(img, txt, torch.tensor(3.0), ik, tk).item()
    assert got == pytest.approx(_naive_itc(img, txt, 3.0, ik.tolist(), tk.tolist()), abs=1e-5)


def test_itc_with_gathered_candidates_equals_full_batch_rows():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(8, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 4, generator=g), dim=-1)
    ik, tk = torch.arange(8), torch.arange(8)
    full = L.itc_loss(img, txt, torch.tensor(2.0), ik, tk)
    # two "ranks" of 4, each scoring its rows against all 8 candidates: the mean is the full loss
    halves = [L.itc_loss(img[s], txt[s], torch.tensor(2.0), ik[s], tk[s], img, txt, ik, tk)
              for s in (slice(0, 4), slice(4, 8))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), abs=1e-6)


def test_hard_negatives_never_positive_duplicates_included():
    g = torch.Generator().manual_seed(0)
    ik = torch.tensor([0, 0, 1, 2, 3, 3])
    tk = torch.tensor([0, 1, 2, 2, 4, 5])  # pairs 2 and 3 share a caption string
    pos = L.positive_mask(ik, tk)
    sim = torch.randn(6, 6, generator=g) * 5
    sim[pos] += 100.0  # positives are by far the most similar: the sampler must still avoid them
    for _ in range(200):
        idx = L.sample_hard_negatives(sim, pos, g)
        assert (idx >= 0).all()
        assert not pos[torch.arange(6), idx].any()


def test_hard_negatives_row_without_negatives_gives_minus_one():
    pos = torch.tensor([[True, True], [False, True]])
    idx = L.sample_hard_negatives(torch.zeros(2, 2), pos)
    assert idx.tolist() == [-1, 0]


def test_hard_negatives_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    pos = torch.tensor([[True, False, False, False]])
    draws = torch.stack([L.sample_hard_negatives(sim, pos, g) for _ in range(2000)])
    share = (draws == 1).float().mean().item()
    expected = math.exp(3) / (math.exp(3) + 2)  # softmax restricted to the negatives
    assert share == pytest.approx(expected, abs=0.03)


def test_hard_negatives_survive_underflow():
    sim = torch.tensor([[1000.0, -1000.0, -1000.0]])
    pos = torch.tensor([[True, False, False]])
    idx = L.sample_hard_negatives(sim, pos)
    assert idx.item() in (1, 2)


def test_itm_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert L.itm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_itm_loss_balances_positives_and_negatives():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    neg = (math.log(1 + math.exp(-2)) + 2 * math.log(2)) / 3
    assert L.itm_loss(logits, labels).item() == pytest.approx(0.5 * math.log(2) + 0.5 * neg, abs=1e-6)


def test_several_hard_negatives_are_distinct_and_never_positive():
    g = torch.Generator().manual_seed(0)
    ik, tk = torch.tensor([0, 0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 2, 5, 6])
    pos = L.positive_mask(ik, tk)
    sim = torch.randn(6, 6, generator=g)
    for _ in range(50):
        idx = L.sample_hard_negatives(sim, pos, g, num=3)
        assert idx.shape == (6, 3)
        for r in range(6):
            row = idx[r].tolist()
            assert len(set(row)) == 3 and not pos[r, row].any()
    # a row with fewer negatives than asked gets -1s
    few = torch.tensor([[True, True, False], [False, False, False]])
    idx = L.sample_hard_negatives(torch.zeros(2, 3), few, num=2)
    assert idx[0].tolist() == [-1, -1] and sorted(idx[1].tolist()) in ([0, 1], [0, 2], [1, 2])


def test_listwise_loss_by_hand():
    m = torch.tensor([[2.0, 0.0, 0.0]])
    assert L.itm_listwise_loss(m).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), abs=1e-6)


def test_mask_tokens_respects_specials_and_padding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 40), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0
    masked, labels = L.mask_tokens(ids, mask, [101, 102, 0], mask_id=103, vocab_size=30522,
                                   probability=0.15, generator=g)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 30:].any()
    assert (labels[picked] == ids[picked]).all()
    assert (masked[~picked] == ids[~picked]).all()
    rate = picked[:, 1:30].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.02)
    share_mask = (masked[picked] == 103).float().mean().item()
    assert share_mask == pytest.approx(0.8, abs=0.06)


def test_mlm_loss_uniform_logits_is_log_vocab():
    V = 50
    logits = torch.zeros(2, 5, V)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 7, 9
    assert L.mlm_loss(logits, labels).item() == pytest.approx(math.log(V), abs=1e-6)


def test_mlm_loss_nothing_picked_is_zero_not_nan():
    logits = torch.randn(1, 3, 10, requires_grad=True)
    loss = L.mlm_loss(logits, torch.full((1, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
