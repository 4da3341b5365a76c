"""DDIM CFG++ (webui/engine/ddim_cfgpp.py) against A1111's formulas, and through the engine, the infotext and the API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from webui.engine.instruct_pix2pix import edit_problem
from webui.engine.samplers import a1111_timestep_levels, make_scheduler
from webui.engine.step_options import StepOptions, draws_noise, use_step_options
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext
from tests.helpers import noise_picture
from tests.test_samplers import SD15_SCHEDULER

SHAPE = (2, 4, 8, 8)


def negative(x: torch.Tensor, t: float) -> torch.Tensor:
    """A stand-in model's prediction for the negative prompt."""
    return 0.3 * x + 0.05 + t / 2000


def positive(x: torch.Tensor, t: float) -> torch.Tensor:
    return 0.25 * x - 0.1 + torch.linspace(-0.2, 0.2, x.shape[-1])


def to_epsilon(prediction: torch.Tensor, x: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    return alpha ** 0.5 * prediction + (1 - alpha) ** 0.5 * x if kind == "v_prediction" else prediction


def a1111_ddim_cfgpp(x: torch.Tensor, steps: int, cfg: float, eta: float, seeds: list[int], kind: str) -> torch.Tensor:
    """A1111's ddim_cfgpp worked out here: the CFG scale over 12.5, x0 from the guided noise, the direction along the
    negative prompt's noise, eta's noise from each image's generator; on A1111's timesteps (every 1000 // steps from
    t=1, clipped to 999), its loop calling the model at each but the lowest, where it ends."""
    config = make_scheduler(SD15_SCHEDULER | {"prediction_type": kind}, "DDIM", "Automatic")
    alphas_cumprod = config.alphas_cumprod.double()
    timesteps = [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    x = x.double()
    for index in range(len(timesteps) - 1, 0, -1):
        t = timesteps[index]
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[timesteps[index - 1]].item()
        uncond = to_epsilon(negative(x, t), x, a_t, kind)
        cond = to_epsilon(positive(x, t), x, a_t, kind)
        e_t = uncond + cfg / 12.5 * (cond - uncond)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generators]).double()
        x = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * uncond + (sigma * noise if eta else 0)
    return x.float()


def ours(x: torch.Tensor, steps: int, cfg: float, eta: float, seeds: list[int], kind: str) -> torch.Tensor:
    """Our scheduler as the pipeline runs it: guided output in, the negative rows left with it by the hook."""
    scheduler = make_scheduler(SD15_SCHEDULER | {"prediction_type": kind}, "DDIM CFG++", "Automatic", from_noise=True)
    use_step_options(scheduler, "DDIM CFG++", StepOptions(eta_ddim=eta))
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for t in scheduler.timesteps:
        uncond, cond = negative(x, float(t)), positive(x, float(t))
        scheduler.uncond = uncond
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x, eta=0.0, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps, cfg, eta", [(10, 7.0, 0.0), (20, 12.5, 0.0), (8, 3.0, 0.6), (30, 7.0, 0.3)])
def test_ddim_cfgpp_steps_as_a1111s(kind, steps, cfg, eta):
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    expected = a1111_ddim_cfgpp(start, steps, cfg, eta, [5, 6], kind)
    torch.testing.assert_close(ours(start, steps, cfg, eta, [5, 6], kind), expected, atol=2e-5, rtol=1e-5)


def test_ddim_cfgpp_is_not_ddim_and_without_negative_rows_is_ddim_on_the_prediction():
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ddim = make_scheduler(SD15_SCHEDULER, "DDIM", "Automatic")
    cfgpp = make_scheduler(SD15_SCHEDULER, "DDIM CFG++", "Automatic")
    for scheduler in (ddim, cfgpp):
        scheduler.set_timesteps(10)
    t = ddim.timesteps[0]
    prediction = positive(start, float(t))
    plain = ddim.step(prediction, t, start).prev_sample
    torch.testing.assert_close(cfgpp.step(prediction, t, start).prev_sample, plain)  # no rows recorded: CFG scale 1
    cfgpp.set_timesteps(10)
    cfgpp.uncond = negative(start, float(t))
    assert not torch.allclose(cfgpp.step(prediction, t, start).prev_sample, plain, atol=1e-3)
    assert cfgpp.uncond is None  # used once: a later call without rows does not read a stale one


def test_it_follows_eta_ddim_and_draws_noise_only_then():
    assert StepOptions(eta_ddim=0.4).followed("DDIM CFG++") == {"eta_ddim": 0.4}
    assert draws_noise("DDIM CFG++", StepOptions(eta_ddim=0.4), 20)
    assert not draws_noise("DDIM CFG++", StepOptions(), 20)


