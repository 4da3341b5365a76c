"""End to end in a real headless Chromium against `python app.py` with the tiny model.

Uses Debian's /usr/bin/chromium through Playwright's Python package (no browser download).
A screenshot of the page after a generation is kept at outputs/screenshots/txt2img.png.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from urllib.parse import quote, unquote, urljoin

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.browser_server import ROOT, AppServer, free_port
from tests.conftest import TINY
from webui.storage.outputs import read_infotext

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "outputs" / "screenshots"
WAIT_MS = 60_000  # generous: the first run warms the model up on a busy CPU


@pytest.fixture(scope="module")
def app_server(models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    outdir = folder / "outputs"
    sound = folder / "notification.mp3"  # any bytes: the page's test counts plays, it never decodes them
    sound.write_bytes(b"ID3" + bytes(64))
    server = AppServer(["--ckpt-dir", str(models_dir), "--ckpt", TINY, "--outdir", str(outdir), "--preview-every", "2",
                        "--notification-audio", str(sound)], log_path=folder / "app.log")
    server.outdir = outdir
    print(f"\napp.py served its page {server.startup_seconds:.1f} s after start")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    # Assertions wait as long as actions do (Playwright's own default is 5 s: too short on a busy CPU).
    playwright_api.expect.set_options(timeout=WAIT_MS)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    """A fresh browser context (its own Gradio session, like a second user) on the page."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#txt2img_prompt textarea")
    return page


@pytest.fixture
def page(browser, app_server):
    page = open_page(browser, app_server.url)
    yield page
    page.context.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def expect_text(page, selector: str, pattern: str) -> None:
    playwright_api.expect(page.locator(selector)).to_contain_text(re.compile(pattern), timeout=WAIT_MS)


def open_list(page, elem_id: str, tries: int = 5):
    """Open a dropdown's list; its options. Opened again where an update of the page (the end of a run's chain of
    events, on a busy machine) closed it before it showed."""
    options = page.locator(f"#{elem_id} [role=option]")
    for _ in range(tries - 1):
        page.locator(f"#{elem_id} input").click()
        try:
            options.first.wait_for(state="visible", timeout=5_000)
            return options
        except playwright_api.TimeoutError:
            page.keyboard.press("Escape")
    page.locator(f"#{elem_id} input").click()
    return options


def choose(page, elem_id: str, option: str, tries: int = 5) -> None:
    """Pick a dropdown's option, trying again where an update of the page closed the list under the click."""
    item = page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True)
    for _ in range(tries - 1):
        try:
            open_list(page, elem_id)
            item.click(timeout=5_000)
            return
        except playwright_api.TimeoutError:
            page.keyboard.press("Escape")
    open_list(page, elem_id)
    item.click()


def infotext(page) -> str:
    return page.locator("#txt2img_infotext textarea").input_value()


