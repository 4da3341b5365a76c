"""LoRA: small weight updates a prompt names as `<lora:name:multiplier>`, in A1111's syntax.

    <lora:add_detail>            multiplier 1 for the text encoder and the UNet
    <lora:add_detail:0.6>        0.6 for both
    <lora:add_detail:0.6:0.9>    0.6 for the text encoder, 0.9 for the UNet (also te=0.6, unet=0.9)

The tags are taken out of the prompt before it is read (also from inside prompt editing's brackets, as A1111
does); the negative prompt keeps its text. Files come from the LoRA folder (models/Lora, --lora-dir): kohya
keys (`lora_unet_...`, `lora_te_...`, as A1111 and most trainers write them) or diffusers/PEFT keys
(`unet....lora_A.weight`), for Linear and Conv2d layers (LoCon too).

A LoRA is merged into the weights (W += multiplier * alpha/rank * up @ down) and the touched weights are kept
on the CPU, so the next run with other LoRAs starts from the model as it was loaded. Merged weights keep the
compiled model's graphs valid: the tensors change in place, not their shapes or addresses.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from webui.engine.inpainting_model import INPAINTING_CHANNELS
from webui.engine.models import file_stamp, files_under
from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
MAX_LORAS = 20  # in one prompt: each is a file to read and merge
MAX_MULTIPLIER = 10.0
HASH_DIGITS = 12  # A1111's "Lora hashes" carry 12 hex digits
# A1111's extra-network tag: every <type:args> leaves the text; "lora" and "lyco" (its old LyCORIS name) are
# LoRAs, other types (hypernet, ...) do not exist here and are named in a warning.
_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")
# LyCORIS types other than LoCon: their maths is not an up @ down product.
_UNSUPPORTED_PARTS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "oft_blocks": "OFT",
                      "diff": "a full weight difference", "w_norm": "a norm LyCORIS"}


class LoraError(InvalidRequest):
    """A LoRA the prompt names cannot be used: the message says what to fix. The job is refused, not crashed."""


@dataclass(frozen=True)
class LoraUse:
    name: str
    te: float  # multiplier for the text encoder
    unet: float


@dataclass(frozen=True)
class LoraFile:
    name: str  # what a prompt names: the file's stem
    path: Path


def lora_uses(prompt: str) -> list[LoraUse]:
    """The LoRAs the prompt's tags name (a name given twice adds up); strip_loras gives the text without them."""
    uses: dict[str, LoraUse] = {}
    for match in _TAG.finditer(prompt):
        if match.group(1) not in LORA_TAG_TYPES:
            continue
        use = _parse_tag(match.group(2), match.group(0))
        if use.name in uses:
            before = uses[use.name]
            use = LoraUse(use.name, before.te + use.te, before.unet + use.unet)
        uses[use.name] = use
    if len(uses) > MAX_LORAS:
        raise LoraError(f"the prompt names {len(uses)} LoRAs; use at most {MAX_LORAS}")
    return list(uses.values())


def strip_loras(prompt: str) -> str:
    """The prompt as the text encoder reads it; a malformed tag is left for lora_uses to report."""
    return _TAG.sub("", prompt)


def unread_tags(prompt: str) -> list[str]:
    """Extra-network tags of types this server does not have (<hypernet:...>): left out, as A1111 leaves out
    the ones it cannot find, and worth a warning."""
    return [match.group(0) for match in _TAG.finditer(prompt) if match.group(1) not in LORA_TAG_TYPES]


def _parse_tag(body: str, tag: str) -> LoraUse:
    name, *args = [part.strip() for part in body.split(":")]
    if not name:
        raise LoraError(f"{tag} names no LoRA; write <lora:name> or <lora:name:0.8>")
    positional, named = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep:
            if key.strip() not in ("te", "unet", "dyn"):
                raise LoraError(f"{tag}: unknown setting {key.strip()!r}; use te= (text encoder) or unet=")
            if key.strip() != "dyn":  # A1111's dynamic rank for DyLoRA files: accepted, not used here
                named[key.strip()] = _multiplier(value, tag)
        else:
            positional.append(arg)
    if len(positional) > 3:
        raise LoraError(f"{tag} has {len(positional)} values; give one multiplier (both parts) or two (text "
                        "encoder, UNet), and optionally a dyn rank")
    positional = [_multiplier(value, tag) for value in positional[:2]]
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return LoraUse(name, te, unet)


