"""Test helper: turn diffusers SD components into one state dict in the original LDM (A1111) key layout.

diffusers only ships the other direction (LDM -> diffusers), so the tests write real single-file
checkpoints with this and check that loading them gives back the exact weights. The key names are
those of the CompVis/Stability `ldm` code that A1111 checkpoints use.
"""
from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIPTextModel keys under this prefix
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP keys
SDXL_CLIP_L = "conditioner.embedders.0.transformer."  # SDXL (sgm layout): CLIP-L as Hugging Face keys
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG keys, with its text projection


def pipeline_to_ldm(pipe, open_clip: bool = False) -> dict[str, torch.Tensor]:
    text = open_clip_to_ldm(pipe.text_encoder) if open_clip else clip_to_ldm(pipe.text_encoder)
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text}


def sdxl_pipeline_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """An SDXL base pipeline as one state dict in the sgm layout of SDXL's single files."""
    clip_l = {SDXL_CLIP_L + key.removeprefix(CLIP): value for key, value in clip_to_ldm(pipe.text_encoder).items()}
    open_clip = open_clip_to_ldm(pipe.text_encoder_2)
    open_clip[OPEN_CLIP + "text_projection"] = pipe.text_encoder_2.text_projection.weight.T.contiguous()
    open_clip = {SDXL_OPEN_CLIP + key.removeprefix(OPEN_CLIP): value for key, value in open_clip.items()}
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_l, **open_clip}


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights by the engine's own mapping to the original layout (webui/engine/lora.py sgm_name, which
    kohya's SDXL LoRAs need): the single-file tests then check that mapping against diffusers' converter."""
    from webui.engine.lora import sgm_name

    out = {}
    for key, value in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        new = sgm_name(module, unet.config)
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[f"{UNET}{new}.{parameter}"] = value
    return out


_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        # the decoder's levels run in the opposite order in LDM
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", new)
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in new:
            new = _rename(new.replace("mid_block.attentions.0.", "mid.attn_1."), _VAE_ATTENTION)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE + new] = value
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel; A1111 files always have it.
    return {CLIP + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items() if "text_projection" not in k}
    hidden = text_encoder.config.hidden_size
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": torch.randn(hidden, hidden),  # unused by SD; present in real files
    }
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            # OpenCLIP stores q, k, v as one stacked projection
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{part}"] = sd[src + f"self_attn.out_proj.{part}"]
            out[dst + f"ln_1.{part}"] = sd[src + f"layer_norm1.{part}"]
            out[dst + f"ln_2.{part}"] = sd[src + f"layer_norm2.{part}"]
            out[dst + f"mlp.c_fc.{part}"] = sd[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.c_proj.{part}"] = sd[src + f"mlp.fc2.{part}"]
    return {OPEN_CLIP + k: v for k, v in out.items()}


SDXL_REFINER_OPEN_CLIP = "conditioner.embedders.0.model."  # an SDXL refiner: OpenCLIP bigG alone, as embedder 0


def sdxl_refiner_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """An SDXL refiner pipeline as one state dict in the sgm layout of its single files."""
    open_clip = open_clip_to_ldm(pipe.text_encoder_2)
    open_clip[OPEN_CLIP + "text_projection"] = pipe.text_encoder_2.text_projection.weight.T.contiguous()
    open_clip = {SDXL_REFINER_OPEN_CLIP + key.removeprefix(OPEN_CLIP): value for key, value in open_clip.items()}
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **open_clip}
