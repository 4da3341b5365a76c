"""The History tab: past images from the SQLite history, newest first, paged and searchable.

Selecting a thumbnail shows the image full size with its parameters, and offers to send them to
txt2img (or the image with them to img2img), open the file, or delete it (after a second click on
"Delete for good": the file goes too).
A timer notices images finished by any session or the API.
"""
from __future__ import annotations

import datetime as dt
import html
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from webui.services import Services
from webui.storage.history import HistoryImage
from webui.ui.params import fields_from_history
from webui.ui.pnginfo import send_buttons

PAGE_SIZE = 24
POLL_SECONDS = 3.0
_GONE = "This image is no longer in the history (deleted in another tab?); pick another one."


@dataclass
class HistoryTab:
    search: gr.Textbox
    page: gr.State
    ids: gr.State
    selected: gr.State
    seen: gr.State  # fingerprint of the history when this session last loaded it
    gallery: gr.Gallery
    page_info: gr.HTML
    newer: gr.Button
    older: gr.Button
    image: gr.Image
    details: gr.Textbox
    send: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button
    open_file: gr.Button
    delete: gr.Button
    confirm_row: gr.Row  # "Delete for good" and "Keep", shown after Delete is clicked
    confirm_delete: gr.Button
    keep: gr.Button

    @property
    def page_outputs(self) -> list:
        return [self.page, self.ids, self.gallery, self.page_info, self.newer, self.older]

    @property
    def detail_outputs(self) -> list:
        return [self.selected, self.image, self.details, self.open_file, self.delete, self.confirm_row]

    @property
    def reload_outputs(self) -> list:
        return [*self.page_outputs, self.seen, *self.detail_outputs]


