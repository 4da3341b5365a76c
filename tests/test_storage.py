"""Output files (naming, counter, atomic writes, grids) and the SQLite history."""
import hashlib
import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from webui.storage.history import History
from webui.storage.outputs import NamedCopy, OutputStore, grid_rows, highest_number, make_grid, read_infotext


def red(size=(8, 8)):
    return Image.new("RGB", size, "red")


def history_row(job_id, path, prompt="a cat", seed=1):
    return dict(job_id=job_id, path=path, prompt=prompt, negative_prompt="", seed=seed, steps=2, sampler="Euler",
                scheduler="Automatic", cfg_scale=7.0, width=8, height=8, clip_skip=1, model_name="m",
                model_hash="0123456789", image_index=0, nsfw=False, seconds=0.1, infotext=f"{prompt}\nSeed: {seed}")


def test_names_follow_a1111_and_carry_the_infotext(tmp_path):
    store = OutputStore(tmp_path)
    first = store.save_image(red(), "a cat\nSteps: 2, Seed: 5, Size: 8x8", seed=5)
    second = store.save_image(red(), "x", seed=6)
    assert first.parent == store.image_folder("txt2img")
    assert first.parent.parent.name == "txt2img-images"
    assert (first.name, second.name) == ("00000-5.png", "00001-6.png")
    with Image.open(first) as png:
        assert read_infotext(png) == "a cat\nSteps: 2, Seed: 5, Size: 8x8"


def test_the_directory_name_pattern_makes_the_subfolders_and_never_leaves_the_image_folder(tmp_path):
    import datetime as dt

    from webui.storage.filenames import NameParts
    from webui.storage.options import OptionsStore

    options = OptionsStore(None)
    store = OutputStore(tmp_path, options)
    parts = NameParts(seed=5, prompt="a cat, on a mat", model_name="sd/v1")
    images = tmp_path / "txt2img-images"
    assert store.save_image(red(), "x", 5, name_parts=parts).parent == images / dt.date.today().isoformat()
    # A1111's "/" nests folders; a tag's own "/" does not, and ".", ".." and what comes out empty are left out
    options.update({"directories_filename_pattern": "[model_name]/../[prompt_words]/./[none]"})
    nested = images / "sd_v1" / "a cat on a mat"
    assert store.save_image(red(), "x", 5, name_parts=parts).parent == nested
    # a tag's own "/" is cleaned after the tag is filled in (it was split first, leaving "[datetime_%Y" as a folder)
    options.update({"directories_filename_pattern": "[datetime<%Y/%m>]\\[seed]"})
    assert store.save_image(red(), "x", 5, name_parts=parts).parent == images / dt.date.today().strftime("%Y_%m") / "5"
    options.update({"directories_filename_pattern": ""})  # empty: A1111's [prompt_words]
    assert store.save_image(red(), "x", 5, name_parts=parts).parent == images / "a cat on a mat"
    options.update({"save_to_dirs": False})
    flat = store.save_image(red(), "x", 6, name_parts=parts)
    assert flat.parent == images and flat.name.endswith("-5-a cat, on a mat.png")  # A1111's [seed]-[prompt_spaces]
    assert store.save_grid(red(), "x", name_parts=parts).parent == tmp_path / "txt2img-grids" / "a cat on a mat"
    partial = nested / ".partial-cut-short.png"
    partial.write_bytes(b"half")
    os.utime(partial, (0, 0))
    assert store.remove_partial_files() == 1 and not partial.exists()


def test_counter_continues_after_a_restart(tmp_path):
    OutputStore(tmp_path).save_image(red(), "x", seed=1)
    OutputStore(tmp_path).save_image(red(), "x", seed=1)
    again = OutputStore(tmp_path).save_image(red(), "x", seed=9)
    assert again.name == "00002-9.png"
    assert highest_number(again.parent) == 2


def test_the_counter_goes_on_past_99999(tmp_path):
    store = OutputStore(tmp_path)
    folder = store.image_folder("txt2img")
    folder.mkdir(parents=True)
    (folder / "99999-1.png").write_bytes(b"")
    names = [store.save_image(red(), "x", seed=7).name for _ in range(2)]  # the same seed twice
    assert names == ["100000-7.png", "100001-7.png"]


