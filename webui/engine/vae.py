"""External VAEs, A1111's "SD VAE": a VAE file (.safetensors, .pt, .ckpt) from the VAE folder (models/VAE,
--vae-dir) decodes and encodes the pictures instead of the model's own, chosen per job.

The files are those of the VAE folder (a file in a subfolder named by its path there, "sd15/vae.safetensors")
and, as in A1111, the `<model>.vae.safetensors` (.pt, .ckpt) files beside the models (named by their path in the
models folder). "Automatic" takes a file named after the model where there is one, as A1111's does (beside the
model, `<model>.vae.safetensors`; or in the VAE folder, `<model>.safetensors` or `<model>.vae.safetensors`), else
the model's own VAE; "None" is always the model's own. The weights are copied into the loaded VAE in place, so a
compiled decoder's graphs stay valid, and the model's own weights wait on the CPU until they are wanted again.
Files may be in the original (LDM) layout, as A1111's are, or in diffusers' layout.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.engine.models import ModelEntry, ModelRegistry, file_stamp, files_under, is_vae_beside_model
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
    """The VAE files, looked at again on each call (a folder of a few files)."""

    def __init__(self, folder: Path, registry: ModelRegistry):
        self.folder = Path(folder)
        self.registry = registry  # its models folder holds VAEs beside models; its hash cache serves VAEs too

    def files(self) -> list[VaeFile]:
        """The VAE folder's files, then those beside the models, each named by its path in its folder."""
        in_folder = files_under(self.folder, VAE_SUFFIXES)
        models = self.registry.models_dir
        beside = [path for path in files_under(models, VAE_SUFFIXES, {self.folder.resolve()})
                  if is_vae_beside_model(path) and path not in in_folder]
        return ([VaeFile(path.relative_to(self.folder).as_posix(), path) for path in in_folder]
                + [VaeFile(path.relative_to(models).as_posix(), path) for path in beside])

    def choices(self) -> list[str]:
        return [AUTOMATIC, NO_VAE, *(vae.name for vae in self.files())]

    def find(self, name: str) -> VaeFile:
        """A file by its name; or by its file name, with or without the suffix, where one file has it (A1111
        names a file by its base name); VaeError listing the choices."""
        files = self.files()
        found = [vae for vae in files if vae.name == name]
        found = found or [vae for vae in files if name in (vae.path.name, vae.path.stem)]
        if len(found) == 1:
            return found[0]
        if found:
            raise VaeError(f"sd_vae: {len(found)} VAE files are named {name[:100]!r}; pick one by its path: "
                           f"{', '.join(vae.name for vae in found)}")
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
        """Beside the model first, then anywhere in the VAE folder."""
        if model.path is None:  # a hub model
            return None
        stem = model.path.stem if model.kind == "single_file" else model.path.name
        beside = {model.path.with_name(f"{stem}.vae{suffix}") for suffix in VAE_SUFFIXES}
        names = {f"{stem}{vae}{suffix}" for vae in ("", ".vae") for suffix in VAE_SUFFIXES}
        files = self.files()
        return (next((vae for vae in files if vae.path in beside), None)
                or next((vae for vae in files if vae.path.parent.is_relative_to(self.folder)
                         and vae.path.name in names), None))

    def short_hash(self, vae: VaeFile) -> str | None:
        """A1111's "VAE hash": the first 10 hex digits of the file's sha256 (cached as models' are)."""
        return self.registry.short_hash(ModelEntry(vae.name, str(vae.path), "single_file"))


def read_vae_weights(path: Path, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's VAE weights in diffusers' layout, shaped as `vae`'s; VaeError when they do not fit it."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from webui.engine.single_file import SingleFileLoadError, read_state_dict

    try:
        # A whole checkpoint: its VAE alone is read (of a .safetensors; a pickle is read whole anyway).
        weights = read_state_dict(path, _LDM_PREFIX) or read_state_dict(path)
    except SingleFileLoadError as err:
        raise VaeError(f"VAE {err}") from None
    weights = {key.removeprefix(_LDM_PREFIX): value for key, value in weights.items()}
    if _LDM_KEY in weights:
        weights = convert_ldm_vae_checkpoint(weights, vae.config)
    wanted = vae.state_dict()
    missing = [key for key in wanted if key not in weights]
    misfit = [key for key in wanted if key in weights and weights[key].numel() != wanted[key].numel()]
    if missing or misfit:
        raise VaeError(f"{path.name} is not a VAE for this model ({len(missing)} of its {len(wanted)} weights "
                       f"missing, {len(misfit)} of another size): it may be a LoRA or another kind of model's file; "
                       "pick another VAE")
    # The original layout keeps the attention's projections as 1x1 convolutions; diffusers' are linear.
    return {key: weights[key].reshape(wanted[key].shape) for key in wanted}


class VaeSwap:
    """Which VAE file's weights the loaded model's VAE holds now (None: its own), and its own kept on the CPU
    while another's are in. Forgotten when another model is loaded."""

    def __init__(self):
        self.current: tuple[VaeFile, tuple[int, int]] | None = None  # the file, and its size and time when read
        self._own: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        with self._lock:
            self.current, self._own = None, None

    def use(self, vae: torch.nn.Module, chosen: VaeFile | None) -> None:
        """Put the chosen file's weights (None: the model's own) into `vae`, in place. A file saved again under
        its name is read again."""
        with self._lock:
            wanted = (chosen, file_stamp(chosen.path)) if chosen else None
            if wanted == self.current:
                return
            if any(parameter.device.type == "meta" for parameter in vae.parameters()):
                raise VaeError("sd_vae: another VAE cannot be swapped in under --lowvram (its weights are streamed "
                               "from the CPU); start without --lowvram (--medvram works), or pick None")
            weights = self._own if chosen is None else read_vae_weights(chosen.path, vae)
            if self._own is None:
                self._own = {key: value.detach().to("cpu", copy=True) for key, value in vae.state_dict().items()}
            vae.load_state_dict(weights)
            self.current = wanted
            if chosen is None:
                self._own = None