def test_generate_shows_the_image_then_history_and_seed_reuse(page, app_server):
    page.locator("#txt2img_prompt textarea").fill("a tiny red fox")
    expect_text(page, "#txt2img_prompt_tokens", r"\b4/75\b")
    set_number(page, "txt2img_steps", 3)
    page.locator("#txt2img_prompt textarea").press("Control+Enter")  # the shortcut, not the button

    page.wait_for_selector("#txt2img_gallery img")
    playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(re.compile(r"Seed: \d+"))
    assert infotext(page).startswith("a tiny red fox\nSteps: 3,")
    expect_text(page, "#txt2img_time", r"Time taken: [\d.]+ s")
    seed = re.search(r"Seed: (\d+)", infotext(page)).group(1)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "txt2img.png"), full_page=True)

    page.click("#txt2img_reuse_seed")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value(seed)
    page.click("#txt2img_random_seed")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("-1")
    # A1111's ↙, titled on hover: with the prompt box empty, the last picture's parameters come back.
    page.hover("#txt2img_paste")
    playwright_api.expect(page.locator("#txt2img_paste")).to_have_attribute("title", re.compile("Read generation"))
    page.locator("#txt2img_prompt textarea").fill("")
    page.click("#txt2img_paste")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value(seed)
    playwright_api.expect(page.locator("#txt2img_prompt textarea")).to_have_value("a tiny red fox")
    page.click("#txt2img_random_seed")

    page.get_by_role("tab", name="History").click()
    thumbnail = page.locator(f"#history_gallery img[alt='a tiny red fox (seed {seed})']")
    thumbnail.click()
    playwright_api.expect(page.locator("#history_details textarea")).to_have_value(re.compile(f"Seed: {seed}"))
    page.wait_for_selector("#history_image img")
    page.screenshot(path=str(SCREENSHOTS / "history.png"), full_page=True)
    # "Open file" links to the PNG itself (parameters intact); the history database next to it is not served.
    link = page.locator("#history_open").get_attribute("href")
    opened = httpx.get(urljoin(page.url, link))
    assert opened.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(opened.content)).info["parameters"].startswith("a tiny red fox\n")
    database = app_server.outdir.resolve() / "history.sqlite3"
    assert database.is_file()
    assert httpx.get(urljoin(page.url, f"gradio_api/file={quote(str(database))}")).status_code == 403
    other = app_server.outdir.resolve() / "notes.txt"  # --outdir ~ would hold far more than images
    other.write_text("private")
    assert httpx.get(urljoin(page.url, f"gradio_api/file={quote(str(other))}")).status_code == 403
    page.click("#history_send")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value(seed)
    playwright_api.expect(page.locator("#txt2img_prompt textarea")).to_have_value("a tiny red fox")

    # Delete removes the image for good: the page showed it from outputs/, not from a copy in Gradio's cache.
    page.get_by_role("tab", name="History").click()
    thumbnail.click()
    shown = urljoin(page.url, page.locator("#history_image img").get_attribute("src"))
    assert httpx.get(shown).status_code == 200 and str(app_server.outdir.resolve()) in unquote(shown)
    page.click("#history_delete")  # asks first: Keep leaves the image, "Delete for good" deletes it
    page.click("#history_keep")
    playwright_api.expect(page.locator("#history_confirm_delete")).to_be_hidden()
    assert httpx.get(shown).status_code == 200
    page.click("#history_delete")
    page.click("#history_confirm_delete")
    playwright_api.expect(thumbnail).to_have_count(0)
    playwright_api.expect(page.locator("#history_delete")).to_be_disabled()  # nothing is selected now
    assert httpx.get(shown).status_code in (403, 404)


def test_interrupt_stops_a_long_job_showing_progress_and_previews(page):
    page.locator("#txt2img_prompt textarea").fill("a very long job")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_count", 20)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_progress", r"Step \d+/150 · image 1/20 · \d+% · ETA")
    # Generate is greyed out while the tab's job runs: a second click would be dropped unseen.
    playwright_api.expect(page.locator("#txt2img_generate")).to_be_disabled()
    page.wait_for_selector("#txt2img_preview img")  # a live preview of the denoising
    page.hover("#txt2img_preview img")  # its buttons show on hover; Share, which fails off Spaces, is not one
    assert page.locator("#txt2img_preview button[aria-label=Share]").count() == 0
    page.click("#txt2img_interrupt")
    expect_text(page, "#txt2img_progress", "Interrupted")
    assert page.locator("#txt2img_preview").is_hidden()
    playwright_api.expect(page.locator("#txt2img_generate")).to_be_enabled()


