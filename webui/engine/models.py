"""The model registry: which models exist, under which names, with which short hash.

A model source is one of
  - a diffusers folder (has model_index.json) in the models folder or given as a path,
  - a single `.safetensors` / `.ckpt` file (A1111's checkpoint format),
  - a hub id such as `runwayml/stable-diffusion-v1-5`, downloaded when the network allows.
The short hash is the first 10 hex digits of the sha256 (A1111's "Model hash"); it is computed
once per file and cached on disk, keyed by size and modification time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HEX = re.compile(r"[0-9a-f]+")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what users pick: folder or file stem, or the hub id
    source: str  # a filesystem path or a hub id
    kind: str  # "diffusers" | "single_file" | "hub"

    @property
    def path(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.source)


class ModelNotFound(ValueError):
    pass


LEGACY_HASH_DIGITS = 8


def legacy_hash(path: Path) -> str | None:
    """The "Model hash" stable-diffusion-webui wrote before 1.0 (8 hex digits): the sha256 of the 64 KiB
    at 1 MiB into the file, so infotexts from 2022 still find their model. None if unreadable."""
    try:
        with path.open("rb") as file:
            file.seek(0x100000)
            return hashlib.sha256(file.read(0x10000)).hexdigest()[:LEGACY_HASH_DIGITS]
    except OSError:
        return None


class ModelRegistry:
    def __init__(self, models_dir: Path, hash_cache: Path, skipped: tuple[Path, ...] = ()):
        self.models_dir = Path(models_dir)
        self.skipped = skipped  # folders never listed as models: --lora-dir, --embeddings-dir, --vae-dir
        self.hash_cache = Path(hash_cache)
        self._entries: list[ModelEntry] = []
        self._kept: list[ModelEntry] = []  # listed though not in the folder: the model the server started with
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> list[ModelEntry]:
        """Rescan the models folder (the UI's refresh button and /refresh-checkpoints)."""
        entries = scan_models_dir(self.models_dir, self.skipped)
        with self._lock:
            self._entries = entries
        return self.entries()

    def entries(self) -> list[ModelEntry]:
        """The models folder's models, then those kept listed (keep_listed)."""
        with self._lock:
            return self._entries + [entry for entry in self._kept if entry not in self._entries]

    def lasting_name(self, entry: ModelEntry) -> str | None:
        """The name a later start finds a model of the models folder by, as A1111's settings file keeps it
        (sd_model_checkpoint): A1111's title, the file's path in the folder with its hash ("SD15/model.safetensors
        [6ce0161689]"), which A1111 reads too; a diffusers folder's name. None for a model from elsewhere (a
        --ckpt path or hub id: the next start is given it again, or starts as it would without)."""
        with self._lock:
            if entry not in self._entries:
                return None
        return self.title(entry)

    def keep_listed(self, entry: ModelEntry) -> None:
        """List a model from outside the models folder: the one the server started with (--ckpt with a path or a
        hub id, or the embedded model beside another models folder), so that it can be picked again after another,
        as A1111 lists its --ckpt file."""
        with self._lock:
            if entry not in self._kept:
                self._kept.append(entry)

    def find(self, name: str) -> ModelEntry:
        """Look a model up by name, A1111 title ("name [hash]"), file name, path or hub id."""
        wanted = re.sub(r"\s*\[[0-9a-f]{8,10}\]$", "", name.strip())
        for entry in self.entries():  # the name as given first: a model may be named "x [abcdef1234]" itself
            if name.strip() in (entry.name, entry.source, Path(entry.source).name):
                return entry
        for entry in self.entries():
            if wanted in (entry.name, entry.source, Path(entry.source).name):
                return entry
        # A1111 writes a checkpoint in a subfolder ("SD15/model") as its base name alone ("Model: model").
        same_base = [entry for entry in self.entries() if Path(entry.name).name == wanted]
        if len(same_base) == 1:
            return same_base[0]
        if (by_hash := self._find_hashed(wanted)) is not None:  # A1111's aliases: its short hash and sha256
            return by_hash
        path = Path(wanted).expanduser()
        for candidate in self._places_for(path):
            if _exists(candidate) and (entry := entry_for_path(candidate, self.models_dir)) is not None:
                return entry
        known = ", ".join(e.name for e in self.entries()) or "none found"
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:  # a checkpoint file's name, never a hub id
            raise ModelNotFound(f"model file {_shortened(str(path))!r} does not exist; check the path, or pick one of the "
                                f"models in {self.models_dir}: {known}")
        if _HUB_ID.match(wanted) and not _exists(path):
            return ModelEntry(name=wanted, source=wanted, kind="hub")
        raise ModelNotFound(
            f"model {_shortened(name)!r} not found in {self.models_dir}; available: {known}. "
            "Put a diffusers folder or a .safetensors file there, or give a hub id like org/name."
        )

    def _places_for(self, path: Path) -> list[Path]:
        """Where a path a user typed may be: as given (from the working folder), inside the models folder, and,
        for one that starts with the models folder's own name ("models/x" typed from another working folder),
        beside the models folder, so it is never taken for the hub id "models/x"."""
        places = [path, self.models_dir / path]
        if not path.is_absolute() and path.parts[:1] == (self.models_dir.name,):
            places.append(self.models_dir.parent / path)
        return places

    def find_listed(self, name: str, loaded: ModelEntry | None = None) -> ModelEntry:
        """Like find(), but only a model of the models folder (or the one loaded now): what a
        remote user may pick, never an arbitrary server path or a multi-GB hub download.
        The folder is rescanned once before giving up."""
        for rescan in (False, True):
            listed = self.refresh() if rescan else self.entries()
            try:
                entry = self.find(name)
            except ModelNotFound:
                continue
            # A listed file deleted since the last scan is not there any more: rescan, then say so.
            if entry == loaded or (entry in listed and (entry.path is None or entry.path.exists())):
                return entry
        available = ", ".join(e.name for e in self.entries()) or "none found"
        raise ModelNotFound(f"model {_shortened(name)!r} not found in the models folder; available: {available}")

    def find_by_hash(self, short_hash: str) -> ModelEntry | None:
        """The listed model with this short hash ("Model hash" in an infotext), among those hashed already:
        hashing every file of a models folder to answer would take minutes."""
        wanted = short_hash.strip().lower()
        if not wanted:
            return None
        if len(wanted) == LEGACY_HASH_DIGITS:  # stable-diffusion-webui before 1.0: cheap, so always computed
            return next((e for e in self.entries() if e.kind == "single_file" and legacy_hash(e.path) == wanted), None)
        return next((e for e in self.entries() if self.short_hash(e, cached_only=True) == wanted), None)

    def _find_hashed(self, wanted: str) -> ModelEntry | None:
        """The model whose short hash (10 hex digits) or sha256 (64) this is, among those hashed already."""
        wanted = wanted.lower()
        if len(wanted) == 10 and _HEX.fullmatch(wanted):
            return self.find_by_hash(wanted)
        if len(wanted) == 64 and _HEX.fullmatch(wanted):
            return next((e for e in self.entries() if self.sha256(e, cached_only=True) == wanted), None)
        return None

    def short_hash(self, entry: ModelEntry, cached_only: bool = False) -> str | None:
        """A1111's short hash: the first 10 hex digits of sha256()."""
        digest = self.sha256(entry, cached_only)
        return digest[:10] if digest else None

    def sha256(self, entry: ModelEntry, cached_only: bool = False) -> str | None:
        """The model's sha256 (A1111's sd_checkpoint_hash); None for hub models (their files sit in the hub's
        cache, never hashed here), unreadable files, or (with cached_only) files not hashed yet, since
        hashing a multi-GB file takes many seconds."""
        if entry.kind == "hub":
            return None
        try:
            digests = [self._file_digest(f, cached_only) for f in weight_files(entry.path)]
        except OSError:
            return None
        if not digests or None in digests:
            return None
        if len(digests) == 1:
            return digests[0]
        # A diffusers folder has several weight files: hash their digests in path order.
        return hashlib.sha256("".join(digests).encode()).hexdigest()

    def title(self, entry: ModelEntry) -> str:
        """A1111's "name [hash]" (a single file's name with its extension: "SD15/model.safetensors [6ce0161689]"),
        with the hash only when it is already known."""
        name = entry.name + (entry.path.suffix if entry.kind == "single_file" and entry.path else "")
        digest = self.short_hash(entry, cached_only=True)
        return f"{name} [{digest}]" if digest else name

    def _file_digest(self, file: Path, cached_only: bool) -> str | None:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        with self._lock:
            cached = self._read_cache().get(key)
        if cached or cached_only:
            return cached
        digest = sha256_file(file)
        with self._lock:  # request threads and the worker may add hashes at the same time
            cache = self._read_cache()
            cache[key] = digest
            try:
                self._write_cache(cache)
            except OSError as err:  # a full disk, a read-only folder: the digest is right all the same
                log.warning("the model hash cache %s cannot be written (%s), so %s is hashed again at its next "
                            "load; free some disk space or make the folder writable", self.hash_cache, err, file)
        return digest

    def _read_cache(self) -> dict[str, str]:
        """The cache's {key: sha256}; empty when the file is missing, damaged or not a JSON object."""
        try:
            cache = json.loads(self.hash_cache.read_text())
        except (OSError, ValueError):
            return {}
        return cache if isinstance(cache, dict) else {}

    def _write_cache(self, cache: dict[str, str]) -> None:
        self.hash_cache.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".hashes-", dir=self.hash_cache.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(cache, handle, indent=1)
            os.replace(temp, self.hash_cache)
        except BaseException:
            Path(temp).unlink(missing_ok=True)  # no half-written temp file left behind
            raise


# Subfolders are scanned this deep (A1111 users sort checkpoints into folders); a diffusers folder is
# one model and never looked inside.
SCAN_DEPTH = 3


# The models folder's LoRA, embeddings, VAE, upscaler and Interrogate folders hold .safetensors files that are not checkpoints.
LORA_FOLDER = "Lora"
EMBEDDINGS_FOLDER = "embeddings"
VAE_FOLDER = "VAE"
ESRGAN_FOLDER, REAL_ESRGAN_FOLDER = "ESRGAN", "RealESRGAN"
BLIP_FOLDER, CLIP_FOLDER = "BLIP", "CLIP"  # Interrogate's models, in transformers' layout
CONTROLNET_FOLDER = "ControlNet"  # sd-webui-controlnet's models (webui/engine/controlnet.py)
HYPERNETWORKS_FOLDER = "hypernetworks"  # A1111's (webui/engine/hypernetworks.py)
GFPGAN_FOLDER, CODEFORMER_FOLDER = "GFPGAN", "Codeformer"  # Restore faces' files (webui/engine/face_restoration.py)
TAESD_FOLDER = "VAE-taesd"  # the TAESD live preview's decoders (webui/engine/preview.py)


def scan_models_dir(models_dir: Path, skipped_folders: tuple[Path, ...] = ()) -> list[ModelEntry]:
    if not models_dir.is_dir():
        return []
    skipped = {models_dir / folder for folder in (LORA_FOLDER, EMBEDDINGS_FOLDER, VAE_FOLDER, ESRGAN_FOLDER,
                                                  REAL_ESRGAN_FOLDER, BLIP_FOLDER, CLIP_FOLDER, CONTROLNET_FOLDER,
                                                  HYPERNETWORKS_FOLDER, GFPGAN_FOLDER, CODEFORMER_FOLDER, TAESD_FOLDER)}
    skipped |= set(map(Path, skipped_folders))
    return _scan(models_dir, models_dir, SCAN_DEPTH, skipped)


def _scan(folder: Path, models_dir: Path, depth: int, skipped: set[Path]) -> list[ModelEntry]:
    entries = []
    try:
        children = sorted(folder.iterdir())
    except OSError:  # an unreadable folder (lost+found on a mounted volume): skip it, list the rest
        return entries
    for path in children:
        if path.name.startswith(".") or path in skipped or is_vae_beside_model(path):
            continue
        entry = entry_for_path(path, models_dir)
        if entry is not None:
            entries.append(entry)
        elif depth > 1 and _is_folder(path):
            entries.extend(_scan(path, models_dir, depth - 1, skipped))
    return entries


def is_vae_beside_model(path: Path) -> bool:
    """A1111's VAE for the checkpoint beside it, `<model>.vae.safetensors` (.pt, .ckpt): a VAE, never a model."""
    name = path.name.lower()
    return any(name.endswith(f".vae{suffix}") for suffix in (".safetensors", ".pt", ".ckpt"))


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def entry_for_path(path: Path, models_dir: Path | None = None) -> ModelEntry | None:
    """The model at path, if it is one. Inside models_dir its name is its path relative to it
    ("SD15/my-model"), so a model has one name however it is found. Paths are made absolute but symlinks
    are kept, as A1111 does: a link's own name and extension count (a link into the Hugging Face cache
    points at an extension-less blob), and relative and absolute spellings of one model are one entry."""
    try:
        if path.is_dir() and (path / "model_index.json").exists():
            kind, named = "diffusers", path
        elif path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            kind, named = "single_file", path.with_suffix("")
        else:
            return None
    except OSError:
        return None
    absolute, name = _absolute(path), named.name
    if models_dir is not None:
        relative = os.path.relpath(_absolute(named), _absolute(models_dir))
        if not relative.startswith(os.pardir):
            name = Path(relative).as_posix()
    return ModelEntry(name=name, source=str(absolute), kind=kind)


def _absolute(path: Path) -> Path:
    """An absolute, normalised path ('..' folded) without following symlinks."""
    return Path(os.path.abspath(path))


def weight_files(path: Path) -> list[Path]:
    """The weights a model loads, which its short hash covers. For a diffusers folder: those in its component
    folders (unet/, vae/, ...), not variants (*.fp16.safetensors) nor the single-file checkpoints a cloned
    repository also holds at its top (tens of GB to hash for nothing); .safetensors before .bin, as diffusers."""
    if path.is_file():
        return [path]
    files = []
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        weights = [f for f in component.iterdir()
                   if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES and f.name.count(".") == 1]
        files += sorted([f for f in weights if f.suffix.lower() == ".safetensors"] or weights)
    return files


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path) -> tuple[int, int]:
    """A file's size and modification time, to tell when it was saved again; (0, 0) if it is gone."""
    try:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    except OSError:
        return 0, 0


