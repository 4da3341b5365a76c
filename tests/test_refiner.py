"""A1111's refiner: which UNet runs at which step, pixels against single-model runs, the main model back after,
infotext keys, refusals, the API field and the paste into the page's fields."""
import re

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tests.helpers import fingerprint, running_services, spy_on
from tests.tiny_sd import save_tiny_model
from webui.schemas import InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext

REFINER = "tiny-refiner"
QUICK = {"prompt": "a red apple", "steps": 3, "seed": 11, "sampler_name": "Euler", "save_images": False,
         "model": TINY}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner-models")
    save_tiny_model(folder / TINY)
    save_tiny_model(folder / REFINER, seed=1)
    save_tiny_model(folder / "tiny-inpainting", seed=2, in_channels=9)
    return folder


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("refiner-out"))


@pytest.fixture
def unet_calls(models, monkeypatch):
    """(model name, timestep) of every UNet call, the model told by its weights (read here from the files)."""
    from diffusers import UNet2DConditionModel

    names = {fingerprint(UNet2DConditionModel.from_pretrained(models / name / "unet")): name
             for name in (TINY, REFINER)}
    calls = []
    spy_on(monkeypatch, UNet2DConditionModel, "forward", names, calls,
           lambda name, sample, timestep, *args, **kwargs: (name, float(torch.as_tensor(timestep).flatten()[0])))
    return calls


def run(services, **fields):
    job = services.worker.submit(QUICK | fields)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def pixels(job):
    return np.asarray(job.images[0].image, np.int16)


