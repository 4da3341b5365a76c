"""The REST API in-process: each route's happy path and its errors, against a tiny model.

One set of services serves the whole module (building it loads a model), so tests that change
shared state (the loaded model, the queue limit) put it back before they end.
"""
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.api import attach_api, create_api_app
from webui.engine.models import ModelEntry, ModelRegistry
from webui.schemas import JobState
from webui.storage.outputs import read_infotext
from tests.helpers import running_services, wait_for
from tests.tiny_sd import TEXT_LAYERS

TINY = "tiny-sd"
QUICK = {"prompt": "a red apple", "steps": 2, "seed": 1, "width": 64, "height": 64}
LONG = QUICK | {"steps": 150}  # never runs to the end: each test that starts one stops it




def step_of_running_job(services) -> int:
    job = services.worker.current()
    return job.progress.step if job is not None else 0


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def services(models_dir, tmp_path_factory):
    own_models = tmp_path_factory.mktemp("api-models")
    shutil.copytree(models_dir / TINY, own_models / TINY)
    yield from running_services(own_models, tmp_path_factory.mktemp("api-out"), preview_every=1)


@pytest.fixture(scope="module")
def client(services):
    with TestClient(create_api_app(services)) as test_client:
        yield test_client


@pytest.fixture
def running(services, client):
    """Start a long API job and wait until it is denoising; cancel whatever is left afterwards."""
    started = []

    def start(body=LONG):
        job_id = client.post("/api/v1/jobs", json=body).json()["id"]
        job = services.worker.get(job_id)
        wait_for(lambda: job.progress.step >= 1)
        started.append(job)
        return job

    yield start
    for job in started:
        services.worker.cancel(job.id)
        job.wait(30)


# --- txt2img ----------------------------------------------------------------------------------
def test_txt2img_returns_pngs_carrying_their_infotext_and_a1111_info(client, services):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 7, "batch_size": 2, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and len(info["infotexts"]) == 2
    assert (info["width"], info["height"], info["sd_model_name"]) == (64, 64, TINY)
    assert len(body["images"]) == 2 and info["index_of_first_image"] == 0
    for b64, infotext in zip(body["images"], info["infotexts"]):
        image = png(b64)
        assert image.size == (64, 64) and read_infotext(image) == infotext
    assert info["infotexts"][1].startswith("a red apple\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, "
                                           "CFG scale: 7, Seed: 8, Size: 64x64")
    assert body["parameters"]["prompt"] == "a red apple" and body["parameters"]["save_images"] is False
    # API calls do not save by default: the job is in the history, its images are not.
    assert services.history.get_job(info["job_id"])["origin"] == "api"
    assert services.history.list_images()[1] == 0


def test_same_seed_gives_the_same_image_through_the_api_and_the_worker(client, services):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 123, "sampler_name": "DPM++ 2M Karras"})
    assert r.status_code == 200, r.text
    job = services.worker.submit(QUICK | {"seed": 123, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert job.wait(60) and job.state is JobState.DONE
    from_api = np.asarray(png(r.json()["images"][0]).convert("RGB"))
    assert np.array_equal(from_api, np.asarray(job.images[0].image.convert("RGB")))
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in json.loads(r.json()["info"])["infotexts"][0]


def test_tiling_is_taken_and_written_into_the_infotext(client):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 5, "tiling": True})
    assert r.status_code == 200, r.text[:300]
    assert ", Tiling: True," in json.loads(r.json()["info"])["infotexts"][0]


def test_a_pasted_infotext_brings_its_seed_resize_and_tiling_back_and_makes_the_same_picture(client):
    made = client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 5, "tiling": True, "seed_resize_from_w": 80,
                                                          "seed_resize_from_h": 64})
    assert made.status_code == 200, made.text[:300]
    text = json.loads(made.json()["info"])["infotexts"][0]
    assert "Tiling: True" in text and "Seed resize from: 80x64" in text
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert json.loads(again.json()["info"])["infotexts"][0] == text
    assert np.array_equal(np.asarray(png(again.json()["images"][0])), np.asarray(png(made.json()["images"][0])))
    # a body's own fields win over the infotext's
    one_side = client.post("/sdapi/v1/txt2img", json={"infotext": text, "seed_resize_from_w": 256})
    assert one_side.status_code == 200, one_side.text  # the pair is the body's then (one side alone: off)
    assert "Seed resize from" not in json.loads(one_side.json()["info"])["infotexts"][0]
    # A1111's paste fields take the batch size too (the picture pasted is the first of that batch)
    batch_text = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | {"batch_size": 2}).json()["info"])[
        "infotexts"][0]
    assert "Batch size: 2" in batch_text
    pasted = json.loads(client.post("/sdapi/v1/txt2img", json={"infotext": batch_text}).json()["info"])
    assert pasted["batch_size"] == 2 and pasted["infotexts"][0] == batch_text
    assert json.loads(client.post("/sdapi/v1/txt2img", json={"infotext": batch_text, "batch_size": 1}).json()[
        "info"])["batch_size"] == 1  # the body's own wins
    plain = client.post("/sdapi/v1/txt2img", json={"infotext": text, "tiling": False, "seed_resize_from_w": -1,
                                                      "seed_resize_from_h": -1})
    plain_text = json.loads(plain.json()["info"])["infotexts"][0]
    assert "Tiling" not in plain_text and "Seed resize from" not in plain_text


def test_saved_api_images_go_to_the_history_with_the_grid_returned_first(client, services):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"batch_size": 2, "save_images": True, "seed": 30})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 3 and info["index_of_first_image"] == 1
    assert png(r.json()["images"][0]).size == (128, 64)  # the 2x1 grid
    rows, _ = services.history.list_images(search="a red apple")
    assert sorted(row.seed for row in rows if row.job_id == info["job_id"]) == [30, 31]
    services.options.update({"return_grid": False})  # A1111's Show grid in gallery off: saved, not returned
    try:
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"batch_size": 2, "save_images": True, "seed": 30})
    finally:
        services.options.update({"return_grid": True})
    assert len(r.json()["images"]) == 2 and json.loads(r.json()["info"])["index_of_first_image"] == 0


def test_override_settings_and_infotext_fill_the_request(client, services):
    title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    pasted = "a dog\nNegative prompt: blurry\nSteps: 9, Sampler: DDIM, CFG scale: 5, Seed: 9, Size: 64x64"
    r = client.post("/sdapi/v1/txt2img", json={
        "infotext": pasted, "steps": 2,  # a field the client sends wins over the infotext
        "override_settings": {"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 2},
    })
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert text.startswith("a dog\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, ")
    assert "CFG scale: 5, Seed: 9, Size: 64x64" in text and "Clip skip: 2" in text


@pytest.mark.parametrize("pick", [{"sampler_index": "DDIM"}, {"sampler_name": "DDIM"}])
def test_a_sampler_the_client_picks_wins_over_the_infotexts_with_its_schedule(client, pick):
    pasted = "a dog\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 2, Size: 64x64"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": pasted} | pick)
    assert r.status_code == 200, r.text  # DDIM takes no Karras schedule: the pasted one is left out too
    assert "Sampler: DDIM, Schedule type: Automatic, " in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("asked", [{"sampler_name": "Euler a", "scheduler": "karras"}, {"sampler_name": "Euler a Karras"}])
def test_euler_a_runs_on_a_karras_schedule_as_in_a1111(client, asked):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | asked)
    info = json.loads(r.json()["info"])
    assert "Sampler: Euler a, Schedule type: Karras" in info["infotexts"][0] and not info["warnings"]
    automatic = client.post("/sdapi/v1/txt2img", json=QUICK | {"sampler_name": "Euler a"}).json()["images"]
    assert r.json()["images"] != automatic


@pytest.mark.parametrize("asked, ran", [
    ({"sampler_name": "DDIM", "scheduler": "normal"}, "Sampler: DDIM, Schedule type: Automatic"),  # SillyTavern's
    ({"sampler_name": "DDIM", "scheduler": "karras"}, "Sampler: DDIM, Schedule type: Automatic"),
    ({"sampler_name": "PLMS", "scheduler": "Karras"}, "Sampler: PLMS, Schedule type: Automatic"),
    ({"sampler_name": "PLMS Karras"}, "Sampler: PLMS, Schedule type: Automatic"),  # the old combined name
    ({"sampler_name": "DDIM Karras", "scheduler": "Automatic"}, "Sampler: DDIM, Schedule type: Automatic"),
    ({"sampler_name": "LCM", "scheduler": "kl_optimal"}, "Sampler: LCM, Schedule type: Automatic"),
])
def test_a_schedule_a1111_knows_but_we_cannot_run_runs_as_automatic_and_says_so(client, services, asked, ran):
    """As A1111, which never rejects a schedule type it knows; an unknown name still gets a 422 (above)."""
    r = client.post("/sdapi/v1/txt2img", json=QUICK | asked)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert ran in info["infotexts"][0] and info["scheduler"] == ran.rpartition(": ")[2]
    sampler = asked["sampler_name"].removesuffix(" Karras")
    assert len(info["warnings"]) == 1 and info["warnings"][0].startswith(f"scheduler: {sampler} cannot follow the ")
    assert "it ran with Automatic" in info["warnings"][0]
    job_id = client.post("/api/v1/jobs", json=QUICK | asked).json()["id"]
    assert services.worker.get(job_id).wait(60)
    assert client.get(f"/api/v1/jobs/{job_id}").json()["warnings"] == info["warnings"]


@pytest.mark.parametrize("key, label", [("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
                                        ("Simple", "Simple"), ("ddim", "DDIM"), ("normal", "Normal")])
def test_a_schedule_that_runs_as_asked_brings_no_warning(client, key, label):
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"sampler_name": "DPM++ 2M", "scheduler": key})
    info = json.loads(r.json()["info"])
    assert f"Schedule type: {label}," in info["infotexts"][0] and info["warnings"] == []
    assert info["scheduler"] == label


