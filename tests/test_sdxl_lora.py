"""SDXL LoRAs: kohya's keys (lora_te1_/lora_te2_ for the two text encoders, the UNet's layers by their names in
Stability's original code) and diffusers' (text_encoder_2.), merged into a tiny random SDXL (tests/tiny_sdxl.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import loaded_engine
from tests.test_lora import write_lora
from tests.tiny_sd import save_tiny_model
from tests.tiny_sdxl import save_tiny_sdxl_model
from webui.engine.lora import LoraError, LoraPatcher, LoraUse, sgm_name
from webui.schemas import GenerationRequest

XL, SD = "tiny-xl", "tiny-sd"
RANK, ALPHA = 2, 1.0
# (part, kohya's name, the diffusers module it names in the tiny SDXL, the weight's shape). The tiny UNet has one
# resnet a level and two levels: input_blocks 1 (level 0's resnet), 2 (its downsampler), 3 (level 1's resnet and
# attention); output_blocks 0-1 (level 0 going up: resnets, attentions, the upsampler inside 1) and 2-3.
LAYERS = [
    ("unet", "input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1", (16, 16, 3, 3)),
    ("unet", "input_blocks_2_0_op", "down_blocks.0.downsamplers.0.conv", (16, 16, 3, 3)),
    ("unet", "input_blocks_3_1_transformer_blocks_1_attn2_to_k",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", (32, 64)),
    ("unet", "middle_block_1_transformer_blocks_0_attn1_to_q",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
    ("unet", "output_blocks_1_1_proj_out", "up_blocks.0.attentions.1.proj_out", (32, 32)),
    ("unet", "output_blocks_1_2_conv", "up_blocks.0.upsamplers.0.conv", (32, 32, 3, 3)),
    ("unet", "output_blocks_3_0_skip_connection", "up_blocks.1.resnets.1.conv_shortcut", (16, 32, 1, 1)),
    ("unet", "label_emb_0_0", "add_embedding.linear_1", (64, 64)),
    ("te", "text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj", (24, 24)),
    ("te2", "text_model_encoder_layers_1_mlp_fc1", "encoder.layers.1.mlp.fc1", (37, 40)),
]
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te1_", "te2": "lora_te2_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te2": "text_encoder_2."}


def pieces(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) for each of LAYERS, large enough to change the tiny model's picture."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for *_, (out_ch, in_ch, *kernel) in LAYERS:
        down = torch.randn(RANK, in_ch, *kernel, generator=generator)
        made.append((torch.randn(out_ch, RANK, *([1, 1] if kernel else []), generator=generator), down))
    return made


def kohya_state(only=("unet", "te", "te2")) -> dict[str, torch.Tensor]:
    state = {}
    for (part, name, _, _), (up, down) in zip(LAYERS, pieces()):
        if part in only:
            base = KOHYA_PREFIX[part] + name
            state |= {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down,
                      f"{base}.alpha": torch.tensor(ALPHA)}
    return state


def diffusers_state() -> dict[str, torch.Tensor]:
    state = {}
    for (part, _, module, _), (up, down) in zip(LAYERS, pieces()):
        base = DIFFUSERS_PREFIX[part] + ("text_model." if part != "unet" else "") + module
        state |= {f"{base}.lora_B.weight": up, f"{base}.lora_A.weight": down, f"{base}.alpha": torch.tensor(ALPHA)}
    return state


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    save_tiny_sdxl_model(models / XL)
    save_tiny_model(models / SD)
    loras = tmp_path_factory.mktemp("Lora")
    write_lora(loras, "xl-kohya", kohya_state())
    write_lora(loras, "xl-diffusers", diffusers_state())
    write_lora(loras, "xl-te2", kohya_state(only=("te2",)))
    return loaded_engine(models, XL, tmp_path_factory.mktemp("cache"), lora_dir=loras)


def picture(engine, prompt: str) -> np.ndarray:
    [result] = engine.generate(GenerationRequest(prompt=prompt, steps=2), [5])
    return np.asarray(result.image, np.int16)


def module_of(pipe, part: str, module: str) -> torch.nn.Module:
    model = {"unet": pipe.unet, "te": pipe.text_encoder, "te2": pipe.text_encoder_2}[part]
    modules = dict(model.named_modules())
    return modules.get(module) or modules["text_model." + module]  # transformers 5 kept that level in one of them


def test_kohya_sdxl_keys_add_the_scaled_product_to_the_layers_they_name_and_come_out_again(engine):
    pipe = engine.pipe
    before = [module_of(pipe, part, module).weight.detach().clone() for part, _, module, _ in LAYERS]
    assert [tuple(weight.shape) for weight in before] == [shape for *_, shape in LAYERS]
    patcher = LoraPatcher()
    patcher.use(pipe, [(engine.loras.find("xl-kohya"), LoraUse("xl-kohya", te=0.5, unet=2.0))])
    for (part, name, module, shape), (up, down), old in zip(LAYERS, pieces(), before):
        multiplier = 2.0 if part == "unet" else 0.5
        expected = old + multiplier * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(shape)
        assert torch.allclose(module_of(pipe, part, module).weight, expected, atol=1e-5), name
    patcher.restore()
    for (part, _, module, _), old in zip(LAYERS, before):
        assert torch.equal(module_of(pipe, part, module).weight, old)


def test_an_sdxl_lora_changes_the_picture_and_diffusers_keys_draw_the_same(engine):
    plain = picture(engine, "a red apple")
    kohya = picture(engine, "a red apple <lora:xl-kohya:0.8>")
    assert np.abs(kohya - plain).mean() > 2, "the LoRA changed nothing"
    assert np.abs(picture(engine, "a red apple <lora:xl-diffusers:0.8>") - kohya).max() <= 1
    assert np.array_equal(picture(engine, "a red apple"), plain)  # taken out again exactly


def test_the_second_text_encoder_s_layers_reach_the_picture_and_follow_the_text_encoder_multiplier(engine):
    plain = picture(engine, "a red apple")
    assert np.abs(picture(engine, "a red apple <lora:xl-te2:1>") - plain).mean() > 0
    assert np.array_equal(picture(engine, "a red apple <lora:xl-te2:0:1>"), plain)  # te=0: nothing of it merged


def test_an_sdxl_lora_on_an_sd_model_is_refused_and_the_weights_stay_as_loaded(engine):
    from tests.tiny_sd import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    before = {name: value.clone() for name, value in pipe.text_encoder.state_dict().items()}
    with pytest.raises(LoraError, match="made for SDXL .* pick an SDXL model"):
        LoraPatcher().use(pipe, [(engine.loras.find("xl-kohya"), LoraUse("xl-kohya", 1.0, 1.0))])
    assert all(torch.equal(value, before[name]) for name, value in pipe.text_encoder.state_dict().items())


def test_the_lora_hashes_infotext_key_is_written_for_sdxl_loras(engine):
    import hashlib
    import struct

    data = (engine.loras.folder / "xl-kohya.safetensors").read_bytes()
    header = struct.unpack("<Q", data[:8])[0]  # A1111's LoRA hash: sha256 of what follows the header, 12 digits
    expected = hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    request = GenerationRequest(prompt="a red apple <lora:xl-kohya:0.8>", steps=2)
    assert engine.lora_hashes(request) == f"xl-kohya: {expected}"


# Known names of real models' layers in the original layout, as kohya's LoRA files for them name them; the configs
# are the ones the repo ships for SDXL 1.0 base and SD 1.5.
@pytest.mark.parametrize("config, original, diffusers", [
    ("sdxl-base", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sdxl-base", "input_blocks.8.1.proj_in", "down_blocks.2.attentions.1.proj_in"),
    ("sdxl-base", "input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("sdxl-base", "middle_block.1.transformer_blocks.9.ff.net.2",
     "mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
    ("sdxl-base", "middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("sdxl-base", "output_blocks.5.1.transformer_blocks.1.attn2.to_k",
     "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k"),
    ("sdxl-base", "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("sdxl-base", "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("sdxl-base", "label_emb.0.2", "add_embedding.linear_2"),
    ("sd-v1", "input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("sd-v1", "input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
    ("sd-v1", "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("sd-v1", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
     "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("sd-v1", "time_embed.0", "time_embedding.linear_1"),
])
def test_original_layout_names_of_real_models_layers(config, original, diffusers):
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from webui.engine.single_file import CONFIG_ROOT

    unet_config = UNet2DConditionModel.load_config(CONFIG_ROOT / config / "unet")
    assert sgm_name(diffusers, SimpleNamespace(**unet_config)) == original
