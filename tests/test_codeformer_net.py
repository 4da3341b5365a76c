"""CodeFormer network: forward passes of a tiny configuration, the published file's key layout, loading files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from webui.engine.codeformer_net import CodeFormer, Downsample, FidelityFusion, load_codeformer, match_mean_std

FIXTURE = Path(__file__).parent / "data" / "codeformer_v0_1_0_keys.json"

# The published layout scaled down: 64x64 faces, three levels (64, 32, 16) so the latent grid is still 16x16,
# attention at 16, fusion at 32 and 64. nf stays 32 because every GroupNorm has 32 groups.
TINY = dict(dim_embd=32, n_head=2, n_layers=2, codebook_size=64, latent_size=256, connect_list=("32", "64"),
            img_size=64, nf=32, ch_mult=(1, 2, 2), res_blocks=2, attn_resolutions=(16,), emb_dim=32)


def tiny_model(seed: int = 0) -> CodeFormer:
    torch.manual_seed(seed)
    model = CodeFormer(**TINY).eval()
    with torch.no_grad():
        model.position_emb.normal_(0, 0.5)  # zeros at construction; a trained network's are not
    return model


def faces(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def restore(model: CodeFormer, x: torch.Tensor, w: float) -> torch.Tensor:
    with torch.no_grad():
        return model(x, w=w, adain=True)[0]  # A1111's call


def test_forward_returns_the_face_first_with_the_input_shape():
    model = tiny_model()
    with torch.no_grad():
        restored, logits, latent = model(faces(), w=0.5, adain=True)
    assert restored.shape == (2, 3, 64, 64)
    assert logits.shape == (2, 256, 64)  # one codebook choice per cell of the 16x16 grid
    assert latent.shape == (2, 32, 16, 16)
    assert torch.isfinite(restored).all()


def test_fidelity_weight_changes_the_face_and_each_weight_is_deterministic():
    model, x = tiny_model(), faces()
    codebook_only, faithful = restore(model, x, 0.0), restore(model, x, 1.0)
    assert (codebook_only - faithful).abs().max() > 1e-3
    assert torch.equal(restore(model, x, 0.0), codebook_only)
    assert torch.equal(restore(model, x, 1.0), faithful)


def test_w0_ignores_the_fusion_blocks_and_w1_uses_them():
    model, x = tiny_model(), faces()
    before_0, before_1 = restore(model, x, 0.0), restore(model, x, 1.0)
    with torch.no_grad():
        for parameter in model.fuse_convs_dict.parameters():
            parameter.add_(0.05)
    assert torch.equal(restore(model, x, 0.0), before_0)
    assert (restore(model, x, 1.0) - before_1).abs().max() > 1e-3


def test_fusion_residual_grows_linearly_with_w():
    torch.manual_seed(4)
    fusion = FidelityFusion(32)
    encoded, decoded = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        full = fusion(encoded, decoded, 1.0) - decoded
        part = fusion(encoded, decoded, 0.3) - decoded
    assert full.abs().max() > 1e-2
    torch.testing.assert_close(part, 0.3 * full)


def test_downsample_keeps_the_top_left_pixel_on_the_grid():
    # the trained layout pads only right and bottom: a kernel reading its top-left tap picks x[2i, 2j]
    down = Downsample(2)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[0, 0, 0, 0] = down.conv.weight[1, 1, 0, 0] = 1
        x = torch.randn(1, 2, 8, 8)
        assert torch.equal(down(x), x[..., ::2, ::2])


def test_adain_gives_the_content_the_style_channel_statistics():
    gen = torch.Generator().manual_seed(2)
    content = torch.randn(2, 3, 4, 5, generator=gen) * 3 + 1
    style = torch.randn(2, 3, 4, 5, generator=gen) * 0.5 - 2
    out = match_mean_std(content, style).numpy().reshape(2, 3, -1)
    c, s = content.numpy().reshape(2, 3, -1), style.numpy().reshape(2, 3, -1)
    np.testing.assert_allclose(out.mean(axis=2), s.mean(axis=2), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=2), s.std(axis=2), rtol=1e-3)
    # exactly: per channel, unbiased variances with 1e-5 added on both sides (the reference's formula)
    scale = np.sqrt(s.var(axis=2, ddof=1) + 1e-5) / np.sqrt(c.var(axis=2, ddof=1) + 1e-5)
    expected = (c - c.mean(axis=2, keepdims=True)) * scale[..., None] + s.mean(axis=2, keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_adain_changes_the_face():
    model, x = tiny_model(), faces()
    with torch.no_grad():
        assert (model(x, w=0.5, adain=True)[0] - model(x, w=0.5, adain=False)[0]).abs().max() > 1e-3


def test_a_face_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        tiny_model()(torch.zeros(1, 3, 32, 32))


def test_published_configuration_has_exactly_the_files_keys_and_shapes():
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        model = CodeFormer()
    found = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(found) ^ set(expected)) == []
    assert {key: shape for key, shape in found.items() if expected[key] != shape} == {}


def test_published_configuration_fuses_at_the_reference_blocks():
    # the reference network's tables: where encoder features are taken and where the generator fuses them
    with torch.device("meta"):
        model = CodeFormer()
    assert model.encoder.taps == {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
    assert model.generator.fuse_points == {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}
    assert sorted(model.fuse_convs_dict) == ["128", "256", "32", "64"]


@pytest.mark.parametrize("name,wrap", [("cf.pth", "params_ema"), ("cf.pt", "params"), ("cf.safetensors", None)])
def test_load_round_trips(tmp_path, name, wrap):
    model, x = tiny_model(seed=3), faces(batch=1)
    state = model.state_dict()
    path = tmp_path / name
    if wrap is None:
        save_file(state, str(path))
    else:
        torch.save({wrap: state}, path)
    loaded = load_codeformer(path, **TINY)
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(restore(loaded, x, 0.7), restore(model, x, 0.7))


def test_load_converts_dtype(tmp_path):
    path = tmp_path / "cf.pth"
    torch.save({"params_ema": {k: v.half() for k, v in tiny_model().state_dict().items()}}, path)
    loaded = load_codeformer(path, dtype=torch.float32, **TINY)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_a_file_of_another_layout_is_refused_by_name(tmp_path):
    path = tmp_path / "tiny-codeformer.pth"
    torch.save({"params_ema": tiny_model().state_dict()}, path)
    with pytest.raises(ValueError, match="tiny-codeformer.pth") as error:
        load_codeformer(path)  # the published configuration
    message = str(error.value)
    assert "missing encoder.blocks." in message
    assert "wrong shape: position_emb is [256, 32], expected [256, 512]" in message


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = tiny_model().state_dict()
    del state["idx_pred_layer.1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="edited.safetensors") as error:
        load_codeformer(path, **TINY)
    assert "missing idx_pred_layer.1.weight" in str(error.value)
    assert "unexpected extra.weight" in str(error.value)