def test_the_refiner_takes_over_at_the_first_step_past_the_switch_by_noise_level(services, unet_calls):
    job = run(services, steps=4, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    # Euler's schedule as A1111 spaces it: 999 down to 0 in 4 steps.
    assert [t for _, t in unet_calls] == pytest.approx([999, 666, 333, 0])
    # A1111 1.7's rule: a call at timestep t has done (999 - t) / 1000; from the first at 0.5 or more, the refiner.
    expected = [REFINER if (999 - round(t)) / 1000 >= 0.5 else TINY for _, t in unet_calls]
    assert [name for name, _ in unet_calls] == expected
    assert expected[0] == TINY and expected[-1] == REFINER  # the switch happened inside the run
    assert services.engine.model.entry.name == TINY  # the main model is back for the next job
    assert job.model.entry.name == TINY


@pytest.mark.parametrize("fields, expected", [
    # Euler at 4 steps, switch at 0.3: call 1 has done 0.333 of the noise but 1 call of 4 (0.25)
    ({"steps": 4, "refiner_switch_at": 0.3}, [TINY, TINY, REFINER, REFINER]),
    # Heun, 3 steps: 5 calls, reckoned against A1111's 6 (two a step); call 3 is the first at 0.45 (by noise: call 1,
    # at timestep 499.5)
    ({"steps": 3, "refiner_switch_at": 0.45, "sampler_name": "Heun"}, [TINY, TINY, TINY, REFINER, REFINER]),
])
def test_the_switch_by_sampling_steps_counts_model_calls_as_a1111_before_1_8(services, unet_calls, fields, expected):
    job = run(services, refiner_checkpoint=REFINER, refiner_switch_by_sample_steps=True, **fields)
    assert [name for name, _ in unet_calls] == expected
    assert ", Refiner switch by sampling steps: True," in job.images[0].infotext
    assert request_fields_from_infotext(job.images[0].infotext)["refiner_switch_by_sample_steps"] is True
    unet_calls.clear()
    by_noise = run(services, refiner_checkpoint=REFINER, **fields)
    assert [name for name, _ in unet_calls] != expected and "sampling steps" not in by_noise.images[0].infotext


def test_the_switch_by_sampling_steps_counts_the_steps_img2img_runs(services, unet_calls):
    """A1111's img2img sampler launches t_enc + 1 steps, the steps it runs: 3 here, so the last call has 2 of 3
    before it, past 0.6."""
    from tests.helpers import noise_picture

    services.options.update({"refiner_switch_by_sample_steps": True})  # the Settings tab's
    try:
        job = services.worker.submit(QUICK | {"steps": 4, "denoising_strength": 0.5, "refiner_checkpoint": REFINER,
                                              "refiner_switch_at": 0.6}, init_image=noise_picture(3))
        assert job.wait(120) and job.state is JobState.DONE, job.error
    finally:
        services.options.update({"refiner_switch_by_sample_steps": False})
    assert [name for name, _ in unet_calls] == [TINY, TINY, REFINER] and job.request.refiner_switch_by_sample_steps


def test_first_refiner_call_by_count_as_a1111s_step_over_total():
    from webui.engine.refiner import first_refiner_call_by_count

    assert first_refiner_call_by_count(20, 20, 1, 0.8) == 16  # 16 of 20
    assert first_refiner_call_by_count(15, 15, 1, 0.8) == 12  # 12 of 15
    assert first_refiner_call_by_count(39, 20, 2, 0.8) == 32  # Heun: 32 of 40
    assert first_refiner_call_by_count(4, 4, 1, 1.0) is None


def test_a_switch_never_reached_gives_the_main_models_picture(services, unet_calls):
    plain = run(services)
    unet_calls.clear()
    never = run(services, refiner_checkpoint=REFINER, refiner_switch_at=1.0)
    assert {name for name, _ in unet_calls} == {TINY}
    assert np.array_equal(pixels(never), pixels(plain))


def test_a_run_that_switches_differs_from_both_models_and_the_next_job_is_the_main_models_again(services):
    main = run(services)
    other = run(services, model=REFINER)
    refined = run(services, model=TINY, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    assert np.abs(pixels(refined) - pixels(main)).mean() > 1
    assert np.abs(pixels(refined) - pixels(other)).mean() > 1
    assert np.array_equal(pixels(run(services, model=None)), pixels(main))  # none named: the main one, as before


def test_the_refiner_counts_as_the_main_model_when_it_is_the_same(services, unet_calls):
    same = run(services, refiner_checkpoint=TINY, refiner_switch_at=0.3)
    assert {name for name, _ in unet_calls} == {TINY}
    assert np.array_equal(pixels(same), pixels(run(services)))


def test_every_batch_starts_with_the_main_model(services, unet_calls):
    run(services, n_iter=2, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    names = [name for name, _ in unet_calls]
    assert names == [TINY, TINY, REFINER] * 2  # 999 and 499.5 are before 0.5, 0 after


# A1111's "Hires fix: which pass to enable refiner for". The first pass's calls at 999, 499.5, 0; the second pass's
# at 333 and 0 (its last 2 of 4): all but 999 and 499.5 are past the switch at 0.5. Once the refiner took over in the
# first pass, the second runs on it whole (the model that ended the first pass).
@pytest.mark.parametrize("refiner_pass, expected", [
    (None, [TINY, TINY, TINY, REFINER, REFINER]),  # the Settings tab's: second pass, A1111's default
    ("second pass", [TINY, TINY, TINY, REFINER, REFINER]),
    ("first pass", [TINY, TINY, REFINER, REFINER, REFINER]),
    ("both passes", [TINY, TINY, REFINER, REFINER, REFINER])])
def test_with_the_hires_fix_the_refiner_takes_over_in_the_passes_the_setting_names(services, unet_calls, refiner_pass,
                                                                                   expected):
    job = run(services, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
              refiner_checkpoint=REFINER, refiner_switch_at=0.5, hires_fix_refiner_pass=refiner_pass)
    assert job.images[0].image.size == (96, 96)
    assert [name for name, _ in unet_calls] == expected
    text = job.images[0].infotext
    if refiner_pass in (None, "second pass"):  # A1111 writes it only where it is not its default
        assert "Hires refiner" not in text
        assert "hires_fix_refiner_pass" not in request_fields_from_infotext(text)
    else:
        assert f", Hires refiner: {refiner_pass}," in text
        assert request_fields_from_infotext(text)["hires_fix_refiner_pass"] == refiner_pass


def test_the_settings_tabs_refiner_pass_is_a_requests_that_gives_none(services, unet_calls):
    services.options.update({"hires_fix_refiner_pass": "first pass"})
    try:
        job = run(services, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
                  refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    finally:
        services.options.update({"hires_fix_refiner_pass": "second pass"})
    assert [name for name, _ in unet_calls] == [TINY, TINY, REFINER, REFINER, REFINER]
    assert job.request.hires_fix_refiner_pass == "first pass" and "Hires refiner: first pass" in job.images[0].infotext


def test_img2img_past_the_switch_runs_the_refiner_from_its_first_step(services, unet_calls):
    from tests.helpers import noise_picture

    job = services.worker.submit(QUICK | {"denoising_strength": 0.5, "refiner_checkpoint": REFINER,
                                          "refiner_switch_at": 0.3}, init_image=noise_picture(3))
    assert job.wait(120) and job.state is JobState.DONE, job.error
    assert unet_calls and {name for name, _ in unet_calls} == {REFINER}
    assert services.engine.model.entry.name == TINY


def test_the_infotext_names_the_refiner_as_a1111_and_pastes_back(services):
    refined = run(services, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    refiner_hash = re.search(r"Model hash: (\w+)", run(services, model=REFINER).images[0].infotext).group(1)
    text = refined.images[0].infotext
    assert f", Refiner: {REFINER} [{refiner_hash}], Refiner switch at: 0.5," in text
    pasted = request_fields_from_infotext(text)
    assert (pasted["refiner_checkpoint"], pasted["refiner_switch_at"]) == (f"{REFINER} [{refiner_hash}]", 0.5)
    assert request_fields_from_infotext(run(services).images[0].infotext)["refiner_checkpoint"] == ""
    again = run(services, **{key: pasted[key] for key in ("refiner_checkpoint", "refiner_switch_at")})
    assert np.array_equal(pixels(again), pixels(refined))


def test_the_history_keeps_the_refiner_with_the_request(services):
    job = run(services, save_images=True, refiner_checkpoint=REFINER, refiner_switch_at=0.7)
    rows, _ = services.history.list_images()
    row = next(row for row in rows if row.job_id == job.id)
    assert "Refiner switch at: 0.7" in row.infotext


@pytest.mark.parametrize("fields, message", [
    ({"refiner_checkpoint": "no-such-model"}, "refiner_checkpoint: model 'no-such-model' not found in the models "
                                              "folder; available: "),
    ({"refiner_checkpoint": "tiny-inpainting"}, "refiner_checkpoint: tiny-inpainting is a model of another kind "
                                                "(text width 32 inpainting) than the model (text width 32); pick"),
    ({"refiner_checkpoint": REFINER, "refiner_switch_at": 0}, "refiner_switch_at: must be above 0 and at most 1"),
    ({"refiner_checkpoint": REFINER, "refiner_switch_at": 1.5}, "refiner_switch_at: must be above 0 and at most 1"),
])
def test_what_cannot_run_is_refused_before_the_queue(services, fields, message):
    with pytest.raises(InvalidRequest) as refused:
        services.worker.submit(QUICK | fields)
    assert message in str(refused.value)
    if "available" in message:
        assert REFINER in str(refused.value)


@pytest.mark.parametrize("name", [None, "", "None"])
def test_no_refiner_named_is_none(services, name):
    job = services.worker.submit(QUICK | {"refiner_checkpoint": name})
    assert job.request.refiner_checkpoint is None
    assert job.wait(120) and "Refiner" not in job.images[0].infotext


def test_the_api_takes_a1111s_refiner_fields(services):
    import json

    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:
        body = {"prompt": "a red apple", "steps": 3, "seed": 11, "sampler_name": "Euler",
                "refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert f"Refiner: {REFINER} [" in infotext and "Refiner switch at: 0.5" in infotext
        # A pasted infotext brings its refiner, as A1111's does.
        r = client.post("/sdapi/v1/txt2img", json={"infotext": infotext})
        assert r.status_code == 200, r.text
        assert "Refiner switch at: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": "nope"})
        assert r.status_code == 422 and "refiner_checkpoint" in r.text
        # A1111's Hires fix: which pass to enable refiner for, by override_settings or an infotext's key
        hires = body | {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
        both = {"override_settings": {"hires_fix_refiner_pass": "both passes"}}
        r = client.post("/sdapi/v1/txt2img", json=hires | both)
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert "Hires refiner: both passes" in infotext
        r = client.post("/sdapi/v1/txt2img", json={"infotext": infotext})
        assert "Hires refiner: both passes" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json=hires | {"override_settings": {"hires_fix_refiner_pass": "all"}})
        assert r.status_code == 422 and "override_settings.hires_fix_refiner_pass" in r.text
        assert "'first pass', 'second pass' or 'both passes'" in r.text
        assert client.get("/sdapi/v1/options").json()["hires_fix_refiner_pass"] == "second pass"
        # A1111's Refiner switch by sampling steps: override_settings, an infotext's key, or its version's implication
        r = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"refiner_switch_by_sample_steps": True}})
        by_steps = json.loads(r.json()["info"])["infotexts"][0]
        assert "Refiner switch by sampling steps: True" in by_steps
        r = client.post("/sdapi/v1/txt2img", json={"infotext": by_steps})
        assert "Refiner switch by sampling steps: True" in json.loads(r.json()["info"])["infotexts"][0]
        old_a1111 = re.sub(r"Version: .*", "Version: v1.7.0", infotext)  # as A1111 1.7 wrote it
        r = client.post("/sdapi/v1/txt2img", json={"infotext": old_a1111})
        assert "Refiner switch by sampling steps: True" in json.loads(r.json()["info"])["infotexts"][0]


def test_a_pasted_infotext_sets_the_refiner_fields_of_both_tabs(services):
    from webui.ui.blocks import create_ui
    from webui.ui.generation import Session
    from webui.ui.params import IMG2IMG_FIELDS, TXT2IMG_FIELDS

    ui = create_ui(services)
    send = next(fn.fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", None) == "send_from_pnginfo")
    text = f"a castle\nSteps: 3, Sampler: Euler, Seed: 4, Size: 64x64, Refiner: {REFINER} [0123456789], " \
           "Refiner switch at: 0.6"
    *values, _ = send(text)
    by_field = dict(zip(TXT2IMG_FIELDS, values))
    assert by_field["refiner"] is True and by_field["refiner_switch_at"] == 0.6
    assert by_field["refiner_checkpoint"]["value"] == REFINER  # found by its name (the hash is another's)
    *values, _ = send("a castle\nSteps: 3, Sampler: Euler, Seed: 4, Size: 64x64")
    assert dict(zip(TXT2IMG_FIELDS, values))["refiner"] is False  # a picture made without one unticks it
    assert {"refiner", "refiner_checkpoint", "refiner_switch_at"} <= set(IMG2IMG_FIELDS)

    # The tab's Generate takes the section's widgets: ticked with a checkpoint, the job has the refiner.
    generate = next(fn.fn for fn in ui.blocks.fns.values() if fn.api_name == "txt2img")
    outputs = list(generate(Session(), "a red apple", "", "Euler", "Automatic", 3, 7.0, 64, 64, 11, 1, 1, 1, TINY,
                            refiner=True, refiner_checkpoint=REFINER, refiner_switch_at=0.5))
    assert f"Refiner: {REFINER} [" in outputs[-1][4] and "Refiner switch at: 0.5" in outputs[-1][4]
    outputs = list(generate(Session(), "a red apple", "", "Euler", "Automatic", 3, 7.0, 64, 64, 11, 1, 1, 1, TINY,
                            refiner=False, refiner_checkpoint=REFINER))
    assert "Refiner" not in outputs[-1][4]



@pytest.mark.parametrize("stop", ["skip", "cancel"])
def test_skip_or_interrupt_after_the_switch_leaves_the_main_model_loaded(services, unet_calls, monkeypatch, stop):
    from diffusers import UNet2DConditionModel

    job = None
    spy = UNet2DConditionModel.forward

    def stop_at_the_refiner(self, *args, **kwargs):
        output = spy(self, *args, **kwargs)
        if unet_calls[-1][0] == REFINER and len(unet_calls) <= 4:  # in the first batch
            getattr(services.worker, stop)(job.id)
        return output

    monkeypatch.setattr(UNet2DConditionModel, "forward", stop_at_the_refiner)
    job = services.worker.submit(QUICK | {"steps": 4, "n_iter": 2, "refiner_checkpoint": REFINER,
                                          "refiner_switch_at": 0.5})
    assert job.wait(120)
    names = [name for name, _ in unet_calls]
    assert names[:3] == [TINY, TINY, REFINER]  # stopped after the refiner's first call
    assert job.images[0].unfinished  # shown as it stood, decoded by the refiner, as A1111 shows it
    if stop == "skip":
        assert job.state is JobState.DONE and names[3:] == [TINY, TINY, REFINER, REFINER]
        assert not job.images[1].unfinished
    else:
        assert job.state is JobState.CANCELLED and len(names) == 3
    assert services.engine.model.entry.name == TINY
