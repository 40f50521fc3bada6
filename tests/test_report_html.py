"""report.html is self-contained and renders in a headless browser."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fqhw.report.screenshot import find_chromium, screenshot


@pytest.fixture(scope="module")
def report(request):
    compiled = request.getfixturevalue("compiled")
    out, _ = compiled
    return out, json.loads((out / "report.json").read_text())


def test_html_is_self_contained(report):
    out, rep = report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
    for group in rep["data"]["groups"]:
        assert group in page


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed; .ci/run installs it")
def test_screenshot_is_not_blank(report, tmp_path):
    out, _ = report
    png = screenshot(out / "report.html", tmp_path / "shot.png", width=900, height=1200)
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (1200, 900)
    # a rendered page has text and figures: many distinct grey levels and dark pixels
    assert len(np.unique(pixels)) > 20 and (pixels < 100).mean() > 0.005
    assert (out / "report.png").is_file()  # the compile attached its own screenshot
