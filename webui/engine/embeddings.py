"""Textual inversion embeddings: words a prompt uses by file name ("EasyNegative"), as A1111 reads them.

Files come from the embeddings folder (models/embeddings, --embeddings-dir): A1111's .pt (string_to_param),
.safetensors (emb_params) and diffusers' learned_embeds.bin ({token: vector}). As in A1111, a prompt names an
embedding when its token ids contain the ids of the embedding's name (so "art" matches the word art, not the
"art" inside "cartoon"); those ids are swapped for new ids, one per vector, that point at new rows of the text
encoder's token table. The tokenizer itself is left as it is. Files made for another text encoder width
(SD 2.x on SD 1.x, SDXL) are skipped with the reason, as A1111 lists them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from webui.engine.models import file_stamp, files_under, sha256_file

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
HASH_DIGITS = 12  # A1111's "TI hashes"
# The tokenizer attribute holding the loaded model's embeddings by the first token id of their names (see
# token_groups): the tokenizer is what every prompt function is given, and it belongs to that one model.
MATCHES_ATTR = "embedding_matches"


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: torch.Tensor | None = None  # (count, width); None when the file could not be read
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_name: str | None = None
    skipped: str | None = None  # why it is not loaded, if it is not
    name_ids: tuple[int, ...] = ()  # the name's token ids, which a prompt's ids must contain
    vector_ids: tuple[int, ...] = ()  # the text encoder's rows that hold its vectors
    short_hash: str | None = None  # of the file as it was read: the vectors in use, whatever is on disk now
    stamp: tuple[int, int] = (0, 0)  # the file's size and time when read

    @property
    def summary(self) -> dict:
        """As A1111's /sdapi/v1/embeddings gives each."""
        return {"step": self.step, "sd_checkpoint": self.checkpoint, "sd_checkpoint_name": self.checkpoint_name,
                "shape": int(self.vectors.shape[-1]) if self.vectors is not None else None,
                "vectors": int(self.vectors.shape[0]) if self.vectors is not None else None}


@dataclass
class EmbeddingSet:
    """The embeddings loaded into one model's text encoder; `skipped` those that do not fit it (A1111 lists
    both). Files that hold no embedding at all are only logged."""
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)


def read_embedding(path: Path) -> Embedding:
    """One file's vectors and training notes; a file that holds none is returned with `skipped` saying why."""
    embedding = Embedding(path.stem, path)
    try:
        embedding.stamp = file_stamp(path)
        embedding.short_hash = file_hash(path)
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:  # weights_only: an embedding must not run code while it loads. Early trainers saved a
            # ParameterDict, which A1111 allows too.
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        embedding.skipped = f"unreadable ({type(err).__name__}); download it again"
        return embedding
    vectors = _vectors_of(data) if isinstance(data, dict) else None
    if vectors is None:
        embedding.skipped = "holds no embedding vectors (it may be a LoRA, an SDXL embedding or another file)"
        return embedding
    embedding.vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    embedding.step = data.get("step") if isinstance(data.get("step"), int) else None
    embedding.checkpoint = data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None
    name = data.get("sd_checkpoint_name")
    embedding.checkpoint_name = name if isinstance(name, str) else None
    return embedding


def _vectors_of(data: dict) -> torch.Tensor | None:
    params = data.get("string_to_param")
    params = getattr(params, "_parameters", params)  # a ParameterDict keeps its tensors there
    if isinstance(params, dict) and len(params) == 1:  # A1111's .pt
        vectors = next(iter(params.values()))
    elif isinstance(data.get("emb_params"), torch.Tensor):  # A1111's .safetensors
        vectors = data["emb_params"]
    else:  # diffusers' learned_embeds: one token ("<cat-toy>") -> its vector; a model's keys have dots
        [(key, vectors)] = data.items() if len(data) == 1 else [("", None)]
        vectors = None if "." in str(key) else vectors
    return vectors if isinstance(vectors, torch.Tensor) and vectors.ndim in (1, 2) else None


