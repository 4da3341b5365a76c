"""SDXL models made for inpainting (a 9-channel SDXL UNet, as diffusers' stable-diffusion-xl-1.0-inpainting-0.1): they
load from a folder and from a single file, and txt2img and inpainting give them the mask and the masked picture as SD
inpainting models get them. On a tiny random SDXL (tests/tiny_sdxl.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import loaded_engine, recording_unet_inputs
from tests.tiny_sdxl import make_tiny_sdxl_pipeline, save_tiny_sdxl_model
from webui.schemas import GenerationRequest

XL_INPAINTING = "tiny-xl-inpainting"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save_tiny_sdxl_model(models / XL_INPAINTING, in_channels=9)
    return recording_unet_inputs(loaded_engine(models, XL_INPAINTING))


def test_it_loads_as_an_sdxl_inpainting_model(engine):
    from webui.engine.refiner import kind_of_pipeline

    assert engine.model.sdxl and engine.model.inpainting
    assert kind_of_pipeline(engine.pipe) == "SDXL inpainting"


def test_txt2img_reads_the_mask_of_everything_and_a_grey_picture(engine):
    engine.unet_inputs.clear()
    [result] = engine.generate(GenerationRequest(prompt="a red apple", steps=2, width=64, height=64), [3])
    first = engine.unet_inputs[0]
    assert first.shape[:2] == (2, 9) and (first[:, 4] == 1).all()
    with torch.inference_mode():
        grey = engine.encode(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert torch.allclose(first[:1, 5:], grey) and np.asarray(result.image).std() > 0


def test_inpainting_reads_the_picture_greyed_out_under_the_mask_and_keeps_the_rest(engine):
    from tests.test_inpainting_model import check_left_half_inpainting

    check_left_half_inpainting(engine)


def test_a_single_file_in_the_sgm_layout_loads_with_its_9_input_channels(tmp_path):
    from safetensors.torch import save_file

    from tests._single_file_ldm import sdxl_pipeline_to_sgm
    from webui.engine.refiner import kind_of_entry
    from webui.engine.models import ModelRegistry
    from webui.engine.single_file import load_single_file_pipeline

    pipe = make_tiny_sdxl_pipeline(seed=4, in_channels=9)
    path = tmp_path / "models" / "tiny-xl-inpainting.safetensors"
    path.parent.mkdir()
    save_file(sdxl_pipeline_to_sgm(pipe), path)
    configs = save_tiny_sdxl_model(tmp_path / "configs")  # a base model's configs, as the repo ships: 4 channels
    loaded = load_single_file_pipeline(path, config_dir=configs)
    assert loaded.unet.config.in_channels == 9
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    [entry] = ModelRegistry(tmp_path / "models", tmp_path / "hashes.json").entries()
    assert kind_of_entry(entry) == "SDXL inpainting"  # from the file's header alone


def test_an_sdxl_unet_of_other_inputs_is_refused_naming_what_loads(tmp_path):
    from webui.engine.loader import ModelLoadError, check_pipeline_folder

    folder = save_tiny_sdxl_model(tmp_path / "odd", in_channels=8)
    with pytest.raises(ModelLoadError, match="takes 8 input channels .*SDXL base, inpainting and refiner models load"):
        check_pipeline_folder(folder, "odd")
