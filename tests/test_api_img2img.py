"""POST /sdapi/v1/img2img (and /api/v1/jobs/img2img) in-process, against the tiny model: a real run from a
picture, where its files go, that the picture matters, and each refusal (422 naming the field, nothing queued)."""
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from webui.api import create_api_app
from webui.schemas import JobState
from webui.storage.outputs import read_infotext
from tests.helpers import noise_picture as picture, running_services, wait_for

QUICK = {"prompt": "a red apple", "steps": 2, "seed": 5, "denoising_strength": 0.5}


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def pixels(data: str) -> np.ndarray:
    return np.asarray(png(data).convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("img2img-api-out"))


@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_api_app(services)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def first_init():
    return b64(picture(1, 72, 64))


@pytest.fixture(scope="module")
def first_run(client, first_init):
    """One img2img call from a 72x64 picture (not the model's native 64x64), shared by the tests that read it."""
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [first_init]})
    assert r.status_code == 200, r.text
    return r.json()


def test_img2img_makes_an_image_of_the_init_images_size_with_its_denoising_strength(first_run):
    info = json.loads(first_run["info"])
    assert len(first_run["images"]) == 1
    image = png(first_run["images"][0])
    assert image.size == (72, 64) and (info["width"], info["height"]) == (72, 64)
    assert read_infotext(image) == info["infotexts"][0]
    assert "Denoising strength: 0.5" in info["infotexts"][0] and "Size: 72x64" in info["infotexts"][0]
    assert info["denoising_strength"] == 0.5 and info["seed"] == 5
    # The request is echoed, but not its multi-MB init image (asked back with include_init_images).
    assert first_run["parameters"]["init_images"] is None
    assert first_run["parameters"]["denoising_strength"] == 0.5 and first_run["parameters"]["prompt"] == "a red apple"


def test_txt2img_info_keeps_no_denoising_strength(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] is None and "Denoising strength" not in info["infotexts"][0]


def test_include_init_images_echoes_them(client, first_init):
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [first_init], "include_init_images": True,
                                                        "send_images": False})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["init_images"] == [first_init] and r.json()["images"] == []


def test_the_init_image_decides_the_pixels(client, services, first_run, first_init):
    """Same seed and settings: another picture gives another image, the same picture the same one, and the
    worker given the picture directly gives it too (a data: URL, or a JPEG, is read as well)."""
    # At a low strength (the tiny model's random VAE gives latents of little weight against the noise).
    low = QUICK | {"denoising_strength": 0.0, "steps": 10}
    runs = [client.post("/sdapi/v1/img2img", json=low | {"init_images": [b64(start)]})
            for start in (picture(1, 72, 64), Image.new("RGB", (72, 64), "red"))]
    assert all(run.status_code == 200 for run in runs), runs[0].text
    assert np.abs(pixels(runs[0].json()["images"][0]) - pixels(runs[1].json()["images"][0])).mean() > 1
    first = pixels(first_run["images"][0])
    again = client.post("/sdapi/v1/img2img",
                        json=QUICK | {"init_images": [f"data:image/png;base64,{first_init}"]})
    assert again.status_code == 200, again.text
    assert np.array_equal(first, pixels(again.json()["images"][0]))
    job = services.worker.submit(QUICK | {"sampler_name": "Euler"}, init_image=picture(1, 72, 64))  # the API's default
    assert job.wait(60) and job.state is JobState.DONE
    assert np.array_equal(first, np.asarray(job.images[0].image.convert("RGB"), np.int16))


def test_the_lowest_strength_that_runs_a_step(client):
    # 3 steps x 0.34 runs one step; 3 x 0.3 would run none (refused below).
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"steps": 3, "denoising_strength": 0.34,
                                                        "init_images": [b64(picture(3))]})
    assert r.status_code == 200, r.text
    assert "Denoising strength: 0.34" in json.loads(r.json()["info"])["infotexts"][0]


def test_saved_img2img_images_go_to_img2img_images(client, services):
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(picture(4))], "save_images": True,
                                                        "width": 64, "height": 64, "resize_mode": 1})
    assert r.status_code == 200, r.text
    job_id = json.loads(r.json()["info"])["job_id"]
    rows, _ = services.history.list_images(search="a red apple")
    paths = [Path(row.path) for row in rows if row.job_id == job_id]
    assert len(paths) == 1
    saved = services.outputs.resolve(paths[0])
    assert saved.parent.parent.name == "img2img-images" and saved.is_file()
    assert "Denoising strength: 0.5" in read_infotext(Image.open(saved))
    assert services.worker.get(job_id).request.resize_mode == 1


