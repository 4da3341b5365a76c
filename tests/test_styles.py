"""Prompt styles in A1111's styles.csv: reading A1111's files, joining texts as A1111 joins them, saving safely."""
from __future__ import annotations

import pytest

from webui.schemas import InvalidRequest
from webui.storage.styles import Style, StyleNotFound, StyleStore, merge

A1111_FILE = '''\ufeffname,prompt,negative_prompt
Cinematic,"cinematic still of {prompt}, film grain","cartoon, {prompt}"
Sharp,"sharp focus, 8k",blurry
"Comma, name","a, b",
'''


def test_a_style_joins_the_prompt_as_a1111_joins_it():
    assert merge("cinematic still of {prompt}, film grain", "a cat") == "cinematic still of a cat, film grain"
    assert merge("sharp focus", "a cat") == "a cat, sharp focus"
    assert merge("sharp focus", "") == "sharp focus" and merge("", "a cat") == "a cat"


def test_an_a1111_styles_file_is_read_and_applied_in_the_order_given(tmp_path):
    (tmp_path / "styles.csv").write_text(A1111_FILE, encoding="utf-8")
    store = StyleStore(tmp_path / "styles.csv")
    assert [style.name for style in store.styles()] == ["Cinematic", "Sharp", "Comma, name"]
    assert store.apply("a cat", "ugly", ["Sharp", "Cinematic"]) == (
        "cinematic still of a cat, sharp focus, 8k, film grain", "cartoon, ugly, blurry")
    with pytest.raises(StyleNotFound, match=r"no style named 'Sharpp' \(styles: Cinematic, Sharp, Comma, name\)"):
        store.apply("a cat", "", ["Sharpp"])
    assert isinstance(StyleNotFound("x"), InvalidRequest)  # the worker refuses the job, with this message


def test_old_files_missing_files_and_other_csv_files(tmp_path):
    (tmp_path / "old.csv").write_text("name,text\nOld,old style text\n")
    assert StyleStore(tmp_path / "old.csv").styles() == [Style("Old", "old style text", "")]  # A1111 before 1.0
    assert StyleStore(tmp_path / "none.csv").styles() == []
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert StyleStore(tmp_path / "other.csv").styles() == []


def test_saving_replaces_in_place_or_appends_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "styles.csv").write_text(A1111_FILE, encoding="utf-8")
    store = StyleStore(tmp_path / "styles.csv")
    store.save(Style("Sharp", "very sharp", "soft"))
    store.save(Style(" New ", 'quotes " and, commas', ""))
    assert store.styles() == [Style("Cinematic", "cinematic still of {prompt}, film grain", "cartoon, {prompt}"),
                              Style("Sharp", "very sharp", "soft"), Style("Comma, name", "a, b", ""),
                              Style("New", 'quotes " and, commas', "")]
    assert store.delete("Comma, name") and not store.delete("Comma, name")
    assert [style.name for style in store.styles()] == ["Cinematic", "Sharp", "New"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["styles.csv"]
    for bad in ("", "   ", "two\nlines", "x" * 101):
        with pytest.raises(InvalidRequest, match="style name: give a name of 1 to 100 characters"):
            store.save(Style(bad, "a"))


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "styles.csv").write_text(A1111_FILE, encoding="utf-8")
    store = StyleStore(tmp_path / "styles.csv")
    monkeypatch.setattr("webui.storage.styles.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.save(Style("New", "x"))
    assert (tmp_path / "styles.csv").read_text(encoding="utf-8") == A1111_FILE
    assert sorted(path.name for path in tmp_path.iterdir()) == ["styles.csv"]


@pytest.mark.parametrize("content, encoding", [("name;prompt;negative_prompt\nA;a;x\n", "utf-8"),  # Excel's ";"
                                               ("name,prompt,negative_prompt\nCafé,crème,\n", "cp1252")])
def test_a_file_that_cannot_be_read_is_never_saved_over(tmp_path, content, encoding):
    (tmp_path / "styles.csv").write_bytes(content.encode(encoding))
    store = StyleStore(tmp_path / "styles.csv")
    assert store.styles() == []  # nothing offered, a line in the log
    with pytest.raises(InvalidRequest, match="styles file .* (cannot be read|has no name column)"):
        store.save(Style("New", "n"))
    assert (tmp_path / "styles.csv").read_bytes() == content.encode(encoding)


def test_hand_written_files_read_as_a1111_reads_them(tmp_path):
    (tmp_path / "styles.csv").write_text('name, prompt, negative_prompt, notes\n# my styles,,,\nFilm, "film grain, 35mm", '
                                         '"blurry, ugly", mine\nFilm, second,,\n', encoding="utf-8")
    store = StyleStore(tmp_path / "styles.csv")
    assert store.styles() == [Style("Film", "film grain, 35mm", "blurry, ugly")]  # no comment row, the first Film
    assert store.apply("a cat ", "", ["Film", "", "None"]) == ("a cat, film grain, 35mm", "blurry, ugly")
    store.save(Style("Film", "edited"))
    assert store.styles() == [Style("Film", "edited", "")]
    text = (tmp_path / "styles.csv").read_bytes()
    assert text.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt,notes\r\n")  # BOM, as A1111 writes it
    assert b"Film,edited,,mine" in text and b"second" not in text  # notes kept, the shadowed twin gone


def test_saving_through_a_link_keeps_the_link(tmp_path):
    """A styles.csv linked to A1111's own stays shared with it."""
    (tmp_path / "a1111.csv").write_text(A1111_FILE, encoding="utf-8")
    (tmp_path / "styles.csv").symlink_to(tmp_path / "a1111.csv")
    StyleStore(tmp_path / "styles.csv").save(Style("New", "n"))
    assert (tmp_path / "styles.csv").is_symlink()
    assert "New" in [style.name for style in StyleStore(tmp_path / "a1111.csv").styles()]
