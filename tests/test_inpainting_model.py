"""Models made for inpainting (a 9-channel UNet): they load, and txt2img, img2img, the hires fix and inpainting
run on them with the extra channels A1111 gives them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import inpainting_model_engine, noise_picture
from tests.tiny_sd import save_tiny_model
from webui.engine.fast_path import compile_choice
from webui.engine.img2img import image_sha1
from webui.engine.inpaint import prepare_inpainting, read_mask
from webui.engine.inpainting_model import masked_picture_input
from webui.schemas import GenerationRequest


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny model with a 9-channel UNet, loaded from a diffusers folder, recording what its UNet reads."""
    return inpainting_model_engine(tmp_path_factory.mktemp("models"))


def run(engine, request, seeds=(3,), **pictures) -> list[np.ndarray]:
    engine.unet_inputs.clear()
    return [np.asarray(r.image, np.int16) for r in engine.generate(request, list(seeds), **pictures)]


def test_txt2img_reads_the_mask_of_everything_and_a_grey_picture(engine):
    [image] = run(engine, GenerationRequest(prompt="a red apple", steps=2, cfg_scale=7, width=64, height=64))
    assert image.shape == (64, 64, 3)
    first = engine.unet_inputs[0]
    assert first.shape[:2] == (2, 9)  # CFG's two rows, 4 + 1 + 4 channels
    assert (first[:, 4] == 1).all()  # all of it drawn
    with torch.inference_mode():
        grey = engine.encode(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert torch.allclose(first[:1, 5:], grey)
    assert not engine.pipe.unet._forward_pre_hooks  # the extra input is gone after the run


def test_inpainting_reads_the_picture_greyed_out_under_the_mask_and_keeps_the_rest(engine):
    check_left_half_inpainting(engine)


def check_left_half_inpainting(engine) -> None:
    """Inpainting the left half of a picture on an engine with a model made for inpainting (recording_unet_inputs):
    the right half stays the picture's, and the UNet reads a mask of the left half."""
    picture = noise_picture(2)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))  # the left half
    request = GenerationRequest(prompt="a red apple", steps=3, denoising_strength=0.6, mask_blur=0)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    [image] = run(engine, request, init_image=start, inpainting=inpainting)
    assert (image[:, 32:] == np.asarray(picture, np.int16)[:, 32:]).all()
    mask_channel = engine.unet_inputs[0][0, 4]
    half = mask_channel.shape[1] // 2
    assert (mask_channel[:, :half] == 1).all() and (mask_channel[:, half:] == 0).all()


def test_img2img_and_the_hires_fix_run_on_an_inpainting_model(engine):
    picture = noise_picture(4)
    request = GenerationRequest(prompt="x", steps=2, denoising_strength=0.5, init_image=image_sha1(picture),
                                width=64, height=64)
    [image] = run(engine, request, init_image=picture)
    assert image.shape == (64, 64, 3) and (engine.unet_inputs[0][:, 4] == 1).all()
    [large] = run(engine, GenerationRequest(prompt="x", steps=2, width=64, height=64, enable_hr=True, hr_scale=1.5,
                                            denoising_strength=0.5))
    assert large.shape == (96, 96, 3)
    assert engine.unet_inputs[-1].shape[1:] == (9, 48, 48)  # the second pass reads its own size's channels


def test_a_composed_prompt_gives_every_part_row_the_extra_channels(engine):
    """AND runs a row per part; each reads the mask and grey picture (the composing comes first)."""
    def image(prompt, cfg):
        return run(engine, GenerationRequest(prompt=prompt, steps=2, cfg_scale=cfg, width=64, height=64))[0]

    doubled = image("a red apple AND a red apple", 3)
    assert engine.unet_inputs[0].shape[:2] == (3, 9)  # uncond and two parts, 4 + 1 + 4 channels each
    assert np.abs(doubled - image("a red apple", 6)).max() <= 1


def test_the_infotext_and_the_api_say_the_inpainting_conditioning_was_used(tmp_path):
    from fastapi.testclient import TestClient

    from tests.helpers import running_services
    from webui.api import create_api_app

    save_tiny_model(tmp_path / "models" / "tiny-inpainting", in_channels=9)
    started = running_services(tmp_path / "models", tmp_path / "outputs", ckpt="tiny-inpainting")
    try:
        with TestClient(create_api_app(next(started))) as client:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    finally:
        started.close()  # stops the services
    info = json.loads(r.json()["info"])
    assert info["is_using_inpainting_conditioning"] is True
    assert "Conditional mask weight: 1" in info["infotexts"][0]


