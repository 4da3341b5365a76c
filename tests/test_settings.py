"""The Settings tab and /sdapi/v1/options' saved settings: A1111's config.json keys, kept across restarts, and
images saved as PNG, JPEG or WebP with their infotext where other tools read it."""
from __future__ import annotations

import base64
import io
import json
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from webui.api import create_api_app
from webui.schemas import InvalidRequest, JobState
from webui.storage.options import OptionsStore
from webui.storage.outputs import OutputStore, read_infotext
from tests.helpers import raising

INFOTEXT = 'a "red" apple, Ünïcode 猫\nNegative prompt: dull\nSteps: 2, Sampler: Euler, Seed: 7, Size: 64x64'


def noisy(size=(64, 64)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


# --- the settings file ---------------------------------------------------------------------------

def test_settings_start_at_a1111s_defaults_and_survive_a_restart(tmp_path):
    path = tmp_path / "config.json"
    store = OptionsStore(path)
    assert (store.current().samples_format, store.current().grid_format, store.current().jpeg_quality) == (
        "png", "png", 80)
    assert not path.exists()  # nothing written until something is saved
    store.update({"samples_format": "webp", "jpeg_quality": 90})
    again = OptionsStore(path).current()
    assert (again.samples_format, again.grid_format, again.jpeg_quality) == ("webp", "png", 90)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left


def test_a1111s_own_config_file_is_read_and_only_the_keys_changed_are_written(tmp_path):
    path = tmp_path / "config.json"
    a1111 = {"samples_format": "JPEG", "jpeg_quality": 95, "outdir_samples": "", "sd_model_checkpoint": "v1-5.ckpt",
             "grid_format": "gif"}  # A1111 takes formats this server does not: that key alone falls back
    path.write_text(json.dumps(a1111), encoding="utf-8")
    path.chmod(0o600)  # A1111's file may hold extensions' API keys
    store = OptionsStore(path)
    assert (store.current().samples_format, store.current().jpeg_quality, store.current().grid_format) == (
        "jpg", 95, "png")
    edited = a1111 | {"outdir_samples": "elsewhere"}  # by A1111, while this server runs
    path.write_text(json.dumps(edited), encoding="utf-8")
    store.update({"jpeg_quality": 70})
    assert json.loads(path.read_text(encoding="utf-8")) == edited | {"jpeg_quality": 70}  # "gif" and "JPEG" stay
    assert path.stat().st_mode & 0o777 == 0o600
    store.update({"samples_format": "jpg", "grid_format": "png", "jpeg_quality": 70})  # the tab sends them all
    assert json.loads(path.read_text(encoding="utf-8")) == edited | {"jpeg_quality": 70}  # none changed: none written


def test_a_linked_settings_file_stays_a_link(tmp_path):
    target = tmp_path / "a1111" / "config.json"
    target.parent.mkdir()
    target.write_text("{}", encoding="utf-8")
    link = tmp_path / "config.json"
    link.symlink_to(target)
    OptionsStore(link).update({"samples_format": "webp"})
    assert link.is_symlink() and json.loads(target.read_text(encoding="utf-8")) == {"samples_format": "webp"}


def test_a1111s_spellings_of_the_formats_are_taken():
    store = OptionsStore(None)
    updated = store.update({"samples_format": "JPEG", "grid_format": " WebP"})
    assert (updated.samples_format, updated.grid_format) == ("jpg", "webp")


@pytest.mark.parametrize("changes, says", [
    ({"samples_format": "gif"}, "samples_format: Input should be 'png', 'jpg' or 'webp'"),
    ({"jpeg_quality": 0}, "jpeg_quality: Input should be greater than or equal to 1"),
    ({"jpeg_quality": "best"}, "jpeg_quality: Input should be a valid integer"),
])
def test_a_bad_value_is_named_and_changes_nothing(tmp_path, changes, says):
    path = tmp_path / "config.json"
    store = OptionsStore(path)
    store.update({"samples_format": "jpg"})
    before = path.read_bytes()
    with pytest.raises(InvalidRequest, match=says):
        store.update({"grid_format": "webp", **changes})
    assert store.current().grid_format == "png" and path.read_bytes() == before


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\udcff"])
def test_a_file_that_cannot_be_read_is_never_saved_over(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    store = OptionsStore(path)
    assert store.current().samples_format == "png"  # the defaults, and a line in the log
    with pytest.raises(OSError, match="could not be read .* not saved over; fix or remove it"):
        store.update({"samples_format": "jpg"})
    assert path.read_bytes() == content.encode("utf-8", "surrogateescape")
    assert store.current().samples_format == "png"


# --- saving in each format -----------------------------------------------------------------------

@pytest.mark.parametrize("file_format, pil_format", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_images_and_grids_are_saved_in_the_chosen_format_with_their_infotext(tmp_path, file_format, pil_format):
    store = OutputStore(tmp_path, OptionsStore(None))
    store.options.update({"samples_format": file_format, "grid_format": file_format})
    image = store.save_image(noisy(), INFOTEXT, seed=7)
    grid = store.save_grid(noisy((128, 64)), INFOTEXT)
    assert (image.name, grid.name) == (f"00000-7.{file_format}", f"grid-0000.{file_format}")
    for path in (image, grid):
        with Image.open(path) as saved:
            assert saved.format == pil_format and read_infotext(saved) == INFOTEXT
    if file_format != "png":  # as A1111 (piexif) writes it: "UNICODE", then UTF-16 big-endian
        data = image.read_bytes()
        assert b"UNICODE\0" + 'a "red"'.encode("utf-16-be") in data and "Ünïcode 猫".encode("utf-16-be") in data
        # tagged UNDEFINED (type 7), as EXIF says: piexif, which A1111 reads it with, reads no other type
        assert b"\x92\x86\x00\x07" in data


@pytest.mark.parametrize("file_format", ["png", "jpg", "webp"])
def test_with_write_infotext_off_the_files_and_the_apis_pictures_hold_none_but_the_text_file_is_written(
        tmp_path, file_format):
    from webui.api.convert import encode_image

    store = OutputStore(tmp_path, OptionsStore(None))
    store.options.update({"samples_format": file_format, "grid_format": file_format, "enable_pnginfo": False,
                          "save_txt": True})
    options = store.options.current()
    image, grid = store.save_image(noisy(), INFOTEXT, seed=7), store.save_grid(noisy((128, 64)), INFOTEXT)
    extra = store.save_extra(noisy(), {"parameters": INFOTEXT, "postprocessing": "Postprocess upscaler: Lanczos"})
    returned = Image.open(io.BytesIO(base64.b64decode(encode_image(noisy(), INFOTEXT, options=options))))
    for picture in (*(Image.open(path) for path in (image, grid, extra)), returned):
        with picture:
            assert read_infotext(picture) is None and "parameters" not in picture.info
            assert not picture.getexif().get_ifd(0x8769)  # no EXIF sub-IFD, so no UserComment
            assert getattr(picture, "text", {}) == {}
    assert image.with_suffix(".txt").read_text(encoding="utf-8") == INFOTEXT + "\n"  # A1111's apart from it
    store.options.update({"enable_pnginfo": True})
    back_on = store.options.current()
    with Image.open(io.BytesIO(base64.b64decode(encode_image(noisy(), INFOTEXT, options=back_on)))) as returned:
        assert read_infotext(returned) == INFOTEXT


def test_lossless_webp_keeps_every_pixel_where_lossy_does_not(tmp_path):
    store = OutputStore(tmp_path, OptionsStore(None))
    picture = noisy()
    store.options.update({"samples_format": "webp"})
    lossy = store.save_image(picture, INFOTEXT, seed=1)
    store.options.update({"webp_lossless": True})
    lossless = store.save_image(picture, INFOTEXT, seed=2)
    for path, kept in ((lossy, False), (lossless, True)):
        with Image.open(path) as saved:
            assert saved.format == "WEBP" and read_infotext(saved) == INFOTEXT
            assert (saved.convert("RGB").tobytes() == picture.tobytes()) is kept, path


def test_the_quality_setting_changes_the_file_and_numbers_go_on_across_formats(tmp_path):
    store = OutputStore(tmp_path)
    first = store.save_image(noisy(), INFOTEXT, seed=1)
    store.options.update({"samples_format": "jpg", "jpeg_quality": 95})
    fine = store.save_image(noisy(), INFOTEXT, seed=2)
    store.options.update({"jpeg_quality": 10})
    coarse = store.save_image(noisy(), INFOTEXT, seed=3)
    assert [p.name for p in (first, fine, coarse)] == ["00000-1.png", "00001-2.jpg", "00002-3.jpg"]
    assert coarse.stat().st_size < fine.stat().st_size


def test_a_picture_too_large_for_webp_is_saved_as_png(tmp_path):
    store = OutputStore(tmp_path)
    store.options.update({"grid_format": "webp"})
    wide = Image.new("RGB", (16_384 + 8, 8), "white")
    path = store.save_grid(wide, INFOTEXT)
    assert path.suffix == ".png"
    with Image.open(path) as saved:
        assert read_infotext(saved) == INFOTEXT


def test_an_infotext_too_long_for_jpeg_is_saved_as_png_and_a_picture_with_alpha_on_white(tmp_path):
    store = OutputStore(tmp_path)
    store.options.update({"samples_format": "jpg", "grid_format": "jpg"})
    long = "x" * 40_000 + "\nSteps: 2, Sampler: Euler, Seed: 7"  # an upload's to Extras may hold 64K characters
    path = store.save_extra(noisy(), {"parameters": long})
    with Image.open(path) as saved:
        assert path.suffix == ".png" and read_infotext(saved) == long
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    with Image.open(store.save_grid(clear, INFOTEXT)) as saved:
        assert saved.format == "JPEG" and min(saved.convert("L").getdata()) > 240  # on white, not black


def test_extras_in_jpeg_keep_the_parameters(tmp_path):
    store = OutputStore(tmp_path)
    store.options.update({"samples_format": "jpg"})
    path = store.save_extra(noisy(), {"parameters": INFOTEXT, "postprocessing": "Postprocess upscale by: 2"})
    with Image.open(path) as saved:
        assert (path.name, read_infotext(saved)) == ("00000.jpg", INFOTEXT)


def test_a_crash_left_partial_file_of_any_format_is_removed(tmp_path):
    store = OutputStore(tmp_path)
    folder = store.image_folder("txt2img")
    folder.mkdir(parents=True)
    for name in (".partial-a.png", ".partial-b.jpg", ".partial-c.webp"):
        (folder / name).write_bytes(b"half")
    assert store.remove_partial_files(older_than=-1) == 3 and list(folder.iterdir()) == []


# --- through the worker, the API and the page ---------------------------------------------------

def test_a_job_saves_in_the_format_set_and_its_history_row_points_at_that_file(services):
    services.options.update({"samples_format": "webp"})
    job = services.worker.submit({"prompt": "a red apple", "steps": 2, "seed": 3})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    path = job.images[0].path
    assert path.endswith("00000-3.webp")
    with Image.open(path) as saved:
        assert "Steps: 2" in read_infotext(saved)
    [row], total = services.history.list_images()
    assert total == 1 and str(row.path).endswith("00000-3.webp")


def test_the_api_reads_and_changes_the_saved_settings(services, settings):
    with TestClient(create_api_app(services)) as client:
        assert client.get("/sdapi/v1/options").json()["samples_format"] == "png"
        reply = client.post("/sdapi/v1/options", json={"samples_format": "jpg", "jpeg_quality": 85, "show_x": 1})
        assert reply.status_code == 200, reply.text[:300]
        assert reply.json() == {"applied": ["samples_format", "jpeg_quality"], "ignored": ["show_x"]}
        assert client.get("/sdapi/v1/options").json()["jpeg_quality"] == 85
        assert json.loads(settings.options_path.read_text(encoding="utf-8"))["samples_format"] == "jpg"
        bad = client.post("/sdapi/v1/options", json={"jpeg_quality": 101, "samples_format": "webp"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("jpeg_quality: "), bad.text[:300]
        assert client.get("/sdapi/v1/options").json()["samples_format"] == "jpg"  # nothing of it applied
        body = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "save_images": True}
        reply = client.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 200, reply.text[:300]
        # As A1111's API: the pictures come in the settings' format, their infotext in EXIF
        with Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))) as returned:
            assert returned.format == "JPEG" and read_infotext(returned).startswith("a cat\n")
        extras = client.post("/sdapi/v1/extra-single-image", json={"image": reply.json()["images"][0],
                                                                   "upscaling_resize": 2, "upscaler_1": "Lanczos"})
        with Image.open(io.BytesIO(base64.b64decode(extras.json()["image"]))) as upscaled:
            assert upscaled.format == "JPEG" and upscaled.size == (128, 128)
            assert read_infotext(upscaled).startswith("a cat\n")
    saved = sorted(p.name for p in services.outputs.image_folder("txt2img").iterdir())
    assert len(saved) == 1 and saved[0].endswith(".jpg")


def test_the_settings_tab_saves_for_everyone_and_says_why_not(ui_settings):
    from webui.ui.blocks import create_ui

    services, tab = ui_settings, create_ui(ui_settings).settings
    assert [tab.widgets[key].label for key in ("samples_format", "grid_format", "jpeg_quality",
                                               "samples_filename_pattern")] == [
        "File format for images", "File format for grids", "Quality for saved jpg and webp images",
        "Images filename pattern"]
    *values, message = tab.actions.apply("webp", "png", 90, "[seed]-[prompt_words]", *DIRS)
    assert values == ["webp", "png", 90, "[seed]-[prompt_words]", *DIRS]
    assert "Saved. File format for images: webp; Quality for saved jpg and webp images: 90; Images filename " in message
    assert services.options.current().samples_format == "webp"
    *values, message = tab.actions.apply("webp", "tiff", 90, "", *DIRS)  # not on the list: a page built by hand
    assert values == ["webp", "png", 90, "[seed]-[prompt_words]", *DIRS]  # what is saved
    assert "Not saved: File format for grids: Input should be" in message
    services.options.update({"jpeg_quality": 40})  # an API client, meanwhile
    assert tab.actions.shown() == ["webp", "png", 40, "[seed]-[prompt_words]", *DIRS]


def test_a_page_saves_only_its_own_edits_over_what_another_page_saved_meanwhile(ui_settings):
    """Two users' Settings tabs open: B's Apply of its quality alone used to put back the file format B's page still
    showed, undoing A's change."""
    from webui.ui.blocks import create_ui

    services, tab = ui_settings, create_ui(ui_settings).settings
    services.options.update({"samples_format": "png", "jpeg_quality": 80})
    *page_a, shown_a = tab.actions.shown_to_page()
    *page_b, shown_b = tab.actions.shown_to_page()
    assert page_a == shown_a == page_b
    *_, message = tab.actions.apply_edits(shown_a, "jpg", *page_a[1:])  # A: jpg
    assert "File format for images: jpg" in message
    *values, now_shown, message = tab.actions.apply_edits(shown_b, page_b[0], page_b[1], 90, *page_b[3:])  # B: quality
    assert (services.options.current().samples_format, services.options.current().jpeg_quality) == ("jpg", 90)
    assert values[:3] == ["jpg", "png", 90] and now_shown == values
    assert "Quality for saved jpg and webp images: 90" in message and "File format for images" not in message


DIRS = (True, True, "[date]", True, False, *[True] * 7, False, True, 20, "Original", "CPU", "CodeFormer", 0.5, 1.0, False,
        "second pass", "None", "#ffffff", True, False, False, False, False, False, False, False, False, False, False,
        True, 2,
        "Approx cheap", -1, False, True, True, 4.0, 4000)
# the subfolders, the infotext in the files, lossy webp, the infotext's model, VAE, version and hashes, the text
# file, comments, the comma backtrack, emphasis, the random number source, the face restorer and its weight, the
# inpainting conditioning mask strength, Clip skip SDXL, the refiner's hires pass, img2img's upscaler and fill colour,
# the inpainting overlay, the refiner's switch by steps, the old prompt editing timelines, exact img2img steps, the copies before the hires fix, face
# restoration and colour correction, the mask, the masked composite, the init image, incomplete images, live previews:
# defaults; the preview period: the fixture's --preview-every 2; the grid's rows and place in the gallery, the JPG copy
# of large pictures: defaults


@pytest.fixture
def ui_settings(services):
    return services


def test_the_settings_file_is_in_the_outputs_folder_unless_a1111s_flag_names_one(tmp_path):
    from webui.config import parse_settings

    outdir = tmp_path / "outputs"
    assert parse_settings(["--outdir", str(outdir)], {}).options_path == outdir / "config.json"
    named = tmp_path / "a1111" / "config.json"
    assert parse_settings(["--outdir", str(outdir), "--ui-settings-file", str(named)], {}).options_path == named


def test_frozen_settings_are_shown_but_cannot_be_changed_anywhere(settings, tmp_path):
    import dataclasses

    from webui.config import parse_settings
    from webui.services import build_services
    from webui.storage.options import SettingsFrozen
    from webui.ui.blocks import create_ui

    assert parse_settings(["--outdir", str(tmp_path / "o"), "--freeze-settings"], {}).freeze_settings
    settings.options_path.parent.mkdir(parents=True, exist_ok=True)
    settings.options_path.write_text('{"samples_format": "jpg"}', encoding="utf-8")
    services = build_services(dataclasses.replace(settings, freeze_settings=True), load_model=False)
    try:
        with pytest.raises(SettingsFrozen, match="--freeze-settings"):
            services.options.update({"samples_format": "png"})
        with TestClient(create_api_app(services)) as client:
            reply = client.post("/sdapi/v1/options", json={"samples_format": "webp"})
            assert reply.status_code == 403 and reply.json()["detail"].startswith("samples_format: "), reply.text
            assert client.get("/sdapi/v1/options").json()["samples_format"] == "jpg"
            assert client.post("/sdapi/v1/options", json={"show_x": 1}).status_code == 200  # nothing to change
        tab = create_ui(services).settings
        assert not tab.apply.visible and not any(widget.interactive for widget in tab.widgets.values())
        *values, message = tab.actions.apply("png", "png", 80, "", *DIRS)  # a page built before, or by hand
        assert values == ["jpg", "png", 80, "", *DIRS] and "Not saved: the settings cannot be changed" in message
    finally:
        services.close()
    assert json.loads(settings.options_path.read_text(encoding="utf-8")) == {"samples_format": "jpg"}


def test_a_page_anyone_can_reach_shows_the_settings_but_cannot_change_them():
    import gradio as gr

    from webui.config import Settings
    from webui.ui.settings import build_settings

    assert Settings(listen=True).open_to_anyone and not Settings(listen=True, gradio_auth=[("a", "b")]).open_to_anyone
    assert not Settings().open_to_anyone  # this machine only
    options = OptionsStore(None, starting={"show_progress_every_n_steps": 2})  # as DIRS has it
    with gr.Blocks():
        tab = build_settings(options, open_to_anyone=True)
    assert not tab.apply.visible and not any(widget.interactive for widget in tab.widgets.values())
    *values, message = tab.actions.apply("jpg", "png", 80, "", *DIRS)
    assert values == ["png", "png", 80, "", *DIRS] and "Not saved: this page is served to other machines without a login" in message


def test_preview_every_starts_the_server_with_its_period_over_the_files_and_saves_it_only_when_changed(tmp_path):
    from webui.config import parse_settings
    from webui.services import _starting_options

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"show_progress_every_n_steps": 8, "jpeg_quality": 70}), encoding="utf-8")
    assert OptionsStore(path).preview_period() == 8  # the file's
    flags = parse_settings(["--preview-every", "3"], {})
    options = OptionsStore(path, starting=_starting_options(flags))
    assert options.preview_period() == 3 and options.current().jpeg_quality == 70
    options.update({"jpeg_quality": 60, "show_progress_every_n_steps": 3})  # the Settings tab sends every value
    assert json.loads(path.read_text(encoding="utf-8"))["show_progress_every_n_steps"] == 8  # the flag's, not saved
    options.update({"show_progress_every_n_steps": 4})
    assert json.loads(path.read_text(encoding="utf-8"))["show_progress_every_n_steps"] == 4
    off = OptionsStore(None, starting=_starting_options(parse_settings(["--preview-every", "0"], {})))
    assert off.preview_period() == 0 and not off.current().live_previews_enable
    assert _starting_options(parse_settings([], {})) == {}  # no flag: the saved setting


