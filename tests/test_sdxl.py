"""SDXL base models: loading (a diffusers folder, a single file in the sgm layout, the shipped configs), A1111's SDXL
conditioning, the passes (txt2img, img2img, inpainting, the hires fix, prompt editing), the features refused with what
to do, and the worker's and the API's runs, on a tiny random SDXL (tests/tiny_sdxl.py)."""
from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import finished_job, loaded_engine, noise_picture, running_services
from tests.tiny_sd import save_tiny_model
from tests.tiny_sdxl import CLIP_L_WIDTH, make_tiny_sdxl_pipeline, save_tiny_sdxl_model
from webui.config import Settings
from webui.engine.generate import Engine
from webui.engine.models import ModelRegistry
from webui.engine.prompts import encode_sdxl_pair
from webui.engine.img2img import image_sha1
from webui.schemas import GenerationRequest, InvalidRequest
from webui.storage.infotext import request_fields_from_infotext

XL, SD = "tiny-xl", "tiny-sd"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-models")
    save_tiny_sdxl_model(folder / XL)
    save_tiny_model(folder / SD)
    return folder


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return loaded_engine(models, XL, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("sdxl-out"), ckpt=XL)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.int16)


def draw(engine, seeds=(1,), **fields) -> list[np.ndarray]:
    request = GenerationRequest(**{"prompt": "a red apple", "steps": 2} | fields)
    return [pixels(result.image) for result in engine.generate(request, list(seeds))]


# --- loading -------------------------------------------------------------------------------------------
def test_a_diffusers_folder_loads_as_sdxl_at_its_native_size(engine):
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(engine.pipe, StableDiffusionXLPipeline) and engine.model.sdxl
    assert (engine.model.native_width, engine.model.native_height) == (64, 64)
    assert engine.pipe.tokenizer_2.pad_token == "!"