class HistoryActions:
    def __init__(self, services: Services):
        self.history = services.history
        self.outputs = services.outputs
        self.can_delete = not services.settings.open_to_anyone  # else anyone could wipe everyone's images

    def load_page(self, page: int, search: str, selected: int | None = None):
        """(page, ids on the page, the gallery's update, page info, Newer, Older) for a page, clamped to the pages
        there are; Newer and Older are greyed out where there is no page to go to.
        The gallery's highlight goes to the selected image wherever the page now has it, or nowhere: a reload
        after another tab's image shifts the thumbnails, and a highlight left in place marks another image
        than the one Delete would remove."""
        search = search or ""
        page = max(int(page or 0), 0)
        # The total comes with the page read: that read finds the files deleted by hand on this page.
        rows, total = self.history.list_images(page, PAGE_SIZE, search)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        while page >= pages:  # past the end (a stale page number, or files gone): the last page, which reading may
            page = pages - 1  # find gone by hand too, and so shorten the pages again
            rows, total = self.history.list_images(page, PAGE_SIZE, search)
            pages = max(1, math.ceil(total / PAGE_SIZE))
        # Rows whose file is gone are left out: there is nothing to show for them.
        shown = [(row, path) for row in rows if (path := self._file(row)) is not None]
        items = [(str(path), _caption(row)) for row, path in shown]
        info = f"Page {page + 1} of {pages} · {total} image{'s' if total != 1 else ''}"
        if search.strip():
            info += f" matching “{html.escape(search.strip())}”"
        ids = [row.id for row, _ in shown]
        gallery = gr.update(value=items, selected_index=ids.index(selected) if selected in ids else None)
        return (page, ids, gallery, f"<span class='dw-page-info' title='{info}'>{info}</span>",
                gr.update(interactive=page > 0), gr.update(interactive=page < pages - 1))

    def first_page(self, search: str, selected: int | None = None):
        return self.load_page(0, search, selected)

    def previous_page(self, page: int, search: str, selected: int | None = None):
        return self.load_page(int(page or 0) - 1, search, selected)

    def next_page(self, page: int, search: str, selected: int | None = None):
        return self.load_page(int(page or 0) + 1, search, selected)

    def fingerprint(self) -> list:
        """A cheap fingerprint of the history, for the timer every open page runs (any change reloads the
        page, whatever the search: the reload counts what it shows)."""
        return list(self.history.fingerprint())

    def reload(self, page: int, search: str, selected: int | None = None):
        """The page as it is now, the fingerprint the timer compares against, and the detail view emptied when
        its image is gone (deleted in another tab: its buttons could only fail)."""
        row = self.history.get_image(selected) if selected is not None else None
        gone = selected is not None and (row is None or self._file(row) is None)
        details = _nothing_selected() if gone else (gr.skip(),) * len(_nothing_selected())
        return *self.load_page(page, search, selected), self.fingerprint(), *details

    def poll(self, page: int, search: str, seen: list | None, selected: int | None = None):
        """Reload the page only when the history changed since this session last looked."""
        if self.fingerprint() == seen:
            return (gr.skip(),) * (7 + len(_nothing_selected()))  # the page's six, the fingerprint, the details
        return self.reload(page, search, selected)

    def select(self, ids: list[int], evt: gr.SelectData):
        """Show one image: (selected id, full-size image, parameters, Open file, Delete, the confirm row)."""
        index = evt.index if isinstance(evt.index, int) else -1
        if not 0 <= index < len(ids):
            return _nothing_selected()
        return self.show(ids[index])

    def show(self, image_id: int | None):
        """(selected id, image, parameters, Open file, Delete, the confirm row) for one image."""
        row = self.history.get_image(image_id) if image_id is not None else None
        path = self._file(row) if row else None
        if row is None or path is None:
            return _nothing_selected()
        return (row.id, str(path), _details(row), gr.update(link=_file_link(path), interactive=True),
                gr.update(interactive=True), gr.update(visible=False))

    def delete(self, image_id: int | None, page: int, search: str):
        """Delete the file and its row; outputs: the page, then the emptied detail view."""
        if not self.can_delete:
            raise gr.Error("Deleting is off on a server shared without --gradio-auth.")
        if image_id is None:
            raise gr.Error("Select an image first.")
        if self.history.get_image(image_id) is None:
            raise gr.Error(_GONE)
        try:
            self.history.delete_image(image_id)
        except (OSError, sqlite3.Error) as err:  # a read-only folder, a file in use, a locked database: kept
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise gr.Error(f"The picture could not be deleted ({reason}); it is still there. Check that the outputs "
                           "folder can be written to, then try again.") from None
        return *self.load_page(page, search), *_nothing_selected()

    def fields(self, image_id: int | None) -> dict:
        return fields_from_history(self._selected_row(image_id))

    def picture_and_fields(self, image_id: int | None) -> tuple[str, dict]:
        """The image's file and its parameters, for Send to img2img."""
        row = self._selected_row(image_id)
        path = self._file(row)
        if path is None:
            raise gr.Error(_GONE)
        return str(path), fields_from_history(row)

    def _selected_row(self, image_id: int | None) -> HistoryImage:
        if image_id is None:
            raise gr.Error("Select an image first.")
        row = self.history.get_image(image_id)
        if row is None:
            raise gr.Error(_GONE)
        return row

    def _file(self, row: HistoryImage) -> Path | None:
        """The file on disk, through OutputStore.resolve so no row can point outside outdir."""
        try:
            path = self.outputs.resolve(row.path)
        except ValueError:
            return None
        return path if path.is_file() else None


def _nothing_selected() -> tuple:
    """The detail view with no image: empty, Open file and Delete greyed out, no confirm row."""
    return (None, None, "", gr.update(link=None, interactive=False), gr.update(interactive=False),
            gr.update(visible=False))


def _caption(row: HistoryImage) -> str:
    prompt = row.prompt if len(row.prompt) <= 60 else row.prompt[:57] + "…"
    return f"{prompt} (seed {row.seed})"


def _details(row: HistoryImage) -> str:
    made = dt.datetime.fromtimestamp(row.created_at).strftime("%Y-%m-%d %H:%M:%S")
    seconds = f", {row.seconds:.1f} s" if row.seconds else ""
    return f"{row.infotext}\n\nFile: {row.path} · made {made}{seconds}"