def test_the_api_reads_and_sets_the_live_preview_options(services):
    with TestClient(create_api_app(services)) as client:
        options = client.get("/sdapi/v1/options").json()
        assert options["live_previews_enable"] is True and options["show_progress_every_n_steps"] == 2
        refused = client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 40})
        assert refused.status_code == 422 and "show_progress_every_n_steps" in refused.text
        assert "less than or equal to 32" in refused.text
        applied = client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 7,
                                                          "live_previews_enable": False})
        assert applied.status_code == 200, applied.text
        options = client.get("/sdapi/v1/options").json()
        assert options["show_progress_every_n_steps"] == 7 and options["live_previews_enable"] is False
    assert services.options.preview_period() == 0


def test_an_unreadable_settings_file_refuses_an_api_change_before_anything_changes(services, settings):
    settings.options_path.write_text("{broken", encoding="utf-8")
    services.options = OptionsStore(settings.options_path)
    with TestClient(create_api_app(services)) as client:
        reply = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"})
        assert reply.status_code == 500 and "nothing changed" in reply.json()["detail"], reply.text[:300]
        options = client.get("/sdapi/v1/options").json()
        assert (options["CLIP_stop_at_last_layers"], options["samples_format"]) == (1, "png")
    assert settings.options_path.read_text(encoding="utf-8") == "{broken"


