"""instruct-pix2pix models (timbrooks' and its kin): their UNet reads 8 channels, the 4 of the latents and the 4 of
the picture to edit, and the prompt says what to change ("make it snowy"). As A1111 runs them:

- img2img: the start picture is also the picture to edit (its VAE latents, unscaled, as the model was trained), and
  each step's guidance takes three model calls, the prompt with the picture (c), the negative prompt with the
  picture (i) and the negative prompt without it (u, zeros):

      guided = u + cfg * (c - i) + image_cfg * (i - u)

  With an Image CFG scale of 1 that is plain CFG with the picture in both calls, and so it runs as that.
- txt2img and the hires fix's second pass: no picture to edit (zeros), plain CFG.

diffusers' pipelines guide with two rows (uncond + cfg * (cond - uncond)); a pre-hook turns each call's two rows
into the three above, and a hook after it hands back u as the uncond row and u + (c - i) + image_cfg / cfg * (i - u)
as the cond row, which the pipeline's own guidance turns into the formula. Every sampler then runs unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from webui.engine.composable import is_composed
from webui.engine.inpainting_model import EDIT_CHANNELS, extra_input
from webui.engine.lora import strip_loras
from webui.engine.prompt_schedule import prompt_variants
from webui.engine.samplers import CFGPP_SAMPLER, get_sampler
from webui.engine.uncond_skip import UncondSkip
from webui.engine.unet_hooks import removed_after, with_prediction


def takes_edit_picture(unet) -> bool:
    return unet.config.in_channels == EDIT_CHANNELS


@dataclass(frozen=True)
class EditPicture:
    """A pass's picture to edit and its guidance: one row of latents per image (or one for all)."""
    latents: torch.Tensor
    cfg_scale: float
    image_cfg_scale: float


def edit_problem(request) -> str | None:
    """What of `request` (a GenerationRequest) an instruct-pix2pix model cannot run, naming the field and what to do;
    None when it all runs. Only an img2img run with image guidance has its three-call steps to refuse things for."""
    if not request.is_img2img or request.image_cfg_scale == 1:
        return None
    if request.cfg_scale <= 1:
        return ("cfg_scale: an instruct-pix2pix model's Image CFG scale works through classifier-free guidance; set "
                "CFG scale above 1, or Image CFG scale to 1")
    if any(is_composed(text) for text in prompt_variants(strip_loras(request.prompt), request.steps)):
        return ("prompt: AND (or a prompt's own weight, as in 'a cat:1.2') does not run with an instruct-pix2pix "
                "model's Image CFG scale; write one prompt, or set Image CFG scale to 1")
    if UncondSkip(request.skip_early_cond, request.s_min_uncond, request.s_min_uncond_all).active:
        return ("skip_early_cond, s_min_uncond: Skip Early CFG and NGMS do not run with an instruct-pix2pix model's "
                "Image CFG scale; set them to 0, or Image CFG scale to 1")
    if request.uses_controlnet:
        return "controlnet: ControlNet does not run with instruct-pix2pix models; turn it off"
    if get_sampler(request.sampler_name).name == CFGPP_SAMPLER:
        return ("sampler_name: DDIM CFG++ does not run with an instruct-pix2pix model's Image CFG scale; pick another "
                "sampler, or set Image CFG scale to 1")
    return None


def model_input(unet, extra: torch.Tensor | EditPicture | None):
    """The hooks that feed a model's extra input channels for a pass: an edit picture with its image guidance,
    else the channels as they are (webui/engine/inpainting_model.py extra_input; None: none)."""
    if isinstance(extra, EditPicture):
        if extra.image_cfg_scale == 1:
            return extra_input(unet, extra.latents)
        return edit_guidance(unet, extra)
    return extra_input(unet, extra)


@contextlib.contextmanager
def edit_guidance(unet, picture: EditPicture) -> Iterator[None]:
    """While inside, a UNet call under CFG (rows: each image's uncond, then each image's cond) runs three rows an
    image, as the module's docstring says, and hands back two that the pipeline's guidance turns into the formula."""
    ratio = picture.image_cfg_scale / picture.cfg_scale

    def three_rows(_module, args, kwargs):
        sample, timestep, *rest = args
        images = sample.shape[0] // 2
        if sample.shape[0] != 2 * images or images == 0:
            raise ValueError("an instruct-pix2pix model's Image CFG scale needs classifier-free guidance")

        def spread(value):  # [u; c] -> [u; u; c]: the negative without and with the picture, then the prompt
            return torch.cat([value[:images], value[:images], value[images:]])

        edited = picture.latents.to(sample.device, sample.dtype)
        edited = edited.repeat(images // edited.shape[0], 1, 1, 1)
        extra = torch.cat([torch.zeros_like(edited), edited, edited])
        sample = torch.cat([spread(sample), extra], dim=1)
        if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == 2 * images:
            timestep = spread(timestep)
        kwargs = {**kwargs, "encoder_hidden_states": spread(kwargs["encoder_hidden_states"])}
        return (sample, timestep, *rest), kwargs

    def two_rows(prediction):
        without, with_picture, prompt = prediction.chunk(3)
        cond = without + (prompt - with_picture) + ratio * (with_picture - without)
        return torch.cat([without, cond.to(prediction.dtype)])

    with removed_after([unet.register_forward_pre_hook(three_rows, with_kwargs=True),
                        unet.register_forward_hook(lambda _module, _args, output: with_prediction(output, two_rows))]):
        yield