def test_a_folder_whose_numbers_are_always_taken_is_an_error_not_a_hang(tmp_path, monkeypatch):
    def taken(source, target):
        raise FileExistsError(target)

    monkeypatch.setattr(os, "link", taken)
    with pytest.raises(FileExistsError, match="no free file number"):
        OutputStore(tmp_path).save_image(red(), "x", seed=1)
    assert list(OutputStore(tmp_path).image_folder("txt2img").iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = OutputStore(tmp_path)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        store.save_image(red(), "x", seed=1)
    assert list(store.image_folder("txt2img").iterdir()) == []


def test_a_named_copy_takes_its_name_and_never_replaces_a_file(tmp_path):
    """img2img Batch's Output directory: <name>.<format>; a taken name (here the input picture itself) gets -1, -2."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    red().save(folder / "cat.png")
    source = (folder / "cat.png").read_bytes()
    store = OutputStore(tmp_path / "out")
    copies = [store.save_named(red(), f"a cat\nSeed: {seed}", NamedCopy(folder, "cat")) for seed in (1, 2)]
    assert [path.name for path in copies] == ["cat-1.png", "cat-2.png"]
    assert (folder / "cat.png").read_bytes() == source  # the input is left as it was
    with Image.open(copies[1]) as png:
        assert read_infotext(png) == "a cat\nSeed: 2"
    store.options.update({"samples_format": "jpg"})
    assert store.save_named(red(), "x", NamedCopy(folder, "dog")).name == "dog.jpg"
    (folder / "bird.png").symlink_to(tmp_path / "elsewhere.png")  # a link, even a dangling one, is a taken name
    assert store.save_named(red(), "x", NamedCopy(folder, "bird")).name == "bird.jpg"
    store.options.update({"samples_format": "png"})
    assert store.save_named(red(), "x", NamedCopy(folder, "bird")).name == "bird-1.png"
    assert not (tmp_path / "elsewhere.png").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["bird-1.png", "bird.jpg", "bird.png", "cat-1.png",
                                                        "cat-2.png", "cat.png", "dog.jpg"]  # no temporary left
    for stem in ("../up", "..", ""):
        with pytest.raises(ValueError, match="cannot be a file name"):
            store.save_named(red(), "x", NamedCopy(folder, stem))
    assert store.save_named(red(), "x", NamedCopy(folder, "é" * 300)).name == "é" * 100 + ".png"  # 200 bytes


# A1111's image_grid: (pictures, n_rows, batch size, prevent empty spots) -> rows, worked out by hand from its rules
@pytest.mark.parametrize("count, n_rows, batch, prevent, rows", [
    (1, -1, 1, False, 1), (2, -1, 1, False, 1), (3, -1, 1, False, 2), (5, -1, 1, False, 2), (7, -1, 1, False, 3),
    (12, -1, 1, False, 3), (13, -1, 1, False, 4),
    (7, -1, 1, True, 1), (12, -1, 1, True, 3), (10, -1, 1, True, 2), (8, -1, 1, True, 2),
    (6, 0, 3, False, 3), (6, 0, 1, False, 1), (4, 3, 1, False, 3), (2, 5, 1, False, 2)])
def test_the_grid_row_count_is_a1111s(count, n_rows, batch, prevent, rows):
    assert grid_rows(count, n_rows, batch, prevent) == rows


def test_a_grid_of_set_rows_leaves_the_last_places_empty():
    grid = make_grid([red((4, 4))] * 5, rows=4)  # 2 columns, 4 rows: the 8th place empty and white
    assert grid.size == (8, 16) and grid.getpixel((6, 14)) == (255, 255, 255) and grid.getpixel((2, 10)) == (255, 0, 0)


def test_grid_is_near_square_and_saved_apart(tmp_path):
    grid = make_grid([red((4, 4))] * 5)
    assert grid.size == (12, 8)
    store = OutputStore(tmp_path)
    first, second = store.save_grid(grid, "x"), store.save_grid(grid, "x")
    assert first.parent.parent.name == "txt2img-grids"
    assert (first.name, second.name) == ("grid-0000.png", "grid-0001.png")


def test_two_stores_sharing_a_folder_never_overwrite_each_other(tmp_path):
    a, b = OutputStore(tmp_path), OutputStore(tmp_path)
    paths = [a.save_image(red(), "a", seed=1), b.save_image(red(), "b", seed=1),
             a.save_image(red(), "a2", seed=1), b.save_image(red(), "b2", seed=1)]
    assert len({p.name for p in paths}) == 4
    texts = []
    for path in paths:
        with Image.open(path) as png:
            texts.append(read_infotext(png))
    assert texts == ["a", "b", "a2", "b2"]
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".partial-")]


def test_stores_sharing_a_folder_take_consecutive_numbers(tmp_path):
    # Different seeds, so a cached counter can't notice the clash by the whole name.
    a, b = OutputStore(tmp_path), OutputStore(tmp_path)
    paths = [store.save_image(red(), "x", seed=seed) for seed, store in enumerate([a, b, a, b, a], start=1)]
    assert [p.name for p in paths] == ["00000-1.png", "00001-2.png", "00002-3.png", "00003-4.png", "00004-5.png"]


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=oct)
def test_saved_files_are_readable_as_the_umask_allows(tmp_path, umask):
    store = OutputStore(tmp_path)
    old_umask = os.umask(umask)  # set a known umask rather than read the process's (os.umask only swaps)
    try:
        paths = [store.save_image(red(), "x", seed=1), store.save_grid(red(), "x")]
    finally:
        os.umask(old_umask)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o666 & ~umask] * 2


A1111_TEXT = "ünïcode 猫, (cat:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 7, Size: 8x8"


def with_user_comment(tmp_path, image_format, comment: bytes):
    """An image file carrying an EXIF UserComment, as stable-diffusion-webui saves JPEG and WebP."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    path = tmp_path / f"a1111.{image_format.lower()}"
    red().save(path, format=image_format, exif=exif)
    return path


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
@pytest.mark.parametrize("comment", [
    b"UNICODE\0" + A1111_TEXT.encode("utf-16-be"),  # what A1111 writes (piexif's "unicode")
    b"UNICODE\0" + A1111_TEXT.encode("utf-16-le"),
    b"UNICODE\0" + A1111_TEXT.encode("utf-16"),  # with a byte order mark
    b"ASCII\0\0\0" + A1111_TEXT.encode("utf-8"),
], ids=["utf16be", "utf16le", "bom", "ascii"])
def test_reads_the_infotext_of_a1111_jpeg_and_webp_files(tmp_path, image_format, comment):
    with Image.open(with_user_comment(tmp_path, image_format, comment)) as image:
        assert read_infotext(image) == A1111_TEXT


def test_an_empty_or_unknown_user_comment_is_no_infotext(tmp_path):
    for comment in (b"UNICODE\0", b"JIS\0\0\0\0\0" + b"abc", b"\0" * 8):
        with Image.open(with_user_comment(tmp_path, "JPEG", comment)) as image:
            assert read_infotext(image) is None


def test_paths_are_recorded_with_slashes_and_windows_ones_are_read_anywhere(tmp_path):
    from pathlib import PureWindowsPath

    history = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        history.add_job("j1", "ui", {}, 1.0)
        (tmp_path / "day").mkdir()
        (tmp_path / "day" / "a.png").write_bytes(b"png")
        written = history.add_image(**history_row("j1", PureWindowsPath("day\\a.png")))
        old_row = history.add_image(**history_row("j1", "day\\a.png"))  # as a str, the way it once was stored
        assert history.get_image(written).path == "day/a.png"
        assert history.reconcile()["missing_files"] == 0
        assert OutputStore(tmp_path).resolve(history.get_image(old_row).path) == tmp_path / "day" / "a.png"
    finally:
        history.close()


def test_a_huge_image_is_not_decoded_to_look_for_parameters(tmp_path, monkeypatch):
    """A small PNG of a huge blank image would decode to gigabytes; past MAX_SCANNED_PIXELS only the
    chunks before the pixels are read (where we and A1111 put the parameters)."""
    import webui.storage.outputs as outputs_module
    from PIL import PngImagePlugin

    from webui.ui.pnginfo import read_parameters

    monkeypatch.setattr(outputs_module, "MAX_SCANNED_PIXELS", 63 * 63)
    monkeypatch.setattr("webui.ui.pnginfo.MAX_SCANNED_PIXELS", 63 * 63)
    red((64, 64)).save(tmp_path / "plain.png")
    OutputStore(tmp_path).save_image(red((64, 64)), "a cat\nSeed: 5", seed=5)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with Image.open(tmp_path / "plain.png") as image:
        assert read_infotext(image) is None
    assert "carries no generation parameters" in read_parameters(str(tmp_path / "plain.png"))[1]
    saved = next(OutputStore(tmp_path).image_folder("txt2img").iterdir())
    assert read_parameters(str(saved))[0] == "a cat\nSeed: 5"


def test_paths_outside_outputs_are_refused(tmp_path):
    store = OutputStore(tmp_path / "out")
    assert store.resolve("txt2img-images/a.png") == (tmp_path / "out" / "txt2img-images" / "a.png").resolve()
    for bad in ("../secret.png", "/etc/passwd", "txt2img-images/../../x"):
        with pytest.raises(ValueError, match="outside the outputs folder"):
            store.resolve(bad)


def img2img_and_grid_folders(store, *first) -> list:
    """The output folders served besides a linked txt2img-images: these, then img2img's and Extras'."""
    return [(store.outdir / name).resolve() for name in (*first, "img2img-images", "img2img-grids", "extras-images")]


def test_a_folder_linked_to_another_disk_counts_as_inside_outputs(tmp_path):
    from webui.launch import served_folders

    bigger_disk = tmp_path / "bigdisk"
    bigger_disk.mkdir()
    store = OutputStore(tmp_path / "out")
    store.outdir.mkdir()
    (store.outdir / "txt2img-images").symlink_to(bigger_disk, target_is_directory=True)
    saved = store.save_image(red(), "x", seed=3)
    assert store.resolve(saved.relative_to(store.outdir)) == saved and bigger_disk in saved.resolve().parents
    history = History(store.outdir / "history.sqlite3", store.outdir)
    try:
        history.add_job("j1", "ui", {}, 1.0)
        image_id = history.add_image(**history_row("j1", saved.relative_to(store.outdir)))
        assert history.reconcile()["missing_files"] == 0 and [r.id for r in history.list_images()[0]] == [image_id]
    finally:
        history.close()
    assert served_folders(store) == [bigger_disk.resolve(), *img2img_and_grid_folders(store, "txt2img-grids")]
    assert (store.outdir / "history.sqlite3").is_file() and store.outdir.resolve() not in served_folders(store)


def test_a_folder_linked_to_a_disk_not_mounted_is_served_once_it_is_back(tmp_path, caplog):
    """The link stays (never replaced by a folder on the wrong disk); saving fails until the disk is back."""
    from webui.launch import served_folders

    unmounted = tmp_path / "bigdisk" / "outputs"
    store = OutputStore(tmp_path / "out")
    store.outdir.mkdir()
    link = store.outdir / "txt2img-images"
    link.symlink_to(unmounted, target_is_directory=True)
    folders = served_folders(store)
    assert folders == [unmounted.resolve(), *img2img_and_grid_folders(store, "txt2img-grids")]
    assert f"{link} links to {unmounted.resolve()}, which does not exist" in caplog.text and "mount" in caplog.text
    assert link.is_symlink()
    with pytest.raises(OSError):
        store.save_image(red(), "x", seed=1)
    unmounted.mkdir(parents=True)  # the disk is mounted
    assert served_folders(store) == folders and store.save_image(red(), "x", seed=1).parent.parent == link


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "history.sqlite3", tmp_path)
    yield h
    h.close()


