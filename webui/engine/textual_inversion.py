"""Textual inversion (A1111's Train tab): a new embedding made from an initialization text, and an embedding's
vectors trained on pictures while the rest of the model stays frozen (the run itself: training.py).

An embedding is trained where prompts use it: loaded into the text encoder's token table (embeddings.py), its name
in a prompt reads as its rows there. A hook on that table's lookup puts the vectors being trained in place of those
rows, so the gradients reach them and nothing else.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from webui.engine.embeddings import Embedding
from webui.engine.sdxl import is_sdxl
from webui.engine.training import (
    TRAINED_SUFFIX, TrainingError, TrainingHooks, TrainingOutcome, TrainingPlan, prepare, run_training, save_whole,
)

MAX_VECTORS = 75  # A1111's slider: one chunk of the prompt
EMBEDDING_SUFFIX = TRAINED_SUFFIX  # what training reads and writes: A1111's layout


# --- a new embedding ----------------------------------------------------------------------------
def init_vectors(pipe, init_text: str, count: int) -> torch.Tensor:
    """`count` vectors from the token embeddings of `init_text`, as A1111 makes them: its first `count` tokens, each
    repeated in turn where it has fewer (two tokens over four vectors: a a b b); zeros for a text of no tokens."""
    if is_sdxl(pipe):  # its vectors would be CLIP-L's alone: an SD 1.x file, which SDXL models skip
        raise TrainingError("the loaded model is an SDXL model, which cannot create or train embeddings yet; load an "
                            "SD 1.x/2.x model to create one")
    table = pipe.text_encoder.get_input_embeddings().weight
    if table.is_meta:
        raise TrainingError("the model's token table is offloaded layer by layer (--lowvram): start without "
                            "--lowvram to create or train embeddings")
    ids = pipe.tokenizer(init_text, add_special_tokens=False).input_ids[:count]
    if not ids:
        return torch.zeros(count, table.shape[1])
    with torch.no_grad():
        rows = table[torch.tensor(ids, device=table.device)].float().cpu()
    return torch.stack([rows[i * len(ids) // count] for i in range(count)])


def write_embedding_file(path: Path, vectors: torch.Tensor, name: str, step: int,
                         checkpoint_hash: str | None = None, checkpoint_name: str | None = None) -> None:
    """The vectors in A1111's .pt layout (its loader reads string_to_param; string_to_token is what A1111 writes),
    written whole or not at all: a temporary file, then renamed (hidden meanwhile: the loader skips dot files)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().float().cpu().clone()},
            "name": name, "step": step, "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name}
    save_whole(path, data)


# --- training -------------------------------------------------------------------------------------
def train_embedding(engine, plan: TrainingPlan, hooks: TrainingHooks) -> TrainingOutcome:
    """Train the embedding `plan.name` on the loaded model, on the worker thread (training.run_training); its file
    is written back with the trained vectors and read again."""
    prepare(engine, plan)
    engine.refresh_embeddings()  # the file as it is now, and a new one made since the model loaded
    embedding = _embedding_named(engine.embeddings, plan.name)
    return run_training(engine, plan, hooks, _EmbeddingTrainee(engine.pipe, embedding, plan.name))


class _EmbeddingTrainee:
    """The embedding's vectors, trained in place of its rows of the token table."""

    def __init__(self, pipe, embedding: Embedding, name: str):
        self.embedding, self.name = embedding, name
        self.path, self.step = embedding.path, embedding.step or 0
        self.vectors = embedding.vectors.to(pipe._execution_device, torch.float32).clone().requires_grad_(True)
        self.parameters = [self.vectors]

    @contextlib.contextmanager
    def wired(self, pipe):
        """The embedding's rows read from the vectors wherever gradients are on; the rows put back after (a preview
        writes the vectors there; a run that fails writes no file)."""
        first_row = self.embedding.vector_ids[0]
        lookup = pipe.text_encoder.get_input_embeddings()
        rows = lookup.weight[first_row:first_row + self.vectors.shape[0]].detach().clone()
        hook = lookup.register_forward_hook(_rows_from(first_row, self.vectors))
        try:
            yield
        finally:
            hook.remove()
            with torch.no_grad():
                lookup.weight[first_row:first_row + len(rows)] = rows

    @contextlib.contextmanager
    def previewing(self, pipe):
        """A preview's inference reads the table itself: the vectors copied there (wired puts the rows back)."""
        table = pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[list(self.embedding.vector_ids)] = self.vectors.detach().to(table.device, table.dtype)
        yield

    def save(self, path: Path, step: int, model, copy: bool) -> None:
        name = f"{self.name}-{step}" if copy else self.name
        write_embedding_file(path, self.vectors, name, step, model.short_hash, model.entry.name)

    def reload(self, engine) -> None:
        engine.refresh_embeddings()


def _embedding_named(embeddings, name: str) -> Embedding:
    """The loaded embedding to train, from an A1111 .pt file (what training writes back)."""
    embedding = embeddings.loaded.get(name)
    if embedding is None:
        skipped = embeddings.skipped.get(name)
        why = f" ({skipped.skipped})" if skipped is not None else ""
        raise TrainingError(f"embedding_name: no embedding {name!r} fits the loaded model{why}; create one first "
                            "(Create embedding), or load the model it was made for")
    if embedding.path.suffix.lower() != EMBEDDING_SUFFIX:
        raise TrainingError(f"embedding_name: {name} is read from {embedding.path.name}; training writes A1111's "
                            f"{EMBEDDING_SUFFIX} files: create an embedding to train")
    return embedding



def _rows_from(first_row: int, vectors: torch.Tensor):
    """A forward hook on the token table: its rows first_row.. (the embedding's) looked up in `vectors` instead,
    while gradients are on (a preview's inference reads the table, into which the vectors are copied first)."""
    count = vectors.shape[0]

    def hook(_module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        offsets = inputs[0] - first_row
        inside = (offsets >= 0) & (offsets < count)
        if not inside.any():
            return None
        return torch.where(inside.unsqueeze(-1), vectors[offsets.clamp(0, count - 1)].to(output.dtype), output)

    return hook
