"""LoRA: small weight updates a prompt names as `<lora:name:multiplier>`, in A1111's syntax.

    <lora:add_detail>            multiplier 1 for the text encoder and the UNet
    <lora:add_detail:0.6>        0.6 for both
    <lora:add_detail:0.6:0.9>    0.6 for the text encoder, 0.9 for the UNet (also te=0.6, unet=0.9)

The tags are taken out of the prompt before it is read (also from inside prompt editing's brackets, as A1111
does); the negative prompt keeps its text. Files come from the LoRA folder (models/Lora, --lora-dir): kohya
keys (`lora_unet_...`, `lora_te_...`, as A1111 and most trainers write them) or diffusers/PEFT keys
(`unet....lora_A.weight`), for Linear and Conv2d layers (LoCon too), and LyCORIS's LoHa and LoKr files. SDXL
LoRAs name the two text encoders `lora_te1_`/`lora_te2_` (`text_encoder_2.` in diffusers keys) and the UNet's
layers as Stability's original code names them (`input_blocks_4_1_...`); sgm_name maps those to diffusers' names.

A LoRA is merged into the weights (W += multiplier * alpha/rank * update) and the touched weights are kept
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

from webui.engine.inpainting_model import EDIT_CHANNELS, INPAINTING_CHANNELS
from webui.engine.models import file_stamp, files_by_name
from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
MAX_LORAS = 20  # in one prompt: each is a file to read and merge
MAX_MULTIPLIER = 10.0
HASH_DIGITS = 12  # A1111's "Lora hashes" carry 12 hex digits
# A1111's extra-network tag: every <type:args> leaves the text; "lora" and "lyco" (its old LyCORIS name) are
# LoRAs, "hypernet" a hypernetwork (webui/engine/hypernetworks.py); other types do not exist here and are named in
# a warning.
_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")
READ_TAG_TYPES = (*LORA_TAG_TYPES, "hypernet")
# The pieces a layer's update is made of, by kohya key suffix: LoRA and LoCon (up @ down; a convolution's may
# have a Tucker middle, lora_mid), LyCORIS LoHa (the elementwise product of two low-rank products) and LoKr (a
# Kronecker product); the t pieces are Tucker cores for convolutions.
_PIECES = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha",
           "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
           "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# Other LyCORIS types and what they are called.
_UNSUPPORTED_PARTS = {"oft_blocks": "OFT", "oft_diag": "OFT", "diff": "a full weight difference",
                      "w_norm": "a norm LyCORIS", "dora_scale": "DoRA", "a1.weight": "GLoRA", "on_input": "IA3"}


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
    """Extra-network tags of types this server does not have (an extension's): left out, as A1111 leaves out
    the ones it cannot find, and worth a warning."""
    return [match.group(0) for match in _TAG.finditer(prompt) if match.group(1) not in READ_TAG_TYPES]


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
        files = {name: LoraFile(name, path)
                 for name, path in files_by_name(self.folder, LORA_SUFFIXES, "LoRAs").items()}
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
    """One layer's update as the file holds it: its pieces by kohya key suffix (_PIECES)."""
    part: str  # "unet" | "te" (the first or only text encoder) | "te2" (SDXL's second)
    layer: str  # the module's dotted path with "_" for ".", as kohya keys name it
    pieces: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        if any(name.startswith("hada_") for name in self.pieces):
            return "LoHa"
        return "LoKr" if any(name.startswith("lokr_") for name in self.pieces) else "LoRA"

    def missing(self) -> str | None:
        """The piece the update cannot do without, if one is missing."""
        has = self.pieces.__contains__
        needed = {"LoRA": ["lora_up.weight", "lora_down.weight"],
                  "LoHa": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
                  "LoKr": [] if has("lokr_w1") else ["lokr_w1_a", "lokr_w1_b"]}[self.kind]
        if self.kind == "LoKr" and not has("lokr_w2"):
            needed += ["lokr_w2_a", "lokr_w2_b"]
        return next((name for name in needed if not has(name)), None)

    @property
    def scale(self) -> float:
        """alpha / rank, as A1111 scales each kind; 1 without an alpha or (LoKr of full matrices) a rank."""
        rank_piece = {"LoRA": "lora_down.weight", "LoHa": "hada_w1_b"}.get(self.kind)
        if self.kind == "LoKr":
            rank_piece = "lokr_w2_b" if "lokr_w2_b" in self.pieces else "lokr_w1_b"
        alpha, rank = self.pieces.get("alpha"), self.pieces.get(rank_piece)
        return float(alpha) / rank.shape[0] if alpha is not None and rank is not None else 1.0

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight update as a matrix (out, in * kernel), float32 on `device`, times scale."""
        piece = {name: tensor.to(device, torch.float32) for name, tensor in self.pieces.items()}
        if self.kind == "LoHa":
            update = (_low_rank(piece["hada_w1_a"], piece["hada_w1_b"], piece.get("hada_t1")).flatten(1)
                      * _low_rank(piece["hada_w2_a"], piece["hada_w2_b"], piece.get("hada_t2")).flatten(1))
        elif self.kind == "LoKr":
            first = piece.get("lokr_w1")
            if first is None:
                first = piece["lokr_w1_a"] @ piece["lokr_w1_b"]
            second = piece.get("lokr_w2")
            if second is None:
                second = _low_rank(piece["lokr_w2_a"], piece["lokr_w2_b"], piece.get("lokr_t2"))
            if second.dim() == 4:  # a convolution's kernel: the first factor scales whole kernels
                first = first[:, :, None, None]
            update = torch.kron(first, second.contiguous())  # kron refuses einsum's strided result
        elif "lora_mid.weight" in piece:  # Tucker: up (out, r), mid (r, r', k, k), down (r', in)
            update = torch.einsum("nmkl,in,mj->ijkl", piece["lora_mid.weight"], piece["lora_up.weight"].flatten(1),
                                  piece["lora_down.weight"].flatten(1))
        else:
            update = piece["lora_up.weight"].flatten(1) @ piece["lora_down.weight"].flatten(1)
        return update.flatten(1) * self.scale


def _low_rank(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    """a @ b; with a Tucker core (r, r', k, k), a convolution's kernel: a is (r, out), b (r', in)."""
    if core is None:
        return a.flatten(1) @ b.flatten(1)
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)


def layer_updates(entry: LoraFile, state: dict[str, torch.Tensor]) -> list[LayerUpdate]:
    """The file's layers, from kohya keys or diffusers/PEFT keys; anything else is a LoraError."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        where, piece = _split_key(entry, key)
        if where is not None:
            pairs.setdefault(where, {})[piece] = tensor
    if not pairs:
        raise LoraError(f"LoRA {entry.name} has no layers this server reads (kohya lora_unet_/lora_te_ keys or "
                        "diffusers unet./text_encoder. keys); it may be an embedding or another format")
    updates = [LayerUpdate(part, layer, pieces) for (part, layer), pieces in pairs.items()]
    for update in updates:
        missing = update.missing()
        if missing:
            raise LoraError(f"LoRA {entry.name}: layer {update.layer} lacks {missing}; the file is damaged or "
                            f"not a {update.kind}")
    return updates


# Which part of the model a key's prefix names: kohya's, then diffusers'. SDXL's text encoders are te1 and te2.
_KOHYA_PARTS = (("lora_unet_", "unet"), ("lora_te1_", "te"), ("lora_te2_", "te2"), ("lora_te_", "te"))
_DIFFUSERS_PARTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))


def _split_key(entry: LoraFile, key: str) -> tuple[tuple[str, str] | None, str]:
    """((part, layer), piece: one of _PIECES) for a key; (None, "") for keys LoRAs carry besides."""
    for suffix, kind in _UNSUPPORTED_PARTS.items():
        if key.endswith("." + suffix) or f".{suffix}." in key:
            raise LoraError(f"LoRA {entry.name} is {kind} (LyCORIS), which this server does not apply; "
                            "use a LoRA, LoCon, LoHa or LoKr file")
    for prefix, part in _KOHYA_PARTS:
        if key.startswith(prefix):
            base, _, piece = key.partition(".")
            return ((part, base.removeprefix(prefix)), piece) if piece in _PIECES else (None, "")
    if "lora_magnitude_vector" in key:
        raise LoraError(f"LoRA {entry.name} is a DoRA file, which this server does not apply")
    for prefix, part in _DIFFUSERS_PARTS:
        if key.startswith(prefix):
            for ending, piece in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                                  (".alpha", "alpha")):
                if key.endswith(ending):
                    return (part, key[len(prefix):-len(ending)].replace(".", "_")), piece
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
        second_encoder = getattr(pipe, "text_encoder_2", None)
        if second_encoder is None and any(update.part == "te2" for update in updates):
            raise LoraError(f"LoRA {entry.name} is made for SDXL (it changes a second text encoder); this model is "
                            "SD 1.x/2.x: pick an SDXL model, or a LoRA made for this one")
        layers = {"unet": _layers(pipe.unet, lambda name: sgm_name(name, pipe.unet.config)),
                  "te": _layers(pipe.text_encoder), "te2": _layers(second_encoder) if second_encoder else {}}
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
        try:
            delta = update.delta(weight.device)  # on the weight's device: a GPU multiplies faster than it copies
        except RuntimeError as err:  # pieces whose shapes do not multiply
            raise LoraError(f"LoRA {entry.name}: the {update.kind} pieces of layer {update.layer} do not fit "
                            f"together ({str(err)[:120]}); the file is damaged") from err
        delta = _fitted(entry, update, delta, weight)
        self._originals.setdefault(id(weight), (weight, weight.detach().to("cpu", copy=True)))
        weight.add_((delta * multiplier).to(weight.dtype))


def _fitted(entry: LoraFile, update: LayerUpdate, delta: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
    """The update (out, in * kernel) in the weight's shape. One made for a text-to-image model's first convolution
    (4 input channels) on an inpainting model's (9) or an instruct-pix2pix model's (8) leaves the extra channels
    alone, as A1111 pads it."""
    out_channels, kernel = weight.shape[0], weight.shape[2:]
    if delta.shape == (out_channels, weight[0].numel()):
        return delta.reshape(weight.shape)
    if weight.dim() == 4 and weight.shape[1] in (INPAINTING_CHANNELS, EDIT_CHANNELS) and delta.shape == (
            out_channels, 4 * math.prod(kernel)):
        padded = torch.zeros(weight.shape, dtype=delta.dtype, device=delta.device)
        padded[:, :4] = delta.reshape(out_channels, 4, *kernel)
        return padded
    raise LoraError(f"LoRA {entry.name} does not fit layer {update.layer} ({update.part}: {update.kind} "
                    f"{tuple(delta.shape)} vs weight {tuple(weight.shape)} as a matrix "
                    f"{(out_channels, weight[0].numel())}); it was made for another kind of model")


def _layers(model, other_name=None) -> dict[str, torch.nn.Module]:
    """Linear and Conv2d layers by kohya's name for them: the dotted module path with "_" for "."; also by
    other_name(path), where that gives one."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = name.replace("_orig_mod.", "")
            layers[name.replace(".", "_")] = module
            alias = other_name(name) if other_name else None
            if alias:
                layers.setdefault(alias.replace(".", "_"), module)
    return layers


# --- the UNet's layers as Stability's original code names them (kohya's SDXL LoRAs use these names) ---------
# input_blocks: 0 is conv_in, then each level's resnets (with their attentions beside them, at .1) and its
# downsampler; middle_block: resnet, attention, resnet; output_blocks: each level's resnets (one more than going
# down) with attentions at .1, the level's upsampler after its last resnet's parts.

_TOP_LEVEL_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_BLOCK = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def sgm_name(name: str, config) -> str | None:
    """The original-layout name of a diffusers UNet module (dotted), given the UNet's config; None for a module
    that layout does not name the same way, or a config with per-level layer counts."""
    if name in _TOP_LEVEL_SGM:
        return _TOP_LEVEL_SGM[name]
    per_level = config.layers_per_block
    if not isinstance(per_level, int):
        return None
    if match := _MID_BLOCK.fullmatch(name):
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        return _inside(f"middle_block.{1 if kind == 'attentions' else 2 * index}", kind, rest)
    match = _BLOCK.fullmatch(name)
    if match is None:
        return None
    way, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), \
        match.group(5)
    if way == "down":
        first = 1 + level * (per_level + 1)  # the level's resnets, then its downsampler
        if kind == "downsamplers":
            return f"input_blocks.{first + per_level}.0.op" if rest == "conv" else None
        return _inside(f"input_blocks.{first + index}.{1 if kind == 'attentions' else 0}", kind, rest)
    first = level * (per_level + 1)  # going up, a level has one resnet more, the upsampler inside the last
    if kind == "upsamplers":
        has_attention = "CrossAttn" in config.up_block_types[level]
        return f"output_blocks.{first + per_level}.{2 if has_attention else 1}.conv" if rest == "conv" else None
    return _inside(f"output_blocks.{first + index}.{1 if kind == 'attentions' else 0}", kind, rest)


def _inside(block: str, kind: str, rest: str) -> str | None:
    """A module inside a resnet (renamed) or an attention (named the same in both layouts)."""
    if kind == "attentions":
        return f"{block}.{rest}"
    renamed = _RESNET_SGM.get(rest)
    return f"{block}.{renamed}" if renamed else None
