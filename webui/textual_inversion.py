"""A1111's Train tab for textual inversion, between the page or the API and the engine
(webui/engine/textual_inversion.py does the torch work; webui/training.py holds what hypernetworks share).

- Create embedding: NewEmbedding (A1111's create_embedding arguments) checked into the file it makes in the
  embeddings folder, then made on the worker (it needs the model's token table).
- Train: TrainEmbedding (A1111's train_embedding arguments) checked into a TrainingPlan (training.plan_run), which
  a TrainingRun runs on the worker.
"""
from __future__ import annotations

import datetime as dt
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from webui.config import Settings
from webui.engine.embeddings import EMBEDDING_SUFFIXES, read_embedding
from webui.engine.models import files_under
from webui.engine.textual_inversion import EMBEDDING_SUFFIX, MAX_VECTORS, init_vectors, write_embedding_file
from webui.engine.training import TrainingPlan
from webui.schemas import InvalidRequest
from webui.training import TrainFields, new_file_path, plan_run

if TYPE_CHECKING:
    from webui.worker import Worker


# --- Create embedding ------------------------------------------------------------------------------
class NewEmbedding(BaseModel):
    """A1111's create_embedding arguments (its API's fields)."""
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="the embedding's name, which prompts use; also its file name (<name>.pt)")
    init_text: str = Field("*", description="the words whose token vectors the new one starts from (repeated or cut "
                                            "to the number of vectors); empty: zeros")
    num_vectors_per_token: int = Field(1, description=f"vectors, 1 to {MAX_VECTORS}: each takes a token of the "
                                                      "prompt's 75")
    overwrite_old: bool = Field(False, description="replace an embedding of this name (its file <name>.pt)")


def new_embedding_file(new: NewEmbedding, folder: Path) -> Path:
    """Where the new embedding goes (<embeddings folder>/<name>.pt); InvalidRequest saying what to change."""
    path = new_file_path(new.name, folder, EMBEDDING_SUFFIXES, "embedding", new.overwrite_old)
    if not 1 <= new.num_vectors_per_token <= MAX_VECTORS:
        raise InvalidRequest(f"num_vectors_per_token: 1 to {MAX_VECTORS}, got {new.num_vectors_per_token}")
    return path


def queue_new_embedding(worker: "Worker", new: NewEmbedding, folder: Path) -> Future:
    """Check the new embedding here (InvalidRequest), then make it on the worker, which holds the model: the future
    of its file. It is read in at once, so prompts may use it."""
    new_embedding_file(new, folder)
    return worker.call(lambda engine: create_embedding(engine, new, folder),
                       activity=f"Creating embedding {new.name.strip()}")


def create_embedding(engine, new: NewEmbedding, folder: Path) -> Path:
    """Make the embedding's file (on the worker thread) and read it in: its vectors are the initialization text's
    token vectors; its step 0, as A1111's."""
    path = new_embedding_file(new, folder)  # again: another may have made one of this name meanwhile
    engine.restore_device()
    vectors = init_vectors(engine.pipe, new.init_text, new.num_vectors_per_token)
    write_embedding_file(path, vectors, new.name.strip(), step=0)
    engine.refresh_embeddings()
    return path


def trainable_embeddings(folder: Path) -> list[str]:
    """The names of the embeddings folder's A1111 .pt files: what Train trains (and writes back)."""
    return sorted({path.stem for path in files_under(folder, EMBEDDING_SUFFIXES)
                   if path.suffix.lower() == EMBEDDING_SUFFIX}, key=str.lower)


# --- Train -----------------------------------------------------------------------------------------
class TrainEmbedding(TrainFields):
    """A1111's train_embedding arguments (its API's fields), with its page's defaults."""
    model_config = ConfigDict(extra="ignore")
    KIND: ClassVar[str] = "embedding"
    NAME_FIELD: ClassVar[str] = "embedding_name"
    SAVE_FIELD: ClassVar[str] = "save_embedding_every"

    embedding_name: str = Field(description="an embedding of the embeddings folder (a .pt file)")
    save_embedding_every: int = Field(500, description="a copy of the embedding every N steps (0: none)")
    save_image_with_stored_embedding: bool = Field(True, description="accepted; previews carry no embedding here")


def plan_training(train: TrainEmbedding, settings: Settings, today: dt.date | None = None,
                  origin: str = "ui") -> TrainingPlan:
    """The run `train` asks for (from the page, "ui", or the API), checked before it is queued; InvalidRequest naming
    the field and what to change."""
    plan = plan_run(train, settings, trainable_embeddings(settings.embeddings_folder), today, origin)
    _refuse_unreadable(settings.embeddings_folder, plan.name)
    return plan


def _refuse_unreadable(folder: Path, name: str) -> None:
    """InvalidRequest where the embedding's file holds no vectors to read (damaged, or another kind of file): the
    worker would find no such embedding loaded and say that none fits the model."""
    path = next(path for path in files_under(folder, EMBEDDING_SUFFIXES)
                if path.stem == name and path.suffix.lower() == EMBEDDING_SUFFIX)
    embedding = read_embedding(path)
    if embedding.vectors is None:
        why = (embedding.skipped or "").split(";")[0]  # the reason, without the loader's advice
        raise InvalidRequest(f"embedding_name: {path.name} cannot be read as an embedding ({why}); replace the file, "
                             "or make it anew with Create embedding (Overwrite Old Embedding)")
