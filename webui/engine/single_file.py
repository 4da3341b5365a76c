"""Load an A1111-style single-file checkpoint (`.safetensors` / `.ckpt`, original LDM layout) offline.

diffusers' `from_single_file` normally downloads the diffusers configs of the model it detects. We
ship those small config files in `model_configs/` (sd-v1 = SD 1.5, sd-v2 = SD 2.1-base 512 epsilon,
sd-v2-v = SD 2.1 768 v-prediction, sdxl-base = SDXL 1.0 base, sdxl-refiner = SDXL refiner 1.0) and point it at
them, so loading never touches the network. An SDXL refiner (OpenCLIP bigG alone) loads only for the refiner role.

`.ckpt` files are pickles: they are read with `torch.load(weights_only=True)`, which only rebuilds
tensors and plain containers. A file that needs any other pickled code is refused with
SingleFileLoadError. No safety checker is ever loaded from a single file (none is stored in one).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from webui.engine.inpainting_model import INPAINTING_CHANNELS, UNET_INPUTS, unet_refusal

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_DIR = CONFIG_ROOT / "clip-tokenizer"

# Checkpoint keys that tell the model families apart (facts from the LDM / sgm layouts).
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CLIP_L = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"  # SD 1.x
# SD 1.x files saved with an early transformers lack the `text_model.` level; A1111 renames their keys.
_CLIP_L_OLD = "cond_stage_model.transformer.embeddings.position_embedding.weight"
_CLIP_L_PREFIX = "cond_stage_model.transformer."
_OPEN_CLIP_PREFIX = "cond_stage_model.model."
_OPEN_CLIP = _OPEN_CLIP_PREFIX + "token_embedding.weight"  # SD 2.x (OpenCLIP ViT-H)
_SDXL_PREFIX = "conditioner.embedders."
# SD 2.x in the newer sgm layout (SD-Turbo): OpenCLIP's keys under another prefix. SDXL's UNet (the base's
# and the refiner's) also takes size conditioning, through label_emb.
_SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
_SGM_OPEN_CLIP = _SGM_OPEN_CLIP_PREFIX + "token_embedding.weight"
_SDXL_UNET = "model.diffusion_model.label_emb.0.0.weight"
_SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"  # base only
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model.positional_embedding"  # the base's second text encoder
# The SD 2.0 512-base checkpoint stops at this step; diffusers uses the same rule to pick epsilon.
_SD2_BASE_GLOBAL_STEP = 875000


class SingleFileLoadError(ValueError):
    """The file cannot be loaded as an SD 1.x/2.x or SDXL checkpoint; the message says what to do."""


class _InertLightningCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint, pickled into many original SD .ckpt files.

    It only carries training-callback state we never use; mapping it to this empty class lets
    weights-only loading read those files without importing (or trusting) Lightning.
    """


_np_scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # moved in numpy 2
# Harmless globals found in real SD .ckpt files (A1111's safe unpickler allows the same), by pickled name.
_EXTRA_SAFE_GLOBALS = [
    (_InertLightningCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_np_scalar, "numpy.core.multiarray.scalar"),  # a numpy number (e.g. global_step) pickled by numpy 1.x
    (_np_scalar, "numpy._core.multiarray.scalar"),  # ... and by numpy 2.x
    (np.dtype, "numpy.dtype"),
    # numpy >= 1.25 gives each dtype its own class; unpickling a dtype must be allowed to build these
    *((t, f"{t.__module__}.{t.__qualname__}") for t in {type(np.dtype(code)) for code in "?bhilqBHILQefd"}),
]


