"""The documentation site in a real browser: build it, serve it on 127.0.0.1, open every page in
headless Chromium, and fail on any console error, page error, failed request, or request to a host
other than 127.0.0.1 (the site must work offline: no fonts, scripts or images from elsewhere).
Saves screenshots of the home page and the configuration reference.

    python bench/docs_browser.py [--site /tmp/site [--no-build]] [--out docs/screenshots]

Needs Debian's chromium (`apt-get install chromium`) and `pip install playwright` (it drives that
browser through executable_path: no browser download). The build is `mkdocs build --strict`, as
`make docs` runs it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.subprocesses import free_port

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]
SCREENSHOTS = {"": "home.png", "reference/configuration/": "configuration.png"}


def build(site: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO, check=False,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def pages(site: Path) -> list[str]:
    """Every page's path below the site root, as a link to it reads ("", "guides/training/", ...)."""
    found = []
    for index in sorted(site.rglob("index.html")):
        folder = index.parent.relative_to(site).as_posix()
        if folder.startswith(("assets", "search")):
            continue
        found.append("" if folder == "." else folder + "/")
    return found


def check(base: str, paths: list[str], out: Path) -> list[str]:
    """Opens every page; returns the problems found (empty: all clean)."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        current = {"path": ""}

        def on_request(request) -> None:
            host = urlparse(request.url).hostname
            if urlparse(request.url).scheme in ("http", "https", "ws", "wss") and host != "127.0.0.1":
                problems.append(f"{current['path'] or '/'}: request to another host: {request.url}")

        page.on("request", on_request)
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"{current['path'] or '/'}: console error: {msg.text}"))
        page.on("pageerror", lambda error: problems.append(f"{current['path'] or '/'}: page error: {error}"))
        page.on("requestfailed", lambda request: problems.append(f"{current['path'] or '/'}: request failed: {request.url} ({request.failure})"))
        page.on("response", lambda response: response.status >= 400 and problems.append(
            f"{current['path'] or '/'}: HTTP {response.status} for {response.url}"))
        for path in paths:
            current["path"] = path
            response = page.goto(base + path, wait_until="networkidle")
            if response is None or response.status != 200:
                problems.append(f"{path or '/'}: status {response.status if response else 'none'}")
            if path in SCREENSHOTS:
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / SCREENSHOTS[path]))
                print(f"screenshot: {out / SCREENSHOTS[path]}")
        # The search runs in a web worker that loads the index: one query exercises it.
        current["path"] = "search"
        page.goto(base, wait_until="networkidle")
        page.keyboard.press("/")
        page.keyboard.type("learning_rate")
        page.wait_for_timeout(1500)
        if not page.locator(".md-search-result__item").count():
            problems.append("search: no result for 'learning_rate'")
        browser.close()
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, help="build into this folder (default: a temporary one)")
    parser.add_argument("--no-build", action="store_true", help="serve the site already built in --site")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the screenshots go")
    args = parser.parse_args()
    if args.no_build and not args.site:
        parser.error("--no-build needs --site")
    site = args.site or Path(tempfile.mkdtemp(prefix="lorafleet-site-"))
    if not args.no_build:
        build(site)
    paths = pages(site)
    server, base = serve(site)
    try:
        problems = check(base, paths, args.out)
    finally:
        server.shutdown()
    print(f"{len(paths)} pages opened at {base}")
    if problems:
        print("\n".join(problems))
        raise SystemExit(f"{len(problems)} problem(s)")
    print("no console errors, no failed requests, no request to another host")


if __name__ == "__main__":
    main()