def test_a_model_override_is_undone_after_the_job_unless_asked_to_keep_it(client, services):
    from tests.tiny_sd import save_tiny_model

    other = services.settings.models_dir / "tiny-other"
    save_tiny_model(other, seed=1)
    override = {"override_settings": {"sd_model_checkpoint": "tiny-other"}}
    try:
        r = client.post("/sdapi/v1/txt2img", json=QUICK | override)
        assert r.status_code == 200 and "Model: tiny-other" in json.loads(r.json()["info"])["infotexts"][0]
        assert services.engine.model.entry.name == TINY  # A1111's override_settings_restore_afterwards
        keep = {"override_settings_restore_afterwards": False}
        r = client.post("/sdapi/v1/txt2img", json=QUICK | override | keep)
        assert r.status_code == 200 and services.engine.model.entry.name == "tiny-other"
    finally:
        services.worker.load_model(TINY)
        shutil.rmtree(other)
        services.registry.refresh()


@pytest.mark.parametrize("body, field", [
    ({"sampler_name": "Nonexistent"}, "sampler_name"),
    ({"scheduler": "Wobbly"}, "scheduler"),
    ({"width": 500}, "width"),
    ({"steps": 0}, "steps"),
    ({"steps": 151}, "steps"),
    ({"sampler_name": "LCM", "steps": 51}, "steps"),  # diffusers' LCM fails past 50
    ({"infotext": "a" * (64 * 1024 + 1)}, "infotext"),  # more than is ever read
    ({"steps": "many"}, "steps"),
    ({"cfg_scale": 99}, "cfg_scale"),
    ({"enable_hr": True, "hr_sampler_name": "Wobbly"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),  # not in the folder
    ({"enable_hr": True, "hr_prompt": "a\u0000dog"}, "hr_prompt"),
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 40}, "hr_scale"),
    ({"enable_hr": True, "firstphase_width": 256}, "firstphase_width"),  # A1111's old hires fix
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts"),  # ControlNet is the one here
    ({"script_name": "SD upscale"}, "script_name"),  # an img2img script
    ({"script_name": "Controlnet m2m"}, "script_name"),  # not on this server
    ({"script_name": "x/y/z plot", "script_args": [40, "1, 2"]}, "script_args[0] (x type)"),  # FP8 mode
    ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"infotext": "cat\nSteps: 2, Sampler: Euler, Seed: 5, Clip skip: 50"}, "infotext (Clip skip)"),  # where it came from
])
def test_bad_txt2img_requests_get_422_naming_the_field_and_queue_nothing(client, services, body, field):
    for path in ("/sdapi/v1/txt2img", "/api/v1/jobs"):
        r = client.post(path, json=QUICK | body)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "InvalidRequest" and r.json()["detail"].startswith(f"{field}: ")
    assert services.worker.queue_length() == 0 and services.worker.current() is None


def test_the_hires_fix_runs_with_a1111s_fields_and_defaults(client):
    body = QUICK | {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": None, "hr_sampler_name": "Euler",
                    "sampler_name": "Euler", "hr_prompt": "", "hr_checkpoint_name": "Use same checkpoint"}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    with Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))) as picture:
        assert picture.size == (96, 96)
    assert info["denoising_strength"] == 0.75 and (info["width"], info["height"]) == (64, 64)  # A1111's default
    assert "Size: 64x64, Denoising strength: 0.75, Hires upscale: 1.5, Hires upscaler: Latent" in info["infotexts"][0]
    assert "Hires prompt" not in info["infotexts"][0]  # "" is the prompt


def test_the_hires_fix_takes_a1111s_hires_prompts(client):
    body = QUICK | {"enable_hr": True, "hr_scale": 1.5, "negative_prompt": "dull", "hr_prompt": "a green pear",
                    "hr_negative_prompt": "blurry, dark"}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text[:300]
    assert 'Hires prompt: a green pear, Hires negative prompt: "blurry, dark"' in json.loads(reply.json()["info"])[
        "infotexts"][0]
    # An infotext pasted into the body brings them, as the other hires settings.
    pasted = client.post("/sdapi/v1/txt2img", json=QUICK | {"infotext": "x\nSteps: 1, Sampler: Euler, Size: 64x64, "
                                                                       "Hires upscale: 1.5, Hires prompt: a dog"})
    assert pasted.status_code == 200, pasted.text[:300]
    assert "Hires prompt: a dog," in json.loads(pasted.json()["info"])["infotexts"][0]


def test_the_hires_fix_runs_its_own_sampler_and_says_so_as_a1111_does(client):
    body = QUICK | {"enable_hr": True, "hr_scale": 1.5, "sampler_name": "Euler", "seed": 3}
    plain, same, own = (client.post("/sdapi/v1/txt2img", json=body | extra).json() for extra in (
        {}, {"hr_sampler_name": "Euler", "hr_scheduler": "Use same scheduler"},
        {"hr_sampler_name": "DDIM", "hr_scheduler": "Automatic"}))
    assert same["images"] == plain["images"] and own["images"] != plain["images"]
    assert "Hires sampler" not in json.loads(same["info"])["infotexts"][0]
    text = json.loads(own["info"])["infotexts"][0]
    assert "Hires upscaler: Latent, Hires sampler: DDIM, " in text
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text, "steps": 2}).json()  # pasted back
    assert again["images"] == own["images"]


def test_a_hires_schedule_type_its_sampler_cannot_follow_runs_as_automatic_as_the_first_passs_does(client):
    body = QUICK | {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "seed": 3}
    both = client.post("/sdapi/v1/txt2img", json=body | {"hr_sampler_name": "DDIM", "hr_scheduler": "Karras"})
    assert both.status_code == 200, both.text[:300]
    assert json.loads(both.json()["info"])["warnings"] == [
        "hr_scheduler: DDIM cannot follow the Karras schedule here; it ran with Automatic"]
    alone = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "DDIM", "hr_scheduler": "Karras"})
    assert alone.status_code == 200 and "hr_scheduler: DDIM cannot follow" in alone.json()["info"]
    combined = client.post("/sdapi/v1/txt2img", json=body | {"hr_sampler_name": "DDIM Karras"})  # an old name
    assert combined.status_code == 200 and "hr_scheduler: DDIM cannot follow the Karras" in combined.json()["info"]
    automatic = client.post("/sdapi/v1/txt2img", json=body | {"hr_sampler_name": "DDIM"})
    assert automatic.json()["images"] == both.json()["images"]  # the same run
    for extra, field in (({"hr_scheduler": "Sideways"}, "hr_scheduler: "),
                         ({"hr_sampler_name": "Fast Magic", "hr_scheduler": "Karras"}, "hr_sampler_name: ")):
        refused = client.post("/sdapi/v1/txt2img", json=body | extra)
        assert refused.status_code == 422 and refused.json()["detail"].startswith(field), refused.text
        assert refused.json()["detail"].count(field) == 1, refused.text  # said once


def test_a_pasted_infotext_brings_its_hires_fix_unless_the_body_sets_one(client):
    pasted = ("a pear\nSteps: 2, Sampler: Euler, Seed: 9, Size: 64x64, Denoising strength: 0.5, Hires upscale: 1.5, "
              "Hires upscaler: Latent")
    info = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | {"infotext": pasted}).json()["info"])
    assert "Denoising strength: 0.5, Hires upscale: 1.5" in info["infotexts"][0]
    off = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | {"infotext": pasted, "enable_hr": False}).json()["info"])
    assert "Hires" not in off["infotexts"][0]


def test_variation_seeds_run_and_come_back_in_info_and_infotext(client):
    body = QUICK | {"seed": 5, "subseed": 42, "subseed_strength": 0.5, "batch_size": 2}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (42, [42, 43], 0.5)
    assert info["all_seeds"] == [5, 5]  # as A1111: variations of one picture
    assert "Seed: 5, " in info["infotexts"][1] and "Variation seed: 43, Variation seed strength: 0.5" in info["infotexts"][1]
    # At strength 0 the variation seeds are drawn and counted anyway, as A1111 reports them.
    plain = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | {"subseed": 7, "batch_size": 2}).json()["info"])
    assert plain["all_subseeds"] == [7, 8] and plain["all_seeds"] == [1, 2]
    drawn = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])
    assert 0 <= drawn["subseed"] <= 2**32 - 1
    # Pasted back through `infotext`, the variation comes with it.
    pasted = json.loads(client.post("/sdapi/v1/txt2img", json={"infotext": info["infotexts"][0]}).json()["info"])
    assert (pasted["subseed"], pasted["subseed_strength"]) == (42, 0.5)
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"subseed_strength": 2})
    assert r.status_code == 422 and r.json()["detail"].startswith("subseed_strength: "), r.text


def test_an_unknown_sampler_is_named_as_the_client_sent_it(client):
    for field in ("sampler_name", "sampler_index"):
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {field: "Fast Magic"})
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: unknown sampler 'Fast Magic'"), r.text
    pasted = "a cat\nSteps: 2, Sampler: Fast Magic, CFG scale: 7, Seed: 1, Size: 64x64"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": pasted})
    assert r.status_code == 422 and r.json()["detail"].startswith("infotext (Sampler): unknown sampler"), r.text