def test_history_add_list_search_get(history, tmp_path):
    history.add_job("j1", "ui", {"prompt": "x"}, 1.0)
    for i in range(3):
        (tmp_path / f"f{i}.png").write_bytes(b"png")
    ids = [history.add_image(**history_row("j1", f"f{i}.png", prompt=p, seed=i))
           for i, p in enumerate(["red apple", "green apple", "a dog 100%"])]
    rows, total = history.list_images(page_size=2)
    assert total == 3 and [r.id for r in rows] == [ids[2], ids[1]]  # newest first
    rows, _ = history.list_images(page=1, page_size=2)
    assert [r.id for r in rows] == [ids[0]]
    rows, total = history.list_images(search="apple")
    assert total == 2 and {r.prompt for r in rows} == {"red apple", "green apple"}
    assert history.list_images(search="100%")[1] == 1  # % and _ are no wildcards
    assert history.list_images(search="_")[1] == 0
    one = history.get_image(ids[1])
    assert (one.prompt, one.seed, one.job_state, one.model_hash) == ("green apple", 1, "queued", "0123456789")
    assert history.get_image(9999) is None


def test_history_search_ignores_case_beyond_ascii(history, tmp_path):
    history.add_job("j1", "ui", {"prompt": "x"}, 1.0)
    for i, prompt in enumerate(["Ünïcode cat", "a ÜNÏCODE dog", "unicode", "Straße at night", "ΣΊΣΥΦΟΣ"]):
        (tmp_path / f"{i}.png").write_bytes(b"png")  # one row per file
        history.add_image(**history_row("j1", f"{i}.png", prompt=prompt))

    def found(search):
        rows, total = history.list_images(search=search)
        assert total == len(rows)
        return sorted(r.prompt for r in rows)

    assert found("ünïcode") == ["a ÜNÏCODE dog", "Ünïcode cat"]
    assert found("STRASSE") == ["Straße at night"]
    assert found("σίσυφος") == ["ΣΊΣΥΦΟΣ"]


