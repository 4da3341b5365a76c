"""Single-file checkpoints (A1111's .safetensors / .ckpt) load offline with the shipped configs.

Tiny random SD pipelines are written in the original LDM key layout, loaded back through
load_single_file_pipeline with the network blocked, and compared weight by weight.
"""
from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests._single_file_ldm import pipeline_to_ldm
from tests.tiny_sd import tiny_components
from webui.engine import single_file
from webui.engine.single_file import CONFIG_ROOT, SingleFileLoadError, detect_family, load_single_file_pipeline


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub, and any attempt to open a network connection fails the test."""
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, when first imported: set both, so both are undone after the
    # test (imported first here, it stayed offline for the hub tests that run later).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny_pipeline(sd2: bool = False):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = tiny_components(seed=1)
    if sd2:  # SD 2.x differs in shape only: linear attention projections and an OpenCLIP-style encoder
        from diffusers import UNet2DConditionModel

        parts["unet"] = UNet2DConditionModel.from_config(parts["unet"].config, use_linear_projection=True)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict(
            {**parts["text_encoder"].config.to_dict(), "hidden_act": "gelu"}))
    return StableDiffusionPipeline(**parts)


def write_config_dir(pipe, folder: Path) -> Path:
    """A config-only diffusers folder for the tiny model, like the shipped sd-v1/ and sd-v2/."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    return folder


def assert_same_weights(loaded, original):
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key} differs"


def test_safetensors_sd1_loads_offline_with_identical_weights(tmp_path):
    pipe = tiny_pipeline()
    path = tmp_path / "tiny-v1.safetensors"
    save_file(pipeline_to_ldm(pipe), path)

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=write_config_dir(pipe, tmp_path / "cfg"))

    assert_same_weights(loaded, pipe)
    assert loaded.safety_checker is None and loaded.feature_extractor is None
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.scheduler.config.prediction_type == "epsilon"


def test_an_inpainting_checkpoint_loads_its_9_channel_unet_with_the_families_configs(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed=1, in_channels=9))
    path = tmp_path / "tiny-inpainting.safetensors"
    save_file(pipeline_to_ldm(pipe), path)
    configs = write_config_dir(tiny_pipeline(), tmp_path / "cfg")  # the family's, for 4 channels, as shipped

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=configs)

    assert loaded.unet.config.in_channels == 9
    assert_same_weights(loaded, pipe)
    assert json.loads((configs / "unet" / "config.json").read_text())["in_channels"] == 4  # the copy was changed


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_file_whose_clip_keys_lack_the_text_model_level_loads(tmp_path, suffix):
    """Files saved with an early transformers name CLIP's weights `cond_stage_model.transformer.embeddings...`;
    diffusers finds no text encoder there. A1111 loads them, and so does this app."""
    pipe = tiny_pipeline()
    old = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
           for key, value in pipeline_to_ldm(pipe).items()}
    assert single_file._CLIP_L not in old and single_file._CLIP_L_OLD in old
    path = tmp_path / f"early{suffix}"
    save_file(old, path) if suffix == ".safetensors" else torch.save({"state_dict": old}, path)

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=write_config_dir(pipe, tmp_path / "cfg"))
    assert_same_weights(loaded, pipe)
    half = load_single_file_pipeline(path, torch.float16, config_dir=tmp_path / "cfg")
    assert half.text_encoder.dtype == half.unet.dtype == torch.float16


def test_sd2_file_in_the_sgm_layout_loads(tmp_path):
    """SD-Turbo's single file keeps OpenCLIP under conditioner.embedders.0.model. (the sgm layout)."""
    pipe = tiny_pipeline(sd2=True)
    sgm = {key.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): value
           for key, value in pipeline_to_ldm(pipe, open_clip=True).items()}
    path = tmp_path / "turbo.safetensors"
    save_file(sgm, path)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=write_config_dir(pipe, tmp_path / "cfg"))

    assert_same_weights(loaded, pipe)
    assert loaded.tokenizer.pad_token == "!"


def test_an_upper_case_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "Model.SAFETENSORS"  # listed in the models folder, like any .safetensors
    save_file(pipeline_to_ldm(tiny_pipeline()), path)
    with pytest.raises(SingleFileLoadError, match="rename it to Model.safetensors"):
        load_single_file_pipeline(path, torch.float32)


def test_lightning_style_ckpt_loads_with_weights_only(tmp_path, monkeypatch):
    """Original SD .ckpt files nest the weights under state_dict, next to a numpy global_step and
    pytorch_lightning's ModelCheckpoint class; those load without Lightning being installed."""
    pipe = tiny_pipeline()
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    fake = type("ModelCheckpoint", (), {"__module__": names[-1]})
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = fake
    path = tmp_path / "tiny-v1.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(pipe), "global_step": np.int64(470000),
                "callbacks": {fake: {"best_model_score": None}}}, path)
    for name in names:  # loading must not need the class
        monkeypatch.delitem(sys.modules, name)

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=write_config_dir(pipe, tmp_path / "cfg"))

    assert_same_weights(loaded, pipe)


