"""Getting the app ready without holding the page back.

`python app.py` serves its page at once; `Startup` gets the model and index in a thread of
the app and tells the page (and the console) what it is doing:

- a checkpoint + an index: loaded (seconds);
- a checkpoint + a gallery with no index yet: the index is built by a separate process
  (``python -m demo.build_gallery``), while the page says how far it is;
- nothing configured: the embedded default (envlf.bootstrap), built by a separate process
  ``python -m envlf.bootstrap --background`` in stages; the page serves each stage's model
  as soon as it is published and switches to the next without a restart.

Heavy work runs in child processes, never in the import of app.py, so a spawned worker,
a reload or Hugging Face Spaces importing the module starts nothing. A child process is
started at a lower priority and the app's own threads are sized so that both fit the
cores (envlf.runtime).

`current()` is what the handlers serve from: the Backend, or `NotReady` with a line saying
what the page is waiting for.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .backend import Backend, BackendError, load_backend
from .config import AppConfig

log = logging.getLogger("envlf.app")

POLL_S = 1.0
MAX_BUILDER_STARTS = 3  # a builder that keeps dying is an error, not something to retry forever


class NotReady(RuntimeError):
    """The app has no model to serve yet (the message says why)."""


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "estimating the time left"
    s = int(seconds)
    return f"about {s} s left" if s < 90 else f"about {round(s / 60)} min left"


class Startup:
    """The app's state: what it serves (`current()`), and what it is doing (`snapshot()`)."""

    def __init__(self, config: AppConfig, on_backend: Callable[[Backend], None] | None = None,
                 workers: int = 2):
        self.config = config
        self.workers = workers
        self.on_backend = on_backend or (lambda b: None)
        self.state = "waiting"  # waiting | building | ready | failed
        self.error = ""
        self.progress: dict = {}  # the builder's status (envlf.bootstrap.StatusWriter)
        self.backend: Backend | None = None
        self.stage = ""  # the embedded default's stage being served ("quick", "full"), "" otherwise
        self.final = False  # nothing better is coming
        self.version = 0  # +1 per backend served, so pages know when to refresh
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._builder_starts = 0
        self._printed, self._step, self._said = "", "", 0.0

    # -- what the handlers and the page read ------------------------------------------------
    def current(self) -> Backend:
        b = self.backend
        if b is None:
            if self.state == "failed":
                raise NotReady(f"The app could not get ready: {self.error}")
            raise NotReady(f"The app is still getting ready ({self.headline()}); try again in a minute.")
        return b

    def headline(self) -> str:
        p = self.progress
        if self.state == "failed":
            return f"failed: {self.error}"
        if p.get("state") == "building":
            pct = f"{100 * float(p.get('fraction') or 0):.0f}%"
            return (f"stage {p.get('stage_no', '?')}/{p.get('stages', '?')} ({p.get('stage', '')}): "
                    f"{p.get('message', 'starting')} · {pct} · {_fmt_eta(p.get('eta_s'))}")
        return p.get("message") or "starting"

    def snapshot(self) -> dict:
        return dict(state=self.state, ready=self.backend is not None, final=self.final, version=self.version,
                    stage=self.stage, error=self.error, progress=dict(self.progress), headline=self.headline())

    # -- running --------------------------------------------------------------------------------
    def prepare_now(self) -> None:
        """What takes seconds and can fail on the configuration is done before the page goes up
        (app.py's main: one error line and exit code 2): a configured checkpoint with an index
        is loaded; with a gallery to index, its checkpoint is found and loaded once (the index
        is then built in the background). Raises BackendError."""
        cfg = self.config
        if cfg.checkpoint is None:
            return
        if cfg.index is not None or cfg.gallery is None:
            self._serve(load_backend(cfg))
            return
        from envlf.model.checkpoint import CheckpointError
        from envlf.model.core import load_pretrained

        from .backend import resolve_checkpoint

        try:
            load_pretrained(resolve_checkpoint(cfg.checkpoint, cfg.home), device="cpu")
        except CheckpointError as e:
            raise BackendError(str(e)) from None

    def start(self) -> "Startup":
        """Start getting ready in a thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None and not self.final:
                self._thread = threading.Thread(target=self._run, name="envlf-startup", daemon=True)
                self._thread.start()
        return self

    def wait(self, timeout: float | None = None, final: bool = False) -> bool:
        """Block until something is served (final: until nothing better is coming)."""
        t_end = None if timeout is None else time.monotonic() + timeout
        while not (self.state == "failed" or (self.final if final else self.backend is not None)):
            if t_end is not None and time.monotonic() > t_end:
                return False
            time.sleep(0.1)
        return self.state != "failed"

    def _serve(self, backend: Backend, stage: str = "", final: bool = True) -> None:
        self.on_backend(backend)
        old = self.backend
        self.backend, self.stage, self.final = backend, stage, final
        self.version += 1
        self.state = "ready"
        if old is not None:
            log.info("now serving %s (model %s, %d images)", stage or "the new model", backend.model_fingerprint,
                     len(backend.index))

    def _fail(self, message: str) -> None:
        self.error, self.state = message, "failed"
        print(f"[envlf] error: {message}", file=sys.stderr, flush=True)

    def _say(self, line: str, tick: bool = False) -> None:
        """A line on the console; progress ticks (tick=True) at most every 15 s or on a new step."""

        step = re.sub(r"[\d.]+", "#", line.split(" · ")[0])
        if line == self._printed or (tick and step == self._step and time.monotonic() - self._said < 15):
            return
        self._printed, self._step, self._said = line, step, time.monotonic()
        print(f"[envlf] {line}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        try:
            if self.config.checkpoint is None:
                self._run_default()
            elif self.config.index is None and self.config.gallery is not None:
                self._run_gallery()
            else:
                self.state = "building"
                self.progress = {"message": "loading the model and the index"}
                self._serve(load_backend(self.config))
        except BackendError as e:
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - the page and the console get one line, the log the rest
            log.exception("start-up failed")
            self._fail(f"{type(e).__name__}: {e}")

    # -- child processes ----------------------------------------------------------------------
    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen:
        from envlf.runtime import THREAD_ENV, usable_cores

        env = dict(os.environ)
        for var in THREAD_ENV:  # the child sizes its own pools (envlf.runtime.background)
            env.pop(var, None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as fh:
            child = subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
        self._child = child
        log.info("started %s (pid %d, %d cores, log %s)", " ".join(args[:1]), child.pid, usable_cores(), log_path)
        return child

    def _share_cores(self, building: bool) -> None:
        """While a build runs beside it, the app keeps one core for the page's searches and
        the (niced) build takes the rest; alone, the app uses every core."""
        from envlf.runtime import set_threads, usable_cores

        n = usable_cores()
        set_threads(max(1, n - 1) if building and n > 2 else n, children=False)

    def stop(self) -> None:
        """Stop a builder this app started (tests; the app leaves it running on exit so that
        the next start finds its work done)."""
        if self._child is not None and self._child.poll() is None:
            self._child.terminate()
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()

    # -- the embedded default -----------------------------------------------------------------
    def _run_default(self) -> None:
        from envlf import bootstrap as B

        home = self.config.home
        home.mkdir(parents=True, exist_ok=True)
        plan = B.stages()
        names = [s.name for s in plan]
        served = -1
        pub = B.published(home)
        if pub is not None and pub[0].name == names[-1]:
            self._say(f"serving the embedded demo from {home} ({pub[0].about})")
            self._load_default(pub, final=True)
            return
        self.state = "building"
        if pub is None:
            self._say(f"first start: building the embedded demo in {home} in the background "
                      f"(stages: {', '.join(s.about for s in plan)}); the page is up meanwhile")
        else:
            self._say(f"serving the {pub[0].about} from {home}; building the rest in the background")
        self._share_cores(True)
        child = None
        while True:
            pub = B.published(home)
            if pub is not None and names.index(pub[0].name) > served:
                served = names.index(pub[0].name)
                self._load_default(pub, final=served == len(names) - 1)
                if self.final:
                    break
            status = B.read_json(home / B.STATUS_FILE) or {}
            builder_alive = status.get("state") == "building" and B.pid_alive(status.get("pid"))
            if builder_alive:
                self.progress = status
                self._say(self.headline(), tick=True)
            elif child is None or child.poll() is not None:
                if child is not None and status.get("state") == "failed" and status.get("pid") is None:
                    raise BackendError(f"building the embedded demo failed: {status.get('error')} "
                                       f"(log: {home / B.LOG_FILE})")
                if self._builder_starts >= MAX_BUILDER_STARTS:
                    raise BackendError(f"the builder of the embedded demo keeps stopping (log: {home / B.LOG_FILE})")
                self._builder_starts += 1
                self.progress = {"state": "building", "message": "starting the builder", "fraction": 0.0}
                child = self._spawn(["envlf.bootstrap", "--home", str(home), "--workers", str(self.workers),
                                     "--background", "--no-wait"], home / B.LOG_FILE)
                time.sleep(POLL_S)  # the builder takes the lock and writes its status
            time.sleep(POLL_S)
        self.progress = {"state": "done", "message": "ready"}
        self._share_cores(False)

    def _load_default(self, pub, final: bool) -> None:
        stage, assets = pub
        cfg = self.config

        backend = load_backend(replace(cfg, checkpoint=str(assets.checkpoint), index=assets.index, gallery=None),
                               quiet=True)
        backend.source = f"embedded demo world · {stage.about}"
        backend.config = cfg  # the user's settings (reload, login ...), not the filled-in paths
        self._serve(backend, stage.name, final)

    # -- a gallery to index ---------------------------------------------------------------------
    def _run_gallery(self) -> None:
        from envlf import bootstrap as B

        from .backend import gallery_index_dir, resolve_checkpoint

        cfg = self.config
        self.state = "building"
        self.progress = {"message": "loading the model"}
        checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.home)
        from envlf.model.checkpoint import CheckpointError
        from envlf.model.core import load_pretrained
        from envlf.search.index import GalleryIndex, IndexLoadError

        try:
            model = load_pretrained(checkpoint, device="cpu")
        except CheckpointError as e:
            raise BackendError(str(e)) from None
        out = gallery_index_dir(cfg.home, model.fingerprint(), cfg.gallery, cfg.captions)
        status_path = out.with_name(out.name + ".status.json")
        child = None
        self._share_cores(True)
        while True:
            try:
                GalleryIndex.load(out, model)
                break
            except IndexLoadError:
                pass
            status = B.read_json(status_path) or {}
            if status.get("state") == "building" and B.pid_alive(status.get("pid")):
                self.progress = status
                self._say(self.headline(), tick=True)
            elif child is None or child.poll() is not None:
                if child is not None and status.get("state") == "failed":
                    raise BackendError(f"indexing {cfg.gallery} failed: {status.get('error')}")
                if self._builder_starts >= MAX_BUILDER_STARTS:
                    raise BackendError(f"indexing {cfg.gallery} keeps stopping (log: {out}.log)")
                self._builder_starts += 1
                self._say(f"indexing {cfg.gallery} into {out} in the background (once); the page is up meanwhile")
                self.progress = {"state": "building", "message": f"starting to index {cfg.gallery}", "fraction": 0.0}
                child = self._spawn(["demo.build_gallery", "--checkpoint", str(checkpoint), "--gallery", str(cfg.gallery),
                                     "--out", str(out), "--workers", str(self.workers),
                                     *sum((["--captions", c] for c in cfg.captions), [])],
                                    out.with_name(out.name + ".log"))
                time.sleep(POLL_S)
            time.sleep(POLL_S)
        self._share_cores(False)

        backend = load_backend(replace(cfg, index=out, gallery=None), quiet=True)
        backend.config = cfg
        self._serve(backend)
