"""Drive the web UI in headless Chromium: search, see results, click one, see similar ones; or open the map,
zoom, hover and click; save a screenshot.

    python -m serve.screenshot http://127.0.0.1:8000 --query "a large red circle" --out docs/ui.png
    python -m serve.screenshot http://127.0.0.1:8000 --map --zoom 3 --out docs/map.png

Used by the browser test and to refresh the README's screenshot. Needs the `playwright` package and a Chromium
(Debian's `chromium`, found on PATH, or PLAYWRIGHT_CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    return os.environ.get("PLAYWRIGHT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(height: int) -> Iterator[tuple[Any, list[str]]]:
    """A headless Chromium page 1280 x `height` px and the list its page errors are appended to."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt install chromium, or set PLAYWRIGHT_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": height})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, errors
        finally:
            browser.close()


def search_and_click(url: str, query: str, screenshot: str | Path | None = None) -> dict[str, Any]:
    """Types `query`, waits for result images, clicks the first result and waits for its similar images.
    Returns what the page showed: result ids before and after the click, the status lines and the URLs."""
    loaded = "() => { const imgs = [...document.querySelectorAll('#top .card img')];" \
             " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"  # fmt: skip
    with browser_page(860) as (page, errors):
        page.goto(url)
        page.wait_for_selector("#info:not(:empty)", timeout=120_000)  # the server is ready
        page.fill("#query", query)
        page.press("#query", "Enter")
        page.wait_for_function(loaded, timeout=60_000)
        ids = page.eval_on_selector_all(".card", "cards => cards.map(c => Number(c.dataset.id))")
        before = {"ids": ids, "status": page.text_content("#status"), "url": page.url}
        page.click("#top .card >> nth=0")
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('similar to')")
        page.wait_for_function(loaded, timeout=60_000)
        after = {"ids": page.eval_on_selector_all(".card", "cards => cards.map(c => Number(c.dataset.id))"),
                 "status": page.text_content("#status"), "url": page.url}  # fmt: skip
        if screenshot is not None:
            page.goto(before["url"])  # the text search again, for the picture
            page.wait_for_function(loaded, timeout=60_000)
            page.screenshot(path=str(screenshot), full_page=False)
    return {"before": before, "after": after, "errors": errors}


def open_map(url: str, screenshot: str | Path | None = None, zoom_steps: int = 0) -> dict[str, Any]:
    """Opens the map view and waits for every thumbnail to load; scrolls to zoom in, hovers and clicks a thumbnail.
    Returns what the page showed: points, their frame colours, the legend, the view box before and after the
    zoom, whether the hover image appeared, and the status after the click. `zoom_steps` zooms in that many wheel
    steps (around the centre) before the screenshot."""
    loaded = "() => { const svg = document.querySelector('#tsne'), n = svg.querySelectorAll('g.point').length;" \
             " return n > 0 && Number(svg.dataset.loaded) === n; }"  # fmt: skip
    with browser_page(940) as (page, errors):
        page.goto(url.rstrip("/") + "/?view=tsne")
        page.wait_for_function(loaded, timeout=180_000)
        points = page.eval_on_selector_all("#tsne g.point", "gs => gs.map(g => ({id: Number(g.dataset.id), "
                                           "cluster: Number(g.dataset.cluster), "
                                           "fill: g.querySelector('rect').getAttribute('fill')}))")  # fmt: skip
        legend = page.eval_on_selector_all(".legend-item", "items => items.map(i => i.textContent)")
        box = page.get_attribute("#tsne", "viewBox")
        svg = page.locator("#tsne").bounding_box()
        page.mouse.move(svg["x"] + svg["width"] / 2, svg["y"] + svg["height"] / 2)
        for _ in range(max(zoom_steps, 1)):
            page.mouse.wheel(0, -120)
        page.wait_for_timeout(200)
        zoomed = page.get_attribute("#tsne", "viewBox")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=False)
        # back to the whole map: the double click sent to the map itself (a real one at the centre could land on a
        # thumbnail, whose clicks would leave the map to find similar images)
        page.dispatch_event("#tsne", "dblclick")
        if page.get_attribute("#tsne", "viewBox") != box:
            raise RuntimeError("a double click did not reset the map's zoom")
        page.hover("#tsne g.point >> nth=0", force=True)
        hover = page.is_visible("#hover")
        page.click("#tsne g.point >> nth=0", force=True)
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('similar to')")
        status = page.text_content("#status")
    return {"points": points, "legend": legend, "box": box, "zoomed": zoomed, "hover": hover, "status": status,
            "errors": errors}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--query", help="the search to picture (the grid view)")
    parser.add_argument("--map", action="store_true", help="picture the map view instead")
    parser.add_argument("--zoom", type=int, default=0, help="with --map: wheel steps to zoom in first")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.map:
        result = open_map(args.url, args.out, args.zoom)
        print(f"{len(result['points'])} points, legend: {result['legend']}")
        return
    if not args.query:
        parser.error("give --query (or --map)")
    result = search_and_click(args.url, args.query, args.out)
    print(result["before"]["status"], "->", result["after"]["status"])


if __name__ == "__main__":
    main()