def test_sd2_checkpoint_detected_with_v_prediction_from_sidecar_yaml(tmp_path):
    pipe = tiny_pipeline(sd2=True)
    path = tmp_path / "tiny-v2.safetensors"
    save_file(pipeline_to_ldm(pipe, open_clip=True), path)
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=write_config_dir(pipe, tmp_path / "cfg"))

    assert_same_weights(loaded, pipe)
    assert loaded.tokenizer.pad_token == "!"  # OpenCLIP pads with "!"
    assert loaded.scheduler.config.prediction_type == "v_prediction"


_called = []


def _mark_called():
    _called.append(True)


class RunsCodeWhenUnpickled:
    def __reduce__(self):  # unpickling calls _mark_called: the kind of code a .ckpt can carry
        return (_mark_called, ())


def test_ckpt_that_needs_pickled_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": RunsCodeWhenUnpickled()}, path)
    _called.clear()

    with pytest.raises(SingleFileLoadError) as err:
        load_single_file_pipeline(path, torch.float32)

    message = str(err.value)
    assert "evil.ckpt" in message and ".safetensors" in message
    assert "test_single_file._mark_called" in message  # names what it refused
    assert _called == []


def test_an_empty_ckpt_says_it_ends_too_early(tmp_path):
    path = tmp_path / "zero.ckpt"
    path.write_bytes(b"")
    with pytest.raises(SingleFileLoadError, match=r"zero.ckpt is not a readable .ckpt file \(the file ends too early"):
        load_single_file_pipeline(path, torch.float32)


@pytest.mark.parametrize("name, content, says", [
    ("civitai.ckpt", b'{"error":"Unauthorized","message":"log in to download"}',
     "civitai.ckpt is text (SIZE bytes), not a model: the download saved text instead of the file, often a login "
     "page or an error (it begins: '{\"error\":\"Unauthorized\",\"message\":\"log in to download\"}')"),
    ("page.safetensors", b"<!DOCTYPE html>\n<html><body>Sign in</body></html>",
     "page.safetensors is a web page (SIZE bytes), not a model"),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\nsize 2132625894\n",
     "lfs.safetensors is a git-lfs pointer (SIZE bytes), not the model: run `git lfs pull`"),
])
def test_a_file_that_is_no_model_at_all_says_so(tmp_path, name, content, says):
    """It was called unsafe pickled code (convert it on a trusted machine) or a bad header: wrong advice."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SingleFileLoadError) as err:
        load_single_file_pipeline(path, torch.float32)
    assert str(err.value).startswith(says.replace("SIZE", str(len(content)))), str(err.value)


def _shapes(**extra):
    base = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    return {**base, **extra}


def test_detect_family_from_keys():
    assert detect_family(_shapes(**{single_file._CLIP_L: (77, 768)})) == "sd-v1"
    assert detect_family(_shapes(**{single_file._OPEN_CLIP: (49408, 1024)})) == "sd-v2"
    with pytest.raises(SingleFileLoadError, match="SDXL's text encoder keys but not an SDXL base model's UNet"):
        detect_family(_shapes(**{"conditioner.embedders.0.transformer.x": (1,)}))
    sgm_open_clip = {single_file._SGM_OPEN_CLIP: (49408, 1024)}
    assert detect_family(_shapes(**sgm_open_clip)) == "sd-v2"  # SD-Turbo
    # the same embedder key with SDXL's UNet: an SDXL refiner
    assert detect_family(_shapes(**sgm_open_clip, **{single_file._SDXL_UNET: (1280, 2560)})) == "sdxl-refiner"
    sdxl_base = {single_file._SDXL_UNET: (1280, 2816), single_file._SDXL_CLIP_L: (77, 768),
                 single_file._SDXL_OPEN_CLIP: (77, 1280)}
    assert detect_family(_shapes(**sdxl_base)) == "sdxl-base"
    assert detect_family({**sdxl_base, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}) == "sdxl-base"
    with pytest.raises(SingleFileLoadError, match="SDXL model whose UNet takes 8 input channels"):
        detect_family({**sdxl_base, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)})
    inpainting = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3), single_file._CLIP_L: (77, 768)}
    assert detect_family(inpainting) == "sd-v1"
    assert detect_family({**inpainting, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}) == "sd-v1"
    with pytest.raises(SingleFileLoadError, match="7 input channels \\(neither a text-to-image"):
        detect_family({"model.diffusion_model.input_blocks.0.0.weight": (320, 7, 3, 3)})
    with pytest.raises(SingleFileLoadError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0.alpha": ()})


@pytest.mark.parametrize("family, sidecar, step, expected", [
    ("v1", None, None, "sd-v1"),
    ("v2", None, None, "sd-v2-v"),  # diffusers' default for SD 2.x: 2.1 768 v-prediction
    ("v2", "eps", None, "sd-v2"),
    ("v2", None, 875000, "sd-v2"),  # the 512-base checkpoint's final step
])
def test_shipped_config_is_chosen_from_the_checkpoint(tmp_path, monkeypatch, family, sidecar, step, expected):
    from diffusers import StableDiffusionPipeline

    seen = {}
    probed = []  # only an SD 2.x file of unknown kind is probed; its own test below runs the real probe
    monkeypatch.setattr(single_file, "_probe_prediction_type", lambda unet, path: probed.append(path) or "v_prediction")

    def fake_from_single_file(path, **kwargs):  # records the arguments; the real one needs full-size weights
        seen.update(kwargs)
        scheduler_config = json.loads((Path(kwargs["config"]) / "scheduler" / "scheduler_config.json").read_text())
        return types.SimpleNamespace(scheduler=types.SimpleNamespace(config=scheduler_config), unet=None)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake_from_single_file)
    key = single_file._CLIP_L if family == "v1" else single_file._OPEN_CLIP
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
                               key: torch.zeros(1)}, "global_step": step}, path)
    if sidecar:
        path.with_suffix(".yaml").write_text(f"model:\n  params:\n    parameterization: {sidecar}\n")

    load_single_file_pipeline(path, torch.float16)

    assert seen["config"] == str(CONFIG_ROOT / expected)
    assert seen["local_files_only"] is True and seen["safety_checker"] is None
    assert probed == ([path] if (family, sidecar, step) == ("v2", None, None) else [])


def test_an_sd2_file_the_probe_finds_epsilon_runs_as_512_base(tmp_path, monkeypatch):
    """Loaded with the 768 v-prediction config, then settled: epsilon, and a 512 default size."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    class Part:
        def __init__(self, sample_size):
            self.config = {"sample_size": sample_size}

        def register_to_config(self, **changes):
            self.config = self.config | changes

    def fake_from_single_file(path, **kwargs):
        assert kwargs["config"] == str(CONFIG_ROOT / "sd-v2-v")
        scheduler = EulerDiscreteScheduler.from_pretrained(kwargs["config"], subfolder="scheduler")
        return types.SimpleNamespace(scheduler=scheduler, unet=Part(96), vae=Part(768))

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake_from_single_file)
    monkeypatch.setattr(single_file, "_probe_prediction_type", lambda unet, path: "epsilon")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {single_file._UNET_IN: torch.zeros(1, 4, 1, 1), single_file._OPEN_CLIP: torch.zeros(1)}},
               path)

    pipe = load_single_file_pipeline(path, torch.float16)

    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert (pipe.unet.config["sample_size"], pipe.vae.config["sample_size"]) == (64, 512)