def test_an_instruct_pix2pix_models_image_guidance_refuses_it():
    request = GenerationRequest(prompt="make it snow", sampler_name="ddim_cfgpp", init_image="0" * 40,
                                image_cfg_scale=1.5)
    assert edit_problem(request).startswith("sampler_name: DDIM CFG++ does not run with an instruct-pix2pix")
    assert edit_problem(request.model_copy(update={"image_cfg_scale": 1.0})) is None
    assert edit_problem(request.model_copy(update={"sampler_name": "DDIM"})) is None


QUICK = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 4, "seed": 11, "width": 64, "height": 64}


def pixels(engine, **fields) -> np.ndarray:
    request = GenerationRequest(**(QUICK | fields))
    [result] = engine.generate(request, [request.seed])
    return np.asarray(result.image, dtype=np.int16)


def test_the_engine_runs_it_along_the_negative_prompt(engine):
    cfgpp = pixels(engine, sampler_name="DDIM CFG++", cfg_scale=7.0)
    assert np.array_equal(pixels(engine, sampler_name="DDIM CFG++", cfg_scale=7.0), cfgpp)  # reproduces
    assert not np.array_equal(pixels(engine, sampler_name="DDIM", cfg_scale=7.0), cfgpp)
    # the negative prompt's prediction leads it: another negative prompt, another picture
    assert not np.array_equal(pixels(engine, sampler_name="DDIM CFG++", negative_prompt="rain"), cfgpp)
    # at CFG scale 1 no negative rows run: DDIM on the prompt alone
    assert np.array_equal(pixels(engine, sampler_name="DDIM CFG++", cfg_scale=1.0),
                          pixels(engine, sampler_name="DDIM", cfg_scale=1.0))
    assert not np.array_equal(pixels(engine, sampler_name="DDIM CFG++", eta_ddim=0.8), cfgpp)


def test_a_batch_keeps_each_images_negative_rows(engine):
    request = GenerationRequest(**(QUICK | {"sampler_name": "DDIM CFG++", "batch_size": 2}))
    batch = engine.generate(request, [11, 12])
    for result, seed in zip(batch, [11, 12]):
        single = pixels(engine, sampler_name="DDIM CFG++", seed=seed)
        assert np.abs(np.asarray(result.image, dtype=np.int16) - single).max() <= 2


def test_the_infotext_and_the_api_name_it(services):
    from fastapi.testclient import TestClient

    from tests.helpers import finished_job
    from webui.api import create_api_app

    image = finished_job(services, QUICK | {"sampler_name": "DDIM CFG++", "eta_ddim": 0.5,
                                            "eta_noise_seed_delta": 5}).images[0]
    assert "Sampler: DDIM CFG++" in image.infotext and "Eta DDIM: 0.5" in image.infotext and "ENSD: 5" in image.infotext
    pasted = request_fields_from_infotext(image.infotext)
    assert (pasted["sampler_name"], pasted["eta_ddim"]) == ("DDIM CFG++", 0.5)
    with TestClient(create_api_app(services)) as client:
        listed = {item["name"]: item for item in client.get("/sdapi/v1/samplers").json()}
        made = client.post("/sdapi/v1/txt2img", json=QUICK | {"sampler_name": "ddim_cfgpp"})
    assert listed["DDIM CFG++"]["aliases"] == ["ddim_cfgpp"]
    assert made.status_code == 200 and "Sampler: DDIM CFG++" in made.json()["info"]


@pytest.mark.parametrize("fields", [{}, {"batch_size": 2}, {"skip_early_cond": 0.5}])
def test_each_step_gets_the_negative_rows_of_its_own_model_call(engine, monkeypatch, fields):
    """The rows the hook keeps are the UNet's negative-prompt rows of the call the step follows (a skipped call's:
    the positive rows standing in, as A1111's)."""
    from webui.engine.ddim_cfgpp import DDIMCFGPPScheduler

    request = GenerationRequest(**(QUICK | {"sampler_name": "DDIM CFG++", "negative_prompt": "fog"} | fields))
    images = request.batch_size
    outputs, kept = [], []
    step = DDIMCFGPPScheduler.step

    def spying_step(self, *args, **kwargs):
        kept.append(self.uncond.clone())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DDIMCFGPPScheduler, "step", spying_step)
    handle = engine.pipe.unet.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].detach().clone()))
    try:
        engine.generate(request, list(range(11, 11 + images)))
    finally:
        handle.remove()
    calls = len(a1111_timestep_levels(request.steps)) - 1  # A1111's timesteps on the tiny model's leading spacing
    assert len(kept) == len(outputs) == calls
    for call, (rows, output) in enumerate(zip(kept, outputs)):
        torch.testing.assert_close(rows, output[:images], msg=f"call {call}")
    # a call that skipped its negative rows (Skip Early CFG: the first half of the pass) has the positive ones there
    stood_in = [torch.equal(output[:images], output[images:]) for output in outputs]
    assert stood_in == [fields.get("skip_early_cond", 0) > 0 and call / request.steps <= 0.5
                        for call in range(calls)]


