"""The checkpoint merger, as A1111's tab of that name: a new model made from two or three, weight by weight.

- Weighted sum:     A + M (B - A), i.e. (1 - M) A + M B
- Add difference:   A + M (B - C), e.g. an inpainting version of a model: A = an inpainting model, B = the
                    model, C = the model both came from, M = 1
- No interpolation: A as it is (to turn a single file into a diffusers folder, or halve its size)

The UNet, text encoder and VAE are merged; the rest (tokenizer, scheduler, safety checker) is A's. As in A1111,
an inpainting A (9 input channels) merges its first 4 with a text-to-image B. A1111's "Discard weights" (a
regular expression) leaves the weights whose names match out of its file; a diffusers folder without a weight
loads it as random numbers, so here they are left out of the merge instead: they stay A's. A weight is named by
its part and its diffusers name ("unet.conv_in.weight", "text_encoder.text_model...", "vae.decoder...").

The result is written as a diffusers folder in the models folder (under a temporary name first, so a failed merge
leaves nothing), with the recipe in merge_recipe.json, and is listed with the other models from then on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from webui.config import Settings
from webui.engine.loader import Placement, read_pipeline
from webui.engine.models import EMBEDDINGS_FOLDER, LORA_FOLDER, SINGLE_FILE_SUFFIXES, VAE_FOLDER, ModelRegistry
from webui.engine.vae import NO_VAE, VaeError, VaeLibrary, read_vae_weights

log = logging.getLogger(__name__)

NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE = "No interpolation", "Weighted sum", "Add difference"
METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
MERGED_PARTS = ("unet", "text_encoder", "vae")
RECIPE_FILE = "merge_recipe.json"
MAX_NAME_BYTES = 200  # UTF-8: a file name holds 255, and the temporary name adds 18
MAX_PATTERN_CHARS = 1000
KINDS_HINT = "an SD 1.x model merges with SD 1.x models, an SD 2.x one with SD 2.x ones"
_NOT_IN_NAMES = re.compile(r"[/\\:*?\"<>|\x00-\x1f]")  # one folder name, valid on Windows too
_WINDOWS_DEVICES = re.compile(r"^(CON|PRN|AUX|NUL|COM\d|LPT\d)(\..*)?$", re.IGNORECASE)
NOT_A_MODEL_FOLDER = "that folder holds LoRAs, embeddings or VAEs, never models: choose another"
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-f]{8,10}\]$")  # "name [abc12345]": the registry reads it as a hash


class MergeError(ValueError):
    """A merge that cannot be made; the message says what to change."""


@dataclass(frozen=True)
class MergeRecipe:
    primary: str
    secondary: str | None = None
    tertiary: str | None = None
    method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_as_half: bool = False
    name: str = ""  # empty: named after the models and the method, as A1111 names it
    bake_in_vae: str = NO_VAE  # A1111's "Bake in VAE": a VAE file whose weights replace the merged VAE's
    discard_weights: str = ""  # A1111's "Discard weights": a regular expression; matching weights stay A's

    @property
    def bakes_vae(self) -> bool:
        return self.bake_in_vae not in ("", NO_VAE)

    def models_needed(self) -> list[tuple[str, str | None]]:
        """(role, model) for each model the method reads."""
        roles = [("primary model (A)", self.primary)]
        if self.method != NO_INTERPOLATION:
            roles.append(("secondary model (B)", self.secondary))
        if self.method == ADD_DIFFERENCE:
            roles.append(("tertiary model (C)", self.tertiary))
        return roles

    def folder_name(self) -> str:
        """The name given, else one made of the models' names as A1111 names its files (made fit for a folder)."""
        if self.name.strip():
            return self.name.strip()
        if self.method == NO_INTERPOLATION:
            made = f"{_stem(self.primary)}-merged"
        else:
            made = (f"{_stem(self.primary)}_{round(1 - self.multiplier, 2)}-{_stem(self.secondary)}_"
                    f"{round(self.multiplier, 2)}-{self.method.replace(' ', '_')}-merged")
        return _cut(_NOT_IN_NAMES.sub("_", made), MAX_NAME_BYTES)


def _stem(name: str | None) -> str:
    stem = Path(name or "").name
    for suffix in SINGLE_FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem


