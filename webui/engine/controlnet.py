"""ControlNet for SD 1.x and SDXL (and any model its ControlNet is made for), as sd-webui-controlnet gives it: one
unit of a control map, a model from `models/ControlNet` (--controlnet-dir), a weight and the part of the steps it
acts in.

Models: diffusers folders (config.json + diffusion_pytorch_model.*); single files in diffusers' layout (as most SDXL
ControlNets are shared), read with the loaded model's UNet config and the depths and widths their weights show; and
single files in the original layout (.safetensors, .pth, ...) for SD 1.x/2.x, read with the config of a
`<name>.yaml` beside them, as the extension reads it, else with SD 1.5's ControlNet config kept in the repository. Each is listed as the extension lists it, "name
[hash]", the hash being A1111's old 8-digit one (the sha256 of 64 KiB at 1 MiB into the weights file).

The control: every UNet call of a pass goes through a forward pre-hook that runs the ControlNet on the same input
(latents, timestep, text embeddings) with the control map at the pass's size, and hands its residuals to the UNet
(down_block_additional_residuals, mid_block_additional_residual). So txt2img, img2img, inpainting, the hires fix's
second pass and a refiner all get it through diffusers' own pipelines, without a ControlNet pipeline. A pass with
a ControlNet runs its UNet uncompiled: the residuals are inputs a compiled graph was not made for.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from webui.controlnet import CANNY_HIGH, CANNY_LOW, CN_MODULES, CN_PROCESSOR_RES
from webui.engine.canny import canny
from webui.engine.img2img import MAX_PICTURE_PIXELS, RESAMPLE, fit_image
from webui.engine.models import file_stamp, files_under, legacy_hash
from webui.engine.samplers import sampler_steps_done
from webui.engine.unet_hooks import removed_after
from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")  # the extension's
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SD15_CONFIG = Path(__file__).resolve().parent / "model_configs" / "controlnet-sd15"
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")
_KINDS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # by the text embeddings' width (cross-attention)
# A preprocessor's map is at most this large: scaling a long thin picture's short side to the resolution would
# make it gigapixels (Canny's float arrays: gigabytes); the pictures' own limit.
MAX_MAP_PIXELS = MAX_PICTURE_PIXELS


class ControlNetError(InvalidRequest):
    """A ControlNet model that cannot be used: the message names the field and what to pick instead."""


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # the file's stem, or the diffusers folder's name
    path: Path  # the file, or the diffusers folder

    @property
    def weights(self) -> Path:
        """The file the hash is read from: the file itself, or the folder's weights."""
        if self.path.is_file():
            return self.path
        return next((self.path / name for name in _DIFFUSERS_WEIGHTS if (self.path / name).is_file()), self.path)

    @property
    def title(self) -> str:
        return f"{self.name} [{legacy_hash(self.weights) or 'NOFILE'}]"