def test_a_single_file_in_the_sgm_layout_loads_with_the_exact_weights(tmp_path):
    from safetensors.torch import save_file

    from tests._single_file_ldm import sdxl_pipeline_to_sgm
    from webui.engine.single_file import load_single_file_pipeline

    pipe = make_tiny_sdxl_pipeline(seed=3)
    path = tmp_path / "tiny-xl.safetensors"
    save_file(sdxl_pipeline_to_sgm(pipe), path)
    loaded = load_single_file_pipeline(path, config_dir=save_tiny_sdxl_model(tmp_path / "configs"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline" and loaded.tokenizer_2.pad_token == "!"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), part


def test_the_shipped_sdxl_configs_build_sdxl_base_1_0s_parts():
    """Their parameter counts are SDXL 1.0 base's published ones; its VAE scales latents by 0.13025 and upcasts."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from webui.engine.single_file import CONFIG_ROOT

    folder = CONFIG_ROOT / "sdxl-base"
    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")),
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert parts["vae"].config.scaling_factor == 0.13025 and parts["vae"].config.force_upcast
    assert parts["unet"].config.sample_size * 8 == 1024
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(folder, subfolder="scheduler"))
    assert (scheduler.config.timestep_spacing, scheduler.config.steps_offset) == ("leading", 1)


def test_a_refiner_folder_is_refused_naming_what_to_load(models, tmp_path):
    import json
    import shutil

    from webui.engine.loader import ModelLoadError

    folder = tmp_path / "models" / "refiner"
    shutil.copytree(models / XL, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"text_encoder": [None, None],
                                                                 "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    engine = Engine(Settings(models_dir=folder.parent, device="cpu"), ModelRegistry(folder.parent, tmp_path / "h.json"))
    with pytest.raises(ModelLoadError, match="refiner is an SDXL refiner .* pick an SDXL base model"):
        engine.load("refiner")


# --- the conditioning ----------------------------------------------------------------------------------
def test_a_plain_prompt_is_conditioned_as_diffusers_conditions_sdxl(engine):
    pipe = engine.pipe
    with torch.no_grad():
        ours = encode_sdxl_pair(pipe, ["a red apple"], ["blurry"])
        theirs = pipe.encode_prompt("a red apple", device="cpu", do_classifier_free_guidance=True,
                                    negative_prompt="blurry")
        zeroed = pipe.encode_prompt("a red apple", device="cpu", do_classifier_free_guidance=True)
        empty = encode_sdxl_pair(pipe, ["a red apple"], [""])
    for mine, reference in zip(ours, theirs):  # prompt, negative, pooled prompt, pooled negative
        assert mine.shape == reference.shape and torch.allclose(mine, reference, atol=1e-6)
    assert ours[0].shape == (1, 77, 64)  # CLIP-L's 24 and bigG's 40, side by side
    for mine, reference in zip(empty[1::2], zeroed[1::2]):  # an empty negative prompt: zeros, as A1111 and diffusers
        assert not mine.any() and torch.equal(mine, reference)


def test_emphasis_weighs_each_encoders_half_on_its_own_and_leaves_the_pooled_vector(engine):
    with torch.no_grad():
        plain, _, plain_pooled, _ = encode_sdxl_pair(engine.pipe, ["a red apple"], ["x"])
        weighted, _, weighted_pooled, _ = encode_sdxl_pair(engine.pipe, ["a (red:1.5) apple"], ["x"])
    assert not torch.allclose(plain, weighted)
    for half in (slice(None, CLIP_L_WIDTH), slice(CLIP_L_WIDTH, None)):  # A1111 restores each encoder's mean
        assert torch.allclose(plain[..., half].mean(), weighted[..., half].mean(), atol=1e-6)
    assert torch.equal(plain_pooled, weighted_pooled)


def test_a_long_prompt_takes_two_chunks_and_its_pooled_vector_is_the_first_chunks(engine):
    words = ", ".join(["apple"] * 50)
    with torch.no_grad():
        long, negative, pooled, _ = encode_sdxl_pair(engine.pipe, [words + ", pear, plum"], ["x"])
        first, _, first_pooled, _ = encode_sdxl_pair(engine.pipe, [words], ["x"])
    assert long.shape == (1, 154, 64) and negative.shape == (1, 154, 64)  # the negative padded to the prompt's
    assert torch.allclose(pooled, first_pooled, atol=1e-6)


def test_clip_skip_is_ignored_as_a1111_does_for_sdxl(engine):
    assert (draw(engine, clip_skip=2)[0] == draw(engine, clip_skip=1)[0]).all()
    assert (draw(engine, clip_skip=3, sdxl_clip_l_skip=False)[0] == draw(engine, clip_skip=1)[0]).all()


def test_clip_skip_sdxl_reads_clip_skip_in_clip_l_alone_without_its_final_norm(engine):
    """A1111's Clip skip SDXL: CLIP-L's hidden states that far from the end; bigG's penultimate layer as always."""
    pipe = engine.pipe

    def layers(encoder, tokenizer, text):
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return encoder(ids, output_hidden_states=True).hidden_states

    with torch.no_grad():
        clip_l, big_g = layers(pipe.text_encoder, pipe.tokenizer, "a red apple"), layers(
            pipe.text_encoder_2, pipe.tokenizer_2, "a red apple")
        default = encode_sdxl_pair(pipe, ["a red apple"], ["x"])[0]
        for skip in (1, 3):
            skipped = encode_sdxl_pair(pipe, ["a red apple"], ["x"], clip_l_skip=skip)[0]
            assert torch.allclose(skipped[0, :, :CLIP_L_WIDTH], clip_l[-skip][0], atol=1e-6)
            assert torch.allclose(skipped[0, :, CLIP_L_WIDTH:], big_g[-2][0], atol=1e-6)
        assert torch.equal(encode_sdxl_pair(pipe, ["a red apple"], ["x"], clip_l_skip=2)[0], default)
    on = draw(engine, clip_skip=1, sdxl_clip_l_skip=True)[0]
    assert (on != draw(engine, clip_skip=1)[0]).any()
    assert (draw(engine, clip_skip=2, sdxl_clip_l_skip=True)[0] == draw(engine, clip_skip=1)[0]).all()
    assert (draw(engine, prompt="a red apple AND a pear", clip_skip=1, sdxl_clip_l_skip=True)[0]
            != draw(engine, prompt="a red apple AND a pear", clip_skip=1)[0]).any()  # composed prompts read it too


# --- the passes ----------------------------------------------------------------------------------------
def test_txt2img_draws_the_same_picture_from_the_same_seed_and_batch_images_equal_single_runs(engine):
    first, again, other = draw(engine, [5]), draw(engine, [5]), draw(engine, [6])
    assert first[0].shape == (64, 64, 3) and first[0].std() > 0
    assert (first[0] == again[0]).all() and not (first[0] == other[0]).all()
    batch = draw(engine, [5, 6], batch_size=2)
    for image, alone in zip(batch, (first[0], other[0])):  # a batch's arithmetic rounds a little otherwise
        assert np.abs(image - alone).max() <= 2


@pytest.mark.parametrize("sampler, schedule", [("Euler", "Automatic"), ("DPM++ 2M", "Karras"), ("DDIM", "Automatic")])
def test_samplers_and_schedule_types_run(engine, sampler, schedule):
    [picture] = draw(engine, [5], sampler_name=sampler, scheduler=schedule)
    assert picture.shape == (64, 64, 3) and not (picture == draw(engine, [5])[0]).all()


def test_a_variation_seed_moves_the_picture_and_reproduces(engine):
    request = GenerationRequest(prompt="a red apple", steps=2, subseed_strength=0.5)
    varied = [pixels(engine.generate(request, [5], subseeds=[9])[0].image) for _ in range(2)]
    assert (varied[0] == varied[1]).all() and not (varied[0] == draw(engine, [5])[0]).all()


def test_the_size_conditioning_is_the_passes_size_with_no_crop(engine, monkeypatch):
    unet, seen = engine.pipe.unet, []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: seen.append(k["added_cond_kwargs"]["time_ids"]) or
                        forward(*a, **k))
    draw(engine, width=96, height=64, enable_hr=True, hr_scale=2, denoising_strength=0.5)
    assert seen[0][0].tolist() == [64, 96, 0, 0, 64, 96]  # (height, width) original and target, crop (top, left)
    assert seen[-1][0].tolist() == [128, 192, 0, 0, 128, 192]  # the hires pass's own size, as in A1111


def test_prompt_editing_switches_both_embeddings_at_its_step(engine, monkeypatch):
    unet, seen = engine.pipe.unet, []
    forward = unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        seen.append((encoder_hidden_states[1:], kwargs["added_cond_kwargs"]["text_embeds"][1:]))
        return forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    draw(engine, prompt="a [cat:dog:0.5]", steps=4, sampler_name="Euler")
    with torch.no_grad():
        cat = encode_sdxl_pair(engine.pipe, ["a cat"], [""])
        dog = encode_sdxl_pair(engine.pipe, ["a dog"], [""])
    read = ["cat" if torch.allclose(hidden, cat[0]) and torch.allclose(pooled, cat[2]) else
            "dog" if torch.allclose(hidden, dog[0]) and torch.allclose(pooled, dog[2]) else "?" for hidden, pooled in seen]
    # A1111's schedule: [cat:dog:0.5] of 4 steps ends cat's stretch at step 2, read up to and including the step
    # numbered 2 from 0, so dog is read by the last call only (the SD path's rule, test_prompt_schedule.py)
    assert read == ["cat", "cat", "cat", "dog"]


def test_img2img_and_the_hires_fix_run(engine):
    picture = noise_picture(4)
    request = GenerationRequest(prompt="a red apple", steps=4, denoising_strength=0.5, init_image=image_sha1(picture))
    [result] = engine.generate(request, [5], init_image=picture)
    assert result.image.size == (64, 64) and not (pixels(result.image) == pixels(picture)).all()
    [hires] = draw(engine, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_upscaler="Lanczos")
    assert hires.shape == (96, 96, 3)


def test_live_previews_come_during_the_run(engine):
    seen = []
    engine.generate(GenerationRequest(prompt="a red apple", steps=3), [1],
                    lambda step, steps, latents: latents is not None and seen.append(engine.preview(latents)))
    assert len(seen) == 3 and seen[0].size == (64, 64)


def test_a_full_size_sdxl_vae_previews_with_sdxls_latent_colours():
    from webui.engine.preview import latents_to_preview

    def vae(scaling_factor):  # a full-size VAE (no small one to decode with): the linear map is used
        return SimpleNamespace(parameters=lambda: [torch.empty(6_000_000, device="meta")],
                               config=SimpleNamespace(scaling_factor=scaling_factor))

    latents = torch.zeros(1, 4, 2, 2)
    latents[:, 0] = 1  # the first channel's colour: (1 + its row of factors) / 2
    assert latents_to_preview(latents, vae(0.13025)).getpixel((0, 0)) == (171, 181, 184)  # A1111's SDXL factors
    assert latents_to_preview(latents, vae(0.18215)).getpixel((0, 0)) == (165, 154, 154)  # SD's


def test_tiling_makes_a_picture_that_wraps_around(engine):
    [tiled], [plain] = draw(engine, [3], tiling=True), draw(engine, [3])
    assert not (tiled == plain).all()


# --- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, named", [
    ({"prompt": "a cat", "enable_hr": True, "hr_prompt": "a cat <hypernet:anime:1>"}, "hr_prompt: <hypernet:...>"),
    ({"prompt": "a cat <hypernet:anime:1>"}, "prompt: <hypernet:...> tags are not applied to SDXL models yet"),
])
def test_what_sdxl_cannot_run_yet_is_refused_before_it_runs_naming_the_feature(services, engine, fields, named):
    request = {"prompt": "a cat", "steps": 2} | fields
    with pytest.raises(InvalidRequest, match=named):
        services.worker.check(request)
    with pytest.raises(ValueError, match=named):  # and by the engine itself, whoever calls it
        engine.generate(GenerationRequest(**request), [1])


