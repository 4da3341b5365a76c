"""A1111's extra network cards in the LoRA and Textual inversion sections: previews found by A1111's names, name
cards for files without one, the search, and a click that puts the tag into the prompt."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from tests.helpers import running_services
from webui.ui.cards import CARD_SIZE, MAX_CARDS, CardPictures, matching, picked_name, preview_path


def clicked(index: int, caption: str | None) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": {"image": {}, "caption": caption}})


def test_a_preview_is_found_by_a1111s_names_in_its_order(tmp_path):
    lora = tmp_path / "detail.safetensors"
    lora.write_bytes(b"")
    assert preview_path(lora) is None
    (tmp_path / "detail.preview.webp").write_bytes(b"x")
    assert preview_path(lora) == tmp_path / "detail.preview.webp"
    (tmp_path / "detail.jpg").write_bytes(b"x")
    assert preview_path(lora) == tmp_path / "detail.jpg"  # jpg comes before webp
    (tmp_path / "detail.preview.png").write_bytes(b"x")
    assert preview_path(lora) == tmp_path / "detail.preview.png"
    (tmp_path / "detail.png").write_bytes(b"x")
    assert preview_path(lora) == tmp_path / "detail.png"
    assert preview_path(tmp_path / "other.pt") is None


def test_the_search_keeps_names_holding_every_word_in_any_case():
    files = [("Detail_Tweaker", None), ("add_detail", None), ("anime_lineart", None)]
    assert [name for name, _ in matching(files, "detail")] == ["Detail_Tweaker", "add_detail"]
    assert [name for name, _ in matching(files, "DETAIL add")] == ["add_detail"]
    assert matching(files, "  ") == files
    assert len(matching([(f"lora{i}", None) for i in range(MAX_CARDS + 50)], "")) == MAX_CARDS


def test_a_card_shows_the_preview_made_small_else_the_name(tmp_path):
    pictures = CardPictures()
    lora = tmp_path / "red.safetensors"
    Image.new("RGB", (600, 400), (220, 20, 20)).save(tmp_path / "red.png")
    card = pictures.picture("red", lora)
    assert card.size == (CARD_SIZE, CARD_SIZE)
    assert np.abs(np.asarray(card, float).mean(axis=(0, 1)) - (220, 20, 20)).max() < 3
    plain = pictures.picture("plain", tmp_path / "plain.safetensors")
    assert plain.size == (CARD_SIZE, CARD_SIZE)
    assert np.asarray(plain).std() > 5  # the name is written on it
    assert not np.array_equal(np.asarray(plain), np.asarray(pictures.picture("other", tmp_path / "other.pt")))
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert np.array_equal(np.asarray(pictures.picture("broken", tmp_path / "broken.pt")),
                          np.asarray(CardPictures().picture("broken", None)))  # the name card instead
    Image.new("RGB", (64, 64), (20, 20, 220)).save(tmp_path / "red.png")  # the preview replaced
    assert np.asarray(pictures.picture("red", lora), float)[..., 2].mean() > 200


def test_a_click_names_the_card_by_its_caption_or_by_its_place_among_those_shown():
    files = [("add_detail", None), ("anime_lineart", None), ("detail_tweaker", None)]
    assert picked_name(clicked(0, "anime_lineart"), files, "") == "anime_lineart"
    assert picked_name(clicked(1, None), files, "detail") == "detail_tweaker"
    assert picked_name(clicked(7, None), files, "") is None


@pytest.fixture(scope="module")
def card_services(models_dir, tmp_path_factory):
    yield from running_services(models_dir, tmp_path_factory.mktemp("cards") / "outputs")


def test_lora_cards_list_the_folder_and_a_click_adds_the_tag_at_the_weight(card_services, tmp_path):
    from tests.test_lora import kohya_state, lora_pairs, write_lora
    from webui.engine.lora import LoraLibrary
    from webui.ui.blocks import create_ui
    from webui.ui.generation import GenerationActions

    card_services.engine.loras = LoraLibrary(tmp_path)
    write_lora(tmp_path, "detail", kohya_state(lora_pairs()))
    write_lora(tmp_path, "lineart", kohya_state(lora_pairs()))
    Image.new("RGB", (32, 32), "green").save(tmp_path / "lineart.preview.png")
    actions = GenerationActions(card_services, models=None)
    lists = actions.file_lists()
    assert [caption for _, caption in lists[4]] == ["detail", "lineart"]  # the page's cards when it loads
    assert [caption for _, caption in actions.lora_cards("line")] == ["lineart"]
    prompt, negative, picked = actions.lora_card_picked("a cat", "", 0.7, "line", clicked(0, None))
    assert (prompt, negative, picked) == ("a cat <lora:lineart:0.7>", "", "lineart")  # no metadata: as it was
    prompt, _, _ = actions.lora_card_picked(prompt, "", 0.4, "", clicked(1, "lineart"))
    assert prompt == "a cat <lora:lineart:0.4>"  # the tag there gets the new weight
    assert actions.lora_card_picked("a cat", "", 1, "zzz", clicked(0, None)) == (gr.skip(),) * 3
    ui = create_ui(card_services)
    [wiring] = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "lora_card_picked"
                and fn.inputs[0].elem_id == "txt2img_prompt"]
    assert [block.elem_id for block in wiring.inputs] == ["txt2img_prompt", "txt2img_neg_prompt",
                                                          "txt2img_lora_weight", "txt2img_lora_search"]
    assert [block.elem_id for block in wiring.outputs] == ["txt2img_prompt", "txt2img_neg_prompt",
                                                           "txt2img_lora_name"]


def test_a_loras_metadata_gives_a_click_its_weight_and_texts_and_the_editor_saves_it(card_services, tmp_path,
                                                                                     monkeypatch):
    import json

    from tests.test_lora import kohya_state, lora_pairs, write_lora
    from webui.engine.lora import LoraLibrary
    from webui.ui.blocks import create_ui
    from webui.ui.generation import GenerationActions

    card_services.engine.loras = LoraLibrary(tmp_path)
    write_lora(tmp_path, "ink", kohya_state(lora_pairs()))
    (tmp_path / "ink.json").write_text(json.dumps({  # as A1111's card editor writes it, with an extension's key
        "description": "pen and ink", "activation text": "ink drawing, hatching", "preferred weight": 0.6,
        "negative text": "colour", "notes": "", "sd version": "SD1", "some extension": [1, 2]}))
    actions = GenerationActions(card_services, models=None)
    click = clicked(0, "ink")
    prompt, negative, _ = actions.lora_card_picked("a cat", "blurry,", 1.0, "", click)
    assert (prompt, negative) == ("a cat <lora:ink:0.6> ink drawing, hatching", "blurry, colour")
    assert actions.lora_card_picked(prompt, negative, 1.0, "", click)[:2] == (prompt, negative)  # nothing twice
    assert actions.lora_card_picked("", "", 1.0, "", click)[:2] == ("<lora:ink:0.6> ink drawing, hatching", "colour")

    assert actions.lora_metadata("ink") == ("pen and ink", "ink drawing, hatching", 0.6, "colour", "", "ink")
    assert actions.lora_metadata(None) == ("", "", 0.0, "", "", None)
    actions.save_lora_metadata("ink", "pen and ink", "ink style", None, "", "from a friend")  # weight box emptied
    saved = json.loads((tmp_path / "ink.json").read_text())
    assert saved == {"description": "pen and ink", "activation text": "ink style", "preferred weight": 0.0,
                     "negative text": "", "notes": "from a friend", "sd version": "SD1", "some extension": [1, 2]}
    assert actions.lora_card_picked("a cat", "", 0.3, "", click)[:2] == ("a cat <lora:ink:0.3> ink style", "")
    # a trigger word that is the LoRA's own name, or that another word holds, is still put in
    actions.save_lora_metadata("ink", "", "ink", 0, "blur", "")
    assert actions.lora_card_picked("pink sky", "blurry", 1, "", click)[:2] == ("pink sky <lora:ink:1> ink",
                                                                             "blurry, blur")
    assert actions.lora_card_picked("INK, sky", "blur", 1, "", click)[:2] == ("INK, sky <lora:ink:1>", "blur")
    actions.save_lora_metadata("ink", "pen and ink", "ink style", 0, "", "from a friend")
    with pytest.raises(gr.Error, match="out of range"):
        actions.save_lora_metadata("ink", "", "", 500, "", "")
    with pytest.raises(gr.Error, match="Pick a LoRA first"):
        actions.save_lora_metadata(None, "", "", 0, "", "")
    with pytest.raises(gr.Error, match="no LoRA named 'gone'"):
        actions.save_lora_metadata("gone", "", "", 0, "", "")
    assert json.loads((tmp_path / "ink.json").read_text()) == saved  # nothing written by the refusals
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ink.json", "ink.safetensors"]

    ui = create_ui(card_services)
    editor = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "lora_metadata"
              and fn.inputs[0].elem_id == "img2img_lora_name"]
    assert [block.label for block in editor[0].outputs[:5]] == ["Description", "Activation text", "Preferred weight",
                                                                "Negative text", "Notes"]
    [save] = [fn for fn in ui.blocks.fns.values() if getattr(fn.fn, "__name__", "") == "save_lora_metadata"
              and fn.inputs[1].elem_id == "img2img_lora_description"]
    assert save.inputs[0] is editor[0].outputs[5]  # Save writes to the LoRA whose metadata was read
    monkeypatch.setattr(card_services.settings, "share", True)  # shared without a login: visitors may not edit
    shared = GenerationActions(card_services, models=None)
    with pytest.raises(gr.Error, match="off on a server shared"):
        shared.save_lora_metadata("ink", "", "", 0, "", "")
    assert json.loads((tmp_path / "ink.json").read_text()) == saved


def test_embedding_cards_list_the_loaded_embeddings_and_a_click_names_one(card_services, tmp_path, monkeypatch):
    from tests.test_embeddings import vectors, write_a1111_pt
    from webui.ui.generation import GenerationActions

    monkeypatch.setattr(card_services.engine.settings, "embeddings_dir", tmp_path)
    write_a1111_pt(tmp_path, "badhands", vectors(2, 1))
    write_a1111_pt(tmp_path, "style_ink", vectors(1, 2))
    actions = GenerationActions(card_services, models=None, kind="img2img")
    actions.refresh_embeddings()
    assert [caption for _, caption in actions.embedding_cards("")] == ["badhands", "style_ink"]
    assert actions.embedding_card_picked("blurry,", "hands", clicked(0, None)) == ("blurry, badhands", "badhands")