class ControlNetLibrary:
    """The ControlNet folder's models, looked at again on each call, and the last network built (one in memory)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._built: tuple[tuple, torch.nn.Module] | None = None

    def models(self) -> list[ControlNetFile]:
        """Diffusers folders as one model each, then the other weight files, by name (as the extension sorts)."""
        folders = {path.parent for name in _DIFFUSERS_WEIGHTS for path in self.folder.rglob(name)
                   if (path.parent / "config.json").is_file()} if self.folder.is_dir() else set()
        found = [ControlNetFile(folder.name, folder) for folder in folders]
        found += [ControlNetFile(path.stem, path) for path in files_under(self.folder, SUFFIXES)
                  if path.parent not in folders and path.stem != "None"]
        return sorted(found, key=lambda model: model.name)

    def titles(self) -> list[str]:
        return [model.title for model in self.models()]

    def find(self, name: str) -> ControlNetFile:
        """A model by its title, or by its name alone in any case (another hash: the file changed since)."""
        models = self.models()
        for model in models:
            if model.title == name:
                return model
        wanted = _TITLE_HASH.sub("", name.strip()).lower()
        for model in models:
            if model.name.lower() == wanted:
                return model
        listed = ", ".join(model.title for model in models) or f"none: put ControlNet models in {self.folder}"
        raise ControlNetError(f"controlnet_model: there is no ControlNet model {name[:200]!r}; pick one of {listed}")

    def check(self, name: str, unet_config) -> ControlNetFile:
        """The model `name` names, refused (ControlNetError) when it is not made for a UNet of `unet_config`."""
        model = self.find(name)
        problem = kind_problem(model.title, cross_attention_width(model), unet_config)
        if problem:
            raise ControlNetError(f"controlnet_model: {problem}")
        return model

    def network(self, model: ControlNetFile, unet_config, device: torch.device | str,
                dtype: torch.dtype) -> torch.nn.Module:
        """The model's ControlNet for a UNet of `unet_config`, on `device` in `dtype`, built again when its file
        changed (or the UNet it is built after, for a file without a config of its own)."""
        key = (model.path, file_stamp(model.weights), str(device), dtype, json.dumps(dict(unet_config), default=str))
        with self._lock:
            if self._built is None or self._built[0] != key:
                self._built = None  # the old one's memory goes first
                log.info("loading ControlNet %s", model.title)
                self._built = (key, read_network(model, unet_config).to(device, dtype).eval())
            return self._built[1]

    def forget(self) -> None:
        with self._lock:
            self._built = None


def read_network(model: ControlNetFile, unet_config) -> torch.nn.Module:
    """A ControlNet from its folder or file, for a UNet of `unet_config`; never from the hub."""
    from diffusers import ControlNetModel

    try:
        if model.path.is_dir():
            return ControlNetModel.from_pretrained(model.path, local_files_only=True)
        shapes = dict(_weight_shapes(model.path))
        if _DIFFUSERS_KEY in shapes:
            return _diffusers_layout_file(model, unet_config, shapes)
        if unet_config.addition_embed_type == "text_time":
            raise ControlNetError(f"controlnet_model: {model.title} is in the original layout, which is read for SD "
                                  "1.x/2.x ControlNets only; use the SDXL ControlNet's diffusers-format file "
                                  "(diffusion_pytorch_model.safetensors, renamed as you like)")
        yaml = model.path.with_suffix(".yaml")  # the original config beside the file, as the extension reads it
        shape = _yaml_config(yaml) if yaml.is_file() else {}
        return ControlNetModel.from_single_file(str(model.path), config=str(SD15_CONFIG), local_files_only=True,
                                                **shape)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ControlNetError(f"controlnet_model: {model.title} could not be read ({type(err).__name__}: "
                              f"{str(err)[:300]}); is it a ControlNet (T2I-Adapters, control-LoRAs and others are "
                              "not supported)?") from None


_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"  # a key only diffusers' layout has
# From the loaded model's UNet: what a ControlNet made for it shares and its weights cannot show.
_SHARED_WITH_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "block_out_channels", "layers_per_block",
                     "downsample_padding", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                     "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
                     "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                     "upcast_attention", "only_cross_attention", "resnet_time_scale_shift", "encoder_hid_dim",
                     "encoder_hid_dim_type", "num_class_embeds")


def _diffusers_layout_file(model: ControlNetFile, unet_config, shapes: dict[str, tuple[int, ...]]):
    """A single file in diffusers' layout without its config.json: the UNet's config for what they share, the
    weights' shapes for what ControlNets vary (SDXL's "mid" and "small" ones have fewer transformer layers)."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    def depth(level: int) -> int:  # transformer layers in the level's first attention; 0: the level has none
        prefix = f"down_blocks.{level}.attentions.0.transformer_blocks."
        return len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})

    depths = [depth(level) for level in range(len(unet_config.block_out_channels))]
    # The map's encoder: conv_in, then pairs of convolutions, the second of each pair widening (odd block numbers).
    widening = sorted((int(match[1]), shape[0]) for key, shape in shapes.items()
                      if (match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", key))
                      and int(match[1]) % 2 == 1)
    config = {name: unet_config[name] for name in _SHARED_WITH_UNET if name in unet_config} | {
        "down_block_types": ["CrossAttnDownBlock2D" if layers else "DownBlock2D" for layers in depths],
        "transformer_layers_per_block": [layers or 1 for layers in depths],
        "mid_block_type": ("UNetMidBlock2DCrossAttn" if any(key.startswith("mid_block.attentions.") for key in shapes)
                           else "UNetMidBlock2D"),
        "conditioning_channels": shapes[_DIFFUSERS_KEY][1],
        "conditioning_embedding_out_channels": [shapes[_DIFFUSERS_KEY][0], *(width for _, width in widening)]}
    network = ControlNetModel.from_config(config)
    state = load_file(str(model.path)) if model.path.suffix.lower() == ".safetensors" else torch.load(
        model.path, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("state_dict", state))  # strict: a file of another shape says so
    return network


def _yaml_config(yaml: Path) -> dict:
    """The diffusers settings an original ControlNet config (the .yaml) gives, over SD 1.5's. Mapped here: diffusers
    0.42's own mapping (from_single_file's original_config) fails, calling the UNet's without its checkpoint."""
    import yaml as pyyaml
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = pyyaml.safe_load(yaml.read_text())
    unet = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)  # the size: not a ControlNet's
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    hint = original["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    return {key: unet[key] for key in keys if key in unet} | {"conditioning_channels": hint}


def cross_attention_width(model: ControlNetFile) -> int:
    """The width of the text embeddings the ControlNet reads (768 for SD 1.x), from its config or its weights' shapes,
    without loading them."""
    if model.path.is_dir():
        try:
            width = json.loads((model.path / "config.json").read_text())["cross_attention_dim"]
        except (OSError, ValueError, KeyError) as err:
            raise ControlNetError(f"controlnet_model: {model.title}'s config.json cannot be read ({err})") from None
        return width[0] if isinstance(width, list) else width
    for key, shape in _weight_shapes(model.path):
        if key.endswith("attn2.to_k.weight"):  # cross-attention's key projection: (channels, text width)
            return shape[1]
    raise ControlNetError(f"controlnet_model: {model.title} holds no ControlNet in the original layout (T2I-Adapters, "
                          "control-LoRAs and others are not supported)")


def _weight_shapes(path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as weights:
                for key in weights.keys():
                    yield key, tuple(weights.get_slice(key).get_shape())
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any damaged or foreign file: say which, never crash the check
        raise ControlNetError(f"controlnet_model: {path.name} cannot be read ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):  # a tensor, a list: no weights by name (an AttributeError, a 500, before)
        raise ControlNetError(f"controlnet_model: {path.name} holds no weights by name ({type(state).__name__}); "
                              "is it a ControlNet?")
    for key, value in state.items():
        if torch.is_tensor(value):
            yield key, tuple(value.shape)


def kind_problem(title: str, width: int, unet_config) -> str | None:
    """Why a ControlNet reading text embeddings `width` wide cannot steer a UNet of `unet_config`, or None."""
    wanted = unet_config.cross_attention_dim
    if width == wanted:
        return None

    def kind(dim: int) -> str:
        return _KINDS.get(dim, f"text embeddings {dim} wide")

    return (f"{title} is a ControlNet for {kind(width)} models, and the loaded model is {kind(wanted)}; pick a "
            "ControlNet made for this model")


# --- preprocessors --------------------------------------------------------------------------------
def detect_map(picture: Image.Image, module: str, processor_res: int = CN_PROCESSOR_RES,
               low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """The control map of an RGB picture: itself ("none"), its negative ("invert", for black lines on white), or its
    Canny edges found at `processor_res` (the short side, as the extension scales it; the map keeps that size and is
    fitted to each pass's size later), within MAX_MAP_PIXELS."""
    if module == "none":
        return picture
    if module == "invert":
        return ImageOps.invert(picture)
    if module != "canny":
        raise ValueError(f"unknown preprocessor {module!r}; one of {', '.join(CN_MODULES)}")
    scale = processor_res / min(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    if size[0] * size[1] > MAX_MAP_PIXELS:  # rounded down: within the limit
        scale = (MAX_MAP_PIXELS / (picture.width * picture.height)) ** 0.5
        size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
    scaled = picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)
    return Image.fromarray(canny(np.asarray(scaled), low, high)).convert("RGB")


def pixel_perfect_resolution(picture_size: tuple[int, int], target: tuple[int, int], resize_mode: int) -> int:
    """The extension's Pixel Perfect: the preprocessor's resolution at which the map is neither enlarged nor shrunk
    when fitted to the target (width, height): by the smaller scale for Resize and fill, else the larger."""
    scales = (target[0] / picture_size[0], target[1] / picture_size[1])
    scale = min(scales) if resize_mode == 2 else max(scales)
    return int(round(scale * min(picture_size)))


# --- the control during denoising ---------------------------------------------------------------
@dataclass
class ControlUnit:
    """One ControlNet as a job runs it: the map, fitted to each pass's size by `resize_mode` (img2img's numbers)."""

    network: torch.nn.Module
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0  # the part of a pass's steps done before it acts
    end: float = 1.0  # ... and after which it stops
    resize_mode: int = 1
    _conds: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def cond(self, size: tuple[int, int], device, dtype) -> torch.Tensor:
        """The map at `size` (width, height) as the ControlNet reads it: one row of RGB in 0..1."""
        key = (size, str(device), dtype)
        if key not in self._conds:
            fitted = np.asarray(fit_map(self.image, *size, self.resize_mode).convert("RGB"), dtype=np.float32)
            self._conds[key] = torch.from_numpy(fitted / 255).permute(2, 0, 1)[None].to(device, dtype)
        return self._conds[key]


def fit_map(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """A control map at width x height by the resize mode, as the extension fits it: Resize and Fill pads with the
    median colour of the map's border (img2img's stretched edge rows would draw an edge touching the side as a line
    across the bar); the other modes as img2img's."""
    if resize_mode != 2 or image.size == (width, height):
        return fit_image(image, width, height, resize_mode)
    image = image.convert("RGB")
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    scale = min(width / image.width, height / image.height)
    inner = image.resize((max(1, min(width, round(image.width * scale))),
                          max(1, min(height, round(image.height * scale)))), RESAMPLE)
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in np.median(border, axis=0)))
    canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return canvas


class ControlPass:
    """The control over one pass of `steps` sampler steps of `pipe`: it counts the UNet calls to know the step
    (Heun and its kin call the UNet twice a step), as the extension times its guidance window by the step."""

    def __init__(self, unit: ControlUnit, pipe, steps: int, scale_factor: int):
        self.unit, self.pipe, self.steps, self.scale_factor = unit, pipe, steps, scale_factor
        self.calls = 0

    def active(self) -> bool:
        step = sampler_steps_done(self.calls, max(self.pipe.num_timesteps, 1), self.steps, self.pipe.scheduler)
        return self.unit.weight > 0 and self.unit.start <= step / self.steps <= self.unit.end

    def residuals(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                  added_cond_kwargs: dict | None = None) -> dict:
        """The UNet's extra keyword arguments for this call: the ControlNet's residuals, or none outside its window.
        An SDXL ControlNet reads the UNet's pooled text vectors and size numbers (added_cond_kwargs) too."""
        active, self.calls = self.active(), self.calls + 1
        if not active:
            return {}
        network = self.unit.network
        size = (sample.shape[-1] * self.scale_factor, sample.shape[-2] * self.scale_factor)
        cond = self.unit.cond(size, sample.device, network.dtype).expand(sample.shape[0], -1, -1, -1)
        added = {"added_cond_kwargs": {name: value.to(network.dtype) for name, value in added_cond_kwargs.items()}
                 } if added_cond_kwargs else {}
        down, mid = network(sample.to(network.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(
            network.dtype), controlnet_cond=cond, conditioning_scale=self.unit.weight, return_dict=False, **added)
        return {"down_block_additional_residuals": [residual.to(sample.dtype) for residual in down],
                "mid_block_additional_residual": mid.to(sample.dtype)}


@contextlib.contextmanager
def controlled(unet, control: ControlPass | None) -> Iterator[None]:
    """While inside, every UNet call gets the ControlNet's residuals (None: the calls are left alone). Enter it
    before an inpainting model's extra_input, so the ControlNet reads the 4 channels of the latents alone."""
    if control is None:
        yield
        return

    def add_residuals(_module, args, kwargs):
        sample, timestep = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
        states = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        return args, kwargs | control.residuals(sample, timestep, states, kwargs.get("added_cond_kwargs"))

    with removed_after([unet.register_forward_pre_hook(add_residuals, with_kwargs=True)]):
        yield


def request_map(picture: Image.Image, request, size: tuple[int, int]) -> Image.Image:
    """A request's control map of its RGB picture, for a first pass of `size` (width, height): Pixel Perfect picks
    the preprocessor's resolution from it."""
    resolution = request.controlnet_processor_res
    if request.controlnet_pixel_perfect:
        resolution = pixel_perfect_resolution(picture.size, size, request.controlnet_resize_mode)
    return detect_map(picture, request.controlnet_module, resolution, request.controlnet_threshold_a,
                      request.controlnet_threshold_b)