def _cut(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").rstrip(" .")


def check_recipe(recipe: MergeRecipe, models_dir: Path) -> Path:
    """The folder the merge will be written to; MergeError for a recipe that cannot be made."""
    if recipe.method not in METHODS:
        raise MergeError(f"interpolation method {recipe.method!r}: choose one of {', '.join(METHODS)}")
    for role, model in recipe.models_needed():
        if not model:
            raise MergeError(f"{recipe.method} needs a {role}: pick one")
    if not 0.0 <= recipe.multiplier <= 1.0:
        raise MergeError(f"multiplier {recipe.multiplier}: use a value from 0 to 1")
    if discard_pattern(recipe.discard_weights) and recipe.method == NO_INTERPOLATION:
        raise MergeError("Discard weights: with No interpolation every weight is A's already (here the weights it "
                         "names are kept from A, not left out): leave it empty, or pick another method")
    name = recipe.folder_name()
    problem = _name_problem(name)
    if problem:  # (cut on its bytes alone: its dots are what the problem may be about)
        raise MergeError(f"name {name.encode('utf-8')[:60].decode('utf-8', errors='ignore')!r}: {problem}")
    taken = [models_dir / name] + [models_dir / f"{name}{suffix}" for suffix in SINGLE_FILE_SUFFIXES]
    if any(path.exists() or path.is_symlink() for path in taken):
        raise MergeError(f"a model named {name!r} is in the models folder already: choose another name")
    return models_dir / name


def discard_pattern(text: str) -> re.Pattern | None:
    """Discard weights as a compiled pattern, searched for in each weight's name as A1111 does (None: empty);
    MergeError for one that is no regular expression."""
    text = text.strip()
    if not text:
        return None
    if len(text) > MAX_PATTERN_CHARS:
        raise MergeError(f"Discard weights: use at most {MAX_PATTERN_CHARS} characters")
    try:
        return re.compile(text)
    except re.error as err:
        raise MergeError(f"Discard weights {text[:100]!r} is no regular expression ({err}): fix it, or leave "
                         "it empty") from None


def _name_problem(name: str) -> str | None:
    """What keeps `name` from being a model folder's name that the registry lists and finds as itself."""
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"use at most {MAX_NAME_BYTES} bytes (a shorter custom name)"
    if _NOT_IN_NAMES.search(name) or name.startswith(".") or name.endswith((" ", ".")):
        return "use no / \\ : * ? \" < > |, and do not start it with a dot or end it with a dot or space"
    if _WINDOWS_DEVICES.match(name):
        return "that is a device name on Windows: choose another"
    if name.lower() in (LORA_FOLDER.lower(), EMBEDDINGS_FOLDER.lower(), VAE_FOLDER.lower()):
        return NOT_A_MODEL_FOLDER
    if name.lower().endswith(SINGLE_FILE_SUFFIXES):
        return "a folder named like a model file would be mistaken for one: leave the suffix out"
    if _HASH_SUFFIX.search(name):
        return "a name ending in [ and 8 to 10 hex digits ] reads as a model hash: choose another ending"
    return None


def merge_models(recipe: MergeRecipe, registry: ModelRegistry, settings: Settings) -> Path:
    """Make the merged model, write it into the models folder and list it; returns its folder."""
    target = check_recipe(recipe, registry.models_dir)
    if target.resolve() in _skipped(registry):  # --lora-dir or --embeddings-dir, named otherwise
        raise MergeError(f"name {target.name!r}: {NOT_A_MODEL_FOLDER}")
    entries = [registry.find_listed(model) for _role, model in recipe.models_needed()]
    if any(entry.path is not None and entry.path.resolve() in _skipped(registry) for entry in entries):
        raise MergeError("a model in the LoRA, embeddings or VAE folder cannot be merged")
    vaes = VaeLibrary(settings.vae_folder, registry)
    try:  # before the models are read: a misspelt name costs nothing
        baked = vaes.find(recipe.bake_in_vae) if recipe.bakes_vae else None
    except VaeError as err:
        raise MergeError(f"Bake in VAE: {str(err).removeprefix('sd_vae: ')}") from None
    # fp32 on the CPU: the sums keep their precision, and the GPU stays the worker's. A keeps its safety checker
    # (also under --disable-safety-checker, which is this server's choice, not the model's); B and C need none.
    placement = Placement(device="cpu", dtype=torch.float32)
    result = read_pipeline(entries[0], dataclasses.replace(settings, no_safety_checker=False), placement)
    discard = discard_pattern(recipe.discard_weights)
    discarded = _discarded_names(result, discard) if discard else []  # before B and C are read: a typo is cheap
    try:  # before B and C are read: a file that fits no VAE of A's kind costs one model's reading
        baked_weights = read_vae_weights(baked.path, result.vae) if baked is not None else None
    except VaeError as err:
        raise MergeError(f"Bake in VAE: {err}") from None
    without_checker = dataclasses.replace(settings, no_safety_checker=True)
    others = [_weights(read_pipeline(entry, without_checker, placement)) for entry in entries[1:]]
    for part in MERGED_PARTS:
        module = getattr(result, part)
        merged = merge_state(part, module.state_dict(), *[weights.pop(part) for weights in others],
                             method=recipe.method, multiplier=recipe.multiplier, kept_as_a=discard)
        module.load_state_dict(merged)  # B's and C's weights of this part were popped: let go, one part at a time
    if baked_weights is not None:
        result.vae.load_state_dict(baked_weights)
    if recipe.save_as_half:
        result.to(torch.float16)
    # The VAE's hash as the infotext's "VAE hash": its name alone may later mean another file.
    _write(result, recipe, target, {"bake_in_vae_hash": vaes.short_hash(baked) if baked is not None else None,
                                    "discarded_weights": len(discarded)})
    registry.refresh()
    log.info("merged %s into %s", " + ".join(entry.name for entry in entries), target)
    return target


def _discarded_names(pipe, discard: re.Pattern) -> list[str]:
    """The merged parts' weights that Discard weights names; MergeError, with names it could match, for none:
    a pattern made for A1111's names ("model_ema.", "first_stage_model.") would otherwise change nothing, unsaid."""
    names = [f"{part}.{key}" for part in MERGED_PARTS for key in getattr(pipe, part).state_dict()]
    found = [name for name in names if discard.search(name)]
    if not found:
        firsts = [next(name for name in names if name.startswith(f"{part}.")) for part in MERGED_PARTS]
        raise MergeError(f"Discard weights {discard.pattern[:100]!r} matches no weight of the model; weights "
                         f"are named by part and diffusers name, such as {', '.join(firsts)} (A1111's names, such "
                         "as model_ema. or first_stage_model., are not used here)")
    return found


def _skipped(registry: ModelRegistry) -> set[Path]:
    return {path.resolve() for path in registry.skipped}


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """The merged parts' weights of a pipeline read only for them (the rest of it is let go)."""
    return {part: getattr(pipe, part).state_dict() for part in MERGED_PARTS}


def merge_state(part: str, a: dict, b: dict | None = None, c: dict | None = None, *, method: str,
                multiplier: float, kept_as_a: re.Pattern | None = None) -> dict:
    """One part's merged weights (the formulas at the top of this file). Integer buffers stay A's, and so do the
    weights whose "<part>.<name>" kept_as_a finds (Discard weights)."""
    if method == NO_INTERPOLATION:
        return a
    others = {"B": b, "C": c} if method == ADD_DIFFERENCE else {"B": b}
    for name, other in others.items():
        missing = sorted(set(a) - set(other))
        if missing:
            raise MergeError(f"{part}: model {name} lacks {len(missing)} of A's weights (such as {missing[0]}): the "
                             f"models are of different kinds ({KINDS_HINT})")
    merged = {}
    for key, weight in a.items():
        if not weight.is_floating_point() or (kept_as_a and kept_as_a.search(f"{part}.{key}")):
            merged[key] = weight
            continue
        if method == ADD_DIFFERENCE and b[key].shape != c[key].shape:
            raise MergeError(f"{part}: {key} is {tuple(b[key].shape)} in B but {tuple(c[key].shape)} in C: B and C "
                             f"must be models of the same kind ({KINDS_HINT})")
        pull = b[key] - (c[key] if method == ADD_DIFFERENCE else _fitted(part, key, weight, b[key]))
        merged[key] = _added(part, key, weight, multiplier * pull.to(weight.dtype))
    return merged


def _fitted(part: str, key: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A's weight in B's shape: the first 4 input channels of an inpainting A for a text-to-image B."""
    return a if a.shape == b.shape else _first_channels(part, key, a, b)[:, :b.shape[1]]


def _added(part: str, key: str, a: torch.Tensor, pull: torch.Tensor) -> torch.Tensor:
    if a.shape == pull.shape:
        return a + pull
    merged = _first_channels(part, key, a, pull).clone()
    merged[:, :pull.shape[1]] += pull
    return merged


def _first_channels(part: str, key: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Check that A (9 input channels) is an inpainting model and B (4) a text-to-image one; else MergeError."""
    same_but_channels = a.ndim == b.ndim == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
    if same_but_channels and (a.shape[1], b.shape[1]) == (9, 4):
        return a
    if same_but_channels and (a.shape[1], b.shape[1]) == (4, 9):
        raise MergeError("to merge an inpainting model with a text-to-image one, make the inpainting model A")
    raise MergeError(f"{part}: {key} is {tuple(a.shape)} in A but {tuple(b.shape)} in the other model: the models "
                     f"are of different kinds ({KINDS_HINT})")


def remove_stale_partials(models_dir: Path, older_than: float = 24 * 3600) -> int:
    """Remove what merges killed halfway (the process ended, say, out of memory) left in the models folder: their
    hidden temporary folders, gigabytes each. Only those a day old: another server may be merging into the same
    folder now. Returns how many went."""
    removed = 0
    for partial in models_dir.glob(".partial-*"):
        try:
            if partial.is_dir() and time.time() - partial.stat().st_mtime > older_than:
                shutil.rmtree(partial)
                removed += 1
        except OSError as err:
            log.warning("could not remove %s, left by a merge that did not finish: %s", partial, err)
    return removed


def _write(pipe, recipe: MergeRecipe, target: Path, found: dict) -> None:
    """Write under a temporary name and rename at the end: a merge stopped halfway leaves no model behind. The
    recipe file holds the recipe and what the merge found out (`found`)."""
    partial = target.parent / f".partial-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        (partial / RECIPE_FILE).write_text(json.dumps({"type": "diffusers-webui", **asdict(recipe), **found},
                                                      indent=2))
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
