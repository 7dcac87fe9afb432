"""Swapped-word captions (envlf.train.negatives) and their use as ITM negatives."""

import re

import numpy as np
import pytest
import torch

from envlf.model.config import get_config
from envlf.model.core import create_model
from envlf.train.negatives import SWAPS, WordSwapper

TRAIN = ["Four white planes are parked beside a grey terminal.",
         "Two white boats are moored on the left of the pier.",
         "Three red cars are parked on the right.",
         "Many green trees stand beside white houses."]


def _changed(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = re.findall(r"[A-Za-z]+", a), re.findall(r"[A-Za-z]+", b)
    assert len(wa) == len(wb)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


def test_one_word_changes_for_one_of_another_class_never_a_synonym():
    swap, rng = WordSwapper(), np.random.default_rng(0)
    caption = "There are four little planes and a small car on the left."
    seen = set()
    for _ in range(200):
        out = swap(caption, rng)
        (old, new), = _changed(caption, out)  # exactly one word differs
        seen.add(old.lower())
        assert new.lower() in SWAPS[old.lower()]
        assert {old.lower(), new.lower()} not in ({"little", "small"}, {"car", "vehicle"}, {"plane", "airplane"})
        if old.lower() == "planes":
            assert new.endswith("s")  # a plural stays plural
        if old.lower() == "four":
            assert new not in ("one", "a")  # a number above one stays above one
    assert seen == {"four", "little", "planes", "small", "car", "left"}  # every swappable word gets its turn


def test_case_is_kept_and_captions_without_a_swappable_word_give_none():
    swap, rng = WordSwapper(), np.random.default_rng(1)
    out = swap("Planes", rng)
    assert out[0].isupper() and out.endswith("s") and out != "Planes"
    assert swap("It is a river.", rng) is None
    assert swap("", rng) is None


def test_with_training_captions_it_uses_only_their_words_and_word_pairs():
    swap, rng = WordSwapper(TRAIN), np.random.default_rng(0)
    words = {w.lower() for c in TRAIN for w in re.findall(r"[A-Za-z]+", c)}
    pairs = {p for c in TRAIN for ws in [re.findall(r"[a-z]+", c.lower())] for p in zip(ws, ws[1:])}
    made = 0
    for caption in TRAIN:
        for _ in range(50):
            out = swap(caption, rng)
            if out is None:
                continue
            made += 1
            (old, new), = _changed(caption, out)
            assert new.lower() in words
            ws = re.findall(r"[a-z]+", out.lower())
            i = next(j for j, (a, b) in enumerate(zip(re.findall(r"[a-z]+", caption.lower()), ws)) if a != b)
            assert i == 0 or (ws[i - 1], ws[i]) in pairs
            assert i + 1 == len(ws) or (ws[i], ws[i + 1]) in pairs
    assert made > 100
    # "gray" is a colour, but these captions say "grey": never used
    assert not any("gray" in (swap(c, rng) or "").lower() for c in TRAIN for _ in range(30))


def test_no_position_swaps_when_tiles_are_flipped():
    rng = np.random.default_rng(0)
    flipped = WordSwapper(positions=False)
    assert flipped("The pier on the left, at the top.", rng) is None
    assert WordSwapper()("The pier on the left, at the top.", rng) is not None


def test_batch_gives_the_rows_it_could_swap():
    rows, texts = WordSwapper().batch(["a river", "two planes", "It is a beach.", "a red roof"],
                                       np.random.default_rng(0))
    assert rows == [1, 3] and len(texts) == 2 and texts[0] != "two planes" and texts[1] != "a red roof"


@pytest.mark.parametrize("negatives,rank_weight", [(1, 0.0), (2, 1.0)])
def test_swapped_captions_are_itm_negatives_of_their_images(negatives, rank_weight):
    cfg = get_config("tiny")
    cfg.loss.itm_negatives, cfg.loss.rank_weight = negatives, rank_weight
    torch.manual_seed(0)
    model = create_model(cfg).train()
    captions = ["two white planes beside a grey terminal", "a river", "three red cars", "dense houses and trees"]
    rows, swapped = WordSwapper().batch(captions, np.random.default_rng(0))
    assert rows == [0, 2, 3]
    batch, pixels = model.tokenize(captions), torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(4)

    def itm(**kw):
        return model(batch, keys, keys, pixels=pixels, generator=torch.Generator().manual_seed(0), **kw)["itm"]

    base = itm()
    calls = []
    real = model.itm_logits

    def spy(image_tokens, hidden, mask, shift=0.0):
        calls.append(image_tokens.detach())
        logits = real(image_tokens, hidden, mask)
        if len(calls) % 2 == 0:  # the second call of a step: the swapped captions
            logits = logits + torch.tensor([0.0, shift])
        return logits

    swaps = dict(swap_rows=torch.as_tensor(rows), swap_text=model.tokenize(swapped))
    model.itm_logits = lambda *a: spy(*a, shift=0.0)
    with_swaps = itm(**swaps)
    assert torch.isfinite(with_swaps) and not torch.isclose(base, with_swaps)
    image_tokens = model.image_tokens(pixels)
    assert len(calls) == 2 and torch.allclose(calls[1], image_tokens[rows])  # each swap meets its own image
    # labelled "no match": the more the swaps look like matches, the higher the loss
    model.itm_logits = lambda *a: spy(*a, shift=5.0)
    worse = itm(**swaps)
    model.itm_logits = lambda *a: spy(*a, shift=-5.0)
    better = itm(**swaps)
    assert better < with_swaps < worse
    del model.itm_logits
    itm(**swaps).backward()
    assert model.fusion.layers[0].cross_attn.q.weight.grad is not None


def test_swap_names_the_word_it_changed_and_its_kind():
    from envlf.train.negatives import KIND

    rng = np.random.default_rng(3)
    for _ in range(30):
        text, old = WordSwapper().swap("Three red cars on the left", rng)
        (was, _), = _changed("Three red cars on the left", text)
        assert old == was.lower()
        assert KIND[old] in {"count", "colour", "noun", "position"}
    assert (KIND["boats"], KIND["grey"], KIND["little"], KIND["upper"]) == ("noun", "colour", "size", "position")


def test_a_training_run_with_swaps(tiny_data, tmp_path, monkeypatch):
    """`--set loss.itm_swap_negatives=true` trains, and the swaps reach the model's step."""
    from envlf.train import recipe as T
    from envlf.model.core import EnVLF

    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    seen = []
    real = EnVLF.forward

    def spy(self, *a, swap_rows=None, swap_text=None, **kw):
        seen.append(0 if swap_rows is None else len(swap_rows))
        return real(self, *a, swap_rows=swap_rows, swap_text=swap_text, **kw)

    monkeypatch.setattr(EnVLF, "forward", spy)
    out = tmp_path / "run"
    args = ["--data", str(tiny_data), "--out", str(out), "--model", "tiny", "--batch-size", "8", "--epochs", "1",
            "--workers", "0", "--no-progress", "--val-rerank-k", "0", "--max-steps", "2", "--augment", "none",
            "--set", "loss.itm_swap_negatives=true"]
    assert T.main(args) == 0 and (out / "best" / "model.safetensors").exists()
    assert len(seen) == 2 and all(n > 0 for n in seen)