def test_a_probe_that_gives_nan_assumes_v_prediction_and_says_so(caplog):
    pipe = tiny_pipeline(sd2=True)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))  # fp16 overflow looks like this; NaN > 1 is False
    assert single_file._probe_prediction_type(pipe.unet, Path("x.safetensors")) == "v_prediction"
    assert "could not tell 512-base from 768 v-prediction" in caplog.text and "not finite" in caplog.text


@pytest.mark.parametrize("output, prediction", [(0.5, "epsilon"), (-2.0, "v_prediction")])
def test_sd2_file_without_yaml_is_told_apart_by_what_its_unet_predicts(tmp_path, output, prediction):
    """512-base and 768-v SD 2.x files have the same shapes. An epsilon model returns about its input at the
    last timestep; a v-prediction model's output lies below it. The UNet here outputs a constant."""
    pipe = tiny_pipeline(sd2=True)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.fill_(output)
    config = write_config_dir(pipe, tmp_path / "cfg")
    wrong = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[prediction]  # the probe must override it
    scheduler_config = config / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "prediction_type": wrong}))
    path = tmp_path / "tiny-v2.safetensors"
    save_file(pipeline_to_ldm(pipe, open_clip=True), path)

    loaded = load_single_file_pipeline(path, torch.float32, config_dir=config)

    assert loaded.scheduler.config.prediction_type == prediction


def test_the_probe_finds_v_prediction_in_the_trained_embedded_model():
    """A real v-prediction model, trained here (models/sd-emoji-tiny), not one built to pass."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(__file__).parent.parent / "models" / "sd-emoji-tiny",
                                                subfolder="unet")
    assert single_file._probe_prediction_type(unet, Path("sd-emoji-tiny.safetensors")) == "v_prediction"


def test_a_512_base_file_gets_the_512_default_size():
    pipe = tiny_pipeline(sd2=True)
    single_file._use_shipped_sizes(pipe, "sd-v2")
    assert (pipe.unet.config.sample_size, pipe.vae.config.sample_size) == (64, 512)


@pytest.mark.parametrize("name, unet, text_encoder, prediction", [
    # published parameter counts (millions) of SD 1.5 and SD 2.1 components
    ("sd-v1", 859.52, 123.06, "epsilon"),
    ("sd-v2", 865.91, 340.39, "epsilon"),
    ("sd-v2-v", 865.91, 340.39, "v_prediction"),
])
def test_shipped_configs_describe_the_published_models(name, unet, text_encoder, prediction):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIG_ROOT / name
    with init_empty_weights():  # shapes only, no memory
        models = [UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
                  AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
                  CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))]
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for m in models]
    assert millions == [unet, 83.65, text_encoder]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    assert not (folder / "tokenizer").exists()  # the shared clip-tokenizer/ is used