def load_single_file_pipeline(path, torch_dtype: torch.dtype = torch.float32, *, config_dir=None,
                              prediction_type: str | None = None, refiner: bool = False):
    """Build a StableDiffusionPipeline from one SD 1.x / 2.x checkpoint file (a StableDiffusionXLPipeline from an
    SDXL base one; with `refiner`, the refiner's role, a StableDiffusionXLImg2ImgPipeline from an SDXL refiner, which
    is refused otherwise), with no network.

    config_dir: a config-only diffusers folder to use instead of the shipped one picked from the
        checkpoint keys (tests pass a tiny one).
    prediction_type: "epsilon" or "v_prediction" to override detection. Otherwise a sidecar
        `<name>.yaml` (A1111's convention) decides; for SD 2.x without one, the 512-base checkpoint's training
        step, then what the UNet predicts (_probe_prediction_type).
    The pipeline has no safety checker and no feature extractor.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise SingleFileLoadError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    path = Path(path)
    shapes, global_step = read_header(path)
    family = detect_family(shapes, path)
    if family == "sdxl-refiner" and not refiner:
        raise SingleFileLoadError(sdxl_refiner_refusal(path.name))
    if family in ("sdxl-base", "sdxl-refiner"):
        with _with_unet_inputs(config_dir or CONFIG_ROOT / family, shapes[_UNET_IN][1]) as configs:
            return _load_sdxl(path, torch_dtype, configs, family == "sdxl-refiner")
    prediction_type = prediction_type or _sidecar_prediction_type(path)
    sd2 = family == "sd-v2"
    if sd2 and prediction_type is None and global_step == _SD2_BASE_GLOBAL_STEP:
        prediction_type = "epsilon"  # diffusers uses the same rule
    if sd2 and prediction_type is None and shapes[_UNET_IN][1] == INPAINTING_CHANNELS:
        prediction_type = "epsilon"  # SD 2's only inpainting model is 512 epsilon (A1111's v2-inpainting config)
    shipped = config_dir is None
    if shipped:
        if sd2:  # one of unknown kind loads as 768 v-prediction (the same shapes as 512-base); a probe settles it
            family = "sd-v2" if prediction_type == "epsilon" else "sd-v2-v"
        config_dir = CONFIG_ROOT / family
    # SD 2.x was trained with OpenCLIP's tokenizer, which pads with "!" (id 0) instead of <|endoftext|>.
    pad = {"pad_token": "!"} if sd2 else {}
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, **pad)

    parts = {"tokenizer": tokenizer}
    if _CLIP_L_OLD in shapes or _SGM_OPEN_CLIP in shapes:  # diffusers finds no text encoder there: build it here
        parts["text_encoder"] = _text_encoder_of_other_layout(path, config_dir, torch_dtype)
    with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS), \
            _with_unet_inputs(config_dir, shapes[_UNET_IN][1]) as configs:  # diffusers re-reads a .ckpt itself
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(configs), local_files_only=True, dtype=torch_dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts,
        )
    if sd2 and prediction_type is None:
        prediction_type = _probe_prediction_type(pipe.unet, path)
        if shipped and prediction_type == "epsilon":
            _use_shipped_sizes(pipe, "sd-v2")
    if prediction_type and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


@contextlib.contextmanager
def _with_unet_inputs(config_dir: Path, in_channels: int) -> Iterator[Path]:
    """The config folder, or for an inpainting checkpoint a copy of it whose UNet takes its 9 input channels."""
    if in_channels == 4:
        yield Path(config_dir)
        return
    with tempfile.TemporaryDirectory(prefix="unet-config-") as folder:
        copy = Path(folder) / "config"
        shutil.copytree(config_dir, copy)
        unet_config = copy / "unet" / "config.json"
        unet_config.write_text(json.dumps(json.loads(unet_config.read_text()) | {"in_channels": in_channels}))
        yield copy


def detect_family(shapes: dict[str, tuple], path: Path | str = "checkpoint") -> str:
    """'sd-v1', 'sd-v2', 'sdxl-base' or 'sdxl-refiner' from the checkpoint's keys; anything else is refused with
    the reason."""
    name = Path(path).name
    sgm_sd2 = _SGM_OPEN_CLIP in shapes and _SDXL_UNET not in shapes
    if any(key.startswith(_SDXL_PREFIX) for key in shapes) and not sgm_sd2:
        return _sdxl_family(shapes, name)
    if _UNET_IN not in shapes:
        raise SingleFileLoadError(
            f"{name} has no Stable Diffusion UNet (no {_UNET_IN}); it may be a LoRA, VAE or embedding, "
            "which do not belong in the checkpoints folder")
    in_channels = shapes[_UNET_IN][1]
    if in_channels not in UNET_INPUTS:
        raise SingleFileLoadError(unet_refusal(name, in_channels))
    if _OPEN_CLIP in shapes or sgm_sd2:
        return "sd-v2"
    if _CLIP_L in shapes or _CLIP_L_OLD in shapes:
        return "sd-v1"
    raise SingleFileLoadError(f"{name} has no CLIP text encoder (neither {_CLIP_L} nor {_OPEN_CLIP})")


def _sdxl_family(shapes: dict[str, tuple], name: str) -> str:
    """'sdxl-base' for an SDXL base checkpoint (both text encoders, a UNet of 4 channels, or 9 for an inpainting
    model), 'sdxl-refiner' for a refiner (OpenCLIP bigG alone, as embedder 0); the rest is refused."""
    refiner = _SDXL_CLIP_L not in shapes and _SGM_OPEN_CLIP in shapes  # bigG as embedder 0, as SD-Turbo's
    if _SDXL_UNET not in shapes or _UNET_IN not in shapes or not (refiner or _SDXL_OPEN_CLIP in shapes):
        raise SingleFileLoadError(f"{name} has SDXL's text encoder keys but not an SDXL base model's UNet and both text "
                                  "encoders; it may be a LoRA or an embedding, which do not belong in the checkpoints folder")
    if shapes[_UNET_IN][1] not in SDXL_UNET_INPUTS[refiner]:
        raise SingleFileLoadError(sdxl_unet_refusal(name, shapes[_UNET_IN][1]))
    return "sdxl-refiner" if refiner else "sdxl-base"


# The SDXL UNets that load, by their input channels: a base model's (text to image, inpainting), a refiner's
SDXL_UNET_INPUTS = {False: (4, INPAINTING_CHANNELS), True: (4,)}


def sdxl_unet_refusal(name: str, in_channels: int) -> str:
    return (f"{name} is an SDXL model whose UNet takes {in_channels} input channels (an instruct-pix2pix model or "
            "another kind); SDXL base, inpainting and refiner models load")


def sdxl_refiner_refusal(name: str) -> str:
    return (f"{name} is an SDXL refiner (it has only the second text encoder), which finishes another model's run "
            "and cannot be the model: pick an SDXL base model as the model, and this one as its Refiner")


def _load_sdxl(path: Path, dtype: torch.dtype, config_dir: Path, refiner: bool = False):
    """An SDXL base pipeline from its single file, or a refiner's (an img2img pipeline, as diffusers keeps
    refiners, with no first text encoder). The tokenizers are the CLIP BPE shipped here; the second pads with "!" as
    OpenCLIP (bigG) was trained to."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    second = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    if refiner:
        pipeline_class, parts = StableDiffusionXLImg2ImgPipeline, {"tokenizer": None, "text_encoder": None}
    else:
        pipeline_class, parts = StableDiffusionXLPipeline, {"tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR)}
    with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):  # diffusers re-reads a .ckpt itself
        return pipeline_class.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype,
                                               add_watermarker=False, tokenizer_2=second, **parts)


