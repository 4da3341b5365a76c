"""External VAEs, A1111's "SD VAE": a VAE file (.safetensors, .pt, .ckpt) from the VAE folder (models/VAE,
--vae-dir) decodes and encodes the pictures instead of the model's own, chosen per job.

"Automatic" takes a file named after the model where there is one, as A1111's does (beside a checkpoint file,
`<model>.vae.safetensors`; or in the VAE folder, `<model>.safetensors` or `<model>.vae.safetensors`), else the
model's own VAE; "None" is always the model's own. The weights are copied into the loaded VAE in place, so a
compiled decoder's graphs stay valid, and the model's own weights wait on the CPU until they are wanted again.
Files may be in the original (LDM) layout, as A1111's are, or in diffusers' layout.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.engine.models import ModelEntry, ModelRegistry, files_under
from webui.schemas import InvalidRequest

AUTOMATIC, NO_VAE = "Automatic", "None"  # A1111's choices besides the files
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
_LDM_PREFIX = "first_stage_model."  # a whole checkpoint's VAE keys
_LDM_KEY = "encoder.down.0.block.0.norm1.weight"  # the original layout (diffusers': encoder.down_blocks...)


class VaeError(InvalidRequest):
    """A VAE that cannot be used: the message says what to pick or fix; the job is refused, not crashed."""


@dataclass(frozen=True)
class VaeFile:
    name: str  # the file's name, as A1111 lists it and writes it in the infotext ("vae-ft-mse.safetensors")
    path: Path


class VaeLibrary:
    """The VAE folder's files, looked at again on each call (a folder of a few files)."""

    def __init__(self, folder: Path, registry: ModelRegistry):
        self.folder = Path(folder)
        self.registry = registry  # its hash cache serves VAE files too

    def files(self) -> list[VaeFile]:
        return [VaeFile(path.name, path) for path in files_under(self.folder, VAE_SUFFIXES)]

    def choices(self) -> list[str]:
        return [AUTOMATIC, NO_VAE, *(vae.name for vae in self.files())]

    def find(self, name: str) -> VaeFile:
        """A file by its name, or its name without the suffix; VaeError listing the choices."""
        for vae in self.files():
            if name in (vae.name, vae.path.stem):
                return vae
        raise VaeError(f"sd_vae: there is no VAE {name[:100]!r} in {self.folder}; choose one of "
                       f"{', '.join(self.choices())} (put the file in that folder, then refresh the list)")

    def check(self, choice: str) -> None:
        if choice not in (AUTOMATIC, NO_VAE):
            self.find(choice)

    def resolve(self, choice: str, model: ModelEntry) -> VaeFile | None:
        """The file a choice means for this model; None for the model's own VAE."""
        if choice == NO_VAE:
            return None
        if choice != AUTOMATIC:
            return self.find(choice)
        return self._named_after(model)

    def _named_after(self, model: ModelEntry) -> VaeFile | None:
        stem = Path(model.name).name
        beside = ([model.path.with_name(f"{model.path.stem}.vae{suffix}") for suffix in VAE_SUFFIXES]
                  if model.kind == "single_file" else [])
        in_folder = [self.folder / f"{stem}{vae}{suffix}" for vae in ("", ".vae") for suffix in VAE_SUFFIXES]
        found = next((path for path in beside + in_folder if path.is_file()), None)
        return VaeFile(found.name, found) if found else None

    def short_hash(self, vae: VaeFile) -> str | None:
        """A1111's "VAE hash": the first 10 hex digits of the file's sha256 (cached as models' are)."""
        return self.registry.short_hash(ModelEntry(vae.name, str(vae.path), "single_file"))


def read_vae_weights(path: Path, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's VAE weights in diffusers' layout, shaped as `vae`'s; VaeError when they do not fit it."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from webui.engine.single_file import SingleFileLoadError, read_state_dict

    try:
        weights = read_state_dict(path)
    except SingleFileLoadError as err:
        raise VaeError(f"VAE {err}") from None
    if any(key.startswith(_LDM_PREFIX) for key in weights):  # a whole checkpoint: its VAE
        weights = {key[len(_LDM_PREFIX):]: value for key, value in weights.items() if key.startswith(_LDM_PREFIX)}
    if _LDM_KEY in weights:
        weights = convert_ldm_vae_checkpoint(weights, vae.config)
    wanted = vae.state_dict()
    missing = [key for key in wanted if key not in weights]
    misfit = [key for key in wanted if key in weights and weights[key].numel() != wanted[key].numel()]
    if missing or misfit:
        raise VaeError(f"{path.name} is not a VAE for this model ({len(missing)} of its {len(wanted)} weights "
                       f"missing, {len(misfit)} of another size): it may be an SDXL VAE, a LoRA or a whole model; "
                       "pick another in SD VAE")
    # The original layout keeps the attention's projections as 1x1 convolutions; diffusers' are linear.
    return {key: weights[key].reshape(wanted[key].shape) for key in wanted}


class VaeSwap:
    """Which VAE file's weights the loaded model's VAE holds now (None: its own), and its own kept on the CPU
    while another's are in. Forgotten when another model is loaded."""

    def __init__(self):
        self.current: VaeFile | None = None
        self._own: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        with self._lock:
            self.current, self._own = None, None

    def use(self, vae: torch.nn.Module, chosen: VaeFile | None) -> None:
        """Put the chosen file's weights (None: the model's own) into `vae`, in place."""
        with self._lock:
            if chosen == self.current:
                return
            if any(parameter.device.type == "meta" for parameter in vae.parameters()):
                raise VaeError("sd_vae: another VAE cannot be swapped in under --lowvram (its weights are streamed "
                               "from the CPU); start without --lowvram (--medvram works), or pick None")
            weights = self._own if chosen is None else read_vae_weights(chosen.path, vae)
            if self._own is None:
                self._own = {key: value.detach().to("cpu", copy=True) for key, value in vae.state_dict().items()}
            vae.load_state_dict(weights)
            self.current = chosen
            if chosen is None:
                self._own = None