# --- A1111's "Create a text file next to every image" ----------------------------------------------

def test_with_save_txt_each_image_grid_and_named_copy_has_its_infotext_beside_it(tmp_path):
    from webui.storage.outputs import NamedCopy

    options = OptionsStore(None)
    store = OutputStore(tmp_path / "out", options)
    assert not store.save_image(noisy(), INFOTEXT, seed=7).with_suffix(".txt").exists()  # off by default
    options.update({"save_txt": True, "samples_format": "jpg"})
    image = store.save_image(noisy(), INFOTEXT, seed=7)
    grid = store.save_grid(noisy((128, 64)), INFOTEXT + ", Script: X/Y/Z plot")
    (tmp_path / "copies").mkdir()
    copy = store.save_named(noisy(), INFOTEXT, NamedCopy(tmp_path / "copies", "holiday"))
    assert image.with_suffix(".txt").read_text(encoding="utf-8") == INFOTEXT + "\n"
    assert grid.with_suffix(".txt").read_text(encoding="utf-8") == INFOTEXT + ", Script: X/Y/Z plot\n"
    assert copy.name == "holiday.jpg" and (tmp_path / "copies" / "holiday.txt").read_text(encoding="utf-8") \
        == INFOTEXT + "\n"
    # an Extras result's text file says what Extras did, as A1111's
    done = "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    extra = store.save_extra(noisy(), {"parameters": INFOTEXT, "postprocessing": done})
    assert extra.with_suffix(".txt").read_text(encoding="utf-8") == done + "\n"
    assert not [p for p in (tmp_path / "out").rglob(".partial-*")]


