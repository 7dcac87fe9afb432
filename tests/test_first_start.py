"""The README's run command as a user runs it: `python app.py` as a process on an empty home.

The real start-up path: the page first, the embedded default built by a child process
(`python -m envlf.bootstrap`, its world made by a spawn pool of 2 workers, its model and
index by DataLoader workers), then served without a restart. Only the size differs from a
user's first start: ENVLF_DEMO_SIZE=tiny (a few dozen tiles, one epoch per stage).
Nothing here measures time: the deadlines are generous limits for a stuck process, not
targets (the README's figures come from `envlf bench first-start`, which drives
the same envlf.appprocess.AppProcess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envlf.appprocess import ROOT, AppProcess

pytestmark = [pytest.mark.slow, pytest.mark.weights]


class App(AppProcess):
    """`python app.py` on a tiny demo world (ENVLF_DEMO_SIZE=tiny), on the CPU."""

    def __init__(self, home: Path, log: Path):
        super().__init__(home, log, ENVLF_DEMO_SIZE="tiny", ENVLF_DEVICE="cpu")


def _hits(out: tuple) -> list:
    gallery = out[0]
    assert isinstance(gallery, list) and gallery, out
    return gallery


def _wait_builder_gone(home: Path) -> None:
    from envlf.bootstrap import STATUS_FILE, pid_alive

    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:
        st = json.loads((home / STATUS_FILE).read_text())
        if st["state"] != "building" or not pid_alive(st.get("pid")):
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    """One first start on an empty home, kept for the second-start test."""
    home = tmp_path_factory.mktemp("first") / "home"
    app = App(home, home.parent / "console-1.txt")
    try:
        app.wait_page()
        quick = _hits(app.search_when_ready())
        full = _hits(app.search_when_ready(final=True))
        console = app.console()
    finally:
        app.stop()
    _wait_builder_gone(home)
    return home, console, quick, full


def test_first_start_serves_the_page_then_searches(first_start):
    home, console, quick, full = first_start
    assert "first start: building the embedded demo" in console
    assert "now serving full" in console  # the second stage replaced the first without a restart
    pub = json.loads((home / "default.json").read_text())
    assert pub["stage"] == "full" and pub["size"] == "tiny"
    build = (home / "build.log").read_text()
    assert build.count("training the quick model") == 1 and build.count("training the full model") == 1
    status = json.loads((home / "build-status.json").read_text())
    assert status["state"] == "done"
    assert len(quick) >= 1 and len(full) >= 1


def test_second_start_only_loads(first_start, tmp_path):
    home, *_ = first_start
    before = (home / "build.log").read_text()
    mtime = (home / "models" / "world-lite" / "best" / "model.safetensors").stat().st_mtime_ns
    app = App(home, tmp_path / "console-2.txt")
    try:
        app.wait_page()
        hits = _hits(app.search_when_ready())
        console = app.console()
    finally:
        app.stop()
    assert "first start" not in console and "started envlf.bootstrap" not in console
    assert "serving the embedded demo" in console and hits
    assert (home / "build.log").read_text() == before  # no builder ran
    assert (home / "models" / "world-lite" / "best" / "model.safetensors").stat().st_mtime_ns == mtime


def test_two_first_starts_at_once_build_once(tmp_path):
    home = tmp_path / "home"
    apps = [App(home, tmp_path / f"console-{i}.txt") for i in range(2)]
    try:
        for app in apps:
            app.wait_page()
        results = [_hits(app.search_when_ready(final=True)) for app in apps]
    finally:
        for app in apps:
            app.stop()
    _wait_builder_gone(home)
    build = (home / "build.log").read_text()
    assert build.count("training the quick model") == 1 and build.count("training the full model") == 1
    assert build.count("generating a demo world") == 2  # one per stage, not per app
    assert all(results)


def test_importing_app_starts_nothing(tmp_path):
    """What a spawned worker, `gradio app.py` and Spaces do: import the module. No file in the
    home, no thread, no child process."""
    home = tmp_path / "home"
    code = ("import threading, app, multiprocessing; "
            "assert app.startup.state == 'waiting' and app.startup._thread is None; "
            "assert not multiprocessing.active_children(); "
            "print(sorted(t.name for t in threading.enumerate() if t.name.startswith('envlf')))")
    env = {**os.environ, "ENVLF_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("ENVLF_CHECKPOINT", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]" and not home.exists()
