"""Drive the web UI in headless Chromium: search, see results, click one, see similar ones; save a screenshot.

    python -m serve.screenshot http://127.0.0.1:8000 --query "a large red circle" --out docs/ui.png

Used by the browser test and to refresh the README's screenshot. Needs the `playwright` package and a Chromium
(Debian's `chromium`, found on PATH, or PLAYWRIGHT_CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    return os.environ.get("PLAYWRIGHT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def search_and_click(url: str, query: str, screenshot: str | Path | None = None) -> dict[str, Any]:
    """Types `query`, waits for result images, clicks the first result and waits for its similar images.
    Returns what the page showed: result ids before and after the click, the status lines and the URLs."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt install chromium, or set PLAYWRIGHT_CHROMIUM)")
    loaded = "() => { const imgs = [...document.querySelectorAll('#top .card img')];" \
             " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
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
        browser.close()
    return {"before": before, "after": after, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--query", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = search_and_click(args.url, args.query, args.out)
    print(result["before"]["status"], "->", result["after"]["status"])


if __name__ == "__main__":
    main()
