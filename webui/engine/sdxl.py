"""SDXL (base) models: how the engine tells them apart, and what it cannot run on them yet.

An SDXL model runs diffusers' StableDiffusionXLPipeline (and its img2img pipeline) with the conditioning
prompts.encode_sdxl_pair builds. What sdxl_problem names is made for SD 1.x/2.x layouts (hypernetworks); a request
that uses it with an SDXL model is refused before it runs, naming the feature and what to do, rather than crash deep
in a pass or quietly draw something else.
"""
from __future__ import annotations

from webui.engine.hypernetworks import hypernetwork_uses

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
    return None
