"""Compatibility: drive our API with `webuiapi`, a published client of stable-diffusion-webui's API,
over HTTP against a real uvicorn server on 127.0.0.1 (with --api-auth on, as a client meets it)."""
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests
import uvicorn
import webuiapi

from webui.api import create_api_app
from webui.config import Settings
from webui.schemas import JobState
from webui.services import build_services
from webui.storage.outputs import read_infotext

TINY = "tiny-sd"
USER, PASSWORD = "webui", "letmein"


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    own_models = tmp_path_factory.mktemp("client-models")
    shutil.copytree(models_dir / TINY, own_models / TINY)
    settings = Settings(models_dir=own_models, outdir=tmp_path_factory.mktemp("client-out"), ckpt=TINY,
                        device="cpu", nowebui=True, api_auth=[(USER, PASSWORD)])
    services = build_services(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on so nothing else can take it
    port = sock.getsockname()[1]
    app_server = uvicorn.Server(uvicorn.Config(create_api_app(services), log_level="warning"))
    thread = threading.Thread(target=app_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not app_server.started and time.time() < deadline:
        time.sleep(0.05)
    assert app_server.started, "uvicorn did not start"
    yield services, port
    app_server.should_exit = True
    thread.join(30)
    sock.close()
    services.close()


def test_webuiapi_client_works_unchanged(server):
    services, port = server
    assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=10).status_code == 401

    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=2,
                            username=USER, password=PASSWORD)
    result = api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=4242, width=64, height=64, cfg_scale=6)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 4242 and result.info["all_seeds"] == [4242]
    assert read_infotext(result.image) == result.info["infotexts"][0]
    assert result.info["infotexts"][0].startswith(
        "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, "
        "Seed: 4242, Size: 64x64")
    assert result.parameters["prompt"] == "a lighthouse"

    # The same request straight to the worker gives the same pixels.
    job = services.worker.submit({"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 4242, "steps": 2,
                                  "width": 64, "height": 64, "cfg_scale": 6, "save_images": False})
    assert job.wait(60) and job.state is JobState.DONE
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(job.images[0].image.convert("RGB")))

    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0] and info.json["parameters"]["Seed"] == "4242"

    title = api.util_get_model_names()[0]
    assert title.startswith(f"{TINY} [") and api.util_get_current_model() == title
    api.util_set_model(TINY)
    assert api.get_options()["sd_model_checkpoint"] == title
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.get_progress()["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)
    api.interrupt()
    api.skip()
    api.refresh_checkpoints()
    assert api.get_memory()["ram"]["total"] > 0
    assert api.get_options()["sd_checkpoint_hash"].startswith(title.partition("[")[2].rstrip("]"))
    flags = api.get_cmd_flags()
    assert flags["api_auth"] == "<set>" and PASSWORD not in str(flags)  # whether auth is on, never the password
    assert "R-ESRGAN 4x+" in [model["name"] for model in api.get_realesrgan_models()]  # downloadable, as A1111's
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    result = api.txt2img(prompt="a lighthouse", seed=1, width=64, height=64, sampler_name="DDIM", scheduler="normal")
    assert "Sampler: DDIM, Schedule type: Automatic" in result.info["infotexts"][0]  # SillyTavern's defaults run
    assert "Clip skip: 2" in result.info["infotexts"][0] and result.info["warnings"]

    with pytest.raises(RuntimeError) as bad:
        api.txt2img(prompt="x", width=500, height=64)
    assert bad.value.args[0] == 422 and "width" in bad.value.args[1]
    done = api.img2img(images=[result.image], prompt="x", width=64, height=64, denoising_strength=0.5)
    assert "Denoising strength: 0.5" in done.info["infotexts"][0]
    inpainted = api.img2img(images=[result.image], mask_image=result.image.convert("L").point(lambda v: 255),
                            prompt="x", width=64, height=64, inpaint_full_res=False)
    assert "Mask blur: 4" in inpainted.info["infotexts"][0]


def test_webuiapi_runs_an_xyz_plot_by_its_script_args(server):
    """A1111's way to run a script: its name and positional args (here Steps across, by A1111's index 4)."""
    _, port = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=1, username=USER, password=PASSWORD)
    assert "x/y/z plot" in api.get_scripts()["txt2img"]
    result = api.txt2img(prompt="a lighthouse", seed=5, width=64, height=64, script_name="X/Y/Z plot",
                         script_args=[4, "1, 2", [], 0, "", [], 0, "", [], False, True])
    assert [image.size for image in result.images] == [(128, 64), (64, 64), (64, 64)]  # the grid, then the cells
    assert result.info["all_seeds"] == [5, 5] and "Steps: 2," in result.info["infotexts"][2]