def test_malformed_json_and_unknown_model(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON at character 1 (")
    # not UTF-8; nested deeper than JSON is read; an integer longer than Python reads
    for unreadable in (b'{"prompt": "\xff\xfe"}', b"[" * 100_000, b'{"seed": ' + b"9" * 5000 + b"}"):
        r = client.post("/sdapi/v1/txt2img", content=unreadable, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (400, "InvalidRequest"), r.text
        assert r.json()["detail"].startswith("body: cannot be read as JSON") and "UTF-8" in r.json()["detail"]
        assert "thousands of digits" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_model_checkpoint": "nope"}})
    assert r.status_code == 404
    assert r.json()["detail"].startswith("override_settings.sd_model_checkpoint: model 'nope' not found")


def test_a_json_body_sent_as_a_form_is_told_to_send_the_json_content_type(client):
    """curl -d sends the JSON as a form (application/x-www-form-urlencoded), which FastAPI does not read: its
    message named no fix. Found by a probe."""
    r = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "a"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/txt2img", json=["a list"])  # JSON, only not an object: no such advice
    assert r.status_code == 422 and "Content-Type" not in r.json()["detail"], r.text


def test_a_wrong_path_or_method_gets_our_json_error(client):
    r = client.get("/sdapi/v1/txt2img")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert r.json() == {"error": "MethodNotAllowed", "detail": "GET /sdapi/v1/txt2img: use POST"}
    r = client.post("/api/v1/jobs/some-id")
    assert r.status_code == 405 and r.json()["detail"].endswith("use GET")
    r = client.get("/sdapi/v1/no-such-thing")
    assert r.status_code == 404 and r.json()["error"] == "NotFound" and "/docs" in r.json()["detail"]
    assert client.get("/sdapi/v1/samplers").status_code == 200  # the real routes still come first


def test_a_failing_job_answers_500_and_the_server_goes_on(client, services):
    broken = services.settings.models_dir / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{ this is not a model")
    try:
        client.post("/sdapi/v1/refresh-checkpoints")
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_model_checkpoint": "broken"}})
        assert r.status_code == 500 and r.json()["error"] == "GenerationFailed", r.text
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
        assert r.status_code == 500 and r.json()["detail"].startswith("sd_model_checkpoint: ")
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(f"{TINY} [")
        assert client.post("/sdapi/v1/txt2img", json=QUICK).status_code == 200
        # a file that plainly holds no model is the client's pick to change: 422, not the server's 500 (a probe)
        (services.settings.models_dir / "garbage.safetensors").write_bytes(b"\x00" * 64)
        client.post("/sdapi/v1/refresh-checkpoints")
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "garbage"})
        assert r.status_code == 422 and "garbage.safetensors is not a readable .safetensors file" in r.json()["detail"]
        assert client.post("/sdapi/v1/txt2img", json=QUICK).status_code == 200
    finally:
        shutil.rmtree(broken)
        (services.settings.models_dir / "garbage.safetensors").unlink(missing_ok=True)
        client.post("/sdapi/v1/refresh-checkpoints")
        client.post("/sdapi/v1/refresh-checkpoints")


# --- png-info ---------------------------------------------------------------------------------
def test_png_info_parses_the_infotext_and_rejects_bad_base64(client):
    text = 'a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x768, Model: "a, b"'
    meta = PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("Software", "test")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=meta)
    b64 = base64.b64encode(buffer.getvalue()).decode()
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + b64})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == text and r.json()["items"] == {"Software": "test"}
    params = r.json()["parameters"]
    assert (params["Prompt"], params["Negative prompt"], params["Seed"], params["Model"]) == ("a cat", "dog", "5", "a, b")
    assert (params["Size-1"], params["Size-2"]) == ("512", "768")
    # A1111's defaults for what the text leaves out, which clients read
    assert (params["Clip skip"], params["Hires sampler"], params["Hires resize-1"], params["RNG"],
            params["Schedule type"]) == ("1", "Use same sampler", 0, "GPU", "Automatic")
    wrapped = base64.encodebytes(buffer.getvalue()).decode()  # 76-character lines, as the base64 tool writes
    assert client.post("/sdapi/v1/png-info", json={"image": wrapped}).json()["info"] == text

    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["info"] == "" and r.json()["parameters"] == {}
    for bad in ("%%%not base64%%%", base64.b64encode(b"not an image").decode(), ""):
        r = client.post("/sdapi/v1/png-info", json={"image": bad})
        assert r.status_code == 422 and r.json()["detail"].startswith("image: "), r.text
    assert client.post("/sdapi/v1/png-info", json={}).json()["detail"].startswith("image: ")


def test_png_info_splits_every_size_as_a1111(client):
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 5, Size: 64x64, Hires resize: 96x128, Seed resize from: 96x80, " \
           "Hires sampler: DPM++ 2M, Clip skip: 2"
    meta = PngInfo()
    meta.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=meta)
    params = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()[
        "parameters"]
    assert (params["Hires resize-1"], params["Hires resize-2"]) == ("96", "128")
    assert (params["Seed resize from-1"], params["Seed resize from-2"]) == ("96", "80")
    assert (params["Hires sampler"], params["Clip skip"]) == ("DPM++ 2M", "2")  # the text's own over the defaults


def png_base64(picture: Image.Image, infotext: str | None = None) -> str:
    meta = PngInfo()
    if infotext:
        meta.add_text("parameters", infotext)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_extra_single_image_resizes_and_keeps_the_parameters(client):
    text = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 24x16"
    body = {"image": "data:image/png;base64," + png_base64(Image.new("RGB", (24, 16), "teal"), text),
            "upscaling_resize": 3, "upscaler_1": "Nearest", "show_extras_results": True, "gfpgan_visibility": 0}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    picture = decoded(r.json()["image"])
    assert picture.size == (72, 48) and picture.getpixel((70, 40)) == (0, 128, 128)
    assert picture.text == {"parameters": text, "postprocessing": "Postprocess upscale by: 3, Postprocess upscaler: Nearest"}
    assert "Postprocess upscale by: 3, Postprocess upscaler: Nearest" in r.json()["html_info"]
    # A1111's own defaults: upscaler_1 "None" sends the picture back as it was.
    r = client.post("/sdapi/v1/extra-single-image", json={"image": png_base64(Image.new("RGB", (24, 16)), text)})
    assert r.status_code == 200 and decoded(r.json()["image"]).size == (24, 16)
    assert decoded(r.json()["image"]).text == {"parameters": text}
    r = client.post("/sdapi/v1/extra-single-image", content=b'{"image": "x", "upscaling_resize": NaN}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("upscaling_resize: Input should be a finite number")


def test_extra_batch_images_answers_in_order_and_names_the_picture_to_fix(client):
    pictures = [{"data": png_base64(Image.new("RGB", (8, 8 * (i + 1)))), "name": f"{i}.png"} for i in range(2)]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": pictures, "resize_mode": 1,
                                                          "upscaling_resize_w": 32, "upscaling_resize_h": 32,
                                                          "upscaling_crop": False, "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    assert [decoded(b64).size for b64 in r.json()["images"]] == [(32, 32), (32, 64)]
    broken = pictures + [{"data": base64.b64encode(b"not a picture").decode(), "name": "notes.txt"}]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": broken})
    assert r.status_code == 422 and r.json()["detail"].startswith("imageList[2] (notes.txt): "), r.text
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": []})
    assert r.status_code == 422 and "imageList: send from 1 to 100 pictures, got 0" in r.json()["detail"]
    # What one request makes is held whole until it is answered: refused, before any work, past two 8192x8192.
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": pictures * 3, "resize_mode": 1,
                                                          "upscaling_resize_w": 8192, "upscaling_resize_h": 4096,
                                                          "upscaler_1": "Lanczos"})
    assert r.status_code == 422, r.text[:300]
    assert "the results would be 201 megapixels in all; one request may make at most 134" in r.json()["detail"]


@pytest.mark.parametrize("body, problem", [
    ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1: there is no upscaler '4x-UltraSharp' on this server"),
    ({"gfpgan_visibility": 1.5}, "gfpgan_visibility: Input should be less than or equal to 1"),
    ({"codeformer_visibility": 0.5, "codeformer_weight": -1}, "codeformer_weight: Input should be greater than or equal"),
    ({"upscaling_resize": 8, "upscaler_1": "Nearest", "image_size": 2000}, "the 2000x8 picture would become 16000x64"),
    ({"resize_mode": 5}, "resize_mode must be 0 (scale by) or 1 (scale to)"),
    ({"image": ""}, "image: empty; send a base64-encoded PNG"),
])
def test_extras_refuse_what_they_cannot_do_naming_the_field(client, body, problem):
    width = body.pop("image_size", 8)
    full = {"image": png_base64(Image.new("RGB", (width, 8)))} | body
    r = client.post("/sdapi/v1/extra-single-image", json=full)
    assert r.status_code == 422 and problem in r.json()["detail"], r.text


# --- lists, options, models -------------------------------------------------------------------
def test_lists_and_memory(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert "k_euler_a" in samplers[names.index("Euler a")]["aliases"]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    # A1111 1.10's list, in its order
    assert [(s["name"], s["label"]) for s in schedulers] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"),
        ("beta", "Beta")]
    by_name = {s["name"]: s for s in schedulers}
    assert (by_name["karras"]["default_rho"], by_name["polyexponential"]["default_rho"]) == (7.0, 1.0)
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"] and by_name["beta"]["need_inner_model"] is True
    assert "sd upscale" in client.get("/sdapi/v1/scripts").json()["img2img"]  # (test_api_scripts: the others)
    [info] = [item for item in client.get("/sdapi/v1/script-info").json() if item["name"] == "sd upscale"]
    assert info["is_img2img"] and not info["is_alwayson"]
    assert [arg["label"] for arg in info["args"]] == ["Info", "Tile overlap", "Upscaler", "Scale Factor"]
    assert info["args"][2]["choices"][:3] == ["None", "Lanczos", "Nearest"]  # A1111's positions: script_args[2]
    for missing_feature in ("sd-vae", "prompt-styles", "loras"):
        assert client.get(f"/sdapi/v1/{missing_feature}").json() == [], missing_feature  # clients read these at start
    # A1111's names, which hr_upscaler and the Extras routes take
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers][:4] == ["None", "Lanczos", "Nearest", "R-ESRGAN General 4xV3"]
    assert upscalers[6]["model_url"].endswith("/RealESRGAN_x4plus.pth")  # R-ESRGAN 4x+, downloaded when first used
    latent_modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert latent_modes[0] == "Latent" and {"Latent (antialiased)", "Latent (nearest-exact)"} <= set(latent_modes)
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    ping = client.get("/internal/ping")  # A1111's, which clients call to test the connection
    assert ping.status_code == 200 and ping.json() == {}