def test_job_states_are_recorded(history):
    history.add_job("j1", "api", {"prompt": "x"}, 1.0)
    history.set_job_state("j1", "running", started_at=2.0)
    history.set_job_state("j1", "failed", error="boom", finished_at=3.0)
    job = history.get_job("j1")
    assert (job["state"], job["error"], job["started_at"], job["finished_at"], job["origin"]) == ("failed", "boom", 2.0, 3.0, "api")


def test_history_never_touches_files_outside_outputs(history, tmp_path):
    outside = tmp_path.parent / "precious.txt"
    outside.write_text("keep me")
    history.add_job("j1", "ui", {}, 1.0)
    image_id = history.add_image(**history_row("j1", "../precious.txt"))
    with pytest.raises(ValueError, match="outside the outputs folder"):
        history.delete_image(image_id)
    assert outside.read_text() == "keep me"
    assert history.reconcile()["missing_files"] == 0 and history.get_image(image_id).file_state == "missing"


def test_delete_removes_row_and_file(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "a.png").write_bytes(b"png")
    image_id = history.add_image(**history_row("j1", "a.png"))
    assert history.delete_image(image_id)
    assert not (tmp_path / "a.png").exists() and history.get_image(image_id) is None
    assert not history.delete_image(image_id)


def test_reconcile_marks_missing_files_and_stale_jobs(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    history.set_job_state("j1", "running", started_at=1.0)
    (tmp_path / "kept.png").write_bytes(b"png")
    kept = history.add_image(**history_row("j1", "kept.png"))
    lost = history.add_image(**history_row("j1", "lost.png"))
    assert history.reconcile() == {"missing_files": 1, "files_back": 0, "stale_jobs": 1, "rows_written_late": 0}
    assert history.get_image(kept).file_state == "ok"
    assert history.get_image(lost).file_state == "missing"
    rows, total = history.list_images()
    assert total == 1 and [r.id for r in rows] == [kept]  # pages count only what can be shown
    assert history.get_job("j1")["state"] == "failed"


def test_a_file_put_back_while_the_app_was_stopped_shows_again(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "day").mkdir()
    (tmp_path / "day" / "a.png").write_bytes(b"png")
    image_id = history.add_image(**history_row("j1", "day/a.png"))
    (tmp_path / "day").rename(tmp_path / "away")
    assert history.reconcile()["missing_files"] == 1 and history.list_images()[1] == 0
    (tmp_path / "away").rename(tmp_path / "day")
    assert history.reconcile()["files_back"] == 1 and [r.id for r in history.list_images()[0]] == [image_id]


def test_a_new_file_that_takes_a_vanished_files_name_replaces_its_row(history, tmp_path):
    """Same number, same seed, same name: after a restart the old row must not come back as a twin."""
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "00000-42.png").write_bytes(b"png")
    history.add_image(**history_row("j1", "00000-42.png", prompt="first prompt", seed=42))
    (tmp_path / "00000-42.png").unlink()
    assert history.list_images()[1] == 0  # noticed as missing
    (tmp_path / "00000-42.png").write_bytes(b"png")
    new = history.add_image(**history_row("j1", "00000-42.png", prompt="second prompt", seed=42))
    history.reconcile()
    assert [(r.id, r.prompt) for r in history.list_images()[0]] == [(new, "second prompt")]


def test_files_deleted_by_hand_leave_the_count_and_pages_right(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"png")
        history.add_image(**history_row("j1", f"{i}.png", seed=i))
    for i in (4, 3, 1):  # while the app runs, from a file manager
        (tmp_path / f"{i}.png").unlink()
    rows, total = history.list_images(0, 2)
    assert total == 2 and [r.seed for r in rows] == [2, 0]
    assert history.list_images(1, 2) == ([], 2)


def test_a_file_that_cannot_be_deleted_keeps_its_row(history, tmp_path, monkeypatch):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "a.png").write_bytes(b"png")
    image_id = history.add_image(**history_row("j1", "a.png"))

    def in_use(self, missing_ok=False):
        raise PermissionError("in use by another program")

    monkeypatch.setattr(type(tmp_path), "unlink", in_use)
    with pytest.raises(PermissionError):
        history.delete_image(image_id)
    monkeypatch.undo()
    assert (tmp_path / "a.png").exists() and history.get_image(image_id).file_state == "ok"


def test_a_text_file_that_cannot_be_deleted_leaves_no_row_for_the_deleted_picture(history, tmp_path, caplog):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "a.txt").mkdir()  # cannot be unlinked
    (tmp_path / "a.txt" / "x").write_text("x")
    image_id = history.add_image(**history_row("j1", "a.png"))
    assert history.delete_image(image_id)
    assert not (tmp_path / "a.png").exists() and history.get_image(image_id) is None  # no row saying "ok" for it
    assert "not the .txt file beside it" in caplog.text


def test_a_damaged_database_is_set_aside_and_a_new_history_begins(tmp_path, caplog):
    db = tmp_path / "history.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    fresh = History(db, tmp_path)
    try:
        assert fresh.list_images() == ([], 0)
        kept = [p.name for p in tmp_path.iterdir() if p.name.startswith("history.sqlite3.broken-")]
        assert len(kept) == 1 and (tmp_path / kept[0]).read_bytes().startswith(b"this is not a database")
        assert "cannot be read" in caplog.text and "images" in caplog.text
    finally:
        fresh.close()


