"""Training and evaluation end to end on a tiny model: steps, resume, DDP on gloo, the evaluator."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from envlf.evaluation import cli as EC
from envlf.evaluation import evaluate as E
from envlf.train import recipe as T
from envlf.data.features import compute_trunk_features
from envlf.train.loop import make_optimizer
from envlf.model.core import load_pretrained


def _args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--model", "tiny", "--batch-size", "8", "--epochs", "2",
            "--workers", "0", "--no-progress", "--val-rerank-k", "4", *extra]


def test_two_step_run_then_resume(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    out = tmp_path / "run"
    assert T.main(_args(tiny_data, out, "--max-steps", "2")) == 0
    for name in ("best/model.safetensors", "last/train_state.safetensors", "log.jsonl", "train_config.json"):
        assert (out / name).exists(), name
    log1 = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log1[-1]["step"] == 2 and "val_final" in log1[-1]
    model = load_pretrained(out / "last")
    assert model.config.lineage and model.config.lineage[-1]["event"] == "train"
    # the trunk cache was written and is reused
    assert list((tmp_path / "cache" / "features").glob("trunk-*.safetensors"))

    state = json.loads((out / "last" / "train_state.json").read_text())
    assert T.main(_args(tiny_data, out, "--resume", str(out / "last"), "--epochs", "3")) == 0
    log2 = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log2[-1]["epoch"] == 3 and log2[-1]["step"] > state["step"]
    assert load_pretrained(out / "last").fingerprint() != model.fingerprint()

    # a fresh run in the same directory keeps its own log; the earlier one is set aside
    assert T.main(_args(tiny_data, out, "--max-steps", "2")) == 0
    fresh = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in fresh] == [r["epoch"] for r in log1]
    assert len((out / "log.previous.jsonl").read_text().splitlines()) == len(log2)


def test_trunk_cache_of_a_split_serves_the_whole_dataset(tiny_data, tmp_path):
    """The index of the whole gallery reuses what training cached per split: only the
    records no cache holds are computed, and the result equals a fresh computation."""
    from envlf.data.datasets import load_dataset
    from envlf.model.core import create_model

    torch.manual_seed(0)
    model = create_model("tiny", pretrained=False).eval()
    ds = load_dataset(tiny_data)
    cache = tmp_path / "features"
    train = ds.split("train")
    computed = []
    compute_trunk_features(model, train, workers=0, cache_dir=cache, progress=False,
                             on_batch=lambda d, t: computed.append((d, t)))
    assert computed[-1] == (len(train), len(train))
    computed.clear()
    full = compute_trunk_features(model, ds, workers=0, cache_dir=cache, progress=False,
                                    on_batch=lambda d, t: computed.append((d, t)))
    assert computed[-1] == (len(ds) - len(train), len(ds) - len(train))
    fresh = compute_trunk_features(model, ds, workers=0, progress=False)
    assert torch.allclose(full.float(), fresh.float(), atol=1e-3)  # batches differ: float noise only
    computed.clear()  # now the whole dataset is cached under its own key
    assert torch.equal(compute_trunk_features(model, ds, workers=0, cache_dir=cache, progress=False,
                                                on_batch=lambda d, t: computed.append((d, t))), full)
    assert computed == []
    (cache / "trunk-garbage.safetensors").write_bytes(b"not a safetensors file")
    other = ds.split("val")  # a damaged file is skipped with a warning, the rest still serves
    assert torch.equal(compute_trunk_features(model, other, workers=0, cache_dir=cache, progress=False),
                       full[[i for i, r in enumerate(ds.records) if r.split == "val"]])


def test_resume_restores_optimizer_state(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    out = tmp_path / "run"
    T.main(_args(tiny_data, out, "--max-steps", "2"))
    model = load_pretrained(out / "last")
    tc = T.TrainConfig(data=str(tiny_data), model="tiny")
    opt = make_optimizer(model, tc.lr, tc.lr_pretrained, tc.weight_decay)
    meta = T.load_train_state(out / "last", opt)
    assert meta["step"] == 2
    states = list(opt.state_dict()["state"].values())
    assert states and all(float(s["step"]) == 2 for s in states)
    assert any(s["exp_avg"].abs().sum() > 0 for s in states)


def test_config_file_and_overrides(tiny_data, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"data": str(tiny_data), "model": "tiny", "epochs": 7, "lr": 1e-3}))
    tc = T.config_from_args(["--config", str(cfg), "--epochs", "3", "--set", "fusion.layers=3"])
    assert tc.epochs == 3 and tc.lr == 1e-3 and tc.overrides == ["fusion.layers=3"]
    from envlf.model.config import get_config

    c = T.apply_overrides(get_config("tiny"), ["fusion.layers=3", "vision.feature_levels=[4]", "loss.mlm_weight=0"])
    assert c.fusion.layers == 3 and c.vision.feature_levels == (4,) and c.loss.mlm_weight == 0
    with pytest.raises(ValueError, match="unknown field"):
        T.apply_overrides(get_config("tiny"), ["fusion.layerz=3"])
    cfg.write_text(json.dumps({"data": "x", "epochz": 1}))
    with pytest.raises(ValueError, match="unknown fields"):
        T.config_from_args(["--config", str(cfg)])


def test_unreadable_image_is_skipped_not_fatal(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    (tiny_data / "images" / "0.png").write_bytes(b"not an image at all")
    assert T.main(_args(tiny_data, tmp_path / "run", "--max-steps", "1")) == 0


def test_evaluate_end_to_end(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    T.main(_args(tiny_data, tmp_path / "run", "--max-steps", "2"))
    out_json = tmp_path / "eval.json"
    rc = EC.main(["--checkpoint", str(tmp_path / "run" / "best"), "--data", str(tiny_data), "--split", "val",
                 "--rerank-k", "2", "--k-sweep", "1,2,3", "--workers", "0", "--json", str(out_json)])
    assert rc == 0
    rep = json.loads(out_json.read_text())
    rows = rep["rows"]
    for name in ("ITC (expected)", "ITC (pessimistic)", "ITC + ITM top2 (expected)", "[ref] type oracle",
                 "[ref] string ceiling"):
        assert name in rows, name
    for row in rows.values():
        assert 0 <= row["mR"] <= 100
        assert row["mR"] == pytest.approx(sum(row[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6)
    assert rows["ITC (pessimistic)"]["mR"] <= rows["ITC (expected)"]["mR"] + 1e-9
    assert set(rep["k_sweep"]) == {"1", "2", "3"}
    assert rep["timings"]["rerank_pairs"] > 0
    assert "| method" in capsys.readouterr().out
    # a type oracle with 4 classes of 1 val image each is perfect at R@1 for text->image
    assert rows["[ref] type oracle"]["t2i_R@1"] == pytest.approx(100.0)


def test_rerank_only_reorders_the_top_k():
    """Re-ranking lifts the top k, re-ordered by ITM, above the rest, which keep ITC order."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    enc = E.Encoded(img, torch.zeros(5, 1, 1), txt, torch.zeros(3, 1, 1), torch.ones(3, 1),
                    caption_to_string=torch.arange(3).numpy(), strings=["a", "b", "c"])
    sims = txt @ img.t()
    t2i_idx = sims.topk(2, dim=1).indices
    i2t_idx = sims.t().topk(2, dim=1).indices
    # ITM reverses the order of the top two everywhere
    itm = (t2i_idx, torch.tensor([[0.0, 1.0]] * 3), i2t_idx, torch.tensor([[0.0, 1.0]] * 5))
    itm_only = SimpleNamespace(temperature_scale=lambda: torch.tensor(1.0))
    i2t, t2i = E.reranked_matrices(itm_only, enc, itm, k=2, blend=0.0)  # blend 0: ITM margins alone
    for u in range(3):
        col = t2i[:, u]
        order = col.argsort()[::-1]
        assert list(order[:2]) == [t2i_idx[u, 1].item(), t2i_idx[u, 0].item()]
        rest = [i for i in range(5) if i not in t2i_idx[u].tolist()]
        assert list(order[2:]) == sorted(rest, key=lambda i: -sims[u, i].item())