def test_generate_forever_runs_again_until_interrupt_or_an_error(page, app_server):
    def made() -> int:
        return sum(1 for _ in (app_server.outdir / "txt2img-images").rglob("*.png"))

    page.locator("#txt2img_prompt textarea").fill("again and again")
    set_number(page, "txt2img_steps", 2)
    before = made()
    page.click("#txt2img_generate", button="right")
    page.click("#txt2img_generate_forever")  # the menu's item
    playwright_api.expect(page.locator("#txt2img_generate")).to_have_class(re.compile("dw-forever"))
    deadline_ms, waited = WAIT_MS * 2, 0
    while made() < before + 3 and waited < deadline_ms:  # three runs, each pressed by the page itself
        page.wait_for_timeout(250)
        waited += 250
    assert made() >= before + 3
    page.click("#txt2img_interrupt")  # ends the run and generate forever with it
    playwright_api.expect(page.locator("#txt2img_generate")).not_to_have_class(re.compile("dw-forever"))
    playwright_api.expect(page.locator("#txt2img_generate")).to_be_enabled()
    settled = made()
    page.wait_for_timeout(3000)
    assert made() == settled  # nothing pressed Generate again
    # A run refused with an error ends it too, rather than sending the same request again and again
    page.locator("#txt2img_prompt textarea").fill("x" * 2001)
    page.click("#txt2img_generate", button="right")
    page.click("#txt2img_generate_forever")
    expect_text(page, "#txt2img_progress", "at most 2000")
    playwright_api.expect(page.locator("#txt2img_generate")).not_to_have_class(re.compile("dw-forever"))
    page.click("#txt2img_generate", button="right")
    playwright_api.expect(page.locator("#txt2img_generate_forever")).to_have_text("Generate forever")


def test_a_finished_run_plays_the_sound_and_a_page_in_the_background_shows_a_notification(browser, app_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    # The browser's sound and notifications, counted instead of made; the page as one in the background.
    context.add_init_script("""
        window.plays = [];
        HTMLMediaElement.prototype.play = function () { window.plays.push(this.src); return Promise.resolve(); };
        window.notices = [];
        window.Notification = class {
            static permission = "granted";
            static requestPermission() { return Promise.resolve("granted"); }
            constructor(title, options) { window.notices.push([title, options.body, options.icon]); }
        };
        document.hasFocus = () => false;
    """)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(app_server.url, wait_until="domcontentloaded")
        page.wait_for_selector("#txt2img_prompt textarea")
        page.locator("#txt2img_prompt textarea").fill("a bell")
        set_number(page, "txt2img_steps", 2)
        page.click("#txt2img_generate")
        page.wait_for_function("window.notices.length > 0")
        title, body, icon = page.evaluate("window.notices[0]")
        assert (title, body) == ("diffusers-webui", "txt2img: 1 picture made") and "/gradio_api/file=" in icon
        played = page.evaluate("window.plays")
        assert played and all(url.endswith("/notification.mp3") and "/gradio_api/file=" in url for url in played)
        assert page.request.get(played[0]).body() == b"ID3" + bytes(64)  # the server's file, as the page fetches it
        set_number(page, "txt2img_batch_size", 2)  # the grid, then the two pictures: two made, as A1111 counts
        page.click("#txt2img_generate")
        page.wait_for_function("window.notices.length > 1")
        assert page.evaluate("window.notices[1]")[1] == "txt2img: 2 pictures made"
        played = page.evaluate("window.plays")
        set_number(page, "txt2img_batch_size", 1)
        page.locator("#txt2img_prompt textarea").fill("x" * 2001)  # refused: the page says so, no notification
        page.click("#txt2img_generate")
        expect_text(page, "#txt2img_progress", "at most 2000")
        page.wait_for_timeout(1500)
        assert page.evaluate("window.notices.length") == 2 and page.evaluate("window.plays.length") == len(played)
    finally:
        context.close()


def test_a_reloaded_tab_follows_its_running_job_and_can_interrupt_it(page, app_server):
    page.locator("#txt2img_prompt textarea").fill("a job that outlives a reload")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_count", 20)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_progress", r"Step \d+/150")
    other = page.context.new_page()  # another tab of the same browser has a token of its own
    other.goto(app_server.url, wait_until="domcontentloaded")
    page.reload()
    # The same job (any of its images: the page takes a while to load on a busy 2-core machine).
    expect_text(page, "#txt2img_progress", r"Step \d+/150 · image \d+/20")
    playwright_api.expect(page.locator("#txt2img_generate")).to_be_disabled()
    other.wait_for_selector("#txt2img_prompt textarea")
    assert other.locator("#txt2img_progress").inner_text() == ""  # it resumes nothing
    other.close()
    # A tab opened from this one (or a duplicated tab) gets a copy of its sessionStorage, but not its job.
    with page.expect_popup() as popup_info:
        page.evaluate("window.open(location.href)")
    copy = popup_info.value
    copy.wait_for_selector("#txt2img_prompt textarea")
    playwright_api.expect(copy.locator("#txt2img_generate")).to_be_enabled()
    copy.click("#txt2img_interrupt")
    copy.close()
    expect_text(page, "#txt2img_progress", r"Step \d+/150 · image \d+/20")  # still running
    page.click("#txt2img_interrupt")
    expect_text(page, "#txt2img_progress", "Interrupted")
    playwright_api.expect(page.locator("#txt2img_generate")).to_be_enabled()


