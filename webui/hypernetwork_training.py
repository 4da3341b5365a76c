"""A1111's Train tab for hypernetworks, between the page or the API and the engine
(webui/engine/hypernetwork_training.py does the torch work; webui/training.py holds what embeddings share).

- Create hypernetwork: NewHypernetwork (A1111's create_hypernetwork arguments) checked into a Structure and the
  file it makes in the hypernetworks folder. It needs no model, so it is made at once, not on the worker.
- Train: TrainHypernetwork (A1111's train_hypernetwork arguments) checked into a TrainingPlan (training.plan_run),
  which a TrainingRun runs on the worker.
"""
from __future__ import annotations

import datetime as dt
import math
import threading
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from webui.config import Settings
from webui.engine.hypernetwork_training import (
    DEFAULT_SIZES, OFFERED_ACTIVATIONS, WEIGHT_INITS, new_hypernetwork_state,
)
from webui.engine.hypernetworks import HYPERNETWORK_SUFFIXES, NO_HYPERNETWORK, Structure
from webui.engine.models import HYPERNETWORKS_FOLDER, files_by_name
from webui.engine.training import TrainingPlan, save_whole
from webui.schemas import InvalidRequest
from webui.training import TrainFields, TrainingRun, new_file_path, plan_run

MAX_SIZE = 8192  # a module's width: SD's are 320 to 1280
MAX_WEIGHTS = 500_000_000  # in one new file (2 GB): SD 1.x's 1, 2, 1 holds 22 million
_CREATING = threading.Lock()


# --- Create hypernetwork ---------------------------------------------------------------------------
class NewHypernetwork(BaseModel):
    """A1111's create_hypernetwork arguments (its API's fields), with its page's defaults."""
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="the hypernetwork's name, which prompts use (<hypernet:name>); also its file name "
                                  "(<name>.pt)")
    enable_sizes: list[int | str] = Field(list(DEFAULT_SIZES), description="the attention widths it gets networks "
                                          "for (A1111's Modules): 768, 320, 640, 1280 for SD 1.x; 1024 for SD 2.x")
    overwrite_old: bool = Field(False, description="replace a hypernetwork of this name (its file <name>.pt)")
    layer_structure: str | list[float] | None = Field("1, 2, 1", description="each layer's width as a multiple of "
                                                      "the module's, the first and the last 1")
    activation_func: str | None = Field("linear", description=f"one of {', '.join(OFFERED_ACTIVATIONS)}")
    weight_init: str | None = Field("Normal", description=f"one of {', '.join(WEIGHT_INITS)}")
    add_layer_norm: bool = Field(False, description="a layer normalization after each layer")
    use_dropout: bool = Field(False, description="dropout while it trains, by dropout_structure")
    dropout_structure: str | list[float] | None = Field("0, 0, 0", description="a dropout probability after each "
                                                        "layer, 0 to below 1, the first and the last 0")


def checked_new_hypernetwork(new: NewHypernetwork, folder: Path) -> tuple[Path, list[int], Structure, str]:
    """Where the new hypernetwork goes, its sizes, its structure and its weight initialization; InvalidRequest
    saying what to change."""
    if new.name.strip() == NO_HYPERNETWORK:
        raise InvalidRequest(f"name: {NO_HYPERNETWORK} stands for no hypernetwork in the lists, which leave a file of "
                             "that name out, so it could never be trained or used; pick another name")
    path = new_file_path(new.name, folder, HYPERNETWORK_SUFFIXES, "hypernetwork", new.overwrite_old)
    layers = _numbers(new.layer_structure or "1, 2, 1", "layer_structure")
    if len(layers) < 2 or layers[0] != 1 or layers[-1] != 1 or min(layers) <= 0:
        raise InvalidRequest(f"layer_structure: {_shown(new.layer_structure)} must start and end with 1 (the "
                             "module's own width), with widths above 0 between, such as 1, 2, 1")
    activation = new.activation_func or "linear"
    if activation not in OFFERED_ACTIVATIONS:
        raise InvalidRequest(f"activation_func: one of {', '.join(OFFERED_ACTIVATIONS)}; got {activation[:50]!r}")
    weight_init = new.weight_init or "Normal"
    if weight_init not in WEIGHT_INITS:
        raise InvalidRequest(f"weight_init: one of {', '.join(WEIGHT_INITS)}; got {weight_init[:50]!r}")
    dropout = [0.0] * len(layers)
    if new.use_dropout and new.dropout_structure not in (None, "", []):  # as A1111: no dropout_structure, none
        dropout = _numbers(new.dropout_structure, "dropout_structure")
        if len(dropout) != len(layers) or dropout[0] != 0 or dropout[-1] != 0 or not all(0 <= p < 1 for p in dropout):
            raise InvalidRequest(f"dropout_structure: {_shown(new.dropout_structure)} needs a probability for each of "
                                 f"the {len(layers)} layers of the layer structure, from 0 to below 1, the first and "
                                 "the last 0, such as 0, 0.1, 0")
    structure = Structure(tuple(layers), activation, new.add_layer_norm, tuple(dropout), activate_output=False)
    sizes = _sizes(new.enable_sizes)
    if min(sizes) * min(layers) < 1:
        raise InvalidRequest(f"layer_structure: a layer of {min(layers)} times a width of {min(sizes)} has no width; "
                             "use larger layers")
    weights = sum(2 * structure.parameter_count(size) for size in sizes)
    if weights > MAX_WEIGHTS:
        raise InvalidRequest(f"layer_structure: these layers for widths {', '.join(map(str, sizes))} hold "
                             f"{weights:,} weights; at most {MAX_WEIGHTS:,}: use smaller layers or fewer sizes")
    return path, sizes, structure, weight_init