def _text_encoder_of_other_layout(path: Path, config_dir: Path, dtype: torch.dtype):
    """The text encoder of a file whose keys diffusers does not look for: SD 1.x CLIP without the
    `text_model.` level (saved by an early transformers), or SD 2.x OpenCLIP in the sgm layout."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():  # the file's weights replace these: no time spent on random ones
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    sgm = _read_tensors(path, _SGM_OPEN_CLIP_PREFIX)
    if sgm:  # under the usual prefix, diffusers converts it (and drops the layer SD 2.x does not use)
        usual = {_OPEN_CLIP_PREFIX + key.removeprefix(_SGM_OPEN_CLIP_PREFIX): value for key, value in sgm.items()}
        weights = convert_open_clip_checkpoint(model, usual)
    else:
        weights = {key.removeprefix(_CLIP_L_PREFIX): value for key, value in _read_tensors(path, _CLIP_L_PREFIX).items()}
    # Whether the model's own keys have the `text_model.` level depends on the transformers version (>= 5.6: not).
    level = "text_model." if any(key.startswith("text_model.") for key in model.state_dict()) else ""
    weights = {level + key.removeprefix("text_model."): value for key, value in weights.items()
               if not key.endswith("position_ids")}  # a buffer the model makes itself
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise SingleFileLoadError(f"{path.name}'s text encoder does not fit the shipped config ({err})") from err
    return model.to(dtype)


def read_header(path: Path) -> tuple[dict[str, tuple], int | None]:
    """Tensor shapes by key, and the training step if stored. Cheap: safetensors reads only the header,
    and a zip .ckpt is memory-mapped, so the weights are read once, later, by diffusers."""
    if not path.is_file():
        raise SingleFileLoadError(f"{path} does not exist")
    if path.suffix != path.suffix.lower():  # diffusers picks its reader by the exact, lower-case extension
        raise SingleFileLoadError(f"{path.name}: rename it to {path.stem}{path.suffix.lower()}; "
                                  "checkpoints are read only with a lower-case extension")
    _refuse_what_is_no_model(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, None
        except Exception as err:
            raise SingleFileLoadError(f"{path.name} is not a readable .safetensors file ({err})") from err
    if path.suffix == ".ckpt":
        weights, global_step = _ckpt_weights(path)
        return {key: tuple(value.shape) for key, value in weights.items()}, global_step
    raise SingleFileLoadError(f"{path.name}: expected a .safetensors or .ckpt file")


def _ckpt_weights(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """A .ckpt's tensors by key (memory-mapped when it is a zip) and its training step if stored."""
    checkpoint = _load_ckpt(path)
    global_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise SingleFileLoadError(f"{path.name} does not hold a state dict")
    weights = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    return weights, int(global_step) if global_step is not None else None


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with prefix, read from a file read_header has checked."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    return {key: value for key, value in _ckpt_weights(path)[0].items() if key.startswith(prefix)}