def test_the_image_clicked_during_a_run_gives_parameters_and_seed_after_it(page):
    page.locator("#txt2img_prompt textarea").fill("a fox to pick")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_count", 3)
    set_number(page, "txt2img_seed", 3000)
    page.click("#txt2img_generate")
    page.locator("#txt2img_gallery img[alt='seed 3001']").click()  # while the third image is denoised
    playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(re.compile(r"Seed: 3001,"))
    page.click("#txt2img_interrupt")  # the run ends with a final gallery update
    expect_text(page, "#txt2img_time", r"Time taken")
    # The gallery still shows seed 3001 large; Parameters and ♻ must agree with it.
    playwright_api.expect(page.locator("#txt2img_gallery .preview img[alt='seed 3001']").first).to_be_visible()
    playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(re.compile(r"Seed: 3001,"))
    page.click("#txt2img_reuse_seed")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("3001")

    # A new run drops the old selection: it ends showing its own first image large, and ♻ takes that one.
    set_number(page, "txt2img_steps", 2)
    set_number(page, "txt2img_seed", 4000)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_gallery", "seed 4002")
    playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(re.compile(r"Seed: 4000,"))
    playwright_api.expect(page.locator("#txt2img_gallery .preview img[alt='seed 4000']").first).to_be_visible()
    page.click("#txt2img_reuse_seed")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("4000")


def test_a_single_image_is_shown_whole(page):
    page.locator("#txt2img_seed input").fill("12.7")
    page.locator("#txt2img_prompt textarea").click()  # leaving the box shows the seed the run will use
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("13")
    page.locator("#txt2img_prompt textarea").fill("one whole apple")
    set_number(page, "txt2img_steps", 2)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_time", r"Time taken")
    shown = page.locator("#txt2img_gallery .preview img").first  # shown large once the run has ended
    playwright_api.expect(shown).to_be_visible()
    image, gallery = shown.bounding_box(), page.locator("#txt2img_gallery").bounding_box()
    # A lone thumbnail was drawn 580 px square in a 360 px high gallery: its lower part was cut off.
    assert image["y"] >= gallery["y"] and image["y"] + image["height"] <= gallery["y"] + gallery["height"]


def test_two_tabs_each_follow_their_own_job(browser, app_server):
    first, second = open_page(browser, app_server.url), open_page(browser, app_server.url)
    try:
        first.locator("#txt2img_prompt textarea").fill("first tab long job")
        set_number(first, "txt2img_steps", 150)
        set_number(first, "txt2img_batch_count", 20)
        first.click("#txt2img_generate")
        expect_text(first, "#txt2img_progress", r"Step \d+/150")

        second.locator("#txt2img_prompt textarea").fill("second tab short job")
        set_number(second, "txt2img_steps", 2)
        second.click("#txt2img_generate")
        expect_text(second, "#txt2img_progress", "Queued: 1 job ahead of yours")

        first.click("#txt2img_interrupt")  # stops the first tab's job only
        expect_text(first, "#txt2img_progress", "Interrupted")
        second.wait_for_selector("#txt2img_gallery img")
        assert second.locator("#txt2img_infotext textarea").input_value().startswith("second tab short job\n")
        expect_text(first, "#txt2img_gallery", r"\(unfinished\)")  # its own picture, as Interrupt left it
        assert first.locator("#txt2img_infotext textarea").input_value().startswith("first tab long job\n")
    finally:
        first.context.close()
        second.context.close()


