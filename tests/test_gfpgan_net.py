"""GFPGAN network: forward passes of tiny configurations, the published file's key layout, loading files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from webui.engine.gfpgan_net import GFPGANv1Clean, ModulatedConv2d, load_gfpgan

FIXTURE = Path(__file__).parent / "data" / "gfpgan_v1_4_keys.json"

# The published flags (input_is_latent, different_w, sft_half) at 32x32 with an eighth of the channels
TINY = dict(out_size=32, num_style_feat=32, channel_multiplier=2, num_mlp=2, narrow=0.125)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, noise strengths and biases too (most are zeros at construction; trained ones are not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = torch.randn(tensor.shape, generator=gen)
            if name.endswith("weight") and tensor.ndim >= 2:
                fan_in = tensor[0, 0].numel() if tensor.ndim == 5 else tensor[0].numel()
                tensor.copy_(values / fan_in ** 0.5)
            elif name.endswith("modulation.bias"):
                tensor.copy_(1 + 0.1 * values)
            else:
                tensor.copy_(0.1 * values)
    return model.eval()


def tiny_model(seed: int = 0, **flags) -> GFPGANv1Clean:
    return randomize(GFPGANv1Clean(**{**TINY, **flags}), seed)


def faces(batch: int = 2, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def restore(model: GFPGANv1Clean, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def decoder_output(model: GFPGANv1Clean, x: torch.Tensor) -> torch.Tensor:
    """The network's output before the clamp."""
    seen = []
    handle = model.stylegan_decoder.register_forward_hook(lambda module, args, out: seen.append(out))
    restore(model, x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("flags", [{}, dict(input_is_latent=False), dict(different_w=False, sft_half=False),
                                   dict(input_is_latent=False, different_w=False)])
def test_forward_gives_a_face_of_the_input_shape_in_range(flags):
    restored = restore(tiny_model(**flags), faces(batch=2))
    assert restored.shape == (2, 3, 32, 32)
    assert restored.min() >= -1 and restored.max() <= 1
    inside = (restored.abs() < 0.99).float().mean()
    assert inside > 0.2  # a picture, not a sheet of clipped values
    assert (restored[0] - restored[1]).abs().max() > 1e-3  # each face its own output


def test_output_is_the_decoders_clamped_to_minus_one_one():
    model, x = tiny_model(), faces()
    with torch.no_grad():
        model.stylegan_decoder.to_rgbs[-1].bias.fill_(0.8)  # push part of the picture past 1
    raw = decoder_output(model, x)
    assert raw.max() > 1.05
    assert torch.equal(restore(model, x), raw.clamp(-1, 1))


def test_every_levels_rgb_adds_up_to_the_picture():
    # each to-RGB adds to the upsampled picture so far: a constant added at the 4x4 level (upsampled bilinearly,
    # still a constant) comes through to the 32x32 output unchanged
    model, x = tiny_model(), faces()
    before = decoder_output(model, x)
    with torch.no_grad():
        model.stylegan_decoder.to_rgb1.bias.add_(torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1))
    torch.testing.assert_close(decoder_output(model, x) - before,
                               torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1).expand_as(before))


def test_same_face_same_output_and_batch_members_are_independent():
    model, x = tiny_model(), faces(batch=3)
    first = restore(model, x)
    assert torch.equal(restore(model, x), first)
    torch.testing.assert_close(restore(model, x[1:2]), first[1:2], atol=1e-5, rtol=1e-5)


def test_the_stored_noise_maps_are_the_noise():
    model, x = tiny_model(), faces()
    before = restore(model, x)
    with torch.no_grad():
        model.stylegan_decoder.noises.noise3.add_(1.0)  # the 16x16 level's first conv
    assert (restore(model, x) - before).abs().max() > 1e-3
    with torch.no_grad():
        model.stylegan_decoder.style_convs[2].weight.zero_()  # that conv's noise strength
        silent = restore(model, x)
        model.stylegan_decoder.noises.noise3.normal_()
    assert torch.equal(restore(model, x), silent)


def test_style_mlp_runs_only_where_the_codes_are_not_latents():
    for input_is_latent in (True, False):
        model, x = tiny_model(input_is_latent=input_is_latent), faces()
        before = restore(model, x)
        with torch.no_grad():
            model.stylegan_decoder.style_mlp[1].weight.mul_(3).add_(0.2)
        changed = bool((restore(model, x) - before).abs().max() > 1e-3)
        assert changed is (not input_is_latent)