def test_sd_models_refresh_and_switching_the_model_through_options(client, services):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == [TINY]
    assert models[0]["title"] == f"{TINY} [{models[0]['hash']}]" and len(models[0]["hash"]) == 10
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]

    shutil.copytree(services.settings.models_dir / TINY, services.settings.models_dir / "tiny-two")
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == [TINY, "tiny-two"]
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-two", "show_progressbar": True})
        assert r.status_code == 200 and r.json() == {"applied": ["sd_model_checkpoint"], "ignored": ["show_progressbar"]}
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-two [")
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing-model"})
        assert r.status_code == 404 and r.json()["detail"].startswith("sd_model_checkpoint: model 'missing-model'")
        assert services.engine.model.entry.name == "tiny-two"
        # Deleted from disk since the last scan: unknown (404), not a failed load (500).
        shutil.rmtree(services.settings.models_dir / "tiny-two")
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY})
        assert r.status_code == 200
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-two"})
        assert r.status_code == 404 and r.json()["error"] == "ModelNotFound", r.text
        long_name = "a" * 5000  # longer than a file name may be: the OS refuses to look it up at all
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": long_name})
        assert r.status_code == 404 and r.json()["error"] == "ModelNotFound" and len(r.text) < 1000, r.text
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_model_checkpoint": long_name}})
        assert r.status_code == 404 and r.json()["error"] == "ModelNotFound", r.text
        for not_a_name in (["tiny-two"], {"a": 1}, 3):
            r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": not_a_name})
            assert r.status_code == 422 and "as a string" in r.json()["detail"], r.text
            r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"sd_model_checkpoint": not_a_name}})
            assert r.status_code == 422 and "override_settings.sd_model_checkpoint" in r.json()["detail"], r.text
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"]}).status_code == 200
        shutil.rmtree(services.settings.models_dir / "tiny-two", ignore_errors=True)
        client.post("/sdapi/v1/refresh-checkpoints")


@contextlib.contextmanager
def another_model(client, services, name: str):
    """A copy of the tiny model under another name, listed while the block runs; afterwards the option is
    the tiny model again and the copy is gone."""
    shutil.copytree(services.settings.models_dir / TINY, services.settings.models_dir / name)
    client.post("/sdapi/v1/refresh-checkpoints")
    try:
        yield name
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200
        shutil.rmtree(services.settings.models_dir / name, ignore_errors=True)
        client.post("/sdapi/v1/refresh-checkpoints")


def test_a_browser_tabs_generate_does_not_undo_the_model_an_api_client_set(client, services):
    """Each tab runs the model its dropdown shows; the API's requests run the one set through options."""
    with another_model(client, services, "tiny-api"):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-api"}).status_code == 200
        tab_job = services.worker.submit(QUICK | {"model": TINY}, origin="ui")  # a tab showing TINY
        assert tab_job.wait(60) and services.engine.model.entry.name == TINY
        info = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])
        assert info["sd_model_name"] == "tiny-api"
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-api [")


def test_an_override_models_clip_skip_is_checked_once_loaded_and_a_kept_override_becomes_the_option(client, services):
    with another_model(client, services, "tiny-other"):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200
        # Deeper than the model named: known only once it is loaded, and still the client's to fix (not a 500).
        too_deep = {"sd_model_checkpoint": "tiny-other", "CLIP_stop_at_last_layers": TEXT_LAYERS + 1}
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": too_deep})
        assert r.status_code == 422 and r.json()["error"] == "InvalidRequest", r.text
        assert r.json()["detail"].startswith("override_settings.CLIP_stop_at_last_layers: tiny-other's text encoder")
        job_id = client.post("/api/v1/jobs", json=QUICK | {"override_settings": too_deep}).json()["id"]
        assert services.worker.get(job_id).wait(60)  # polled, the error names the field as the client sent it too
        assert client.get(f"/api/v1/jobs/{job_id}").json()["error"].startswith(
            "override_settings.CLIP_stop_at_last_layers: tiny-other's text encoder")
        # As in A1111, an override not restored afterwards stays: it is the option, and later requests' model.
        kept = {"override_settings": {"sd_model_checkpoint": "tiny-other"}, "override_settings_restore_afterwards": False}
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | kept).json()["info"])["sd_model_name"] == "tiny-other"
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-other [")
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])["sd_model_name"] == "tiny-other"
        # the server's model, and the next start's, as after POST /options (it was neither; found by a probe)
        assert services.worker.chosen_model.entry.name == "tiny-other"
        remembered = services.options.remembered(("sd_model_checkpoint",))["sd_model_checkpoint"]
        assert remembered.startswith("tiny-other ["), remembered


def test_a_kept_override_counts_in_queue_order(client, services):
    """Requests queued behind it run on its model, as it is the option by their turn; an option set after it
    wins over it."""
    kept = QUICK | {"override_settings": {"sd_model_checkpoint": "tiny-other"},
                    "override_settings_restore_afterwards": False}
    with another_model(client, services, "tiny-other"):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200
        blocker = services.worker.submit(LONG, origin="ui")  # holds the queue, so the override stays queued
        wait_for(lambda: blocker.state is JobState.RUNNING)
        override = services.worker.get(client.post("/api/v1/jobs", json=kept).json()["id"])
        behind = services.worker.get(client.post("/api/v1/jobs", json=QUICK).json()["id"])
        services.worker.cancel(blocker.id)
        assert override.wait(60) and behind.wait(60)
        assert (override.model.entry.name, behind.model.entry.name) == ("tiny-other", "tiny-other")

        override = services.worker.get(client.post("/api/v1/jobs", json=kept).json()["id"])
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200  # after it
        assert override.wait(60) and override.model.entry.name == "tiny-other"
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(f"{TINY} [")
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])["sd_model_name"] == TINY


def queued_during_a_switch(client, services, monkeypatch, model: str, before=lambda: None, asked=None):
    """The option's model set to the tiny one, then to `model` while a long job holds the queue, and a request sent
    while that load waits (after `before()`): (the switch's answer, the request's job), once both have ended.
    `asked`: a list the names of the loads queued go into."""
    asked, queue_model_load = [] if asked is None else asked, services.worker.queue_model_load
    monkeypatch.setattr(services.worker, "queue_model_load",
                        lambda n, **kwargs: (queue_model_load(n, **kwargs), asked.append(n))[0])
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200
    asked.clear()
    blocker = services.worker.submit(LONG, origin="ui")
    wait_for(lambda: blocker.state is JobState.RUNNING)
    with ThreadPoolExecutor(1) as pool:
        switch = pool.submit(client.post, "/sdapi/v1/options", json={"sd_model_checkpoint": model})
        wait_for(lambda: asked[:1] == [model])  # the load is queued
        before()
        behind = services.worker.get(client.post("/api/v1/jobs", json=QUICK).json()["id"])
        services.worker.cancel(blocker.id)
        answer = switch.result(120)
    assert behind.wait(120)
    return answer, behind


def test_a_request_queued_while_the_options_model_loads_runs_on_that_model(client, services, monkeypatch):
    """A1111 sets the option at once: a request sent while the switch waits behind a long job runs on the new model,
    not on the old option's (which would load the old model back after the switch)."""
    with another_model(client, services, "tiny-other"):
        switch, behind = queued_during_a_switch(client, services, monkeypatch, "tiny-other")
        assert switch.status_code == 200 and behind.state is JobState.DONE
        assert behind.model.entry.name == "tiny-other" and services.engine.model.entry.name == "tiny-other"
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])["sd_model_name"] == "tiny-other"


def test_override_settings_not_restored_afterwards_stay_set_as_in_a1111(client, services):
    """All of them, as POST /options would set them, not only the model; a value it would refuse is refused first."""
    before = client.get("/sdapi/v1/options").json()
    kept = {"CLIP_stop_at_last_layers": 2, "eta_ancestral": 0.5, "sd_vae": "None", "jpeg_quality": 70}
    try:
        bad = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"jpeg_quality": 5000},
                                                               "override_settings_restore_afterwards": False})
        assert bad.status_code == 422 and "override_settings.jpeg_quality" in bad.json()["detail"], bad.text
        restored = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": kept})
        assert restored.status_code == 200 and client.get("/sdapi/v1/options").json() == before
        r = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": kept,
                                                           "override_settings_restore_afterwards": False})
        assert r.status_code == 200, r.text
        after = client.get("/sdapi/v1/options").json()
        assert {key: after[key] for key in kept} == kept
        assert "Clip skip: 2" in json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", json={key: before[key] for key in kept})


def test_override_settings_of_how_files_are_written_apply_to_that_job_alone(client, services):
    """As in A1111: its pictures are saved (and returned) in the job's own format, quality and names."""
    before = client.get("/sdapi/v1/options").json()
    own = {"samples_format": "jpg", "jpeg_quality": 60, "samples_filename_pattern": "[seed]-own", "save_txt": True}
    job_id = client.post("/api/v1/jobs", json=QUICK | {"save_images": True, "override_settings": own}).json()["id"]
    job = services.worker.get(job_id)
    assert job.wait(60) and job.state is JobState.DONE, job.error
    saved = Path(job.images[0].path)
    assert saved.suffix == ".jpg" and saved.stem.endswith(f"{job.images[0].seed}-own") and saved.with_suffix(".txt").exists()
    assert Image.open(saved).format == "JPEG"
    returned = client.get(f"/api/v1/jobs/{job_id}").json()["result"]["images"][0]
    assert Image.open(io.BytesIO(base64.b64decode(returned))).format == "JPEG"
    assert client.get("/sdapi/v1/options").json() == before  # the others' setting stays
    plain = services.worker.get(client.post("/api/v1/jobs", json=QUICK | {"save_images": True}).json()["id"])
    assert plain.wait(60) and Path(plain.images[0].path).suffix == f".{before['samples_format']}"
    bad = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"samples_format": "exe"}})
    assert bad.status_code == 422 and "override_settings: samples_format" in bad.json()["detail"], bad.text


