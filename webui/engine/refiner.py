"""A1111's refiner (1.6+): the rest of a run's denoising goes to a second checkpoint once the run has come far
enough. The switch is decided by noise level as A1111 1.7 decides it by default: a model call at timestep t has
completed (999 - t) / 1000 of the way, and the first call that has completed at least `switch_at` runs the
refiner, as does every call after it (its own UNet, its conds encoded by its own text encoder). A1111's other
option, "Refiner switch by sampling steps", is not offered."""
from __future__ import annotations

import json

import torch

from webui.engine.models import ModelEntry
from webui.engine.single_file import read_header

SDXL = "SDXL"  # its UNet reads text embeddings 2048 wide

# single-file keys that tell the kinds apart: the UNet's input (9 channels: inpainting), its text width, SDXL's size
# conditioning and its base's first text encoder (a refiner has none)
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_ATTENTION = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_UNET = "model.diffusion_model.label_emb.0.0.weight"
_SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"


def completed_ratio(timestep: float) -> float:
    """How far a model call at `timestep` is through the denoising, as A1111 counts it. Karras and other schedules
    give fractional timesteps; A1111 takes the nearest of the model's 1000, and so does this (by rounding)."""
    return (999 - round(float(timestep))) / 1000


def first_refiner_call(timesteps: torch.Tensor | list[float], switch_at: float) -> int | None:
    """The index of the first of a pass's model calls (at these timesteps) that the refiner makes; None when the
    pass never comes that far."""
    return next((call for call, timestep in enumerate(timesteps) if completed_ratio(timestep) >= switch_at), None)


def pass_timesteps(scheduler, schedule: int, steps: int) -> torch.Tensor:
    """The timesteps a pass calls the model at: the last `steps` steps of a schedule of `schedule` (img2img and
    the hires fix run the tail), in model calls (Heun and DPM2 call twice a step). The scheduler given is set, so
    give a fresh one of the pass's kind."""
    scheduler.set_timesteps(schedule)
    return scheduler.timesteps[(schedule - steps) * scheduler.order:]


def kind_from_config(cross_attention_dim: int, in_channels: int, prediction_type: str | None = None,
                     addition_embed_type: str | None = None) -> str:
    """A model's kind in words ("SD 1.x", "SD 2.x inpainting", "SDXL", ...): what must match between a model and its
    refiner, whose UNet goes on from the model's latents with the model's scheduler. SDXL's UNet is known by its size
    conditioning ("text_time")."""
    family = SDXL if addition_embed_type == "text_time" else {768: "SD 1.x", 1024: "SD 2.x"}.get(
        cross_attention_dim, f"text width {cross_attention_dim}")
    inpainting = " inpainting" if in_channels == 9 else ""
    v_prediction = " v-prediction" if prediction_type == "v_prediction" else ""
    return f"{family}{inpainting}{v_prediction}"


def kind_of_pipeline(pipe) -> str:
    config = pipe.unet.config
    return kind_from_config(config.cross_attention_dim, config.in_channels, pipe.scheduler.config.get("prediction_type"),
                            config.get("addition_embed_type"))


def kind_of_entry(entry: ModelEntry) -> str | None:
    """The kind of a model on disk, read from its configs or its file's header without loading it; None where that
    cannot be told cheaply (a .ckpt, a hub id, an SD 2.x file whose prediction type is probed when it loads)."""
    path = entry.path
    try:
        if entry.kind == "diffusers" and path is not None:
            unet = json.loads((path / "unet" / "config.json").read_text())
            scheduler_config = path / "scheduler" / "scheduler_config.json"
            prediction = (json.loads(scheduler_config.read_text()).get("prediction_type")
                          if scheduler_config.exists() else None)
            return kind_from_config(unet["cross_attention_dim"], unet["in_channels"], prediction,
                                    unet.get("addition_embed_type"))
        if entry.kind == "single_file" and path is not None and path.suffix.lower() == ".safetensors":
            shapes, _ = read_header(path)
            if _SDXL_UNET in shapes:  # a refiner (no first text encoder) is refused when it loads
                return SDXL if _SDXL_CLIP_L in shapes else None
            if _UNET_IN not in shapes or _CROSS_ATTENTION not in shapes:
                return None
            kind = kind_from_config(shapes[_CROSS_ATTENTION][1], shapes[_UNET_IN][1])
            return None if kind.startswith("SD 2.x") else kind  # 2.x: v-prediction or not is known once loaded
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return None


def kind_problem(main_kind: str | None, other_kind: str | None, other_name: str, field: str) -> str | None:
    """Why a checkpoint that goes on from the main model's latents (the refiner, the hires fix's checkpoint: the
    request `field` names it) cannot, or None (also when either kind is not known yet)."""
    if main_kind is None or other_kind is None or main_kind == other_kind:
        return None
    return (f"{field}: {other_name} is a model of another kind ({other_kind}) than the model ({main_kind}); pick a "
            "checkpoint of the model's kind")