def test_identical_captions_get_identical_scores():
    strings, idx = E.distinct_strings(["A river.", "a river", "Two planes", "a  river ."])
    assert len(strings) == 2 and idx.tolist() == [0, 0, 1, 0]


@pytest.mark.slow
def test_two_process_ddp_on_gloo(tiny_data, tmp_path):
    """torchrun with two CPU processes: ITC gathers across ranks; both ranks step in lockstep."""
    env = dict(os.environ, ENVLF_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           "-m", "envlf.train.recipe", *_args(tiny_data, tmp_path / "ddp", "--max-steps", "2", "--epochs", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(l) for l in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2
    assert (tmp_path / "ddp" / "best" / "model.safetensors").exists()


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    d = T.Dist(torch.device("cpu"))
    assert d.gather(x) is x and not d.enabled


def _gather_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    d = T.Dist(torch.device("cpu"))
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    g = d.gather(x)  # (4, 3): rank 0's rows then rank 1's
    w = torch.arange(12.0).view(4, 3)
    (g * w).sum().backward()
    keys = d.gather(torch.tensor([10 * rank, 10 * rank + 1]))
    torch.save({"g": g.detach(), "grad": x.grad, "keys": keys}, os.path.join(out_dir, f"r{rank}.pt"))
    d.close()


def test_gather_across_two_gloo_processes(tmp_path):
    """Every rank sees every rank's rows; gradients flow back to the rank that owns them."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, 29623, str(tmp_path)), nprocs=2, join=True)
    w = torch.arange(12.0).view(4, 3)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"r{rank}.pt")
        assert torch.equal(r["g"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        assert r["keys"].tolist() == [0, 1, 10, 11]
        # both ranks' losses depend on this rank's rows: gradients are summed over ranks
        assert torch.allclose(r["grad"], 2 * w[2 * rank:2 * rank + 2])


def test_trainable_trunk_stages_train_on_the_cache(tiny_data, tmp_path, monkeypatch):
    """--set vision.trainable_stages=1: the last stage's weights move, the frozen ones do not,
    and the cached maps (keyed by the frozen part) serve the next run too."""
    monkeypatch.setenv("ENVLF_HOME", str(tmp_path))
    sets = ["--set", "vision.level_grid=coarsest", "--set", "vision.trainable_stages=1", "--seed", "0"]
    out = tmp_path / "run"
    assert T.main(_args(tiny_data, out, "--max-steps", "3", *sets)) == 0
    from envlf.model.config import get_config
    from envlf.model.core import create_model
    from envlf.train.recipe import apply_overrides

    torch.manual_seed(0)  # the run's own seed: the same initial weights
    fresh = create_model(apply_overrides(get_config("tiny"), ["vision.level_grid=coarsest",
                                                              "vision.trainable_stages=1"]), pretrained=False)
    trained = load_pretrained(out / "last")
    last = len(trained.vision.trunk.body.blocks) - 1
    moved = {k: not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items()
             if k.startswith("vision.trunk.")}
    assert any(v for k, v in moved.items() if f"body.blocks.{last}." in k and "running" not in k)
    assert not any(v for k, v in moved.items() if f"body.blocks.{last}." not in k)
    caches = sorted((tmp_path / "cache" / "features").glob("trunk-*.safetensors"))
    assert caches
    assert T.main(_args(tiny_data, tmp_path / "run2", "--max-steps", "1", *sets)) == 0
    assert sorted((tmp_path / "cache" / "features").glob("trunk-*.safetensors")) == caches
