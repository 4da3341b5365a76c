"""The shipped default model models/sd-emoji-tiny: layout, size, licence files, and real pictures.

Skipped only when the folder is absent (e.g. a checkout without the model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "sd-emoji-tiny"
TOKENIZER_DIR = ROOT / "webui" / "engine" / "model_configs" / "clip-tokenizer"

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="models/sd-emoji-tiny is absent")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    p = StableDiffusionPipeline.from_pretrained(MODEL, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_layout_and_configs():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (MODEL / part).is_dir() and part in index
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert sched["rescale_betas_zero_snr"] is True
    assert sched["timestep_spacing"] == "trailing"
    assert sched["clip_sample"] is False  # for DDIMScheduler.from_config(pipe.scheduler.config)
    assert json.loads((MODEL / "unet" / "config.json").read_text())["sample_size"] * 4 == 64  # native 64x64


def test_size_fp16_safetensors_and_licence_files():
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 1024 * 1024, "the shipped model must stay within 30 MB"
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"text_encoder", "unet", "vae"}
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt")]
    from safetensors import safe_open

    for f in weights:
        with safe_open(str(f), "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}, f
    for name in ("README.md", "LICENSE"):
        assert (MODEL / name).stat().st_size > 200
    card = (MODEL / "README.md").read_text()
    assert "Twemoji" in card and "CC BY 4.0" in card and "Apache" in card and "64x64" in card


def test_tokenizer_is_the_clip_tokenizer():
    for name in ("vocab.json", "merges.txt"):
        assert (MODEL / "tokenizer" / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes()


def _stats(img: np.ndarray) -> tuple[float, float, float]:
    """Mean of the 6x6 corners, mean of the centre 24x24, and mean neighbour difference (noise is ~170)."""
    corners = np.concatenate([img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]]).mean()
    centre = img[20:44, 20:44].mean()
    rough = (np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean())
    return float(corners), float(centre), float(rough)


@pytest.mark.parametrize("prompt", ["red apple", "grinning face"])
def test_generates_an_emoji_like_picture(pipe, prompt):
    image = pipe(prompt, num_inference_steps=20, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    img = np.asarray(image, dtype=np.float32)
    corners, centre, rough = _stats(img)
    assert img.shape == (64, 64, 3)
    assert corners > 215, f"background should be near white, corners mean {corners:.0f}"
    assert centre < 200, f"the centre should hold a picture, not blank: mean {centre:.0f}"
    assert rough < 40, f"the picture should be smooth, not noise: neighbour difference {rough:.0f}"


def test_plain_from_pretrained_works_on_cpu():
    """No torch_dtype given: every part must come up in the same dtype (fp32 on the CPU)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(MODEL)
    assert {p.unet.dtype, p.vae.dtype, p.text_encoder.dtype} == {torch.float32}
    p.set_progress_bar_config(disable=True)
    assert p("snowman", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_same_seed_same_picture_and_prompt_matters(pipe):
    def run(prompt, seed):
        return np.asarray(pipe(prompt, num_inference_steps=8, guidance_scale=7.0, height=64, width=64,
                               generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.float32)

    a, b = run("red apple", 1), run("red apple", 1)
    assert np.array_equal(a, b)
    # A red apple is redder than a blue heart: the text encoder steers the colour.
    apple, heart = run("red apple", 2), run("blue heart", 2)
    red = lambda im: float((im[..., 0] - im[..., 2])[16:48, 16:48].mean())  # noqa: E731
    assert red(apple) > red(heart) + 20, (red(apple), red(heart))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from webui.config import parse_settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    tmp = tmp_path_factory.mktemp("engine")
    settings = parse_settings(["--outdir", str(tmp), "--device", "cpu"], environ={})
    engine = Engine(settings, ModelRegistry(settings.models_dir, tmp / "hashes.json"))
    engine.load(MODEL.name)
    return engine


# The deterministic (ODE) samplers all solve the same equation from the same starting noise, so at
# 20 steps they should land on nearly the same picture; a sampler built with a wrong option does not.
@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M", "UniPC", "LMS", "PLMS", "Heun"])
def test_deterministic_samplers_agree_with_euler(engine, sampler):
    from webui.schemas import GenerationRequest

    def run(name):
        request = GenerationRequest(prompt="red apple", steps=20, cfg_scale=7.0, sampler_name=name, seed=0)
        return np.asarray(engine.generate(request, [0])[0].image, dtype=np.float32) / 255

    difference = float(np.abs(run(sampler) - run("Euler")).mean())
    assert difference < 0.06, f"{sampler} differs from Euler by {difference:.3f} (mean of 0..1 pixels)"


# The embedded model's schedule has zero terminal SNR: Karras and Exponential sigmas begin with two that
# both map to t=999, and from 25 steps on the run started at its second step and ran off the end.
@pytest.mark.parametrize("sampler, schedule", [("DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "Exponential"),
                                               ("UniPC", "Karras"), ("Euler", "Beta"), ("DPM++ 3M SDE", "Automatic"),
                                               ("DPM++ 2M", "Align Your Steps"), ("Euler", "KL Optimal"),
                                               ("UniPC", "Simple"), ("DPM++ SDE", "DDIM"), ("Heun", "Normal")])
def test_karras_and_exponential_schedules_run_every_step_count(engine, sampler, schedule):
    from webui.schemas import GenerationRequest

    calls = []
    request = GenerationRequest(prompt="red apple", steps=30, sampler_name=sampler, scheduler=schedule, seed=0)
    image = np.asarray(engine.generate(request, [0], lambda step, total, _: step and calls.append(step))[0].image)
    assert len(calls) == 30 and np.isfinite(image).all() and image.std() > 5  # every step, and a picture
