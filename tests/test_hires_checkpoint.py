"""A1111's Hires checkpoint: which model runs (and reads the prompts in) the hires fix's second pass, its pixels against
a run made by hand, the main model back after, with the refiner, Tiling, the infotext and history, refusals, the API
field and the txt2img tab's list."""
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tests.helpers import finished_job, fingerprint, running_services, spy_on
from tests.tiny_sd import save_tiny_model, tiny_components
from webui.schemas import SAME_CHECKPOINT, InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext

HIRES = "tiny-hires"  # its own UNet and text encoder; the VAE is the main model's, so a run by hand can match
REFINER = "tiny-refiner"
QUICK = {"prompt": "a red apple", "steps": 3, "seed": 11, "sampler_name": "Euler", "save_images": False,
         "model": TINY}
# 64x64 -> 96x96, 2 steps of a schedule of 4 (timesteps 333 and 0)
HIRES_FIX = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}


def save_with_the_main_vae(folder, seed: int):
    from diffusers import StableDiffusionPipeline

    components = tiny_components(seed) | {"vae": tiny_components(0)["vae"]}
    StableDiffusionPipeline(**components).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hires-checkpoint-models")
    save_tiny_model(folder / TINY)
    save_with_the_main_vae(folder / HIRES, seed=1)
    save_tiny_model(folder / REFINER, seed=3)
    save_tiny_model(folder / "tiny-inpainting", seed=2, in_channels=9)
    return folder


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("hires-checkpoint-out"))