def test_a_large_picture_or_file_gets_a1111s_jpg_copy_beside_it(tmp_path):
    options = OptionsStore(None)
    store = OutputStore(tmp_path, options)
    small = store.save_image(noisy(), INFOTEXT, seed=7)
    assert options.current().export_for_4chan and not small.with_suffix(".jpg").exists()  # 64x64: below both limits
    options.update({"target_side_length": 100})
    wide = store.save_image(noisy((300, 150)), INFOTEXT, seed=8)
    with Image.open(wide.with_suffix(".jpg")) as copy:  # shrunk to the side limit, the shape kept
        assert copy.format == "JPEG" and copy.size == (100, 50) and read_infotext(copy) == INFOTEXT
    tall = store.save_grid(noisy((150, 300)), INFOTEXT)
    with Image.open(tall.with_suffix(".jpg")) as copy:
        assert copy.size == (50, 100)
    options.update({"target_side_length": 4000, "img_downscale_threshold": 0.001})  # about 1 KB: a file above it
    heavy = store.save_image(noisy(), INFOTEXT, seed=9)
    with Image.open(heavy.with_suffix(".jpg")) as copy:
        assert copy.size == (64, 64)  # not shrunk: only the file was large
    options.update({"samples_format": "jpg"})
    assert store.save_image(noisy(), INFOTEXT, seed=10).suffix == ".jpg"  # a jpg itself: no copy over it
    from webui.storage.outputs import NamedCopy

    options.update({"samples_format": "png"})
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "holiday.jpg").write_bytes(b"the picture the batch read")
    named = store.save_named(noisy(), INFOTEXT, NamedCopy(tmp_path / "batch", "holiday"))
    assert named.name == "holiday.png" and (tmp_path / "batch" / "holiday.jpg").read_bytes().startswith(b"the pic")
    extra = store.save_extra(noisy(), {"parameters": INFOTEXT})
    with Image.open(extra.with_suffix(".jpg")) as copy:  # Extras' pictures too, as A1111 saves them
        assert read_infotext(copy) == INFOTEXT
    options.update({"export_for_4chan": False})
    assert not store.save_image(noisy(), INFOTEXT, seed=11).with_suffix(".jpg").exists()
    assert not [p for p in tmp_path.rglob(".partial-*")]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("cannot write mode I;16")])
