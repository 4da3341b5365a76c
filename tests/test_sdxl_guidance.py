"""AND (composable prompts), Skip Early CFG and NGMS on SDXL models, whose UNet also reads a pooled text vector and
the size numbers per row (added_cond_kwargs): each part must get its own pooled vector, a skipped call must drop
those rows too. On a tiny random SDXL (tests/tiny_sdxl.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import loaded_engine
from tests.tiny_sdxl import PROJECTION, make_tiny_sdxl_pipeline, save_tiny_sdxl_model
from webui.engine.composable import composed_guidance
from webui.schemas import GenerationRequest

XL = "tiny-xl"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save_tiny_sdxl_model(models / XL)
    return loaded_engine(models, XL)


def picture(engine, prompt: str, cfg: float = 5.0, **fields) -> np.ndarray:
    request = GenerationRequest(**{"prompt": prompt, "negative_prompt": "blurry", "steps": 3, "cfg_scale": cfg,
                                   "sampler_name": "Euler"} | fields)
    return np.asarray(engine.generate(request, [11])[0].image, dtype=np.int16)


def test_the_unet_call_gives_each_part_its_own_pooled_vector():
    unet = make_tiny_sdxl_pipeline().unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    uncond, parts = torch.randn(1, 77, 64, generator=generator), [torch.randn(1, 77, 64, generator=generator)
                                                                  for _ in range(2)]
    uncond_pooled, pooled = torch.randn(1, PROJECTION, generator=generator), [
        torch.randn(1, PROJECTION, generator=generator) for _ in range(2)]
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    weights = [1.0, -0.5]

    def run(states, text_embeds, rows=1):
        added = {"text_embeds": text_embeds, "time_ids": time_ids.repeat(rows, 1)}
        return unet(torch.cat([latents] * rows), torch.tensor(500.0), encoder_hidden_states=states,
                    added_cond_kwargs=added).sample

    with torch.no_grad():
        # As the pipeline hands a composed pass to the UNet: [negative; parts side by side], pooled likewise.
        with composed_guidance(unet, weights):
            got = run(torch.cat([uncond.repeat(1, 2, 1), torch.cat(parts, dim=1)]),
                      torch.cat([uncond_pooled.repeat(1, 2), torch.cat(pooled, dim=1)]), rows=2)
        negative = run(uncond, uncond_pooled)
        pulls = [run(text, vector) - negative for text, vector in zip(parts, pooled)]
    assert torch.allclose(got[:1], negative, atol=1e-5)
    assert torch.allclose(got[1:], negative + sum(w * pull for w, pull in zip(weights, pulls)), atol=1e-5)


def test_a_part_twice_pulls_as_hard_as_cfg_twice_as_high(engine):
    doubled, stronger = picture(engine, "a cat AND a cat", 3), picture(engine, "a cat", 6)
    assert np.abs(doubled - stronger).max() <= 1
    assert np.abs(doubled - picture(engine, "a cat", 3)).mean() > 0.5  # the composing did something


def test_a_part_of_weight_0_adds_nothing_whichever_its_place(engine):
    alone = picture(engine, "a cat")
    assert np.abs(picture(engine, "a dog on a boat:0 AND a cat") - alone).max() <= 1
    assert np.abs(picture(engine, "a cat AND a dog on a boat:0") - alone).max() <= 1
    assert np.abs(picture(engine, "a cat AND a dog on a boat") - alone).mean() > 0.5
    assert np.abs(picture(engine, "a cat:0.5", 10) - alone).max() <= 1  # a lone prompt's own weight


def test_parts_of_different_lengths_and_a_long_negative_prompt_compose(engine):
    long_part = ", ".join(["a red apple"] * 30)  # two chunks
    first = picture(engine, f"a cat AND {long_part}:0.5", negative_prompt=", ".join(["fog"] * 80))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(picture(engine, f"a cat AND {long_part}:0.5", negative_prompt=", ".join(["fog"] * 80)),
                          first)


def test_skipping_every_call_draws_the_picture_guidance_1_draws(engine):
    unguided = picture(engine, "a lighthouse", 1.0)
    assert np.array_equal(picture(engine, "a lighthouse", skip_early_cond=1.0), unguided)
    assert np.array_equal(picture(engine, "a lighthouse", s_min_uncond=15.0, s_min_uncond_all=True), unguided)
    some = picture(engine, "a lighthouse", s_min_uncond=15.0)  # every other call
    assert not np.array_equal(some, unguided) and not np.array_equal(some, picture(engine, "a lighthouse"))


def test_skip_early_cfg_with_a_composed_prompt(engine):
    # All calls skip the negative: the parts still add up, now pulling from the first part's prediction.
    composed = picture(engine, "a cat AND a dog", skip_early_cond=1.0)
    assert not np.array_equal(composed, picture(engine, "a cat AND a dog"))
    assert np.array_equal(picture(engine, "a cat AND a dog", skip_early_cond=1.0), composed)


def test_align_your_steps_takes_sdxls_noise_levels_on_an_sdxl_model(engine):
    from tests.test_samplers import AYS_SDXL

    scheduler = engine._scheduler("Euler", "Align Your Steps")
    scheduler.set_timesteps(len(AYS_SDXL))
    assert torch.allclose(scheduler.sigmas[:-1].double(), torch.tensor(AYS_SDXL, dtype=torch.float64), rtol=1e-3)
    assert picture(engine, "a cat", scheduler="Align Your Steps").std() > 0
