"""Textual inversion embeddings: words a prompt uses by file name ("EasyNegative"), as A1111 reads them.

Files come from the embeddings folder (models/embeddings, --embeddings-dir): A1111's .pt (string_to_param),
.safetensors (emb_params) and diffusers' learned_embeds.bin ({token: vector}). As in A1111, a prompt names an
embedding when its token ids contain the ids of the embedding's name (so "art" matches the word art, not the
"art" inside "cartoon"); those ids are swapped for new ids, one per vector, that point at new rows of the text
encoder's token table. The tokenizer itself is left as it is.

SDXL embeddings are A1111's .safetensors with two tensors of as many vectors: "clip_l" for the first text encoder
(CLIP-L) and "clip_g" for the second (OpenCLIP bigG). An SDXL model gets each embedding's rows in both encoders' tables
at the same ids, so one match table serves both tokenizers (they share one vocabulary) and a chunk's ids read the
right rows in each. Files that do not fit the model (SD 2.x on SD 1.x, an SD one on SDXL or the reverse, widths or
counts that do not match) are skipped with the reason, as A1111 lists them.
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
    vectors: torch.Tensor | None = None  # (count, width); None when the file could not be read. SDXL's: clip_l
    vectors_2: torch.Tensor | None = None  # an SDXL embedding's for the second text encoder (clip_g), else None
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_name: str | None = None
    skipped: str | None = None  # why it is not loaded, if it is not
    name_ids: tuple[int, ...] = ()  # the name's token ids, which a prompt's ids must contain
    vector_ids: tuple[int, ...] = ()  # the text encoder's rows that hold its vectors
    short_hash: str | None = None  # of the file as it was read: the vectors in use, whatever is on disk now
    stamp: tuple[int, int] = (0, 0)  # the file's size and time when read

    @property
    def sdxl(self) -> bool:
        return self.vectors_2 is not None

    @property
    def summary(self) -> dict:
        """As A1111's /sdapi/v1/embeddings gives each: an SDXL one's shape is its two widths added (2048), as in
        A1111, whose SDXL models expect that width."""
        shape = None if self.vectors is None else int(self.vectors.shape[-1]) + (
            int(self.vectors_2.shape[-1]) if self.sdxl else 0)
        return {"step": self.step, "sd_checkpoint": self.checkpoint, "sd_checkpoint_name": self.checkpoint_name,
                "shape": shape, "vectors": int(self.vectors.shape[0]) if self.vectors is not None else None}


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
    vectors, vectors_2 = _sdxl_vectors_of(data) if isinstance(data, dict) else (None, None)
    if vectors is None:
        vectors = _vectors_of(data) if isinstance(data, dict) else None
    if vectors is None:
        embedding.skipped = "holds no embedding vectors (it may be a LoRA or another file)"
        return embedding
    embedding.vectors = _rows(vectors)
    embedding.vectors_2 = None if vectors_2 is None else _rows(vectors_2)
    embedding.step = data.get("step") if isinstance(data.get("step"), int) else None
    embedding.checkpoint = data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None
    name = data.get("sd_checkpoint_name")
    embedding.checkpoint_name = name if isinstance(name, str) else None
    return embedding


def _rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.detach().float().reshape(-1, vectors.shape[-1])


def _sdxl_vectors_of(data: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An SDXL embedding's (clip_l, clip_g), or (None, None) for a file of another kind."""
    pair = data.get("clip_l"), data.get("clip_g")
    if all(isinstance(vectors, torch.Tensor) and vectors.ndim in (1, 2) for vectors in pair):
        return pair
    return None, None


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


