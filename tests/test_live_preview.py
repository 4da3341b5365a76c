"""A1111's Live preview methods (webui/engine/preview.py): Approx cheap's linear map, Full's VAE decode, and TAESD's
tiny decoder read from madebyollin's file layout (fetched on first use), falling back to Approx cheap without it."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import webui.engine.preview as preview
from tests.helpers import reported_steps
from webui.engine.preview import TAESD_FILES, TinyDecoders, latents_to_preview, load_tiny_decoder
from webui.schemas import InvalidRequest
from webui.storage.options import OptionsStore

# A1111's TAESD decoder (modules/sd_vae_taesd.py), as a list: Clamp, conv 4->64, ReLU, then three times (3 Blocks,
# Upsample, conv without bias), then a Block and a conv 64->3. The layers with weights, by their index there.
CONVS_WITH_BIAS, CONVS_WITHOUT_BIAS, BLOCKS = (1, 19), (7, 12, 17), (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)


def madebyollin_decoder_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random decoder in the TAESD file's own layout: each key as the layer list above numbers it."""
    generator = torch.Generator().manual_seed(seed)

    def weights(shape):
        return torch.randn(shape, generator=generator) * 0.1

    state = {}
    for index in CONVS_WITH_BIAS:
        out_channels, in_channels = (64, 4) if index == 1 else (3, 64)
        state |= {f"{index}.weight": weights((out_channels, in_channels, 3, 3)), f"{index}.bias": weights((out_channels,))}
    for index in CONVS_WITHOUT_BIAS:
        state[f"{index}.weight"] = weights((64, 64, 3, 3))
    for index in BLOCKS:
        for conv in (0, 2, 4):
            state |= {f"{index}.conv.{conv}.weight": weights((64, 64, 3, 3)), f"{index}.conv.{conv}.bias": weights((64,))}
    torch.save(state, path)
    return state


def by_hand(state: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """The TAESD decoder worked out layer by layer from the file's weights: a picture in 0..1."""
    def conv(x, index):
        return torch.nn.functional.conv2d(x, state[f"{index}.weight"], state.get(f"{index}.bias"), padding=1)

    def block(x, index):
        y = torch.relu(torch.nn.functional.conv2d(x, state[f"{index}.conv.0.weight"], state[f"{index}.conv.0.bias"], padding=1))
        y = torch.relu(torch.nn.functional.conv2d(y, state[f"{index}.conv.2.weight"], state[f"{index}.conv.2.bias"], padding=1))
        y = torch.nn.functional.conv2d(y, state[f"{index}.conv.4.weight"], state[f"{index}.conv.4.bias"], padding=1)
        return torch.relu(y + x)

    x = torch.relu(conv(torch.tanh(latents / 3) * 3, 1))
    for blocks, up_conv in (((3, 4, 5), 7), ((8, 9, 10), 12), ((13, 14, 15), 17)):
        for index in blocks:
            x = block(x, index)
        x = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), up_conv)
    return conv(block(x, 18), 19)


def test_a_taesd_file_reads_into_the_decoder_its_layers_describe(tmp_path):
    state = madebyollin_decoder_file(tmp_path / "taesd_decoder.pth")
    decoder = load_tiny_decoder(tmp_path / "taesd_decoder.pth")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        got = decoder(latents)
    assert got.shape == (1, 3, 64, 64)
    assert torch.allclose((got + 1) / 2, by_hand(state, latents), atol=1e-5)  # DecoderTiny gives -1..1