def test_a_job_naming_an_sdxl_model_that_is_not_loaded_is_refused_at_submit(services):
    try:
        services.worker.load_model(SD)
        with pytest.raises(InvalidRequest, match="not applied to SDXL models"):
            services.worker.check({"prompt": "a <hypernet:x>", "steps": 2, "model": XL})
        services.worker.check({"prompt": "a AND b", "steps": 2, "model": XL})  # what SDXL runs passes
    finally:
        services.worker.load_model(XL)


@pytest.mark.parametrize("field", ["hr_checkpoint_name", "refiner_checkpoint"])
def test_a_checkpoint_of_the_other_kind_is_refused_as_hires_checkpoint_or_refiner(services, field):
    extra = {"enable_hr": True, "denoising_strength": 0.5} if field == "hr_checkpoint_name" else {}
    with pytest.raises(InvalidRequest, match=f"{field}: {SD} is a model of another kind \\(text width 32\\) than the "
                                             "model \\(SDXL\\)"):
        services.worker.check({"prompt": "a cat", "steps": 2, field: SD} | extra)


def test_training_on_an_sdxl_model_is_refused(engine):
    from webui.engine.training import TrainingError, prepare

    for kind in ("embedding", "hypernetwork"):
        with pytest.raises(TrainingError, match=f"SDXL model, which cannot train {kind}s yet"):
            prepare(engine, SimpleNamespace(kind=kind))