@dataclass
class _TextEncoder:
    """One of the model's text encoders, its tokenizer, and which Embedding field holds the vectors for it."""
    tokenizer: object
    encoder: object
    vectors_attr: str  # "vectors" or "vectors_2"
    name: str  # in messages: an SDXL model's are named as A1111's SDXL files name their tensors

    @property
    def table(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight


def _text_encoders(pipe) -> list[_TextEncoder]:
    """An SD model's text encoder; an SDXL model's two (its second is what makes it SDXL, as sdxl.is_sdxl says); an
    SDXL refiner's second alone."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return [_TextEncoder(pipe.tokenizer, pipe.text_encoder, "vectors", "text encoder")]
    first = [_TextEncoder(pipe.tokenizer, pipe.text_encoder, "vectors", "clip_l")] if pipe.text_encoder else []
    return [*first, _TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, "vectors_2", "clip_g")]


def load_embeddings(pipe, folder: Path, already: EmbeddingSet | None = None) -> EmbeddingSet:
    """Give every embedding in folder that fits this model's text encoders rows of its own, and return those
    loaded (with `already`'s, which a refresh keeps) and those skipped, with the reason."""
    encoders = _text_encoders(pipe)
    # --lowvram has offloaded a table layer by layer: it cannot grow now
    if any(encoder.table.is_meta for encoder in encoders):
        log.warning("embeddings are read when a model loads, not while --lowvram offloads it; load the model again")
        return already or EmbeddingSet()
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
        embedding.name_ids = tuple(encoders[0].tokenizer(embedding.name, add_special_tokens=False).input_ids)
        embedding.skipped = _misfit(embedding, encoders)
        if embedding.skipped is not None:
            found.skipped[embedding.name] = embedding
        elif not embedding.name_ids:
            log.warning("embedding %s skipped: its name reads as no token", path)
        else:
            found.loaded[embedding.name] = embedding
            new.append(embedding)
    if new:
        _add_rows(encoders, new)
    matches = _matches(found.loaded.values())
    for encoder in encoders:  # the same ids name the same rows in each encoder (_add_rows)
        setattr(encoder.tokenizer, MATCHES_ATTR, matches)
    return found


def _misfit(embedding: Embedding, encoders: list[_TextEncoder]) -> str | None:
    """Why the embedding does not fit the model whose text encoders these are, or None when it does."""
    widths = [int(encoder.table.shape[1]) for encoder in encoders]
    if encoders[-1].vectors_attr == "vectors":  # an SD model's one encoder
        if embedding.sdxl:
            return (f"an SDXL embedding (clip_l and clip_g); this model is SD 1.x/2.x, with one text encoder "
                    f"{widths[0]} wide: load an SDXL model to use it")
        if embedding.vectors.shape[1] != widths[0]:
            return (f"made for a text encoder {embedding.vectors.shape[1]} wide; this model's is {widths[0]} wide "
                    "(an SD 2.x embedding on SD 1.x, or the reverse)")
        return None
    if not embedding.sdxl:
        return (f"made for SD 1.x/2.x (one text encoder, {embedding.vectors.shape[1]} wide); this SDXL model reads "
                "SDXL embeddings (clip_l and clip_g): load an SD 1.x/2.x model to use it")
    if embedding.vectors.shape[0] != embedding.vectors_2.shape[0]:
        return (f"its clip_l holds {embedding.vectors.shape[0]} vectors and its clip_g {embedding.vectors_2.shape[0]}; "
                "both must hold as many (the file is damaged or not an A1111 SDXL embedding)")
    for encoder, width in zip(encoders, widths):
        got = getattr(embedding, encoder.vectors_attr).shape[1]
        if got != width:
            return (f"its {encoder.name} is {got} wide; this model's is {width} wide (an embedding made for "
                    "another kind of model)")
    ids = [tuple(encoder.tokenizer(embedding.name, add_special_tokens=False).input_ids) for encoder in encoders]
    if len(set(ids)) > 1:  # one match table serves both tokenizers
        return "its name reads as other tokens in the second tokenizer than in the first; rename it"
    return None


def _add_rows(encoders: list[_TextEncoder], embeddings: list[Embedding]) -> None:
    """One resize of each table for all (each resize copies the whole table), then each embedding's vectors in its
    rows, at the same ids in every table: rows past the end of a table shorter than another's stay unused."""
    first = max(encoder.table.shape[0] for encoder in encoders)
    total = sum(e.vectors.shape[0] for e in embeddings)
    for encoder in encoders:
        encoder.encoder.resize_token_embeddings(first + total, mean_resizing=False)  # the new rows are written below
        _pool_at_end_marker(encoder)
        table = encoder.table
        row = first
        with torch.no_grad():
            for embedding in embeddings:
                count = embedding.vectors.shape[0]
                table[row:row + count] = getattr(embedding, encoder.vectors_attr).to(table.device, table.dtype)
                row += count
    row = first
    for embedding in embeddings:
        embedding.vector_ids = tuple(range(row, row + embedding.vectors.shape[0]))
        row += len(embedding.vector_ids)


def _pool_at_end_marker(encoder: _TextEncoder) -> None:
    """The encoder's pooled output (SDXL's pooled vector, from its second encoder) read at each chunk's end marker.
    Configs with eos_token_id 2 (SD's and SDXL's published ones) make transformers read it at the highest id,
    which is an embedding's row once the table has grown; A1111 reads the end marker."""
    text_model = getattr(encoder.encoder, "text_model", None)
    end = getattr(encoder.tokenizer, "eos_token_id", None)
    if text_model is not None and end is not None and getattr(text_model, "eos_token_id", None) != end:
        text_model.eos_token_id = end


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