def _multiplier(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"{tag}: {text.strip()!r} is not a number; write a multiplier such as 0.8") from None
    if not math.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise LoraError(f"{tag}: the multiplier must be between -{MAX_MULTIPLIER:g} and {MAX_MULTIPLIER:g}")
    return value


# --- the LoRA folder -----------------------------------------------------------------------


class LoraLibrary:
    """The LoRA files in one folder (and its subfolders), by name, with A1111's short hashes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, LoraFile] | None = None
        self._aliases: dict[str, LoraFile] = {}  # the name a trainer gave (ss_output_name), which A1111 finds too
        self._hashes: dict[tuple[str, int, int], str] = {}

    def refresh(self) -> list[LoraFile]:
        files: dict[str, LoraFile] = {}
        for path in files_under(self.folder, LORA_SUFFIXES):
            if path.stem in files:
                log.warning("two LoRAs are named %s: %s is used, %s is not; rename one", path.stem,
                            files[path.stem].path, path)
                continue
            files[path.stem] = LoraFile(path.stem, path)
        self._aliases = _aliases(files.values(), self.metadata)
        self._files = files
        return list(files.values())

    def entries(self) -> list[LoraFile]:
        return list(self._files.values()) if self._files is not None else self.refresh()

    def find(self, name: str) -> LoraFile:
        """The file for a name a prompt gives; a file added since the last look is found too."""
        found = self._named(name)
        if found is None or not found.path.is_file():
            self.refresh()
            found = self._named(name)
        if found is None:
            names = ", ".join(sorted(entry.name for entry in self.entries())[:20]) or "none"
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise LoraError(f"no LoRA named {shown!r} in {self.folder} (LoRAs there: {names}); put its .safetensors "
                            "file in that folder, or fix the name in the prompt")
        return found

    def _named(self, name: str) -> LoraFile | None:
        """By file name first, then by the alias a prompt pasted from A1111 may give."""
        files = self._files if self._files is not None else {entry.name: entry for entry in self.refresh()}
        return files.get(name) or self._aliases.get(name)

    def check(self, uses: list[LoraUse]) -> None:
        for use in uses:
            self.find(use.name)

    def short_hash(self, entry: LoraFile) -> str | None:
        """A1111's hash of a LoRA: for .safetensors the sha256 of what follows the header (the "addnet" hash,
        so editing the metadata keeps it), else of the whole file; 12 hex digits. None if unreadable."""
        key = (str(entry.path), *file_stamp(entry.path))
        try:
            if key not in self._hashes:
                self._hashes[key] = _file_hash(entry.path)[:HASH_DIGITS]
        except (OSError, struct.error):  # unreadable, or shorter than a header (still downloading)
            return None
        return self._hashes[key]

    def metadata(self, entry: LoraFile) -> dict:
        """The training metadata a .safetensors file carries in its header (kohya's ss_* keys), values that
        hold JSON objects decoded as A1111 gives them; {} if none or unreadable."""
        if entry.path.suffix.lower() != ".safetensors":
            return {}
        try:
            header = _safetensors_header(entry.path)
        except (OSError, ValueError, struct.error):
            return {}
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            return {}
        return {key: _decoded(value) for key, value in metadata.items() if key not in SKIPPED_METADATA}


SKIPPED_METADATA = ("ssmd_cover_images",)  # images as base64: megabytes no list needs (A1111 drops them too)


def _decoded(value):
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def _aliases(entries, metadata_of) -> dict[str, LoraFile]:
    """ss_output_name -> file, for names no file has and only one file claims."""
    claims: dict[str, list[LoraFile]] = {}
    names = {entry.name for entry in entries}
    for entry in entries:
        alias = metadata_of(entry).get("ss_output_name")
        if isinstance(alias, str) and alias and alias not in names:
            claims.setdefault(alias, []).append(entry)
    return {alias: found[0] for alias, found in claims.items() if len(found) == 1}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix.lower() == ".safetensors":
            header_size = struct.unpack("<Q", handle.read(8))[0]
            handle.seek(8 + header_size)
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > 100 << 20:
            raise ValueError("header too large")
        return json.loads(handle.read(size))


def read_lora(entry: LoraFile) -> dict[str, torch.Tensor]:
    """The file's tensors; a file that is no tensor file at all is a LoraError naming it."""
    try:
        if entry.path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(entry.path))
        else:  # weights_only: a .pt/.ckpt must not run code while it loads
            state = torch.load(entry.path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as err:
        raise LoraError(f"LoRA {entry.name} ({entry.path.name}) could not be read ({type(err).__name__}: "
                        f"{str(err)[:200]}); the file may be incomplete: download it again") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraError(f"LoRA {entry.name} ({entry.path.name}) holds no tensors by name; it is not a LoRA file")
    return state


# --- merging into a model ------------------------------------------------------------------


@dataclass
class LayerUpdate:
    """One layer's LoRA pair: delta = scale * up @ down, reshaped to the layer's weight."""
    part: str  # "unet" | "te"
    layer: str  # the module's dotted path with "_" for ".", as kohya keys name it
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0] if self.alpha is not None else 1.0


