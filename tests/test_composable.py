"""Composable diffusion (`a AND b:0.5`), as A1111 reads it: webui/engine/composable.py and the engine's use of it."""
import numpy as np
import pytest
import torch
from torch import nn

from webui.engine.composable import Part, composed_guidance, split_parts
from webui.engine.prompts import encode_parts
from webui.schemas import GenerationRequest, InvalidRequest


# --- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, parts", [
    ("a castle AND a dragon:0.8", [("a castle", 1.0), (" a dragon", 0.8)]),
    ("a castle:1.2", [("a castle", 1.2)]),
    ("a castle : -0.5 AND sky:.5", [("a castle", -0.5), (" sky", 0.5)]),
    ("ANDROID, sandy, (red:1.2)", [("ANDROID, sandy, (red:1.2)", 1.0)]),  # AND only as a word; a bracket's weight stays
    ("[cat:dog:5]", [("[cat:dog:5]", 1.0)]),
])
def test_a_prompt_splits_at_the_word_and_into_weighted_parts(prompt, parts):
    assert split_parts(prompt) == [Part(text, weight) for text, weight in parts]


# --- the guidance around the UNet --------------------------------------------------------------
class ToyUNet(nn.Module):
    """A stand-in whose prediction depends on each row's latents, timestep and text, as a UNet's does."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        text = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        return (sample * text + timestep * 0.01 + sample.flip(-1),)


def test_the_unet_call_gives_uncond_plus_the_weighted_pulls_of_the_parts():
    torch.manual_seed(0)
    unet, images, tokens, weights = ToyUNet(), 2, 5, [1.0, 0.5, -0.25]
    latents = torch.randn(images, 4, 3, 3)
    uncond_text, part_texts = torch.randn(images, tokens, 8), [torch.randn(images, tokens, 8) for _ in weights]
    # What the pipeline hands the UNet under CFG: [uncond rows, cond rows], the parts along the tokens, the
    # negative repeated as often.
    states = torch.cat([uncond_text.repeat(1, len(weights), 1), torch.cat(part_texts, dim=1)])
    with composed_guidance(unet, weights):
        got = unet(torch.cat([latents, latents]), torch.tensor(7.0), encoder_hidden_states=states)[0]
    uncond = unet(latents, torch.tensor(7.0), encoder_hidden_states=uncond_text)[0]
    pulls = [unet(latents, torch.tensor(7.0), encoder_hidden_states=text)[0] - uncond for text in part_texts]
    assert torch.allclose(got[:images], uncond, atol=1e-6)
    assert torch.allclose(got[images:], uncond + sum(w * pull for w, pull in zip(weights, pulls)), atol=1e-5)
    # Outside the block the UNet is as before.
    assert unet(latents, torch.tensor(7.0), encoder_hidden_states=uncond_text)[0].shape == latents.shape
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_parts_of_different_lengths_repeat_their_last_vector_and_the_negative_pads_with_empty_chunks(engine):
    long_part = ", ".join(["a red apple"] * 30)  # two chunks
    with torch.inference_mode():
        conds, uncond = encode_parts(engine.pipe, ["a cat", long_part], "blurry")
        short_alone, _ = encode_parts(engine.pipe, ["a cat"], "")
        empty, _ = encode_parts(engine.pipe, [""], "")
    assert conds.shape[:2] == (2, 154) and uncond.shape[:2] == (1, 154)
    assert torch.equal(conds[0, :77], short_alone[0])
    assert torch.equal(conds[0, 77:], short_alone[0, -1:].expand(77, -1))  # A1111 stacks parts so
    assert torch.equal(uncond[0, 77:], empty[0])


# --- pictures ----------------------------------------------------------------------------------
def picture(engine, prompt: str, cfg: float, sampler: str = "Euler") -> np.ndarray:
    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", steps=3, sampler_name=sampler, cfg_scale=cfg)
    return np.asarray(engine.generate(request, [11])[0].image, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_a_part_twice_pulls_twice_as_hard_as_cfg_twice_as_high(engine, sampler):
    """uncond + 3 (c - u) + 3 (c - u) is uncond + 6 (c - u): the same picture, up to rounding."""
    doubled, stronger = picture(engine, "a cat AND a cat", 3, sampler), picture(engine, "a cat", 6, sampler)
    plain = picture(engine, "a cat", 3, sampler)
    assert np.abs(doubled - stronger).max() <= 1
    assert np.abs(doubled - plain).mean() > 0.5  # the composing did something


def test_a_weight_scales_the_pull_and_a_part_of_weight_0_adds_nothing(engine):
    assert np.abs(picture(engine, "a cat:0.5", 8) - picture(engine, "a cat", 4)).max() <= 1
    alone = picture(engine, "a cat", 5)
    assert np.abs(picture(engine, "a dog:0 AND a cat", 5) - alone).max() <= 1  # rows are not mixed up
    assert np.abs(picture(engine, "a cat AND a dog:0", 5) - alone).max() <= 1
    assert np.abs(picture(engine, "a cat AND a dog", 5) - alone).mean() > 0.5


def test_a_composed_prompt_with_prompt_editing_reads_each_parts_text_at_each_step(engine):
    edited = picture(engine, "[a dog:a cat:0] AND a tree:0.5", 5)  # the edit switches before the first step
    assert np.abs(edited - picture(engine, "a cat AND a tree:0.5", 5)).max() <= 1


def test_img2img_and_the_hires_fix_compose_too(engine):
    from tests.helpers import noise_picture
    from webui.engine.img2img import image_sha1

    start = noise_picture(3)

    def run(prompt: str, cfg: float, **changes) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, steps=3, cfg_scale=cfg, width=64, height=64, **changes)
        pictures = {"init_image": start} if "init_image" in changes else {}
        return np.asarray(engine.generate(request, [4], **pictures)[0].image, dtype=np.int16)

    img2img = {"init_image": image_sha1(start), "denoising_strength": 0.7}
    assert np.abs(run("a cat AND a cat", 3, **img2img) - run("a cat", 6, **img2img)).max() <= 1
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}
    assert np.abs(run("a cat AND a cat", 3, **hires) - run("a cat", 6, **hires)).max() <= 1
    # The second pass composes its own prompt: here only it runs a row per part.
    rows = []
    hook = engine.pipe.unet.register_forward_hook(lambda _module, args, _output: rows.append(len(args[0])))
    try:
        run("a cat", 3, hr_prompt="a cat AND a cat", **hires)
    finally:
        hook.remove()
    assert rows == [2] * 3 + [3] * 3  # uncond and cond, then uncond and two parts


def test_the_token_counter_counts_the_longest_part_of_a_prompt_but_not_of_a_negative_prompt(engine):
    assert engine.count_tokens("cat AND dog bird fish") == 3
    assert engine.count_tokens("cat AND dog bird fish", negative=True) == 5  # A1111 does not split it
    assert engine.count_tokens("a cat:1") == 2


def test_a_trailing_weight_of_1_is_not_read_as_text(engine):
    assert np.abs(picture(engine, "a cat:1", 5) - picture(engine, "a cat", 5)).max() == 0


def test_an_lcm_distilled_model_refuses_and_before_drawing(tmp_path):
    """Its UNet takes the guidance scale as an input and runs without CFG's uncond rows, which AND needs."""
    from tests.tiny_sd import make_tiny_pipeline
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelRegistry

    pipe = make_tiny_pipeline(seed=1)
    pipe.unet = type(pipe.unet)(**{**pipe.unet.config, "time_cond_proj_dim": 32})
    pipe.save_pretrained(tmp_path / "lcm-tiny")
    lcm = Engine(Settings(models_dir=tmp_path, device="cpu"), ModelRegistry(tmp_path, tmp_path / "hashes.json"))
    lcm.load("lcm-tiny")
    request = GenerationRequest(prompt="a cat AND a dog", steps=2, cfg_scale=5, width=64, height=64)
    with pytest.raises(ValueError, match="LCM-distilled"):
        lcm.generate(request, [1])
    assert not lcm.pipe.unet._forward_pre_hooks  # nothing left behind
    assert lcm.generate(request.model_copy(update={"prompt": "a cat"}), [1])


@pytest.mark.parametrize("changes, message", [
    ({"prompt": "a cat AND a dog", "cfg_scale": 1}, "AND needs classifier-free guidance"),
    ({"prompt": "a screen 16:9", "cfg_scale": 1}, "ends in ':9'.*comma after the number"),
    ({"prompt": "[a cat AND a dog:a tree:2]"}, r"AND inside \[...\]"),
    ({"prompt": "[a cat AND a dog:a tree:50]"}, r"AND inside \[...\]"),  # also where the edit never comes
    ({"prompt": "[cat AND dog|bird AND fish]"}, r"AND inside \[...\]"),
    ({"prompt": "a cat:[1:2:2] AND a dog"}, "weights may not change"),
    ({"prompt": "a cat", "enable_hr": True, "hr_prompt": "a cat AND a dog", "cfg_scale": 1}, "hr_prompt"),
])
def test_what_cannot_be_composed_is_refused_before_it_is_queued(services, changes, message):
    request = {"prompt": "a cat", "steps": 4, "cfg_scale": 7, "width": 64, "height": 64} | changes
    with pytest.raises(InvalidRequest, match=message):
        services.worker.submit(request)
    assert services.worker.queue_length() == 0