def test_png_info_reads_a_stable_diffusion_webui_png(page, tmp_path):
    text = ("a castle on a hill\nNegative prompt: blurry\n"
            "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 512x768, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.9.4")
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "a1111.png", pnginfo=info)

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(tmp_path / "a1111.png"))
    expect_text(page, "#pnginfo_params", "Sampler")
    expect_text(page, "#pnginfo_params", "DPM\\+\\+ 2M Karras")
    page.click("#pnginfo_send")
    playwright_api.expect(page.locator("#txt2img_prompt textarea")).to_have_value("a castle on a hill")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("42")
    playwright_api.expect(page.locator("#txt2img_sampler input")).to_have_value("DPM++ 2M")
    playwright_api.expect(page.locator("#txt2img_scheduler input")).to_have_value("Karras")
    # Karras is in DPM++ 2M's Schedule type list, and Generate takes it.
    for name, value in (("txt2img_steps", 2), ("txt2img_width", 64), ("txt2img_height", 64)):
        set_number(page, name, value)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_time", r"Time taken")
    playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(
        re.compile(r"Sampler: DPM\+\+ 2M, Schedule type: Karras,"))
    choose(page, "txt2img_sampler", "DDIM")  # the list follows the sampler
    playwright_api.expect(page.locator("#txt2img_scheduler input")).to_have_value("Automatic")
    options = open_list(page, "txt2img_scheduler")
    playwright_api.expect(options).to_have_count(2)
    assert options.evaluate_all("items => items.map(item => item.getAttribute('aria-label'))") == [
        "Automatic", "SGM Uniform"]


def test_extras_scales_a_picture_to_a_size_and_shows_the_saved_file(page, app_server, tmp_path):
    text = "a teal square\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 8, Size: 32x16"
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 16), "teal").save(tmp_path / "small.png", pnginfo=info)

    page.get_by_role("tab", name="Extras").click()
    page.locator("#extras_image input[type=file]").set_input_files(str(tmp_path / "small.png"))
    page.get_by_label("Scale to", exact=True).check()
    set_number(page, "extras_upscaling_resize_w", 96)
    set_number(page, "extras_upscaling_resize_h", 96)
    page.click("#extras_generate")
    expect_text(page, "#extras_info", "Postprocess upscale to: 96x96, Postprocess crop to: 96x96")
    shown = page.locator("#extras_gallery img").first
    playwright_api.expect(shown).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.element_handle())
    assert shown.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 96]  # served from outputs/
    [saved] = (app_server.outdir / "extras-images").rglob("*.png")
    with Image.open(saved) as picture:
        assert picture.size == (96, 96) and picture.text["parameters"] == text
    page.click("#extras_send_to_img2img")  # the result goes on, with the parameters it carries
    playwright_api.expect(page.locator("#img2img_prompt textarea")).to_have_value("a teal square")
    playwright_api.expect(page.locator("#img2img_width input[type=number]")).to_have_value("96")


def test_png_info_says_when_a_file_is_no_image_and_drops_the_old_parameters(page, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "an old prompt\nSteps: 9, Sampler: Euler, CFG scale: 5, Seed: 11, Size: 64x64")
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "good.png", pnginfo=info)
    (tmp_path / "broken.png").write_bytes(b"this is not an image")

    page.get_by_role("tab", name="PNG Info").click()
    upload = page.locator("#pnginfo_image input[type=file]")
    upload.set_input_files(str(tmp_path / "good.png"))
    playwright_api.expect(page.locator("#pnginfo_infotext textarea")).to_have_value(re.compile("an old prompt"))
    upload.set_input_files(str(tmp_path / "broken.png"))
    expect_text(page, "#pnginfo_params", "Could not read broken.png as an image")
    playwright_api.expect(page.locator("#pnginfo_infotext textarea")).to_have_value("")
    assert "Could not preprocess" not in page.content()  # Gradio's internal error (with a server path) stays out
    page.click("#pnginfo_send")  # nothing to send now: a message, and txt2img keeps its values
    expect_text(page, "body", "Drop a PNG with generation parameters first")
    assert page.locator("#txt2img_seed input").input_value() == "-1"