def test_sft_half_transforms_the_second_half_of_the_channels():
    # the tensors going into a level's second conv: its first conv's output with scale and shift applied
    for sft_half in (True, False):
        model, x = tiny_model(sft_half=sft_half), faces()
        seen = {}
        model.stylegan_decoder.style_convs[2].register_forward_hook(lambda m, args, out: seen.update(conv=out))
        model.stylegan_decoder.style_convs[3].register_forward_pre_hook(lambda m, args: seen.update(sft=args[0]))
        model.conv_body_up[1].register_forward_hook(lambda m, args, out: seen.update(feat=out))
        restore(model, x)
        with torch.no_grad():
            scale, shift = model.condition_scale[1](seen["feat"]), model.condition_shift[1](seen["feat"])
        conv, half = seen["conv"], seen["conv"].shape[1] // 2
        if sft_half:
            assert scale.shape[1] == half
            expected = torch.cat([conv[:, :half], conv[:, half:] * scale + shift], dim=1)
        else:
            assert scale.shape[1] == conv.shape[1]
            expected = conv * scale + shift
        torch.testing.assert_close(seen["sft"], expected)


def test_modulated_conv_matches_a_per_sample_convolution():
    torch.manual_seed(5)
    conv = randomize(ModulatedConv2d(4, 6, 3, num_style_feat=8), seed=5)
    x, style = torch.randn(3, 4, 5, 5), torch.randn(3, 8)
    with torch.no_grad():
        out = conv(x, style)
        for sample in range(3):
            weight = conv.weight[0] * conv.modulation(style[sample])[None, :, None, None]
            weight = weight / weight.pow(2).sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
            torch.testing.assert_close(out[sample:sample + 1], F.conv2d(x[sample:sample + 1], weight, padding=1))


def test_demodulation_cancels_the_style_scale_and_its_absence_keeps_it():
    torch.manual_seed(6)
    x, style = torch.randn(2, 4, 6, 6), torch.randn(2, 8)
    for demodulate in (True, False):
        conv = randomize(ModulatedConv2d(4, 3, 1, 8, demodulate=demodulate), seed=6)
        with torch.no_grad():
            before = conv(x, style)
            conv.modulation.weight.mul_(2.5)
            conv.modulation.bias.mul_(2.5)
            after = conv(x, style)
        torch.testing.assert_close(after, before if demodulate else 2.5 * before)


def test_upsampling_conv_doubles_the_side():
    conv = randomize(ModulatedConv2d(4, 3, 3, 8, upsample=True), seed=7)
    with torch.no_grad():
        assert conv(torch.randn(2, 4, 5, 7), torch.randn(2, 8)).shape == (2, 3, 10, 14)


def test_a_face_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        tiny_model()(torch.zeros(1, 3, 64, 64))


def test_out_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        GFPGANv1Clean(out_size=48)


def test_published_configuration_has_exactly_the_files_keys_and_shapes():
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        model = GFPGANv1Clean()
    found = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(found) ^ set(expected)) == []
    assert {key: shape for key, shape in found.items() if expected[key] != shape} == {}


@pytest.mark.parametrize("name,wrap", [("g.pth", "params_ema"), ("g.pt", "params"), ("g.safetensors", None)])
def test_load_round_trips(tmp_path, name, wrap):
    model, x = tiny_model(seed=3), faces(batch=1)
    state = model.state_dict()
    path = tmp_path / name
    if wrap is None:
        save_file(state, str(path))
    else:
        torch.save({wrap: state}, path)
    loaded = load_gfpgan(path, **TINY)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    # safetensors 0.8 maps a file's tensors 8-byte aligned, so the CPU's kernels may round a last digit otherwise
    torch.testing.assert_close(restore(loaded, x), restore(model, x), rtol=0, atol=1e-5)


def test_load_converts_dtype(tmp_path):
    path = tmp_path / "g.pth"
    torch.save({"params_ema": {k: v.half() for k, v in tiny_model().state_dict().items()}}, path)
    loaded = load_gfpgan(path, dtype=torch.float32, **TINY)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}  # noise buffers too
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())


def test_a_file_of_another_layout_is_refused_by_name(tmp_path):
    path = tmp_path / "tiny-gfpgan.pth"
    torch.save({"params_ema": tiny_model().state_dict()}, path)
    with pytest.raises(ValueError, match="tiny-gfpgan.pth") as error:
        load_gfpgan(path)  # the published configuration
    message = str(error.value)
    assert "missing conv_body_down.3." in message  # 512x512 has 7 down blocks, 32x32 has 3
    # the 512 level's block widens 32 -> 64 channels; the tiny one's keeps 32
    assert "wrong shape: conv_body_down.0.conv2.weight is [32, 32, 3, 3], expected [64, 32, 3, 3]" in message


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = tiny_model().state_dict()
    del state["stylegan_decoder.noises.noise2"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="edited.safetensors") as error:
        load_gfpgan(path, **TINY)
    assert "missing stylegan_decoder.noises.noise2" in str(error.value)
    assert "unexpected extra.weight" in str(error.value)


def test_a_file_that_is_no_weights_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        load_gfpgan(path, **TINY)