def test_a_pasted_infotext_gives_the_denoising_strength_not_sent(client):
    infotext = "a pear\nSteps: 2, Sampler: Euler, Seed: 9, Size: 64x64, Denoising strength: 0.9"
    r = client.post("/sdapi/v1/img2img", json={"infotext": infotext, "init_images": [b64(picture(8))]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["denoising_strength"], info["seed"], info["prompt"]) == (0.9, 9, "a pear")
    r = client.post("/sdapi/v1/img2img", json={"infotext": infotext, "init_images": [b64(picture(8))],
                                               "denoising_strength": 0.6})
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.6


def test_a_picture_the_worker_cannot_read_is_named_as_the_client_sent_it(client, monkeypatch):
    import webui.worker

    def unreadable(image, *background):
        raise OSError("image file is truncated")

    monkeypatch.setattr(webui.worker, "as_rgb", unreadable)
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(picture(9))]})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images[0]: the picture cannot be read"), r.text


def test_the_per_job_route_queues_img2img(client, services):
    r = client.post("/api/v1/jobs/img2img", json=QUICK | {"init_images": [b64(picture(5))]})
    assert r.status_code == 202, r.text
    job = services.worker.get(r.json()["id"])
    assert job.wait(60) and job.kind == "img2img"
    status = client.get(f"/api/v1/jobs/{job.id}").json()
    assert status["state"] == "done" and json.loads(status["result"]["info"])["denoising_strength"] == 0.5
    r = client.post("/api/v1/jobs/img2img", json=QUICK)
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images: "), r.text


def test_nulls_take_a1111s_defaults(client, services):
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(picture(10))], "denoising_strength": None,
                                                        "resize_mode": None})
    assert r.status_code == 200, r.text
    job = services.worker.get(json.loads(r.json()["info"])["job_id"])
    assert (job.request.denoising_strength, job.request.resize_mode) == (0.75, 0)


def test_progress_names_a_running_img2img_job_and_counts_the_steps_it_runs(client, services):
    r = client.post("/api/v1/jobs/img2img", json=QUICK | {"init_images": [b64(picture(11))], "steps": 150})
    job = services.worker.get(r.json()["id"])
    try:
        wait_for(lambda: job.progress.step >= 1, what="the img2img job's first step")
        state = client.get("/sdapi/v1/progress").json()["state"]
        assert state["job"] == "scripts_img2img" and state["sampling_steps"] == 76  # int(150 steps x 0.5) + 1, as A1111 runs
    finally:
        services.worker.cancel(job.id)
        job.wait(30)


def _refusals() -> dict[str, tuple[dict, str]]:
    one = b64(picture(6))
    not_an_image = base64.b64encode(b"this is text, not a picture").decode()
    huge = b64(Image.new("1", (12000, 12000)))  # a small file of many pixels: refused before they are read
    return {
        "no image": ({"init_images": []}, "init_images: send one base64 image"),
        "no init_images at all": ({}, "init_images: send one base64 image"),
        "two images": ({"init_images": [one, one]}, "init_images: only one image is supported, got 2"),
        "not base64": ({"init_images": ["not base64 at all!"]}, "init_images[0]: not valid base64"),
        "base64 of a non-image": ({"init_images": [not_an_image]}, "init_images[0]: the base64 data is not an image"),
        "a blank mask": ({"init_images": [one], "mask": b64(Image.new("L", (64, 64)))}, "mask: the mask is empty"),
        "a mask that is no image": ({"init_images": [one], "mask": not_an_image}, "mask: the base64 data is not an image"),
        "an unrounded mask": ({"init_images": [one], "mask": one, "mask_round": False}, "mask_round: "),
        "blur across and down differ": ({"init_images": [one], "mask": one, "mask_blur_x": 2}, "mask_blur_x: "),
        "masked content 5": ({"init_images": [one], "mask": one, "inpainting_fill": 5}, "inpainting_fill: "),
        "latent upscale with a mask": ({"init_images": [one], "mask": one, "resize_mode": 3, "inpaint_full_res": False},
                                       "resize_mode: Just resize (latent upscale) does not go with a mask"),
        "resize mode 7": ({"init_images": [one], "resize_mode": 7}, "resize_mode: "),
        "strength above 1": ({"init_images": [one], "denoising_strength": 1.5}, "denoising_strength: "),
        "a picture of 144 megapixels": ({"init_images": [huge]}, "init_images[0]: the picture is 12000x12000"),
        "noise multiplier above 1.5": ({"init_images": [one], "initial_noise_multiplier": 2}, "initial_noise_multiplier: "),
        "noise multiplier override of a word": ({"init_images": [one], "override_settings": {
            "initial_noise_multiplier": "lots"}}, "override_settings.initial_noise_multiplier: "),
        "an unknown script": ({"init_images": [one], "script_name": "Outpainting mk2"},
                              "script_name: there is no img2img script 'Outpainting mk2'"),
        "SD upscale with an ESRGAN": ({"init_images": [one], "script_name": "SD upscale",
                                       "script_args": [None, 64, 5, 2]}, "script_args[2] (upscaler): no upscaler 5"),
        "SD upscale overlap of a word": ({"init_images": [one], "script_name": "sd upscale",
                                          "script_args": ["", "wide"]}, "script_args[1] (tile overlap): expected a "
                                                                        "number"),
        "SD upscale scale 9": ({"init_images": [one], "script_name": "sd upscale", "script_args": ["", 8, 0, 9]},
                               "script_args[3] (scale factor): "),
        "SD upscale overlap of true": ({"init_images": [one], "script_name": "sd upscale", "script_args": [0, True]},
                                       "script_args[1] (tile overlap): expected a number, got True"),
        "SD upscale overlap of 64.5": ({"init_images": [one], "script_name": "sd upscale",
                                        "script_args": [0, "64.5"]}, "script_args[1] (tile overlap): expected a whole "
                                                                     "number"),
        "SD upscale with tiling": ({"init_images": [one], "script_name": "sd upscale", "tiling": True},
                                   "tiling: SD upscale draws the picture in tiles"),
        "SD upscale with a mask": ({"init_images": [one], "mask": one, "script_name": "sd upscale"},
                                   "SD upscale draws the whole picture again"),
        "SD upscale tile larger than the picture": ({"init_images": [one], "script_name": "sd upscale", "width": 256,
                                                     "height": 256}, "SD upscale: the upscaled picture (128x128) is "
                                                                     "smaller than a tile"),
    }


