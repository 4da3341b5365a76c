"""Saved images' file names from A1111's "Images filename pattern" (its samples_filename_pattern setting):
`[seed]-[prompt_spaces]` names a picture 00012-1234-a cat on a mat.png. The tags are A1111's; a tag this
server does not know stays as written, as in A1111. Every part is cleaned of what a file name cannot hold
(a "/" among them), so a pattern never leaves the image folder."""
from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_PATTERN = "[seed]"  # A1111's, for an empty pattern in a subfolder...
DEFAULT_FLAT_PATTERN = "[seed]-[prompt_spaces]"  # ... and in the kind's folder itself
DEFAULT_FOLDER_PATTERN = "[date]"  # A1111's Directory name pattern
EMPTY_FOLDER_PATTERN = "[prompt_words]"  # what A1111 makes of an empty one
_FOLDER_BREAK = "\x00"  # a "/" of the folder pattern itself, while its tags are filled in
MAX_FOLDER_DEPTH = 4
MAX_PART_CHARS = 128  # of one tag's text, as A1111
MAX_NAME_BYTES = 200  # of the whole name in UTF-8: file systems take 255 bytes, and the number and extension come too
_SKIP_BEFORE = object()  # a tag's value that also drops the text just before it ([batch_number] alone)
PROMPT_WORDS = 8  # [prompt_words]
# A tag, with A1111's arguments: [datetime<%Y-%m-%d_%H-%M><Europe/Paris>]
_TAG = re.compile(r"\[(\w+)((?:<[^<>\[\]]*>)*)\]")
DEFAULT_TIME_FORMAT = "%Y%m%d%H%M%S"
_NOT_IN_NAMES = str.maketrans({ch: "_" for ch in '#<>:"/\\|?*\n\r\t\0'})


@dataclass(frozen=True)
class NameParts:
    """What a pattern's tags can say of one picture."""
    seed: int
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 0
    cfg_scale: float = 0.0
    width: int = 0
    height: int = 0
    sampler: str = ""
    scheduler: str = ""
    model_name: str = ""
    model_hash: str = ""
    clip_skip: int = 1
    denoising_strength: float | None = None
    batch_number: int = 0  # the picture's place in its batch
    batch_size: int = 1
    prompt_no_styles: str | None = None  # the prompt as given, before its styles were joined in (None: `prompt`)
    negative_no_styles: str | None = None  # likewise the negative prompt (None: `negative_prompt`)
    styles: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()  # the job's, first to last
    image_number: int = 0  # the picture's place in the job, counted from 0
    image_count: int = 1
    job_started: dt.datetime | None = None
    vae_file: str | None = None  # the VAE file the job ran with (None: the model's own)
    picture: Any = field(default=None, compare=False, repr=False)  # PIL image, for [image_hash]


def _clean(text: str, spaces: bool = True, limit: int | None = MAX_PART_CHARS) -> str:
    """text without what a file name cannot hold (spaces too, unless `spaces`), cut to `limit` characters."""
    if not spaces:
        text = text.replace(" ", "_")
    return text.translate(_NOT_IN_NAMES).lstrip(" ")[:limit].rstrip(" .")




def _datetime(now: dt.datetime, args: list[str]) -> str:
    """[datetime<format><time zone>], as A1111: strftime's format (the default when empty), in an IANA time zone
    (the server's when none, or one not known); a format that cannot be used gives the default format."""
    time_format = args[0] if args and args[0] else DEFAULT_TIME_FORMAT
    try:
        when = now.astimezone(ZoneInfo(args[1])) if len(args) > 1 else now
    except (ValueError, TypeError, KeyError, ZoneInfoNotFoundError):
        when = now
    try:
        return when.strftime(time_format)
    except (ValueError, TypeError):
        return when.strftime(DEFAULT_TIME_FORMAT)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[^\W_]+", text)[:PROMPT_WORDS]) or "empty"


