"""A1111's settings "Save a copy of image before applying highres fix / doing face restoration / applying color
correction": each saved picture also saved as it stood before that step, named <its name>-before-<step>, with its
infotext, numbered before it, and not in the history; and "For inpainting, save a copy of the greyscale mask / a
masked composite", "Save init images when using img2img"."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import finished_job, noise_picture, running_services
from webui.engine.color_correction import match_colors

QUICK = {"prompt": "a red apple", "steps": 2, "seed": 7, "width": 64, "height": 64}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "Latent"}


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("copies") / "outputs")


@pytest.fixture
def inverting_faces(services, monkeypatch):
    """The face restorer is a stand-in that inverts the whole picture (no weights here)."""
    stand_in = SimpleNamespace(check=lambda name: None,
                               restore=lambda picture, restorer, weight, device: ImageOps.invert(picture))
    monkeypatch.setattr(services.engine, "faces", stand_in)


def saved_files(services) -> set:
    """The pictures saved so far (grids left out)."""
    return {path for path in services.outputs.outdir.rglob("*.png") if not path.name.startswith("grid-")}


def new_files(services, before: set) -> list:
    return sorted(saved_files(services) - before, key=lambda path: path.name)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


def test_the_first_pass_is_saved_before_the_hires_fix_with_the_infotext_and_kept_out_of_the_history(services):
    first_pass = finished_job(services, QUICK | {"save_images": False}).images[0]
    before = saved_files(services)
    job = finished_job(services, QUICK | HIRES | {"save_images_before_highres_fix": True})
    copy, final = new_files(services, before)
    assert copy.name.endswith(f"-{QUICK['seed']}-before-highres-fix.png") and final.name.endswith(f"-{QUICK['seed']}.png")
    assert int(copy.name[:5]) + 1 == int(final.name[:5])  # numbered before the picture, as A1111 saves it
    with Image.open(copy) as saved:
        assert saved.size == (64, 64) and saved.info["parameters"] == job.images[0].infotext
        assert (pixels(saved) == pixels(first_pass.image)).all()  # the first pass, as a run without the fix makes it
    assert Image.open(final).size == (96, 96)
    assert [image.path for image in job.images] == [str(final)]
    rows, _ = services.history.list_images(page_size=1000)
    paths = {str(row.path) for row in rows}
    assert str(final.relative_to(services.outputs.outdir)) in paths
    assert str(copy.relative_to(services.outputs.outdir)) not in paths


def test_no_copy_by_default_nor_where_the_step_does_not_run(services):
    before = saved_files(services)
    finished_job(services, QUICK | HIRES)  # the setting off (its default)
    finished_job(services, QUICK | {"save_images_before_highres_fix": True})  # no hires fix
    finished_job(services, QUICK | HIRES | {"save_images_before_highres_fix": True, "save_images": False})
    assert [path.name.endswith(f"-{QUICK['seed']}.png") for path in new_files(services, before)] == [True, True]


def test_the_picture_is_saved_before_face_restoration(services, inverting_faces):
    before = saved_files(services)
    job = finished_job(services, QUICK | {"restore_faces": True, "save_images_before_face_restoration": True})
    copy, final = new_files(services, before)
    assert copy.name.endswith("-before-face-restoration.png")
    with Image.open(copy) as saved, Image.open(final) as restored:
        assert (pixels(ImageOps.invert(saved.convert("RGB"))) == pixels(restored)).all()
        assert saved.info["parameters"] == job.images[0].infotext and "Face restoration: " in saved.info["parameters"]


def test_img2img_saves_the_picture_before_colour_correction(services):
    start = noise_picture(3)
    before = saved_files(services)
    finished_job(services, QUICK | {"denoising_strength": 0.6, "color_correction": True,
                                    "save_images_before_color_correction": True}, init_image=start)
    copy, final = new_files(services, before)
    assert copy.name.endswith("-before-color-correction.png")
    with Image.open(copy) as saved, Image.open(final) as corrected:
        assert (pixels(match_colors(saved.convert("RGB"), start)) == pixels(corrected)).all()
        assert (pixels(saved) != pixels(corrected)).any()


def test_each_step_asked_for_leaves_its_copy_in_the_order_the_steps_run(services, inverting_faces):
    before = saved_files(services)
    finished_job(services, QUICK | HIRES | {"batch_size": 2, "restore_faces": True,
                                            "save_images_before_highres_fix": True,
                                            "save_images_before_face_restoration": True})
    names = [path.name[6:] for path in new_files(services, before)]  # without the number
    assert names == ["7-before-highres-fix.png", "7-before-face-restoration.png", "7.png",
                     "8-before-highres-fix.png", "8-before-face-restoration.png", "8.png"]


def test_the_settings_tab_and_override_settings_ask_for_copies(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    before = saved_files(services)
    services.options.update({"save_images_before_highres_fix": True})
    try:
        finished_job(services, QUICK | HIRES)
    finally:
        services.options.update({"save_images_before_highres_fix": False})
    with TestClient(create_api_app(services)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=QUICK | HIRES | {
            "save_images": True, "override_settings": {"save_images_before_highres_fix": True}})
        refused = client.post("/sdapi/v1/txt2img", json=QUICK | {
            "override_settings": {"save_images_before_highres_fix": "sometimes"}})
    assert answer.status_code == 200, answer.text
    assert len(json.loads(answer.json()["info"])["infotexts"]) == 1  # the copy is saved, not answered
    assert [path.name.endswith("-before-highres-fix.png") for path in new_files(services, before)] == [
        True, False, True, False]
    assert refused.status_code == 422 and "override_settings.save_images_before_highres_fix" in refused.text


def test_a_copy_that_cannot_be_written_is_a_warning_and_the_picture_is_still_saved(services, monkeypatch):
    save_image = services.outputs.save_image

    def no_copies(*args, suffix: str = "", **kwargs):
        if suffix:
            raise OSError("disk full")
        return save_image(*args, **kwargs)

    monkeypatch.setattr(services.outputs, "save_image", no_copies)
    job = finished_job(services, QUICK | HIRES | {"save_images_before_highres_fix": True})
    assert job.images[0].path is not None
    assert any("'s copy before highres fix was not saved" in warning and "disk full" in warning
               for warning in job.warnings)


def test_a_picture_the_safety_checker_blacks_out_leaves_no_copy(services, monkeypatch):
    monkeypatch.setattr(services.engine, "check_safety",
                        lambda pictures: ([Image.new("RGB", p.size) for p in pictures], [True] * len(pictures)))
    before = saved_files(services)
    finished_job(services, QUICK | HIRES | {"save_images_before_highres_fix": True})
    [final] = new_files(services, before)
    assert not pixels(Image.open(final)).any()  # the blacked-out picture alone


# --- A1111's "For inpainting, save a copy of the greyscale mask / a masked composite", "Save init images" -------------

def left_half_mask() -> Image.Image:
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    return mask


def test_inpainting_saves_the_mask_and_the_masked_composite_after_the_picture(services):
    start, mask = noise_picture(4), left_half_mask()
    before = saved_files(services)
    job = finished_job(services, QUICK | {"denoising_strength": 0.7, "mask_blur": 0, "save_mask": True,
                                          "save_mask_composite": True}, init_image=start, mask=mask)
    final, saved_mask, composite = new_files(services, before)
    assert saved_mask.name.endswith("-7-mask.png") and composite.name.endswith("-7-mask-composite.png")
    assert int(final.name[:5]) + 1 == int(saved_mask.name[:5])  # numbered after the picture, as A1111 saves them
    with Image.open(saved_mask) as grey, Image.open(composite) as shown, Image.open(final) as picture:
        assert grey.mode == "RGB" and (pixels(grey)[..., 0] == np.asarray(mask)).all()
        assert shown.mode == "RGBA" and grey.info["parameters"] == job.images[0].infotext
        alpha = np.asarray(shown)[..., 3]
        assert (alpha[:, :32] == 255).all() and (alpha[:, 32:] == 0).all()  # the drawn half alone
        assert (np.asarray(shown)[:, :32, :3] == np.asarray(picture)[:, :32]).all()


def test_no_mask_is_saved_without_the_settings_nor_for_plain_img2img(services):
    before = saved_files(services)
    finished_job(services, QUICK | {"denoising_strength": 0.7}, init_image=noise_picture(4), mask=left_half_mask())
    finished_job(services, QUICK | {"denoising_strength": 0.7, "save_mask": True}, init_image=noise_picture(4))
    assert [path.name.endswith("-7.png") for path in new_files(services, before)] == [True, True]


def test_the_init_image_is_saved_once_by_its_hash(services):
    import hashlib

    start = noise_picture(12)
    folder = services.outputs.outdir / "init-images"
    for _ in range(2):
        finished_job(services, QUICK | {"denoising_strength": 0.5, "save_init_img": True, "batch_size": 2},
                     init_image=start)
    [saved] = folder.glob("*.png")
    assert saved.name == hashlib.md5(start.tobytes()).hexdigest() + ".png"
    assert (pixels(Image.open(saved)) == pixels(start)).all()
    inpainted = noise_picture(13)
    finished_job(services, QUICK | {"denoising_strength": 0.5, "save_init_img": True, "inpaint_full_res": True},
                 init_image=inpainted, mask=left_half_mask())
    assert (folder / (hashlib.md5(inpainted.tobytes()).hexdigest() + ".png")).exists()  # the whole picture
