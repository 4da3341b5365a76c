"""Textual inversion embeddings: words a prompt uses by file name ("EasyNegative"), as A1111 reads them.

Files come from the embeddings folder (models/embeddings, --embeddings-dir): A1111's .pt (string_to_param),
.safetensors (emb_params) and diffusers' learned_embeds.bin ({token: vector}). Each file's name becomes a new
token of the loaded model's tokenizer, its vectors new rows of the text encoder's token embedding; an
embedding of several vectors becomes its name followed by name_1, name_2, ..., so a weight such as
(EasyNegative:1.2) reaches every vector. Files made for another text encoder width (SD 2.x on SD 1.x, SDXL)
are skipped with the reason, as A1111 lists them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
HASH_DIGITS = 12  # A1111's "TI hashes"
# The tokenizer attribute that maps an embedding's first token id to all of its ids (see expand_ids): the
# tokenizer is what every prompt function is given, and these ids are its own added tokens.
VECTORS_ATTR = "embedding_token_ids"


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: torch.Tensor | None = None  # (count, width); None when the file could not be read
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_name: str | None = None
    skipped: str | None = None  # why it is not loaded, if it is not

    @property
    def summary(self) -> dict:
        """As A1111's /sdapi/v1/embeddings gives each."""
        return {"step": self.step, "sd_checkpoint": self.checkpoint, "sd_checkpoint_name": self.checkpoint_name,
                "shape": int(self.vectors.shape[-1]) if self.vectors is not None else None,
                "vectors": int(self.vectors.shape[0]) if self.vectors is not None else None}


@dataclass
class EmbeddingSet:
    """The embeddings loaded into one model's tokenizer and text encoder."""
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)


def scan(folder: Path) -> list[Path]:
    """Embedding files in folder and its subfolders; a missing folder has none."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in EMBEDDING_SUFFIXES
                  and path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def read_embedding(path: Path) -> Embedding:
    """One file's vectors and training notes; a file that holds none is returned with `skipped` saying why."""
    embedding = Embedding(path.stem, path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:  # weights_only: an embedding must not run code while it loads
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
    if isinstance(params, dict) and len(params) == 1:  # A1111's .pt
        vectors = next(iter(params.values()))
    elif isinstance(data.get("emb_params"), torch.Tensor):  # A1111's .safetensors
        vectors = data["emb_params"]
    else:  # diffusers' learned_embeds: one token ("<cat-toy>") -> its vector; a model's keys have dots
        [(key, vectors)] = data.items() if len(data) == 1 else [("", None)]
        vectors = None if "." in str(key) else vectors
    return vectors if isinstance(vectors, torch.Tensor) and vectors.ndim in (1, 2) else None


def load_embeddings(pipe, folder: Path) -> EmbeddingSet:
    """Add every embedding in folder that fits this model's text encoder to its tokenizer; the rest are
    skipped with the reason. Names already added stay as they are (a refresh adds new files only)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    width = encoder.get_input_embeddings().weight.shape[1]
    result = EmbeddingSet()
    known = getattr(tokenizer, VECTORS_ATTR, {})
    for path in scan(folder):
        embedding = read_embedding(path)
        if embedding.skipped is None and embedding.vectors.shape[1] != width:
            embedding.skipped = (f"made for a text encoder {embedding.vectors.shape[1]} wide; this model's is "
                                 f"{width} (an SD 2.x embedding on SD 1.x, or the reverse)")
        if embedding.skipped is None and not _is_new(tokenizer, embedding.name, known):
            embedding.skipped = "its name is a word the model already knows as one token, or was loaded already"
        if embedding.skipped is not None:
            result.skipped[embedding.name] = embedding
            continue
        _add(tokenizer, encoder, embedding)
        result.loaded[embedding.name] = embedding
    return result


def _is_new(tokenizer, name: str, known: dict) -> bool:
    ids = tokenizer(name, add_special_tokens=False).input_ids
    return not (len(ids) == 1 and (ids[0] in known or ids[0] >= tokenizer.vocab_size))


def _add(tokenizer, encoder, embedding: Embedding) -> None:
    count = embedding.vectors.shape[0]
    tokens = [embedding.name] + [f"{embedding.name}_{i}" for i in range(1, count)]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = embedding.vectors.to(table.device, table.dtype)
    mapping = getattr(tokenizer, VECTORS_ATTR, {})
    mapping[ids[0]] = ids
    setattr(tokenizer, VECTORS_ATTR, mapping)


def expand_ids(tokenizer, ids: list[int]) -> list[int]:
    """Token ids with each embedding's name token followed by its further vectors' tokens."""
    mapping = getattr(tokenizer, VECTORS_ATTR, None)
    if not mapping:
        return ids
    return [each for token in ids for each in mapping.get(token, [token])]


def used_embeddings(tokenizer, texts: list[str], loaded: dict[str, Embedding]) -> list[Embedding]:
    """The loaded embeddings these texts name, in the order of `loaded`."""
    mapping = getattr(tokenizer, VECTORS_ATTR, {})
    if not mapping or not loaded:
        return []
    ids = {token for text in texts if text for token in tokenizer(text, add_special_tokens=False).input_ids}
    first_ids = {tokenizer.convert_tokens_to_ids(name): name for name in loaded}
    return [loaded[name] for token, name in first_ids.items() if token in ids and token in mapping]


def short_hash(path: Path, cache: dict) -> str | None:
    """A1111's TI hash: the file's sha256, 12 hex digits (cached by size and time)."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in cache:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            cache[key] = digest.hexdigest()[:HASH_DIGITS]
        return cache[key]
    except OSError:
        return None
