"""report.html renders in a real browser: scripts/screenshot-report.sh in headless Chromium, checked pixel by pixel.

The HTML tests in test_report.py read the page as text; these render it. A hand-made run (records.py) is
reported by build_report, screenshotted as a full page, and the PNG must show what the page promises: shaded
table headers, the highlighted failed and drift_fail statuses, and the matplotlib plots (their exact
tab:blue / tab:red fills only exist where a base64 PNG was decoded and drawn; a broken image shows none).
Needs Debian's Chromium on PATH (apt-get install -y chromium); skipped otherwise. About 10 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from flux2bench.report import build_report
from conftest import REPO
from records import drift, gpu_result, gradient_image, result, save_outputs, with_noise, write_run, write_timeline

pytestmark = pytest.mark.slow  # headless Chromium renders the page

SCRIPT = REPO / "scripts" / "screenshot-report.sh"
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="no chromium on PATH (apt-get install -y chromium)")

# Exact colours the page draws: report.py's CSS, and matplotlib's default cycle in the plots.
TH_GREY = (240, 240, 240)        # th { background: #f0f0f0 }
BAD_RED = (248, 208, 208)        # td.bad, the oom status
WARN_YELLOW = (251, 232, 176)    # td.warn, the drift_fail status
TAB_BLUE = (31, 119, 180)        # scatter points, first stage bar, first timeline line
TAB_RED = (214, 39, 40)          # Pareto front line, vae_decode bars


def screenshot(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, str(run_dir)], check=False, capture_output=True, text=True,
                          timeout=180, env=env)


@pytest.fixture(scope="module")
def shot(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A small run like test_report's (baseline, drifting fp8, offloaded variant, OOM), reported and screenshotted."""
    root = tmp_path_factory.mktemp("browser-run")
    images = [gradient_image(32) for _ in range(4)]
    baseline = save_outputs(root, gpu_result(device=20.0, rss=8.0, s_per_image=4.0), images)
    fp8 = gpu_result(device=12.0, rss=7.0, s_per_image=2.0, precision="fp8", status="drift_fail",
                     drift=drift(baseline, psnr=24.0, ssim=0.9, failed=("min_psnr",)))
    save_outputs(root, fp8, [with_noise(im, 10.0) for im in images])
    offload = gpu_result(device=6.0, rss=30.0, s_per_image=8.0, offload="model", drift=drift(baseline, psnr=60.0))
    save_outputs(root, offload, images)
    write_timeline(root, offload)
    oom = result(status="oom", reason="CUDA out of memory", max_vram_gib=8.0, block="capped")
    run_dir = write_run(root, [baseline, fp8, offload, oom])
    built = build_report(run_dir)
    assert set(built.plots) == {"pareto", "stages", "timeline", "drift_speedup"}
    return run_dir, screenshot(run_dir, "--full-page")


def colour_counts(path: Path) -> dict[tuple[int, int, int], int]:
    with Image.open(path) as image:
        return {colour: n for n, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}


@needs_chromium
def test_the_script_writes_a_full_page_screenshot_next_to_the_report(shot):
    run_dir, done = shot
    assert done.returncode == 0, done.stderr
    png = run_dir / "report-screenshot.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert f"wrote {png}" in done.stdout
    with Image.open(png) as image:
        width, height = image.size
    assert width == 1600 and height > 1500  # the whole page: tables, fits-on, four plots, image grid


@needs_chromium
def test_the_screenshot_is_not_a_blank_page(shot):
    counts = colour_counts(shot[0] / "report-screenshot.png")
    total = sum(counts.values())
    non_white = sum(n for (r, g, b), n in counts.items() if min(r, g, b) < 235)
    assert len(counts) > 100
    assert non_white / total > 0.02


@needs_chromium
def test_tables_render_with_their_styles(shot):
    counts = colour_counts(shot[0] / "report-screenshot.png")
    assert counts.get(TH_GREY, 0) > 10_000       # header cells of the results and fits-on tables
    assert counts.get(BAD_RED, 0) > 200          # the oom status cell
    assert counts.get(WARN_YELLOW, 0) > 200      # the drift_fail status cell


@needs_chromium
def test_embedded_plots_are_decoded_and_drawn(shot):
    counts = colour_counts(shot[0] / "report-screenshot.png")
    assert counts.get(TAB_BLUE, 0) > 1_000
    assert counts.get(TAB_RED, 0) > 1_000


@needs_chromium
def test_a_blank_page_fails_the_check(tmp_path):
    (tmp_path / "report.html").write_text("<!DOCTYPE html><html><body></body></html>\n")
    done = screenshot(tmp_path)
    assert done.returncode != 0
    assert "blank page" in done.stderr


@needs_chromium
def test_a_plot_that_does_not_decode_fails_the_check_but_leaves_the_screenshot(shot, tmp_path):
    page = (shot[0] / "report.html").read_text()
    (tmp_path / "report.html").write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    done = screenshot(tmp_path)
    assert done.returncode != 0
    assert "1 of the page's" in done.stderr and "failed to load or decode" in done.stderr
    assert (tmp_path / "report-screenshot.png").is_file()


def test_a_missing_chromium_fails_with_how_to_install_it(tmp_path):
    (tmp_path / "report.html").write_text("<!DOCTYPE html><html><body><p>x</p></body></html>\n")
    done = screenshot(tmp_path, env={**os.environ, "CHROMIUM": "no-such-chromium-binary"})
    assert done.returncode != 0
    assert "apt-get install -y chromium" in done.stderr
    assert not (tmp_path / "report-screenshot.png").exists()


def test_usage_without_a_run_directory():
    done = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: scripts/screenshot-report.sh" in done.stderr


ANSWERS_GREEN = (243, 248, 243)  # section.answers { background: #f3f8f3 }


@needs_chromium
def test_the_answers_are_on_the_first_screen_at_1400_by_900(shot, tmp_path):
    """Fits on and the fastest setups open the page: the whole answers section lies inside a 1400x900 window."""
    out = tmp_path / "first-screen.png"
    done = subprocess.run(["bash", str(SCRIPT), "--window-size=1400,900", str(shot[0]), str(out)], check=False,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "wider than the window" not in done.stderr
    with Image.open(out) as image:
        pixels = image.convert("RGB")
        width, height = pixels.size
        rows = [y for y in range(height) if pixels.getpixel((width // 2 + 300, y)) == ANSWERS_GREEN
                or pixels.getpixel((20, y)) == ANSWERS_GREEN]
    assert (width, height) == (1400, 900)
    assert rows and rows[0] < 150  # the section starts under the title
    assert rows[-1] < height - 20  # and ends above the window's bottom edge: nothing of it needs scrolling