def load_embeddings(pipe, folder: Path, already: EmbeddingSet | None = None) -> EmbeddingSet:
    """Give every embedding in folder that fits this model's text encoder rows of its own, and return those
    loaded (with `already`'s, which a refresh keeps) and those skipped, with the reason."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    table = encoder.get_input_embeddings().weight
    if table.is_meta:  # --lowvram has offloaded it layer by layer: it cannot grow now
        log.warning("embeddings are read when a model loads, not while --lowvram offloads it; load the model again")
        return already or EmbeddingSet()
    width = table.shape[1]
    found = EmbeddingSet(dict(already.loaded) if already else {})
    new: list[Embedding] = []
    for path in files_under(folder, EMBEDDING_SUFFIXES):
        before = found.loaded.get(path.stem)
        if before is not None and (before.path != path or before.stamp == file_stamp(path)):
            if before.path != path and (already is None or path.stem not in already.loaded):
                log.warning("two embeddings are named %s: %s is used, %s is not; rename one", path.stem,
                            before.path, path)
            continue  # loaded already, unchanged (a file saved again is read again, into new rows)
        embedding = read_embedding(path)
        if embedding.skipped is not None:
            log.warning("embedding %s skipped: %s", path, embedding.skipped)
            continue
        embedding.name_ids = tuple(tokenizer(embedding.name, add_special_tokens=False).input_ids)
        if embedding.vectors.shape[1] != width:
            embedding.skipped = (f"made for a text encoder {embedding.vectors.shape[1]} wide; this model's is "
                                 f"{width} (an SD 2.x embedding on SD 1.x, or the reverse)")
            found.skipped[embedding.name] = embedding
        elif not embedding.name_ids:
            log.warning("embedding %s skipped: its name reads as no token", path)
        else:
            found.loaded[embedding.name] = embedding
            new.append(embedding)
    if new:
        _add_rows(encoder, new)
    setattr(tokenizer, MATCHES_ATTR, _matches(found.loaded.values()))
    return found


def _add_rows(encoder, embeddings: list[Embedding]) -> None:
    """One resize for all (each resize copies the whole table), then each embedding's vectors in its rows."""
    first = encoder.get_input_embeddings().weight.shape[0]
    total = sum(e.vectors.shape[0] for e in embeddings)
    encoder.resize_token_embeddings(first + total, mean_resizing=False)  # the new rows are written below
    table = encoder.get_input_embeddings().weight
    row = first
    with torch.no_grad():
        for embedding in embeddings:
            count = embedding.vectors.shape[0]
            embedding.vector_ids = tuple(range(row, row + count))
            table[row:row + count] = embedding.vectors.to(table.device, table.dtype)
            row += count


def _matches(embeddings) -> dict[int, list[Embedding]]:
    """By the first id of their names, longest name first: A1111 takes the longest match."""
    matches: dict[int, list[Embedding]] = {}
    for embedding in embeddings:
        matches.setdefault(embedding.name_ids[0], []).append(embedding)
    for candidates in matches.values():
        candidates.sort(key=lambda e: -len(e.name_ids))
    return matches


def match_at(tokenizer, ids: list[int], start: int) -> Embedding | None:
    """The embedding whose name's ids begin at ids[start], if one does."""
    for embedding in getattr(tokenizer, MATCHES_ATTR, {}).get(ids[start], ()):
        if tuple(ids[start:start + len(embedding.name_ids)]) == embedding.name_ids:
            return embedding
    return None


def token_groups(tokenizer, ids: list[int]) -> list[list[int]]:
    """The ids in groups that stay together in a chunk: an embedding's vector ids, or one ordinary token."""
    groups, at = [], 0
    while at < len(ids):
        embedding = match_at(tokenizer, ids, at) if getattr(tokenizer, MATCHES_ATTR, None) else None
        if embedding is None:
            groups.append([ids[at]])
            at += 1
        else:
            groups.append(list(embedding.vector_ids))
            at += len(embedding.name_ids)
    return groups


def used_embeddings(tokenizer, texts: list[str], loaded: dict[str, Embedding]) -> list[Embedding]:
    """The loaded embeddings these texts name, in the order of `loaded`."""
    if not getattr(tokenizer, MATCHES_ATTR, None):
        return []
    rows = {row for text in texts if text
            for group in token_groups(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)
            for row in group}
    return [e for e in loaded.values() if e.vector_ids and e.vector_ids[0] in rows]


def file_hash(path: Path) -> str:
    """A1111's TI hash: the file's sha256, 12 hex digits."""
    return sha256_file(path)[:HASH_DIGITS]
