"""The app in headless Chromium (Python playwright): search, select a result, see its attention
map, judge it, and find the row in the feedback CSV; image -> text; the feedback tab.
Screenshots of each tab go to $ENVLF_SCREENSHOTS (default: a temporary folder)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from app_support import free_port, make_app_assets, make_backend, serving
from envlf.feedback.store import read_feedback

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the module is skipped below
    PlaywrightTimeout = TimeoutError

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT = 30_000  # ms

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # gradio's queue on pandas 3
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("playwright")
    from demo.handlers import Handlers

    assets = make_app_assets(tmp_path_factory.mktemp("browser"))
    with serving(Handlers(make_backend(assets))) as demo:
        yield demo, assets


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    demo, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        outside = []  # nothing may reach the internet
        pg.on("request", lambda r: outside.append(r.url)
              if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        pg.set_default_timeout(TIMEOUT)
        pg.goto(demo.local_url)
        pg.wait_for_selector("#t2i-query textarea")
        yield pg
        browser.close()
        assert outside == [], f"the page requested outside URLs: {outside[:5]}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("ENVLF_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def close_toasts(page) -> None:
    for _ in range(5):  # grouped toasts reveal the next one when the first closes
        if not page.evaluate("[...document.querySelectorAll('[data-testid=toast-close]')]"
                             ".map(b => b.click()).length"):
            return
        page.wait_for_timeout(300)


def csv_rows(path: Path) -> int:
    return len(read_feedback(path)[0]) if path.exists() else 0


def test_search_select_explain_and_judge(page, served, shots):
    _, assets = served
    before = csv_rows(assets["feedback"])
    page.fill("#t2i-query textarea", "a red square on the left")
    page.click("#t2i-search")
    page.wait_for_selector("#t2i-gallery button.thumbnail-item img")
    assert page.locator("#t2i-gallery button.thumbnail-item").count() == 12
    assert "ms" in page.inner_text("#t2i-status")
    page.click("#t2i-gallery button.thumbnail-item >> nth=1")
    page.wait_for_selector("#t2i-overlay img")
    page.wait_for_function("document.querySelector('#t2i-rank input').value === '2'")
    assert "red" in page.inner_text("#t2i-words")
    page.click("#t2i-words label:has-text('red')")  # one word's map
    page.wait_for_timeout(500)
    page.click("#t2i-relevant")
    page.wait_for_function("document.querySelector('#t2i-saved textarea').value.startsWith('Saved')")
    close_toasts(page)
    page.screenshot(path=str(shots / "1-text-to-image.png"), full_page=True)
    df = read_feedback(assets["feedback"])[0]
    assert len(df) == before + 1
    row = df.iloc[-1]
    assert (row["direction"], row["query_text"], row["rank"], row["label"]) == (
        "t2i", "a red square on the left", 2, "relevant")


def test_errors_show_as_messages_and_user_text_as_text(page, shots):
    page.fill("#t2i-query textarea", "")
    page.click("#t2i-search")
    toast = page.wait_for_selector("[data-testid=toast-body]:has-text('query is empty')")
    assert toast.is_visible()
    page.wait_for_timeout(600)  # let the toast finish sliding in
    page.screenshot(path=str(shots / "2-error.png"))
    close_toasts(page)
    page.fill("#t2i-query textarea", '<img src=x onerror="window.__xss=1"> <b>bold</b> square')
    page.click("#t2i-search")
    for _ in range(20):  # a click that lands before the new results arrive explains an old result
        page.click("#t2i-gallery button.thumbnail-item >> nth=0")
        try:
            page.wait_for_selector("#t2i-words label:has-text('onerror')", timeout=30_000)  # words, as text
            break
        except PlaywrightTimeout:
            continue
    page.wait_for_selector("#t2i-overlay img")
    assert page.evaluate("window.__xss") is None
    assert page.locator("#t2i-words b, #t2i-words img, #t2i-details img").count() == 0


def test_image_to_text_tab(page, shots):
    page.click("button[role=tab]:has-text('Image → text')")
    page.fill("#i2t-image-id input", "<b>bold</b>")
    page.click("#i2t-search")
    toast = page.wait_for_selector("[data-testid=toast-text]:has-text('no image')")
    assert "<b>bold</b>" in toast.inner_text()  # shown as text, not as markup
    assert page.locator("[data-testid=toast-text] b").count() == 0
    close_toasts(page)
    page.click("#i2t-tiles button.thumbnail-item >> nth=2")
    page.wait_for_selector("#i2t-table [data-testid=cell-0-1]")
    assert page.input_value("#i2t-image-id input") != ""
    page.click("#i2t-table [data-testid=cell-0-1]")
    page.wait_for_selector("#i2t-overlay img")
    page.wait_for_function("document.querySelector('#i2t-rank input').value === '1'")
    page.screenshot(path=str(shots / "3-image-to-text.png"), full_page=True)


def test_uploads(page, served, tmp_path):
    _, assets = served
    page.click("button[role=tab]:has-text('Image → text')")
    page.set_input_files("#i2t-image input[type=file]", str(assets["data"] / "images" / "7.png"))
    page.wait_for_function("document.querySelector('#i2t-image-id input').value === ''")
    page.wait_for_selector("#i2t-table [data-testid=cell-0-1]")
    assert "captions" in page.inner_text("#i2t-status")
    bad = tmp_path / "holiday.png"
    bad.write_text("not a picture at all")
    page.set_input_files("#i2t-image input[type=file]", str(bad))
    toast = page.wait_for_selector("[data-testid=toast-text]:has-text('Cannot use this upload')")
    assert "not an image" in toast.inner_text() and "holiday" not in toast.inner_text()
    assert page.locator("#i2t-table [data-testid=cell-0-1]").count() == 0  # old captions are gone
    close_toasts(page)


def test_feedback_tab(page, shots):
    page.click("button[role=tab]:has-text('Feedback')")
    page.click("#fb-refresh")
    page.wait_for_function("document.querySelector('#fb-counts').innerText.includes('judgement')")
    assert "relevant 1" in page.inner_text("#fb-counts")
    page.click("#fb-export")
    page.wait_for_selector("#fb-files td.filename[aria-label='feedback.qrels']")
    assert page.locator("#fb-files a[download]").count() == 4
    page.screenshot(path=str(shots / "4-feedback.png"), full_page=True)


@contextlib.contextmanager
def tile_server():
    """A local XYZ tile server (every tile one green PNG) standing in for a web basemap: yields
    (URL template, the paths requested so far)."""
    import http.server
    import io
    import threading

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 160, 60)).save(buf, "PNG")
    tile, got = buf.getvalue(), []

    class Tiles(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            got.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(tile)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Tiles)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/{{z}}/{{x}}/{{y}}.png", got
    finally:
        srv.shutdown()
        srv.server_close()


# where result #rank's marker is on the page: a plain lon/lat plot, or a MapLibre map (--basemap)
MARKER_AT = """(rank) => {
  const gd = document.querySelector('#t2i-geo .js-plotly-plot');
  const tr = gd._fullData.find(t => t.name === 'rank'), i = tr.customdata.indexOf(rank);
  if (gd._fullLayout.map) {
    const sub = gd._fullLayout.map._subplot, pt = sub.map.project([tr.lon[i], tr.lat[i]]);
    const r = sub.div.getBoundingClientRect();
    return {x: r.left + pt.x, y: r.top + pt.y};
  }
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
  return {x: r.left + xa._offset + xa.l2p(tr.x[i]), y: r.top + ya._offset + ya.l2p(tr.y[i])};
}"""


@pytest.mark.parametrize("basemap", ["none", "web"])
def test_a_click_on_a_footprint_opens_that_result(page, tiny_data, tmp_path, shots, basemap):
    """GeoTIFF gallery: search, open the map, click the rank marker of result #3 on the map (gr.Plot
    has no click event: demo.layout.GEO_CLICK_JS relays Plotly's), and the detail panel shows #3
    with its image and attention map, as a gallery click would. "web": the same over a web
    basemap (--basemap with a tile URL; a local tile server here), whose tiles the browser fetches."""
    import torch

    from demo.handlers import Handlers
    from envlf.data.geotiff import ChipOptions, chip_scenes, make_demo_scenes
    from envlf.model.core import create_model
    from envlf.search.index import GalleryIndex

    make_demo_scenes(tiny_data, tmp_path / "scenes", n_scenes=2, grid=2)
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    ds = chip_scenes(tmp_path / "scenes", tmp_path / "chips", ChipOptions(size=48, overlap=24))
    GalleryIndex.build(model, ds, tmp_path / "index", workers=0, progress=False)
    assets = {"checkpoint": ckpt, "index": tmp_path / "index", "feedback": tmp_path / "fb.csv",
              "home": tmp_path / "home"}
    with contextlib.ExitStack() as stack:
        env, tiles = {}, []
        if basemap == "web":
            url, tiles = stack.enter_context(tile_server())
            env["ENVLF_BASEMAP"] = url
        backend = make_backend(assets, **env)
        demo = stack.enter_context(serving(Handlers(backend)))
        pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # the module's browser
        stack.callback(pg.close)
        # with a basemap, only its tiles and what plotly.js's map asks for to draw the rank labels
        # (their font, and an icon it requests for any text on a map)
        outside = []
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
            ("http://127.0.0.1", "data:", "blob:", "https://fonts.openmaptiles.org/", "https://unpkg.com/maki@"))
            else None)
        pg.set_default_timeout(TIMEOUT)
        pg.goto(demo.local_url)
        pg.wait_for_selector("#t2i-query textarea").fill("a red square")
        pg.click("#t2i-search")
        pg.wait_for_selector("#t2i-gallery img")
        pg.get_by_text("Where: the results on a map").click()
        plot = pg.locator("#t2i-geo .js-plotly-plot[data-envlf-click='1']")
        plot.wait_for()
        pg.wait_for_function("() => { const gd = document.querySelector('#t2i-geo .js-plotly-plot');"
                             " return gd && gd._fullData && gd._fullData.some(t => t.name === 'rank'); }")
        plot.scroll_into_view_if_needed()
        if basemap == "web":
            pg.wait_for_function("() => document.querySelector('#t2i-geo .js-plotly-plot')._fullLayout.map"
                                 "._subplot.map.loaded()")
            assert tiles and all(t.endswith(".png") for t in tiles), tiles  # the basemap's tiles were fetched
        at = pg.evaluate(MARKER_AT, 3)
        pg.mouse.click(at["x"], at["y"])
        pg.wait_for_function("() => document.querySelector('#t2i-rank input').value === '3'")
        pg.wait_for_function("() => (document.querySelector('#t2i-details textarea') || {}).value?.startsWith('#3')")
        details = pg.locator("#t2i-details textarea").input_value()
        # the chip this search ranks third (the tab's defaults: k 12, re-rank the top 16)
        third = Handlers(backend).text_to_image("a red square", k=12, rerank=True, rerank_k=16).state["items"][2]
        assert details.split("image ", 1)[1].split()[0] == third["image_id"]
        assert "file=" in pg.wait_for_selector("#t2i-overlay img", state="attached").get_attribute("src")
        pg.locator("#t2i-geo").screenshot(path=str(shots / f"geo-map-{basemap}.png"))
        pg.screenshot(path=str(shots / f"geo-click-{basemap}.png"), full_page=True)
        assert outside == [], f"the page requested outside URLs: {outside[:5]}"