def test_override_settings_of_the_grid_and_the_infotext_apply_to_that_job_alone(client):
    """Show grid in gallery, the grid's rows and the Add ... to infotext switches, as A1111 applies override_settings
    for the job (they were dropped without a word)."""
    saved = QUICK | {"save_images": True, "seed": 40}
    plain = client.post("/sdapi/v1/txt2img", json=saved | {"n_iter": 3}).json()
    assert len(plain["images"]) == 4 and "Model hash: " in json.loads(plain["info"])["infotexts"][0]
    assert png(plain["images"][0]).size == (128, 128)  # -1 rows: 2x2 with an empty place
    own = client.post("/sdapi/v1/txt2img", json=saved | {"n_iter": 3, "override_settings": {
        "grid_prevent_empty_spots": True, "add_model_hash_to_info": False, "add_version_to_infotext": False}}).json()
    text = json.loads(own["info"])["infotexts"][0]
    assert png(own["images"][0]).size == (192, 64) and "Model hash" not in text and "Version" not in text
    rows = client.post("/sdapi/v1/txt2img", json=saved | {"n_iter": 3, "override_settings": {"n_rows": 3}}).json()
    assert png(rows["images"][0]).size == (64, 192)
    no_grid = client.post("/sdapi/v1/txt2img", json=saved | {"batch_size": 2,
                                                             "override_settings": {"return_grid": False}}).json()
    assert len(no_grid["images"]) == 2 and json.loads(no_grid["info"])["index_of_first_image"] == 0
    assert client.get("/sdapi/v1/options").json()["return_grid"] is True  # the others' settings stay


def test_get_options_reads_back_show_grid_in_gallery_as_set(client):
    try:
        assert client.post("/sdapi/v1/options", json={"return_grid": False}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["return_grid"] is False
    finally:
        client.post("/sdapi/v1/options", json={"return_grid": True})
    assert client.get("/sdapi/v1/options").json()["return_grid"] is True


XYZ_STEPS = {"script_name": "X/Y/Z plot", "script_args": [4, "1, 2"]}  # axis 4: Steps


def test_a_scripts_grid_and_pictures_are_written_as_its_override_settings_say(client, services):
    own = {"samples_format": "jpg", "grid_format": "jpg"}
    r = client.post("/sdapi/v1/txt2img", json=QUICK | XYZ_STEPS | {"save_images": True, "override_settings": own})
    assert r.status_code == 200, r.text
    assert {Image.open(io.BytesIO(base64.b64decode(image))).format for image in r.json()["images"]} == {"JPEG"}
    newest = max((services.settings.outdir / "txt2img-grids").rglob("xyz_grid-*"),  # A1111's name
                 key=lambda path: path.stat().st_mtime)
    assert newest.suffix == ".jpg"


def test_a_scripts_override_settings_not_restored_afterwards_stay_set_too(client, services):
    before = client.get("/sdapi/v1/options").json()
    body = QUICK | XYZ_STEPS | {"override_settings": {"eta_ancestral": 0.5},
                                "override_settings_restore_afterwards": False}
    try:
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
        assert client.get("/sdapi/v1/options").json()["eta_ancestral"] == 0.5
    finally:
        client.post("/sdapi/v1/options", json={"eta_ancestral": before["eta_ancestral"]})


def test_kept_override_settings_that_cannot_be_saved_are_a_warning_on_the_queued_job(client, services, monkeypatch):
    """The job is queued by then: the client gets its id, and the job says what was not kept."""
    def full_disk(saved):
        raise OSError("no space left on device")

    monkeypatch.setattr(services.options, "update", full_disk)
    r = client.post("/api/v1/jobs", json=QUICK | {"override_settings": {"jpeg_quality": 70},
                                                  "override_settings_restore_afterwards": False})
    assert r.status_code == 202, r.text
    job = services.worker.get(r.json()["id"])
    assert job.wait(60) and job.state is JobState.DONE
    assert any("override_settings: jpeg_quality not saved" in warning for warning in job.warnings), job.warnings


def test_a_request_queued_while_a_model_switch_fails_runs_on_the_model_before(client, services, monkeypatch):
    """It names the model the option is being set to; where that load fails, the option goes back (as A1111's
    Options.set does) and it runs on the model before: one client's failed switch failed another's plain request
    (found by a probe)."""
    models = services.settings.models_dir
    shutil.copytree(models / TINY, models / "broken")
    for weights in (models / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    client.post("/sdapi/v1/refresh-checkpoints")
    try:
        switch, behind = queued_during_a_switch(client, services, monkeypatch, "broken")
        assert switch.status_code == 500 and behind.state is JobState.DONE, behind.error
        assert behind.model.entry.name == TINY and services.engine.model.entry.name == TINY
    finally:
        shutil.rmtree(models / "broken", ignore_errors=True)
        client.post("/sdapi/v1/refresh-checkpoints")


def test_behind_two_switches_the_second_failing_a_request_runs_on_the_firsts_model(client, services, monkeypatch):
    """A1111's option goes back to what it was when the second switch came: the first switch's model, not the one
    before both (found by review: it ran on that one, costing two more loads)."""
    models = services.settings.models_dir
    shutil.copytree(models / TINY, models / "broken")
    for weights in (models / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with another_model(client, services, "tiny-other"):
        try:
            def second_switch():  # queued behind the first, before the request
                answers.append(pool.submit(client.post, "/sdapi/v1/options", json={"sd_model_checkpoint": "broken"}))
                wait_for(lambda: asked[-1:] == ["broken"])

            asked = []  # queued_during_a_switch records the loads queued here too
            answers = []
            with ThreadPoolExecutor(1) as pool:
                first, behind = queued_during_a_switch(client, services, monkeypatch, "tiny-other",
                                                       before=second_switch, asked=asked)
                second = answers[0].result(120)
            assert (first.status_code, second.status_code) == (200, 500)
            assert behind.state is JobState.DONE and behind.model.entry.name == "tiny-other", behind.error
            assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-other [")
        finally:
            shutil.rmtree(models / "broken", ignore_errors=True)
            client.post("/sdapi/v1/refresh-checkpoints")


def test_a_tabs_job_queued_during_a_switch_does_not_decide_an_api_requests_model(client, services, monkeypatch):
    """A web-UI tab runs its own pick; an API request sent after the switch runs on the option's model, not on the
    model a tab's job loaded just before it."""
    with another_model(client, services, "tiny-other"):
        def tab_job_between():
            return services.worker.submit(QUICK | {"model": TINY}, origin="ui")

        switch, behind = queued_during_a_switch(client, services, monkeypatch, "tiny-other", before=tab_job_between)
        assert switch.status_code == 200 and behind.state is JobState.DONE
        assert behind.model.entry.name == "tiny-other"


def test_the_api_models_clip_skip_and_a_model_deleted_since(client, services):
    """API requests run on the model set through the options: clip skip is checked against that one, not a
    tab's; and once its files are gone, requests run on the loaded model and say so, rather than fail."""
    from transformers import CLIPTextConfig, CLIPTextModel

    deep = services.settings.models_dir / "tiny-deep"
    shutil.copytree(services.settings.models_dir / TINY, deep)
    config = CLIPTextConfig.from_pretrained(deep / "text_encoder")
    config.num_hidden_layers = TEXT_LAYERS + 2  # two more layers than TINY's text encoder
    shutil.rmtree(deep / "text_encoder")
    CLIPTextModel(config).save_pretrained(deep / "text_encoder")
    client.post("/sdapi/v1/refresh-checkpoints")
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-deep",
                                                   "CLIP_stop_at_last_layers": TEXT_LAYERS + 2})
        assert r.status_code == 200, r.text
        tab_job = services.worker.submit(QUICK | {"model": TINY}, origin="ui")  # a tab loads the shallower one
        assert tab_job.wait(60) and services.engine.model.entry.name == TINY
        info = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])
        assert (info["sd_model_name"], info["clip_skip"], info["warnings"]) == ("tiny-deep", TEXT_LAYERS + 2, [])

        shutil.rmtree(deep)
        assert services.worker.submit(QUICK | {"model": TINY}, origin="ui").wait(60)  # tiny-deep is unloaded
        r = client.post("/sdapi/v1/txt2img", json=QUICK)
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == TINY, r.text
        assert any("tiny-deep, set through the options, is gone" in w for w in info["warnings"])
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(f"{TINY} [")
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
        shutil.rmtree(deep, ignore_errors=True)
        client.post("/sdapi/v1/refresh-checkpoints")
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY}).status_code == 200


def test_options_report_the_loaded_checkpoints_full_sha256(client, services):
    sha256 = client.get("/sdapi/v1/options").json()["sd_checkpoint_hash"]
    assert len(sha256) == 64 and sha256.startswith(services.engine.model.short_hash)
    assert client.get("/sdapi/v1/sd-models").json()[0]["sha256"] == sha256  # what clients compare it with


def test_a_single_file_checkpoints_sha256_is_the_files_own(tmp_path):
    checkpoint = tmp_path / "models" / "model.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    registry = ModelRegistry(checkpoint.parent, hash_cache=tmp_path / "hashes.json")
    entry = registry.entries()[0]
    assert registry.sha256(entry, cached_only=True) is None  # not hashed yet: never hashed on a request
    registry.short_hash(entry)  # as loading the model does
    assert registry.sha256(entry, cached_only=True) == hashlib.sha256(b"weights").hexdigest()
    assert registry.sha256(ModelEntry("org/model", "org/model", "hub")) is None