# --- the worker and the API ------------------------------------------------------------------------------
def test_a_job_writes_a1111s_infotext_keys_and_a_history_row(services):
    job = finished_job(services, {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 11,
                                  "cfg_scale": 6})
    [image] = job.images
    info = image.infotext
    assert info.startswith("a red apple\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Schedule type: ")
    for key in ("CFG scale: 6", "Seed: 11", "Size: 64x64", f"Model: {XL}", "Model hash: "):
        assert key in info
    assert services.history.get_job(job.id) is not None


def test_img2img_and_inpainting_jobs_keep_what_the_mask_keeps(services):
    picture = noise_picture(8)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = finished_job(services, {"prompt": "a red apple", "steps": 3, "denoising_strength": 0.75, "mask_blur": 0},
                       init_image=picture, mask=mask)
    result = pixels(job.images[0].image)
    outside = np.asarray(mask) == 0
    assert (result[outside] == pixels(picture)[outside]).all()
    assert not (result[20:44, 20:44] == pixels(picture)[20:44, 20:44]).all()


def test_a_soft_inpainting_job_runs(services):
    picture, mask = noise_picture(9), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = finished_job(services, {"prompt": "a red apple", "steps": 3, "denoising_strength": 0.75, "mask_blur": 4,
                                  "soft_inpainting": True}, init_image=picture, mask=mask)
    change = np.abs(pixels(job.images[0].image) - pixels(picture))
    assert 2 * change[:4, :4].mean() < change[28:36, 28:36].mean()  # blended: the far corner nearly kept, the middle drawn


