"""A PNG of report.html taken by headless Chromium, when Chromium is installed.

The command line is a list (no shell), the page is a local file, and Chromium runs with
its background networking off: nothing leaves the machine.
"""
from __future__ import annotations

import shutil
import os
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html_path: Path, png_path: Path, width: int = 1100, height: int = 2400, timeout_s: float = 60) -> Path:
    """Render `html_path` and write `png_path`; raises RuntimeError when it cannot."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    # The browser's profile, crash database, caches and temporary files live in one temporary
    # folder, removed afterwards, that is also its HOME and TMPDIR: Chromium keeps "Crash
    # Reports" under ~/.config/chromium even with --user-data-dir. Chromium puts a Unix socket
    # in that folder and aborts (SIGABRT) when the socket's path passes ~107 bytes, so the
    # folder goes in the system's temporary folder, or in /tmp when that path is long.
    base = tempfile.gettempdir()
    if len(base) > 40 and os.path.isdir("/tmp"):
        base = "/tmp"
    with tempfile.TemporaryDirectory(prefix="fqhw-chromium-", dir=base) as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            "--disable-breakpad", "--disable-crash-reporter",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={Path(png_path).absolute()}",
            Path(html_path).absolute().as_uri(),
        ]
        env = {**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile, "TMPDIR": profile}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0 or not Path(png_path).is_file():
        raise RuntimeError(f"Chromium could not render {html_path}: exit {proc.returncode}")
    return Path(png_path)
