"""Server-wide settings that users change while the server runs: the Settings tab and /sdapi/v1/options.

They are kept in a JSON file under A1111's key names (its config.json; `--ui-settings-file`), so they survive a
restart and A1111's own file can be pointed at: keys this server does not know are kept as they were when it
saves. A file that cannot be read is never saved over, so nothing a user wrote there is lost.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpg", "webp")
ImageFormat = Literal["png", "jpg", "webp"]


class SavedOptions(BaseModel):
    """The settings, by A1111's keys. jpg and webp carry the infotext in EXIF, as A1111 writes them."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples_format: ImageFormat = Field("png", description="file format of saved images: png, jpg or webp")
    grid_format: ImageFormat = Field("png", description="file format of saved grids: png, jpg or webp")
    jpeg_quality: int = Field(80, ge=1, le=100, description="quality of saved jpg and webp files, 1 to 100")


OPTION_KEYS = tuple(SavedOptions.model_fields)


class SettingsFrozen(Exception):
    """The server was started with --freeze-settings: the settings cannot be changed."""


class OptionsStore:
    """The settings in memory and in their file. Safe to use from several threads."""

    def __init__(self, path: Path | None, frozen: bool = False):
        self.path = path  # None: kept in memory only (tests, tools)
        self.frozen = frozen
        self._lock = threading.Lock()
        self._file_keys: dict[str, Any] = {}  # what the file holds, unknown keys included
        self._unreadable: str | None = None  # why the file cannot be read, if it cannot
        self._current = self._read()

    def current(self) -> SavedOptions:
        with self._lock:
            return self._current

    def update(self, changes: dict[str, Any]) -> SavedOptions:
        """Apply and save changes (A1111's keys; others are the caller's to refuse). InvalidRequest naming the key
        for a value out of range, SettingsFrozen under --freeze-settings, OSError when the file cannot be
        written; then nothing changes."""
        with self._lock:
            updated = self._validated(changes)
            if self.path is not None:
                self._write(self._file_keys | updated.model_dump())
            self._current = updated
            return updated

    def check(self, changes: dict[str, Any]) -> None:
        """What update would refuse (InvalidRequest, SettingsFrozen), found without changing anything."""
        with self._lock:
            self._validated(changes)

    def _validated(self, changes: dict[str, Any]) -> SavedOptions:
        if self.frozen and changes:
            raise SettingsFrozen("the settings cannot be changed on this server (started with --freeze-settings)")
        try:
            return SavedOptions(**(self._current.model_dump() | changes))
        except ValidationError as err:
            raise InvalidRequest("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in err.errors())) from None

    def _read(self) -> SavedOptions:
        if self.path is None or not self.path.exists():
            return SavedOptions()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("it holds no JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            self._unreadable = f"{type(err).__name__}: {err}"
            log.warning("settings file %s cannot be read (%s): the defaults apply, and it is not saved over",
                        self.path, self._unreadable)
            return SavedOptions()
        self._file_keys = data
        known = {}
        for key in OPTION_KEYS:  # one bad value costs only its own key
            if key in data:
                try:
                    known[key] = SavedOptions(**{key: data[key]}).model_dump()[key]
                except ValidationError:
                    log.warning("settings file %s: %s = %r is not a value this server takes; the default applies",
                                self.path, key, data[key])
        return SavedOptions(**known)

    def _write(self, data: dict[str, Any]) -> None:
        if self._unreadable:
            raise OSError(f"the settings file {self.path} could not be read ({self._unreadable}), so it is not "
                          "saved over; fix or remove it, then restart")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=4, ensure_ascii=False)
            os.chmod(temp, 0o644)
            os.replace(temp, self.path)  # whole or not at all: a crash never leaves half a file
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        self._file_keys = data
