"""Shared fixtures: one tiny end-to-end compile, reused by the tests that read its output."""
from __future__ import annotations

import pytest

from fqhw.cli import main

TINY = [
    "--data-n-train", "240", "--data-n-val", "120", "--data-n-test", "120", "--data-image-size", "16",
    "--channels", "4,8", "--epochs", "1", "--qat-epochs", "1", "--quiet",
]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    out, cache = root / "out", root / "cache"
    assert main(["compile", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    return out, cache
