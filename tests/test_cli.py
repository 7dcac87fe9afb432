"""The `envlf` console script as a user runs it: a process on an empty home."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envlf.cli import COMMANDS
from envlf.model.core import create_model

ROOT = Path(__file__).resolve().parents[1]


def envlf_script() -> str:
    path = shutil.which("envlf") or shutil.which("envlf", path=str(Path(sys.executable).parent))
    assert path, "the envlf console script is not installed: pip install -r requirements.txt installs it"
    return path


def run(args, home: Path, timeout=600):
    env = {**os.environ, "HOME": str(home), "ENVLF_HOME": str(home / "envlf"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("ENVLF_CHECKPOINT", None)
    return subprocess.run([envlf_script(), *args], cwd=home, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand_and_a_wrong_name_is_one_line(tmp_path):
    out = run(["--help"], tmp_path)
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"\n  {name} " in out.stdout
    assert "example:" in out.stdout
    bad = run(["trian"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no subcommand 'trian'" in bad.stderr
    assert run([], tmp_path).returncode == 2


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "serve"])
def test_each_subcommands_help_names_itself_and_shows_an_example(name, capsys):
    from envlf.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    prog = "envlf index" if name == "search" else f"envlf {name}"
    assert out.startswith(f"usage: {prog}") and "example:" in out
    example = out.split("example:")[1].strip().splitlines()[0].strip()
    assert example.startswith(f"envlf {name}")


def test_serve_takes_the_apps_flags(tmp_path):
    out = run(["serve", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--checkpoint" in out.stdout and "--gallery" in out.stdout
    assert not (tmp_path / "envlf").exists()  # --help builds nothing


@pytest.mark.slow
def test_index_build_then_search_through_the_script(tiny_data, tmp_path):
    """`envlf index build` with its real worker pool, then `envlf search` answers as
    `envlf index search` does."""
    torch.manual_seed(0)
    ckpt = create_model("tiny").save_pretrained(tmp_path / "ckpt")
    home = tmp_path / "home"
    home.mkdir()
    built = run(["index", "build", "--checkpoint", str(ckpt), "--source", str(tiny_data), "--out",
                 str(tmp_path / "idx"), "--workers", "2", "--device", "cpu"], home)
    assert built.returncode == 0, built.stderr[-3000:]
    query = ["--index", str(tmp_path / "idx"), "--checkpoint", str(ckpt), "--text", "red square", "-k", "3",
             "--device", "cpu"]
    got = run(["search", *query], home)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.count("itc=") == 3
    alias = subprocess.run([sys.executable, "-m", "envlf.search.cli", "search", *query], cwd=home, capture_output=True,
                           text=True, timeout=600)
    hits = [l for l in got.stdout.splitlines() if "itc=" in l]
    assert hits == [l for l in alias.stdout.splitlines() if "itc=" in l]


def test_evaluate_with_a_report_through_the_script(tiny_data, tmp_path):
    """`envlf evaluate --report DIR` with its real worker pool: the recalls, then the four files."""
    torch.manual_seed(0)
    ckpt = create_model("tiny").save_pretrained(tmp_path / "ckpt")
    home = tmp_path / "home"
    home.mkdir()
    got = run(["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--split", "val", "--rerank-k", "4",
               "--workers", "2", "--device", "cpu", "--report", str(tmp_path / "rep")], home)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "ITC + ITM top4 (expected)" in got.stdout and "report: " in got.stdout
    for name in ("per_class.md", "per_class.csv", "worst.html", "worst.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    assert "t2i R@1" in (tmp_path / "rep" / "per_class.md").read_text()