def test_damage_deep_inside_the_database_is_found_at_start(tmp_path, caplog):
    db = tmp_path / "history.sqlite3"
    first = History(db, tmp_path)
    first.add_job("j1", "ui", {}, 1.0)
    for i in range(3000):
        first.add_image(**history_row("j1", f"{i:05d}.png", prompt=f"prompt number {i} " * 5))
    first.close()
    with open(db, "r+b") as handle:  # one page in the middle: the schema at the start still reads
        handle.seek(db.stat().st_size // 2 // 4096 * 4096)
        handle.write(b"\xde\xad" * 2048)
    fresh = History(db, tmp_path)  # the start reconciles the files: that read hit the damage and failed
    try:
        assert fresh.reconcile()["missing_files"] == 0 and fresh.list_images() == ([], 0)
        assert any(p.name.startswith("history.sqlite3.broken-") for p in tmp_path.iterdir())
        assert "cannot be read" in caplog.text
    finally:
        fresh.close()


def test_a_file_number_taken_again_owns_its_row(history, tmp_path):
    """The newest file deleted by hand, its number taken again before anyone listed the history: deleting
    the old row in History deleted the new picture."""
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "00001-42.png").write_bytes(b"a green pear")
    history.add_image(**history_row("j1", "00001-42.png", prompt="a green pear", seed=42))
    (tmp_path / "00001-42.png").unlink()
    (tmp_path / "00001-42.png").write_bytes(b"a blue car")
    new_id = history.add_image(**history_row("j1", "00001-42.png", prompt="a blue car", seed=42))
    rows, total = history.list_images()
    assert total == 1 and [(r.id, r.prompt) for r in rows] == [(new_id, "a blue car")]


def test_a_job_that_ends_well_keeps_no_old_error(history):
    history.add_job("j1", "api", {}, 1.0)
    history.set_job_state("j1", "failed", error="stopped by a restart")  # another server's start said so
    history.set_job_state("j1", "done", finished_at=2.0)
    assert history.get_job("j1")["error"] is None


@pytest.mark.parametrize("error", ["disk I/O error", "database is locked"])
def test_a_database_that_cannot_be_opened_is_kept_and_this_run_has_a_history_in_memory(
        tmp_path, monkeypatch, caplog, error):
    """A full disk (SQLite cannot make the -shm file for WAL) or a lock is no damage: the file stays as it
    is, and the app starts with a history that lasts this run, and says so."""
    import webui.storage.history as history_module

    db = tmp_path / "history.sqlite3"
    History(db, tmp_path).close()
    before = db.read_bytes()
    real_open, opened = history_module._open, []

    def fails_on_the_file(db_path):
        opened.append(db_path)
        if len(opened) == 1:
            raise sqlite3.OperationalError(error)
        return real_open(db_path)

    monkeypatch.setattr(history_module, "_open", fails_on_the_file)
    history = History(db, tmp_path)
    try:
        assert "in memory only" in caplog.text and error in caplog.text and "Free some disk space" in caplog.text
        history.add_job("j1", "ui", {}, 1.0)
        (tmp_path / "a.png").write_bytes(b"png")
        image_id = history.add_image(**history_row("j1", "a.png"))
        assert history.reconcile()["missing_files"] == 0 and [r.id for r in history.list_images()[0]] == [image_id]
    finally:
        history.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "history.sqlite3"] and db.read_bytes() == before


@pytest.fixture
def short_lock_wait(monkeypatch):
    """SQLite waits 5 s for a lock by default; a tenth of a second is enough to see it held."""
    import functools

    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.1))


def hold_write_lock(db_path):
    """A second connection, as another program, holding the database's write lock until closed."""
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_the_app_starts_while_another_program_holds_the_history_database(settings, short_lock_wait, caplog):
    from webui.services import build_services

    build_services(settings, load_model=False).close()
    other = hold_write_lock(settings.outdir / "history.sqlite3")
    try:
        services = build_services(settings, load_model=False)
        try:
            assert "could not be checked against the outputs folder" in caplog.text and "locked" in caplog.text
            assert services.history.list_images() == ([], 0) and services.worker.current() is None
        finally:
            services.close()
    finally:
        other.close()


def test_listing_works_while_the_database_is_locked_and_marks_hand_deleted_files_later(short_lock_wait, history,
                                                                                      tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"png")
        history.add_image(**history_row("j1", f"{i}.png", seed=i))
    (tmp_path / "1.png").unlink()  # by hand, while the app runs
    other = hold_write_lock(tmp_path / "history.sqlite3")
    try:
        rows, total = history.list_images()
        assert total == 2 and [r.seed for r in rows] == [2, 0]
    finally:
        other.close()
    assert history.list_images()[1] == 2
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:  # marked now that the lock is gone
        assert db.execute("SELECT seed FROM images WHERE file_state = 'missing'").fetchall() == [(1,)]


def test_a_newer_versions_extra_column_is_ignored(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "a.png").write_bytes(b"png")
    image_id = history.add_image(**history_row("j1", "a.png"))
    history.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        db.execute("ALTER TABLE images ADD COLUMN rating INTEGER")
        db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER")
        db.execute("PRAGMA user_version = 7")
    again = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        assert [r.id for r in again.list_images()[0]] == [image_id] and again.get_image(image_id).prompt == "a cat"
        again.add_image(**history_row("j1", "a.png"))
    finally:
        again.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:  # a newer version's number is left as it is
        assert db.execute("PRAGMA user_version").fetchone()[0] == 7


def test_the_schema_version_is_recorded(history, tmp_path):
    from webui.storage.history import SCHEMA_VERSION

    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1


def test_a_version_1_database_gets_the_jobs_owner_column_and_keeps_its_rows(history, tmp_path):
    history.add_job("j1", "ui", {}, 1.0)
    (tmp_path / "a.png").write_bytes(b"png")
    image_id = history.add_image(**history_row("j1", "a.png"))
    history.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:  # the jobs table as version 1 made it
        db.execute("ALTER TABLE jobs DROP COLUMN owner_key")
        db.execute("PRAGMA user_version = 1")
    again = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        assert [r.id for r in again.list_images()[0]] == [image_id]
        assert again.get_job("j1")["owner_key"] is None  # an old job has no owner: nobody's
        again.add_job("j2", "api", {}, 2.0, "alice")
        assert again.get_job("j2")["owner_key"] == hashlib.sha256(b"alice").hexdigest()
    finally:
        again.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


