"""Drive the web viewer (``serve/static/index.html``) in headless Chromium with selenium.

Used by ``tests/test_serve.py::test_viewer_in_headless_chromium`` and, as a script, to make
the screenshot in ``docs/serve.md`` (serves a checkpoint on loopback, uploads a volume, saves
the page)::

    python tests/viewer_browser.py --checkpoint runs/demo/stage2 \\
        --input runs/demo/IXI904_lr_x2.nii.gz --out docs/img/serve_viewer.png

The browser is Debian's ``chromium`` + ``chromium-driver`` (``make setup`` installs them when
running as root with apt-get); selenium is told both paths, so it never downloads a driver.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Pixels of a canvas, read back in the page: RGBA bytes -> the gray channel, row-major.
_CANVAS_JS = """
const c = document.getElementById(arguments[0]);
if (!c.width || !c.height) return {w: c.width, h: c.height, gray: []};
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const gray = new Array(c.width * c.height);
for (let i = 0; i < gray.length; i++) gray[i] = d[4 * i];
return {w: c.width, h: c.height, gray: gray};
"""


def missing_browser() -> list[str]:
    """The Chromium executables that are not installed (empty when both are)."""
    return [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]


@contextmanager
def chromium(profile_dir: Path, width: int = 1100, height: int = 640):
    """A headless Chromium session (selenium WebDriver), quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={profile_dir}"):
        opts.add_argument(arg)
    if os.geteuid() == 0:  # Chromium refuses to start its sandbox as root (CI containers)
        opts.add_argument("--no-sandbox")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class ViewerRun:
    """What the page showed after a super-resolution."""

    status: str  # the page's status line
    window: tuple[float, float]  # display window (lo, hi) the page chose from the LR volume
    slice_index: int  # slider position (0-based)
    lr_canvas: tuple[int, int, list[int]]  # (width, height, gray pixels row-major)
    sr_canvas: tuple[int, int, list[int]]
    download_visible: bool


def run_viewer(driver, url: str, key: str, nifti: Path, timeout_s: float = 120.0,
               screenshot: Path | None = None) -> ViewerRun:
    """Open ``url``/, enter ``key``, check it, upload ``nifti`` through the file input, press
    "Super-resolve" and wait for the SR panel. Raises AssertionError with the page's status
    line when a step fails."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout_s, poll_frequency=0.1)

    def status_after(action, expect: str) -> str:
        el = driver.find_element(By.ID, "status")
        before = el.text
        action()
        wait.until(lambda d: el.text != before and el.get_attribute("class") in ("ok", "err"))
        text = el.text
        assert el.get_attribute("class") == "ok" and expect in text, f"viewer says: {text!r}"
        return text

    driver.get(url.rstrip("/") + "/")
    assert driver.title == "PGASR viewer", driver.title
    driver.find_element(By.ID, "key").send_keys(key)
    status_after(driver.find_element(By.ID, "info").click, "key accepted")
    status_after(lambda: driver.find_element(By.ID, "file").send_keys(str(Path(nifti).resolve())),
                 Path(nifti).name)
    run = driver.find_element(By.ID, "run")
    assert run.is_enabled()
    text = status_after(run.click, "SR ")
    lr, sr = (driver.execute_script(_CANVAS_JS, c) for c in ("c-lr", "c-sr"))
    win = driver.execute_script("return win;")  # top-level `let` of the page's script
    res = ViewerRun(
        status=text, window=(float(win[0]), float(win[1])),
        slice_index=int(driver.find_element(By.ID, "slider").get_attribute("value")),
        lr_canvas=(lr["w"], lr["h"], lr["gray"]), sr_canvas=(sr["w"], sr["h"], sr["gray"]),
        download_visible=driver.find_element(By.ID, "download").is_displayed())
    if screenshot is not None:
        driver.save_screenshot(str(screenshot))
    return res


def main(argv: list[str] | None = None) -> int:
    """Serve ``--checkpoint`` on loopback, run the viewer on ``--input``, save ``--out``."""
    import argparse
    import secrets
    import sys
    import tempfile
    import time

    p = argparse.ArgumentParser(description="screenshot of the PGASR web viewer")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="LR .nii/.nii.gz to upload")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--port", type=int, default=8406)
    p.add_argument("--window", default="1040x760", help="browser window WxH (pixels)")
    a = p.parse_args(argv)
    missing = missing_browser()
    if missing:
        print(f"missing {missing}: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import ray
    from ray import serve

    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="pgasr-viewer-"))
    key = secrets.token_hex(16)
    (tmp / "keys").write_text(key)
    (tmp / "keys").chmod(0o600)
    app = build_app({"overrides": [f"serve.checkpoint={a.checkpoint}", "serve.api_keys_env=",
                                   f"serve.api_keys_file={tmp / 'keys'}",
                                   "serve.min_replicas=1", "serve.max_replicas=1",
                                   # local caps: the Ray memory reservation follows them
                                   f"serve.max_body_bytes={256 * 2**20}",
                                   f"serve.max_voxels={256**3}"]})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        serve.run(app, name="pgasr", route_prefix="/", blocking=False)
        t0 = time.perf_counter()
        width, height = (int(v) for v in a.window.split("x"))
        with chromium(tmp / "profile", width, height) as driver:
            res = run_viewer(driver, f"http://127.0.0.1:{a.port}", key, Path(a.input),
                             timeout_s=600, screenshot=Path(a.out))
        print(f"{res.status} ({time.perf_counter() - t0:.1f} s) -> {a.out}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