def test_options_set_the_clip_skip_of_api_requests_that_give_none(client):
    try:
        r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "show_progressbar": True})
        assert r.json() == {"applied": ["CLIP_stop_at_last_layers"], "ignored": ["show_progressbar"]}, r.text
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        info = json.loads(client.post("/sdapi/v1/txt2img", json=QUICK).json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        own = {"override_settings": {"CLIP_stop_at_last_layers": 1}}  # a request's own wins
        assert json.loads(client.post("/sdapi/v1/txt2img", json=QUICK | own).json()["info"])["clip_skip"] == 1
        for bad in (0, 13, "two", 1.5, None, TEXT_LAYERS + 1):  # the last: deeper than the loaded model goes
            r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": bad, "sd_model_checkpoint": TINY})
            assert r.status_code == 422 and r.json()["detail"].startswith("CLIP_stop_at_last_layers: "), r.text
        # Checked against the model once it is loaded: the client hears that the switch happened.
        assert r.json()["detail"].endswith(f"(sd_model_checkpoint was applied: {TINY} is loaded now)"), r.text
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2  # a bad value changes nothing
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def api_of(client):
    """The route handlers' Api object (it holds the options set through POST /options)."""
    routes = list(client.app.routes)
    while routes:  # included routers may nest theirs
        route = routes.pop()
        if getattr(route, "path", None) == "/sdapi/v1/options":
            return route.endpoint.__self__
        routes += getattr(getattr(route, "original_router", None), "routes", None) or []
    raise LookupError("no /sdapi/v1/options route")


def test_a_clip_skip_option_deeper_than_a_model_loaded_since_runs_at_its_deepest_and_says_so(
        client, services, monkeypatch):
    monkeypatch.setattr(api_of(client), "model", None)  # no model set through the options: the loaded one runs
    try:
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": TEXT_LAYERS}).status_code == 200
        # Another model is loaded since (the UI may load one): its text encoder is shallower.
        shallower = dataclasses.replace(services.engine.model, text_encoder_layers=TEXT_LAYERS - 1)
        monkeypatch.setattr(services.engine, "model", shallower)
        deep = {"override_settings": {"CLIP_stop_at_last_layers": TEXT_LAYERS}}  # a request's own is refused
        r = client.post("/sdapi/v1/txt2img", json=QUICK | deep)
        assert r.status_code == 422 and r.json()["detail"].startswith(
            f"override_settings.CLIP_stop_at_last_layers: {TINY}'s text encoder has {TEXT_LAYERS - 1} layers"), r.text
        r = client.post("/sdapi/v1/txt2img", json=QUICK)  # the request never named a clip skip: no 422
        info = json.loads(r.json()["info"])
        assert info["clip_skip"] == TEXT_LAYERS - 1
        assert info["warnings"] == [f"clip_skip: the CLIP_stop_at_last_layers option {TEXT_LAYERS} is deeper than "
                                    f"{TINY}'s text encoder; it ran with {TEXT_LAYERS - 1}"]
    finally:
        monkeypatch.undo()
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_cmd_flags_use_a1111s_names_and_never_give_away_credentials(client, services):
    flags = client.get("/sdapi/v1/cmd-flags").json()
    settings = services.settings
    assert (flags["ckpt"], flags["ckpt_dir"], flags["port"]) == (settings.ckpt, str(settings.models_dir), 7860)
    assert not any(flags[name] for name in ("api", "nowebui", "listen", "share", "medvram", "lowvram", "no_half",
                                            "no_half_vae", "xformers", "skip_torch_cuda_test"))
    assert flags["data_dir"] is flags["models_dir"] is None and flags["use_cpu"] == ["all"]
    assert flags["lora_dir"] == str(settings.models_dir / "Lora")
    assert flags["gradio_auth"] is None and flags["api_auth"] is None
    locked = dataclasses.replace(services, settings=dataclasses.replace(settings, gradio_auth=[("alice", "s3cret")]))
    with TestClient(create_api_app(locked)) as c:
        r = c.get("/sdapi/v1/cmd-flags", auth=("alice", "s3cret"))
    assert r.json()["gradio_auth"] == r.json()["api_auth"] == "<set>"  # the UI's login guards the API too
    assert "alice" not in r.text and "s3cret" not in r.text


def test_loras_are_listed_refreshed_used_and_named_in_the_infotext(client, services):
    from tests.test_lora import kohya_state, lora_pairs, write_lora

    assert client.get("/sdapi/v1/loras").json() == []  # no Lora folder yet
    path = write_lora(services.settings.lora_folder, "detail", kohya_state(lora_pairs()),
                      metadata={"ss_output_name": "detail_v2"})
    try:
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert client.get("/sdapi/v1/loras").json() == [
            {"name": "detail", "alias": "detail_v2", "path": str(path), "metadata": {"ss_output_name": "detail_v2"}}]
        body = {"prompt": "a red apple <lora:detail:0.5>", "steps": 2, "seed": 1, "width": 64, "height": 64}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        raw = path.read_bytes()
        digest = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]
        assert f'Lora hashes: "detail: {digest}"' in info["infotexts"][0]
        assert info["prompt"] == body["prompt"]  # the tag stays in the prompt, as A1111 writes it
        plain = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a red apple"}).json()
        assert plain["images"][0] != r.json()["images"][0]
        other = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a red apple <wildcard:old:1>"})
        pixels = [np.asarray(png(reply["images"][0])) for reply in (other.json(), plain)]
        assert np.array_equal(*pixels)  # the tag left the text, as in A1111 (the PNGs differ only in their infotext)
        assert "left out of the prompt: <wildcard:old:1>" in json.loads(other.json()["info"])["warnings"][0]
        queued = services.worker.queue_length()
        bad = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a red apple <lora:detial>"})
        assert bad.status_code == 422 and "no LoRA named 'detial'" in bad.json()["detail"], bad.text
        assert "LoRAs there: detail" in bad.json()["detail"] and services.worker.queue_length() == queued
    finally:
        path.unlink()
        client.post("/sdapi/v1/refresh-loras")
    assert client.get("/sdapi/v1/loras").json() == []


def test_embeddings_are_read_on_refresh_listed_and_named_in_the_infotext(client, services):
    from tests.test_embeddings import vectors, write_a1111_pt

    path = write_a1111_pt(services.settings.embeddings_folder, "badhands", vectors(2, 1))
    try:
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        listed = client.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"]["badhands"] == {"step": 500, "sd_checkpoint": "cc6cb27103",
                                                "sd_checkpoint_name": "v1-5-pruned-emaonly", "shape": 32, "vectors": 2}
        body = {"prompt": "a red apple", "negative_prompt": "badhands", "steps": 2, "seed": 1, "width": 64, "height": 64}
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert f"TI hashes: \"badhands: {digest}\"" in info["infotexts"][0]
    finally:
        path.unlink()


def test_prompt_styles_are_listed_and_joined_into_the_prompts(client, services):
    from webui.storage.styles import Style

    assert client.get("/sdapi/v1/prompt-styles").json() == []  # no styles file yet
    services.styles.save(Style("Film", "film still of {prompt}", "cartoon"))
    try:
        assert client.get("/sdapi/v1/prompt-styles").json() == [
            {"name": "Film", "prompt": "film still of {prompt}", "negative_prompt": "cartoon"}]
        body = {"prompt": "a cat", "negative_prompt": "ugly", "styles": ["Film"], "steps": 1, "width": 64, "height": 64}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        # As A1111's: prompt and negative_prompt as given, all_prompts and the infotext with the style joined in
        assert (info["prompt"], info["negative_prompt"], info["styles"]) == ("a cat", "ugly", ["Film"])
        assert (info["all_prompts"], info["all_negative_prompts"]) == (["film still of a cat"], ["ugly, cartoon"])
        assert info["infotexts"][0].startswith("film still of a cat\nNegative prompt: ugly, cartoon\n")
        # so a client that sends info's prompt and styles back makes the same picture (not the style twice)
        again = client.post("/sdapi/v1/txt2img", json=body | {key: info[key] for key in
                                                               ("prompt", "negative_prompt", "styles", "seed")})
        assert json.loads(again.json()["info"])["infotexts"][0] == info["infotexts"][0]
        bad = client.post("/sdapi/v1/txt2img", json=body | {"styles": ["Flim"]})
        assert bad.status_code == 422 and "styles: no style named 'Flim' (styles: Film)" in bad.json()["detail"]
        services.styles.save(Style("Long", "x" * 1999))  # with "a cat, ": past the 2,000 characters
        long = client.post("/sdapi/v1/txt2img", json=body | {"styles": ["Long"]})
        assert long.status_code == 422 and long.json()["detail"].startswith("prompt: "), long.text
        assert long.json()["detail"].endswith("(with the styles Long joined in)")
    finally:
        services.settings.styles_path.unlink()


def test_other_a1111_routes_clients_call_answer_and_change_nothing(client, services):
    assert client.get("/sdapi/v1/extensions").json() == []
    real = client.get("/sdapi/v1/realesrgan-models").json()  # none downloaded yet: where each comes from
    assert real[3] == {"name": "R-ESRGAN 4x+", "scale": None,
                       "path": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"}
    model = services.engine.model
    for name in ("refresh-vae", "refresh-embeddings", "refresh-loras"):
        assert client.post(f"/sdapi/v1/{name}").status_code == 200, name
    assert services.engine.model is model


def test_unload_checkpoint_frees_the_model_until_the_next_image(client, services):
    """Clients that share a GPU with another program (an LLM) unload between their images; the next image,
    or reload-checkpoint, brings the model back, with the same pictures as before."""
    engine = services.engine
    before = client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 5}).json()["images"]
    try:
        assert client.post("/sdapi/v1/unload-checkpoint").json() == {}
        assert engine.released and engine.pipe is None  # on the CPU the weights are dropped: RAM is given back
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]  # still the model in use, as in A1111
        assert client.post("/sdapi/v1/txt2img", json=QUICK | {"seed": 5}).json()["images"] == before
        assert not engine.released

        client.post("/sdapi/v1/unload-checkpoint")
        assert client.post("/sdapi/v1/reload-checkpoint").json() == {}
        assert not engine.released and engine.pipe is not None
    finally:
        services.worker.restore_device().result(60)


def test_unload_checkpoint_waits_for_the_running_job(client, services, running):
    job = running()
    with ThreadPoolExecutor(1) as pool:
        unload = pool.submit(client.post, "/sdapi/v1/unload-checkpoint")
        time.sleep(0.5)
        assert not unload.done() and not services.engine.released  # the job keeps its model
        services.worker.cancel(job.id)
        assert unload.result(60).status_code == 200
    assert services.engine.released
    services.worker.restore_device().result(60)


