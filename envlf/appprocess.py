"""`python app.py` as a user runs it, in a subprocess: its console in a file, its page polled
over HTTP and its search asked through gradio_client.

Used by the first-start benchmark (``envlf bench first-start``) and by the tests
that run the README's command (tests/test_first_start.py), so both drive the same process
the same way. Nothing here measures against a target: the limits are for a stuck process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_WORDS = "getting ready"  # what the app answers while the embedded default is built
_TOTAL = re.compile(r"total ([\d.]+) ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py` with ENVLF_HOME=home; extra environment in **env (e.g. ENVLF_DEMO_SIZE)."""

    def __init__(self, home: Path, log: Path, **env: str):
        self.port = free_port()
        self.log = Path(log)
        self.url = f"http://127.0.0.1:{self.port}/"
        full_env = {**os.environ, "ENVLF_HOME": str(home), "GRADIO_SERVER_PORT": str(self.port),
                    "GRADIO_ANALYTICS_ENABLED": "False", **env}
        for key in ("ENVLF_CHECKPOINT", "ENVLF_INDEX"):  # the embedded default, as on a fresh machine
            full_env.pop(key, None)
        self.fh = open(self.log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=self.fh,
                                     stderr=subprocess.STDOUT)
        self._client = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"app exited ({self.proc.returncode}):\n{self.console()[-3000:]}")

    def wait_page(self, limit_s: float = 300) -> float:
        """Seconds from the start until the page answers HTTP 200."""
        t_end = time.monotonic() + limit_s
        while time.monotonic() < t_end:
            self._alive()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return self.elapsed()
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"no page within {limit_s:.0f} s:\n{self.console()[-3000:]}")

    def client(self):
        from gradio_client import Client

        if self._client is None:
            self._client = Client(self.url, verbose=False)
        return self._client

    def search(self, query: str = "a large building", k: int = 5) -> tuple[tuple, float, float | None]:
        """One text query: (outputs, round trip s, the server's own total in ms from the status
        line). Raises gradio_client's AppError as the app answers (e.g. still getting ready)."""
        t0 = time.perf_counter()
        out = self.client().predict(query, k, True, 8, api_name="/text_to_image")
        rtt = time.perf_counter() - t0
        m = _TOTAL.search(out[2] or "")
        return out, rtt, float(m.group(1)) if m else None

    def search_when_ready(self, query: str = "a large building", final: bool = False,
                          limit_s: float = 1500, poll_s: float = 1.0) -> tuple:
        """Ask until the app answers instead of "getting ready" (final: also until the console
        says the last stage is served); returns the outputs of the first answered query."""
        t_end = time.monotonic() + limit_s
        last = ""
        while time.monotonic() < t_end:
            self._alive()
            try:
                out, _, _ = self.search(query)
                if not final or "now serving full" in self.console():
                    return out
            except Exception as e:  # noqa: BLE001 - gradio_client's AppError
                last = str(e)
                if READY_WORDS not in last:
                    raise RuntimeError(f"unexpected error: {last}\n{self.console()[-3000:]}") from None
            time.sleep(poll_s)
        raise TimeoutError(f"no search within {limit_s:.0f} s (last: {last}):\n{self.console()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.fh.close()
