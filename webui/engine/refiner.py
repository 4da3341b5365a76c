"""A1111's refiner (1.6+): the rest of a run's denoising goes to a second checkpoint once the run has come far
enough. The switch is decided by noise level as A1111 1.7 decides it by default: a model call at timestep t has
completed (999 - t) / 1000 of the way, and the first call that has completed at least `switch_at` runs the
refiner, as does every call after it (its own UNet, its conds encoded by its own text encoder). A1111's Refiner
switch by sampling steps (its first refiner's way) counts model calls instead (first_refiner_call_by_count).

An SDXL refiner (OpenCLIP bigG alone, 1280 wide) refines an SDXL base model. Its UNet reads five size numbers, not the
base's six: original height and width, crop top and left, and an aesthetic score, A1111's "high" one (6.0) for the
prompt's rows and its "low" one (2.5) for the negative prompt's (aesthetic_scores)."""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import torch

from webui.engine.models import ModelEntry
from webui.engine.samplers import runs_its_own_calls
from webui.engine.single_file import read_header
from webui.engine.unet_hooks import removed_after

SDXL = "SDXL"  # its UNet reads text embeddings 2048 wide
SDXL_REFINER = "SDXL refiner"  # its UNet reads OpenCLIP bigG's alone, and an aesthetic score
HIGH_AESTHETIC_SCORE = 6.0  # A1111's default for its option sdxl_refiner_high_aesthetic_score (the prompt's)

# single-file keys that tell the kinds apart: the UNet's input (9 channels: inpainting), its text width, SDXL's size
# conditioning and its base's first text encoder (a refiner has none: its only one, bigG, is embedder 0)
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_ATTENTION = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_UNET = "model.diffusion_model.label_emb.0.0.weight"
_SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
_SDXL_REFINER_OPEN_CLIP = "conditioner.embedders.0.model.token_embedding.weight"


def completed_ratio(timestep: float) -> float:
    """How far a model call at `timestep` is through the denoising, as A1111 counts it. Karras and other schedules
    give fractional timesteps; A1111 takes the nearest of the model's 1000, and so does this (by rounding)."""
    return (999 - round(float(timestep))) / 1000


def first_refiner_call(timesteps: torch.Tensor | list[float], switch_at: float) -> int | None:
    """The index of the first of a pass's model calls (at these timesteps) that the refiner makes; None when the
    pass never comes that far."""
    return next((call for call, timestep in enumerate(timesteps) if completed_ratio(timestep) >= switch_at), None)


def first_refiner_call_by_count(calls: int, steps: int, calls_per_step: int, switch_at: float) -> int | None:
    """A1111's Refiner switch by sampling steps: the first of a pass's `calls` model calls whose count of calls
    before it reaches `switch_at` of A1111's total, the steps the pass runs (img2img's and the hires pass's are
    A1111's t_enc + 1) times its model calls a step; None when none does."""
    total = steps * calls_per_step
    return next((call for call in range(calls) if call / total >= switch_at), None)


def pass_timesteps(scheduler, schedule: int, steps: int) -> torch.Tensor:
    """The timesteps a pass calls the model at: the last `steps` steps of a schedule of `schedule` (img2img and
    the hires fix run the tail), in model calls (Heun and DPM2 call twice a step). The scheduler given is set, so
    give a fresh one of the pass's kind."""
    if runs_its_own_calls(scheduler, schedule):  # A1111's layout: all of them
        return scheduler.timesteps
    return scheduler.timesteps[(schedule - steps) * scheduler.order:]


def kind_from_config(cross_attention_dim: int, in_channels: int, prediction_type: str | None = None,
                     addition_embed_type: str | None = None, sdxl_refiner: bool = False) -> str:
    """A model's kind in words ("SD 1.x", "SD 2.x inpainting", "SDXL", "SDXL refiner", ...): what must match between a
    model and its refiner, whose UNet goes on from the model's latents with the model's scheduler. SDXL's UNet is known
    by its size conditioning ("text_time"); an SDXL refiner (`sdxl_refiner`) by having no first text encoder."""
    if addition_embed_type == "text_time":
        family = SDXL_REFINER if sdxl_refiner else SDXL
    else:
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(cross_attention_dim, f"text width {cross_attention_dim}")
    inpainting = " inpainting" if in_channels == 9 else ""
    v_prediction = " v-prediction" if prediction_type == "v_prediction" else ""
    return f"{family}{inpainting}{v_prediction}"