REFUSALS = _refusals()


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_field_and_queue_nothing(client, services, monkeypatch, case):
    body, detail = REFUSALS[case]
    submitted = []
    submit = services.worker.submit
    monkeypatch.setattr(services.worker, "submit", lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1])
    r = client.post("/sdapi/v1/img2img", json=QUICK | body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InvalidRequest" and r.json()["detail"].startswith(detail), r.json()
    assert submitted == []


def test_the_worker_runs_on_after_the_refusals(client, services):
    for body, _ in REFUSALS.values():
        assert client.post("/sdapi/v1/img2img", json=QUICK | body).status_code == 422
    assert services.worker.alive
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(picture(7), "JPEG")]})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_inpainting_keeps_the_picture_outside_the_mask_and_returns_it_whole(client):
    """A1111's API defaults: only the masked part (no padding) drawn at width x height, filled first."""
    init = picture(8, 96, 64)
    mask = Image.new("L", (96, 64))
    mask.paste(255, (60, 20, 90, 50))
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(init)], "mask": b64(mask), "width": 64,
                                                       "height": 64})
    assert r.status_code == 200, r.text
    result, info = pixels(r.json()["images"][0]), json.loads(r.json()["info"])
    assert result.shape == (64, 96, 3)
    assert (result[:, :50] == np.asarray(init, np.int16)[:, :50]).all()  # beyond the mask's blurred edge: the picture
    assert np.abs(result[25:45, 65:85] - np.asarray(init, np.int16)[25:45, 65:85]).mean() > 5
    assert ("Mask blur: 4, Masked content: fill, Inpaint area: Only masked, Masked area padding: 0"
            in info["infotexts"][0]), info["infotexts"][0]
    assert r.json()["parameters"]["mask"] is None  # not echoed, as the init image
    # As in A1111, a pasted infotext sets no inpainting field: the API's defaults stand.
    pasted = "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Mask blur: 8, Masked content: original"
    r = client.post("/sdapi/v1/img2img", json=QUICK | {"init_images": [b64(init)], "mask": b64(mask), "width": 64,
                                                       "height": 64, "infotext": pasted})
    assert "Mask blur: 4, Masked content: fill, Inpaint area: Only masked" in json.loads(r.json()["info"])["infotexts"][0]


def test_override_settings_can_leave_the_original_off_an_inpainting(client):
    init = picture(8, 64, 64)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    body = QUICK | {"init_images": [b64(init)], "mask": b64(mask), "inpaint_full_res": False, "mask_blur": 0}
    laid = pixels(client.post("/sdapi/v1/img2img", json=body).json()["images"][0])
    assert (laid[:, :28] == np.asarray(init, np.int16)[:, :28]).all()
    r = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"overlay_inpaint": False}})
    assert r.status_code == 200, r.text
    assert not (pixels(r.json()["images"][0])[:, :28] == np.asarray(init, np.int16)[:, :28]).all()
    refused = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"overlay_inpaint": "maybe"}})
    assert refused.status_code == 422 and "override_settings.overlay_inpaint" in refused.text