def test_a_jpg_copy_that_cannot_be_written_loses_no_picture(tmp_path, caplog, monkeypatch, error):
    import webui.storage.outputs as outputs

    def disk_full(path, data):
        raise error

    monkeypatch.setattr(outputs, "write_file", disk_full)
    options = OptionsStore(None)
    options.update({"img_downscale_threshold": 0})
    path = OutputStore(tmp_path, options).save_image(noisy(), INFOTEXT, seed=7)
    assert read_infotext(Image.open(path)) == INFOTEXT and not path.with_suffix(".jpg").exists()
    assert "could not write the JPG copy of" in caplog.text and type(error).__name__ in caplog.text


def test_a_text_file_that_cannot_be_written_loses_no_picture(tmp_path, caplog, monkeypatch):
    import webui.storage.outputs as outputs

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_text_file", disk_full)
    options = OptionsStore(None)
    options.update({"save_txt": True})
    path = OutputStore(tmp_path, options).save_image(noisy(), INFOTEXT, seed=7)
    assert path.name == "00000-7.png" and read_infotext(Image.open(path)) == INFOTEXT
    assert "could not write the text file beside" in caplog.text and "No space left" in caplog.text


def test_a_job_writes_the_text_file_and_jpg_copy_and_deleting_from_history_removes_them(services):
    with TestClient(create_api_app(services)) as client:
        assert client.post("/sdapi/v1/options", json={"save_txt": True}).json()["applied"] == ["save_txt"]
        assert client.get("/sdapi/v1/options").json()["save_txt"] is True
        assert client.post("/sdapi/v1/options", json={"img_downscale_threshold": 0}).status_code == 200
    job = services.worker.submit({"prompt": "a red apple", "steps": 1, "seed": 3, "width": 64, "height": 64})
    assert job.wait(60) and job.state is JobState.DONE, job.error
    text, jpg = (job.images[0].path.rsplit(".", 1)[0] + suffix for suffix in (".txt", ".jpg"))
    with open(text, encoding="utf-8") as file:
        assert file.read() == job.images[0].infotext + "\n"
    assert os.path.exists(jpg)  # every file is above a limit of 0 MB
    [row], _ = services.history.list_images()  # the copy is no picture of the history's
    assert services.history.delete_image(row.id)
    assert not services.history.list_images()[0] and not os.path.exists(text) and not os.path.exists(jpg)


