"""Hardening (issue 8): bad inputs, concurrent users, damaged files, what the server exposes.

Every case asserts the exact one-line message a user (or the console) gets, so a handler that
starts leaking a stack trace, a server path or unescaped markup fails here. Cases already
pinned elsewhere are referenced rather than repeated:

- library level: load_image modes / bombs / truncation (test_data.py), damaged safetensors,
  pickles and foreign checkpoints (test_model.py), another model's or a damaged index
  (test_index.py), the feedback CSV under 8 processes x 500 rows = exactly 4,000 intact rows,
  threads, a writer SIGKILLed mid-row, torn lines, cp1252 / UTF-16 and foreign headers
  (test_feedback.py: test_processes_append_concurrently, test_writer_killed_mid_row,
  test_torn_last_line_is_ignored_then_repaired, test_cp1252_file_is_read_with_a_warning ...);
- app level: empty / whitespace / 10,000-character queries, a text file as upload, the 20 MB
  upload limit, markup in queries and image ids (test_app.py), `<img onerror>` in the browser
  (test_browser.py).

Here: the same inputs through the app's handlers *and* its gradio_client endpoints, the app
started on damaged files (`python app.py` as a subprocess: one `error:` line, exit code 2),
ids and file names with ``../``, the HTTP file routes, secrets in logs, concurrent
judgements through the app, and a short `envlf bench load` run.
"""

from __future__ import annotations

import contextlib
import html
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import types
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from app_support import app_env, make_app_assets, serving
from envlf.data.datasets import ImageLoadError, load_image, read_karpathy, read_precomp
from envlf.feedback.store import COLUMNS, FeedbackStore, read_feedback

REPO = Path(__file__).resolve().parents[1]
QUERY = "a red square on the left"
UPLOAD_LIMIT = "1MB"  # this module's app: small, so the size limit is cheap to hit
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # gradio's queue, pandas 3


# -- watching the file system ------------------------------------------------------------------
# An audit hook sees every open() in the process (the served app runs in this process too). It
# records paths containing a marker while `opened(...)` is active, so a test can show that a
# user-supplied id or path never reached the file system, not just that the call failed.

_WATCH: list[str] = []
_SEEN: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event in ("open", "os.listdir", "os.scandir") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            path = os.fsdecode(target)
            if any(m in path for m in _WATCH):
                _SEEN.append(path)


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened(*markers: str):
    _SEEN.clear()
    _WATCH[:] = markers
    try:
        yield _SEEN
    finally:
        _WATCH.clear()


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = make_app_assets(tmp_path_factory.mktemp("hardening"))
    # a real image just outside the gallery, where "<gallery>/../../outside.png" would land if an
    # id were ever joined to a folder
    a["outside"] = a["data"].parent / "outside.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(a["outside"])
    return a


def load_app_backend(assets: dict, **env):
    from demo.backend import load_backend
    from demo.config import load_config

    config = load_config(argv=[], env={**app_env(assets), "ENVLF_MAX_FILE_SIZE": UPLOAD_LIMIT, **env},
                         data_dir=assets["home"] / "no-such-data-dir")
    return load_backend(config)


@pytest.fixture(scope="module")
def backend(assets):
    return load_app_backend(assets)


@pytest.fixture(scope="module")
def handlers(backend):
    from demo.handlers import Handlers

    return Handlers(backend)


@pytest.fixture(scope="module")
def served(handlers):
    """The app as app.py serves it: static gallery paths, its queue and launch settings."""
    with serving(handlers) as demo:
        yield demo


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.local_url, verbose=False, download_files=False)


def new_client(served):
    from gradio_client import Client

    return Client(served.local_url, verbose=False, download_files=False)


