"""A tiny random SDXL base pipeline built in code (diffusers' own testing style), beside tiny_sd.py.

Both text encoders, the UNet's size conditioning ("text_time") and SDXL's VAE settings are there, only small:
CLIP-L 24 wide and OpenCLIP bigG 40 wide with a 16-wide projection, so their joined embeddings are 64 wide and a
mix-up of their order or widths shows; the real CLIP tokenizer shipped in the repo; 64x64 native size. No hub.
"""
from __future__ import annotations

from pathlib import Path

from tests.tiny_sd import TOKENIZER_DIR

CLIP_L_WIDTH, CLIP_G_WIDTH, PROJECTION = 24, 40, 16
TIME_EMBED = 8  # each of the 6 size numbers (original size, crop, target size) embedded this wide


def tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict:
    """in_channels 9: a model made for inpainting."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
        scaling_factor=0.13025, force_upcast=True,  # SDXL's
    )

    def text_config(width: int, act: str, **extra) -> CLIPTextConfig:
        # eos_token_id 2, as in SDXL's published configs: the pooled vector is read at the highest token id (the end)
        return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=0,
                              eos_token_id=2, pad_token_id=1, **extra)

    text_encoder = CLIPTextModel(text_config(CLIP_L_WIDTH, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(CLIP_G_WIDTH, "gelu", projection_dim=PROJECTION))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        "tokenizer_2": CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),  # OpenCLIP pads with "!"
        "scheduler": scheduler, "image_encoder": None, "feature_extractor": None,
        "force_zeros_for_empty_prompt": True, "add_watermarker": False,
    }


def make_tiny_sdxl_pipeline(seed: int = 0, in_channels: int = 4):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, in_channels))


def save_tiny_sdxl_model(folder: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """Write a tiny SDXL model as a diffusers folder (model_index.json + components)."""
    make_tiny_sdxl_pipeline(seed, in_channels).save_pretrained(folder)
    return folder


def tiny_sdxl_refiner_components(seed: int = 0) -> dict:
    """A tiny SDXL refiner: the base's OpenCLIP bigG (40 wide, 16-wide projection) alone, and a UNet that reads its
    embeddings (40 wide) and five size numbers (original size, crop, aesthetic score), as SDXL refiner 1.0's."""
    import torch
    from diffusers import UNet2DConditionModel

    parts = tiny_sdxl_components(seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=CLIP_G_WIDTH, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=5 * TIME_EMBED + PROJECTION,
    )
    return parts | {"unet": unet, "text_encoder": None, "tokenizer": None, "requires_aesthetics_score": True,
                    "force_zeros_for_empty_prompt": False}


def make_tiny_sdxl_refiner_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_refiner_components(seed))


def save_tiny_sdxl_refiner(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL refiner as a diffusers folder, laid out as stabilityai's refiner (no first text encoder)."""
    make_tiny_sdxl_refiner_pipeline(seed).save_pretrained(folder)
    return folder
