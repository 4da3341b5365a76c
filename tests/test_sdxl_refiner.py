"""SDXL refiners as A1111's Refiner: loading (a diffusers folder, a single file in the sgm layout, the shipped configs),
the refiner's own conditioning (OpenCLIP bigG alone) and size numbers (original size, crop, aesthetic score), the kinds
refused, on a tiny SDXL base and refiner (tests/tiny_sdxl.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import loaded_engine, noise_picture, running_services
from tests.tiny_sd import save_tiny_model
from tests.tiny_sdxl import CLIP_G_WIDTH, make_tiny_sdxl_refiner_pipeline, save_tiny_sdxl_model, save_tiny_sdxl_refiner
from webui.config import Settings
from webui.engine.generate import Engine
from webui.engine.img2img import image_sha1
from webui.engine.loader import ModelLoadError
from webui.engine.models import ModelRegistry
from webui.schemas import GenerationRequest, InvalidRequest

XL, REFINER, SD = "tiny-xl", "tiny-xl-refiner", "tiny-sd"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-refiner-models")
    save_tiny_sdxl_model(folder / XL)
    save_tiny_sdxl_refiner(folder / REFINER, seed=5)
    save_tiny_model(folder / SD)
    return folder


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return loaded_engine(models, XL, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def services(models, tmp_path_factory):
    yield from running_services(models, tmp_path_factory.mktemp("sdxl-refiner-out"), ckpt=XL)


def draw(engine, seeds=(1,), **fields) -> list[np.ndarray]:
    request = GenerationRequest(**{"prompt": "a red apple", "negative_prompt": "blurry", "steps": 4} | fields)
    return [np.asarray(result.image, np.int16) for result in engine.generate(request, list(seeds))]


@pytest.fixture
def refiner_calls(monkeypatch):
    """The inputs of every call of a refiner's UNet (one whose text width is bigG's alone), as the UNet gets them."""
    from diffusers import UNet2DConditionModel

    calls = []
    original = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.config.cross_attention_dim == CLIP_G_WIDTH:
            added = kwargs["added_cond_kwargs"]
            calls.append((encoder_hidden_states.clone(), added["text_embeds"].clone(), added["time_ids"].clone()))
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return calls


# --- loading -------------------------------------------------------------------------------------------
def test_a_refiner_folder_loads_for_the_refiners_role_and_is_refused_as_the_model(engine, models):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from webui.engine.loader import Placement, read_pipeline

    pipe = read_pipeline(engine.registry.find(REFINER), engine.settings, Placement("cpu", torch.float32), refiner=True)
    assert isinstance(pipe, StableDiffusionXLImg2ImgPipeline) and pipe.text_encoder is None
    assert pipe.unet.config.cross_attention_dim == CLIP_G_WIDTH
    with pytest.raises(ModelLoadError, match=f"{REFINER} is an SDXL refiner .* pick an SDXL base model as the model, "
                                             "and this one as its Refiner"):
        engine.load(REFINER)
    assert engine.model.entry.name == XL  # the model stays


def test_a_single_file_refiner_is_told_apart_and_loads_with_the_exact_weights(tmp_path):
    from safetensors.torch import save_file

    from tests._single_file_ldm import sdxl_refiner_to_sgm
    from webui.engine.models import ModelEntry
    from webui.engine.refiner import SDXL_REFINER, kind_of_entry
    from webui.engine.single_file import SingleFileLoadError, detect_family, load_single_file_pipeline, read_header

    pipe = make_tiny_sdxl_refiner_pipeline(seed=3)
    path = tmp_path / "tiny-refiner.safetensors"
    save_file(sdxl_refiner_to_sgm(pipe), path)
    assert detect_family(read_header(path)[0], path) == "sdxl-refiner"
    assert kind_of_entry(ModelEntry(name="tiny-refiner", source=str(path), kind="single_file")) == SDXL_REFINER
    configs = save_tiny_sdxl_refiner(tmp_path / "configs")
    with pytest.raises(SingleFileLoadError, match="is an SDXL refiner"):
        load_single_file_pipeline(path, config_dir=configs)
    loaded = load_single_file_pipeline(path, config_dir=configs, refiner=True)
    assert type(loaded).__name__ == "StableDiffusionXLImg2ImgPipeline" and loaded.text_encoder is None
    assert loaded.tokenizer_2.pad_token == "!"
    for part in ("unet", "vae", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), part


def test_the_shipped_refiner_configs_are_sdxl_refiner_1_0s():
    """The UNet's is what diffusers' converter makes of sgm's sd_xl_refiner.yaml (its network parameters, below); the
    text encoder is bigG, as the base's second; the pipeline is diffusers' img2img one with aesthetic scores."""
    import json

    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, create_unet_diffusers_config_from_ldm

    from webui.engine.single_file import CONFIG_ROOT

    network = {"adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
               "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
               "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
               "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280]}
    original = {"model": {"params": {"network_config": {"params": network},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    derived = create_unet_diffusers_config_from_ldm(original, {CHECKPOINT_KEY_NAMES["xl_refiner"]: torch.zeros(1)})
    folder = CONFIG_ROOT / "sdxl-refiner"
    shipped = json.loads((folder / "unet" / "config.json").read_text())
    assert {key: shipped[key] for key in derived} == derived
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"]
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    for part in ("text_encoder_2", "vae", "scheduler"):
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        assert (folder / part / name).read_text() == (CONFIG_ROOT / "sdxl-base" / part / name).read_text()


# --- running -------------------------------------------------------------------------------------------
def test_the_refiner_takes_over_with_its_own_conds_and_size_numbers(engine, models, refiner_calls):
    """Its calls get bigG's embeddings as diffusers' own refiner pipeline encodes them (penultimate layer, pooled
    projection), negative rows first, and five size numbers: the pass's size, crop 0,0, and A1111's aesthetic scores,
    2.5 for the negative rows and 6.0 for the prompt's."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    [alone] = draw(engine, [4])
    assert refiner_calls == []
    [refined] = draw(engine, [4], refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    assert refined.shape == alone.shape and not (refined == alone).all()
    assert engine.model.entry.name == XL  # the model again after the run
    # 4 Euler steps of a leading schedule: the last two calls are past half the noise levels
    assert len(refiner_calls) == 2

    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(models / REFINER)
    with torch.no_grad():
        prompt, negative, pooled, negative_pooled = reference.encode_prompt(
            "a red apple", negative_prompt="blurry", device="cpu", do_classifier_free_guidance=True)
    for conds, text_embeds, time_ids in refiner_calls:
        assert conds.shape == (2, 77, CLIP_G_WIDTH)
        torch.testing.assert_close(conds, torch.cat([negative, prompt]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(text_embeds, torch.cat([negative_pooled, pooled]), rtol=1e-4, atol=1e-5)
        assert time_ids.tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]]


def test_the_aesthetic_scores_are_the_requests_in_every_row_of_a_batch(engine, refiner_calls):
    draw(engine, [4, 5], batch_size=2, refiner_checkpoint=REFINER, refiner_switch_at=0.5,
         sdxl_refiner_high_aesthetic_score=7.5, sdxl_refiner_low_aesthetic_score=1.0)
    assert refiner_calls
    for _, _, time_ids in refiner_calls:
        assert time_ids[:, 4].tolist() == [1.0, 1.0, 7.5, 7.5]  # both images' negative rows, then their prompts'


def test_the_scores_change_the_refined_picture(engine):
    [usual] = draw(engine, [4], refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    [other] = draw(engine, [4], refiner_checkpoint=REFINER, refiner_switch_at=0.5, sdxl_refiner_high_aesthetic_score=9)
    assert not (usual == other).all()


def test_the_refiner_runs_an_img2img_pass_from_its_start_and_the_hires_pass_after_it(engine, refiner_calls):
    """img2img starting past the switch: the whole pass is the refiner's; with the hires fix and the refiner in the
    first pass, the hires pass is the refiner's too (A1111's order), at the hires size."""
    picture = noise_picture(4)
    request = GenerationRequest(prompt="a red apple", steps=4, denoising_strength=0.5, init_image=image_sha1(picture),
                                refiner_checkpoint=REFINER, refiner_switch_at=0.3)
    engine.generate(request, [5], init_image=picture)
    assert len(refiner_calls) == request.denoising_steps  # every step of the pass (Euler: a call a step)
    assert all(time_ids.tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]] for _, _, time_ids in refiner_calls)
    refiner_calls.clear()
    draw(engine, [4], steps=2, refiner_checkpoint=REFINER, refiner_switch_at=0.5, enable_hr=True, hr_scale=1.5,
         denoising_strength=0.5, hires_fix_refiner_pass="first pass")
    sizes = [tuple(time_ids[0, :2].tolist()) for _, _, time_ids in refiner_calls]
    assert sizes[0] == (64, 64) and sizes[-1] == (96, 96)
    assert all(time_ids[:, 4].tolist() == [2.5, 6.0] for _, _, time_ids in refiner_calls)


