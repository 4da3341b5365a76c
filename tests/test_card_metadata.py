"""A1111's user metadata beside an extra network (<name>.json): read as A1111 writes it, a spoilt file read as none
without failing a card, written whole with the keys it does not set kept, and never over a file it cannot read."""
from __future__ import annotations

import json
import logging

import pytest

from webui.storage.card_metadata import MAX_TEXT_CHARS, CardMetadata, metadata_path, read_metadata, write_metadata

A1111_FILE = {"description": "pen and ink", "activation text": "ink drawing", "preferred weight": 0.6,
              "negative text": "colour", "notes": "v2", "sd version": "SD1", "an extension's": {"x": 1}}


def test_a1111s_keys_are_read_and_a_missing_file_is_none(tmp_path):
    lora = tmp_path / "my.ink.safetensors"
    assert metadata_path(lora) == tmp_path / "my.ink.json"  # the last suffix replaced, as A1111 names it
    assert read_metadata(lora) == CardMetadata()
    metadata_path(lora).write_text(json.dumps(A1111_FILE))
    assert read_metadata(lora) == CardMetadata("pen and ink", "ink drawing", 0.6, "colour", "v2", "SD1")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "\udcff"])
def test_a_spoilt_file_reads_as_none_with_a_log_line(tmp_path, caplog, text):
    lora = tmp_path / "ink.pt"
    metadata_path(lora).write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING):
        assert read_metadata(lora) == CardMetadata()
    assert "ink.json is not read" in caplog.text


def test_a_long_text_is_read_whole_and_a_linked_file_stays_a_link(tmp_path):
    lora = tmp_path / "ink.pt"
    target = tmp_path / "shared" / "ink.json"
    target.parent.mkdir()
    target.write_text(json.dumps({"notes": "n" * (MAX_TEXT_CHARS + 5)}))
    metadata_path(lora).symlink_to(target)
    assert len(read_metadata(lora).notes) == MAX_TEXT_CHARS + 5  # never cut short, so never saved back cut
    write_metadata(lora, CardMetadata(description="linked"))
    assert metadata_path(lora).is_symlink() and json.loads(target.read_text())["description"] == "linked"


def test_a_value_that_does_not_read_is_left_out_alone(tmp_path):
    lora = tmp_path / "ink.pt"
    metadata_path(lora).write_text(json.dumps({"activation text": 12, "preferred weight": "heavy"}))
    assert read_metadata(lora) == CardMetadata(activation_text="12")
    metadata_path(lora).write_text(json.dumps({"preferred weight": 1e9}))
    assert read_metadata(lora).preferred_weight == 0.0


def test_writing_keeps_the_keys_it_does_not_set_and_leaves_no_partial_file(tmp_path):
    lora = tmp_path / "ink.safetensors"
    metadata_path(lora).write_text(json.dumps(A1111_FILE))
    write_metadata(lora, CardMetadata(description="new", sd_version="SD1"))
    assert json.loads(metadata_path(lora).read_text()) == {
        "description": "new", "activation text": "", "preferred weight": 0.0, "negative text": "", "notes": "",
        "sd version": "SD1", "an extension's": {"x": 1}}
    assert [path.name for path in tmp_path.iterdir()] == ["ink.json"]
    fresh = tmp_path / "fresh.pt"
    assert write_metadata(fresh, CardMetadata(notes="é")) == tmp_path / "fresh.json"
    assert read_metadata(fresh).notes == "é"


@pytest.mark.parametrize("metadata, says", [(CardMetadata(preferred_weight=101), "Preferred weight: 101"),
                                            (CardMetadata(preferred_weight=float("nan")), "Preferred weight: nan"),
                                            (CardMetadata(notes="x" * (MAX_TEXT_CHARS + 1)), "Notes: ")])
def test_what_cannot_be_saved_is_refused_saying_what_to_fix_and_nothing_is_written(tmp_path, metadata, says):
    lora = tmp_path / "ink.pt"
    with pytest.raises(ValueError, match=says):
        write_metadata(lora, metadata)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_read_is_not_saved_over(tmp_path):
    lora = tmp_path / "ink.pt"
    metadata_path(lora).write_text("{hand-written, almost JSON")
    with pytest.raises(OSError, match="not saved over; fix or remove it"):
        write_metadata(lora, CardMetadata(description="x"))
    assert metadata_path(lora).read_text() == "{hand-written, almost JSON"
