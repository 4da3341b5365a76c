"""A1111's extra network cards, in the LoRA and Textual inversion sections: each file as a picture to click, with
its preview where one lies beside it under A1111's names (<name>.png, <name>.preview.png, then the same in jpg,
jpeg, webp and gif), else a card that shows its name. A search box narrows the cards by name. A LoRA's card reads
A1111's user metadata beside it (webui/storage/card_metadata.py), which the LoRA section's Metadata editor shows.

Pictures are made small once per preview file (and again when the file changes), so a folder of large previews
costs one read each, not one per page load.
"""
from __future__ import annotations

import re
import textwrap
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageOps

from webui.engine.img2img import upright
from webui.engine.models import file_stamp
from webui.storage.card_metadata import MAX_WEIGHT, CardMetadata

PREVIEW_SUFFIXES = ("png", "jpg", "jpeg", "webp", "gif")
CARD_SIZE = 160  # pixels a side
MAX_CARDS = 200  # a folder of thousands shows its first cards; the search finds the others
_CARD_COLOUR, _TEXT_COLOUR = (55, 65, 81), (229, 231, 235)


def preview_path(model_file: Path) -> Path | None:
    """The preview picture beside a model file, as A1111 looks for it; None when there is none."""
    base = model_file.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        for candidate in (base.with_name(f"{base.name}.{suffix}"), base.with_name(f"{base.name}.preview.{suffix}")):
            if candidate.is_file():
                return candidate
    return None


def matching(files: list[tuple[str, Path | None]], search: str | None) -> list[tuple[str, Path | None]]:
    """The (name, file) pairs whose name holds every word of the search (any case), at most MAX_CARDS."""
    words = (search or "").lower().split()
    return [pair for pair in files if all(word in pair[0].lower() for word in words)][:MAX_CARDS]


