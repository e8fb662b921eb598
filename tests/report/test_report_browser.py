"""Render report.html in real headless Chromium: the page loads, every <img> decodes, nothing is fetched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


# runs after the load event (all images decoded or failed) and writes its findings into the DOM
_PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var ext = performance.getEntriesByType("resource").filter(function (e) { return !/^data:/.test(e.name); });
  var d = document.createElement("div");
  d.id = "probe";
  d.setAttribute("data-images", imgs.length);
  d.setAttribute("data-loaded", ok.length);
  d.setAttribute("data-external", ext.length);
  d.setAttribute("data-tables", document.querySelectorAll("table").length);
  d.setAttribute("data-width", document.body.scrollWidth);
  document.body.appendChild(d);
});
</script>
"""


def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH or at /usr/bin/chromium (Debian: apt-get install -y chromium)")
    html = (reported_run / "report.html").read_text()
    n_figs = len(list((reported_run / "figures").glob("*.png")))
    assert n_figs > 0
    page = tmp_path / "page" / "report.html"  # alone in its folder: nothing beside it could be loaded
    page.parent.mkdir()
    page.write_text(html.replace("</body>", _PROBE + "</body>"))
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish rendering within 120 s")
    m = re.search(r'<div id="probe"([^>]*)>', proc.stdout)
    assert m, f"probe missing from the dumped DOM (rc={proc.returncode}): {proc.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([a-z]+)="(\d+)"', m.group(1)))
    assert int(attrs["images"]) == n_figs
    assert int(attrs["loaded"]) == n_figs, "some <img> did not decode in the browser"
    assert int(attrs["external"]) == 0
    assert int(attrs["tables"]) >= 3  # results, per-task, stage status
    assert "lmselect report: RUN" in proc.stdout

    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [*cmd[:-2], f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(shot)
    assert img.shape[1] == 1280 and float(np.std(img)) > 0.02  # a rendered page, not a blank one