def test_model_switches_waiting_for_a_long_job_never_starve_progress(client, services, running, monkeypatch):
    """Clients that set the model before every generation queue a switch each behind the running job;
    those waiting requests must not take the threads that /progress and /interrupt need."""
    job = running(LONG | {"n_iter": 3})
    name = services.engine.model.entry.name
    # As if each named another model: the loaded one needs no wait (the test after this one).
    monkeypatch.setattr(services.worker, "_model_stays", lambda name, wanted: False)
    asked, queue_model_load = [], services.worker.queue_model_load
    monkeypatch.setattr(services.worker, "queue_model_load",
                        lambda n, **kwargs: asked.append(n) or queue_model_load(n, **kwargs))
    with ThreadPoolExecutor(45) as pool:
        switches = [pool.submit(client.post, "/sdapi/v1/options", json={"sd_model_checkpoint": name})
                    for _ in range(45)]
        wait_for(lambda: len(asked) == 45)  # all waiting at once: anyio's shared pool has 40 threads
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["progress"] > 0 and job.state is JobState.RUNNING
        assert not any(switch.done() for switch in switches)
        services.worker.cancel(job.id)
        assert all(switch.result(60).status_code == 200 for switch in switches)


# --- progress, interrupt, skip, the queue -------------------------------------------------------
def test_interrupt_and_skip_never_touch_a_web_ui_users_job(client, services):
    ui_job = services.worker.submit(LONG | {"n_iter": 2}, origin="ui")
    wait_for(lambda: ui_job.progress.step >= 2)
    assert client.post("/sdapi/v1/skip").status_code == 200
    assert client.post("/sdapi/v1/interrupt").json() == {}
    # Nor by its id: to an API caller the web-UI user's job does not exist.
    assert client.post(f"/api/v1/jobs/{ui_job.id}/cancel").status_code == 404
    assert client.get(f"/api/v1/jobs/{ui_job.id}").status_code == 404
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] > 0 and progress["current_task"] is None and progress["current_image"] is None
    step = ui_job.progress.step
    wait_for(lambda: ui_job.progress.step > step + 2)
    assert ui_job.state is JobState.RUNNING and ui_job.progress.image_index == 0
    services.worker.cancel(ui_job.id)
    assert ui_job.wait(30)


def test_setting_the_loaded_model_answers_at_once_unless_a_queued_job_changes_it(client, services, running):
    """Many clients set the model before every image; a busy queue must not hold them up for nothing."""
    name = services.engine.model.entry.name
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]  # "name [hash]", as clients send it
    job = running()
    for value in (name, title):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": value}).json()["applied"] == [
            "sd_model_checkpoint"]
    assert job.state is JobState.RUNNING  # answered while the job runs

    # A job queued behind it that switches to another model for good: the setting must wait for it.
    other = services.worker.submit(QUICK | {"model": "elsewhere"}, origin="api")
    other.request.restore_model = False
    with ThreadPoolExecutor(1) as pool:
        setting = pool.submit(client.post, "/sdapi/v1/options", json={"sd_model_checkpoint": name})
        time.sleep(0.5)
        assert not setting.done()
        services.worker.cancel(job.id)
        assert setting.result(60).status_code == 200



def test_progress_estimates_the_time_left_before_the_pace_of_steps_is_known(client, services, running, monkeypatch):
    """As A1111's: from the time so far and how far it has come, not 0 seconds left."""
    from webui.worker import StepPace

    monkeypatch.setattr(StepPace, "eta", lambda self, steps_left: None)  # as in a run's first steps
    running(LONG)
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0


def test_progress_skip_and_interrupt_act_on_a_running_txt2img(client, services):
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(
        r=client.post("/sdapi/v1/txt2img", json=LONG | {"n_iter": 2})))
    caller.start()
    try:
        wait_for(lambda: step_of_running_job(services) >= 1 and services.worker.current().watch_preview() is not None)
        progress = client.get("/sdapi/v1/progress").json()  # answers while txt2img still waits
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 2
        assert progress["current_task"] == services.worker.current().id
        assert png(progress["current_image"]).size == (64, 64)
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None

        assert client.post("/sdapi/v1/skip").status_code == 200  # ends batch 1, goes on with batch 2
        # a step into batch 2 (Interrupt is heard inside a model call too: before one, it leaves no picture)
        wait_for(lambda: client.get("/sdapi/v1/progress").json()["progress"] > 0.5)  # past half: batch 2 stepped
        assert client.post("/sdapi/v1/interrupt").json() == {}
    finally:
        caller.join(60)
    r = answer["r"]
    assert r.status_code == 200, r.text  # as in A1111: an interrupted job answers with its images so far
    info = json.loads(r.json()["info"])
    # Both batches were cut short (one skipped, one interrupted): each shows as it stood, as A1111 returns them.
    assert info["state"] == "cancelled" and len(r.json()["images"]) == 2 and len(info["all_seeds"]) == 2
    assert services.history.get_job(info["job_id"])["state"] == "cancelled"
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_interrupt_and_skip_stop_only_the_callers_own_job(services):
    """Two API users: bob's /skip and /interrupt never touch alice's running job; bob's queued job goes."""
    locked = dataclasses.replace(services, settings=dataclasses.replace(
        services.settings, api_auth=[("alice", "s3cret"), ("bob", "hunter2")]))
    alice, bob = ("alice", "s3cret"), ("bob", "hunter2")
    with TestClient(create_api_app(locked)) as c:
        job_a = services.worker.get(c.post("/api/v1/jobs", json=LONG | {"n_iter": 2}, auth=alice).json()["id"])
        wait_for(lambda: job_a.progress.step >= 1)
        # No size of its own: a job cancelled before it starts still reports the model's (below).
        job_b = services.worker.get(c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2}, auth=bob).json()["id"])
        # Alice's job id, preview and result are hers: to bob the job is unknown.
        assert c.post(f"/api/v1/jobs/{job_a.id}/cancel", auth=bob).status_code == 404
        assert c.get(f"/api/v1/jobs/{job_a.id}", auth=bob).status_code == 404
        seen_by_bob = c.get("/sdapi/v1/progress", auth=bob).json()
        assert seen_by_bob["progress"] > 0 and seen_by_bob["current_task"] is None
        assert seen_by_bob["current_image"] is None
        assert c.get("/sdapi/v1/progress", auth=alice).json()["current_task"] == job_a.id
        assert c.get(f"/api/v1/jobs/{job_a.id}", auth=alice).json()["state"] == "running"
        assert c.post("/sdapi/v1/skip", auth=bob).status_code == 200
        assert c.post("/sdapi/v1/interrupt", auth=bob).json() == {}
        assert job_b.wait(10) and job_b.state is JobState.CANCELLED  # bob's own job, still queued
        info = json.loads(c.get(f"/api/v1/jobs/{job_b.id}", auth=bob).json()["result"]["info"])
        assert (info["width"], info["height"], info["sd_model_name"]) == (64, 64, TINY)  # as A1111: never null
        step = job_a.progress.step
        wait_for(lambda: job_a.progress.step > step + 2)
        assert job_a.state is JobState.RUNNING and job_a.progress.image_index == 0  # not skipped, not stopped
        assert c.post("/sdapi/v1/interrupt", auth=alice).json() == {}
        assert job_a.wait(30) and job_a.state is JobState.CANCELLED


def test_a_job_the_worker_forgot_is_still_known_only_to_its_caller(services):
    """The history answers for a forgotten job: with its state to its caller, as unknown to anyone else."""
    locked = dataclasses.replace(services, settings=dataclasses.replace(
        services.settings, api_auth=[("alice", "s3cret"), ("bob", "hunter2")]))
    alice, bob = ("alice", "s3cret"), ("bob", "hunter2")
    with TestClient(create_api_app(locked)) as c:
        job = services.worker.get(c.post("/api/v1/jobs", json=QUICK, auth=alice).json()["id"])
        ui_job = services.worker.submit(QUICK, origin="ui", owner="a-tab-token")
        assert job.wait(60) and ui_job.wait(60)
        with services.worker._wake:  # as _forget_old_jobs does once enough jobs have finished
            del services.worker._jobs[job.id], services.worker._jobs[ui_job.id]
        assert c.get(f"/api/v1/jobs/{job.id}", auth=alice).json()["state"] == "done"
        r = c.get(f"/api/v1/jobs/{job.id}", auth=bob)
        assert r.status_code == 404 and r.json()["detail"].startswith(f"job_id: no job '{job.id}' of yours")
        assert c.get(f"/api/v1/jobs/{ui_job.id}", auth=alice).status_code == 404  # a tab's job is nobody's here
    row = services.history.get_job(job.id)
    assert row["owner_key"] is not None and "alice" not in row["owner_key"]  # kept as a hash


def test_after_a_skip_all_seeds_still_label_the_returned_images(client, services):
    job = services.worker.get(client.post("/api/v1/jobs", json=LONG | {"n_iter": 3, "seed": 500}).json()["id"])
    wait_for(lambda: job.progress.step >= 1)
    assert client.post("/sdapi/v1/skip").status_code == 200  # batch 0 (seed 500) returns its unfinished image
    assert job.wait(120) and job.state is JobState.DONE
    result = client.get(f"/api/v1/jobs/{job.id}").json()["result"]
    info = json.loads(result["info"])
    labels = [int(read_infotext(png(b64)).split("Seed: ")[1].split(",")[0]) for b64 in result["images"]]
    assert labels == info["all_seeds"] == [500, 501, 502] and len(info["all_prompts"]) == 3