def test_png_info_send_keeps_the_sampler_and_warns_about_a_schedule_we_lack(page, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a lake\nSteps: 9, Sampler: DPM++ 2M, Schedule type: Linear Quadratic, CFG scale: 5, "
                                "Seed: 12, Size: 64x64")
    Image.new("RGB", (32, 32), "navy").save(tmp_path / "quadratic.png", pnginfo=info)

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(tmp_path / "quadratic.png"))
    expect_text(page, "#pnginfo_params", "Linear Quadratic")  # ComfyUI's, not A1111's
    page.click("#pnginfo_send")
    playwright_api.expect(page.locator("#txt2img_seed input")).to_have_value("12")
    playwright_api.expect(page.locator("#txt2img_sampler input")).to_have_value("DPM++ 2M")
    # DPM++ 2M's own schedule type, which Automatic stands for
    playwright_api.expect(page.locator("#txt2img_scheduler input")).to_have_value("Karras")
    expect_text(page, "body", "Schedule type not applied: unknown schedule type 'Linear Quadratic'")


def test_a_style_saved_elsewhere_since_the_page_opened_is_offered_when_the_list_opens(page, app_server):
    styles_file = app_server.outdir / "styles.csv"
    before = styles_file.read_bytes() if styles_file.exists() else None
    options = open_list(page, "txt2img_styles")
    page.keyboard.press("Escape")
    assert "From another page" not in options.all_inner_texts()
    styles_file.parent.mkdir(parents=True, exist_ok=True)
    styles_file.write_text("name,prompt,negative_prompt\nFrom another page,\"{prompt}, in oil\",\n", encoding="utf-8")
    try:
        page.locator("#txt2img_prompt textarea").click()  # away, then the list again
        options = open_list(page, "txt2img_styles")
        playwright_api.expect(options.filter(has_text="From another page")).to_have_count(1)
    finally:
        if before is None:
            styles_file.unlink()
        else:
            styles_file.write_bytes(before)


def test_the_history_highlight_follows_the_selected_image_when_new_ones_push_it_along(page):
    def make(prompt):
        page.locator("#txt2img_prompt textarea").fill(prompt)
        set_number(page, "txt2img_steps", 1)
        page.click("#txt2img_generate")
        playwright_api.expect(page.locator("#txt2img_infotext textarea")).to_have_value(re.compile(prompt))

    make("highlight one")
    make("highlight two")
    page.get_by_role("tab", name="History").click()
    page.locator("#history_search textarea").fill("highlight")
    page.locator("#history_search textarea").press("Enter")
    thumbnails = page.locator("#history_gallery .thumbnail-item")
    playwright_api.expect(thumbnails).to_have_count(2)
    thumbnails.nth(1).click()  # "highlight one"
    playwright_api.expect(page.locator("#history_details textarea")).to_have_value(re.compile("highlight one"))
    page.get_by_role("tab", name="txt2img").click()
    make("highlight three")  # first in the History now: "highlight one" moves to the third place
    page.get_by_role("tab", name="History").click()
    playwright_api.expect(thumbnails).to_have_count(3)
    playwright_api.expect(thumbnails.nth(2)).to_have_class(re.compile(r"\bselected\b"))
    assert "selected" not in thumbnails.nth(1).get_attribute("class")