def test_an_sdxl_base_as_its_own_refiner_draws_its_own_picture(engine, refiner_calls):
    [alone] = draw(engine, [6])
    [itself] = draw(engine, [6], refiner_checkpoint=XL, refiner_switch_at=0.5)
    assert (alone == itself).all() and refiner_calls == []


# --- refused -------------------------------------------------------------------------------------------
def test_the_refiner_is_refused_as_the_jobs_model_and_as_hires_checkpoint(services):
    with pytest.raises(InvalidRequest, match=f"model: {REFINER} is an SDXL refiner"):
        services.worker.check({"prompt": "a cat", "steps": 2, "model": REFINER})
    with pytest.raises(InvalidRequest, match=f"hr_checkpoint_name: {REFINER} is an SDXL refiner, which can only be an "
                                             "SDXL model's Refiner"):
        services.worker.check({"prompt": "a cat", "steps": 2, "enable_hr": True, "denoising_strength": 0.5,
                               "hr_checkpoint_name": REFINER})
    services.worker.check({"prompt": "a cat", "steps": 2, "refiner_checkpoint": REFINER})  # its role passes


def test_an_sd_model_with_an_sdxl_refiner_and_sdxl_with_an_sd_refiner_are_refused(services):
    with pytest.raises(InvalidRequest, match=f"refiner_checkpoint: {REFINER} is an SDXL refiner, which can only be an "
                                             "SDXL model's Refiner .*the model is text width 32"):
        services.worker.check({"prompt": "a cat", "steps": 2, "model": SD, "refiner_checkpoint": REFINER})
    with pytest.raises(InvalidRequest, match=f"refiner_checkpoint: {SD} is a model of another kind"):
        services.worker.check({"prompt": "a cat", "steps": 2, "refiner_checkpoint": SD})