def layer_updates(entry: LoraFile, state: dict[str, torch.Tensor]) -> list[LayerUpdate]:
    """The file's layers, from kohya keys or diffusers/PEFT keys; anything else is a LoraError."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        where, piece = _split_key(entry, key)
        if where is not None:
            pairs.setdefault(where, {})[piece] = tensor
    if not pairs:
        raise LoraError(f"LoRA {entry.name} has no layers this server reads (kohya lora_unet_/lora_te_ keys or "
                        "diffusers unet./text_encoder. keys); it may be an SDXL LoRA, an embedding or another format")
    updates = []
    for (part, layer), pieces in pairs.items():
        if "up" not in pieces or "down" not in pieces:
            raise LoraError(f"LoRA {entry.name}: layer {layer} lacks its {'up' if 'up' not in pieces else 'down'} "
                            "weight; the file is damaged or not a LoRA")
        alpha = pieces.get("alpha")
        updates.append(LayerUpdate(part, layer, pieces["up"], pieces["down"],
                                   float(alpha) if alpha is not None else None))
    return updates


def _split_key(entry: LoraFile, key: str) -> tuple[tuple[str, str] | None, str]:
    """(("unet" | "te", layer), "up" | "down" | "alpha") for a key; (None, "") for keys LoRAs carry besides."""
    for suffix, kind in _UNSUPPORTED_PARTS.items():
        if key.endswith("." + suffix) or f".{suffix}." in key:
            raise LoraError(f"LoRA {entry.name} is {kind} (LyCORIS), which this server does not apply; "
                            "use a LoRA or LoCon file")
    if key.startswith(("lora_unet_", "lora_te_")):
        base, _, piece = key.partition(".")
        part = "unet" if base.startswith("lora_unet_") else "te"
        layer = base.removeprefix("lora_unet_" if part == "unet" else "lora_te_")
        pieces = {"lora_up.weight": "up", "lora_down.weight": "down", "alpha": "alpha"}
        if piece in pieces:
            return (part, layer), pieces[piece]
        if piece in ("dora_scale", "lora_mid.weight"):
            raise LoraError(f"LoRA {entry.name} is a DoRA or LoCon-with-mid file, which this server does not apply")
        return None, ""
    if "lora_magnitude_vector" in key:
        raise LoraError(f"LoRA {entry.name} is a DoRA file, which this server does not apply")
    for prefix, part in (("unet.", "unet"), ("text_encoder.", "te")):
        if key.startswith(prefix):
            for ending, piece in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
                if key.endswith(ending):
                    return (part, key[len(prefix):-len(ending)].replace(".", "_")), piece
    if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")):
        raise LoraError(f"LoRA {entry.name} is for SDXL; this server runs SD 1.x models")
    return None, ""


@dataclass
class LoraPatcher:
    """Merges LoRAs into a pipeline's weights and takes them out again. `applied` is what the weights hold now."""
    applied: tuple = ()
    _originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    def forget(self) -> None:
        """A new model is in place, its weights as loaded: nothing to take out of them."""
        self._originals.clear()
        self.applied = ()

    def use(self, pipe, wanted: list[tuple[LoraFile, LoraUse]]) -> None:
        """Make the pipeline's weights hold exactly these LoRAs (none: the model as loaded)."""
        key = tuple((entry.path, file_stamp(entry.path), use.te, use.unet) for entry, use in wanted)
        if key == self.applied:
            return
        self.restore()
        try:
            for entry, use in wanted:
                self._merge(pipe, entry, use)
        except BaseException:
            self.restore()  # never half a LoRA in the weights
            raise
        self.applied = key

    def restore(self) -> None:
        with torch.no_grad():
            for parameter, original in self._originals.values():
                parameter.copy_(original.to(parameter.device, parameter.dtype))
        self._originals.clear()
        self.applied = ()

    def _merge(self, pipe, entry: LoraFile, use: LoraUse) -> None:
        updates = layer_updates(entry, read_lora(entry))
        layers = {"unet": _layers(pipe.unet), "te": _layers(pipe.text_encoder)}
        with torch.no_grad():
            for update in updates:
                multiplier = use.unet if update.part == "unet" else use.te
                # transformers 5 dropped CLIPTextModel's text_model level that the LoRA keys name.
                module = layers[update.part].get(update.layer) or layers[update.part].get(
                    update.layer.removeprefix("text_model_"))
                if module is None:
                    raise LoraError(f"LoRA {entry.name} changes a layer this model does not have "
                                    f"({update.part}: {update.layer}); it was made for another kind of model")
                if multiplier != 0:
                    self._add(entry, update, module.weight, multiplier)

    def _add(self, entry: LoraFile, update: LayerUpdate, weight: torch.nn.Parameter, multiplier: float) -> None:
        if weight.is_meta:
            raise LoraError("LoRAs cannot be merged while layers are offloaded one by one (--lowvram); "
                            "start with --medvram instead")
        up, down = update.up.float().flatten(1), update.down.float().flatten(1)
        down = _padded_for_inpainting(down, update, weight)
        if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != (weight.shape[0], weight[0].numel()):
            raise LoraError(f"LoRA {entry.name} does not fit layer {update.layer} ({update.part}: LoRA "
                            f"{tuple(up.shape[:1]) + tuple(down.shape[1:])} vs weight {tuple(weight.shape)}); "
                            "it was made for another kind of model")
        self._originals.setdefault(id(weight), (weight, weight.detach().to("cpu", copy=True)))
        delta = (up.to(weight.device) @ down.to(weight.device)) * (update.scale * multiplier)
        weight.add_(delta.reshape(weight.shape).to(weight.dtype))


def _padded_for_inpainting(down: torch.Tensor, update: LayerUpdate, weight: torch.nn.Parameter) -> torch.Tensor:
    """A LoRA made for a text-to-image model's first convolution (4 input channels) on an inpainting model's (9):
    the update leaves the 5 extra channels alone, as A1111 pads it."""
    if weight.dim() != 4 or update.down.dim() != 4 or (weight.shape[1], update.down.shape[1]) != (INPAINTING_CHANNELS, 4):
        return down
    padded = torch.zeros(down.shape[0], INPAINTING_CHANNELS, *update.down.shape[2:], dtype=down.dtype)
    padded[:, :4] = update.down.float()
    return padded.flatten(1)


def _layers(model) -> dict[str, torch.nn.Module]:
    """Linear and Conv2d layers by kohya's name for them: the dotted module path with "_" for "."."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            layers[name.replace("_orig_mod.", "").replace(".", "_")] = module
    return layers