@pytest.mark.parametrize("column", ["nsfw", "path"])  # path has an index, which failed first, as if locked
def test_a_database_missing_a_column_is_set_aside(history, tmp_path, caplog, column):
    history.add_job("j1", "ui", {}, 1.0)
    history.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        db.execute("DROP INDEX IF EXISTS images_path")
        db.execute(f"ALTER TABLE images DROP COLUMN {column}")
    fresh = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        assert f"lacks the column(s) {column}" in caplog.text and fresh.get_job("j1") is None
        assert fresh.list_images() == ([], 0)
        assert any(p.name.startswith("history.sqlite3.broken-") for p in tmp_path.iterdir())
    finally:
        fresh.close()


def test_database_is_in_wal_mode(history, tmp_path):
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_row_needs_every_parameter(history):
    history.add_job("j1", "ui", {}, 1.0)
    row = history_row("j1", "a.png")
    del row["seed"]
    with pytest.raises(ValueError, match="seed"):
        history.add_image(**row)


def test_a_save_cut_short_by_a_crash_leaves_no_file_past_the_next_start(tmp_path):
    import os
    import time

    store = OutputStore(tmp_path)
    kept = store.save_image(red(), "x", seed=1)
    old, new = kept.parent / ".partial-0123.png", kept.parent / ".partial-4567.png"
    old.write_bytes(b"half a png")
    new.write_bytes(b"another server is writing this one now")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_partial_files() == 1
    assert not old.exists() and new.exists() and kept.exists()


def test_a_novelai_png_reads_as_a1111_reads_it(tmp_path):
    settings = {"steps": 28, "sampler": "k_euler", "seed": 1234, "scale": 11.0, "uc": "lowres, bad hands"}
    meta = PngInfo()
    for key, value in {"Title": "AI generated image", "Description": "1girl, cherry blossoms",
                       "Software": "NovelAI", "Comment": json.dumps(settings)}.items():
        meta.add_text(key, value)
    Image.new("RGB", (64, 96)).save(tmp_path / "nai.png", pnginfo=meta)
    with Image.open(tmp_path / "nai.png") as png:
        text = read_infotext(png)
    assert text == ("1girl, cherry blossoms\nNegative prompt: lowres, bad hands\nSteps: 28, Sampler: Euler, "
                    "CFG scale: 11, Seed: 1234, Size: 64x96, Clip skip: 2, ENSD: 31337")


def test_a_second_server_on_the_same_folder_leaves_the_first_ones_jobs_alone(settings):
    from webui.services import build_services

    first = build_services(settings, load_model=False)
    first.history.add_job("running-there", "api", {}, 1.0)
    first.history.set_job_state("running-there", "running", started_at=2.0)
    second = build_services(settings, load_model=False)  # while the first still runs
    try:
        assert second.history.get_job("running-there")["state"] == "running"
    finally:
        second.close()
        first.close()
    after_a_crash = build_services(settings, load_model=False)  # nobody holds the folder now
    try:
        assert after_a_crash.history.get_job("running-there")["state"] == "failed"
    finally:
        after_a_crash.close()


def test_a_drive_without_file_locks_counts_as_not_shared(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # as some network and FUSE drives answer

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert OutputStore(tmp_path).claim() is True  # else every start would leave crashed jobs 'running'


def test_the_fingerprint_changes_with_every_image_change_and_reads_no_rows(history, tmp_path):
    """Every open page polls it every 3 s: a COUNT over 150,000 rows took 22 ms each time."""
    history.add_job("j1", "ui", {}, 1.0)
    seen = [history.fingerprint()]
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"png")
    first = history.add_image(**history_row("j1", "a.png"))
    history.add_image(**history_row("j1", "b.png", seed=2))
    seen.append(history.fingerprint())
    (tmp_path / "b.png").unlink()
    history.list_images()  # finds the file deleted by hand and marks it
    seen.append(history.fingerprint())
    other_server = History(tmp_path / "history.sqlite3", tmp_path)  # a second server on the same folder
    try:
        other_server.delete_image(first)
    finally:
        other_server.close()
    seen.append(history.fingerprint())
    assert len(set(seen)) == 4, seen