def create_hypernetwork(new: NewHypernetwork, folder: Path, training: TrainingRun | None = None) -> Path:
    """Check the new hypernetwork (InvalidRequest) and write its file: its networks freshly initialized, as A1111
    makes them (their outputs near 0: it starts out changing little); step 0. Prompts find it by its name at once.
    `training`: the run training now (the worker's), whose hypernetwork is not replaced."""
    with _CREATING:  # Create runs on the server's threads: a name found free stays free until its file is written
        _refuse_training_now(new.name, training)
        path, sizes, structure, weight_init = checked_new_hypernetwork(new, folder)
        save_whole(path, new_hypernetwork_state(path.stem, sizes, structure, weight_init))
    return path


def _refuse_training_now(name: str, training: TrainingRun | None) -> None:
    # The run writes its file back when it ends, over the new one.
    if (training is not None and not training.finished and training.plan.kind == "hypernetwork"
            and training.plan.name == name.strip()):
        raise InvalidRequest(f"name: {name.strip()} is training now, and its file is written back when the training "
                             "ends, undoing this; Interrupt the training first, or pick another name")


def _numbers(value: str | list[float], field_name: str) -> list[float]:
    pieces = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [float(piece.strip() if isinstance(piece, str) else piece) for piece in pieces]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if not numbers or not all(math.isfinite(number) for number in numbers):
        raise InvalidRequest(f"{field_name}: {_shown(value)} is not numbers split by commas, such as 1, 2, 1")
    return numbers


def _sizes(values: list[int | str]) -> list[int]:
    try:
        sizes = sorted({int(str(value).strip()) for value in values})
    except ValueError:
        sizes = [0]
    if not sizes or not all(0 < size <= MAX_SIZE for size in sizes):
        raise InvalidRequest(f"enable_sizes: pick the widths to make networks for, whole numbers from 1 to {MAX_SIZE}: "
                             f"768, 320, 640, 1280 for SD 1.x; got {_shown(values)}")
    return sizes


def _shown(value) -> str:
    return repr(value if isinstance(value, str) else list(value or []))[:100]


def trainable_hypernetworks(folder: Path) -> list[str]:
    """The names of the hypernetworks folder's files, as prompts name them: what Train trains."""
    return sorted(files_by_name(folder, HYPERNETWORK_SUFFIXES, HYPERNETWORKS_FOLDER,
                                 left_out=(NO_HYPERNETWORK,)), key=str.lower)


# --- Train -----------------------------------------------------------------------------------------
class TrainHypernetwork(TrainFields):
    """A1111's train_hypernetwork arguments (its API's fields), with its page's defaults. Its preview_* fields (a
    preview from txt2img's settings) are not offered: previews draw the training prompt."""
    model_config = ConfigDict(extra="ignore")
    KIND: ClassVar[str] = "hypernetwork"
    NAME_FIELD: ClassVar[str] = "hypernetwork_name"
    SAVE_FIELD: ClassVar[str] = "save_hypernetwork_every"

    hypernetwork_name: str = Field(description="a hypernetwork of the hypernetworks folder (a .pt file)")
    learn_rate: str | float = Field("0.00001", description="a rate, or a schedule: 1e-5:100, 1e-6:1000, 1e-7 (each "
                                                           "rate until its step)")
    save_hypernetwork_every: int = Field(500, description="a copy of the hypernetwork every N steps (0: none)")


def plan_hypernetwork_training(train: TrainHypernetwork, settings: Settings, today: dt.date | None = None,
                               origin: str = "ui") -> TrainingPlan:
    """The run `train` asks for (from the page, "ui", or the API), checked before it is queued; InvalidRequest naming
    the field and what to change."""
    return plan_run(train, settings, trainable_hypernetworks(settings.hypernetwork_folder), today, origin)
