"""Load a model entry into a ready-to-run StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL; an SDXL refiner,
for the refiner's role only, as StableDiffusionXLImg2ImgPipeline) on the chosen device.

Precision and memory follow the flags: fp16 on CUDA unless --no-half, fp32 elsewhere;
--medvram = model CPU offload, --lowvram = sequential offload; SDPA attention by default and
xformers when asked for and installed.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.config import Settings
from webui.engine import hub
from webui.engine.inpainting_model import UNET_INPUTS, takes_masked_picture, unet_refusal
from webui.engine.instruct_pix2pix import takes_edit_picture
from webui.engine.models import ModelEntry
from webui.engine.single_file import SDXL_UNET_INPUTS, sdxl_refiner_refusal, sdxl_unet_refusal
from webui.zerogpu import zerogpu_requested

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


class ModelFileError(ModelLoadError):
    """A model's files plainly hold no model (a damaged header, a LoRA's file): the user's to replace."""


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("--device mps was given but MPS is not available; use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    if shutil.which("nvidia-smi"):  # a GPU this torch cannot use: a CPU torch, or a driver too old for its CUDA
        log.warning("an NVIDIA GPU seems present (nvidia-smi exists) but torch %s cannot use it; running on "
                    "the CPU. Install the torch build for your driver's CUDA version (see README: On a GPU box)",
                    torch.__version__)
    return "cpu"


def pick_placement(settings: Settings) -> Placement:
    device = pick_device(settings.device)
    half = device in ("cuda", "mps") and not settings.no_half
    return Placement(device=device, dtype=torch.float16 if half else torch.float32)


def read_pipeline(entry: ModelEntry, settings: Settings, placement: Placement, refiner: bool = False):
    """Read the weights of `entry` into CPU memory, or raise ModelLoadError. `refiner`: it is read for the refiner's
    role, the only one an SDXL refiner can take."""
    try:
        pipe = _read_pipeline(entry, settings, placement.dtype, refiner)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers raises many types; the user needs one clear message
        raise ModelLoadError(f"could not load model {entry.name!r} from {entry.source}: {err}") from err
    if settings.no_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if settings.no_half_vae and placement.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_pipeline(pipe, settings: Settings, placement: Placement):
    """Move a read pipeline onto the device with the memory and speed options of the flags."""
    if placement.device == "cuda" and settings.lowvram:
        pipe.enable_sequential_cpu_offload()
    elif placement.device == "cuda" and settings.medvram:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(placement.device)
    if settings.medvram or settings.lowvram:
        pipe.vae.enable_slicing()  # decode a batch one image at a time
    compile_now = _compile_choice(settings, placement, takes_masked_picture(pipe.unet) or takes_edit_picture(pipe.unet))
    if placement.device == "cuda" or compile_now:
        from webui.engine.fast_path import apply_fast_path, use_compile_cache

        if compile_now:
            use_compile_cache(settings.outdir / "cache" / "torch-compile")
        # SDPA + channels-last are safe on every CUDA card.
        apply_fast_path(pipe, compile=compile_now)
    if not compile_now:
        _choose_attention(pipe, settings)  # xformers cannot be traced by torch.compile
    return pipe


def _compile_choice(settings: Settings, placement: Placement, inpainting_model: bool) -> bool:
    from webui.engine.fast_path import compile_choice

    compile_now, why = compile_choice(settings.compile, device=placement.device, xformers=settings.xformers,
                                      offloading=settings.medvram or settings.lowvram, zerogpu=zerogpu_requested(),
                                      inpainting_model=inpainting_model)
    log.info("torch.compile %s: %s", "on" if compile_now else "off", why)
    return compile_now


def park_on_cpu(pipe, settings: Settings, placement: Placement) -> bool:
    """Free the GPU of a pipeline we may need again; False when offloading manages it already."""
    if placement.device == "cpu" or settings.medvram or settings.lowvram:
        return False
    pipe.to("cpu")
    return True


def _read_pipeline(entry: ModelEntry, settings: Settings, dtype: torch.dtype, refiner: bool = False):
    skip_checker = {"safety_checker": None, "requires_safety_checker": False} if settings.no_safety_checker else {}
    if entry.kind == "diffusers":
        pipeline_class = check_pipeline_folder(Path(entry.source), entry.name, refiner)
        if not skip_checker and _safety_checker_missing(Path(entry.source)):
            log.warning("%s names a safety checker whose files are missing; loading it without one (no NSFW "
                        "filter)", entry.name)
            skip_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return pipeline_class.from_pretrained(entry.source, dtype=dtype, local_files_only=True,
                                              **_pipeline_options(pipeline_class, skip_checker))
    if entry.kind == "single_file":
        from webui.engine.single_file import load_single_file_pipeline

        return load_single_file_pipeline(entry.source, torch_dtype=dtype, refiner=refiner)
    return _read_hub_pipeline(entry, settings, dtype, skip_checker, refiner)


def check_pipeline_folder(folder: Path, name: str, refiner: bool = False):
    """The diffusers pipeline class to read the folder with (SD, SDXL, an SDXL refiner's img2img one where `refiner`:
    it is read for the refiner's role); refuse, before reading gigabytes, a folder this app cannot run: it would load
    and then fail every image deep inside diffusers (an SDXL refiner as the model: it has no first text encoder;
    another family; an UNet of other inputs: a tensor size mismatch)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    index = _read_json(folder / "model_index.json")
    kind = str(index.get("_class_name", ""))
    in_channels = _read_json(folder / "unet" / "config.json").get("in_channels", 4)
    if kind.startswith("StableDiffusionXL") and not any(part in index for part in hub.NOT_SD_PARTS):
        sdxl_refiner = not (index.get("text_encoder") or [None])[0]
        if sdxl_refiner and not refiner:
            raise ModelLoadError(sdxl_refiner_refusal(name))
        if in_channels not in SDXL_UNET_INPUTS[sdxl_refiner]:
            raise ModelLoadError(sdxl_unet_refusal(name, in_channels))
        return StableDiffusionXLImg2ImgPipeline if sdxl_refiner else StableDiffusionXLPipeline
    if any(part in index for part in (*hub.NOT_SD_PARTS, "text_encoder_2")):
        raise ModelLoadError(f"{name} is a {kind or 'non-SD'} model; only SD 1.x, 2.x and SDXL models load for now")
    if in_channels not in UNET_INPUTS:
        raise ModelLoadError(unet_refusal(name, in_channels))
    return StableDiffusionPipeline


def _pipeline_options(pipeline_class, skip_checker: dict) -> dict:
    """from_pretrained's options: SD's safety checker ones; for SDXL, no invisible watermark (it marks decoded
    pictures, and this app decodes its latents itself)."""
    return {"add_watermarker": False} if "XL" in pipeline_class.__name__ else skip_checker


def _read_json(path: Path) -> dict:
    """A config file's contents; {} when it is missing or unreadable (diffusers then says what is wrong)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _safety_checker_missing(folder: Path) -> bool:
    """model_index.json names a safety checker whose weights (or feature extractor) were not downloaded,
    a common partial copy."""
    index = _read_json(folder / "model_index.json")

    def lacks(part: str, files: tuple[str, ...]) -> bool:
        named = index.get(part)
        found = any(next((folder / part).glob(pattern), None) is not None for pattern in files)
        return bool(named and named[0]) and not found

    return lacks("safety_checker", ("*.safetensors", "*.bin")) or lacks("feature_extractor", ("*.json",))


def _read_hub_pipeline(entry: ModelEntry, settings: Settings, dtype: torch.dtype, extra: dict, refiner: bool = False):
    """A hub id: load it from the Hugging Face cache, or download it there once (webui/engine/hub.py)."""
    half = dtype != torch.float32

    def from_snapshot(snapshot: hub.HubSnapshot):
        pipeline_class = check_pipeline_folder(snapshot.folder, entry.source, refiner)
        return pipeline_class.from_pretrained(snapshot.folder, dtype=dtype, variant=snapshot.variant,
                                              local_files_only=True, **_pipeline_options(pipeline_class, extra))

    cached = hub.cached_snapshot(entry.source, half)
    if cached is not None:
        try:
            return from_snapshot(cached)  # no network at all
        except ModelLoadError:  # a model this app cannot run: downloading again would not help
            raise
        except Exception as err:
            if settings.offline or hub.offline_by_environment():
                raise ModelLoadError(
                    f"{entry.source!r} is in the Hugging Face cache ({cached.folder}) but could not be loaded "
                    f"({type(err).__name__}: {err}); it may be incomplete. Start once without --offline to "
                    "finish the download, or put a .safetensors file in the models folder."
                ) from err
            log.warning("the cached copy of %s could not be loaded (%s); downloading what is missing",
                        entry.source, err)
    try:
        snapshot = hub.download(entry.source, half=half, safety_checker=not settings.no_safety_checker,
                                offline=settings.offline,
                                check=lambda folder: check_pipeline_folder(folder, entry.source, refiner))
    except hub.HubError as err:
        raise ModelLoadError(str(err)) from err
    return from_snapshot(snapshot)


def _choose_attention(pipe, settings: Settings) -> None:
    if not settings.xformers:
        return  # diffusers uses torch's scaled-dot-product attention by default
    from webui.engine.fast_path import xformers_works

    if not xformers_works():  # enabling would succeed, and then every image fail
        log.warning("xformers requested but it does not work with this torch (not installed, or built for "
                    "another one); using SDPA attention")
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as err:  # not installed, or no GPU build: SDPA is a fine fallback
        log.warning("xformers requested but unavailable (%s); using SDPA attention", err)