def _file_link(path: Path) -> str:
    # Relative, so it also works behind a share link or a proxy path; launch() allows outdir.
    return f"gradio_api/file={quote(str(path))}"


def build_history(services: Services) -> tuple[HistoryTab, HistoryActions]:
    actions = HistoryActions(services)
    # Filled on page load (see blocks.py), so every new tab sees the history as it is then.
    page_state, ids_state, selected, seen = gr.State(0), gr.State([]), gr.State(None), gr.State(None)
    with gr.Row():
        search = gr.Textbox(label="Search prompts", placeholder="Search prompts", elem_id="history_search",
                            scale=4)
        refresh = gr.Button("↻", elem_id="history_refresh", scale=0, min_width=48)
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                # Narrow enough for the three to share a line down to an 800 px window.
                previous = gr.Button("◀ Newer", elem_id="history_prev", size="sm", min_width=80)
                page_info = gr.HTML("", label="Page", show_label=False, elem_id="history_page_info", padding=False)
                following = gr.Button("Older ▶", elem_id="history_next", size="sm", min_width=80)
            # Columns follow the width (webui.css); fit_columns=False keeps a short page's thumbnails small.
            gallery = gr.Gallery(label="History", elem_id="history_gallery", columns=6, height=480,
                                 allow_preview=False, object_fit="cover", interactive=False,
                                 fit_columns=False)
        with gr.Column(scale=2):
            image = gr.Image(label="Selected image", interactive=False, elem_id="history_image", type="filepath",
                             format="png", buttons=["download", "fullscreen"])  # no Share: it fails off Spaces
            details = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="history_details",
                                 buttons=["copy"])
            with gr.Row():
                send, send_img2img, send_inpaint, send_extras = send_buttons("history")
                open_file = gr.Button("Open file", elem_id="history_open", link_target="_blank", interactive=False)
                delete = gr.Button("Delete", variant="stop", elem_id="history_delete", visible=actions.can_delete,
                                   interactive=False)
            # A second click, because a delete cannot be undone: the file is removed from disk too.
            with gr.Row(visible=False, elem_id="history_confirm_row") as confirm_row:
                confirm_delete = gr.Button("Delete for good", variant="stop", elem_id="history_confirm_delete")
                keep = gr.Button("Keep", elem_id="history_keep")
    timer = gr.Timer(POLL_SECONDS)

    tab = HistoryTab(search, page_state, ids_state, selected, seen, gallery, page_info, previous, following, image,
                     details, send, send_img2img, send_inpaint, send_extras, open_file, delete, confirm_row, confirm_delete, keep)
    detail_outputs = tab.detail_outputs
    search.submit(actions.first_page, inputs=[search, selected], outputs=tab.page_outputs, api_name="history_search",
                  show_progress="hidden")
    refresh.click(actions.reload, inputs=[page_state, search, selected], outputs=tab.reload_outputs,
                  api_name="history_page", show_progress="hidden")
    previous.click(actions.previous_page, inputs=[page_state, search, selected], outputs=tab.page_outputs,
                   api_visibility="private", show_progress="hidden")
    following.click(actions.next_page, inputs=[page_state, search, selected], outputs=tab.page_outputs,
                    api_visibility="private", show_progress="hidden")
    gallery.select(actions.select, inputs=[ids_state], outputs=detail_outputs, api_visibility="private",
                   show_progress="hidden")
    delete.click(lambda: gr.update(visible=True), outputs=[confirm_row], api_visibility="private",
                 show_progress="hidden")
    keep.click(lambda: gr.update(visible=False), outputs=[confirm_row], api_visibility="private",
               show_progress="hidden")
    confirm_delete.click(actions.delete, inputs=[selected, page_state, search],
                         outputs=[*tab.page_outputs, *detail_outputs], api_name="history_delete",
                         show_progress="hidden")
    timer.tick(actions.poll, inputs=[page_state, search, seen, selected], outputs=tab.reload_outputs,
               api_visibility="private", show_progress="hidden")
    return tab, actions