def test_the_masked_picture_is_grey_where_the_mask_is_at_least_half_on():
    picture = Image.new("RGB", (16, 16), (255, 0, 0))
    mask = Image.new("L", (16, 16))
    mask.paste(200, (0, 0, 8, 16))
    mask.paste(100, (8, 0, 16, 16))  # under half: kept

    def as_tensor(image):  # stands in for the VAE: the pixels themselves, -1 to 1
        return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    channels = masked_picture_input(as_tensor, (16, 16), picture, mask)
    assert channels.shape == (1, 4, 16, 16)
    assert (channels[0, 0, :, :8] == 1).all() and (channels[0, 0, :, 8:] == 0).all()
    assert channels[0, 1:, :, :8].abs().max() < 0.01  # grey: 0 in -1..1
    assert (channels[0, 1, :, 8:] == 1).all()  # red kept


def test_an_inpainting_model_runs_uncompiled():
    assert compile_choice(True, device="cuda", offloading=False, xformers=False, zerogpu=False,
                          inpainting_model=True) == (False, "an inpainting model runs uncompiled")


@pytest.mark.parametrize("channels", [9, 8])  # inpainting, instruct-pix2pix
def test_a_locon_made_for_text_to_image_leaves_the_extra_input_channels_alone(channels):
    """A1111 pads a conv_in update for 4 channels to an inpainting model's 9 (an instruct-pix2pix model's 8) with
    zeros."""
    from types import SimpleNamespace

    from webui.engine.lora import LayerUpdate, LoraPatcher

    weight = torch.nn.Parameter(torch.zeros(16, channels, 3, 3), requires_grad=False)
    up, down = torch.ones(16, 2, 1, 1), torch.ones(2, 4, 3, 3)
    update = LayerUpdate("unet", "conv_in", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)})
    LoraPatcher()._add(SimpleNamespace(name="locon"), update, weight, 1.0)
    assert (weight[:, :4] == 2).all()  # up @ down = rank 2, times alpha / rank = 1
    assert (weight[:, 4:] == 0).all()


def test_an_sd2_inpainting_single_file_without_a_yaml_loads_as_512_epsilon(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests._single_file_ldm import pipeline_to_ldm
    from tests.tiny_sd import tiny_components
    from webui.engine.single_file import load_single_file_pipeline

    parts = tiny_components(seed=1, in_channels=9)  # SD 2's shapes: linear projections, an OpenCLIP-style encoder
    parts["unet"] = UNet2DConditionModel.from_config(parts["unet"].config, use_linear_projection=True)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict({**parts["text_encoder"].config.to_dict(),
                                                                    "hidden_act": "gelu"}))
    pipe = StableDiffusionPipeline(**parts)
    path = tmp_path / "tiny-v2-inpainting.safetensors"
    save_file(pipeline_to_ldm(pipe, open_clip=True), path)
    config = tmp_path / "cfg"
    pipe.save_config(config)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(config / name)
    pipe.text_encoder.config.save_pretrained(config / "text_encoder")
    loaded = load_single_file_pipeline(path, torch.float32, config_dir=config)
    assert loaded.unet.config.in_channels == 9 and loaded.scheduler.config.prediction_type == "epsilon"


# A1111's Inpainting conditioning mask strength ("Conditional mask weight")

def halfway_to_grey(picture: Image.Image) -> Image.Image:
    """The picture moved half way to A1111's grey, worked out by PIL (the engine computes it with numpy)."""
    return Image.blend(Image.new("RGB", picture.size, (128, 128, 128)), picture.convert("RGB"), 0.5)


def test_the_mask_strength_lets_the_picture_show_through_the_grey():
    picture = Image.new("RGB", (16, 16), (255, 0, 40))
    mask = Image.new("L", (16, 16))
    mask.paste(255, (0, 0, 8, 16))

    def as_pixels(image):  # stands in for the VAE: the pixel values themselves
        return torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None]

    half = masked_picture_input(as_pixels, (16, 16), picture, mask, weight=0.5)
    assert (half[0, 0, :, :8] == 1).all() and (half[0, 0, :, 8:] == 0).all()  # the mask channel is not weakened
    expected = torch.from_numpy(np.asarray(halfway_to_grey(picture), np.float32)).permute(2, 0, 1)
    assert (half[0, 1:, :, :8] - expected[:, :, :8]).abs().max() <= 1  # half way to grey under the mask
    assert (half[0, 1:, :, 8:] == expected.new_tensor([255, 0, 40])[:, None, None]).all()  # the rest untouched
    none = masked_picture_input(as_pixels, (16, 16), picture, mask, weight=0.0)
    assert (none[0, 1:] == expected.new_tensor([255, 0, 40])[:, None, None]).all()  # nothing greyed out
    rows = masked_picture_input(as_pixels, (16, 16), [picture, Image.new("RGB", (16, 16))], weight=0.5)
    assert rows.shape == (2, 4, 16, 16) and (rows[:, 0] == 1).all()  # a row per picture, each all drawn
    assert (rows[1, 1:] - 64).abs().max() <= 1  # black half way to grey


def extra_picture_channels(engine, call: int = 0) -> torch.Tensor:
    return engine.unet_inputs[call][:1, 5:]