# --- A1111's options kept beside the Settings tab's: the model, the API's options ----------------------------------
A1111_DEFAULTS = {  # as stable-diffusion-webui 1.10 writes them into config.json
    "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "s_min_uncond": 0.0, "s_min_uncond_all": False,
    "skip_early_cond": 0.0, "sgm_noise_multiplier": False, "img2img_extra_noise": 0.0,
    "always_discard_next_to_last_sigma": False, "sd_noise_schedule": "Default", "use_downcasted_alpha_bar": False,
    "use_old_karras_scheduler_sigmas": False, "eta_ddim": 0.0, "eta_ancestral": 1.0, "s_churn": 0.0, "s_tmin": 0.0,
    "s_tmax": 0.0, "s_noise": 1.0, "eta_noise_seed_delta": 0, "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "uni_pc_variant": "bh1", "uni_pc_order": 3,
    "uni_pc_lower_order_final": True, "sdxl_refiner_high_aesthetic_score": 6.0,
    "sdxl_refiner_low_aesthetic_score": 2.5, "initial_noise_multiplier": 1.0, "token_merging_ratio": 0.0,
    "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.0}


def test_the_apis_options_last_across_a_restart_in_the_settings_file(settings):
    from webui.services import build_services

    services = build_services(settings)
    try:
        with TestClient(create_api_app(services)) as client:
            reply = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
            assert reply.status_code == 200, reply.text
    finally:
        services.close()
    on_file = json.loads(settings.options_path.read_text(encoding="utf-8"))
    assert (on_file["CLIP_stop_at_last_layers"], on_file["eta_noise_seed_delta"]) == (2, 31337)
    services = build_services(settings)  # a restart
    try:
        with TestClient(create_api_app(services)) as client:
            options = client.get("/sdapi/v1/options").json()
            assert (options["CLIP_stop_at_last_layers"], options["eta_noise_seed_delta"]) == (2, 31337)
            reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64, "height": 64})
            infotext = json.loads(reply.json()["info"])["infotexts"][0]
            assert "Clip skip: 2" in infotext and "ENSD: 31337" not in infotext  # Euler draws no noise: no ENSD
    finally:
        services.close()


