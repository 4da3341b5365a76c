"""Image files under outputs/, named and laid out as stable-diffusion-webui does.

    outputs/txt2img-images/YYYY-MM-DD/NNNNN-<seed>.png   (counter continues across restarts; the settings'
                                                          file name pattern may name more than the seed, and
                                                          their Directory name pattern other folders than the day)
    outputs/txt2img-grids/YYYY-MM-DD/grid-NNNN.png
    outputs/extras-images/NNNNN.png                      (Extras: pictures resized; no day folders, as in A1111)
    <img2img Batch's Output directory>/<picture's name>.png  (a copy; see save_named)

PNG by default, with the infotext in the text chunk `parameters`; the settings (storage/options.py) may choose
JPEG or WebP, with the infotext in the EXIF UserComment, as A1111 writes them.

Every file is written under a temporary name and linked to a free number, so a crash never leaves a
half-written PNG under a real name (the temporary file is removed at the next start), and a file is never
overwritten. Two servers writing to one folder at the same moment may still give one number to two
files with different seeds, as A1111 does. The worker thread writes the files; History deletes them.
read_infotext() reads the text back from ours and from other tools' PNG, JPEG and WebP files.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.storage.filenames import NameParts, file_name_part, folder_parts
from webui.storage.infotext import MAX_INFOTEXT_CHARS, build_infotext
from webui.storage.options import OptionsStore, SavedOptions

log = logging.getLogger(__name__)
KINDS = ("txt2img", "img2img")  # what made an image: the first part of its folder's name, as in A1111
EXTRAS = "extras"  # the Extras tab's pictures: a folder of images, no grids
INIT_IMAGES = "init-images"  # img2img's start pictures, with Save init images (A1111's outputs/init-images)
_NUMBERED = re.compile(r"^(\d{5,})[-.]")  # five digits at least: 100000 follows 99999
_GRID_NUMBERED = re.compile(r"^grid-(\d{4,})\.")
# EXIF: the Exif sub-IFD, its UserComment tag, and the 8-byte character code that starts a comment.
_EXIF_IFD, _USER_COMMENT, _COMMENT_PREFIX_SIZE = 0x8769, 0x9286, 8
# Largest image whose pixels are decoded to find text stored after them (about 128 MB as RGBA).
MAX_SCANNED_PIXELS = 32 * 1024 * 1024
# Numbers taken by other writers between our scan and our link, in a row, before we give up.
_CLAIM_TRIES = 100
# Each format's encoder, and the longest side it can store (a larger picture is saved as PNG instead).
_ENCODERS = {"png": ("PNG", 2**31 - 1), "jpg": ("JPEG", 65_535), "webp": ("WEBP", 16_383)}
_MAX_EXIF_BYTES = 65_000  # a JPEG's EXIF segment holds at most 64 KiB (WebP's has no such limit)
MAX_STEM_BYTES = 200  # a named copy's name before its suffixes: most file systems take 255 bytes
_NAMED_TRIES = 1000  # <stem>-1 ... -999: a folder a batch ran into many times over


@dataclass(frozen=True)
class NamedCopy:
    """Where a picture is also saved outside outputs/, under a name of its own: img2img Batch's Output directory,
    named after the picture the run started from (its file name without the extension)."""
    folder: Path
    stem: str
    make_folder: bool = False  # not there when the batch started: made with the first picture (else gone: refused)


class OutputStore:
    def __init__(self, outdir: Path, options: OptionsStore | None = None):
        self.outdir = Path(outdir)
        self.options = options or OptionsStore(None)  # the file formats to save in
        self._claim = None  # the open lock file while this server holds the folder

    def claim(self) -> bool:
        """Mark the folder as this running server's until release(); False when another running server holds
        it (its unfinished jobs are then its own, not left over from a crash). The lock goes with the process,
        so a crash never leaves it behind. Where file locks do not exist (Windows), True."""
        try:
            import fcntl
        except ImportError:
            return True
        try:
            handle = open(self.outdir / ".server.lock", "a")
        except OSError:  # a read-only folder: saving will say so; nothing to tell here
            return True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another live process
            handle.close()
            return False
        except OSError:  # a drive without locks (some network and FUSE drives): cannot tell, as on Windows
            handle.close()
            return True
        self._claim = handle
        return True

    def release(self) -> None:
        if self._claim is not None:
            self._claim.close()  # closing the file gives the lock back
            self._claim = None

    def image_folders(self) -> list[Path]:
        """The folders images and grids are saved under (the day folders go inside them)."""
        return ([self.outdir / f"{kind}-{what}" for kind in KINDS for what in ("images", "grids")]
                + [self.extras_folder()])

    # `options` below: the settings a job writes its files with (the Settings tab's, with its own overrides);
    # none given, the Settings tab's.

    def image_folder(self, kind: str, name_parts: NameParts | None = None,
                     options: SavedOptions | None = None) -> Path:
        """Where a picture goes: the kind's folder, and in it the subfolders of the Directory name pattern ([date]
        by default) unless the settings say no."""
        options = options or self.options.current()
        return self._folder(f"{kind}-images", options.save_to_dirs, name_parts, options)

    def grid_folder(self, kind: str, name_parts: NameParts | None = None, options: SavedOptions | None = None) -> Path:
        options = options or self.options.current()
        return self._folder(f"{kind}-grids", options.grid_save_to_dirs, name_parts, options)

    def _folder(self, base: str, in_subfolders: bool, name_parts: NameParts | None, options: SavedOptions) -> Path:
        if not in_subfolders:
            return self.outdir / base
        pattern = options.directories_filename_pattern
        return self.outdir.joinpath(base, *folder_parts(pattern, name_parts or NameParts(seed=0)))

    def save_image(self, image: Image.Image, infotext: str, seed: int, kind: str = "txt2img",
                   name_parts: NameParts | None = None, suffix: str = "", options: SavedOptions | None = None) -> Path:
        """A generated picture, named NNNNN-<the settings' file name pattern: the seed by default><suffix> (A1111's
        "-before-highres-fix" of a copy)."""
        options = options or self.options.current()
        folder = self.image_folder(kind, name_parts, options)
        name = file_name_part(options.samples_filename_pattern, name_parts or NameParts(seed=seed),
                              in_subfolder=options.save_to_dirs)
        stem = (f"-{name}" if name else "") + suffix  # [none]: the number alone, as A1111
        path = self._save(image, {"parameters": infotext}, folder, lambda n: f"{n:05d}{stem}", _NUMBERED,
                          options.samples_format, options)
        return self._with_files_beside(path, image, infotext, options)

    def save_grid(self, grid: Image.Image, infotext: str, kind: str = "txt2img",
                  name_parts: NameParts | None = None, options: SavedOptions | None = None,
                  basename: str = "grid") -> Path:
        """A grid, named <basename>-NNNN as A1111 names them ("xyz_grid" for the X/Y/Z plot's), each basename
        numbered on its own."""
        options = options or self.options.current()
        folder = self.grid_folder(kind, name_parts, options)
        numbered = _GRID_NUMBERED if basename == "grid" else re.compile(rf"^{re.escape(basename)}-(\d{{4,}})\.")
        path = self._save(grid, {"parameters": infotext}, folder, lambda n: f"{basename}-{n:04d}", numbered,
                          options.grid_format, options)
        return self._with_files_beside(path, grid, infotext, options)

    def _with_files_beside(self, path: Path, image: Image.Image, infotext: str, options: SavedOptions) -> Path:
        """The settings' text file and JPG copy beside a saved picture."""
        return self._with_jpg_copy(self._with_text_file(path, infotext, options), image, infotext, options)

    @staticmethod
    def _with_text_file(path: Path, infotext: str, options: SavedOptions) -> Path:
        """A1111's "Create a text file next to every image": the infotext in <the picture's name>.txt, written
        whole or not at all. The picture is saved already, so a text file that cannot be written is only logged."""
        if options.save_txt and infotext:
            try:
                write_text_file(path.with_suffix(".txt"), infotext + "\n")
            except OSError as err:
                log.warning("could not write the text file beside %s: %s", path, err)
        return path

    @staticmethod
    def _with_jpg_copy(path: Path, image: Image.Image, infotext: str, options: SavedOptions) -> Path:
        """A1111's "Save copy of large images as JPG": beside a picture whose file is larger than
        img_downscale_threshold MB, or a side longer than target_side_length, a JPG of the same name, with its
        infotext (where EXIF holds it), shrunk to that side where longer. A jpg picture gets none, nor one whose
        name is taken (img2img Batch's Output directory may hold the pictures it read). The picture is saved
        already, so a copy that cannot be made is only logged."""
        side, copy_path = options.target_side_length, path.with_suffix(".jpg")
        try:
            oversize = max(image.size) > side
            if (not options.export_for_4chan or path.suffix == ".jpg" or copy_path.exists()  # never over a file
                    or not (oversize or path.stat().st_size > options.img_downscale_threshold * 1024 * 1024)):
                return path
            copy = image.resize(_within_side(image.size, side), Image.Resampling.LANCZOS) if oversize else image
            texts = kept_texts({"parameters": infotext}, options)
            if _usable_format(copy, "jpg", texts) != "jpg":  # an infotext too long for EXIF: the picture keeps it
                texts = {}
            buffer = io.BytesIO()
            _encode(copy, texts, "jpg", options, buffer)
            write_file(copy_path, buffer.getvalue())
        except Exception as err:  # noqa: BLE001 - a file system's error, or a picture mode JPEG cannot take
            log.warning("could not write the JPG copy of %s: %s: %s", path, type(err).__name__, err)
        return path

    def save_extra(self, image: Image.Image, texts: dict[str, str]) -> Path:
        """A picture the Extras tab resized, with its text chunks: the original's `parameters` kept (so PNG Info and
        "send to" still read them), and what Extras did in `postprocessing`, as A1111 writes them. In JPEG or WebP
        only `parameters` is kept, in EXIF. A1111's text file beside it holds what Extras did."""
        options = self.options.current()
        path = self._save(image, texts, self.extras_folder(), lambda n: f"{n:05d}", _NUMBERED,
                          options.samples_format, options)
        path = self._with_text_file(path, texts.get("postprocessing") or "", options)
        return self._with_jpg_copy(path, image, texts.get("parameters") or "", options)

    def save_named(self, image: Image.Image, infotext: str, copy: NamedCopy,
                   options: SavedOptions | None = None) -> Path:
        """The picture saved as <copy.folder>/<copy.stem>.<the settings' format>, as A1111 saves img2img Batch's
        results into its Output directory. A taken name (the input picture itself, where the folders are one, or
        an earlier run's) is never replaced: -1, -2, ... is added, as A1111's "Add number suffix" does."""
        stem = copy.stem.encode()[:MAX_STEM_BYTES].decode(errors="ignore")  # cut whole characters only
        if not stem or Path(stem).name != stem or stem in (".", ".."):  # a name, never a path out of the folder
            raise ValueError(f"{copy.stem!r} cannot be a file name")
        options = options or self.options.current()
        texts = kept_texts({"parameters": infotext}, options)
        file_format = _usable_format(image, options.samples_format, texts)
        if copy.make_folder:  # an Output directory not there yet, as A1111 makes it
            copy.folder.mkdir(parents=True, exist_ok=True)
        temp = copy.folder / f".partial-{uuid.uuid4().hex}.{file_format}"
        try:
            with _create_new(temp) as handle:
                _encode(image, texts, file_format, options, handle)
            path = _link_unused_name(temp, copy.folder, stem, file_format,
                                     beside=(".txt",) if options.save_txt and infotext else ())
        finally:
            temp.unlink(missing_ok=True)
        return self._with_files_beside(path, image, infotext, options)

    def save_init_image(self, picture: Image.Image) -> Path:
        """An img2img start picture, as init-images/<the md5 of its pixels>.png (A1111's folder and name): the same
        picture is kept once."""
        folder = self.outdir / INIT_IMAGES
        path = folder / f"{hashlib.md5(picture.tobytes()).hexdigest()}.png"
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".partial-{uuid.uuid4().hex}.png"
        try:
            picture.save(temp, format="PNG")
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def extras_folder(self) -> Path:
        return self.outdir / f"{EXTRAS}-images"

    def remove_partial_files(self, older_than: float = 3600.0) -> int:
        """Delete the temporary files of saves a crash cut short; returns how many. Only old ones: another
        server sharing the folder may be writing a new one right now."""
        removed, cutoff = 0, time.time() - older_than
        folders = [*self.image_folders(), self.outdir / INIT_IMAGES]
        for partial in (p for folder in folders for p in folder.rglob(".partial-*")):
            try:
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
            except OSError:  # gone meanwhile, or not ours to delete: leave it
                continue
        return removed

    def resolve(self, path: str | Path) -> Path:
        return resolve_inside(self.outdir, path)

    def _save(self, image: Image.Image, texts: dict[str, str | None], folder: Path, stem_for,
              numbered: re.Pattern, file_format: str, options: SavedOptions) -> Path:
        """Write the picture with its texts (those with None: left out) under the next free number: stem_for(n)
        plus the format's extension. A picture (or infotext) too large for JPEG or WebP is saved as PNG."""
        texts = kept_texts(texts, options)
        file_format = _usable_format(image, file_format, texts)
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".partial-{uuid.uuid4().hex}.{file_format}"
        try:
            with _create_new(temp) as handle:
                _encode(image, texts, file_format, options, handle)
            return _claim_name(temp, folder, lambda n: f"{stem_for(n)}.{file_format}", numbered)
        finally:
            temp.unlink(missing_ok=True)


def image_bytes(image: Image.Image, texts: dict[str, str | None], file_format: str = "png",
                options: SavedOptions | None = None) -> bytes:
    """The picture as a file's bytes, with its texts, as _save writes it (PNG where the format cannot hold it):
    for the API, which returns pictures in the settings' format as A1111's does. `options`: the settings' (quality,
    lossless WebP, texts or none); None: the defaults."""
    options = options or SavedOptions()
    texts = kept_texts(texts, options)
    buffer = io.BytesIO()
    _encode(image, texts, _usable_format(image, file_format, texts), options, buffer)
    return buffer.getvalue()


def kept_texts(texts: dict[str, str | None], options: SavedOptions) -> dict[str, str | None]:
    """The texts a file gets: none where A1111's *Write infotext to metadata* is off (the .txt file is apart)."""
    return texts if options.enable_pnginfo else {}


def _encode(image: Image.Image, texts: dict[str, str | None], file_format: str, options: SavedOptions,
            handle) -> None:
    encoder = _ENCODERS[file_format][0]
    if file_format == "png":
        image.save(handle, format=encoder, pnginfo=png_texts(texts))
        return
    picture = image if image.mode in ("RGB", "L") else _on_white(image)
    parameters = texts.get("parameters")
    lossless = {"lossless": True} if file_format == "webp" and options.webp_lossless else {}
    picture.save(handle, format=encoder, quality=options.jpeg_quality,
                 exif=exif_user_comment(parameters) if parameters else b"", **lossless)


def exif_user_comment(text: str) -> bytes:
    """EXIF holding `text` as its UserComment, as A1111 writes it (with piexif): "UNICODE" and UTF-16 big-endian,
    tagged UNDEFINED as EXIF says, which piexif needs to read it back (PIL would tag it BYTE)."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    exif_ifd = 8 + 18  # after the header and IFD0's one entry
    header = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">HHHII", 1, _EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
    sub_ifd = struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), exif_ifd + 18) + struct.pack(">I", 0)
    return b"Exif\0\0" + header + ifd0 + sub_ifd + comment


def _on_white(image: Image.Image) -> Image.Image:
    """An RGB copy; a transparent part on white, as a browser shows it."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, "white")
    return Image.alpha_composite(white, rgba).convert("RGB")


def _usable_format(image: Image.Image, file_format: str, texts: dict[str, str | None]) -> str:
    """file_format where it holds the picture's size and (JPEG: 64 KiB of EXIF) its infotext, else PNG: rather a
    PNG than a file without its parameters, or none."""
    too_large = max(image.size) > _ENCODERS[file_format][1]
    too_long = file_format == "jpg" and len(exif_user_comment(texts.get("parameters") or "")) > _MAX_EXIF_BYTES
    return "png" if too_large or too_long else file_format


def png_texts(texts: dict[str, str | None]) -> PngInfo:
    """PNG text chunks (tEXt, or iTXt for text beyond Latin-1, as PIL picks); those with None are left out."""
    metadata = PngInfo()
    for key, text in texts.items():
        if text is not None:
            metadata.add_text(key, text)
    return metadata


def write_text_file(path: Path, text: str) -> None:
    """The text in `path` (UTF-8), by way of a temporary file, so a reader never sees half of it."""
    write_file(path, text.encode("utf-8"))


def write_file(path: Path, data: bytes) -> None:
    """The bytes in `path`, by way of a temporary file, so a reader never sees half of them."""
    temp = path.with_name(f".partial-{uuid.uuid4().hex}{path.suffix}")
    try:
        with _create_new(temp) as handle:
            handle.write(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _within_side(size: tuple[int, int], side: int) -> tuple[int, int]:
    """A size whose longer side is `side`, the shape kept (A1111's rounding)."""
    width, height = size
    return (side, round(height * side / width)) if width > height else (round(width * side / height), side)


def _create_new(path: Path):
    """Open a new file for writing with mode 0666 less the umask, as for any normal file, so other
    users and servers can read the outputs (tempfile.mkstemp would make it 0600)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def _claim_name(temp: Path, folder: Path, name_for, numbered: re.Pattern) -> Path:
    """Give the finished file the next free number in the folder. The folder is rescanned at every
    claim, as stable-diffusion-webui does, since other processes may write there too."""
    final = _placed_at_a_free_name(temp, (folder / name_for(highest_number(folder, numbered) + 1)
                                          for _ in range(_CLAIM_TRIES)))
    if final is None:
        raise FileExistsError(f"no free file number in {folder} after {_CLAIM_TRIES} tries: "
                              f"is another program writing numbered files there?")
    return final


def _link_unused_name(temp: Path, folder: Path, stem: str, extension: str, beside: tuple[str, ...] = ()) -> Path:
    """Give the finished file the name <stem>.<extension>, else the first free <stem>-<n>.<extension>; `beside`: the
    extensions of files written next to it (a .txt), whose names must be free too, as another file's caption may
    hold one."""
    def free(path: Path) -> bool:
        return not any(os.path.lexists(path.with_suffix(suffix)) for suffix in (f".{extension}", *beside))

    final = _placed_at_a_free_name(temp, (
        path for number in range(_NAMED_TRIES)
        if free(path := folder / (f"{stem}.{extension}" if number == 0 else f"{stem}-{number}.{extension}"))))
    if final is None:
        raise FileExistsError(f"{stem}.{extension} and {_NAMED_TRIES - 1} numbered names after it are all taken in "
                              f"{folder}")
    return final


def _placed_at_a_free_name(temp: Path, names: Iterable[Path]) -> Path | None:
    """The finished file given the first of `names` no file has, never replacing (or following a link at) one that
    took it meanwhile: os.link fails where one did. On a drive without hard links (exFAT, some network or FUSE
    drives) the name is claimed first by creating it, which fails just as well, and the file is moved onto the
    claim. None when every name is taken."""
    for final in names:
        try:
            os.link(temp, final)
            return final
        except FileExistsError:
            continue
        except OSError:  # no hard links
            try:
                os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            try:
                os.replace(temp, final)
            except OSError:  # no empty file left to take the name and show as a picture
                final.unlink(missing_ok=True)
                raise
            return final
    return None


def resolve_inside(root: Path, path: str | Path) -> Path:
    """root/path, or ValueError when it lands outside root: callers never reach other files ('..').
    Links are not followed: a folder inside outputs/ that the user linked to another disk is inside."""
    root = Path(os.path.abspath(root))
    # A path recorded on Windows may hold "\\" (our file names never do): read it as "/" everywhere.
    candidate = Path(os.path.normpath(root / str(path).replace("\\", "/")))
    if candidate != root and root not in candidate.parents:
        raise ValueError(f"path {str(path)!r} is outside the outputs folder")
    return candidate


def highest_number(folder: Path, numbered: re.Pattern = _NUMBERED) -> int:
    """The largest file number in the folder (NNNNN-... images, grid-NNNN grids), or -1."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := numbered.match(p.name))] if folder.exists() else []
    return max(numbers, default=-1)


def grid_rows(count: int, n_rows: int = -1, batch_size: int = 1, prevent_empty_spots: bool = False) -> int:
    """A1111's Grid row count for `count` pictures: n_rows; 0: the batch size; -1: the square root rounded, or with
    prevent_empty_spots the largest count up to it that divides the pictures evenly. Never more than the pictures."""
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = math.isqrt(count)
        while count % rows:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    return max(1, min(rows, count))


def make_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Lay images out row by row in `rows` rows (None: near-square), as many columns as that takes."""
    rows = rows or grid_rows(len(images))
    columns = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def read_infotext(image: Image.Image) -> str | None:
    """The infotext of an image (ours or stable-diffusion-webui's), if it has one: the PNG text
    chunk `parameters`, or for A1111's JPEG and WebP files the EXIF UserComment; for a NovelAI PNG the
    infotext A1111 makes of its text. Text beyond MAX_INFOTEXT_CHARS is cut. Never raises, and never
    decodes the pixels of a huge image."""
    text = (image.info.get("parameters") or _text_after_pixels(image) or _exif_user_comment(image)
            or _novelai_infotext(image))
    return text[:MAX_INFOTEXT_CHARS] if text else None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_CHUNK = 16 * 1024 * 1024  # larger text chunks are no infotext: skipped


def png_texts_only(file: BinaryIO) -> Image.Image | None:
    """A 1x1 stand-in holding a PNG's text chunks, read chunk by chunk without the pixels (which are skipped), for
    a picture too large for PIL to open or to decode for the text after its pixels. None for a file that is no PNG.
    read_infotext and text_chunks read the stand-in as they read the picture."""
    if file.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
        return None
    texts: dict[str, str] = {}
    while len(header := file.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt") and length <= _MAX_TEXT_CHUNK:
            body = file.read(length)
            if len(body) < length:  # cut short
                break
            key, text = _png_text(kind, body)
            if key and text is not None:
                texts[key] = text  # a key given twice: the last, as PIL reads it
            file.seek(4, io.SEEK_CUR)  # its CRC
        else:
            file.seek(length + 4, io.SEEK_CUR)
    stand_in = Image.new("1", (1, 1))
    stand_in.info = texts
    return stand_in


def _png_text(kind: bytes, body: bytes) -> tuple[str, str | None]:
    """One PNG text chunk's (key, text); text None where it cannot be read."""
    key, _, rest = body.partition(b"\0")
    try:
        if kind == b"tEXt":
            return key.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":
            return key.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
        compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language, translated key, text
        text = rest.split(b"\0", 2)[-1]
        return key.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, IndexError):
        return key.decode("latin-1", "replace"), None


def _inflate(data: bytes) -> bytes:
    """zlib data unpacked to at most _MAX_TEXT_CHUNK bytes (a small chunk may unpack to gigabytes)."""
    return zlib.decompressobj().decompress(data, _MAX_TEXT_CHUNK)


def text_chunks(image: Image.Image, limit: int | None = MAX_INFOTEXT_CHARS) -> dict[str, str]:
    """The image's other text (PNG text chunks such as A1111's `postprocessing` or a program's `Software`; the
    infotext's `parameters` left out), each cut to `limit` characters (None: whole, to copy them)."""
    return {key: value[:limit] for key, value in image.info.items()
            if isinstance(key, str) and isinstance(value, str) and key != "parameters"}


# NovelAI's sampler names -> ours; A1111 reads any other as Euler a.
_NOVELAI_SAMPLERS = {"k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun",
                     "k_dpm_2": "DPM2", "k_dpm_2_ancestral": "DPM2 a", "k_dpmpp_2m": "DPM++ 2M",
                     "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2s_ancestral": "DPM++ 2S a", "ddim": "DDIM", "plms": "PLMS"}


def _novelai_infotext(image: Image.Image) -> str | None:
    """NovelAI keeps the prompt in `Description` and its settings as JSON in `Comment`; A1111 turns them
    into an infotext with the keys below (its Clip skip 2 and ENSD 31337 are NovelAI's fixed settings)."""
    info = image.info
    if info.get("Software") != "NovelAI" or not isinstance(info.get("Comment"), str):
        return None
    try:
        settings = json.loads(info["Comment"][:MAX_INFOTEXT_CHARS])
    except ValueError:
        return None
    if not isinstance(settings, dict):
        return None
    return build_infotext(str(info.get("Description", "")), str(settings.get("uc") or ""), {
        "Steps": settings.get("steps"), "Sampler": _NOVELAI_SAMPLERS.get(settings.get("sampler"), "Euler a"),
        "CFG scale": settings.get("scale"), "Seed": settings.get("seed"), "Size": f"{image.width}x{image.height}",
        "Clip skip": 2, "ENSD": 31337,
    })


def _text_after_pixels(image: Image.Image) -> str | None:
    """A PNG's `parameters` chunk stored after the image data (we and A1111 write it before), which PIL
    reads only by decoding every pixel: skipped past MAX_SCANNED_PIXELS, where a small upload of a
    huge blank image would cost gigabytes."""
    if image.width * image.height > MAX_SCANNED_PIXELS:
        return None
    try:
        return (getattr(image, "text", None) or {}).get("parameters")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # damaged after its header
        return None


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a broken EXIF block from some other tool: read as no infotext, never an error
        return None
    if not isinstance(comment, bytes):
        return None
    return _decode_user_comment(comment[:_COMMENT_PREFIX_SIZE + 4 * MAX_INFOTEXT_CHARS]) or None


def _decode_user_comment(comment: bytes) -> str:
    """EXIF UserComment bytes -> text. A1111 writes b"UNICODE\\0" and UTF-16 big-endian (piexif's
    default); other writers use little-endian or ASCII. Unknown character codes give ""."""
    prefix, body = comment[:_COMMENT_PREFIX_SIZE], comment[_COMMENT_PREFIX_SIZE:]
    if prefix == b"UNICODE\0":
        text = body.decode(_utf16_byte_order(body), errors="replace")
    elif prefix == b"ASCII\0\0\0":
        text = body.decode("utf-8", errors="replace")  # UTF-8 is what writers put there in practice
    else:
        return ""
    return text.lstrip("\ufeff").rstrip("\0")


def _utf16_byte_order(body: bytes) -> str:
    """The UTF-16 codec for body: by its byte order mark, else by where the zero bytes of Latin
    characters fall (first in big-endian); big-endian when neither tells."""
    if body.startswith(b"\xff\xfe"):
        return "utf-16-le"
    if body.startswith(b"\xfe\xff"):
        return "utf-16-be"
    return "utf-16-le" if body[1::2].count(0) > body[0::2].count(0) else "utf-16-be"