def test_a_png_past_pils_pixel_limit_still_gives_its_text(tmp_path, monkeypatch):
    """PIL refuses to open a picture past twice its MAX_IMAGE_PIXELS (a 4x upscale of 4096x4096): PNG Info and the
    API's png-info read the text chunks before the pixels instead of calling the file damaged or too large."""
    import base64

    from PIL import PngImagePlugin

    from webui.api.convert import decode_image, png_info
    from webui.ui.pnginfo import read_parameters

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a 猫 on a mat\nSteps: 2, Sampler: Euler, Seed: 5, Size: 64x64")  # iTXt: not Latin-1
    meta.add_text("postprocessing", "Postprocess upscale by: 4", zip=True)  # zTXt
    meta.add_text("Software", "test")  # tEXt
    red((64, 64)).save(tmp_path / "huge.png", pnginfo=meta)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so 64x64 is past PIL's limit here
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "huge.png")
    text, table = read_parameters(str(tmp_path / "huge.png"))
    assert text.startswith("a 猫 on a mat\n") and "Postprocess upscale by: 4" in table
    data = base64.b64encode((tmp_path / "huge.png").read_bytes()).decode()
    answer = png_info(decode_image(data, pixels_needed=False))
    assert answer["info"] == text and answer["items"] == {"postprocessing": "Postprocess upscale by: 4",
                                                          "Software": "test"}
    assert answer["parameters"]["Seed"] == "5"
    not_a_png = tmp_path / "huge.jpg"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    red((64, 64)).save(not_a_png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "Could not read huge.jpg: at 2,000 pixels or more a JPEG or WebP file is too large" in read_parameters(
        str(not_a_png))[1]


def test_rows_kept_for_later_join_the_history_at_the_next_start_and_a_line_cut_short_is_left_out(tmp_path):
    history = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        (tmp_path / "day").mkdir()
        (tmp_path / "day" / "a.png").write_bytes(b"png")
        job = {"job_id": "late", "origin": "api", "request": {"prompt": "a cat"}, "created_at": 1.0,
               "owner_key": "k", "state": "done", "error": None, "started_at": 2.0, "finished_at": 3.0}
        history.keep_for_later(job, [history_row("late", "day/a.png"), history_row("late", "day/gone.png", seed=2)])
        with open(history.later_path, "a", encoding="utf-8") as file:
            file.write('{"job": {"job_id": "cut"')  # a crash while it was written
        assert history.reconcile()["rows_written_late"] == 1  # the file deleted since is left out
        images, total = history.list_images()
        assert total == 1 and images[0].path == "day/a.png" and images[0].job_state == "done"
        assert history.get_job("late")["owner_key"] == "k" and history.get_job("cut") is None
        assert not history.later_path.exists()
        assert history.reconcile()["rows_written_late"] == 0
    finally:
        history.close()


def _kept_job(job_id: str, finished_at: float = 3.0) -> dict:
    return {"job_id": job_id, "origin": "ui", "request": {"prompt": "a cat"}, "created_at": 1.0, "owner_key": "k",
            "state": "done", "error": None, "started_at": 2.0, "finished_at": finished_at}


def _two_pictures(folder: Path) -> None:
    (folder / "day").mkdir()
    for name in ("a.png", "b.png"):
        (folder / "day" / name).write_bytes(b"png")


def test_a_line_cut_short_does_not_take_the_next_kept_line_with_it(tmp_path):
    """A full disk (one reason rows are kept for later) can cut a line short with no newline; the next line kept
    was glued to it, and both were lost. Found by review."""
    history = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        _two_pictures(tmp_path)
        with open(history.later_path, "a", encoding="utf-8") as file:
            file.write('{"job": {"job_id": "cut"')
        history.keep_for_later(_kept_job("late"), [history_row("late", "day/a.png")])  # space again
        assert history.reconcile()["rows_written_late"] == 1
    finally:
        history.close()


def test_kept_rows_keep_their_place_in_the_history(tmp_path):
    """A picture kept for later and one made after it: newest first, as made, not with the late row stamped at the
    next start. Found by review."""
    history = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        _two_pictures(tmp_path)
        history.keep_for_later(_kept_job("old-job"), [history_row("old-job", "day/a.png")])
        time.sleep(0.05)
        history.add_job("new-job", "ui", {"prompt": "x"}, time.time())
        history.add_image(**history_row("new-job", "day/b.png", seed=2))
        time.sleep(0.05)
        history.reconcile()
        assert [image.path for image in history.list_images()[0]] == ["day/b.png", "day/a.png"]
    finally:
        history.close()


def test_rows_kept_by_another_server_while_the_file_is_written_in_are_not_lost(tmp_path):
    """Two servers on one outputs folder: a line the other keeps while this one's start writes the file in was
    deleted unread with the file. Found by review."""
    history = History(tmp_path / "history.sqlite3", tmp_path)
    other = History(tmp_path / "history.sqlite3", tmp_path)
    try:
        _two_pictures(tmp_path)
        history.keep_for_later(_kept_job("first"), [history_row("first", "day/a.png")])
        add_job = history.add_job

        def meanwhile(*args, **kwargs):
            other.keep_for_later(_kept_job("second"), [history_row("second", "day/b.png")])
            return add_job(*args, **kwargs)

        history.add_job = meanwhile
        assert history.reconcile(fail_unfinished_jobs=False)["rows_written_late"] == 1
        history.add_job = add_job
        assert history.reconcile(fail_unfinished_jobs=False)["rows_written_late"] == 1  # the next start
        assert history.get_job("second") is not None
    finally:
        history.close()
        other.close()


def test_a_kept_file_with_bytes_that_are_not_utf8_loses_only_their_line(settings):
    """A damaged line (not UTF-8) raised out of reconcile, and the server did not start. Found by review."""
    from webui.services import build_services

    settings.outdir.mkdir(parents=True, exist_ok=True)
    _two_pictures(settings.outdir)
    entry = {"job": _kept_job("good"), "images": [history_row("good", "day/a.png")]}
    (settings.outdir / "history.sqlite3.later.jsonl").write_bytes(b'{"job": "\xff"}\n' + json.dumps(entry).encode()
                                                                  + b"\n")
    services = build_services(settings, load_model=False)
    try:
        assert [image.path for image in services.history.list_images()[0]] == ["day/a.png"]
    finally:
        services.close()


def test_a_large_pngs_text_after_its_pixels_is_read_without_decoding_them(tmp_path, monkeypatch):
    """Past MAX_SCANNED_PIXELS the pixels are not decoded; a parameters chunk stored after them (some tools write
    it there) was then missed."""
    import base64
    import io
    import struct
    import zlib

    from PIL import PngImagePlugin

    from webui.api.convert import decode_image, png_info
    from webui.ui.pnginfo import read_parameters

    buffer = io.BytesIO()
    red((64, 64)).save(buffer, format="PNG")
    data = buffer.getvalue()
    text = b"parameters\0a cat after the pixels\nSteps: 2, Sampler: Euler, Seed: 5"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    (tmp_path / "after.png").write_bytes(data[:-12] + chunk + data[-12:])  # before IEND
    for module in ("webui.storage.outputs", "webui.ui.pnginfo", "webui.api.convert"):
        monkeypatch.setattr(f"{module}.MAX_SCANNED_PIXELS", 63 * 63)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert read_parameters(str(tmp_path / "after.png"))[0].startswith("a cat after the pixels\n")
    raw = base64.b64encode((tmp_path / "after.png").read_bytes()).decode()
    assert png_info(decode_image(raw, pixels_needed=False))["parameters"]["Seed"] == "5"


def test_a_pngs_parameters_are_read_beside_a_text_chunk_larger_than_pil_takes(tmp_path):
    """PIL refuses to open a PNG with a compressed text chunk that unpacks past its limit (1 MB; another program's
    embedded workflow): PNG Info and the API's png-info said 'not a PNG or damaged'. Found by review."""
    import base64

    from webui.api.convert import decode_image, png_info
    from webui.ui.pnginfo import read_parameters

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8")
    info.add_text("workflow", "x" * (2 * 1024 * 1024), zip=True)
    red((8, 8)).save(tmp_path / "big-text.png", pnginfo=info)
    with pytest.raises(ValueError):
        Image.open(tmp_path / "big-text.png")  # what PIL does with it
    assert read_parameters(str(tmp_path / "big-text.png"))[0].startswith("a cat\n")
    raw = base64.b64encode((tmp_path / "big-text.png").read_bytes()).decode()
    assert png_info(decode_image(raw, pixels_needed=False))["parameters"]["Seed"] == "1"


def test_a_text_key_given_twice_reads_as_pil_reads_it_at_any_size(tmp_path, monkeypatch):
    """The stand-in for a PNG too large to decode kept the first of two chunks of one key, PIL the last: one file
    showed other parameters over a size limit. Found by review."""
    from webui.ui.pnginfo import read_parameters

    info = PngInfo()
    info.add_text("parameters", "first\nSteps: 2, Seed: 1")
    info.add_text("parameters", "second\nSteps: 2, Seed: 2")
    red((64, 64)).save(tmp_path / "twice.png", pnginfo=info)
    small = read_parameters(str(tmp_path / "twice.png"))[0]
    for module in ("webui.storage.outputs", "webui.ui.pnginfo", "webui.api.convert"):
        monkeypatch.setattr(f"{module}.MAX_SCANNED_PIXELS", 63 * 63)
    assert read_parameters(str(tmp_path / "twice.png"))[0] == small and small.startswith("second\n")


def test_a_batch_copy_never_writes_its_text_file_over_another_files(tmp_path):
    """img2img Batch into the folder it reads (a training set: cat.jpg and its caption cat.txt), PNG, with a text file
    beside every image: the copy took the free name cat.png and wrote its parameters over the caption. Found by
    review."""
    from webui.storage.options import OptionsStore

    store = OutputStore(tmp_path / "outputs", OptionsStore(tmp_path / "config.json"))
    store.options.update({"save_txt": True})
    folder = tmp_path / "set"
    folder.mkdir()
    red().save(folder / "cat.jpg")
    (folder / "cat.txt").write_text("a cat, caption\n")
    path = store.save_named(red(), "new parameters", NamedCopy(folder, "cat"))
    assert path.name == "cat-1.png" and (folder / "cat-1.txt").read_text() == "new parameters\n"
    assert (folder / "cat.txt").read_text() == "a cat, caption\n"


@pytest.mark.parametrize("how", ["numbered", "named"])
def test_without_hard_links_a_name_taken_meanwhile_is_not_written_over(tmp_path, monkeypatch, how):
    """On a drive without hard links (exFAT, some network drives) the file was renamed onto its name: a file
    another writer saved there between the scan and the rename was replaced. Found by review."""
    import errno

    from webui.storage import outputs as outputs_module

    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    store = OutputStore(tmp_path)
    folder = store.extras_folder() if how == "numbered" else tmp_path / "copies"
    folder.mkdir(parents=True)
    taken = folder / ("00000.png" if how == "numbered" else "cat.png")
    monkeypatch.setattr(outputs_module.os, "link", no_links)
    real_exists = os.path.lexists
    real_highest = outputs_module.highest_number

    def other_writer_comes_first():
        if not taken.exists():
            info = PngInfo()
            info.add_text("parameters", "the other writer's")
            red().save(taken, pnginfo=info)

    def stale_scan(path, numbered=outputs_module._NUMBERED):
        found = real_highest(path, numbered)
        other_writer_comes_first()  # right after our scan
        return found

    def stale_check(path):
        found = real_exists(path)
        if Path(path) == taken:
            other_writer_comes_first()
        return found

    monkeypatch.setattr(outputs_module, "highest_number", stale_scan)
    monkeypatch.setattr(outputs_module.os.path, "lexists", stale_check)
    if how == "numbered":
        path = store.save_extra(red(), {"parameters": "ours"})
    else:
        path = store.save_named(red(), "ours", NamedCopy(folder, "cat"))
    with Image.open(taken) as other:
        assert read_infotext(other) == "the other writer's"
    with Image.open(path) as ours:
        assert path != taken and read_infotext(ours) == "ours"
    assert not list(folder.glob(".partial-*"))


def test_a_crash_while_an_init_image_was_saved_leaves_no_temporary_file_past_the_next_start(tmp_path):
    """save_init_image writes its temporary file in init-images, which the start's tidy-up never looked in. Found
    by review."""
    store = OutputStore(tmp_path)
    partial = tmp_path / "init-images" / ".partial-0123.png"
    partial.parent.mkdir()
    partial.write_bytes(b"half a png")
    os.utime(partial, (1, 1))
    assert store.remove_partial_files() == 1 and not partial.exists()


def test_a_move_onto_a_claimed_name_that_fails_leaves_no_empty_picture(tmp_path, monkeypatch):
    """Without hard links the name is claimed by an empty file first: where the move onto it then failed, that
    empty file stayed, taking the number and showing as a picture. Found by review."""
    import errno

    from webui.storage import outputs as outputs_module

    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def refused(source, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    store = OutputStore(tmp_path)
    monkeypatch.setattr(outputs_module.os, "link", no_links)
    monkeypatch.setattr(outputs_module.os, "replace", refused)
    with pytest.raises(PermissionError):
        store.save_extra(red(), {"parameters": "x"})
    assert list(store.extras_folder().iterdir()) == []


def test_a_start_alone_on_the_outputs_folder_removes_every_partial_file_however_new(settings):
    """A crash minutes before the restart left a partial file that stayed (only those over an hour old went, which
    matters only while another server shares the folder). Found by a probe."""
    from webui.services import build_services

    partial = settings.outdir / "txt2img-images" / "2026-11-29" / ".partial-cafe.png"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a png")
    build_services(settings, load_model=False).close()
    assert not partial.exists()
