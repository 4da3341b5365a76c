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
    return ", ".join(part for part in (text, style_text) if part)


class StyleStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # a save from one page must not drop another's

    def styles(self) -> list[Style]:
        """The file's styles in its order; none when it is missing, unreadable or not a styles file."""
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as err:
            log.warning("the styles file %s could not be read (%s); no styles are offered", self.path, err)
            return []
        rows = csv.DictReader(io.StringIO(text))
        if rows.fieldnames is None or "name" not in rows.fieldnames:
            log.warning("%s has no 'name' column, so it is not read as a styles file", self.path)
            return []
        # A1111's files before 1.0 called the prompt column "text".
        return [Style(row["name"], row.get("prompt") or row.get("text") or "", row.get("negative_prompt") or "")
                for row in rows if row.get("name")]

    def find(self, names: list[str]) -> list[Style]:
        by_name = {style.name: style for style in self.styles()}
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
        """Add the style, or replace the one of the same name where it stands."""
        name = style.name.strip()
        if not name or len(name) > MAX_STYLE_NAME or any(ord(c) < 32 for c in name):
            raise InvalidRequest(f"style name: give a name of 1 to {MAX_STYLE_NAME} characters, on one line")
        style = Style(name, style.prompt, style.negative_prompt)
        with self._lock:
            styles = self.styles()
            names = [each.name for each in styles]
            if name in names:
                styles[names.index(name)] = style
            else:
                styles.append(style)
            self._write(styles)

    def delete(self, name: str) -> bool:
        with self._lock:
            styles = self.styles()
            kept = [style for style in styles if style.name != name]
            if len(kept) == len(styles):
                return False
            self._write(kept)
            return True

    def _write(self, styles: list[Style]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".styles-", suffix=".csv", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["name", "prompt", "negative_prompt"])
                writer.writerows([style.name, style.prompt, style.negative_prompt] for style in styles)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