def test_a_job_that_could_not_save_returns_its_images_and_says_why(client, services, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(services.outputs, "save_image", denied)
    r = client.post("/sdapi/v1/txt2img", json=QUICK | {"save_images": True})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    job_id = client.post("/api/v1/jobs", json=QUICK | {"save_images": True}).json()["id"]
    services.worker.get(job_id).wait(60)
    status = client.get(f"/api/v1/jobs/{job_id}").json()
    assert status["state"] == "done" and status["warnings"] == ["image 1 was not saved: PermissionError: denied"]
    assert len(status["result"]["images"]) == 1


def test_a_running_job_has_no_result_yet(client, services, running):
    job = running(LONG | {"n_iter": 2})  # batch 2 runs 150 steps after the first image
    wait_for(lambda: len(job.images) >= 1)
    status = client.get(f"/api/v1/jobs/{job.id}").json()
    assert status["state"] == "running" and status["result"] is None


def test_a_job_that_fails_halfway_returns_the_images_it_made(client, services, monkeypatch):
    real_generate, calls = services.engine.generate, []

    def fails_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of luck")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(services.engine, "generate", fails_at_the_second_batch)
    job_id = client.post("/api/v1/jobs", json=QUICK | {"n_iter": 2}).json()["id"]
    services.worker.get(job_id).wait(60)
    status = client.get(f"/api/v1/jobs/{job_id}").json()
    assert status["state"] == "failed" and "out of luck" in status["error"]
    assert len(status["result"]["images"]) == 1


def test_api_and_ui_jobs_share_the_queue_and_a_full_queue_answers_503(client, services, running):
    api_job = running()
    ui_job = services.worker.submit(QUICK, origin="ui")
    limit = services.worker.max_queue
    services.worker.max_queue = 1
    try:
        assert services.worker.position(ui_job.id) == 1  # the running API job is ahead of the UI's
        assert client.get("/sdapi/v1/progress").json()["state"]["queued"] == 1
        for path in ("/sdapi/v1/txt2img", "/api/v1/jobs"):
            r = client.post(path, json=QUICK)
            assert r.status_code == 503 and r.json()["error"] == "QueueFull"
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        services.worker.max_queue = limit
    services.worker.cancel(ui_job.id)
    assert client.post(f"/api/v1/jobs/{api_job.id}/cancel").json()["cancelled"] is True


def test_per_job_cancel_stops_only_that_job(client, services, running):
    a = running()
    b = client.post("/api/v1/jobs", json=QUICK).json()
    c = client.post("/api/v1/jobs", json=QUICK | {"seed": 3})
    assert c.status_code == 202 and c.json()["position"] == 2
    c = c.json()
    assert client.get(f"/api/v1/jobs/{b['id']}").json()["position"] == 1

    assert client.post(f"/api/v1/jobs/{b['id']}/cancel").json() == {"id": b["id"], "cancelled": True,
                                                                     "state": "cancelled"}
    assert client.post(f"/api/v1/jobs/{a.id}/cancel").json()["cancelled"] is True
    assert a.wait(30) and a.state is JobState.CANCELLED
    job_c = services.worker.get(c["id"])
    assert job_c.wait(60) and job_c.state is JobState.DONE

    status = client.get(f"/api/v1/jobs/{c['id']}").json()
    assert status["state"] == "done" and status["origin"] == "api" and status["progress"]["step"] == 2
    assert json.loads(status["result"]["info"])["all_seeds"] == [3]
    assert read_infotext(png(status["result"]["images"][0])).startswith("a red apple\nSteps: 2")
    assert client.get(f"/api/v1/jobs/{b['id']}").json()["state"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{c['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"] == "JobFinished"
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404
    assert client.get("/api/v1/jobs/nope").status_code == 404


# --- auth, docs, attaching to another app -------------------------------------------------------
def test_api_auth_protects_every_route_and_nothing_runs_without_it(services):
    locked = dataclasses.replace(services, settings=dataclasses.replace(
        services.settings, api_auth=[("alice", "s3cret"), ("bob", "hunter2")]))
    with TestClient(create_api_app(locked)) as c:
        for method, path in [("GET", "/sdapi/v1/progress"), ("GET", "/sdapi/v1/sd-models"),
                             ("POST", "/sdapi/v1/txt2img"), ("POST", "/api/v1/jobs"), ("POST", "/sdapi/v1/interrupt"),
                             ("POST", "/sdapi/v1/options"), ("GET", "/docs"), ("GET", "/api/v1/openapi.json")]:
            for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
                r = c.request(method, path, json=QUICK, auth=auth)
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert r.headers["WWW-Authenticate"].startswith("Basic")
                assert services.worker.queue_length() == 0 and services.worker.current() is None
        assert c.get("/sdapi/v1/progress", auth=("bob", "hunter2")).status_code == 200
        assert c.get("/docs", auth=("alice", "s3cret")).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json=QUICK | {"steps": 1}, auth=("alice", "s3cret"))
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        # A1111's liveness check answers without credentials (clients call it to test the connection), and says
        # nothing more than that the server is up.
        assert c.get("/internal/ping").json() == {} and c.get("/internal/ping", auth=("x", "y")).status_code == 200
        schema = c.get("/api/v1/openapi.json", auth=("alice", "s3cret")).json()
        assert list(schema["components"]["securitySchemes"]) == ["HTTPBasic"]  # FastAPI's name, as clients know it
        assert "security" not in schema["paths"]["/internal/ping"]["get"]
        assert schema["paths"]["/sdapi/v1/progress"]["get"]["security"] == [{"HTTPBasic": []}]


def test_api_auth_takes_a_non_ascii_password_sent_as_utf8_or_latin1_and_refuses_garbled_headers(services):
    locked = dataclasses.replace(services, settings=dataclasses.replace(
        services.settings, api_auth=[("zoë", "pässwörd€")]))
    with TestClient(create_api_app(locked)) as c:
        assert c.get("/sdapi/v1/progress", auth=("zoë", "pässwörd€")).status_code == 200  # httpx sends UTF-8
        refused = c.get("/sdapi/v1/progress", auth=("zoë", "passwort"))
        assert refused.status_code == 401 and 'charset="UTF-8"' in refused.headers["WWW-Authenticate"]
        utf8 = base64.b64encode("zoë:pässwörd€".encode("utf-8")).decode()  # as curl sends it
        assert c.get("/sdapi/v1/progress", headers={"Authorization": f"Basic {utf8}"}).status_code == 200
    older = dataclasses.replace(services, settings=dataclasses.replace(services.settings, api_auth=[("zoë", "pässwörd")]))
    with TestClient(create_api_app(older)) as c:  # an older client's Latin-1 bytes (no € in Latin-1)
        latin1 = base64.b64encode("zoë:pässwörd".encode("latin-1")).decode()
        assert c.get("/sdapi/v1/progress", headers={"Authorization": f"Basic {latin1}"}).status_code == 200
        for header in ("Basic !!!not-base64", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer abc"):
            assert c.get("/sdapi/v1/progress", headers={"Authorization": header}).status_code == 401, header


def test_docs_and_attaching_to_an_existing_app(client, services):
    assert client.get("/docs").status_code == 200
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/api/v1/jobs/{job_id}/cancel"} <= set(paths)
    assert "Txt2ImgRequest" in json.dumps(paths["/sdapi/v1/txt2img"])
    # also where A1111 serves it, in an app of the API alone (--nowebui): clients look there (found by a probe)
    assert client.get("/openapi.json").json()["paths"] == paths

    host = FastAPI(docs_url="/docs")

    @host.get("/hello")
    def hello():
        return {"hello": "world"}

    attach_api(host, services)
    with TestClient(host) as c:
        assert c.get("/hello").json() == {"hello": "world"}
        assert c.get("/sdapi/v1/samplers").status_code == 200
        assert c.get("/docs").status_code == 200  # the host's own docs page stays
        assert "/hello" in c.get("/openapi.json").json()["paths"]  # and its own schema
        assert c.post("/sdapi/v1/txt2img", json={"steps": 0}).status_code == 422


def test_override_settings_takes_the_prompt_word_wrap_length_limit(client):
    ok = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"comma_padding_backtrack": 0}})
    assert ok.status_code == 200, ok.text
    refused = client.post("/sdapi/v1/txt2img", json=QUICK | {"override_settings": {"comma_padding_backtrack": 75}})
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("override_settings.comma_padding_backtrack:")


def test_the_model_the_server_started_with_from_outside_its_folder_stays_listed_and_can_be_picked_again(
        models_dir, tmp_path):
    """As A1111 lists its --ckpt file: after another model, the start model is picked again by its name (it was 'not
    found in the models folder', and the page's Generate failed on it)."""
    folder = tmp_path / "models"
    shutil.copytree(models_dir / TINY, folder / "tiny-b")
    outside = tmp_path / "elsewhere" / "emoji2"
    shutil.copytree(models_dir / TINY, outside)
    started = running_services(folder, tmp_path / "out", ckpt=str(outside))
    services = next(started)
    try:
        with TestClient(create_api_app(services)) as client:
            assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["tiny-b", "emoji2"]
            assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200  # a rescan keeps it
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b"}).status_code == 200
            assert services.engine.model.entry.name == "tiny-b"
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "emoji2"}).status_code == 200
            assert services.engine.model.entry.source == str(outside)
            listed = dataclasses.replace(services.settings, share=True)  # a visitor may pick it too: it is listed
            assert services.registry.find_listed("emoji2").source == str(outside) and listed.public
    finally:
        started.close()


def test_requests_that_name_no_model_run_on_the_servers_not_on_one_a_job_switched_to(models_dir, tmp_path):
    """A page's own pick or a plot's Checkpoint name axis loads another model for its jobs; as in A1111 (one global
    model, put back after the plot), API requests that name none stay on the server's model."""
    from webui.config import Settings
    from webui.services import build_services

    own_models = tmp_path / "models"
    own_models.mkdir()
    for name in ("tiny-a", "tiny-b"):
        (own_models / name).symlink_to(models_dir / TINY, target_is_directory=True)
    services = build_services(Settings(models_dir=own_models, outdir=tmp_path / "out", ckpt="tiny-a", device="cpu"))
    try:
        job = services.worker.submit(QUICK | {"model": "tiny-b"})  # as a cell of a plot's Checkpoint name axis
        assert job.wait(60) and services.engine.model.entry.name == "tiny-b"
        with TestClient(create_api_app(services)) as client:
            assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-a")
            r = client.post("/sdapi/v1/txt2img", json=QUICK)
            assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "tiny-a", r.text
            services.worker.load_model("tiny-b")  # picked in the UI's model list: the server's model now
            r = client.post("/sdapi/v1/txt2img", json=QUICK)
            assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-b"
    finally:
        services.close()
