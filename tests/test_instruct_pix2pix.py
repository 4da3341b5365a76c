"""instruct-pix2pix models (8-channel UNets): loading, the picture to edit as the UNet's extra input, A1111's image
guidance (u + cfg (c - i) + image_cfg (i - u)), what is refused with them, and the Image CFG scale through the worker,
the infotext and the API. On a tiny random model with an 8-channel UNet (tests/tiny_sd.py)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import noise_picture, running_services
from tests.tiny_sd import save_tiny_model, tiny_components
from webui.engine.instruct_pix2pix import EditPicture, edit_guidance, model_input
from webui.schemas import InvalidRequest, JobState
from webui.storage.infotext import request_fields_from_infotext

EDIT, PLAIN = "tiny-pix2pix", "tiny-sd"
QUICK = {"prompt": "make it snowy", "steps": 2, "seed": 5, "cfg_scale": 5.0, "sampler_name": "Euler"}


class ToyEditUNet(nn.Module):
    """A stand-in for an 8-channel UNet whose prediction depends on each row's latents, picture, timestep and text."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        latents, picture = sample[:, :4], sample[:, 4:]
        text = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        return (latents * text + picture.flip(-1) * 0.7 + timestep * 0.01,)


def test_the_unet_call_gives_a1111s_image_guidance_through_the_pipelines_own():
    torch.manual_seed(0)
    unet, images, cfg, image_cfg = ToyEditUNet(), 2, 6.0, 1.7
    latents, picture = torch.randn(images, 4, 3, 3), torch.randn(images, 4, 3, 3)
    negative, prompt = torch.randn(images, 5, 8), torch.randn(images, 5, 8)
    with edit_guidance(unet, EditPicture(picture, cfg, image_cfg)):
        rows = unet(torch.cat([latents, latents]), torch.tensor(9.0), encoder_hidden_states=torch.cat([negative, prompt]))[0]
    guided = rows[:images] + cfg * (rows[images:] - rows[:images])  # what the pipeline does with the two rows

    def call(text, edited):
        return unet(torch.cat([latents, edited], dim=1), torch.tensor(9.0), encoder_hidden_states=text)[0]

    u, i, c = call(negative, torch.zeros_like(picture)), call(negative, picture), call(prompt, picture)
    assert torch.allclose(guided, u + cfg * (c - i) + image_cfg * (i - u), atol=1e-5)
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_an_image_cfg_scale_of_1_is_plain_cfg_with_the_picture_in_both_rows():
    unet, picture = ToyEditUNet(), torch.randn(1, 4, 3, 3)
    seen = []
    unet.register_forward_hook(lambda _module, args, _output: seen.append(args[0]))  # the input the hooks made
    with model_input(unet, EditPicture(picture, 5.0, 1.0)):
        unet(torch.zeros(2, 4, 3, 3), torch.tensor(1.0), encoder_hidden_states=torch.zeros(2, 5, 8))
    [sample] = seen
    assert sample.shape == (2, 8, 3, 3) and torch.equal(sample[:, 4:], picture.expand(2, -1, -1, -1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pix2pix-models")
    save_tiny_model(folder / EDIT, in_channels=8)
    save_tiny_model(folder / PLAIN)
    return folder


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("pix2pix-out"), ckpt=EDIT)


def run(services, fields: dict, picture=None):
    job = services.worker.submit(QUICK | fields, init_image=picture)
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return job


def unet_inputs(services) -> list:
    seen = []
    # after the run's own pre-hooks: the input they made
    handle = services.engine.pipe.unet.register_forward_hook(lambda _module, args, _output: seen.append(args[0]))
    return seen, handle


def test_img2img_gives_the_unet_the_pictures_unscaled_latents_beside_the_latents_in_three_rows(services):
    picture = noise_picture(3)
    engine = services.engine
    assert engine.model.edit and not engine.model.inpainting
    seen, handle = unet_inputs(services)
    try:
        run(services, {"denoising_strength": 1.0, "image_cfg_scale": 1.5}, picture)
    finally:
        handle.remove()
    with torch.no_grad():
        pixels = engine.pipe.image_processor.preprocess(picture)
        expected = engine.pipe.vae.encode(pixels).latent_dist.mean  # unscaled, as instruct-pix2pix was trained
    assert [tuple(sample.shape) for sample in seen] == [(3, 8, 32, 32)] * 2  # two steps, three rows each
    assert (seen[0][0, 4:] == 0).all()  # the negative prompt without the picture
    assert torch.allclose(seen[0][1, 4:], expected[0], atol=1e-5)
    assert torch.allclose(seen[0][2, 4:], expected[0], atol=1e-5)


def test_txt2img_gives_no_picture_and_runs_two_rows(services):
    seen, handle = unet_inputs(services)
    try:
        job = run(services, {})
    finally:
        handle.remove()
    assert all(sample.shape == (2, 8, 32, 32) and (sample[:, 4:] == 0).all() for sample in seen)
    assert "Image CFG scale" not in job.images[0].infotext


def test_the_image_cfg_scale_changes_the_picture_and_is_written_and_read_back(services):
    picture = noise_picture(4)
    keep = run(services, {"denoising_strength": 0.8, "image_cfg_scale": 2.5}, picture)
    loose = run(services, {"denoising_strength": 0.8, "image_cfg_scale": 0.5}, picture)
    first, second = (np.asarray(job.images[0].image, np.int16) for job in (keep, loose))
    assert np.abs(first - second).mean() > 0.5
    assert "Image CFG scale: 2.5" in keep.images[0].infotext
    assert request_fields_from_infotext(keep.images[0].infotext)["image_cfg_scale"] == 2.5


@pytest.mark.parametrize("fields, says", [
    ({"cfg_scale": 1.0}, "cfg_scale: an instruct-pix2pix model's Image CFG scale works through classifier-free"),
    ({"prompt": "snow AND a tree"}, "prompt: AND"),
    ({"s_min_uncond": 2.0}, "Skip Early CFG and NGMS do not run with an instruct-pix2pix model's Image CFG scale"),
])
def test_what_image_guidance_cannot_run_with_is_refused_at_submit_and_runs_at_image_cfg_1(services, fields, says):
    picture = noise_picture(5)
    with pytest.raises(InvalidRequest, match=says):
        services.worker.submit(QUICK | fields | {"image_cfg_scale": 1.5}, init_image=picture)
    run(services, fields | {"image_cfg_scale": 1.0}, picture)  # plain CFG with the picture runs all of them


def test_another_model_ignores_the_image_cfg_scale(services):
    picture = noise_picture(6)
    try:
        services.worker.load_model(PLAIN)
        jobs = [run(services, {"image_cfg_scale": scale}, picture) for scale in (0.5, 2.5)]
    finally:
        services.worker.load_model(EDIT)
    assert np.array_equal(*(np.asarray(job.images[0].image) for job in jobs))
    assert "Image CFG scale" not in jobs[0].images[0].infotext


def test_the_api_takes_image_cfg_scale_and_null_means_plain_cfg(services):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    buffer = io.BytesIO()
    noise_picture(7).save(buffer, "PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "make it snowy", "steps": 2,
            "seed": 3, "cfg_scale": 5, "denoising_strength": 0.8}
    with TestClient(create_api_app(services)) as client:
        given = client.post("/sdapi/v1/img2img", json=body | {"image_cfg_scale": 2.0})
        null = client.post("/sdapi/v1/img2img", json=body)
    assert given.status_code == 200 and null.status_code == 200, (given.text, null.text)
    assert "Image CFG scale: 2," in given.json()["info"] and "Image CFG scale: 1," in null.json()["info"]


def test_a_single_file_instruct_pix2pix_model_loads_with_its_8_input_channels(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from tests._single_file_ldm import pipeline_to_ldm
    from webui.engine.single_file import load_single_file_pipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed=2, in_channels=8))
    path = tmp_path / "tiny-pix2pix.safetensors"
    save_file(pipeline_to_ldm(pipe), path)
    plain = StableDiffusionPipeline(**tiny_components(seed=2))
    config = tmp_path / "cfg"  # a text-to-image model's configs, as the repo ships: the 8 channels come from the file
    plain.save_config(config)
    for name in ("unet", "vae", "scheduler"):
        getattr(plain, name).save_config(config / name)
    plain.text_encoder.config.save_pretrained(config / "text_encoder")
    loaded = load_single_file_pipeline(path, torch.float32, config_dir=config)
    assert loaded.unet.config.in_channels == 8
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_training_refuses_an_instruct_pix2pix_model(services):
    from webui.engine.training import TrainingError, prepare

    with pytest.raises(TrainingError, match="made for instruct-pix2pix editing; load the model it was made from"):
        prepare(services.engine, type("Plan", (), {"kind": "embedding"})())