def api_options_at_start(settings, on_file: dict) -> dict:
    """GET /sdapi/v1/options of a server started with this settings file."""
    from webui.services import build_services

    settings.options_path.parent.mkdir(parents=True, exist_ok=True)
    settings.options_path.write_text(json.dumps(on_file), encoding="utf-8")
    services = build_services(settings)
    try:
        with TestClient(create_api_app(services)) as client:
            return client.get("/sdapi/v1/options").json()
    finally:
        services.close()


def test_a1111s_own_config_file_gives_the_apis_options_and_its_defaults_change_nothing(settings, caplog):
    with caplog.at_level("WARNING"):
        options = api_options_at_start(settings, A1111_DEFAULTS | {"eta_noise_seed_delta": 31337, "sd_vae": "None"})
    assert not [record.getMessage() for record in caplog.records if "settings file" in record.getMessage()]
    assert (options["eta_noise_seed_delta"], options["sd_vae"], options["CLIP_stop_at_last_layers"]) == (
        31337, "None", 1)


def test_a_value_of_the_file_this_server_cannot_take_is_named_and_left_on_file(settings, caplog):
    with caplog.at_level("WARNING"):
        options = api_options_at_start(settings, {"CLIP_stop_at_last_layers": "deep", "eta_ddim": 0.3})
    assert (options["CLIP_stop_at_last_layers"], options["eta_ddim"]) == (1, 0.3)
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "CLIP_stop_at_last_layers = 'deep' is not taken" in said
    assert json.loads(settings.options_path.read_text(encoding="utf-8"))["CLIP_stop_at_last_layers"] == "deep"


def test_without_ckpt_the_server_starts_with_the_model_loaded_last(settings, models_dir, tmp_path):
    """As A1111 keeps sd_model_checkpoint: the model picked in the UI or by the API is the next start's; an
    explicit --ckpt wins."""
    import dataclasses

    from webui.config import parse_settings
    from webui.services import build_services

    assert parse_settings(["--outdir", str(tmp_path / "o")], {}).ckpt_from_options
    assert not parse_settings(["--outdir", str(tmp_path / "o"), "--ckpt", "x"], {}).ckpt_from_options
    assert not parse_settings(["--outdir", str(tmp_path / "o")], {"WEBUI_CKPT": "x"}).ckpt_from_options
    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / "tiny-sd", target_is_directory=True)
    remembering = dataclasses.replace(settings, models_dir=own_models, ckpt="tiny-a", ckpt_from_options=True)
    services = build_services(remembering)
    try:
        assert services.engine.model.entry.name == "tiny-a"
        services.worker.load_model("tiny-b")  # as the UI's model list or POST /options do
    finally:
        services.close()
    assert json.loads(settings.options_path.read_text(encoding="utf-8"))["sd_model_checkpoint"].startswith("tiny-b [")
    services = build_services(remembering)
    try:
        assert services.engine.model.entry.name == "tiny-b"
    finally:
        services.close()
    services = build_services(dataclasses.replace(remembering, ckpt_from_options=False))  # --ckpt tiny-a
    try:
        assert services.engine.model.entry.name == "tiny-a"
    finally:
        services.close()


def test_a_model_put_back_after_an_override_is_not_made_the_servers_model(settings, models_dir, tmp_path):
    """A job's own model (a tab's pick, a plot's Checkpoint name axis) changes neither the server's model nor the
    next start's; nor does putting it back after a later job whose override is restored afterwards (A1111's
    default for override_settings). Putting it back used to make it the server's model and remember it. Found by
    review."""
    import dataclasses

    from tests.helpers import finished_job
    from webui.services import build_services

    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / "tiny-sd", target_is_directory=True)
    services = build_services(dataclasses.replace(settings, models_dir=own_models, ckpt="tiny-a",
                                                  ckpt_from_options=True))
    try:
        quick = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 1}
        finished_job(services, quick | {"model": "tiny-b"})  # a plot cell's / a tab's own model
        assert services.worker.chosen_model.entry.name == "tiny-a"
        finished_job(services, quick | {"model": "tiny-a", "restore_model": True})  # an API override, put back after
        assert services.engine.model.entry.name == "tiny-b"  # as it was before that job
        assert services.worker.chosen_model.entry.name == "tiny-a"
    finally:
        services.close()
    on_file = json.loads(settings.options_path.read_text(encoding="utf-8")) if settings.options_path.exists() else {}
    assert not on_file.get("sd_model_checkpoint", "").startswith("tiny-b"), on_file  # (the default start's: none)


def test_frozen_settings_keep_the_apis_options_in_memory_only(settings):
    import dataclasses

    from webui.services import build_services

    services = build_services(dataclasses.replace(settings, freeze_settings=True))
    try:
        with TestClient(create_api_app(services)) as client:
            assert client.post("/sdapi/v1/options", json={"eta_ddim": 0.5}).status_code == 200
            assert client.get("/sdapi/v1/options").json()["eta_ddim"] == 0.5
    finally:
        services.close()
    assert not settings.options_path.exists()


