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