@pytest.fixture
def calls(models, monkeypatch):
    """("unet" or "text", model name) of every UNet and text encoder call, the model told by its weights (read here
    from the files)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    names = {}
    for name in (TINY, HIRES, REFINER):
        names[fingerprint(UNet2DConditionModel.from_pretrained(models / name / "unet"))] = name
        names[fingerprint(CLIPTextModel.from_pretrained(models / name / "text_encoder"))] = name
    seen = []
    for part, model_class in (("unet", UNet2DConditionModel), ("text", CLIPTextModel)):
        spy_on(monkeypatch, model_class, "forward", names, seen,
               lambda name, *args, _part=part, **kwargs: (_part, name))
    return seen


def unet_names(calls):
    return [name for part, name in calls if part == "unet"]


def run(services, init_image=None, **fields):
    return finished_job(services, QUICK | fields, init_image=init_image)


def pixels(job):
    return np.asarray(job.images[0].image, np.int16)


def title_of(services, name):
    return f"{name} [{services.registry.short_hash(services.registry.find(name))}]"


def test_the_second_pass_runs_with_the_hires_checkpoint_which_reads_the_prompts_itself(services, calls):
    job = run(services, **HIRES_FIX, hr_checkpoint_name=HIRES)
    assert job.images[0].image.size == (96, 96)
    # The prompts (with the negative prompt, in one batch) read by each pass's text encoder before its UNet runs.
    assert calls == [("text", TINY)] + [("unet", TINY)] * 3 + [("text", HIRES)] + [("unet", HIRES)] * 2
    assert services.engine.model.entry.name == TINY and job.model.entry.name == TINY  # back for the next job


def test_its_picture_is_the_hires_checkpoints_img2img_of_the_first_pass_and_differs_from_the_same_checkpoints(
        services):
    # A picture upscaler: the first pass's picture, enlarged, is what the second pass starts from.
    job = run(services, **HIRES_FIX, hr_upscaler="Lanczos", hr_checkpoint_name=HIRES)
    same = run(services, **HIRES_FIX, hr_upscaler="Lanczos")
    assert np.abs(pixels(job) - pixels(same)).mean() > 1
    # By hand: the model's picture, enlarged as the hires fix does, then img2img by the hires checkpoint from the
    # same seed over the same two last steps of four (int(4 x 0.45) + 1 = 2).
    first_pass = run(services).images[0].image
    enlarged = services.engine.upscale_picture(first_pass, (96, 96), "Lanczos")
    by_hand = run(services, init_image=enlarged, model=HIRES, steps=4, denoising_strength=0.45, width=96, height=96)
    # The same but for float rounding: img2img's start keeps the VAE's memory layout, the hires pass's is contiguous,
    # so the UNet sums in another order (a few values of the 27648 come out one apart).
    apart = np.abs(pixels(job) - pixels(by_hand))
    assert apart.max() <= 1 and (apart > 0).mean() < 0.001


def test_every_batch_starts_with_the_main_model(services, calls):
    job = run(services, n_iter=2, **HIRES_FIX, hr_checkpoint_name=HIRES)
    assert unet_names(calls) == ([TINY] * 3 + [HIRES] * 2) * 2
    assert len(job.images) == 2 and services.engine.model.entry.name == TINY


def test_the_main_model_as_hires_checkpoint_changes_nothing_but_the_infotext(services, calls):
    same = run(services, **HIRES_FIX, hr_checkpoint_name=TINY)
    assert set(unet_names(calls)) == {TINY}
    assert np.array_equal(pixels(same), pixels(run(services, **HIRES_FIX)))
    assert f"Hires checkpoint: {title_of(services, TINY)}," in same.images[0].infotext  # as A1111 writes it


@pytest.mark.parametrize("refiner_pass, expected", [("second pass", [TINY, TINY, TINY, HIRES, REFINER]),
                                                    ("first pass", [TINY, TINY, REFINER, HIRES, HIRES]),
                                                    ("both passes", [TINY, TINY, REFINER, HIRES, REFINER])])
def test_a_refiner_takes_over_from_the_hires_checkpoint_at_its_switch(services, calls, refiner_pass, expected):
    # Switch at 0.9: the first pass's last call (timestep 0) and the second pass's (0) are past it; 333 is not. The
    # refiner takes over in the passes A1111's Hires fix: which pass to enable refiner for names.
    run(services, **HIRES_FIX, hr_checkpoint_name=HIRES, refiner_checkpoint=REFINER, refiner_switch_at=0.9,
        hires_fix_refiner_pass=refiner_pass)
    assert unet_names(calls) == expected
    assert services.engine.model.entry.name == TINY


@pytest.mark.parametrize("others", [{"hr_checkpoint_name": HIRES},
                                    {"refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}])
def test_tiling_wraps_the_convolutions_of_the_checkpoint_that_takes_over_too(services, calls, monkeypatch, others):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    modes = []
    for model_class, method in ((UNet2DConditionModel, "forward"), (AutoencoderKL, "decode")):
        def spy(self, *args, _run=getattr(model_class, method), **kwargs):
            modes.append(next(module for module in self.modules() if isinstance(module, torch.nn.Conv2d)).padding_mode)
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(model_class, method, spy)
    run(services, **HIRES_FIX, tiling=True, **others)
    assert set(unet_names(calls)) == {TINY, *[others.get(key) for key in ("hr_checkpoint_name", "refiner_checkpoint")
                                               if others.get(key)]}
    assert len(modes) == 6 and set(modes) == {"circular"}  # 5 UNet calls, then the decode
    assert services.engine.pipe.unet.conv_in.padding_mode == "zeros"  # the model back, as it was


@pytest.mark.parametrize("stop", ["skip", "cancel"])
def test_skip_or_interrupt_in_the_second_pass_leaves_the_main_model_loaded(services, calls, monkeypatch, stop):
    from diffusers import UNet2DConditionModel

    job = None
    spy = UNet2DConditionModel.forward

    def stop_in_the_second_pass(self, *args, **kwargs):
        output = spy(self, *args, **kwargs)
        if unet_names(calls)[-1] == HIRES and len(unet_names(calls)) <= 5:  # in the first batch
            getattr(services.worker, stop)(job.id)
        return output

    monkeypatch.setattr(UNet2DConditionModel, "forward", stop_in_the_second_pass)
    job = services.worker.submit(QUICK | HIRES_FIX | {"n_iter": 2, "hr_checkpoint_name": HIRES})
    assert job.wait(120)
    assert unet_names(calls)[:4] == [TINY] * 3 + [HIRES]
    if stop == "skip":
        assert job.state is JobState.DONE and unet_names(calls)[4:] == [TINY] * 3 + [HIRES] * 2
    else:
        assert job.state is JobState.CANCELLED and len(unet_names(calls)) == 4
    assert services.engine.model.entry.name == TINY


def test_a_hires_checkpoint_that_fails_to_load_fails_the_job_and_keeps_the_main_model(services, models):
    broken = models / "tiny-broken"
    shutil.copytree(models / HIRES, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    try:
        services.registry.refresh()
        job = services.worker.submit(QUICK | HIRES_FIX | {"hr_checkpoint_name": "tiny-broken"})
        assert job.wait(120) and job.state is JobState.FAILED
        assert services.engine.model.entry.name == TINY
        assert np.array_equal(pixels(run(services)), pixels(run(services)))  # and it still draws
    finally:
        shutil.rmtree(broken)
        services.registry.refresh()


def test_the_infotext_names_it_as_a1111_and_pastes_back(services):
    job = run(services, **HIRES_FIX, hr_checkpoint_name=HIRES)
    title = title_of(services, HIRES)
    assert re.fullmatch(rf"{HIRES} \[[0-9a-f]{{10}}\]", title)  # A1111's short_title: the sha256's first 10
    text = job.images[0].infotext
    assert f", Hires upscaler: Latent, Hires checkpoint: {title}, Model hash: " in text
    pasted = request_fields_from_infotext(text)
    assert pasted["enable_hr"] is True and pasted["hr_checkpoint_name"] == title
    again = run(services, **{key: pasted[key] for key in ("enable_hr", "hr_scale", "hr_second_pass_steps",
                                                         "denoising_strength", "hr_checkpoint_name")})
    assert np.array_equal(pixels(again), pixels(job))
    # None written is the first pass's, in A1111's words
    for plain in (run(services, **HIRES_FIX), run(services)):
        assert "Hires checkpoint" not in plain.images[0].infotext
        assert request_fields_from_infotext(plain.images[0].infotext)["hr_checkpoint_name"] == SAME_CHECKPOINT


def test_the_history_row_gives_its_title_back(services):
    from webui.ui.params import fields_from_history

    job = run(services, **HIRES_FIX, save_images=True, hr_checkpoint_name=HIRES)
    rows, _ = services.history.list_images()
    row = next(row for row in rows if row.job_id == job.id)
    assert fields_from_history(row)["hr_checkpoint_name"] == title_of(services, HIRES)


@pytest.mark.parametrize("name", [None, "", SAME_CHECKPOINT])
def test_the_same_checkpoint_is_none(services, name):
    job = services.worker.submit(QUICK | HIRES_FIX | {"hr_checkpoint_name": name})
    assert job.request.hr_checkpoint_name is None
    assert job.wait(120) and "Hires checkpoint" not in job.images[0].infotext


def test_without_the_hires_fix_it_is_not_read(services, calls):
    job = run(services, hr_checkpoint_name="no-such-model")  # as A1111: neither checked nor loaded
    assert job.request.hr_checkpoint_name is None and set(unet_names(calls)) == {TINY}


@pytest.mark.parametrize("name, message", [
    ("no-such-model", "hr_checkpoint_name: model 'no-such-model' not found in the models folder; available: "),
    ("tiny-inpainting", "hr_checkpoint_name: tiny-inpainting is a model of another kind (text width 32 inpainting) "
                        "than the model (text width 32); pick a checkpoint of the model's kind"),
])
def test_what_cannot_run_is_refused_before_the_queue(services, name, message):
    with pytest.raises(InvalidRequest) as refused:
        services.worker.submit(QUICK | HIRES_FIX | {"hr_checkpoint_name": name})
    assert message in str(refused.value)
    assert services.worker.queue_length() == 0


def test_the_api_takes_a1111s_hr_checkpoint_name(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    body = {"prompt": "a red apple", "steps": 3, "seed": 11, "sampler_name": "Euler", "enable_hr": True,
            "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    with TestClient(create_api_app(services)) as client:
        r = client.post("/sdapi/v1/txt2img", json=body | {"hr_checkpoint_name": HIRES})
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert f"Hires checkpoint: {title_of(services, HIRES)}," in infotext
        # A pasted infotext brings it, as A1111's does.
        r = client.post("/sdapi/v1/txt2img", json={"infotext": infotext})
        assert r.status_code == 200, r.text
        assert f"Hires checkpoint: {HIRES} [" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json=body | {"hr_checkpoint_name": SAME_CHECKPOINT})
        assert r.status_code == 200 and "Hires checkpoint" not in json.loads(r.json()["info"])["infotexts"][0]
        for wrong in ("nope", "tiny-inpainting"):
            r = client.post("/sdapi/v1/txt2img", json=body | {"hr_checkpoint_name": wrong})
            assert r.status_code == 422 and r.json()["detail"].startswith("hr_checkpoint_name: "), r.text
    assert services.engine.model.entry.name == TINY


def test_the_txt2img_tab_lists_passes_and_pastes_it(services, models):
    import gradio as gr

    from webui.ui.blocks import create_ui
    from webui.ui.generation import Session
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS, widget_updates

    ui = create_ui(services)
    dropdown = ui.txt2img.widgets["hr_checkpoint_name"]
    assert dropdown.elem_id == "txt2img_hr_checkpoint" and dropdown.value == SAME_CHECKPOINT
    assert [choice[0] for choice in dropdown.choices][:1] == [SAME_CHECKPOINT]
    assert {HIRES, TINY} <= {choice[0] for choice in dropdown.choices}
    assert "hr_checkpoint_name" not in ui.img2img.widgets  # img2img has no hires fix

    # Generate takes it with the hires fix on (and reads "Use same checkpoint" as none).
    generate = next(fn.fn for fn in ui.blocks.fns.values() if fn.api_name == "txt2img")
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    outputs = list(generate(Session(), "a red apple", "", "Euler", "Automatic", 3, 7.0, 64, 64, 11, 1, 1, 1, TINY,
                            **hires, hr_checkpoint_name=HIRES))
    assert f"Hires checkpoint: {HIRES} [" in outputs[-1][4]
    outputs = list(generate(Session(), "a red apple", "", "Euler", "Automatic", 3, 7.0, 64, 64, 11, 1, 1, 1, TINY,
                            **hires, hr_checkpoint_name=SAME_CHECKPOINT))
    assert "Hires checkpoint" not in outputs[-1][4] and "Hires upscale: 1.5" in outputs[-1][4]

    # Pasted parameters pick it (by name; the hash is another's), or "Use same checkpoint" where they name none.
    send = next(fn.fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", None) == "send_from_pnginfo")
    line = "a castle\nSteps: 3, Sampler: Euler, Seed: 4, Size: 64x64"
    *values, _ = send(f"{line}, Denoising strength: 0.5, Hires checkpoint: {HIRES} [0123456789]")
    assert dict(zip(TXT2IMG_FIELDS, values))["hr_checkpoint_name"]["value"] == HIRES
    *values, _ = send(line)
    assert dict(zip(TXT2IMG_FIELDS, values))["hr_checkpoint_name"] == SAME_CHECKPOINT
    with pytest.warns(UserWarning, match="Hires checkpoint not applied: 'gone \\[0123456789\\]'"):
        *values, _ = send(f"{line}, Hires checkpoint: gone [0123456789]")
    assert dict(zip(TXT2IMG_FIELDS, values))["hr_checkpoint_name"] == gr.skip()  # left as it was
    with warnings.catch_warnings():  # img2img has no hires fix: nothing to say about its checkpoint
        warnings.simplefilter("error")
        widget_updates(request_fields_from_infotext(f"{line}, Hires checkpoint: gone [0123456789]"), IMG2IMG_FIELDS,
                       [TINY], lambda name, short_hash: None)

    # The list follows the models folder when the page loads (and after the model list's refresh and a merge).
    wired = [fn.fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", None) == "read_lists"]
    assert len(wired) == 3  # page load, the model list's ↻, a merge
    read_lists = wired[0]
    shutil.copytree(models / TINY, models / "tiny-new")
    try:
        services.registry.refresh()
        lists = dict(zip([id(dropdown) for dropdown, _ in ui.txt2img.checkpoint_lists], read_lists()))
        assert lists[id(dropdown)]["choices"][0] == SAME_CHECKPOINT and "tiny-new" in lists[id(dropdown)]["choices"]
    finally:
        shutil.rmtree(models / "tiny-new")
        services.registry.refresh()


def test_a_picture_upscaler_decodes_with_the_first_models_vae_and_encodes_with_the_hires_checkpoints(
        services, models, monkeypatch):
    from diffusers import AutoencoderKL

    names = {fingerprint(AutoencoderKL.from_pretrained(models / name / "vae")): name for name in (TINY, REFINER)}
    seen = []
    for method in ("encode", "decode"):
        spy_on(monkeypatch, AutoencoderKL, method, names, seen,
               lambda name, *args, _method=method, **kwargs: (_method, name))
    run(services, **HIRES_FIX, hr_upscaler="Lanczos", hr_checkpoint_name=REFINER)
    assert seen[:2] == [("decode", TINY), ("encode", REFINER)]