def test_a1111s_output_folders_in_its_settings_file_are_said_to_be_not_followed(settings, caplog):
    from webui.services import build_services

    settings.options_path.parent.mkdir(parents=True, exist_ok=True)
    settings.options_path.write_text(json.dumps({"outdir_samples": "", "outdir_txt2img_samples": "/mnt/art/txt2img",
                                                 "outdir_img2img_samples": "outputs/img2img-images"}), encoding="utf-8")
    with caplog.at_level("WARNING", logger="webui.services"):
        build_services(settings, load_model=False).close()
    said = [record.getMessage() for record in caplog.records if "output folders" in record.getMessage()]
    # A1111's defaults are no news; a folder of the user's own is
    assert len(said) == 1 and "outdir_txt2img_samples = '/mnt/art/txt2img'" in said[0]
    assert "outdir_img2img_samples" not in said[0] and str(settings.outdir) in said[0]


def test_a_remembered_model_no_longer_in_the_models_folder_is_never_fetched_and_the_start_goes_on(
        settings, models_dir, tmp_path, monkeypatch, caplog):
    """"SD15/gone" looks like a hub id: a start must not download it (nor start with no model)."""
    import dataclasses

    from webui.engine import hub
    from webui.services import build_services

    def no_download(*args, **kwargs):
        raise AssertionError("a remembered model was fetched from the hub")

    monkeypatch.setattr(hub, "download", no_download)
    own_models = tmp_path / "models"
    own_models.mkdir()
    (own_models / "tiny-a").symlink_to(models_dir / "tiny-sd", target_is_directory=True)
    settings.options_path.parent.mkdir(parents=True, exist_ok=True)
    settings.options_path.write_text(json.dumps({"sd_model_checkpoint": "SD15/gone [0123456789]"}), encoding="utf-8")
    with caplog.at_level("WARNING", logger="webui.services"):
        services = build_services(dataclasses.replace(settings, models_dir=own_models, ckpt="tiny-a",
                                                      ckpt_from_options=True))
    try:
        assert services.engine.model.entry.name == "tiny-a"
        said = " ".join(record.getMessage() for record in caplog.records)
        assert "the model loaded last (sd_model_checkpoint in" in said and "loading tiny-a instead" in said
    finally:
        services.close()
    # the stand-in is no one's pick: the remembered model stays for a start that finds it again (a drive mounted
    # late; found by a probe: it was written over)
    remembered = json.loads(settings.options_path.read_text(encoding="utf-8"))["sd_model_checkpoint"]
    assert remembered == "SD15/gone [0123456789]"


def test_a_single_file_model_is_remembered_by_its_file_name_as_a1111_writes_it(models_dir, tmp_path):
    from webui.engine.models import ModelRegistry

    (tmp_path / "models" / "SD15").mkdir(parents=True)
    (tmp_path / "models" / "SD15" / "dream.safetensors").write_bytes(b"not read here")
    (tmp_path / "models" / "tiny-a").symlink_to(models_dir / "tiny-sd", target_is_directory=True)
    registry = ModelRegistry(tmp_path / "models", hash_cache=tmp_path / "hashes.json")
    single, folder = registry.find("SD15/dream"), registry.find("tiny-a")
    assert registry.lasting_name(single) == "SD15/dream.safetensors"  # A1111's title (with its hash once known)
    assert registry.find(registry.lasting_name(single)) == single
    assert registry.lasting_name(folder) == "tiny-a"
    assert registry.lasting_name(registry.find("org/some-model")) is None  # a hub id: not the folder's


def test_options_the_settings_file_cannot_keep_still_apply(settings, monkeypatch, caplog):
    """A read-only A1111 config.json (a Docker :ro mount): POST /options answered 500 on every call."""
    from webui.services import build_services

    services = build_services(settings, load_model=False)
    monkeypatch.setattr(OptionsStore, "_write", raising(OSError("read-only")))
    try:
        with TestClient(create_api_app(services)) as client, caplog.at_level("WARNING"):
            reply = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
            assert reply.status_code == 200, reply.text
            assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        assert any("not kept for the next start: read-only" in record.getMessage() for record in caplog.records)
    finally:
        services.close()


def test_a_settings_file_that_cannot_be_written_is_named_not_its_temporary_copy(tmp_path, monkeypatch):
    """An immutable or read-only config.json: the message named the .config-*.json beside it."""
    path = tmp_path / "config.json"
    store = OptionsStore(path)

    def refused(source, target):
        raise PermissionError(1, "Operation not permitted", str(source), None, str(target))

    monkeypatch.setattr("webui.storage.options.os.replace", refused)
    with pytest.raises(OSError) as raised:
        store.update({"jpeg_quality": 90})
    assert str(raised.value) == f"the settings file {path} cannot be written (Operation not permitted)"
    assert store.current().jpeg_quality == 80 and list(tmp_path.iterdir()) == []
