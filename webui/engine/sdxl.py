"""SDXL (base) models: how the engine tells them apart, and what it cannot run on them yet.

An SDXL model runs diffusers' StableDiffusionXLPipeline (and its img2img pipeline) with the conditioning
prompts.encode_sdxl_pair builds. The features below hook parts an SDXL model does not have, or read and write
weights in SD 1.x/2.x layouts; a request that uses one with an SDXL model is refused before it runs, naming the
feature and what to do, rather than crash deep in a pass or quietly draw something else.
"""
from __future__ import annotations

from webui.engine.composable import is_composed
from webui.engine.hypernetworks import hypernetwork_uses
from webui.engine.lora import strip_loras
from webui.engine.prompt_schedule import prompt_variants
from webui.engine.uncond_skip import UncondSkip

OTHER_MODEL = "or pick an SD 1.x/2.x model"


def is_sdxl(pipe) -> bool:
    """An SDXL pipeline: its second text encoder is what sets it apart (an SD pipeline has none)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def sdxl_problem(request) -> str | None:
    """What of `request` (a GenerationRequest) an SDXL model cannot run yet, naming the request field and what to do;
    None when it all runs."""
    prompts = {"prompt": request.prompt, **({"hr_prompt": request.hr_prompt} if request.hr_prompt else {})}
    for field, prompt in prompts.items():
        if hypernetwork_uses(prompt):
            return (f"{field}: <hypernet:...> tags are not applied to SDXL models yet (hypernetworks are made for SD "
                    f"1.x/2.x); remove the tags, {OTHER_MODEL}")
        if any(is_composed(text) for text in prompt_variants(strip_loras(prompt), request.steps)):
            return (f"{field}: AND (composable prompts, or a prompt's own weight as in 'a cat:1.2') does not run "
                    f"with SDXL models yet; write one prompt without AND or a weight at its end, {OTHER_MODEL}")
    if UncondSkip(request.skip_early_cond, request.s_min_uncond, request.s_min_uncond_all).active:
        return ("skip_early_cond, s_min_uncond: Skip Early CFG and NGMS do not run with SDXL models yet; set them "
                f"to 0, {OTHER_MODEL}")
    if request.uses_controlnet:
        return f"controlnet: ControlNet runs SD 1.x ControlNets only for now; turn it off, {OTHER_MODEL}"
    return None
