"""Tiling: every convolution pads by wrapping around for the run that asks, so a picture tiles without a seam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

# ui_services and ui: test_ui's module fixtures, started again for this module.
from tests.test_ui import event, input_labels, ui, ui_services  # noqa: F401
from tests.tiny_sd import make_tiny_pipeline
from webui.ui.params import TXT2IMG_FIELDS
from webui.ui.session import Session
from webui.engine.tiling import seamless
from webui.prompt_lines import line_requests
from webui.schemas import GenerationRequest
from webui.storage.infotext import request_fields_from_infotext

SHIFT = 8  # latent pixels: a multiple of every downsampling in the UNet, so a shifted input is a shifted output


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline(seed=5)


def unet_output(pipe, latents: torch.Tensor) -> torch.Tensor:
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return pipe.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample


def test_with_tiling_the_unet_and_the_vae_treat_the_picture_as_wrapping_around(pipe):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rolled = torch.roll(latents, SHIFT, dims=-1)
    with torch.no_grad():
        with seamless(pipe, True):
            # A picture that wraps around has no edge: moving it sideways moves the result, and changes nothing else.
            assert torch.allclose(unet_output(pipe, rolled), torch.roll(unet_output(pipe, latents), SHIFT, dims=-1),
                                  atol=1e-4)
            pixels = pipe.vae.decode(latents).sample
            assert torch.allclose(pipe.vae.decode(rolled).sample, torch.roll(pixels, SHIFT * pipe.vae_scale_factor, dims=-1), atol=1e-4)
        # Without it the edges are padded with zeros, and the same move changes the result.
        assert not torch.allclose(unet_output(pipe, rolled), torch.roll(unet_output(pipe, latents), SHIFT, dims=-1),
                                  atol=1e-2)


def test_the_padding_is_put_back_after_the_run_even_a_failed_one(pipe):
    convolutions = [m for part in (pipe.unet, pipe.vae) for m in part.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and {conv.padding_mode for conv in convolutions} == {"zeros"}
    with pytest.raises(RuntimeError, match="stopped"):
        with seamless(pipe, True):
            assert {conv.padding_mode for conv in convolutions} == {"circular"}
            raise RuntimeError("stopped")
    assert {conv.padding_mode for conv in convolutions} == {"zeros"}
    with seamless(pipe, False):
        assert {conv.padding_mode for conv in convolutions} == {"zeros"}


def test_the_engine_pads_around_only_for_a_tiling_request(engine):
    convolution = next(m for m in engine.pipe.unet.modules() if isinstance(m, nn.Conv2d))
    seen = []
    hook = convolution.register_forward_pre_hook(lambda module, args: seen.append(module.padding_mode))
    try:
        plain = engine.generate(GenerationRequest(prompt="a brick wall", steps=2), [3])[0].image
        tiled = engine.generate(GenerationRequest(prompt="a brick wall", steps=2, tiling=True), [3])[0].image
    finally:
        hook.remove()
    assert set(seen[:len(seen) // 2]) == {"zeros"} and set(seen[len(seen) // 2:]) == {"circular"}
    assert convolution.padding_mode == "zeros"
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(tiled, dtype=int)).max() > 0


def test_tiling_goes_into_the_infotext_and_back():
    text = "a brick wall\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, Tiling: True"
    assert request_fields_from_infotext(text)["tiling"] is True
    assert request_fields_from_infotext(text.replace(", Tiling: True", ""))["tiling"] is False  # left out: off
    assert "tiling" not in request_fields_from_infotext("just a prompt")  # no parameters: the page's own stays
    assert [r.get("tiling") for r in line_requests({"prompt": "x"}, "--tiling true\n--tiling false\n--seed 2")] == [
        True, False, None]


def test_the_tiling_checkbox_is_on_both_tabs_and_a_send_sets_it(ui):
    assert input_labels(ui, "txt2img")["tiling"] == "Tiling" and input_labels(ui, "img2img")["tiling"] == "Tiling"
    sent = event(ui, "send_from_pnginfo")("a brick wall\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Tiling: True")
    assert sent[TXT2IMG_FIELDS.index("tiling")] is True
    *_, last = event(ui, "txt2img")(Session(), "a brick wall", steps=2, width=64, height=64, seed=3, tiling=True)
    assert "Tiling: True" in last[4]


def test_above_a_megapixel_a_tiling_run_decodes_whole_and_no_tiles_are_left_on(engine, monkeypatch):
    """VAE tiles would each wrap around themselves, not around the picture."""
    from webui.engine.generate import _Run

    factor = engine.pipe.vae_scale_factor
    latents = torch.zeros(1, 4, 1088 // factor, 1088 // factor)
    asked = []

    def decode(latents, tiled=False):  # what was asked, without the minutes a real decode this large takes here
        asked.append(tiled)
        return torch.zeros(latents.shape[0], 3, *(side * factor for side in latents.shape[-2:]))

    monkeypatch.setattr(engine, "decode", decode)
    for tiling in (False, True):
        engine._to_images(latents, GenerationRequest(tiling=tiling), _Run([0], None, 1))
    assert asked == [True, False]
    monkeypatch.undo()
    with torch.inference_mode():
        engine.decode(torch.randn(1, 4, 8, 8), tiled=True)
    assert engine.pipe.vae.use_tiling is False  # an encode after it (img2img, hires) runs whole too
