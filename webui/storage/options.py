"""Server-wide settings that users change while the server runs: the Settings tab and /sdapi/v1/options.

They are kept in a JSON file under A1111's key names (its config.json; `--ui-settings-file`), so they survive a
restart and A1111's own file can be pointed at: a save writes only the keys changed into the file as it is then,
so A1111's other keys (and values of ours this server cannot use) stay. A file that cannot be read is never saved
over, so nothing a user wrote there is lost.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from webui.engine.preview import PREVIEW_METHODS
from webui.engine.prompts import EMPHASIS_MODES
from webui.schemas import (COLOR_PATTERN, DEFAULT_BACKGROUND, DEFAULT_CODEFORMER_WEIGHT, DEFAULT_FACE_RESTORER,
                           FACE_RESTORERS, HiresRefinerPass, InvalidRequest, RandnSource, canonical_randn_source)

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpg", "webp")
ImageFormat = Literal["png", "jpg", "webp"]


EmphasisMode = Literal[EMPHASIS_MODES]  # A1111's Emphasis mode setting
FaceRestorer = Literal[FACE_RESTORERS]
PreviewMethod = Literal[PREVIEW_METHODS]


class SavedOptions(BaseModel):
    """The settings, by A1111's keys. jpg and webp carry the infotext in EXIF, as A1111 writes them."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples_format: ImageFormat = Field("png", description="file format of saved images: png, jpg or webp")
    grid_format: ImageFormat = Field("png", description="file format of saved grids: png, jpg or webp")
    jpeg_quality: int = Field(80, ge=1, le=100, description="quality of saved jpg and webp files, 1 to 100")
    samples_filename_pattern: str = Field("", max_length=200,
                                          description="saved images' names after their number, in A1111's tags: "
                                                      "[seed], [prompt_spaces], [model_name], ... (empty: [seed])")
    save_to_dirs: bool = Field(True, description="save images in subfolders named by directories_filename_pattern")
    grid_save_to_dirs: bool = Field(True, description="save grids in subfolders named by directories_filename_pattern")
    directories_filename_pattern: str = Field("[date]", max_length=200,
                                              description="the subfolders' names, in the same tags ('/' nests them: "
                                                          "[model_name]/[date]); empty: [date]")
    enable_pnginfo: bool = Field(True, description="write the infotext into each saved picture (PNG text chunk, "
                                 "jpg/webp EXIF) and the pictures the API returns; off, the files hold none (the "
                                 ".txt file of save_txt is apart)")
    webp_lossless: bool = Field(False, description="save webp pictures losslessly (jpeg_quality is then how hard "
                                                   "it compresses)")
    add_model_hash_to_info: bool = Field(True, description="the infotext names the model's hash (Model hash)")
    add_model_name_to_info: bool = Field(True, description="the infotext names the model (Model)")
    add_vae_hash_to_info: bool = Field(True, description="the infotext names a VAE file's hash (VAE hash)")
    add_vae_name_to_info: bool = Field(True, description="the infotext names a VAE file (VAE)")
    add_version_to_infotext: bool = Field(True, description="the infotext names this program and its version "
                                          "(Version; without it a paste reads the text as another program's)")
    lora_add_hashes_to_infotext: bool = Field(True, description="the infotext gives the LoRAs' hashes (Lora hashes)")
    textual_inversion_add_hashes_to_infotext: bool = Field(True, description="the infotext gives the embeddings' "
                                                           "hashes (TI hashes)")
    save_txt: bool = Field(False, description="also write the infotext into a .txt file of the same name beside "
                                              "each saved image and grid")
    enable_prompt_comments: bool = Field(True, description="a # in a prompt leaves the rest of its line out of what "
                                                           "is drawn (and of the infotext)")
    comma_padding_backtrack: int = Field(20, ge=0, le=74, description="Prompt word wrap length limit: a 75-token "
                                         "chunk that fills up at most this many tokens after its last comma ends at "
                                         "that comma (0: never)")
    emphasis: EmphasisMode = Field("Original", description="how (word:1.2) weights are read: Original (weights, then "
                                   "each chunk back to its mean), No norm (weights alone), Ignore (brackets read, "
                                   "weights 1), None (brackets are text)")
    randn_source: RandnSource = Field("CPU", description="Random number generator source: CPU (torch's CPU "
                                      "generator) or NV (the numbers an NVIDIA card draws, on any device: A1111's "
                                      "default GPU source, written GPU or NV)")
    face_restoration_model: FaceRestorer = Field(DEFAULT_FACE_RESTORER, description="the face restorer Restore faces "
                                                 f"uses: {' or '.join(FACE_RESTORERS)}")
    code_former_weight: float = Field(DEFAULT_CODEFORMER_WEIGHT, ge=0.0, le=1.0, description="CodeFormer's weight, 0 "
                                      "to 1: 0 changes a face most, 1 least")
    inpainting_mask_weight: float = Field(1.0, ge=0.0, le=1.0, description="Inpainting conditioning mask strength: "
                                          "how far a model made for inpainting sees its start picture greyed out "
                                          "where it draws, 0 to 1 (below 1 it keeps more of the picture)")
    sdxl_clip_l_skip: bool = Field(False, description="Clip skip SDXL: SDXL models read Clip skip in their first "
                                   "text encoder (CLIP-L); off, they ignore it")
    hires_fix_refiner_pass: HiresRefinerPass = Field("second pass", description="Hires fix: which pass to enable "
                                                     "refiner for: first pass, second pass or both passes")
    upscaler_for_img2img: str = Field("None", max_length=200, description="img2img: the picture upscaler that "
                                      "enlarges the start picture where the run is larger ('None': resampling alone)")
    img2img_background_color: str = Field(DEFAULT_BACKGROUND, pattern=COLOR_PATTERN, description="img2img: the colour "
                                          "a transparent part of the start picture is laid on, #rrggbb")
    overlay_inpaint: bool = Field(True, description="inpainting: the result laid into the original through the mask "
                                  "(off: the part drawn shows as the model drew it)")
    refiner_switch_by_sample_steps: bool = Field(False, description="the refiner takes over after its share of the "
                                                 "model calls, not at its noise level (A1111 before 1.8)")
    use_old_scheduling: bool = Field(False, description="prompt editing's [a:b:N] on A1111's old timelines: N below 1 "
                                     "a fraction of the steps, any other a step number")
    img2img_fix_steps: bool = Field(False, description="img2img runs exactly its steps, as the last of a schedule "
                                    "of steps / denoising strength (off: steps x strength of them run)")
    save_images_before_highres_fix: bool = Field(False, description="also save each picture as the first pass left "
                                                 "it, before the hires fix (named ...-before-highres-fix)")
    save_images_before_face_restoration: bool = Field(False, description="also save each picture as it was before "
                                                      "Restore faces (...-before-face-restoration)")
    save_images_before_color_correction: bool = Field(False, description="img2img: also save each picture as it was "
                                                      "before colour correction (...-before-color-correction)")
    save_mask: bool = Field(False, description="inpainting: also save the mask beside each picture (...-mask)")
    save_mask_composite: bool = Field(False, description="inpainting: also save each picture where the mask is, "
                                      "transparent elsewhere (...-mask-composite)")
    save_init_img: bool = Field(False, description="img2img: also save the picture it starts from, once, as "
                                "init-images/<the md5 of its pixels>.png in the outputs folder")
    save_incomplete_images: bool = Field(False, description="also save the pictures an Interrupt or Skip cut short, "
                                         "as they stood")

    live_previews_enable: bool = Field(True, description="show a live preview of the picture while it is denoised")
    show_progress_every_n_steps: int = Field(5, ge=-1, le=32, description="Live preview display period: a new "
                                             "preview every N denoising steps, 1 to 32; 0 or -1 (A1111's 'only after "
                                             "each batch', which the gallery shows): none")
    show_progress_type: PreviewMethod = Field("Approx cheap", description="Live preview method: Approx cheap (a "
                                              "linear map of the latents, free), Full (the model's VAE), TAESD (a "
                                              "tiny decoder, fetched into models/VAE-taesd on first use); A1111's "
                                              "Approx NN is read as Approx cheap")
    n_rows: int = Field(-1, ge=-1, le=16, description="Grid row count: the rows of a batch's grid; -1: about the "
                        "square root of the pictures; 0: as many as the batch size")
    grid_prevent_empty_spots: bool = Field(False, description="a grid of -1 rows takes a row count that divides the "
                                           "pictures evenly, so no place is empty")
    return_grid: bool = Field(True, description="Show grid in gallery: a run's saved grid is shown in the page's "
                              "gallery after its pictures")
    export_for_4chan: bool = Field(True, description="Save copy of large images as JPG: beside a saved picture or grid "
                                   "whose file is above img_downscale_threshold MB, or a side above "
                                   "target_side_length pixels, a JPG of the same name (shrunk to that side)")
    img_downscale_threshold: float = Field(4.0, ge=0.0, le=1000.0, description="the file size, in MB, above which "
                                           "the JPG copy is made")
    target_side_length: int = Field(4000, ge=64, le=65_535, description="the width or height, in pixels, above which "
                                    "the JPG copy is made, shrunk to it")

    @field_validator("randn_source", mode="before")
    @classmethod
    def _nv_for_gpu(cls, value: Any) -> Any:
        return canonical_randn_source(value)

    @field_validator("upscaler_for_img2img", mode="before")
    @classmethod
    def _none_as_a1111_keeps_it(cls, value: Any) -> Any:
        return "None" if value in (None, "") else value  # A1111's default is null

    @field_validator("show_progress_type", mode="before")
    @classmethod
    def _approx_nn_as_cheap(cls, value: Any) -> Any:
        return "Approx cheap" if value == "Approx NN" else value  # A1111's default, a network this server lacks

    @field_validator("samples_format", "grid_format", mode="before")
    @classmethod
    def _as_a1111_writes_it(cls, value: Any) -> Any:
        # A1111 takes a file extension in any case: "JPG" and "jpeg" are our jpg.
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpg" if value == "jpeg" else value
        return value