class CardPictures:
    """The cards' pictures: previews made small (kept by file and its stamp) and name cards (kept by name)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._made: dict[tuple, Image.Image] = {}

    def picture(self, name: str, model_file: Path | None) -> Image.Image:
        preview = preview_path(model_file) if model_file is not None else None
        key = (preview, file_stamp(preview)) if preview is not None else ("name", name)
        with self._lock:
            made = self._made.get(key)
        if made is None:
            made = _thumbnail(preview) if preview is not None else None
            made = made or _name_card(name)  # an unreadable preview shows the name instead
            with self._lock:
                self._made[key] = made
        return made

    def gallery(self, files: list[tuple[str, Path | None]], search: str | None) -> list[tuple[Image.Image, str]]:
        """The Gallery's value: the matching files' pictures, each captioned with its name."""
        return [(self.picture(name, path), name) for name, path in matching(files, search)]


def _thumbnail(preview: Path) -> Image.Image | None:
    try:
        with Image.open(preview) as opened:
            opened.draft("RGB", (CARD_SIZE * 2, CARD_SIZE * 2))  # JPEG: decode at a fraction of the size
            picture = upright(opened).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return ImageOps.fit(picture, (CARD_SIZE, CARD_SIZE), Image.Resampling.LANCZOS)


def _name_card(name: str) -> Image.Image:
    card = Image.new("RGB", (CARD_SIZE, CARD_SIZE), _CARD_COLOUR)
    lines = textwrap.wrap(name, width=16, break_long_words=True)[:6]
    ImageDraw.Draw(card).multiline_text((CARD_SIZE // 2, CARD_SIZE // 2), "\n".join(lines), fill=_TEXT_COLOUR,
                                        anchor="mm", align="center", font_size=14)
    return card


def picked_name(evt: gr.SelectData, files: list[tuple[str, Path | None]], search: str | None) -> str | None:
    """The name on the card clicked: its caption, else the card at that place among those the search shows."""
    value: Any = evt.value
    if isinstance(value, dict) and value.get("caption"):
        return value["caption"]
    shown = matching(files, search)
    index = evt.index if isinstance(evt.index, int) else None
    return shown[index][0] if index is not None and 0 <= index < len(shown) else None


def card_gallery(elem_id: str) -> tuple[gr.Textbox, gr.Gallery]:
    """A search box and the cards, to fill inside a section."""
    search = gr.Textbox("", label="Search", placeholder="words of the name", elem_id=f"{elem_id}_search",
                        max_lines=1, container=False)
    # jpeg: each page load sends every card, and a small JPEG is made several times faster than a PNG
    gallery = gr.Gallery(label="Cards", show_label=False, elem_id=f"{elem_id}_cards", columns=6, height=240,
                         object_fit="cover", allow_preview=False, interactive=False, buttons=[], format="jpeg")
    return search, gallery


# The LoRA section's metadata editor (A1111's card editor, in short): its widgets' names and labels, in the order the
# actions take and give their values.
METADATA_FIELDS = {"description": "Description", "activation_text": "Activation text",
                   "preferred_weight": "Preferred weight", "negative_text": "Negative text", "notes": "Notes"}


def metadata_values(metadata: CardMetadata) -> tuple:
    """The editor's values for a card's metadata."""
    return tuple(getattr(metadata, name) for name in METADATA_FIELDS)


def edited_metadata(saved: CardMetadata, values: tuple) -> CardMetadata:
    """The saved metadata with the editor's values in (an emptied number box: weight 0); keys it does not show, such
    as sd version, kept."""
    edited = dict(zip(METADATA_FIELDS, values))
    edited["preferred_weight"] = float(edited["preferred_weight"] or 0.0)
    return replace(saved, **{name: value if name == "preferred_weight" else (value or "")
                             for name, value in edited.items()})


def with_card_texts(prompt: str, negative: str, metadata: CardMetadata) -> tuple[str, str]:
    """The prompts with a clicked card's activation text after the prompt's end and its negative text at the negative
    prompt's end, as A1111's card click puts them; either left out where the prompt holds it already."""
    activation, negative_text = metadata.activation_text.strip(), metadata.negative_text.strip()
    if activation and not _holds(prompt, activation):
        prompt = f"{prompt.rstrip()} {activation}".lstrip()
    if negative_text and not _holds(negative or "", negative_text):
        negative = f"{negative.rstrip().rstrip(',')}, {negative_text}" if (negative or "").strip() else negative_text
    return prompt, negative


def _holds(prompt: str, words: str) -> bool:
    """Whether the prompt's text has the words as words (not "ink" inside "pink"), outside its <...> tags (a trigger
    word that is also the LoRA's name is not in the prompt for its tag)."""
    text = re.sub(r"<[^<>]*>", " ", prompt)
    return re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text, flags=re.IGNORECASE) is not None


def metadata_editor(elem_id: str, editable: bool) -> tuple[dict[str, gr.components.Component], gr.Button]:
    """The editor's widgets (METADATA_FIELDS order) and its Save button, shown where the server lets a visitor change
    files all share."""
    with gr.Accordion("Metadata", open=False, elem_id=f"{elem_id}_metadata"):
        widgets = {"description": gr.Textbox(label="Description", lines=2, elem_id=f"{elem_id}_description",
                                              interactive=editable)}
        with gr.Row():
            widgets["activation_text"] = gr.Textbox(
                label="Activation text", elem_id=f"{elem_id}_activation_text", interactive=editable,
                info="put after the tag when its card is clicked (trigger words)", scale=3)
            widgets["preferred_weight"] = gr.Number(
                0, label="Preferred weight", minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, step=0.05, scale=1,
                elem_id=f"{elem_id}_preferred_weight", interactive=editable,
                info="a card click's weight; 0: the Weight slider's")
        widgets["negative_text"] = gr.Textbox(label="Negative text", elem_id=f"{elem_id}_negative_text",
                                              interactive=editable,
                                              info="put into the negative prompt when its card is clicked")
        widgets["notes"] = gr.Textbox(label="Notes", lines=2, elem_id=f"{elem_id}_notes", interactive=editable)
        save = gr.Button("Save metadata", elem_id=f"{elem_id}_metadata_save", size="sm", visible=editable)
    return widgets, save