def test_a_pass_on_it_runs_uncompiled_and_is_not_counted_as_a_compiled_shape(engine):
    """The negative rows it keeps would be a CUDA graph's to overwrite: such a pass runs eager, and the compile
    bookkeeping (what a first run at a size compiles, and says so) must not count it."""
    def unet_keys(**fields):
        return engine._shape_keys(GenerationRequest(**(QUICK | fields)), 1)["UNet"]

    assert unet_keys(sampler_name="DDIM") and not unet_keys(sampler_name="DDIM CFG++")
    hires = {"enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.5}
    both = unet_keys(sampler_name="DDIM", **hires)
    assert len(both) == 2
    assert unet_keys(sampler_name="DDIM", hr_sampler_name="DDIM CFG++", **hires) < both  # the first pass alone


def _timesteps_called(engine) -> tuple[list[float], object]:
    seen = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])),
        with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("strength", [1.0, 0.95, 0.75])
def test_img2img_and_the_hires_fix_run_a1111s_levels_below_t_enc_at_any_strength(engine, strength):
    """As A1111's sample_img2img: the levels below t_enc (int(steps x strength), the strength kept below 1; the hires
    steps less one), called from the one below where the picture is noised to (tests/test_samplers.py). A pass whose
    tail is the whole schedule (strength 1, or 0.95 at 20 steps) is one too: diffusers' img2img must not cut a tail
    from it (found by review when txt2img's layout reached it)."""

    t_enc = int(20 * min(strength, 0.999))
    hires_schedule = int(10 / min(strength, 0.999))
    seen, hook = _timesteps_called(engine)
    try:
        engine.generate(GenerationRequest(prompt="a", width=64, height=64, steps=20, sampler_name="DDIM",
                                          denoising_strength=strength, init_image="0" * 40), [1],
                        init_image=noise_picture(1))
        assert seen == [float(t) for t in a1111_timestep_levels(20)[1:t_enc][::-1]], seen
        seen.clear()
        engine.generate(GenerationRequest(prompt="a", width=64, height=64, steps=20, sampler_name="DDIM",
                                          enable_hr=True, hr_scale=1.5, hr_second_pass_steps=10,
                                          denoising_strength=strength, hr_upscaler="Latent"), [1])
        assert seen[:19] == list(range(951, 50, -50))
        assert seen[19:] == [float(t) for t in a1111_timestep_levels(hires_schedule)[1:9][::-1]], seen
    finally:
        hook.remove()


def test_always_discard_next_to_last_sigma_gives_a_ddim_pass_one_level_more(engine):
    """As A1111's get_timesteps: at 20 steps 21 calls from t=988 down to t=48, the infotext saying so; img2img's
    pass likewise on the levels of 21 steps, below t_enc."""
    seen, hook = _timesteps_called(engine)
    asked = dict(prompt="a", width=64, height=64, steps=20, sampler_name="DDIM", always_discard_next_to_last_sigma=True)
    try:
        engine.generate(GenerationRequest(**asked), [1])
        assert seen == [float(t) for t in a1111_timestep_levels(21)[1:][::-1]] and len(seen) == 21, seen
        seen.clear()
        engine.generate(GenerationRequest(**asked, init_image="0" * 40), [1], init_image=noise_picture(1))
        assert seen == [float(t) for t in a1111_timestep_levels(21)[1:15][::-1]], seen  # t_enc 15 at 0.75
    finally:
        hook.remove()
    assert GenerationRequest(**asked).discard_changes_a_pass
    assert GenerationRequest(**asked, init_image="0" * 40).discard_changes_a_pass
    assert not GenerationRequest(**asked | {"sampler_name": "UniPC"}).discard_changes_a_pass


@pytest.mark.parametrize("steps", [20, 51])
def test_ddim_prompt_editing_switches_at_a1111s_call(engine, steps):
    """A1111 reads the prompt schedule by the call, a step a call on its timesteps: [cat:dog:15] is cat through its
    step 15 and dog from call 16 (counted from 0), also where its layout makes more calls than steps (52 at 51
    steps; read in proportion, from call 17). Found by review."""
    texts = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda _m, _args, kwargs: texts.append(kwargs["encoder_hidden_states"][-1].clone()), with_kwargs=True)
    try:
        engine.generate(GenerationRequest(prompt="[cat:dog:15]", width=64, height=64, steps=steps,
                                          sampler_name="DDIM", cfg_scale=5), [1])
    finally:
        hook.remove()
    first_dog = next(call for call, text in enumerate(texts) if not torch.equal(text, texts[0]))
    assert first_dog == 16, (len(texts), first_dog)