OPTION_KEYS = tuple(SavedOptions.model_fields)
# A1111's switches for infotext keys, each -> the key it leaves out when off
INFOTEXT_SWITCHES = {"add_model_hash_to_info": "Model hash", "add_model_name_to_info": "Model",
                     "add_vae_hash_to_info": "VAE hash", "add_vae_name_to_info": "VAE",
                     "add_version_to_infotext": "Version", "lora_add_hashes_to_infotext": "Lora hashes",
                     "textual_inversion_add_hashes_to_infotext": "TI hashes"}
# How a job's outputs are written (its files, their infotext, its grid and whether that is shown): a request may set
# these for itself (A1111's override_settings), not for others
SAVING_KEYS = ("samples_format", "grid_format", "jpeg_quality", "samples_filename_pattern", "save_to_dirs",
               "grid_save_to_dirs", "directories_filename_pattern", "enable_pnginfo", "webp_lossless", "save_txt",
               "export_for_4chan", "img_downscale_threshold", "target_side_length", "n_rows",
               "grid_prevent_empty_spots", "return_grid", *INFOTEXT_SWITCHES)


_MISSING = object()


class SettingsFrozen(Exception):
    """The server was started with --freeze-settings: the settings cannot be changed."""


class OptionsStore:
    """The settings in memory and in their file. Safe to use from several threads."""

    def __init__(self, path: Path | None, frozen: bool = False, starting: dict[str, Any] | None = None):
        """`starting`: values the server starts with over the file's (command-line flags), saved only if changed."""
        self.path = path  # None: kept in memory only (tests, tools)
        self.frozen = frozen
        self._lock = threading.Lock()
        self._unreadable: str | None = None  # why the file cannot be read, if it cannot
        self._current = self._read()
        if starting:
            self._current = SavedOptions(**(self._current.model_dump() | starting))

    def preview_period(self) -> int:
        """Denoising steps between live previews; 0 when there are none."""
        current = self.current()
        return max(current.show_progress_every_n_steps, 0) if current.live_previews_enable else 0

    def current(self) -> SavedOptions:
        with self._lock:
            return self._current

    def update(self, changes: dict[str, Any]) -> SavedOptions:
        """Apply and save changes (A1111's keys; others are the caller's to refuse). InvalidRequest naming the key
        for a value out of range, SettingsFrozen under --freeze-settings, OSError when the file cannot be
        written; then nothing changes."""
        with self._lock:
            updated = self._validated(changes)
            changed = {key: getattr(updated, key) for key in changes
                       if getattr(updated, key) != getattr(self._current, key)}
            if self.path is not None and changed:  # only these: another program's values of the others stay
                self._write(changed)
            self._current = updated
            return updated

    def remembered(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The file's values of A1111 options kept beside the Settings tab's (the model, the API's options), as the
        file has them: their users check them. {} without a file, or with one that cannot be read."""
        with self._lock:
            if self.path is None or self._unreadable:
                return {}
            try:
                data = self._file_contents()
            except (OSError, UnicodeDecodeError, ValueError):
                return {}
        return {key: data[key] for key in keys if key in data}

    def remember(self, values: dict[str, Any]) -> None:
        """Write A1111 options kept beside the Settings tab's into the file (checked by the caller), as A1111 keeps
        them across restarts. Nothing is written without a file, or under --freeze-settings (they then last until
        the server stops); OSError when the file cannot be written."""
        with self._lock:
            if self.path is None or self.frozen or not values:
                return
            if self._unreadable:
                raise self._not_saved_over()
            try:
                on_file = self._file_contents()
            except (UnicodeDecodeError, ValueError):  # spoilt since the start: _write says so
                on_file = {}
            if any(on_file.get(key, _MISSING) != value for key, value in values.items()):
                self._write(values)

    def check(self, changes: dict[str, Any]) -> None:
        """What update would refuse (InvalidRequest, SettingsFrozen), found without changing anything."""
        with self._lock:
            self._validated(changes)

    def _validated(self, changes: dict[str, Any]) -> SavedOptions:
        if self.frozen and changes:
            raise SettingsFrozen("the settings cannot be changed on this server (started with --freeze-settings)")
        if self._unreadable and changes and self.path is not None:
            raise self._not_saved_over()
        try:
            return SavedOptions(**(self._current.model_dump() | changes))
        except ValidationError as err:
            raise InvalidRequest("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in err.errors())) from None

    def _not_saved_over(self) -> OSError:
        return OSError(f"the settings file {self.path} could not be read ({self._unreadable}), so it is not saved "
                       "over; fix or remove it, then restart")

    def _read(self) -> SavedOptions:
        try:
            data = self._file_contents()
        except (OSError, UnicodeDecodeError, ValueError) as err:
            self._unreadable = f"{type(err).__name__}: {err}"
            log.warning("settings file %s cannot be read (%s): the defaults apply, and it is not saved over",
                        self.path, self._unreadable)
            return SavedOptions()
        known = {}
        for key in OPTION_KEYS:  # one bad value costs only its own key
            if key in data:
                try:
                    known[key] = SavedOptions(**{key: data[key]}).model_dump()[key]
                except ValidationError:
                    log.warning("settings file %s: %s = %r is not a value this server takes; the default applies",
                                self.path, key, data[key])
        return SavedOptions(**known)

    def _file_contents(self) -> dict[str, Any]:
        """The JSON object in the file ({} when there is none); raises what a file that cannot be read raises."""
        if self.path is None or not self.path.exists():
            return {}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("it holds no JSON object")
        return data

    def _write(self, changes: dict[str, Any]) -> None:
        """The changed keys into the file as it is now (A1111, or a second server, may have written it since)."""
        try:
            data = self._file_contents() | changes
        except (UnicodeDecodeError, ValueError) as err:  # spoilt since the start: still never saved over
            raise OSError(f"the settings file {self.path} cannot be read now ({type(err).__name__}: {err}), so it "
                          "is not saved over; fix or remove it") from None
        target = Path(os.path.realpath(self.path))  # a linked config.json stays a link: its target is written
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644  # an A1111 file may be private
        fd, temp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=4, ensure_ascii=False)
            os.chmod(temp, mode)
            os.replace(temp, target)  # whole or not at all: a crash never leaves half a file
        except OSError as err:  # named by the settings file, not the temporary one beside it
            Path(temp).unlink(missing_ok=True)
            raise OSError(f"the settings file {target} cannot be written ({err.strerror or err})") from None
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