def kind_of_pipeline(pipe) -> str:
    config = pipe.unet.config
    return kind_from_config(config.cross_attention_dim, config.in_channels, pipe.scheduler.config.get("prediction_type"),
                            config.get("addition_embed_type"), is_sdxl_refiner(pipe))


def is_sdxl_refiner(pipe) -> bool:
    """An SDXL refiner's pipeline: the second text encoder alone."""
    return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "text_encoder", None) is None


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
            index_file = path / "model_index.json"
            index = json.loads(index_file.read_text()) if index_file.exists() else {}
            refiner = "text_encoder" in index and not (index["text_encoder"] or [None])[0]  # a refiner names none
            return kind_from_config(unet["cross_attention_dim"], unet["in_channels"], prediction,
                                    unet.get("addition_embed_type"), refiner)
        if entry.kind == "single_file" and path is not None and path.suffix.lower() == ".safetensors":
            shapes, _ = read_header(path)
            if _SDXL_UNET in shapes:
                if _SDXL_CLIP_L in shapes:  # a base model, or one made for inpainting
                    return kind_from_config(2048, shapes[_UNET_IN][1], addition_embed_type="text_time")
                return SDXL_REFINER if _SDXL_REFINER_OPEN_CLIP in shapes else None
            if _UNET_IN not in shapes or _CROSS_ATTENTION not in shapes:
                return None
            kind = kind_from_config(shapes[_CROSS_ATTENTION][1], shapes[_UNET_IN][1])
            return None if kind.startswith("SD 2.x") else kind  # 2.x: v-prediction or not is known once loaded
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return None


def kind_problem(main_kind: str | None, other_kind: str | None, other_name: str, field: str) -> str | None:
    """Why a checkpoint that goes on from the main model's latents (the refiner, the hires fix's checkpoint: the
    request `field` names it) cannot, or None (also when either kind is not known yet). An SDXL refiner refines an SDXL
    model, as its refiner only."""
    if main_kind is None or other_kind is None or main_kind == other_kind:
        return None
    if field == "refiner_checkpoint" and (main_kind, other_kind) == (SDXL, SDXL_REFINER):
        return None
    if other_kind == SDXL_REFINER:
        return (f"{field}: {other_name} is an SDXL refiner, which can only be an SDXL model's Refiner "
                f"(refiner_checkpoint); the model is {main_kind}")
    return (f"{field}: {other_name} is a model of another kind ({other_kind}) than the model ({main_kind}); pick a "
            "checkpoint of the model's kind")


@contextlib.contextmanager
def aesthetic_scores(pipeline, high: float, low: float) -> Iterator[None]:
    """While inside, each call of the pipeline's UNet (an SDXL refiner's) reads the refiner's five size numbers: the
    original size and crop of the pipeline's own numbers (the base's six, as a pass that switches made them), then the
    aesthetic score, `low` in the negative prompt's rows (the first half, under CFG) and `high` in the prompt's, as
    A1111 conditions its refiner. Enter it before the other UNet hooks: it reads the rows as the pipeline lays them
    out (diffusers' SDXL txt2img pipeline interleaves its size rows, which is harmless only while they are equal)."""
    def with_scores(_module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        if not added:
            return None
        numbers = added["time_ids"]
        rows = numbers.shape[0]
        scores = torch.full((rows, 1), high, dtype=numbers.dtype, device=numbers.device)
        if pipeline.do_classifier_free_guidance:
            scores[: rows // 2] = low
        refiners = torch.cat([numbers[:, :4], scores], dim=1)
        return args, {**kwargs, "added_cond_kwargs": {**added, "time_ids": refiners}}

    with removed_after([pipeline.unet.register_forward_pre_hook(with_scores, with_kwargs=True)]):
        yield


def refiner_size_inputs() -> dict:
    """The pipeline arguments of a pass that starts on an SDXL refiner's UNet: diffusers' SDXL pipelines build their
    size numbers as original size + crop + target size, and check their count against the UNet's; the refiner's
    fifth number (its aesthetic score, which aesthetic_scores sets in each row) stands in target size's place."""
    return {"target_size": (HIGH_AESTHETIC_SCORE,)}