def test_a_controlnet_with_an_sdxl_refiner_is_refused(services):
    from webui.engine.generate import CONTROLNET_WITH_SDXL_REFINER

    request = {"prompt": "a cat", "steps": 2, "refiner_checkpoint": REFINER, "controlnet_enabled": True,
               "controlnet_model": "any"}
    with pytest.raises(InvalidRequest, match="a ControlNet cannot steer an SDXL refiner"):
        services.worker._check_other_checkpoints(GenerationRequest(**request))
    assert "refiner_checkpoint" in CONTROLNET_WITH_SDXL_REFINER


# --- the API -------------------------------------------------------------------------------------------
def test_the_api_takes_a1111s_aesthetic_score_options_in_override_settings(services, refiner_calls):
    from fastapi.testclient import TestClient

    from webui.api import create_api_app

    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "refiner_checkpoint": REFINER, "refiner_switch_at": 0.5,
            "override_settings": {"sdxl_refiner_high_aesthetic_score": 8.0, "sdxl_refiner_low_aesthetic_score": 3.0}}
    with TestClient(create_api_app(services)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        assert refiner_calls and all(ids[:, 4].tolist() == [3.0, 8.0] for _, _, ids in refiner_calls)
        body["override_settings"] = {"sdxl_refiner_high_aesthetic_score": 11}
        refused = client.post("/sdapi/v1/txt2img", json=body)
        assert refused.status_code in (400, 422)
        assert "override_settings.sdxl_refiner_high_aesthetic_score" in refused.text
        # POST /options sets them for later API requests that give none, as A1111's settings
        assert client.get("/sdapi/v1/options").json()["sdxl_refiner_low_aesthetic_score"] == 2.5
        set_ = client.post("/sdapi/v1/options", json={"sdxl_refiner_low_aesthetic_score": 1.5})
        assert set_.status_code == 200, set_.text
        refiner_calls.clear()
        del body["override_settings"]
        try:
            assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
        finally:
            client.post("/sdapi/v1/options", json={"sdxl_refiner_low_aesthetic_score": 2.5})
        assert refiner_calls and all(ids[:, 4].tolist() == [1.5, 6.0] for _, _, ids in refiner_calls)


def test_loras_change_the_models_part_and_the_refiner_runs_without_them(models, tmp_path, refiner_calls, caplog):
    """SDXL LoRAs are made for the base's layers; the refiner's are of other widths, so it runs as it is."""
    import logging

    from tests.test_lora import write_lora
    from tests.test_sdxl_lora import kohya_state

    loras = tmp_path / "Lora"
    write_lora(loras, "xl-lora", kohya_state())
    with_loras = Engine(Settings(models_dir=models, device="cpu", lora_dir=loras),
                        ModelRegistry(models, tmp_path / "hashes.json"))
    with_loras.load(XL)
    [plain] = draw(with_loras, [4], refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    with caplog.at_level(logging.INFO, logger="webui.engine.generate"):
        [lora] = draw(with_loras, [4], prompt="a red apple <lora:xl-lora:1>", refiner_checkpoint=REFINER,
                      refiner_switch_at=0.5)
    assert not (plain == lora).all() and len(refiner_calls) == 4
    assert "LoRAs are not applied to the SDXL refiner" in caplog.text


def test_a_compiled_base_and_refiner_draw_the_uncompiled_picture(models, tmp_path, monkeypatch, fresh_dynamo,
                                                                   refiner_calls):
    """Under --compile the refiner runs eagerly (its size numbers are set by a hook a compiled graph would not see)."""
    from webui.engine import fast_path

    real = fast_path.apply_fast_path
    monkeypatch.setattr(fast_path, "apply_fast_path", lambda pipe, compile: real(pipe, compile=compile, backend="eager"))
    pictures = []
    for compiled in (False, True):
        two = Engine(Settings(models_dir=models, outdir=tmp_path, device="cpu", compile=compiled),
                     ModelRegistry(models, tmp_path / "hashes.json"))
        two.load(XL)
        assert fast_path.is_compiled(two.pipe) == compiled
        pictures += draw(two, [4], refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    # the same picture to rounding: the compiled graph may order a sum otherwise (seen: one value of 12288 off by 1)
    assert np.abs(pictures[0] - pictures[1]).max() <= 1 and (pictures[0] != pictures[1]).mean() < 0.01
    assert len(refiner_calls) == 4 and all(ids[:, 4].tolist() == [2.5, 6.0] for _, _, ids in refiner_calls)
