"""A tiny random Stable Diffusion pipeline built in code (diffusers' own testing style).

Used by the tests and the engine benchmark: real diffusers components, a few hundred thousand
parameters, the real CLIP tokenizer shipped in the repo, 64x64 native size. No hub access.
"""
from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "webui" / "engine" / "model_configs" / "clip-tokenizer"

TEXT_LAYERS = 3  # the text encoder's layers: the deepest Clip skip of the tiny model


def tiny_components(seed: int = 0, safety_checker: bool = False, in_channels: int = 4,
                    full_size_attention: bool = False) -> dict:
    """in_channels 9: a model made for inpainting. full_size_attention: attention at the full latent size, as in SD 1.x
    (token merging works there), and none at half size."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    attention_first = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    attention_second = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    down_blocks, up_blocks = attention_first if full_size_attention else attention_second
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=down_blocks, up_block_types=up_blocks, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    # SD 1.5's published scheduler settings.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    components = {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler,
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        "safety_checker": None, "feature_extractor": None, "image_encoder": None,
        "requires_safety_checker": False,
    }
    if safety_checker:
        components.update(tiny_safety_checker())
    return components


def tiny_safety_checker() -> dict:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    extractor = CLIPImageProcessor(crop_size=32, size=32)
    return {"safety_checker": checker, "feature_extractor": extractor, "requires_safety_checker": True}


def make_tiny_pipeline(seed: int = 0, safety_checker: bool = False, in_channels: int = 4,
                       full_size_attention: bool = False):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_components(seed, safety_checker, in_channels, full_size_attention))


def save_tiny_model(folder: Path, seed: int = 0, safety_checker: bool = False, in_channels: int = 4,
                    full_size_attention: bool = False) -> Path:
    """Write a tiny model as a diffusers folder (model_index.json + components)."""
    make_tiny_pipeline(seed, safety_checker, in_channels, full_size_attention).save_pretrained(folder)
    return folder