def test_the_api_txt2img_draws_with_the_sdxl_model(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    with TestClient(create_api_app(services)) as client:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "steps": 2, "seed": 3,
                                                         "override_settings": {"sd_model_checkpoint": XL}})
        assert answer.status_code == 200, answer.text
        picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert picture.size == (64, 64)
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": "a <hypernet:x:1>", "steps": 2})
        assert refused.status_code in (400, 422) and "SDXL" in refused.text


def test_clip_skip_sdxl_comes_from_the_settings_or_override_settings_and_goes_into_the_infotext_and_back(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    body = {"prompt": "a red apple", "steps": 2, "seed": 3, "clip_skip": 1}

    def infotext(answer):
        assert answer.status_code == 200, answer.text
        return json.loads(answer.json()["info"])["infotexts"][0]

    with TestClient(create_api_app(services)) as client:
        plain = client.post("/sdapi/v1/txt2img", json=body)
        overridden = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sdxl_clip_l_skip": True}})
        pasted = client.post("/sdapi/v1/txt2img", json=body | {"infotext": infotext(overridden)})
        assert client.post("/sdapi/v1/options", json={"sdxl_clip_l_skip": True}).status_code == 200
        try:
            from_settings = client.post("/sdapi/v1/txt2img", json=body)
        finally:
            client.post("/sdapi/v1/options", json={"sdxl_clip_l_skip": False})
    assert "Clip skip SDXL" not in infotext(plain)
    for answer in (overridden, pasted, from_settings):
        assert "Clip skip SDXL: True" in infotext(answer)
        assert answer_pixels(answer) == answer_pixels(overridden)
    assert answer_pixels(plain) != answer_pixels(overridden)
    ours_off = request_fields_from_infotext(infotext(plain))
    assert ours_off["sdxl_clip_l_skip"] is False  # ours without the key: made with it off, whatever the Settings say
    assert "sdxl_clip_l_skip" not in request_fields_from_infotext("x\nSteps: 2, Seed: 1, Sampler: Euler")  # A1111's


def answer_pixels(answer) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).tobytes()


@pytest.mark.parametrize("field", ["refiner_checkpoint", "hr_checkpoint_name"])
def test_another_sdxl_model_takes_over_as_refiner_or_hires_checkpoint(models, tmp_path, field):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(models / XL, folder / XL)
    save_tiny_sdxl_model(folder / "other-xl", seed=7)
    two = Engine(Settings(models_dir=folder, device="cpu"), ModelRegistry(folder, tmp_path / "h.json"))
    two.load(XL)
    extra = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5} if field == "hr_checkpoint_name" else {
        "refiner_switch_at": 0.5}
    [taken_over] = draw(two, [4], steps=4, **{field: "other-xl"} | extra)
    [alone] = draw(two, [4], steps=4, **extra)
    assert taken_over.shape == alone.shape and not (taken_over == alone).all()
    assert two.model.entry.name == XL  # the model again after the run, as A1111