def _short_hash(text: str, args: list[str]) -> str:
    """[prompt_hash<length>] and its kin: sha256 of the text, 8 digits unless the tag gives a length (A1111's)."""
    length = int(args[0]) if args and args[0].isdigit() else 8
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _schedule(scheduler: str) -> str:
    """[scheduler], as A1111 writes it: capitalised ("Karras", "Sgm uniform"); `scheduler` is the schedule that
    ran (Automatic resolved to the sampler's own where it has one)."""
    return _clean((scheduler or "Automatic").capitalize())


def _unstyled(parts: NameParts) -> tuple[str, str]:
    """The prompt and negative prompt before their styles were joined in."""
    return (parts.prompt if parts.prompt_no_styles is None else parts.prompt_no_styles,
            parts.negative_prompt if parts.negative_no_styles is None else parts.negative_no_styles)


def _has_prompt(prompt: str, args: list[str]) -> str:
    """[hasprompt<word|otherwise><...>], as A1111: each word (lower case) the prompt holds, else its
    `otherwise` text, else nothing."""
    found = []
    for arg in filter(None, args):
        word, _, otherwise = arg.partition("|")
        found.append(word.lower() if word.lower() in prompt.lower() else otherwise)
    return _clean("".join(found), spaces=False)  # as A1111's: spaces as underscores


def _image_hash(picture: Any, args: list[str]) -> str | None:
    """[image_hash<length>]: the sha256 of the pixels, as A1111; cut to length when given."""
    if picture is None:
        return None
    digest = hashlib.sha256(picture.tobytes()).hexdigest()
    return digest[:int(args[0])] if args and args[0].isdigit() else digest


def _vae_file_stem(name: str | None) -> str:
    """[vae_filename]: the VAE file's name without its extension ("NoneType" without one, as A1111 writes it)."""
    if not name:
        return "NoneType"
    pieces = Path(name).name.split(".")
    return _clean(pieces[1] if len(pieces) > 1 and pieces[0] == "" else pieces[0])


# A1111's tags: [prompt] has underscores for spaces, [prompt_spaces] keeps them.
_TAGS: dict[str, Callable[[NameParts, dt.datetime, list[str]], str]] = {
    "seed": lambda p, now, args: str(p.seed),
    "steps": lambda p, now, args: str(p.steps),
    "cfg": lambda p, now, args: str(float(p.cfg_scale)),  # 7.0, as A1111
    "width": lambda p, now, args: str(p.width),
    "height": lambda p, now, args: str(p.height),
    "sampler": lambda p, now, args: _clean(p.sampler),
    "scheduler": lambda p, now, args: _schedule(p.scheduler),
    "sampler_scheduler": lambda p, now, args: _clean(f"{p.sampler} {_schedule(p.scheduler)}"),  # "Euler a Automatic"
    "model_name": lambda p, now, args: _clean(p.model_name),
    "model_hash": lambda p, now, args: p.model_hash,
    "prompt": lambda p, now, args: _clean(p.prompt, spaces=False),
    "prompt_spaces": lambda p, now, args: _clean(p.prompt),
    "prompt_words": lambda p, now, args: _clean(_words(p.prompt)),
    "prompt_hash": lambda p, now, args: _short_hash(p.prompt, args),
    # as A1111: the negative prompt before its styles, and (full) both prompts so
    "negative_prompt_hash": lambda p, now, args: _short_hash(_unstyled(p)[1], args),
    "full_prompt_hash": lambda p, now, args: _short_hash(" ".join(_unstyled(p)), args),
    "clip_skip": lambda p, now, args: str(p.clip_skip),
    # none (txt2img): the text just before it goes too, as A1111's
    "denoising": lambda p, now, args: _SKIP_BEFORE if not p.denoising_strength else str(p.denoising_strength),
    # as A1111: counted from 1, and nothing (with the text before it) for a picture made alone
    "batch_number": lambda p, now, args: _SKIP_BEFORE if p.batch_size == 1 else str(p.batch_number + 1),
    "batch_size": lambda p, now, args: str(p.batch_size),
    "prompt_no_styles": lambda p, now, args: _clean(_unstyled(p)[0]),
    "hasprompt": lambda p, now, args: _has_prompt(p.prompt, args),
    "styles": lambda p, now, args: _clean(", ".join(s for s in p.styles if s != "None") or "None"),
    # as A1111: with batches of one, the picture's own seed, and no last seed (nor the text before it)
    "seed_first": lambda p, now, args: str(p.seeds[0] if p.seeds and p.batch_size > 1 else p.seed),
    "seed_last": lambda p, now, args: _SKIP_BEFORE if p.batch_size == 1 else str(p.seeds[-1] if p.seeds else p.seed),
    # as A1111: counted from 1 through the job's batches, and nothing (with the text before) for a lone picture
    "generation_number": lambda p, now, args: _SKIP_BEFORE if p.image_count == 1 else str(p.image_number + 1),
    "job_timestamp": lambda p, now, args: (p.job_started or now).strftime(DEFAULT_TIME_FORMAT),
    "image_hash": lambda p, now, args: _image_hash(p.picture, args),
    "vae_filename": lambda p, now, args: _vae_file_stem(p.vae_file),
    "date": lambda p, now, args: now.strftime("%Y-%m-%d"),
    "datetime": lambda p, now, args: _datetime(now, args),
    "none": lambda p, now, args: "",
}
TAGS = tuple(_TAGS)


