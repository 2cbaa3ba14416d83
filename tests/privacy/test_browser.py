"""The HTML reports open in a real browser: headless Chromium renders the audit report and the plan report
(``inspect --format html``); the screenshots are not blank and the audit's ROC images loaded.

Needs Debian's ``chromium`` (``.ci/run`` installs it and sets SIGUARD_REQUIRE_BROWSER=1, so CI fails rather
than skips without it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
if CHROMIUM is None:
    if os.environ.get("SIGUARD_REQUIRE_BROWSER"):
        raise RuntimeError("chromium not found (apt-get install chromium); SIGUARD_REQUIRE_BROWSER is set")
    pytest.skip("chromium is not installed (CI installs it)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--allow-file-access-from-files", "--virtual-time-budget=5000"]


def _chromium(*args: str, tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def _screenshot(html, tmp_path, name: str) -> np.ndarray:
    from PIL import Image

    out = tmp_path / f"{name}.png"
    proc = _chromium(f"--screenshot={out}", "--window-size=1280,1800", html.as_uri(), tmp_path=tmp_path)
    assert out.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def _not_blank(img: np.ndarray) -> None:
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    non_white = (img < 235).any(axis=2).mean()
    assert non_white > 0.01, f"only {non_white:.4f} of the page is not white"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, tables and plots, not one flat colour


def _near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())


def test_audit_report_renders_with_its_roc_curves(world, audited, tmp_path):
    html = world["dir"] / "report" / "index.html"
    dom = _chromium("--dump-dom", html.as_uri(), tmp_path=tmp_path).stdout
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, "the page's load handler did not run"
    assert m.group(1) == m.group(2) == "10", f"{m.group(1)} of {m.group(2)} ROC images loaded"
    img = _screenshot(html, tmp_path, "audit")
    _not_blank(img)
    # matplotlib's line colours (tab10 C0-C3: curves that coincide hide each other) exist only inside the ROC
    # PNGs, not in the page's own styles
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    assert sum(_near(img, c) for c in tab10) > 1000


def test_a_broken_image_is_detected(world, audited, tmp_path):
    """The check above can fail: with one PNG removed the page reports 9 of 10."""
    src = world["dir"] / "report"
    copy = tmp_path / "report"
    shutil.copytree(src, copy)
    next(copy.glob("roc-attack-*.png")).unlink()
    dom = _chromium("--dump-dom", (copy / "index.html").as_uri(), tmp_path=tmp_path).stdout
    assert 'data-images-loaded="9/10"' in dom


def test_inspect_html_renders(world, tmp_path):
    from tests.cli.test_cli import siguard

    out = tmp_path / "plan.html"
    proc = siguard("inspect", world["gplan"], "--format", "html", "--out", out)
    assert proc.returncode == 0, proc.stderr
    _not_blank(_screenshot(out, tmp_path, "plan"))
