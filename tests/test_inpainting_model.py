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