def files_by_name(folder: Path, suffixes: tuple[str, ...], what: str, left_out: tuple[str, ...] = ()) -> dict[str, Path]:
    """The files under folder (files_under) by the name a prompt calls them: their stem. Of two with one name the
    first is kept and the other logged (`what`: "LoRAs", "hypernetworks"); stems in `left_out` are skipped."""
    files: dict[str, Path] = {}
    for path in files_under(folder, suffixes):
        if path.stem in left_out:
            continue
        if path.stem in files:
            log.warning("two %s are named %s: %s is used, %s is not; rename one", what, path.stem, files[path.stem],
                        path)
            continue
        files[path.stem] = path
    return files


def files_under(folder: Path, suffixes: tuple[str, ...], seen: set[Path] | None = None) -> list[Path]:
    """Files with these suffixes in folder and its subfolders at any depth (LoRAs, embeddings), hidden ones left
    out; a linked folder is followed once (users link their collections in), so a link to a folder above ends
    instead of looping. A missing or unreadable folder has none."""
    seen = set() if seen is None else seen
    try:
        real = folder.resolve()
        children = sorted(folder.iterdir())
    except OSError:
        return []
    if real in seen:
        return []
    seen.add(real)
    found = []
    for path in children:
        if path.name.startswith("."):
            continue
        try:
            if path.suffix.lower() in suffixes and path.is_file():
                found.append(path)
            elif path.is_dir():
                found.extend(files_under(path, suffixes, seen))
        except OSError:
            continue
    return found


def _exists(path: Path) -> bool:
    """Path.exists, but False for a name the OS refuses outright (over 255 bytes, say) rather than an error."""
    try:
        return path.exists()
    except OSError:
        return False


def _shortened(name: str, limit: int = 200) -> str:
    """A name as an error message quotes it: a client's 5,000-character name would bury the message."""
    return name if len(name) <= limit else name[:limit] + "..."
