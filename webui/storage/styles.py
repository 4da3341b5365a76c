"""Prompt styles: named prompt and negative-prompt texts, kept in A1111's styles.csv (name,prompt,negative_prompt).

A style's text joins the user's as A1111 joins it: where the style holds "{prompt}", the user's text takes its
place; otherwise the style's text follows the user's after a comma. The file is read at each use (the user
may edit it by hand, or share it with an A1111 install) and written whole under a temporary name, so a crash
never leaves half a file.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from webui.schemas import InvalidRequest

log = logging.getLogger(__name__)

MAX_STYLE_NAME = 100
PROMPT_PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class StyleNotFound(InvalidRequest):
    pass


def merge(style_text: str, text: str) -> str:
    """The user's text with one style's text, as A1111 joins them."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


COLUMNS = ["name", "prompt", "negative_prompt"]


class StyleStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # a save from one page must not drop another's

    def styles(self) -> list[Style]:
        """The file's styles in its order, the first of a repeated name only; none when the file is missing or
        cannot be read as a styles file (said in the log)."""
        try:
            rows, _ = self._rows()
        except InvalidRequest as err:
            log.warning("%s; no styles are offered", err)
            return []
        styles: dict[str, Style] = {}
        for row in rows:
            name = row.get("name") or ""
            if name and not name.startswith("#") and name not in styles:  # "#": a comment line, as in A1111
                # A1111's files before 1.0 called the prompt column "text".
                styles[name] = Style(name, row.get("prompt") or row.get("text") or "", row.get("negative_prompt") or "")
        return list(styles.values())

    def find(self, names: list[str]) -> list[Style]:
        by_name = {style.name: style for style in self.styles()}
        names = [name for name in names if name not in ("", "None")]  # what A1111 clients send for no style
        missing = [name for name in names if name not in by_name]
        if missing:
            known = ", ".join(list(by_name)[:20]) or "none"
            raise StyleNotFound(f"styles: no style named {', '.join(repr(n[:100]) for n in missing)} (styles: {known}); "
                                "pick one from the list or save it first")
        return [by_name[name] for name in names]

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """The prompt and negative prompt with these styles joined in, in the order given."""
        for style in self.find(names):
            prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def save(self, style: Style) -> None:
        """Add the style, or replace the one of the same name where it stands; other columns a row has (notes
        kept by hand) stay."""
        name = style.name.strip()
        if not name or len(name) > MAX_STYLE_NAME or any(ord(c) < 32 for c in name) or name == "None":
            raise InvalidRequest(f"style name: give a name of 1 to {MAX_STYLE_NAME} characters, on one line "
                                 "(other than the word None, which means no style)")
        values = {"name": name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
        with self._lock:
            rows, columns = self._rows()
            first = next((i for i, row in enumerate(rows) if row.get("name") == name), None)
            if first is None:
                rows.append(values)
            else:  # the first row of that name is the one in use; later ones of that name go
                rows[first] = {**rows[first], **values}
                rows = [row for i, row in enumerate(rows) if i <= first or row.get("name") != name]
            self._write(rows, columns)

    def delete(self, name: str) -> bool:
        with self._lock:
            rows, columns = self._rows()
            kept = [row for row in rows if row.get("name") != name]
            if len(kept) == len(rows):
                return False
            self._write(kept, columns)
            return True

    def _rows(self) -> tuple[list[dict], list[str]]:
        """The file's rows and columns; ([], COLUMNS) when it does not exist yet. A file that cannot be read as
        a styles file is an InvalidRequest: saving over it would lose what it holds."""
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return [], list(COLUMNS)
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidRequest(f"the styles file {self.path} cannot be read ({err}); save it as UTF-8 or pick "
                                 "another --styles-file") from None
        reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)  # A1111 allows "name, prompt"
        if reader.fieldnames is None and not text.strip():
            return [], list(COLUMNS)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise InvalidRequest(f"the styles file {self.path} has no name column; it must be a comma-separated "
                                 "file with the columns name,prompt,negative_prompt")
        columns = list(COLUMNS) + [c for c in reader.fieldnames if c and c not in COLUMNS and c != "text"]
        rows = []
        for row in reader:
            if "text" in row and not row.get("prompt"):
                row["prompt"] = row.pop("text")
            rows.append({key: value for key, value in row.items() if key in columns and value is not None})
        return rows, columns

    def _write(self, rows: list[dict], columns: list[str]) -> None:
        target = self.path.resolve()  # through a link: a styles.csv shared with A1111 stays shared
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".styles-", suffix=".csv", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8-sig", newline="") as handle:  # the BOM: as A1111, for Excel
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            if target.exists():
                shutil.copymode(target, temp)
            else:
                os.chmod(temp, 0o644)  # mkstemp's 0600 would hide a new file from the user's other programs
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
