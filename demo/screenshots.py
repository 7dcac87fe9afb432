"""Screenshots of a running app for the README, taken in headless Chromium.

    python app.py &                                   # the app you want to show
    python -m demo.screenshots --url http://127.0.0.1:7860 --out docs/screenshots \
        --query "three white planes parked beside a grey terminal"
    ENVLF_HOME=$(mktemp -d) python app.py &          # a first start: add --first-start

Drives the page the way a user would: a text query, a click on a result, one word's
attention map; a tile's captions in the image -> text tab and one caption's map; the Model
and Feedback tabs. It judges nothing (no row lands in the feedback file) unless --judge is given.
Needs Python playwright and Debian's Chromium (/usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def take(url: str, out: Path, query: str, word: str | None, tile: int, judge: bool,
         chromium: str = "/usr/bin/chromium", first_start: bool = False) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)

        def shot(name: str, settle_ms: int, full_page: bool = True) -> None:
            page.wait_for_timeout(settle_ms)  # let plots and images finish drawing
            shots.append(out / name)
            page.screenshot(path=str(shots[-1]), full_page=full_page)

        if first_start:  # the page while the default is built, then the same page once it is the app
            page.wait_for_selector("#startup-status", state="visible")
            shot("first-start.png", 3000, full_page=False)
        page.wait_for_selector("#t2i-query textarea", timeout=1_800_000 if first_start else 120_000)

        page.fill("#t2i-query textarea", query)
        page.click("#t2i-search")
        page.wait_for_selector("#t2i-gallery button.thumbnail-item img")
        page.click("#t2i-gallery button.thumbnail-item >> nth=0")
        page.wait_for_selector("#t2i-overlay img")
        if word:
            page.click(f"#t2i-words label:has-text('{word}')")
            page.wait_for_timeout(1500)
        if judge:
            page.click("#t2i-relevant")
            page.wait_for_function("document.querySelector('#t2i-saved textarea').value.startsWith('Saved')")
        shot("text-to-image.png", 800)

        page.click("button[role=tab]:has-text('Image → text')")
        page.click(f"#i2t-tiles button.thumbnail-item >> nth={tile}")
        page.wait_for_selector("#i2t-table [data-testid=cell-0-1]")
        page.click("#i2t-table [data-testid=cell-0-1]")
        page.wait_for_selector("#i2t-overlay img")
        shot("image-to-text.png", 800)

        page.click("button[role=tab]:has-text('Model')")
        page.wait_for_selector("#model-info")
        shot("model.png", 500, full_page=False)

        page.click("button[role=tab]:has-text('Feedback')")
        page.click("#fb-refresh")
        page.wait_for_selector("#fb-timeline .js-plotly-plot")
        shot("feedback.png", 1500)
        browser.close()
    return shots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.screenshots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--out", default="docs/screenshots")
    ap.add_argument("--query", default="three white planes parked beside a grey terminal")
    ap.add_argument("--word", default="planes", help="the query word whose map to show")
    ap.add_argument("--tile", type=int, default=0, help="which tile of the image -> text tab to use")
    ap.add_argument("--judge", action="store_true", help="also mark the first result relevant")
    ap.add_argument("--first-start", action="store_true",
                    help="the app is on a first start: shoot its start-up page too (first-start.png), then wait")
    args = ap.parse_args(argv)
    for path in take(args.url, Path(args.out), args.query, args.word, args.tile, args.judge,
                     first_start=args.first_start):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