def test_img2img_on_an_inpainting_model_reads_its_picture_greyed_out_by_the_mask_strength(engine):
    picture = noise_picture(5)
    request = GenerationRequest(prompt="x", steps=2, denoising_strength=0.5, init_image=image_sha1(picture),
                                width=64, height=64)
    with torch.inference_mode():
        grey = engine.encode(Image.new("RGB", (64, 64), (128, 128, 128)))
        half = engine.encode(halfway_to_grey(picture))
    full = run(engine, request, init_image=picture)
    assert torch.allclose(extra_picture_channels(engine), grey)  # unset: 1, all grey (A1111's default)
    weakened = run(engine, request.model_copy(update={"inpainting_mask_weight": 0.5}), init_image=picture)
    assert torch.allclose(extra_picture_channels(engine), half, atol=0.05)
    assert (engine.unet_inputs[0][:, 4] == 1).all()
    assert np.abs(full[0] - weakened[0]).max() > 0  # the model was given something else: a different picture


def test_inpainting_reads_the_masked_part_half_greyed_at_half_strength(engine):
    picture = noise_picture(6)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    request = GenerationRequest(prompt="x", steps=2, denoising_strength=0.6, mask_blur=0, inpainting_mask_weight=0.5)
    width, height, start, inpainting = prepare_inpainting(picture, read_mask(mask, picture.size), request)
    request = request.model_copy(update={"init_image": image_sha1(picture), "mask": image_sha1(mask),
                                         "width": width, "height": height})
    [image] = run(engine, request, init_image=start, inpainting=inpainting)
    kept = Image.composite(halfway_to_grey(picture), picture, mask)
    with torch.inference_mode():
        expected = engine.encode(kept)
    assert torch.allclose(extra_picture_channels(engine), expected, atol=0.05)
    assert (image[:, 32:] == np.asarray(picture, np.int16)[:, 32:]).all()  # outside the mask: the picture's


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent"])
def test_the_hires_pass_reads_the_enlarged_first_pass_greyed_out_by_the_mask_strength(engine, upscaler):
    base = GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=4)
    [first] = run(engine, base)
    request = base.model_copy(update={"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5,
                                      "hr_upscaler": upscaler})
    run(engine, request)
    with torch.inference_mode():
        grey = engine.encode(Image.new("RGB", (96, 96), (128, 128, 128)))
    assert torch.allclose(extra_picture_channels(engine, -1), grey)  # strength 1: grey, as txt2img
    run(engine, request.model_copy(update={"inpainting_mask_weight": 0.5}))
    seen = extra_picture_channels(engine, -1)
    assert seen.shape[-2:] == (48, 48) and not torch.allclose(seen, grey, atol=0.05)
    if upscaler == "Lanczos":  # the first pass's picture enlarged (as the upscaler enlarges it), half way to grey
        enlarged = engine.upscale_picture(Image.fromarray(first.astype(np.uint8)), (96, 96), upscaler)
        with torch.inference_mode():
            expected = engine.encode(halfway_to_grey(enlarged))
        assert torch.allclose(seen, expected, atol=0.05)


def test_the_mask_strength_comes_from_the_settings_and_goes_into_the_infotext_and_back(tmp_path):
    from fastapi.testclient import TestClient

    from tests.helpers import running_services
    from webui.api import create_api_app
    from webui.storage.infotext import request_fields_from_infotext

    save_tiny_model(tmp_path / "models" / "tiny-inpainting", in_channels=9)
    started = running_services(tmp_path / "models", tmp_path / "outputs", ckpt="tiny-inpainting")
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    try:
        with TestClient(create_api_app(next(started))) as client:
            overridden = client.post("/sdapi/v1/txt2img", json=body | {
                "override_settings": {"inpainting_mask_weight": 0.25}})
            assert client.post("/sdapi/v1/options", json={"inpainting_mask_weight": 0.75}).status_code == 200
            assert client.get("/sdapi/v1/options").json()["inpainting_mask_weight"] == 0.75
            from_settings = client.post("/sdapi/v1/txt2img", json=body)
            pasted = client.post("/sdapi/v1/txt2img", json=body | {
                "infotext": json.loads(overridden.json()["info"])["infotexts"][0]})
            refused = client.post("/sdapi/v1/txt2img", json=body | {
                "override_settings": {"inpainting_mask_weight": 1.5}})
    finally:
        started.close()
    assert "Conditional mask weight: 0.25" in json.loads(overridden.json()["info"])["infotexts"][0]
    assert "Conditional mask weight: 0.75" in json.loads(from_settings.json()["info"])["infotexts"][0]
    assert "Conditional mask weight: 0.25" in json.loads(pasted.json()["info"])["infotexts"][0]
    assert refused.status_code == 422 and "override_settings.inpainting_mask_weight" in refused.text
    assert request_fields_from_infotext("x\nSteps: 2, Seed: 1, Conditional mask weight: 0.4")["inpainting_mask_weight"] == 0.4