def test_override_settings_names_the_upscaler_for_img2img(client):
    body = QUICK | {"init_images": [b64(picture(3, 32, 32))], "width": 64, "height": 64}
    nearest = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"upscaler_for_img2img": "Nearest"}})
    assert nearest.status_code == 200, nearest.text
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert (pixels(nearest.json()["images"][0]) != pixels(plain.json()["images"][0])).any()
    refused = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"upscaler_for_img2img": "4x-None"}})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("override_settings.upscaler_for_img2img:")
    # POST /options: A1111's null is none; a name this server lacks is refused, nothing saved
    assert client.post("/sdapi/v1/options", json={"upscaler_for_img2img": "Nearest"}).status_code == 200
    unknown = client.post("/sdapi/v1/options", json={"upscaler_for_img2img": "4x-None"})
    assert unknown.status_code == 422 and unknown.json()["detail"].startswith("upscaler_for_img2img:")
    assert client.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "Nearest"
    nulled = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"upscaler_for_img2img": None}})
    assert (pixels(nulled.json()["images"][0]) == pixels(plain.json()["images"][0])).all()  # null: none, as A1111
    assert client.post("/sdapi/v1/options", json={"upscaler_for_img2img": None}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "None"


def test_override_settings_gives_the_fill_colour_of_a_transparent_start(client):
    body = QUICK | {"init_images": [b64(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))]}
    blue = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_background_color": "#0000ff"}})
    assert blue.status_code == 200, blue.text
    white = client.post("/sdapi/v1/img2img", json=body)
    assert (pixels(blue.json()["images"][0]) != pixels(white.json()["images"][0])).any()  # another start picture
    refused = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_background_color": "blue"}})
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("override_settings.img2img_background_color:")


def test_docs_list_img2img_with_its_request_model(client):
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert "Img2ImgRequest" in json.dumps(paths["/sdapi/v1/img2img"])
    assert "Img2ImgRequest" in json.dumps(paths["/api/v1/jobs/img2img"])
    assert "501" not in paths["/sdapi/v1/img2img"]["post"]["responses"]


def test_sd_upscale_returns_the_picture_enlarged_and_drawn_again_in_tiles(client, services):
    r = client.post("/sdapi/v1/img2img", json=QUICK | {
        "init_images": [b64(picture(8, 80, 64))], "width": 64, "height": 64, "save_images": True, "n_iter": 2,
        "script_name": "SD upscale", "script_args": [None, "16", 2.0, 1.5]})  # Nearest, by its place in A1111's list
    assert r.status_code == 200, r.text
    images, info = r.json()["images"], json.loads(r.json()["info"])
    assert [png(image).size for image in images] == [(120, 96)] * 2  # one per batch count, no grid
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6]
    assert "SD upscale overlap: 16, SD upscale upscaler: Nearest" in info["infotexts"][0]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # the second starts from seed 6


def test_a_script_argument_of_infinity_is_refused_not_a_server_error(client):
    body = json.dumps(QUICK | {"init_images": [b64(picture(6))], "script_name": "sd upscale"})
    body = body[:-1] + ', "script_args": [null, Infinity, 1, 2]}'  # Python's JSON reader takes Infinity
    r = client.post("/sdapi/v1/img2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "script_args[1] (tile overlap): expected a number" in r.json()["detail"], r.text


def damaged_exif_jpeg(image: Image.Image) -> bytes:
    """A JPEG whose first segment is an EXIF block that is not one (PIL reports it as a SyntaxError)."""
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return b"\xff\xd8" + b"\xff\xe1\x00\x10Exif\x00\x00" + b"\xff" * 8 + out.getvalue()[2:]


def test_a_picture_whose_exif_cannot_be_read_is_used_as_it_is(client):
    from webui.engine.img2img import as_rgb, upright_size

    raw = damaged_exif_jpeg(picture(8))
    with Image.open(io.BytesIO(raw)) as opened:
        assert as_rgb(opened).size == (64, 64) and upright_size(opened) == (64, 64)
    data = base64.b64encode(raw).decode()
    # Only masked (the API's default area) draws at width x height, 512 unless given: 64 keeps it quick.
    body = {"prompt": "x", "steps": 2, "seed": 1, "denoising_strength": 0.5, "init_images": [data], "mask": data,
            "width": 64, "height": 64}
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    assert png(answer.json()["images"][0]).size == (64, 64)


def test_a_picture_too_large_to_open_is_refused_as_too_large(client):
    header = io.BytesIO()
    Image.new("1", (20000, 20000)).save(header, format="PNG")  # small as a file, 400 megapixels as a picture
    answer = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2,
                                                    "init_images": [base64.b64encode(header.getvalue()).decode()]})
    assert answer.status_code == 422 and "init_images[0]: the picture is too large to read" in answer.text
    assert "at most 4096x4096" in answer.text
