"""Open the built site in headless Chromium and check that pages really render.

    python docs/check_site.py [SITE_DIR] [--out DIR]

Serves SITE_DIR (default: ``site``, built by ``mkdocs build``) on a free localhost
port, then for the home page and a reducer page: takes a screenshot (1280 x 900) and
dumps the DOM. A page passes when its screenshot is not blank (pixel standard deviation
above a floor: a white or single-colour page fails) and its DOM holds the expected
title text. Exits 0 when all pass, 1 otherwise, 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# (path under the site, text the rendered DOM must contain)
PAGES = (
    ("", "Visual-token reduction"),
    ("reducers/tome/", "tome"),
)
MIN_STD = 8.0  # grey levels; a blank page is ~0, a rendered one well above 20
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


@dataclass
class PageResult:
    url: str
    screenshot: Path
    std: float
    title_found: bool
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.title_found and self.std > MIN_STD


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def _chromium(binary: str, profile: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def pixel_std(png: Path) -> float:
    """Standard deviation of the grey levels of an image (0 for a blank one)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as img:
        return float(np.asarray(img.convert("L"), dtype=np.float32).std())


def check_page(binary: str, url: str, expected: str, out: Path, profile: Path, name: str = "page") -> PageResult:
    shot = out / f"{name}.png"
    try:
        shot_run = _chromium(binary, profile, f"--screenshot={shot}", url)
        dom = _chromium(binary, profile, "--dump-dom", url)
    except subprocess.TimeoutExpired as err:
        return PageResult(url, shot, 0.0, False, f"chromium timed out: {err}")
    if not shot.is_file():
        return PageResult(url, shot, 0.0, False, f"no screenshot written: {shot_run.stderr.strip()[-500:]}")
    return PageResult(
        url, shot, pixel_std(shot), expected in dom.stdout, "" if dom.returncode == 0 else dom.stderr[-500:]
    )


def check_site(site: Path, out: Path, pages: tuple[tuple[str, str], ...] = PAGES) -> list[PageResult]:
    """Check every page; raises ``FileNotFoundError`` when Chromium or the site is missing."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    if not (site / "index.html").is_file():
        raise FileNotFoundError(f"{site}/index.html not found: run `mkdocs build` first")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with serve(site) as base, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        for path, expected in pages:
            name = path.strip("/").replace("/", "_") or "home"
            results.append(check_page(binary, base + path, expected, out, Path(profile), name))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", default="site", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="Where screenshots go (default: a temporary folder).")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="site-shots-"))
    try:
        results = check_site(args.site, out)
    except FileNotFoundError as err:
        print(f"check_site: {err}", file=sys.stderr)
        return 2
    for r in results:
        status = "ok" if r.ok else "FAIL"
        print(
            f"{status}: {r.url} pixel std {r.std:.1f} (> {MIN_STD}), title text found: {r.title_found}, {r.screenshot} {r.error}"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