def test_taesd_previews_the_tiny_decoders_picture_and_sdxl_reads_its_own_file(tmp_path, caplog):
    state = madebyollin_decoder_file(tmp_path / TAESD_FILES[False])
    decoders = TinyDecoders(tmp_path, downloads=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    decoder = decoders.decoder(False, "cpu", torch.float32)
    picture = latents_to_preview(latents, vae=None, method="TAESD", tiny_decoder=decoder)
    expected = by_hand(state, latents[:1])[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert picture.size == (64, 64) and np.abs(np.asarray(picture, float) - expected).max() <= 1
    assert decoders.decoder(False, "cpu", torch.float32) is decoder  # read once
    with caplog.at_level(logging.WARNING):
        assert decoders.decoder(True, "cpu", torch.float32) is None  # taesdxl_decoder.pth is not there
        assert decoders.decoder(True, "cpu", torch.float32) is None
    assert caplog.text.count("taesdxl_decoder.pth cannot be used") == 1  # said once, not at every preview
    assert "does not download" in caplog.text


@pytest.mark.parametrize("content", [b"not a torch file", b""])
def test_a_spoilt_taesd_file_gives_no_decoder_and_no_error(tmp_path, content, caplog):
    (tmp_path / TAESD_FILES[False]).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert TinyDecoders(tmp_path, downloads=False).decoder(False, "cpu", torch.float32) is None
    assert "previews are Approx cheap's" in caplog.text


def test_a_missing_taesd_file_is_fetched_whole_or_not_at_all(tmp_path, monkeypatch, caplog):
    source = tmp_path / "source"
    source.mkdir()
    madebyollin_decoder_file(source / TAESD_FILES[False])
    monkeypatch.setattr(preview, "TAESD_URL", source.as_uri() + "/{}")
    folder = tmp_path / "VAE-taesd"
    assert TinyDecoders(folder).decoder(False, "cpu", torch.float32) is not None
    assert (folder / TAESD_FILES[False]).read_bytes() == (source / TAESD_FILES[False]).read_bytes()
    (source / TAESD_FILES[True]).write_bytes(b"<html>not found</html>")  # what came is no decoder
    with caplog.at_level(logging.WARNING):
        assert TinyDecoders(folder).decoder(True, "cpu", torch.float32) is None
    assert sorted(path.name for path in folder.iterdir()) == [TAESD_FILES[False]]  # nothing half-written


def test_full_decodes_with_the_models_vae_where_approx_cheap_maps_the_channels(monkeypatch):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4).eval()
    latents = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(preview, "SMALL_VAE_PARAMS", 0)  # as a full-size VAE: Approx cheap maps, never decodes
    full = np.asarray(latents_to_preview(latents, vae, "Full"), float)
    with torch.no_grad():
        decoded = vae.decode(latents[:1] / vae.config.scaling_factor).sample[0]
    assert np.abs(full - ((decoded.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255).max() <= 1
    cheap = np.asarray(latents_to_preview(latents, vae, "Approx cheap"), float)
    mapped = ((torch.einsum("chw,cr->rhw", latents[0], preview.SD_LATENT_RGB) + 1) / 2).clamp(0, 1)
    assert np.abs(cheap - mapped.permute(1, 2, 0).numpy() * 255).max() <= 1
    assert np.abs(cheap - full).mean() > 5
    # TAESD without its decoder: Approx cheap's picture
    assert np.array_equal(np.asarray(latents_to_preview(latents, vae, "TAESD", None)), cheap.astype(np.uint8))


def test_the_setting_takes_a1111s_names_and_refuses_others():
    store = OptionsStore(None)
    assert store.current().show_progress_type == "Approx cheap"
    assert store.update({"show_progress_type": "Approx NN"}).show_progress_type == "Approx cheap"  # A1111's default
    assert store.update({"show_progress_type": "TAESD"}).show_progress_type == "TAESD"
    with pytest.raises(InvalidRequest, match="show_progress_type: Input should be 'Approx cheap', 'Full' or 'TAESD'"):
        store.update({"show_progress_type": "Fast"})


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "UniPC", "PLMS"])
def test_the_preview_is_shown_where_the_run_is_heading(engine, monkeypatch, sampler):
    """Each step's estimate of the finished latents goes to the preview (PLMS keeps none: its latents do). A sampler's
    last step lands on its last estimate; Euler's steps are each the straight line towards theirs."""
    from webui.schemas import GenerationRequest

    reported, shown = reported_steps(monkeypatch), []
    request = GenerationRequest(prompt="a red fox", steps=4, width=64, height=64, sampler_name=sampler,
                                eta_ancestral=0.0 if sampler == "Euler a" else 1.0)
    engine.generate(request, [5], lambda step, total, latents: latents is not None and shown.append(latents))
    assert len(reported) == len(shown) == 4
    if sampler == "PLMS":
        assert all(estimate is None for _, estimate in reported)
        assert all(torch.equal(seen, latents) for seen, (latents, _) in zip(shown, reported))
        return
    assert all(torch.equal(seen, estimate) for seen, (_, estimate) in zip(shown, reported))
    assert not any(torch.allclose(latents, estimate, atol=1e-2) for latents, estimate in reported[:-1])
    if sampler == "Euler":  # x' = x + (x - estimate) / sigma * (sigma' - sigma), k-diffusion's Euler step
        scheduler = engine._scheduler("Euler", "Automatic")
        scheduler.set_timesteps(4)
        sigma, following = map(float, scheduler.sigmas[1:3])
        (before, _), (after, estimate) = reported[0], reported[1]
        assert torch.allclose(after, before + (before - estimate) / sigma * (following - sigma), atol=1e-3)
    last_latents, last_estimate = reported[-1]
    if sampler != "UniPC":  # UniPC ends at the smallest sigma, a hair from its estimate
        assert torch.allclose(last_latents, last_estimate, atol=1e-4)


def test_the_step_keeps_its_signature_and_both_ways_of_returning(engine):
    import inspect

    from webui.engine.preview import denoised_estimate

    scheduler = engine._scheduler("Euler a", "Automatic")
    assert "generator" in inspect.signature(scheduler.step).parameters  # the pipeline passes the generators so
    scheduler.set_timesteps(4)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    prev, estimate = scheduler.step(output, scheduler.timesteps[0], sample, return_dict=False)
    assert denoised_estimate(scheduler) is estimate
    returned = scheduler.step(output, scheduler.timesteps[1], prev)
    assert denoised_estimate(scheduler) is returned.pred_original_sample