def file_name_part(pattern: str, parts: NameParts, now: dt.datetime | None = None, in_subfolder: bool = True) -> str:
    """The name after the number (NNNNN-<this>.png): the pattern with its tags filled in, cleaned for a file
    system and cut to MAX_NAME_BYTES; "" (the number alone) where that leaves nothing, as A1111's [none]. An empty
    pattern is A1111's: [seed] in a subfolder, [seed]-[prompt_spaces] in the kind's folder itself."""
    default = DEFAULT_PATTERN if in_subfolder else DEFAULT_FLAT_PATTERN
    return _cut(_clean(_filled(pattern.strip() or default, parts, now or dt.datetime.now()), limit=None),
                MAX_NAME_BYTES).rstrip(" .")


def _filled(text: str, parts: NameParts, now: dt.datetime, folder_breaks: bool = False) -> str:
    """text with its tags filled in; with `folder_breaks`, each "/" (or "\\") of the text itself, not of a tag's
    value, becomes _FOLDER_BREAK."""
    def written(piece: str) -> str:
        return re.sub(r"[/\\]", _FOLDER_BREAK, piece) if folder_breaks else piece

    pieces, start = [], 0
    for match in _TAG.finditer(text):
        tag = _TAGS.get(match.group(1).lower())
        value = tag(parts, now, re.findall(r"<([^<>]*)>", match.group(2))) if tag else None
        if value is None:  # a tag this server does not know, or cannot fill here: as written, as A1111
            value = match.group(0)
        if value is not _SKIP_BEFORE:
            pieces += [written(text[start:match.start()]), value]
        start = match.end()
    pieces.append(written(text[start:]))
    return "".join(pieces)


def folder_parts(pattern: str, parts: NameParts, now: dt.datetime | None = None) -> list[str]:
    """A1111's "Directory name pattern": the subfolders to save in, one for each "/" the pattern itself has (a
    tag's own, as [datetime<%Y/%m>]'s, is cleaned as in a file name: it never makes a folder); a piece that comes
    out empty, "." or ".." is left out, so a pattern never leaves the image folder. At most MAX_FOLDER_DEPTH deep.
    An empty pattern is A1111's [prompt_words]."""
    now = now or dt.datetime.now()
    filled = _filled(pattern.strip() or EMPTY_FOLDER_PATTERN, parts, now, folder_breaks=True)
    folders = [_cut(_clean(piece, limit=None), MAX_NAME_BYTES).rstrip(" .") for piece in filled.split(_FOLDER_BREAK)]
    return [folder for folder in folders if folder not in ("", ".", "..")][:MAX_FOLDER_DEPTH]


def _cut(text: str, max_bytes: int) -> str:
    """text cut to max_bytes of UTF-8, at a character's end."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
