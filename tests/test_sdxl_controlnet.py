"""ControlNet on SDXL models: a diffusers folder, or a single file in diffusers' layout (as SDXL ControlNets are
mostly shared) read with the model's UNet config and the depths its weights show; the ControlNet reading the UNet's
pooled vectors and size numbers. On a tiny random SDXL (tests/tiny_sdxl.py) and tiny ControlNets made from it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import running_services
from tests.test_controlnet import square, tiny_controlnet
from tests.tiny_sdxl import make_tiny_sdxl_pipeline, save_tiny_sdxl_model
from webui.engine.controlnet import ControlNetError, ControlNetLibrary, read_network
from webui.schemas import JobState

XL = "tiny-xl"
QUICK = {"prompt": "a house", "steps": 2, "seed": 3, "cfg_scale": 5.0}


def shallow_controlnet(unet):
    """A ControlNet for `unet` with one transformer layer where the UNet has two (as SDXL's "mid" ControlNets
    have fewer), its map encoder 3 levels wide: what a file without a config must show by its weights."""
    from diffusers import ControlNetModel

    config = dict(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).config)
    network = ControlNetModel.from_config(config | {"transformer_layers_per_block": [1, 1],
                                                    "conditioning_embedding_out_channels": [4, 8, 16]})
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-cn-models")
    save_tiny_sdxl_model(folder / XL)
    network = tiny_controlnet(make_tiny_sdxl_pipeline().unet)
    network.save_pretrained(folder / "ControlNet" / "xl-cn")
    save_file(network.state_dict(), folder / "ControlNet" / "xl-cn-file.safetensors")
    return folder


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("xl-cn-out"), ckpt=XL)


def draw(services, **fields) -> np.ndarray:
    job = services.worker.submit(QUICK | fields, **({"control_image": square()} if fields else {}))
    assert job.wait(120) and job.state is JobState.DONE, job.error
    return np.asarray(job.images[0].image, np.int16)


def controlnet(services, name: str, **fields) -> dict:
    title = services.engine.controlnets.find(name).title
    return {"controlnet_enabled": True, "controlnet_model": title, "controlnet_module": "canny"} | fields


def test_an_sdxl_controlnet_steers_the_picture_and_weight_0_leaves_it_alone(services):
    plain = draw(services)
    steered = draw(services, **controlnet(services, "xl-cn"))
    assert np.abs(steered - plain).mean() > 1, "the ControlNet changed nothing"
    assert np.array_equal(draw(services, **controlnet(services, "xl-cn", controlnet_weight=0.0)), plain)


def test_the_controlnet_reads_the_unets_pooled_vectors_and_size_numbers(services):
    network = services.engine.controlnets.network(services.engine.controlnets.find("xl-cn"),
                                                  services.engine.pipe.unet.config, "cpu", torch.float32)
    seen = []
    handle = network.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs.get("added_cond_kwargs")),
                                               with_kwargs=True)
    try:
        draw(services, **controlnet(services, "xl-cn"))
    finally:
        handle.remove()
    assert seen and all(added is not None and set(added) == {"text_embeds", "time_ids"} for added in seen)
    # CFG: the negative and the positive row; the size numbers are the picture's (64x64, no crop)
    assert seen[0]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_a_single_file_in_diffusers_layout_draws_as_its_folder_does(services):
    folder = draw(services, **controlnet(services, "xl-cn"))
    assert np.abs(draw(services, **controlnet(services, "xl-cn-file")) - folder).max() <= 1


def test_a_file_without_config_takes_its_depths_and_map_encoder_from_its_weights(tmp_path):
    unet = make_tiny_sdxl_pipeline().unet
    network = shallow_controlnet(unet)
    save_file(network.state_dict(), tmp_path / "shallow.safetensors")
    [model] = ControlNetLibrary(tmp_path).models()
    read = read_network(model, unet.config)
    assert list(read.config.transformer_layers_per_block) == [1, 1]
    assert list(read.config.conditioning_embedding_out_channels) == [4, 8, 16]
    assert all(torch.equal(value, read.state_dict()[key]) for key, value in network.state_dict().items())


def test_an_sdxl_controlnet_in_the_original_layout_is_refused_saying_which_file_to_use(tmp_path):
    unet = make_tiny_sdxl_pipeline().unet
    save_file({"control_model.input_blocks.0.0.weight": torch.zeros(16, 4, 3, 3)}, tmp_path / "orig.safetensors")
    [model] = ControlNetLibrary(tmp_path).models()
    with pytest.raises(ControlNetError, match="original layout.*diffusers-format file"):
        read_network(model, unet.config)