def test_history_fits_a_narrow_window_and_no_button_offers_a_share_that_fails(page):
    page.set_viewport_size({"width": 800, "height": 1000})
    page.locator("#txt2img_prompt textarea").fill("a narrow window")
    set_number(page, "txt2img_steps", 1)
    set_number(page, "txt2img_batch_count", 8)
    page.click("#txt2img_generate")
    expect_text(page, "#txt2img_time", r"Time taken")
    # Share posts to a Space's discussions: anywhere else it fails ("Share failed"), so it is not offered.
    assert page.locator("#txt2img_gallery button[aria-label=Share]").count() == 0
    page.get_by_role("tab", name="History").click()
    page.locator("#history_gallery img").first.click()
    page.wait_for_selector("#history_image img")
    assert page.locator("#history_image button[aria-label=Share]").count() == 0
    # Every thumbnail of the page lies inside the gallery (fixed columns put some past its right edge)...
    past_the_edge = page.evaluate("""() => {
        const gallery = document.querySelector('#history_gallery').getBoundingClientRect();
        return [...document.querySelectorAll('#history_gallery .grid-container > *')]
            .filter((item) => item.getBoundingClientRect().right > gallery.right + 1).length; }""")
    assert past_the_edge == 0
    # ...and the page count stays on one line (it was squeezed to one word per line).
    assert page.locator("#history_page_info .dw-page-info").bounding_box()["height"] < 2 * 24


def test_gradio_client_drives_generation(app_server):
    from gradio_client import Client

    client = Client(app_server.url, verbose=False)
    gallery, progress, _, text, timing = client.predict(prompt="an api fox", steps=2, seed=7, api_name="/txt2img")
    assert Path(gallery[0]["image"]).is_file() and gallery[0]["caption"] == "seed 7"
    assert text.startswith("an api fox\n") and "Seed: 7" in text and progress == ""



