"""How long img2img's Generate takes in a real browser with a large picture left on another sub-tab's canvas,
against the same Generate with that canvas empty: the ratio shows whether Generate reads canvases it does not use
(Gradio's image editor exports and uploads its whole picture for every event that reads it).

    python bench/canvas_generate.py [--side 1024] [--runs 2]

Starts `python app.py` with a tiny random model on a free port, drives Debian's /usr/bin/chromium through
Playwright, and prints the seconds of each Generate and the ratio (1.0: the picture costs nothing).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser_server import AppServer  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.tiny_sd import save_tiny_model  # noqa: E402


def generate_seconds(page, runs: int) -> list[float]:
    """Seconds from a click on Generate to a new infotext, `runs` times."""
    times = []
    for _ in range(runs):
        before = page.locator("#img2img_infotext textarea").input_value()
        start = time.monotonic()
        page.click("#img2img_generate")
        page.wait_for_function("(old) => { const t = document.querySelector('#img2img_infotext textarea'); "
                               "return t && t.value && t.value !== old; }", arg=before, timeout=600_000)
        times.append(time.monotonic() - start)
    return times


def measure(browser, url: str, folder: Path, big: Path | None, runs: int) -> list[float]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(600_000)
    page.goto(url)
    page.wait_for_selector("#txt2img_prompt textarea")
    page.click("#tab_img2img-button")
    if big is not None:  # left on the Sketch canvas, a sub-tab this Generate does not use
        page.click("#img2img_sketch_tab-button")
        page.wait_for_selector("#img2img_sketch canvas")
        page.locator("#img2img_sketch input[type=file]").set_input_files(str(big))
        page.locator("#img2img_sketch .empty").wait_for(state="hidden")
        time.sleep(2)
    page.click("#img2img_img2img_tab-button")
    page.locator("#img2img_image input[type=file]").set_input_files(str(folder / "small.png"))
    time.sleep(2)
    for name, value in (("img2img_steps", 1), ("img2img_width", 64), ("img2img_height", 64)):
        box = page.locator(f"#{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    seconds = generate_seconds(page, runs)
    page.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1024, help="the large picture's side, pixels")
    parser.add_argument("--runs", type=int, default=2, help="Generate clicks for each case")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_tiny_model(folder / "models" / TINY)
        noise = np.random.default_rng(0).integers(0, 255, (args.side, args.side, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "big.png")  # noise: a PNG as large as a photo's
        Image.new("RGB", (64, 64), "teal").save(folder / "small.png")
        server = AppServer(["--ckpt-dir", str(folder / "models"), "--ckpt", TINY, "--outdir", str(folder / "out")],
                           log_path=folder / "app.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
                empty = measure(browser, server.url, folder, None, args.runs)
                loaded = measure(browser, server.url, folder, folder / "big.png", args.runs)
                browser.close()
        finally:
            server.stop()
    print(f"{'canvas':<28}{'Generate, s (each run)':<32}median")
    for label, seconds in (("empty", empty), (f"{args.side}x{args.side} on Sketch", loaded)):
        print(f"{label:<28}{', '.join(f'{s:.2f}' for s in seconds):<32}{statistics.median(seconds):.2f}")
    print(f"ratio (picture / empty): {statistics.median(loaded) / statistics.median(empty):.2f}")


if __name__ == "__main__":
    main()