def read_state_dict(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors (those whose keys start with `prefix`) of a .safetensors file, or of a .ckpt/.pt pickle read
    weights-only (its state_dict); SingleFileLoadError saying what the file is when it is not readable weights."""
    _refuse_what_is_no_model(path)
    try:
        return _read_tensors(path, prefix)
    except SingleFileLoadError:
        raise
    except Exception as err:  # a damaged .safetensors header, a cut-off file
        raise SingleFileLoadError(f"{path.name} cannot be read ({err}); download it again") from err


def _refuse_what_is_no_model(path: Path) -> None:
    """A git-lfs pointer (a repository cloned without LFS) or text (a login page or an error message saved
    by a download link) is no model at all: say so, rather than call it unsafe pickled code or a bad header."""
    with path.open("rb") as file:
        head = file.read(512)
    size = path.stat().st_size
    if head.startswith(b"version https://git-lfs"):
        raise SingleFileLoadError(
            f"{path.name} is a git-lfs pointer ({size} bytes), not the model: run `git lfs pull` in the repository "
            "it came from, or download the file from the model's page")
    # Weights start with binary (a length, a zip or pickle header); text has no control bytes but tabs and newlines.
    if head and not any(byte < 9 or 13 < byte < 32 for byte in head):
        text = head.decode("utf-8", errors="replace")
        what = "a web page" if text.lstrip().startswith("<") else "text"
        shown = " ".join(text.split())[:80]
        raise SingleFileLoadError(
            f"{path.name} is {what} ({size} bytes), not a model: the download saved {what} instead of the file, "
            f"often a login page or an error (it begins: {shown!r}). Download the model again from its page")


def _load_ckpt(path: Path):
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise SingleFileLoadError(
            f"{path.name} needs to run pickled Python code to load ({_unsafe_globals(path)}), which this app "
            "refuses because a .ckpt can execute anything. Use the .safetensors version of this model, or "
            "convert the file to .safetensors on a machine you trust, and put that in the models folder."
        ) from err
    except Exception as err:
        # An empty or cut-off file raises EOFError with no message: say what it means.
        reason = str(err) or ("the file ends too early: empty or not fully downloaded" if isinstance(err, EOFError)
                              else type(err).__name__)
        raise SingleFileLoadError(f"{path.name} is not a readable .ckpt file ({reason})") from err


def _unsafe_globals(path: Path) -> str:
    """The names of the pickled objects weights-only loading refused, for the error message."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) pickles cannot be scanned; the message still helps
        return "unknown objects"
    refused = names - {pickled_name for _, pickled_name in _EXTRA_SAFE_GLOBALS}
    return ", ".join(sorted(refused)) or "unknown objects"


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111 reads `<checkpoint>.yaml` next to the file; `parameterization: "v"` marks v-prediction."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    import yaml

    try:
        params = yaml.safe_load(sidecar.read_text())["model"]["params"]
    except Exception as err:
        raise SingleFileLoadError(f"{sidecar.name} is not an LDM config yaml ({err}); fix or remove it") from err
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _probe_prediction_type(unet, path: Path) -> str:
    """Tell an SD 2.x 512-base (epsilon) model from a 768 v-prediction one, which have the same shapes, by
    what the UNet predicts for a flat latent at the last timestep. There the input is almost pure noise, so
    an epsilon model returns about its input, while a v-prediction model's output lies well below it
    (A1111 applies the same test to SD 2.x files that come without a yaml)."""
    weight = next(unet.parameters())
    flat = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=weight.dtype, device=weight.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            predicted = unet(flat, 999, encoder_hidden_states=context).sample
        below_input = (flat - predicted).float().mean().item()
        if not math.isfinite(below_input):  # NaN compares false with anything: it must not read as "epsilon"
            raise ValueError("the UNet's output is not finite")
    except Exception as err:  # the model still loads; say what was assumed and how to change it
        log.warning("%s: could not tell 512-base from 768 v-prediction (%s); assuming v-prediction. If images "
                    "come out as noise, add %s with parameterization 'eps'.", path.name, err,
                    path.with_suffix(".yaml").name)
        return "v_prediction"
    kind = "v_prediction" if below_input > 1 else "epsilon"
    log.info("%s is an SD 2.x model with %s (its UNet's output lies %.2f below a flat input at t=999); a %s "
             "next to it overrides this", path.name, kind, below_input, path.with_suffix(".yaml").name)
    return kind


def _use_shipped_sizes(pipe, family: str) -> None:
    """Give a loaded pipeline the native size of the shipped config `family` (its default image size)."""
    for part in ("unet", "vae"):
        config = json.loads((CONFIG_ROOT / family / part / "config.json").read_text())
        getattr(pipe, part).register_to_config(sample_size=config["sample_size"])