def app_error(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        call()
    return str(e.value)


def user_error(call) -> str:
    with pytest.raises(gr.Error) as e:
        call()
    return e.value.message


# -- images ---------------------------------------------------------------------------------------

def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (IHDR patched, CRC fixed): a decompression
    bomb's header, without a single pixel allocated."""
    data = bytearray(_encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


SIZE = (64, 48)


def _noise(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).convert(mode)


def _readable() -> dict[str, tuple[str, bytes]]:
    frames = [Image.new("RGB", SIZE, c) for c in ((200, 30, 30), (30, 30, 200))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    rgba = _noise("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(SIZE))
    deep = (np.arange(SIZE[0] * SIZE[1], dtype=np.uint32).reshape(SIZE[1], SIZE[0]) * 20).astype(np.uint16)
    return {
        "16-bit PNG": ("deep.png", _encoded(Image.fromarray(deep), "PNG")),
        "CMYK JPEG": ("cmyk.jpg", _encoded(_noise("CMYK"), "JPEG")),
        "palette PNG": ("palette.png", _encoded(_noise("P"), "PNG")),
        "RGBA PNG": ("alpha.png", _encoded(rgba, "PNG")),
        "greyscale TIFF": ("grey.tif", _encoded(_noise("L"), "TIFF")),
        "animated GIF": ("anim.gif", gif.getvalue()),
    }


def _broken() -> dict[str, tuple[str, bytes, str]]:
    """name -> (file name, bytes, the message after "<file>: ", a regex)."""
    png, jpg = _encoded(_noise(), "PNG"), _encoded(_noise(), "JPEG")
    return {
        "zero bytes": ("empty.png", b"", re.escape("empty file (0 bytes), not an image")),
        "truncated PNG": ("cut.png", png[: len(png) // 2], re.escape("truncated image (image file is truncated)")),
        # Pillow adds how many bytes it could not process
        "truncated JPEG": ("cut.jpg", jpg[: len(jpg) // 2],
                           re.escape("truncated image (image file is truncated") + r"( \(\d+ bytes not processed\))?\)"),
        "decompression bomb": ("bomb.png", png_claiming(30_000, 30_000), "900.0 MP exceeds the limit of {limit} MP"),
        "text file named .png": ("notes.png", b"just some notes, not a picture\n",
                                 re.escape("not an image, or a format Pillow cannot read")),
    }


READABLE, BROKEN = _readable(), _broken()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("uploads")
    out = {}
    for case, (name, data, *_) in {**READABLE, **BROKEN}.items():
        (d / name).write_bytes(data)
        out[case] = d / name
    return out


@pytest.mark.parametrize("case", READABLE)
def test_load_image_reads_every_kind_to_rgb(image_files, case):
    im = load_image(image_files[case])
    assert im.mode == "RGB" and im.size == SIZE
    assert np.asarray(im).std() > 0 or case == "animated GIF"  # a picture, not a blank


@pytest.mark.parametrize("case", BROKEN)
def test_load_image_gives_one_line_reason(image_files, case):
    path = image_files[case]
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    expected = BROKEN[case][2].replace("{limit}", "64.0")  # DEFAULT_MAX_PIXELS
    assert re.fullmatch(re.escape(f"{path}: ") + expected, str(e.value)), str(e.value)


def test_decompression_bomb_header_is_refused_before_any_pixel(image_files, monkeypatch):
    """The bomb must be refused from its header: decoding would need 900 MB."""
    def no_decoding(self, *a, **kw):
        raise AssertionError("pixels were decoded")

    from PIL import ImageFile

    unbounded = png_claiming(30_000, 30_000)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match="900.0 MP exceeds the limit of 40.0 MP"):
        load_image(image_files["decompression bomb"], max_pixels=40_000_000)
    with pytest.raises(ImageLoadError, match=r"^<\d+ bytes>: 900.0 MP is too many pixels to decode safely$"):
        load_image(unbounded, max_pixels=None)  # Pillow's own limit still holds


@pytest.mark.parametrize("case", READABLE)
def test_handler_answers_readable_uploads(handlers, image_files, case):
    out = handlers.image_to_text({"path": str(image_files[case])}, "", 4, True, 8)  # as Gradio hands it over
    assert len(out.table) == 4 and out.table["ITC cos"].notna().all()
    ex = handlers.explain_i2t(out.state, 1, "sentence")
    assert ex.image.size == ex.overlay.size == SIZE


@pytest.mark.parametrize("case", BROKEN)
def test_handler_refuses_broken_uploads_with_a_readable_error(handlers, image_files, case):
    message = user_error(lambda: handlers.image_to_text({"path": str(image_files[case])}, "", 4, True, 8))
    expected = "Cannot use this upload: " + BROKEN[case][2].replace("{limit}", "40.0")  # MAX_UPLOAD_PIXELS
    assert re.fullmatch(expected, message), message
    assert str(image_files[case].parent) not in message and "Traceback" not in message


def test_client_image_to_text_for_every_kind(client, image_files):
    from gradio_client import handle_file

    for case in READABLE:
        table, status, _ = client.predict(handle_file(str(image_files[case])), "", 4, True, 8,
                                          api_name="/image_to_text")
        assert len(table["data"]) == 4 and "captions" in status, case
    for case in BROKEN:
        message = app_error(lambda: client.predict(handle_file(str(image_files[case])), "", 4, True, 8,
                                                   api_name="/image_to_text"))
        expected = "Cannot use this upload: " + BROKEN[case][2].replace("{limit}", "40.0")
        assert re.fullmatch(expected, message), (case, message)


def test_client_attention_map_of_any_word(client):
    """/t2i_attention takes a word's index or the word itself, not only the choices a browser
    was shown (an API session never sees them); anything else is a readable error."""
    client.predict(QUERY, 3, True, 4, api_name="/text_to_image")
    for which in ("sentence", "1", "red", "4"):
        tile, overlay, words, details = client.predict(1, which, api_name="/t2i_attention")
        assert Image.open(overlay["path"]).size == (48, 48) and words["value"] == (
            "sentence" if which == "sentence" else "1" if which == "red" else which)
    message = app_error(lambda: client.predict(1, "<b>zebra</b>", api_name="/t2i_attention"))
    assert message == ("'&lt;b&gt;zebra&lt;/b&gt;' is neither 'sentence' nor a word of the caption "
                       "(a red square on the left)")


def test_client_arguments_of_the_wrong_type_get_one_clear_line(client):
    """A hostile client, through the public API: every endpoint checks its own arguments
    (demo.validate) and answers with one line, never a Gradio preprocessing exception."""
    t2i = lambda *a: client.predict(*a, api_name="/text_to_image")  # noqa: E731
    assert app_error(lambda: t2i(QUERY, "twelve", True, 4)) == "k must be a number, not 'twelve'."
    assert app_error(lambda: t2i(QUERY, 3, "maybe", 4)) == "Re-rank must be true or false, not 'maybe'."
    assert app_error(lambda: t2i(QUERY, 2.5, True, 4)) == "k must be a whole number, not '2.5'."
    assert app_error(lambda: t2i(QUERY, 3, True, "NaN")) == "re-rank k must be a finite number, not 'NaN'."
    assert app_error(lambda: t2i(["a", "list"], 3, True, 4)) == "Query must be text, not list."
    # "false" means false: no re-ranking, so no ITM column values
    _, table, status, _, _, _ = t2i(QUERY, "3", "false", "4")
    assert len(table["data"]) == 3 and all(r[4] is None for r in table["data"]) and "(0 candidates)" in status
    _, table, _, _, _, _ = t2i(QUERY, 3, "true", 4)
    assert app_error(lambda: t2i(QUERY, 3, True, 4, "1, 2, 3")).startswith("Bounding box: four numbers west, south")
    assert app_error(lambda: t2i(QUERY, 3, True, 4, "10, 50, 5, 55")).startswith("Bounding box: needs -180")
    assert app_error(lambda: t2i(QUERY, 3, True, 4, "5, 50, 10, 55")).startswith(
        "This gallery has no georeferenced chips")
    assert all(r[4] is not None for r in table["data"])
    # ranks and word indices: the wrong type and out of range
    attention = lambda *a: client.predict(*a, api_name="/t2i_attention")  # noqa: E731
    assert app_error(lambda: attention("first", "sentence")) == "Result rank must be a number, not 'first'."
    assert app_error(lambda: attention(99, "sentence")) == "There is no result #99: the last search returned 3."
    assert app_error(lambda: attention(1, "17")).startswith("There is no word #17 in ")
    assert client.predict("1", "2", api_name="/t2i_relevant").startswith("Saved: result #1")  # a numeric string
    assert app_error(lambda: client.predict(1, "lots", api_name="/t2i_relevant")) == \
        "Grade must be 0-3 or none, not 'lots'."
    assert app_error(lambda: client.predict(1, "7", api_name="/t2i_relevant")) == "Grade must be 0-3 or none, not '7'."
    assert app_error(lambda: client.predict(2.5, None, api_name="/more_like_this")) == \
        "Result rank must be a whole number, not '2.5'."


def test_client_pixel_limit(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.new("1", (7000, 6000)).save(big)  # 42 MP of nothing: a few kB on disk
    message = app_error(lambda: client.predict(handle_file(str(big)), "", 4, True, 8, api_name="/image_to_text"))
    assert message == "Cannot use this upload: 7000x6000 = 42.0 MP exceeds the limit of 40.0 MP"


# -- text -----------------------------------------------------------------------------------------

TEXTS = {  # query -> what the search runs on (clean_query)
    "emoji": ("🛩️ three planes ✈️ beside the 🏢 terminal", "🛩️ three planes ✈️ beside the 🏢 terminal"),
    "Arabic": ("ثلاث طائرات بيضاء بجانب المبنى", "ثلاث طائرات بيضاء بجانب المبنى"),
    "Hebrew": ("מטוסים לבנים ליד הטרמינל", "מטוסים לבנים ליד הטרמינל"),
    "control characters": ("a red\x00 square\x07 on\x1b the \u202eleft\r\n", "a red square on the left"),
    "script tag": ("<script>alert(1)</script>", "<script>alert(1)</script>"),
    "img onerror": ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),
}
BAD_TEXTS = {
    "empty": ("", "Type a description to search for (the query is empty)."),
    "whitespace only": (" \t\n \u3000 ", "Type a description to search for (the query is empty)."),
    "10,000 characters": ("x" * 10_000, "The query is 10,000 characters long; the limit is 1,000."),
    "control characters only": ("\x00\x01\x1b\u200b\u202e", "The query has no printable characters."),
}


def _no_markup(out, cleaned: str) -> None:
    """What goes to HTML-rendering components carries no user markup: the status (Markdown)
    has no user text at all, Plotly labels are escaped, gallery captions hold no '<'."""
    assert cleaned not in out.status and "<" not in out.status
    assert all("<" not in cap for _, cap in out.gallery)
    (star,) = [t for t in out.map_plot.data if t.name == "query"]
    assert star.hovertext[0] == html.escape(f"query: {cleaned}", quote=False)


@pytest.mark.parametrize("case", TEXTS)
def test_handler_searches_any_script_and_keeps_markup_as_text(handlers, case):
    query, cleaned = TEXTS[case]
    out = handlers.text_to_image(query, 5, True, 8)
    assert len(out.gallery) == 5 and out.state["query_text"] == cleaned
    _no_markup(out, cleaned)
    ex = handlers.explain_t2i(out.state, 1, "sentence")
    assert ex.overlay.size == ex.image.size
    if "<" in cleaned:  # the words of the query come back as plain strings for the Radio's labels
        words = [re.sub(r"^\d+: ", "", label) for label, _ in ex.words.choices[1:]]  # "3: alert"
        assert words and all(w in cleaned for w in words)  # the words as typed (punctuation has no chip)


def test_markup_in_plot_labels_is_escaped():
    from demo import plots

    fig = plots.embedding_figure(np.zeros((2, 2)), ["<b>x</b>", "y"], ["<i>1</i>", "2"], [0.5, 0.2], 2,
                                 np.zeros(2), "query: <a href='https://example.com'>click</a>",
                                 [(1, 0.0, 0.0, "<i>1</i>")])
    labels = [t.name for t in fig.data] + [h for t in fig.data for h in (t.hovertext or [])]
    assert labels and not any("<a" in s or "<b>" in s or "<i>" in s for s in labels)
    assert "query: &lt;a href='https://example.com'&gt;click&lt;/a&gt;" in labels


@pytest.mark.parametrize("case", BAD_TEXTS)
def test_handler_refuses_bad_queries_with_the_reason(handlers, case):
    query, expected = BAD_TEXTS[case]
    assert user_error(lambda: handlers.text_to_image(query, 5, True, 8)) == expected
    assert user_error(lambda: handlers.attention(query, "0")) == expected


def test_client_text_queries(client):
    for case, (query, cleaned) in TEXTS.items():
        gallery, table, status, scores, emap, _geo = client.predict(query, 4, True, 8, api_name="/text_to_image")
        assert len(gallery) == 4 and cleaned not in status and "<" not in status, case
        for trace in json.loads(emap["plot"])["data"]:
            assert not any("<script" in h or "<img" in h for h in trace.get("hovertext") or []), case
        tile, overlay = client.predict(query, "0", "sentence", api_name="/attention")
        assert Image.open(tile["path"]).size == Image.open(overlay["path"]).size
    for case, (query, expected) in BAD_TEXTS.items():
        assert app_error(lambda: client.predict(query, 4, True, 8, api_name="/text_to_image")) == expected, case


# -- ids and file names with ../ ------------------------------------------------------------------

TRAVERSALS = ["../../outside", "../../outside.png", "../outside.png", "/etc/passwd", "..\\..\\outside.png",
              "0/../../../outside.png"]


@pytest.mark.parametrize("image_id", TRAVERSALS)
def test_image_ids_are_looked_up_never_joined_to_paths(handlers, assets, image_id):
    expected = f"There is no image {image_id!r} in this gallery."
    with opened("outside", "passwd") as seen:
        assert user_error(lambda: handlers.image_to_text(None, image_id, 4, True, 8)) == html.escape(expected,
                                                                                                    quote=False)
        assert user_error(lambda: handlers.attention(QUERY, image_id)) == html.escape(expected, quote=False)
    assert seen == [], f"a user-supplied id reached the file system: {seen}"


def test_client_ids_and_file_data_outside_the_gallery_are_refused(client, assets):
    with opened("outside", "passwd") as seen:
        for image_id in TRAVERSALS[:2]:
            message = app_error(lambda: client.predict(None, image_id, 4, True, 8, api_name="/image_to_text"))
            assert message == f"There is no image {image_id!r} in this gallery."
            message = app_error(lambda: client.predict(QUERY, image_id, "sentence", api_name="/attention"))
            assert message == f"There is no image {image_id!r} in this gallery."
    assert seen == []


def _sse_call(url: str, api: str, data: list) -> tuple[str, str]:
    """A raw API call (what a hand-written client sends): (event, data) of its outcome."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    r = httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=60)
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", r.text, flags=re.M)
    return events[-1]


def test_raw_file_paths_in_api_calls_never_reach_the_handler(served, assets):
    """A FileData naming a server path the user never uploaded is refused by Gradio before the
    handler runs, and the file is never opened."""
    with opened("outside", "passwd") as seen:
        for path in (assets["outside"], Path("/etc/passwd")):
            event, data = _sse_call(served.local_url, "image_to_text",
                                    [{"path": str(path), "meta": {"_type": "gradio.FileData"}}, "", 4, True, 8])
            assert event == "error"
            assert json.loads(data)["error"] == (f"Cannot move {path} to the gradio cache dir because it was not "
                                                 "uploaded by a user.")
    assert seen == []


def test_upload_file_names_cannot_climb_out_of_the_upload_folder(served, tmp_path):
    import httpx

    target = tmp_path / "escaped.png"
    name = "../" * 12 + str(target).lstrip("/")
    r = httpx.post(f"{served.local_url}gradio_api/upload", files={"files": (name, b"\x89PNG not really")})
    assert r.status_code == 200
    (stored,) = r.json()
    assert Path(stored).name == "escaped.png" and ".." not in stored and not target.exists()


@pytest.mark.parametrize("layout, names, message", [
    ("karpathy", ["../outside.png"], "images[0]: image file name '../outside.png' points outside the dataset folder"),
    ("karpathy", ["a/../../outside.png"], "images[0]: image file name 'a/../../outside.png' points outside"),
    ("karpathy", ["/etc/passwd"], "images[0]: image file name '/etc/passwd' is an absolute path; names are "
                                  "relative to the dataset folder"),
    ("precomp", ["ok.png", "../../outside.png"], "train_filename.txt:2: image file name '../../outside.png' "
                                                 "points outside the dataset folder"),
])
def test_dataset_file_names_stay_inside_the_dataset(tmp_path, layout, names, message):
    root = tmp_path / "ds"
    root.mkdir()
    if layout == "karpathy":
        (root / "dataset.json").write_text(json.dumps(
            {"images": [{"filename": n, "split": "train", "sentences": [{"raw": "a plane"}]} for n in names]}))
        reader = read_karpathy
    else:
        (root / "train_filename.txt").write_text("\n".join(names) + "\n")
        (root / "train_caps.txt").write_text("\n".join("a plane" for _ in names) + "\n")
        reader = read_precomp
    with opened("outside", "passwd") as seen, pytest.raises(ValueError) as e:
        reader(root)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert seen == []
    # ".." that stays inside is fine
    if layout == "karpathy":
        (root / "dataset.json").write_text(json.dumps({"images": [{"filename": "sub/../a.png"}]}))
        assert read_karpathy(root).records[0].path == (root / "a.png").resolve()


def test_app_refuses_a_gallery_whose_file_names_climb_out(assets, tmp_path):
    from demo.backend import BackendError

    root = tmp_path / "gallery"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"images": [{"filename": "../../outside.png", "sentences": []}]}))
    with pytest.raises(BackendError) as e:
        load_app_backend(assets, ENVLF_INDEX="", ENVLF_GALLERY=str(root), ENVLF_HOME=str(tmp_path / "home"))
    assert str(e.value) == (f"gallery: {root / 'dataset.json'}: images[0]: image file name '../../outside.png' "
                            "points outside the dataset folder")


# -- what the web server serves -------------------------------------------------------------------

def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET the path exactly as written (no client-side normalisation of '..')."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", raw_path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_only_gallery_and_assets_are_served(served, assets, backend):
    from demo.layout import ASSETS

    images = assets["data"] / "images"
    tile = sorted(images.glob("*.png"))[0]
    status, body = _get(served.local_url, f"/gradio_api/file={tile}")
    assert status == 200 and body == tile.read_bytes()
    assert _get(served.local_url, f"/gradio_api/file={ASSETS / 'style.css'}")[0] == 200
    private = ["/etc/passwd", assets["feedback"], assets["outside"], assets["checkpoint"] / "model.safetensors",
               assets["index"] / "manifest.json", REPO / "app.py", assets["data"] / "dataset.json"]
    backend.store.append(_row())  # the feedback file exists
    port = served.local_url.rstrip("/").rsplit(":", 1)[1]
    paths = [f"/gradio_api/file={p}" for p in private] + [
        "/file=/etc/passwd",  # Gradio 3/4's route
        "/gradio_api/file/etc/passwd",  # the deprecated "/file/<path>" form
        f"/gradio_api/file={images}/../../outside.png",
        f"/gradio_api/file={images}/%2e%2e/%2e%2e/outside.png",
        f"/gradio_api/file={images}/../dataset.json",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=file:///etc/passwd",
        f"/gradio_api/file=http://127.0.0.1:{port}/config",  # no server-side fetch of local URLs
        "/static/../../etc/passwd", "/assets/../../etc/passwd",
    ]
    for path in paths:
        status, body = _get(served.local_url, path)
        assert status in (403, 404), (path, status, body[:80])
        assert b"root:" not in body and b"time_utc" not in body and b"\x89PNG" not in body, path


def _row(**kw) -> dict:
    row = dict(annotator="alice", direction="t2i", query_text=QUERY, item_id="0", item_text="0.png", rank=1,
               itc_score=0.3, itm_score=0.6, label="relevant", model_fingerprint="m", index_fingerprint="i",
               app_version="test")
    row.update(kw)
    return row


def test_feedback_checkpoint_and_index_are_blocked_even_inside_a_served_folder(backend, tmp_path):
    from gradio.utils import is_allowed_file

    from demo.layout import launch_kwargs

    blocked = launch_kwargs(backend)["blocked_paths"]
    home = backend.config.home
    assert set(blocked) == {str(Path(p).resolve()) for p in (
        backend.config.feedback, backend.checkpoint, backend.index_dir, home / "models", home / "indexes",
        home / "cache", home / "build-status.json", home / "default.json", home / "build.log")}
    # a feedback file kept inside the gallery folder: the folder is served, the file is not
    folder = backend.image_dirs[0]
    assert is_allowed_file(folder / "0.png", blocked, [str(folder)], [])[0]
    assert not is_allowed_file(folder / "feedback.csv", [str(folder / "feedback.csv")], [str(folder)], [])[0]


def test_many_image_folders_never_widen_to_the_root_or_the_app_home(tmp_path):
    from demo.backend import MAX_ALLOWED_DIRS, image_dirs_of

    def index_of(paths):
        return types.SimpleNamespace(metadata=pd.DataFrame({"path": [str(p) for p in paths]}))

    n = MAX_ALLOWED_DIRS + 6
    base = tmp_path / "gallery"
    assert image_dirs_of(index_of([base / f"c{i}" / "a.png" for i in range(n)])) == [base.resolve()]
    home = tmp_path / "home"  # the app's home (feedback, models, indexes) under the common parent
    spread = [tmp_path / f"c{i}" / "a.png" for i in range(n)]
    dirs = image_dirs_of(index_of(spread), private=(home / "feedback.csv",))
    assert len(dirs) == n and tmp_path.resolve() not in dirs
    everywhere = [Path("/") / f"envlf-nowhere-{i}" / "a.png" for i in range(n)]
    assert Path("/") not in image_dirs_of(index_of(everywhere))


def test_uploads_over_the_size_limit_are_refused(served):
    import httpx

    assert served.max_file_size == gr.FileSize.MB  # ENVLF_MAX_FILE_SIZE=1MB reached the launch
    r = httpx.post(f"{served.local_url}gradio_api/upload",
                   files={"files": ("big.png", b"\0" * (gr.FileSize.MB + 1))}, timeout=60)
    assert r.status_code == 413 and r.text == f"File size exceeded maximum allowed size of {gr.FileSize.MB} bytes."


# -- damaged files when the app starts ------------------------------------------------------------

def _killed_writer(path: str, partial: bytes) -> None:
    from envlf.feedback import store as feedback

    with feedback._locked_fd(Path(path)) as fd:  # as FeedbackStore.append holds it
        os.write(fd, partial)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_app_starts_on_a_feedback_file_torn_by_a_killed_writer(assets, tmp_path, capsys):
    import multiprocessing as mp

    from demo.handlers import Handlers
    from envlf.feedback.store import encode_rows, FeedbackRow

    path = tmp_path / "fb" / "feedback.csv"
    FeedbackStore(path).append([_row(item_id="before")])
    partial = encode_rows([FeedbackRow(**_row(item_id="dying", item_text="z" * 900))])[:600]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    proc = ctx.Process(target=_killed_writer, args=(str(path), partial))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL

    b = load_app_backend(assets, ENVLF_FEEDBACK=str(path))
    (copy,) = path.parent.glob("feedback.csv.torn-*")
    assert copy.read_bytes() == partial
    assert (f"[envlf] warning: feedback file {path}: removed a torn last line (600 bytes, saved to {copy})"
            in capsys.readouterr().err)
    h = Handlers(b)
    out = h.text_to_image(QUERY, 3, True, 4)
    h.record_feedback(out.state, 2, "relevant", "2", "anon-t")
    df, report = read_feedback(path)
    assert report.clean, str(report)
    assert df["item_id"].tolist() == ["before", out.state["items"][1]["image_id"]]


def test_app_appends_to_a_cp1252_feedback_file(assets, tmp_path):
    import csv

    from demo.handlers import Handlers

    from envlf.feedback.store import FeedbackRow, _encode_fields

    path = tmp_path / "excel.csv"
    with open(path, "w", encoding="cp1252", newline="") as f:  # saved again by a spreadsheet
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(COLUMNS)
        w.writerow(_encode_fields(FeedbackRow(**_row(query_text="caf\u00e9 \u2013 parking"))))
    h = Handlers(load_app_backend(assets, ENVLF_FEEDBACK=str(path)))
    out = h.text_to_image(QUERY, 3, True, 4)
    h.record_feedback(out.state, 1, "not_relevant", None, "anon-c")
    df, report = read_feedback(path)
    assert df["query_text"].tolist() == ["caf\u00e9 \u2013 parking", QUERY]
    assert report.warnings == [f"{path}: 1 line(s) are not UTF-8, decoded as cp1252 (lines 2); check their "
                               "non-ASCII text"]


@pytest.mark.parametrize("content, message", [
    (b"image,caption\na.png,a plane\n",
     "{path}: not an EnVLF feedback file (header 'image,caption'); refusing to modify it; give another "
     "--feedback (ENVLF_FEEDBACK)"),
    ("\n".join([",".join(COLUMNS), ""]).encode("utf-16"),
     "{path}: UTF-16 text (a spreadsheet's 'Unicode text' export?); refusing to append UTF-8 rows to it: convert "
     "it to UTF-8 first (iconv -f UTF-16 -t UTF-8); give another --feedback (ENVLF_FEEDBACK)"),
    (None, "feedback file {path} is not a file"),
], ids=["other columns", "UTF-16", "a directory"])
def test_app_refuses_a_feedback_file_it_cannot_append_to_and_leaves_it_alone(assets, tmp_path, content, message):
    from demo.backend import BackendError

    path = tmp_path / "feedback.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(BackendError) as e:
        load_app_backend(assets, ENVLF_FEEDBACK=str(path))
    assert str(e.value) == message.format(path=path)
    assert content is None or path.read_bytes() == content
    assert not list(tmp_path.glob("*.torn-*"))


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """A hub that refuses every request with 401 and remembers the Authorization it was sent."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization", ""))
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def app_runs(assets, tmp_path_factory):
    """`python app.py` on damaged inputs, all started at once (each imports torch, transformers
    and faiss: about 3 s of CPU), then collected: name -> (return code, stdout, stderr, the bad
    path). More damaged inputs are given to the same loading code in-process below."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("app-runs")
    work = root / "cwd"
    work.mkdir()

    def ckpt_copy(name: str) -> Path:
        d = root / name
        shutil.copytree(assets["checkpoint"], d)
        return d

    truncated = ckpt_copy("truncated")
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    foreign = ckpt_copy("foreign")
    save_file({"some.other.weight": torch.zeros(3)}, str(foreign / "model.safetensors"))
    pickled = ckpt_copy("pickled")  # a torch.save pickle where the safetensors file should be
    torch.save({"x": Boom()}, pickled / "model.safetensors")

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVLF_", "HF_", "GRADIO_"))}
    base_env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HOME=str(root / "hf"), ENVLF_HOME=str(root / "home"),
                    ENVLF_FEEDBACK=str(root / "feedback.csv"), ENVLF_DEVICE="cpu", HF_HUB_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    index = ["--index", str(assets["index"])]
    runs = {  # name -> (arguments, environment, the bad path)
        "truncated": (["--checkpoint", str(truncated)] + index, {}, truncated),
        "foreign": (["--checkpoint", str(foreign)] + index, {}, foreign),
        "pickled": (["--checkpoint", str(pickled)] + index, {}, pickled),
        "token-offline": (["--checkpoint", "someone/envlf-missing"], {"HF_TOKEN": "hf_secret123"}, None),
        "token-hub": (["--checkpoint", "someone/envlf-missing"],
                      {"HF_TOKEN": "hf_secret123", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                       "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}, None),
    }
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "app.py"), *args], cwd=work,
                                    env={**base_env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, (args, env, _) in runs.items()}
    results = {}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=180)
            results[name] = (p.returncode, out, err, runs[name][2])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        hub.shutdown()
    results["_work"] = work
    results["_hub_seen"] = list(_FakeHub.seen)
    return results


def _one_error_line(run) -> str:
    rc, out, err, _ = run
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in out + err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    return errors[0]


CHECKPOINT_ERRORS = {
    "truncated": "error: {path}/model.safetensors is not a readable safetensors file (truncated or damaged?): "
                 "Error while deserializing header: ",
    "foreign": "error: {path}/model.safetensors does not match the model its config describes: ",
    "pickled": "error: {path}/model.safetensors is a pickle / torch.save file, not safetensors; refusing to "
               "unpickle it",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CHECKPOINT_ERRORS)
def test_app_refuses_damaged_files_with_one_error_line_and_exit_code_2(app_runs, case):
    line = _one_error_line(app_runs[case])
    assert line.startswith(CHECKPOINT_ERRORS[case].format(path=app_runs[case][3])), line
    if case == "foreign":
        assert "missing tensor(s)" in line and "1 unexpected tensor(s), e.g. ['some.other.weight']" in line
    assert not (app_runs["_work"] / "PWNED").exists()  # nothing was ever unpickled


@pytest.mark.slow
def test_hub_token_never_reaches_the_logs(app_runs):
    offline = _one_error_line(app_runs["token-offline"])
    assert offline.startswith("error: cannot fetch checkpoint someone/envlf-missing from the Hugging Face hub "
                              "(HF_HUB_OFFLINE=1: it must already be in the local cache): ")
    hub = _one_error_line(app_runs["token-hub"])
    assert hub.startswith("error: cannot fetch checkpoint someone/envlf-missing from the Hugging Face hub: ")
    assert "Bearer hf_secret123" in app_runs["_hub_seen"]  # the token was in play ...
    for name in ("token-offline", "token-hub"):
        _, out, err, _ = app_runs[name]
        assert "hf_secret123" not in out + err and "secret123" not in out + err  # ... and never printed


def test_app_refuses_an_index_built_by_another_model(assets, tmp_path):
    from demo.backend import BackendError
    from envlf.data.datasets import load_dataset
    from envlf.search.index import GalleryIndex
    from envlf.model.core import create_model

    torch.manual_seed(1)
    other = create_model("tiny").eval()
    index = tmp_path / "other-index"
    GalleryIndex.build(other, load_dataset(assets["data"]).split("train"), index, workers=0, progress=False)
    with pytest.raises(BackendError) as e:
        load_app_backend(assets, ENVLF_INDEX=str(index))
    assert re.fullmatch(re.escape(f"index {index} was built with model {other.fingerprint()}, but the loaded model "
                                  "is ") + r"\w{16}" + re.escape(f": rebuild it (envlf index build "
                                                                 f"--checkpoint ... --out {index})"), str(e.value))


def test_app_refuses_a_checkpoint_of_pickles_without_unpickling(assets, tmp_path, monkeypatch):
    from demo.backend import BackendError

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "pickle-only"
    shutil.copytree(assets["checkpoint"], ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": Boom()}, ckpt / "pytorch_model.bin")
    with pytest.raises(BackendError) as e:
        load_app_backend(assets, ENVLF_CHECKPOINT=str(ckpt))
    assert str(e.value) == (f"{ckpt}: found only pytorch_model.bin (a pickle); EnVLF loads safetensors checkpoints "
                            "only and never unpickles a file")
    assert not (tmp_path / "PWNED").exists()


# -- concurrent users -----------------------------------------------------------------------------

def _rows_of(path: Path) -> pd.DataFrame:
    df, report = read_feedback(path)
    assert report.clean, str(report)
    return df


def test_threads_judging_through_the_handlers_lose_nothing(handlers, backend):
    n_threads, per_thread = 8, 12
    states = [handlers.text_to_image(f"{QUERY} thread {t}", per_thread, False, 0).state for t in range(n_threads)]
    before = len(_rows_of(backend.store.path)) if backend.store.path.exists() else 0
    barrier, errors = threading.Barrier(n_threads), []

    def judge(t: int) -> None:
        try:
            barrier.wait()
            for rank in range(1, per_thread + 1):
                handlers.record_feedback(states[t], rank, "relevant" if rank % 2 else "not_relevant", None,
                                         f"anon-thread{t}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=judge, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    df = _rows_of(backend.store.path).iloc[before:]
    assert len(df) == n_threads * per_thread
    got = sorted(zip(df["annotator"], df["rank"]))
    assert got == sorted((f"anon-thread{t}", r) for t in range(n_threads) for r in range(1, per_thread + 1))


def test_clients_judging_at_once_through_the_api_lose_nothing(served, backend):
    n_clients, per_client = 6, 6
    clients = [new_client(served) for _ in range(n_clients)]
    before = len(_rows_of(backend.store.path)) if backend.store.path.exists() else 0
    barrier, errors = threading.Barrier(n_clients), []

    def user(c: int) -> None:
        try:
            clients[c].predict(f"{QUERY} client {c}", per_client, True, 8, api_name="/text_to_image")
            barrier.wait()
            for rank in range(1, per_client + 1):
                api = "/t2i_relevant" if rank % 2 else "/t2i_not_relevant"
                assert clients[c].predict(rank, "none", api_name=api).startswith(f"Saved: result #{rank} ")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors[:3]
    df = _rows_of(backend.store.path).iloc[before:]
    assert len(df) == n_clients * per_client and df["row_id"].is_unique
    got = sorted(zip(df["query_text"], df["rank"], df["label"]))
    assert got == sorted((f"{QUERY} client {c}", r, "relevant" if r % 2 else "not_relevant")
                         for c in range(n_clients) for r in range(1, per_client + 1))
    per_query = df.groupby("query_text")["annotator"].nunique()
    assert (per_query == 1).all() and df["annotator"].nunique() == n_clients  # one annotator per session


@pytest.mark.slow
def test_load_script_in_process(assets, tmp_path, capsys, monkeypatch):
    """`envlf bench load` with the app started in-process: 5 users x 8 requests, every
    kind of request, no errors (the 60 s run with 20 users is the benchmark, not a test). A fixed
    number of requests, not a time window: a slow machine makes the same requests, later."""
    from benchmarks.bench import main as bench_main

    monkeypatch.setenv("ENVLF_HOME", str(tmp_path / "home"))
    out = tmp_path / "load.json"
    feedback = tmp_path / "load-feedback.csv"
    rc = bench_main(["load", "--users", "5", "--requests", "8", "--checkpoint", str(assets["checkpoint"]),
                     "--index", str(assets["index"]), "--feedback", str(feedback), "--mix", "40,20,20,20",
                     "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["errors"] == 0, result["error_messages"]
    rows = {r["endpoint"]: r for r in result["rows"]}
    assert len(rows) >= 3 and rows["all"]["requests"] == sum(r["requests"] for k, r in rows.items() if k != "all")
    assert rows["all"]["requests"] == 5 * 8 and rows["all"]["p95_ms"] >= rows["all"]["p50_ms"] > 0
    assert len(rows) == 5  # the four kinds of request, each made at least once per user, and "all"
    table = capsys.readouterr().out
    assert "| endpoint | users | seconds | requests | errors | req/s | p50 ms | p95 ms | p99 ms |" in table
    judged = [r for k, r in rows.items() if "judgement" in k][0]["requests"]
    assert len(_rows_of(feedback)) == judged  # every judgement made it, once


# -- in the browser (optional: needs /usr/bin/chromium and playwright) ----------------------------

@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_markup_in_a_judged_query_stays_text_on_every_tab(served, backend):
    """A query full of markup is searched, judged, and shown back in the Feedback tab's tables
    (where other annotators see it): as text, with no script run and no element created."""
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    query = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> planes'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(served.local_url)
            page.fill("#t2i-query textarea", query)
            page.click("#t2i-search")
            page.wait_for_selector("#t2i-gallery button.thumbnail-item img")
            page.click("#t2i-gallery button.thumbnail-item >> nth=0")
            page.wait_for_selector("#t2i-overlay img")
            page.click("#t2i-relevant")
            page.wait_for_function("document.querySelector('#t2i-saved textarea').value.startsWith('Saved')")
            page.click("button[role=tab]:has-text('Feedback')")
            page.click("#fb-refresh")
            page.wait_for_function("document.querySelector('#fb-per-query').innerText.includes('onerror')")
            assert 'window.__xss=2</script> planes' in page.inner_text("#fb-per-query")
            assert page.evaluate("window.__xss") is None
            assert page.locator("img[src=x], #fb-per-query img, #fb-per-query script, #t2i-words img").count() == 0
        finally:
            browser.close()
