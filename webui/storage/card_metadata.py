"""A1111's user metadata of an extra network: `<name>.json` beside its file (`my-lora.safetensors` ->
`my-lora.json`), a JSON object that A1111's card editor writes. The keys read here, in A1111's words:

    {"description": "...", "activation text": "trigger words", "preferred weight": 0.8,
     "negative text": "...", "notes": "...", "sd version": "SD1"}

A clicked LoRA card puts its tag in at the preferred weight (0: the Weight slider's), its activation text after it and
its negative text into the negative prompt. Other keys (A1111's extensions keep theirs there) are kept when saving.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from webui.storage.outputs import write_text_file

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000  # a note, not a book: a longer one is refused when saved (a file's own is read whole)
MAX_WEIGHT = 100.0  # far past any useful LoRA weight
MAX_FILE_BYTES = 1 << 20
# field -> A1111's key
KEYS = {"description": "description", "activation_text": "activation text", "preferred_weight": "preferred weight",
        "negative_text": "negative text", "notes": "notes", "sd_version": "sd version"}


@dataclass(frozen=True)
class CardMetadata:
    description: str = ""
    activation_text: str = ""
    preferred_weight: float = 0.0  # 0: the Weight slider's, as A1111's editor means it
    negative_text: str = ""
    notes: str = ""
    sd_version: str = ""

    def problem(self) -> str | None:
        """What to fix before this can be saved, if anything."""
        for name in KEYS:
            value = getattr(self, name)
            if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
                return f"{KEYS[name].capitalize()}: {len(value)} characters is too long; keep it to {MAX_TEXT_CHARS}"
        if not math.isfinite(self.preferred_weight) or abs(self.preferred_weight) > MAX_WEIGHT:
            return f"Preferred weight: {self.preferred_weight} is out of range; use -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} " \
                   "(0: the Weight slider's)"
        return None


def metadata_path(model_file: Path) -> Path:
    return model_file.with_suffix(".json")


def read_metadata(model_file: Path) -> CardMetadata:
    """The file's metadata; none (the defaults) when there is no such file or it cannot be read, with a log line
    saying why for a file that is there, since a card must still work. A value that does not read (a weight that is
    no number) is left out alone."""
    data = _read_object(metadata_path(model_file))
    fields = {}
    for name, key in KEYS.items():
        value = data.get(key)
        if name == "preferred_weight":
            value = _weight(value)
        elif value is not None:
            value = str(value)
        if value is not None:
            fields[name] = value
    return CardMetadata(**fields)


def write_metadata(model_file: Path, metadata: CardMetadata) -> Path:
    """The metadata into the file beside model_file, whole or not at all, keeping the keys it does not set. Raises
    ValueError saying what to fix (too long a text, a weight out of range), OSError where the folder is read-only."""
    problem = metadata.problem()
    if problem:
        raise ValueError(problem)
    path = Path(os.path.realpath(metadata_path(model_file)))  # a linked file stays a link: its target is written
    data = _read_object(path, strict=True) | {KEYS[name]: value for name, value in asdict(metadata).items()}
    write_text_file(path, json.dumps(data, indent=4, ensure_ascii=False))
    return path


def _read_object(path: Path, strict: bool = False) -> dict[str, Any]:
    """The JSON object in path ({} where there is none). One that cannot be read is logged and read as {}, or when
    `strict` (before saving over it) refused with an OSError, so that no hand-written file is lost."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("it holds no JSON object")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if strict:
            raise OSError(f"{path} cannot be read ({err}), so it is not saved over; fix or remove it") from None
        log.warning("the card metadata %s is not read (%s); the card goes on without it", path, err)
        return {}


def _weight(value: Any) -> float | None:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return None
    return weight if math.isfinite(weight) and abs(weight) <= MAX_WEIGHT else None
