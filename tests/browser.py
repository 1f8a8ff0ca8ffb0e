"""Open built book pages in headless Chromium, as a reader's browser shows them, network closed.

Debian's `chromium` driven by Playwright (`executable_path`; Playwright never downloads a browser
here). Every request that does not go to 127.0.0.1 is aborted and recorded, so a page that needs a
CDN fails its test.
"""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# What a page shows once MathJax has typeset it: counts the tests assert on.
_INSPECT = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise;
  }
  const imgs = Array.from(document.querySelectorAll('article img, main img'));
  return {
    mathjax_loaded: !!(window.MathJax && MathJax.version),
    math_sources: document.querySelectorAll('.math, span.math, div.math').length,
    mjx: document.querySelectorAll('mjx-container').length,
    merror: document.querySelectorAll('mjx-merror').length,
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    images_without_alt: imgs.filter(i => !i.alt).map(i => i.src).slice(0, 5),
    error_outputs: document.querySelectorAll(
      '.output.traceback, .output.error, .output_error').length,
    widgets: document.querySelectorAll('.jupyter-widgets, .widget-slider, .lm-Widget').length,
    colab: Array.from(document.querySelectorAll('a[href*="colab.research.google.com"]'))
      .map(a => a.href),
    // the measure of the page: its rendered height, the code lines a reader sees unfolded, and
    // display equations wider than the text column (cut off, or scrolled sideways)
    height: document.documentElement.scrollHeight,
    visible_code_lines: Array.from(document.querySelectorAll('div.cell_input pre, .cell_input pre'))
      .filter(p => p.offsetParent !== null && p.getBoundingClientRect().height > 0)
      .reduce((n, p) => n + p.innerText.replace(/\\n+$/, '').split('\\n').length, 0),
    wide_equations: Array.from(document.querySelectorAll('mjx-container[display="true"]'))
      .filter(m => m.getBoundingClientRect().width > (m.parentElement.getBoundingClientRect().width
                                                      + 1))
      .map(m => (m.getAttribute('aria-label') || m.textContent || '').slice(0, 60)),
  };
}"""

# The image currently visible inside a widget stack (chapter 1's ε explorer).
_VISIBLE_FRAME = """() => {
  const imgs = Array.from(document.querySelectorAll('.jupyter-widgets img, .widget-image'));
  const shown = imgs.filter(i => i.offsetParent !== null && i.getBoundingClientRect().height > 0);
  return shown.map(i => i.src.slice(-64));
}"""


def _local(url: str) -> bool:
    """A request the page may make: to 127.0.0.1, or data it carries itself."""
    return url.startswith(("data:", "blob:")) or urlparse(url).hostname == "127.0.0.1"


@contextmanager
def chromium():
    """Debian's Chromium, headless, driven by Playwright; closed when the block ends."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def _local_page(browser):
    """A new page whose requests to anywhere but 127.0.0.1 are aborted."""
    page = browser.new_page()
    page.route("**/*", lambda r: r.continue_() if _local(r.request.url) else r.abort())
    return page


class PageReport(dict):
    """The inspection of one page plus what the browser reported while loading it."""


def inspect_pages(browser, base_url: str, paths: list[str], screenshots: Path, *,
                  slider_page: str | None = None):
    """Load every page; return {path: PageReport}. Screenshots go to
    `screenshots/<folder>__<page>.png`."""
    screenshots.mkdir(parents=True, exist_ok=True)
    return {path: _inspect_one(browser, base_url, path, screenshots,
                               move_slider=(path == slider_page)) for path in paths}


def _inspect_one(browser, base_url, path, screenshots, *, move_slider):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    report = PageReport(blocked=[], console_errors=[], failed=[])

    def route(r):
        if _local(r.request.url):
            r.continue_()
        else:
            report["blocked"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and report["console_errors"].append(m.text))
    page.on("pageerror", lambda e: report["console_errors"].append(f"page error: {e}"))
    page.on("requestfailed", lambda r: report["failed"].append(r.url))
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    if page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count():
        page.wait_for_selector(".jupyter-widgets", timeout=15_000)
    page.wait_for_timeout(500)
    report.update(page.evaluate(_INSPECT))
    if move_slider:
        report["slider"] = _move_slider(page)
    shot = screenshots / path.replace("/", "__").replace(".html", ".png")  # book__01_....png
    page.screenshot(path=str(shot), full_page=False)
    context.close()
    return report


def _move_slider(page) -> dict:
    """Press the right arrow on the first slider's handle; report the frame before and after."""
    handles = page.locator(".widget-slider .noUi-handle")
    found = handles.count()
    if not found:
        return {"handles": 0}
    handles.first.scroll_into_view_if_needed()
    before = page.evaluate(_VISIBLE_FRAME)
    handles.first.focus()
    for _ in range(2):
        page.keyboard.press("ArrowRight")
    page.wait_for_timeout(300)
    after = page.evaluate(_VISIBLE_FRAME)
    return {"handles": found, "before": before, "after": after}


def page_measure(reports: dict) -> str:
    """A summary table of the book pages' rendered height at 1280 × 800 (in screens of 800 px) and
    their visible code lines."""
    lines = [f"{'page':<36}{'height px':>10}{'screens':>9}{'visible code lines':>20}"]
    for path, r in reports.items():
        if path.startswith("book/") and "height" in r:
            lines.append(f"{path[5:]:<36}{r['height']:>10}{r['height'] / 800:>9.1f}"
                         f"{r['visible_code_lines']:>20}")
    return "\n".join(lines)


def search_results(browser, base_url: str, word: str) -> list[str]:
    """The pages the book's own search page lists for `word` (Sphinx's client-side search)."""
    page = _local_page(browser)
    page.goto(f"{base_url}/search.html?q={word}", wait_until="networkidle")
    page.wait_for_selector("#search-results ul.search li, #search-results p", timeout=20_000)
    page.wait_for_timeout(1000)
    return page.eval_on_selector_all("#search-results ul.search li a",
                                     "els => els.map(a => a.getAttribute('href'))")


def navigation(browser, base_url: str, path: str) -> list[str]:
    """The links of the left navigation bar of one page, in the order shown."""
    page = _local_page(browser)
    page.goto(f"{base_url}/{path}", wait_until="networkidle")
    return page.eval_on_selector_all(".bd-sidebar-primary nav a.reference",
                                     "els => els.map(a => a.getAttribute('href'))")