def test_gradio_client_inpaints_through_the_img2img_endpoint(app_server, tmp_path):
    """The open sub-tab is a parameter API callers see (img2img_mode), so they reach Inpaint upload too."""
    from gradio_client import Client, handle_file

    Image.new("RGB", (64, 64), "teal").save(tmp_path / "teal.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    client = Client(app_server.url, verbose=False)
    _, progress, _, text, _ = client.predict(
        prompt="an api fox", steps=2, seed=7, width=64, height=64, img2img_mode="Inpaint upload",
        inpaint_image=handle_file(str(tmp_path / "teal.png")), mask=handle_file(str(tmp_path / "mask.png")),
        mask_blur=0, inpainting_fill="original", api_name="/img2img")
    assert progress == "" and "Denoising strength: 0.75" in text and "Mask blur" not in text, (progress, text)
    [saved] = [path for path in (app_server.outdir / "img2img-images").rglob("*.png") if "api fox" in
               Image.open(path).info.get("parameters", "")]
    with Image.open(saved) as result:
        assert result.getpixel((60, 30)) == (0, 128, 128)  # outside the mask: the picture's own


def test_gradio_auth_shows_a_login_page_first(browser, services):
    from webui.launch import serve

    settings = dataclasses.replace(services.settings, port=free_port(), gradio_auth=[("ana", "s3cret")])
    served = serve(dataclasses.replace(services, settings=settings))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(served.url, wait_until="domcontentloaded")
        page.get_by_label("username").fill("ana")
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#txt2img_prompt textarea")
    finally:
        context.close()
        served.close()


def test_inpaint_paints_a_mask_on_the_canvas_and_draws_only_there(page, app_server, tmp_path):
    """The Inpaint sub-tab's canvas as a user works it: upload, one brush stroke, Generate; the mask reaches the
    worker through Gradio's image editor payload."""
    Image.new("RGB", (64, 64), "teal").save(tmp_path / "teal.png")
    page.click("#tab_img2img-button")
    playwright_api.expect(page.locator("#img2img_inpainting")).to_be_hidden()  # its settings on its sub-tabs only
    page.click("#img2img_inpaint_tab-button")
    playwright_api.expect(page.locator("#img2img_inpainting")).to_be_visible()
    page.wait_for_selector("#img2img_inpaint_canvas canvas")  # the editor takes no upload before it is drawn
    page.locator("#img2img_inpaint_canvas input[type=file]").set_input_files(str(tmp_path / "teal.png"))
    playwright_api.expect(page.locator("#img2img_inpaint_canvas .empty")).to_be_hidden()  # the picture is in
    box = page.locator("#img2img_inpaint_canvas .pixi-target").bounding_box()
    middle_x, middle_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(middle_x - 20, middle_y)  # the brush is the tool picked once a picture is in
    page.mouse.down()
    page.mouse.move(middle_x + 20, middle_y, steps=8)
    page.mouse.up()
    for name, value in (("img2img_steps", 2), ("img2img_width", 64), ("img2img_height", 64)):
        set_number(page, name, value)
    page.click("#img2img_generate")
    expect_text(page, "#img2img_time", r"Time taken")
    playwright_api.expect(page.locator("#img2img_infotext textarea")).to_have_value(re.compile(r"Mask blur: 4"))
    page.screenshot(path=str(SCREENSHOTS / "inpaint.png"), full_page=True)
    [saved] = [path for path in (app_server.outdir / "img2img-images").rglob("*.png")
               if "Mask blur: 4" in Image.open(path).info.get("parameters", "")]  # not another test's image
    with Image.open(saved) as result:
        assert result.getpixel((0, 0)) == (0, 128, 128)  # a corner the stroke did not reach: the picture's own
        assert result.getpixel((32, 32)) != (0, 128, 128)  # the stroke's middle: drawn again




def apply_samples_format(page, file_format: str, config: Path) -> None:
    """Pick the format on the Settings tab and apply it, until the settings file holds it (png: the default, also
    without a file). Tried again where the tab's own refresh from the server put the old value back under the pick."""
    def saved() -> str:
        return json.loads(config.read_text()).get("samples_format", "png") if config.exists() else "png"

    page.get_by_role("tab", name="Settings").click()
    for _ in range(3):
        choose(page, "settings_samples_format", file_format)
        page.click("#settings_apply")
        expect_text(page, "#settings_result", rf"Saved\. File format for images: {file_format}|Nothing to save")
        if saved() == file_format:
            return
    raise AssertionError(f"the Settings tab did not save {file_format}; the file holds {saved()}")


def test_the_settings_tab_saves_the_next_pictures_as_jpeg(page, app_server):
    try:
        apply_samples_format(page, "jpg", app_server.outdir / "config.json")
        page.get_by_role("tab", name="txt2img").click()
        page.locator("#txt2img_prompt textarea").fill("a jpeg lighthouse")
        for name, value in (("txt2img_steps", 2), ("txt2img_width", 64), ("txt2img_height", 64)):
            set_number(page, name, value)
        page.click("#txt2img_generate")
        expect_text(page, "#txt2img_time", r"Time taken")
        newest = max((app_server.outdir / "txt2img-images").rglob("*-*.*"), key=lambda path: path.stat().st_mtime)
        assert newest.suffix == ".jpg"
        with Image.open(newest) as saved:
            assert saved.format == "JPEG" and read_infotext(saved).startswith("a jpeg lighthouse\n")
    finally:  # the module's other tests look for PNG files
        apply_samples_format(page, "png", app_server.outdir / "config.json")


def test_the_checkpoint_merger_makes_a_model_the_picker_then_lists(page, app_server, models_dir):
    import shutil

    made = models_dir / "browser mix"
    try:
        page.get_by_role("tab", name="Checkpoint Merger").click()
        choose(page, "merger_secondary", TINY)
        page.locator("#merger_name textarea, #merger_name input").first.fill("browser mix")
        page.click("#merger_merge")
        expect_text(page, "#merger_result", r"Saved browser mix")
        assert (made / "model_index.json").exists()
        options = open_list(page, "model_dropdown")
        playwright_api.expect(options.filter(has_text="browser mix")).to_have_count(1)
        page.keyboard.press("Escape")
    finally:  # the other tests' model lists hold the tiny model alone
        shutil.rmtree(made, ignore_errors=True)
